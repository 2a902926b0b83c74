//! Connections accepted that no worker could take yet.
//!
//! Owns their order: one FIFO per listener, so a listener that no worker
//! serves (a Node app closed that server everywhere, say) holds up only its
//! own connections, never those of the other listeners behind them. Within
//! a listener, first in, first out; a connection taken back from a worker
//! goes to the front of its listener's line.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::ids::{ListenerIx, Table};

#[derive(Debug)]
pub struct WaitQueue<T> {
    /// One line per listener: its lane.
    lanes: Table<ListenerIx, VecDeque<T>>,
    len: usize,
}

impl<T> Default for WaitQueue<T> {
    fn default() -> Self {
        WaitQueue {
            lanes: Table::new(),
            len: 0,
        }
    }
}

impl<T> WaitQueue<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Nothing from `lane` waits.
    pub fn lane_is_empty(&self, lane: ListenerIx) -> bool {
        self.lanes.get(lane).is_none_or(VecDeque::is_empty)
    }

    fn lane(&mut self, lane: ListenerIx) -> &mut VecDeque<T> {
        self.lanes.reach(lane, VecDeque::new);
        &mut self.lanes[lane]
    }

    pub fn push_back(&mut self, lane: ListenerIx, item: T) {
        self.lane(lane).push_back(item);
        self.len += 1;
    }

    pub fn push_front(&mut self, lane: ListenerIx, item: T) {
        self.lane(lane).push_front(item);
        self.len += 1;
    }

    pub fn pop_front(&mut self, lane: ListenerIx) -> Option<T> {
        let item = self.lanes.get_mut(lane)?.pop_front()?;
        self.len -= 1;
        Some(item)
    }

    /// Every item waiting, lane by lane, each lane front first.
    pub fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        self.lanes.iter().flatten()
    }

    /// The front item of every lane.
    pub fn fronts(&self) -> impl Iterator<Item = &T> + '_ {
        self.lanes.iter().filter_map(VecDeque::front)
    }

    /// Removes everything waiting in `lane`; returns how many there were.
    pub fn clear_lane(&mut self, lane: ListenerIx) -> usize {
        let Some(items) = self.lanes.get_mut(lane) else {
            return 0;
        };
        let cleared = items.len();
        items.clear();
        self.len -= cleared;
        cleared
    }

    /// The lanes that have something waiting.
    pub fn busy_lanes(&self) -> Vec<ListenerIx> {
        self.lanes
            .ids()
            .filter(|&lane| !self.lane_is_empty(lane))
            .collect()
    }

    /// When the oldest waiting item arrived.
    pub fn oldest(&self, arrived: impl Fn(&T) -> Instant) -> Option<Instant> {
        self.lanes
            .iter()
            .filter_map(|lane| lane.front().map(&arrived))
            .min()
    }

    /// Removes every item that has waited `timeout` or longer at `now`;
    /// returns how many.
    pub fn expire(
        &mut self,
        now: Instant,
        timeout: Duration,
        arrived: impl Fn(&T) -> Instant,
    ) -> usize {
        let mut expired = 0;
        for lane in self.lanes.iter_mut() {
            while lane
                .front()
                .is_some_and(|item| now.duration_since(arrived(item)) >= timeout)
            {
                lane.pop_front();
                expired += 1;
            }
        }
        self.len -= expired;
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_lane_is_first_in_first_out_and_lanes_do_not_block_each_other() {
        let mut queue = WaitQueue::default();
        queue.push_back(ListenerIx(1), "b1");
        queue.push_back(ListenerIx(0), "a1");
        queue.push_back(ListenerIx(1), "b2");
        queue.push_front(ListenerIx(1), "b0");
        assert_eq!(queue.len(), 4);
        assert_eq!(queue.busy_lanes(), [ListenerIx(0), ListenerIx(1)]);
        // Lane 1 is stuck: lane 0 is served all the same.
        assert_eq!(queue.pop_front(ListenerIx(0)), Some("a1"));
        assert!(queue.lane_is_empty(ListenerIx(0)) && !queue.lane_is_empty(ListenerIx(1)));
        assert!(queue.lane_is_empty(ListenerIx(7)));
        assert_eq!(queue.pop_front(ListenerIx(1)), Some("b0"));
        assert_eq!(queue.pop_front(ListenerIx(1)), Some("b1"));
        assert_eq!(queue.len(), 1);
        assert_eq!(queue.pop_front(ListenerIx(5)), None);
    }

    #[test]
    fn expiry_takes_the_old_ones_from_every_lane() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut queue = WaitQueue::default();
        queue.push_back(ListenerIx(0), at(0));
        queue.push_back(ListenerIx(0), at(50));
        queue.push_back(ListenerIx(2), at(10));
        queue.push_back(ListenerIx(2), at(90));
        assert_eq!(queue.oldest(|t| *t), Some(at(0)));
        let expired = queue.expire(at(100), Duration::from_millis(60), |t| *t);
        assert_eq!(expired, 2);
        assert_eq!(queue.len(), 2);
        assert_eq!(queue.oldest(|t| *t), Some(at(50)));
        assert!(!queue.is_empty());
    }
}
