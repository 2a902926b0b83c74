//! What the hand-off loop counts, lock-free: one writer (the loop), any
//! number of readers (status, metrics, the closing tally). Below both the
//! loop and `metrics`, so neither needs the other to know the numbers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use std::io;

use crate::config::{MAX_LISTENERS, MAX_WORKERS};
use crate::ids::{ListenerIx, SlotIx, Table};
use herd_protocol::page::MAX_HANDOFF_THREADS;

/// Lock-free counters the loop updates and anyone may read.
#[derive(Debug)]
pub struct Counters {
    /// Every listener's address, by index: the configured ones, then those
    /// bound for what Node apps asked (`None`: released, the index free for
    /// the next). Written only when one is added or released.
    listeners: Mutex<Table<ListenerIx, Option<SocketAddr>>>,
    /// Connections accepted, per listener (room for [`MAX_LISTENERS`]).
    pub accepted: Table<ListenerIx, AtomicU64>,
    /// Connections a worker acknowledged, per slot (room for [`MAX_WORKERS`]).
    pub handed_off: Table<SlotIx, AtomicU64>,
    /// Connections taken back from a worker that died before acknowledging them.
    pub requeued_worker_gone: AtomicU64,
    /// Connections a worker refused (NACK), handed to another.
    pub requeued_refused: AtomicU64,
    /// Connections herd accepted from the kernel-rotation socket of a slot
    /// whose worker died or was stopped, and handed to another.
    pub requeued_slot_queue: AtomicU64,
    /// Connections taken back from a worker found hung, handed to another.
    pub requeued_hung: AtomicU64,
    /// Connections sent to a worker and not yet acknowledged, right now.
    pub in_flight: AtomicU64,
    /// Per slot, connections its workers acknowledged and have not reported
    /// CLOSED; only meaningful where `reports_closed` is set.
    pub open_connections: Table<SlotIx, AtomicU64>,
    /// Per slot, whether its worker reports CLOSED (it sent at least one).
    pub reports_closed: Table<SlotIx, AtomicBool>,
    /// Connections closed because the wait queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Connections closed because no worker took them within `queue_timeout`.
    pub dropped_queue_timeout: AtomicU64,
    /// Connections closed unserved because herd was out of file descriptors
    /// for `queue_timeout` (accepted with the reserve fd and closed).
    pub dropped_fd_limit: AtomicU64,
    /// accept(2) failures other than "nothing to accept", by [`ACCEPT_ERROR_KINDS`].
    pub accept_errors: [AtomicU64; ACCEPT_ERROR_KINDS.len()],
    /// Accept-to-ACK time of each connection (recorded only when metrics are served).
    pub latency: LatencyHistogram,
    /// Connections the kernel dealt to a worker's own socket (kernel rotation),
    /// also counted in `accepted` and `handed_off`.
    pub kernel_dealt: AtomicU64,
    /// Connections each hand-off thread accepted (also in `accepted`).
    pub thread_accepted: [AtomicU64; MAX_HANDOFF_THREADS],
    /// Of those, what each thread past the first gave to thread 0 to
    /// send (no worker it may send to could take it).
    pub thread_forwarded: [AtomicU64; MAX_HANDOFF_THREADS],
    /// Hand-off threads running (`handoff_threads`; 1 until they start).
    pub handoff_threads: AtomicU64,
}

/// Upper bounds of the hand-off latency buckets in nanoseconds: 5 µs to 100 ms.
pub const LATENCY_BOUNDS_NANOS: [u64; 14] = [
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
];

/// A fixed-bucket histogram every hand-off thread records in (atomic
/// adds: a few nanoseconds each, against a hand-off's microseconds). A
/// concurrent reader may see a count one observation behind its buckets;
/// a scrape tolerates that.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Per bucket (not cumulative); the last one is above every bound.
    buckets: [AtomicU64; LATENCY_BOUNDS_NANOS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

/// What a reader sees of a [`LatencyHistogram`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencySnapshot {
    /// Per bucket, not cumulative, aligned with [`LATENCY_BOUNDS_NANOS`] plus +Inf.
    pub buckets: Vec<u64>,
    pub sum_nanos: u64,
    pub count: u64,
}

