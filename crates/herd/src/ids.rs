//! The ids the primary passes around, one type each, so that a worker
//! channel's index cannot be taken for a slot or a listener: all of them
//! are small integers. At the bottom of the crate: it imports nothing
//! from it.
//!
//! Each prints as its bare number (`Display`), so log lines, metric labels
//! and status output read as they did when these were plain integers.
//! Structured log fields take the number itself ([`SlotIx::get`]), so JSON
//! logs keep numbers, not strings.
//!
//! A [`Table`] is a `Vec` indexed by one kind of id only: the loop's
//! channels by [`ChannelIx`], its listeners by [`ListenerIx`], anything per
//! slot by [`SlotIx`]; indexing one with another id does not compile.

use std::fmt;
use std::marker::PhantomData;
use std::ops::{Index, IndexMut};

/// A worker channel in the hand-off loop: its place in the loop's channel
/// table, and so its poll token. Free again once its worker is retired, so
/// it names a channel only while that channel lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelIx(pub usize);

/// A listener: the configured ones first, in their order, then those bound
/// for what Node apps ask. A `u16` because it travels in every HANDOFF
/// message (herd-protocol's `Handoff::listener`), as it is here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerIx(pub u16);

/// A worker slot, `0..workers`: stable across the restarts of its workers,
/// and what a worker sees as `HERD_WORKER_ID`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotIx(pub usize);

/// One worker process, unique for herd's lifetime (pids get reused): the
/// serial number of its spawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub u64);

/// An id that is a position in a table (a `Vec`, or an array with room
/// for the most there can be).
pub trait Position: Copy {
    /// The position it names.
    fn position(self) -> usize;
    /// The id of `position`.
    fn at(position: usize) -> Self;
}

impl ChannelIx {
    /// The position in the loop's channel table.
    pub fn get(self) -> usize {
        self.0
    }
}

impl ListenerIx {
    /// The position in the listener tables.
    pub fn get(self) -> usize {
        usize::from(self.0)
    }

    /// The listener at `position` in a listener table. Panics past
    /// `u16::MAX`, which no table reaches (`listener::MAX_LISTENERS`).
    pub fn at(position: usize) -> ListenerIx {
        ListenerIx(u16::try_from(position).expect("a listener index fits in a u16"))
    }

    /// The first `count` listeners, in order.
    pub fn below(count: usize) -> impl Iterator<Item = ListenerIx> {
        (0..count).map(ListenerIx::at)
    }
}

impl SlotIx {
    /// The slot's number, `0..workers`.
    pub fn get(self) -> usize {
        self.0
    }

    /// The first `count` slots, in order.
    pub fn below(count: usize) -> impl Iterator<Item = SlotIx> {
        (0..count).map(SlotIx)
    }
}

impl Position for ChannelIx {
    fn position(self) -> usize {
        self.get()
    }
    fn at(position: usize) -> Self {
        ChannelIx(position)
    }
}

impl Position for ListenerIx {
    fn position(self) -> usize {
        self.get()
    }
    fn at(position: usize) -> Self {
        ListenerIx::at(position)
    }
}

impl Position for SlotIx {
    fn position(self) -> usize {
        self.get()
    }
    fn at(position: usize) -> Self {
        SlotIx(position)
    }
}

impl From<u16> for ListenerIx {
    /// The listener a HANDOFF or ACCEPTED message names.
    fn from(wire: u16) -> Self {
        ListenerIx(wire)
    }
}

impl From<ListenerIx> for u16 {
    /// The listener as a HANDOFF message carries it.
    fn from(listener: ListenerIx) -> Self {
        listener.0
    }
}

impl fmt::Display for ChannelIx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for ListenerIx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for SlotIx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A `Vec` indexed by the id `I` alone.
pub struct Table<I, T> {
    rows: Vec<T>,
    ids: PhantomData<fn(I) -> I>,
}

impl<I: Position, T> Table<I, T> {
    /// An empty table.
    pub fn new() -> Self {
        Table::from(Vec::new())
    }

    /// An empty table with room for `capacity` rows.
    pub fn with_capacity(capacity: usize) -> Self {
        Table::from(Vec::with_capacity(capacity))
    }

