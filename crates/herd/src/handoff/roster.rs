//! What herd's first hand-off thread shares with the others: the workers
//! they may send to, and per worker what each thread sent.
//!
//! Thread 0 (the loop in this module's parent) owns every worker and
//! decides everything about it; the other hand-off threads
//! ([`super::threads`]) only accept and send. They see the workers through
//! a [`Roster`] that thread 0 publishes whenever a slot changes hands, and
//! each worker through its [`SharedWorker`]:
//!
//! - the worker's channel (the same socket thread 0 sends on: a
//!   `SOCK_SEQPACKET` send is one message, so two threads' batches never
//!   interleave) and its counter page (read for least-conn and
//!   `max_unacked`);
//! - a **gate** thread 0 opens while the worker serves and closes before
//!   it drains, rests or takes back what is queued: a thread sends only
//!   holding the gate (shared: senders never wait for each other), so once
//!   thread 0 closed it no send is under way and none follows, and reading
//!   the channel back loses nothing;
//! - per thread, what that thread sent (written by that thread alone) and
//!   what thread 0 took back of it.
//!
//! Nothing here is per connection but the counters' adds.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use herd_protocol::page::{Page, MAX_HANDOFF_THREADS};

/// One worker as every hand-off thread sees it.
#[derive(Debug)]
pub(super) struct SharedWorker {
    /// herd's end of the worker's channel.
    pub(super) channel: Arc<OwnedFd>,
    pub(super) page: Arc<Page>,
    /// Hand-offs sent, by thread; each entry written by its thread alone
    /// (holding the gate).
    pub(super) sent: [AtomicU64; MAX_HANDOFF_THREADS],
    /// Of each thread's, how many thread 0 read back off the channel.
    pub(super) taken_back: [AtomicU64; MAX_HANDOFF_THREADS],
    /// Sent back (RETURN), counted by thread 0.
    pub(super) refused: AtomicU64,
    /// `max_connections_per_worker`: no thread sends past it.
    pub(super) recycle_after: Option<u64>,
    /// Whether the other threads may send; see the module docs. Senders
    /// hold it shared (they do not wait for each other), thread 0 takes
    /// it alone to open or close it.
    gate: RwLock<bool>,
    /// The gate's state, read without the lock when choosing a worker
    /// (the lock is taken, and the state read again, to send).
    open: AtomicBool,
}

impl SharedWorker {
    pub(super) fn new(
        channel: Arc<OwnedFd>,
        page: Arc<Page>,
        recycle_after: Option<u64>,
    ) -> SharedWorker {
        SharedWorker {
            channel,
            page,
            sent: Default::default(),
            taken_back: Default::default(),
            refused: AtomicU64::new(0),
            recycle_after,
            gate: RwLock::new(false),
            open: AtomicBool::new(false),
        }
    }

    /// Opens or closes the gate. Closing waits for a send under way, so
    /// when it returns no other thread is sending to this worker.
    pub(super) fn set_open(&self, open: bool) {
        let mut gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        *gate = open;
        self.open.store(open, Relaxed);
    }

    pub(super) fn is_open(&self) -> bool {
        self.open.load(Relaxed)
    }

    /// Runs `send` holding the gate, if it is open.
    pub(super) fn send_if_open<T>(&self, send: impl FnOnce() -> T) -> Option<T> {
        let gate = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        gate.then(send)
    }

    /// Every thread's hand-offs to it, of `threads`.
    pub(super) fn total_sent(&self, threads: usize) -> u64 {
        self.sent[..threads].iter().map(|s| s.load(Relaxed)).sum()
    }

    /// Sent and not yet taken off the channel, live from the page (the
    /// worker's word, clamped per thread to what that thread sent).
    pub(super) fn outstanding(&self, threads: usize) -> u64 {
        (0..threads)
            .map(|t| {
                let sent = self.sent[t].load(Relaxed);
                let left = sent.saturating_sub(self.taken_back[t].load(Relaxed));
                left.saturating_sub(self.page.received_from(t))
            })
            .sum()
    }