impl LatencyHistogram {
    /// Records one observation.
    pub fn record(&self, nanos: u64) {
        let bucket = LATENCY_BOUNDS_NANOS
            .iter()
            .position(|&bound| nanos <= bound)
            .unwrap_or(LATENCY_BOUNDS_NANOS.len());
        self.buckets[bucket].fetch_add(1, Relaxed);
        self.sum_nanos.fetch_add(nanos, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            buckets: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            sum_nanos: self.sum_nanos.load(Relaxed),
            count: self.count.load(Relaxed),
        }
    }
}

/// Adds to a counter that only the calling thread writes (a load and a
/// store: no locked read-modify-write).
pub(crate) fn bump(counter: &AtomicU64, by: u64) {
    counter.store(counter.load(Relaxed).wrapping_add(by), Relaxed);
}

/// The `kind` label of accept errors, in the order of `Counters::accept_errors`.
pub const ACCEPT_ERROR_KINDS: [&str; 6] = [
    "EMFILE",
    "ENFILE",
    "ENOBUFS",
    "ENOMEM",
    "ECONNABORTED",
    "other",
];

pub(crate) fn accept_error_kind(error: &io::Error) -> usize {
    match error.raw_os_error() {
        Some(libc::EMFILE) => 0,
        Some(libc::ENFILE) => 1,
        Some(libc::ENOBUFS) => 2,
        Some(libc::ENOMEM) => 3,
        Some(libc::ECONNABORTED) => 4,
        _ => 5,
    }
}

impl Counters {
    pub fn new(listeners: &[SocketAddr]) -> Self {
        fn zeros<I>(n: usize) -> Table<I, AtomicU64> {
            (0..n).map(|_| AtomicU64::new(0)).collect()
        }
        Counters {
            listeners: Mutex::new(listeners.iter().copied().map(Some).collect()),
            accepted: zeros(MAX_LISTENERS),
            handed_off: zeros(MAX_WORKERS),
            requeued_worker_gone: AtomicU64::new(0),
            requeued_refused: AtomicU64::new(0),
            requeued_slot_queue: AtomicU64::new(0),
            requeued_hung: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            open_connections: zeros(MAX_WORKERS),
            reports_closed: (0..MAX_WORKERS).map(|_| Default::default()).collect(),
            dropped_queue_full: AtomicU64::new(0),
            dropped_queue_timeout: AtomicU64::new(0),
            dropped_fd_limit: AtomicU64::new(0),
            accept_errors: Default::default(),
            latency: LatencyHistogram::default(),
            kernel_dealt: AtomicU64::new(0),
            thread_accepted: Default::default(),
            thread_forwarded: Default::default(),
            handoff_threads: AtomicU64::new(1),
        }
    }

    /// Every listener's address, in order (released ones left out).
    /// How many listener indices are in use or were (released ones included).
    pub fn listener_count(&self) -> usize {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flatten()
            .copied()
            .collect()
    }

    /// How many listener indices have been used (released ones included):
    /// `accepted` below that holds every count there is.
    pub fn listener_indices(&self) -> usize {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    pub(super) fn set_listener(&self, listener: ListenerIx, addr: Option<SocketAddr>) {
        let mut listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        listeners.reach(listener, || None);
        listeners[listener] = addr;
    }
}

/// What `herd upgrade` carries of the counters (the hand-off latency
/// histogram starts again empty). Trailing zeros are left out.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CarriedCounters {
    pub accepted: Vec<u64>,
    pub handed_off: Vec<u64>,
    pub open_connections: Vec<u64>,
    pub reports_closed: Vec<bool>,
    /// worker gone, refused, slot queue, hung.
    pub requeued: [u64; 4],
    /// queue full, queue timeout, fd limit.
    pub dropped: [u64; 3],
    pub accept_errors: Vec<u64>,
    pub kernel_dealt: u64,
    /// Per hand-off thread, what it accepted, and what it forwarded.
    #[serde(default)]
    pub thread_accepted: Vec<u64>,
    #[serde(default)]
    pub thread_forwarded: Vec<u64>,
}