    /// How many rows there are: ids `0..len`.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn get(&self, id: I) -> Option<&T> {
        self.rows.get(id.position())
    }

    pub fn get_mut(&mut self, id: I) -> Option<&mut T> {
        self.rows.get_mut(id.position())
    }

    /// Every id, in order. The iterator does not borrow the table, which
    /// may change meanwhile (rows added are not visited).
    pub fn ids(&self) -> impl Iterator<Item = I> {
        (0..self.rows.len()).map(I::at)
    }

    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.rows.iter()
    }

    pub fn iter_mut(&mut self) -> std::slice::IterMut<'_, T> {
        self.rows.iter_mut()
    }

    /// Every row with its id.
    pub fn enumerate(&self) -> impl Iterator<Item = (I, &T)> + '_ {
        self.rows
            .iter()
            .enumerate()
            .map(|(at, row)| (I::at(at), row))
    }

    /// The id of the first row that satisfies `predicate`.
    pub fn position(&self, predicate: impl FnMut(&T) -> bool) -> Option<I> {
        self.rows.iter().position(predicate).map(I::at)
    }

    /// Adds a row; returns its id.
    pub fn push(&mut self, row: T) -> I {
        self.rows.push(row);
        I::at(self.rows.len() - 1)
    }

    /// Grows the table, with `fill` rows, until it has a row for `id`.
    pub fn reach(&mut self, id: I, fill: impl FnMut() -> T) {
        if self.rows.len() <= id.position() {
            self.rows.resize_with(id.position() + 1, fill);
        }
    }

    /// Keeps the first `len` rows.
    pub fn truncate(&mut self, len: usize) {
        self.rows.truncate(len);
    }

    pub fn clear(&mut self) {
        self.rows.clear();
    }
}

impl<I: Position, T> Default for Table<I, T> {
    fn default() -> Self {
        Table::new()
    }
}

impl<I, T> From<Vec<T>> for Table<I, T> {
    /// Row `i` gets id `i`.
    fn from(rows: Vec<T>) -> Self {
        Table {
            rows,
            ids: PhantomData,
        }
    }
}

impl<I, T> FromIterator<T> for Table<I, T> {
    fn from_iter<It: IntoIterator<Item = T>>(rows: It) -> Self {
        Table::from(rows.into_iter().collect::<Vec<T>>())
    }
}

impl<I: Position, T> Index<I> for Table<I, T> {
    type Output = T;
    fn index(&self, id: I) -> &T {
        &self.rows[id.position()]
    }
}

impl<I: Position, T> IndexMut<I> for Table<I, T> {
    fn index_mut(&mut self, id: I) -> &mut T {
        &mut self.rows[id.position()]
    }
}

impl<'a, I, T> IntoIterator for &'a Table<I, T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.rows.iter()
    }
}

impl<'a, I, T> IntoIterator for &'a mut Table<I, T> {
    type Item = &'a mut T;
    type IntoIter = std::slice::IterMut<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.rows.iter_mut()
    }
}

impl<I, T: fmt::Debug> fmt::Debug for Table<I, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.rows.fmt(f)
    }
}

impl<I, T: Clone> Clone for Table<I, T> {
    fn clone(&self) -> Self {
        Table::from(self.rows.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_as_their_bare_numbers() {
        assert_eq!(ChannelIx(3).to_string(), "3");
        assert_eq!(ListenerIx(7).to_string(), "7");
        assert_eq!(SlotIx(0).to_string(), "0");
        assert_eq!(WorkerId(12).to_string(), "12");
        assert_eq!(format!("{:>3}", SlotIx(5)), "  5");
    }

    #[test]
    fn listeners_convert_to_and_from_the_wire() {
        assert_eq!(ListenerIx::from(9u16), ListenerIx(9));
        assert_eq!(u16::from(ListenerIx(9)), 9);
        assert_eq!(ListenerIx::at(255).get(), 255);
        assert_eq!(
            ListenerIx::below(3).collect::<Vec<_>>(),
            [ListenerIx(0), ListenerIx(1), ListenerIx(2)]
        );
        assert_eq!(SlotIx::below(2).collect::<Vec<_>>(), [SlotIx(0), SlotIx(1)]);
    }

    #[test]
    fn a_table_is_indexed_by_its_id() {
        let mut table: Table<SlotIx, &str> = Table::new();
        assert_eq!(table.push("a"), SlotIx(0));
        table.reach(SlotIx(2), || "-");
        table[SlotIx(1)] = "b";
        assert_eq!(table.len(), 3);
        assert_eq!(table.get(SlotIx(2)), Some(&"-"));
        assert_eq!(table.get(SlotIx(3)), None);
        assert_eq!(table.position(|row| *row == "b"), Some(SlotIx(1)));
        assert_eq!(
            table.ids().collect::<Vec<_>>(),
            SlotIx::below(3).collect::<Vec<_>>()
        );
        let rows: Vec<(SlotIx, &&str)> = table.enumerate().collect();
        assert_eq!(rows[1], (SlotIx(1), &"b"));
        table.truncate(1);
        assert_eq!(table.iter().copied().collect::<Vec<_>>(), ["a"]);
    }
}