    /// Connections it holds, as least-conn counts them: sent by any
    /// thread and kept, less what its page says it closed.
    pub(super) fn load(&self, threads: usize) -> u64 {
        let taken_back: u64 = self.taken_back[..threads]
            .iter()
            .map(|t| t.load(Relaxed))
            .sum();
        let kept = self
            .total_sent(threads)
            .saturating_sub(taken_back + self.refused.load(Relaxed));
        kept.saturating_sub(self.page.closed())
    }

    /// Has it been sent its `max_connections_per_worker`?
    pub(super) fn recycle_reached(&self, threads: usize) -> bool {
        self.recycle_after
            .is_some_and(|limit| self.total_sent(threads) >= limit)
    }
}

/// What a slot is to the other hand-off threads.
#[derive(Debug, Clone)]
pub(super) enum SlotView {
    /// No worker serves it.
    Empty,
    /// Its worker takes connections from thread 0 only (it does not count
    /// per thread, or speaks Node's protocol): what the policy gives it
    /// is forwarded to thread 0.
    Home,
    Shared(Arc<SharedWorker>),
}

/// The slots as thread 0 last published them.
#[derive(Debug, Clone, Default)]
pub(super) struct Roster {
    pub(super) slots: Vec<SlotView>,
    /// `handoff.max_unacked`: no more queued to one worker, all threads together.
    pub(super) max_unacked: usize,
}

/// Where thread 0 publishes the [`Roster`] and the others pick it up
/// (one atomic load per turn to see it is unchanged).
#[derive(Debug, Default)]
pub(super) struct RosterBoard {
    current: Mutex<Arc<Roster>>,
    version: AtomicU64,
}

impl RosterBoard {
    pub(super) fn publish(&self, roster: Roster) {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        *current = Arc::new(roster);
        self.version.fetch_add(1, Relaxed);
    }

    pub(super) fn version(&self) -> u64 {
        self.version.load(Relaxed)
    }

    /// The roster now, and its version.
    pub(super) fn current(&self) -> (Arc<Roster>, u64) {
        let current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        (current.clone(), self.version())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker() -> SharedWorker {
        let (herds, _workers) = std::os::unix::net::UnixStream::pair().unwrap();
        let page = Page::create().unwrap();
        SharedWorker::new(Arc::new(OwnedFd::from(herds)), Arc::new(page), Some(10))
    }

    #[test]
    fn a_closed_gate_runs_no_send() {
        let worker = worker();
        assert_eq!(
            worker.send_if_open(|| 1),
            None,
            "closed until thread 0 opens it"
        );
        worker.set_open(true);
        assert!(worker.is_open());
        assert_eq!(worker.send_if_open(|| 1), Some(1));
        worker.set_open(false);
        assert_eq!(worker.send_if_open(|| 1), None);
    }

    #[test]
    fn counts_add_up_over_threads_and_never_go_below_zero() {
        let worker = worker();
        worker.sent[0].store(4, Relaxed);
        worker.sent[2].store(6, Relaxed);
        worker.taken_back[2].store(1, Relaxed);
        assert_eq!(worker.total_sent(3), 10);
        assert_eq!(worker.total_sent(2), 4, "only the running threads count");
        assert_eq!(worker.outstanding(3), 9);
        assert_eq!(worker.load(3), 9);
        worker.refused.store(2, Relaxed);
        assert_eq!(worker.load(3), 7);
        assert!(worker.recycle_reached(3));
        assert!(!worker.recycle_reached(2));
        // The page cannot be written here (herd maps it read-only), and a
        // fresh page says nothing taken: outstanding is what was sent.
        assert_eq!(worker.page.received_from(2), 0);
    }

    #[test]
    fn the_board_hands_out_what_was_published_last() {
        let board = RosterBoard::default();
        let (empty, first) = board.current();
        assert!(empty.slots.is_empty());
        board.publish(Roster {
            slots: vec![SlotView::Empty, SlotView::Home],
            max_unacked: 3,
        });
        let (roster, version) = board.current();
        assert_eq!((roster.slots.len(), roster.max_unacked), (2, 3));
        assert!(version > first);
        assert_eq!(board.version(), version);
    }
}