fn values<'a>(counters: impl IntoIterator<Item = &'a AtomicU64>) -> Vec<u64> {
    let mut values: Vec<u64> = counters.into_iter().map(|c| c.load(Relaxed)).collect();
    while values.last() == Some(&0) {
        values.pop();
    }
    values
}

fn store<'a>(counters: impl IntoIterator<Item = &'a AtomicU64>, values: &[u64]) {
    for (counter, value) in counters.into_iter().zip(values) {
        counter.store(*value, Relaxed);
    }
}

impl Counters {
    pub fn carried(&self) -> CarriedCounters {
        let mut reports_closed: Vec<bool> = self
            .reports_closed
            .iter()
            .map(|r| r.load(Relaxed))
            .collect();
        while reports_closed.last() == Some(&false) {
            reports_closed.pop();
        }
        CarriedCounters {
            accepted: values(&self.accepted),
            handed_off: values(&self.handed_off),
            open_connections: values(&self.open_connections),
            reports_closed,
            requeued: [
                &self.requeued_worker_gone,
                &self.requeued_refused,
                &self.requeued_slot_queue,
                &self.requeued_hung,
            ]
            .map(|c| c.load(Relaxed)),
            dropped: [
                &self.dropped_queue_full,
                &self.dropped_queue_timeout,
                &self.dropped_fd_limit,
            ]
            .map(|c| c.load(Relaxed)),
            accept_errors: values(&self.accept_errors),
            kernel_dealt: self.kernel_dealt.load(Relaxed),
            thread_accepted: values(&self.thread_accepted),
            thread_forwarded: values(&self.thread_forwarded),
        }
    }

    /// Sets every counter `carried` has (before anything counts).
    pub fn restore(&self, carried: &CarriedCounters) {
        store(&self.accepted, &carried.accepted);
        store(&self.handed_off, &carried.handed_off);
        store(&self.open_connections, &carried.open_connections);
        for (flag, value) in self.reports_closed.iter().zip(&carried.reports_closed) {
            flag.store(*value, Relaxed);
        }
        let requeued = [
            &self.requeued_worker_gone,
            &self.requeued_refused,
            &self.requeued_slot_queue,
            &self.requeued_hung,
        ];
        for (counter, value) in requeued.iter().zip(carried.requeued) {
            counter.store(value, Relaxed);
        }
        let dropped = [
            &self.dropped_queue_full,
            &self.dropped_queue_timeout,
            &self.dropped_fd_limit,
        ];
        for (counter, value) in dropped.iter().zip(carried.dropped) {
            counter.store(value, Relaxed);
        }
        store(&self.accept_errors, &carried.accept_errors);
        self.kernel_dealt.store(carried.kernel_dealt, Relaxed);
        store(&self.thread_accepted, &carried.thread_accepted);
        store(&self.thread_forwarded, &carried.thread_forwarded);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_lands_in_the_right_buckets() {
        let histogram = LatencyHistogram::default();
        for nanos in [1, 5_000, 5_001, 99_000_000, 500_000_000] {
            histogram.record(nanos);
        }
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.count, 5);
        assert_eq!(
            snapshot.sum_nanos,
            1 + 5_000 + 5_001 + 99_000_000 + 500_000_000
        );
        assert_eq!(snapshot.buckets[0], 2, "<= 5 µs");
        assert_eq!(snapshot.buckets[1], 1, "<= 10 µs");
        assert_eq!(snapshot.buckets[13], 1, "<= 100 ms");
        assert_eq!(snapshot.buckets[14], 1, "+Inf");
    }
}
