//! The ids the primary passes around, one type each, so that a worker
//! channel's index cannot be taken for a slot or a listener: all of them
//! are small integers. At the bottom of the crate: it imports nothing
//! from it.
//!
//! Each prints as its bare number (`Display`), so log lines, metric labels
//! and status output read as they did when these were plain integers.
//! Structured log fields take the number itself ([`SlotIx::get`]), so JSON
//! logs keep numbers, not strings.

use std::fmt;

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
}
