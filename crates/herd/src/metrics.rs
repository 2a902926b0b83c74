//! Prometheus metrics: the families herd exports, rendered for `/metrics`
//! (served by [`crate::endpoint`]).
//!
//! Owns the registry. The hand-off thread never touches
//! the registry: it bumps fixed slots of atomics in [`Counters`] and observes
//! one pre-resolved, lock-free histogram. When Prometheus scrapes, the main
//! thread copies the atomics into the registry's counters and sets the
//! supervisor-side values (worker states, memory, CPU), then encodes. So a
//! scrape costs the hot path nothing, and no label lookup ever happens per
//! connection.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use std::collections::HashMap;
use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{
    CounterVec, Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tracing::warn;

use crate::counters::{Counters, ACCEPT_ERROR_KINDS, LATENCY_BOUNDS_NANOS};
use crate::ids::SlotIx;
use crate::lifecycle::RestartReason;
use crate::status::{fairness, SlotState, SlotStatus};
use crate::worker_output::{self, Stream};

/// Every metric family herd exports.
pub struct Metrics {
    registry: Registry,
    accepted: IntCounterVec,
    handed_off: IntCounterVec,
    redispatched: IntCounterVec,
    kernel_dealt: prometheus::IntCounter,
    thread_accepted: IntCounterVec,
    thread_forwarded: IntCounterVec,
    dropped: IntCounterVec,
    in_flight: IntGauge,
    open_connections: IntGaugeVec,
    accept_errors: IntCounterVec,
    workers: IntGaugeVec,
    restarts: IntCounterVec,
    worker_memory: IntGaugeVec,
    worker_cpu: CounterVec,
    reloads: IntCounterVec,
    reload_duration: Histogram,
    fairness_jain: prometheus::Gauge,
    log_lines_dropped: IntCounterVec,
}

impl Metrics {
    /// The registry, reading the hand-off thread's `counters` at scrape time.
    pub fn new(counters: Arc<Counters>) -> Metrics {
        let registry = Registry::new();
        registry
            .register(Box::new(LatencyCollector::new(counters)))
            .expect("metric names are unique");
        fn add<C: prometheus::core::Collector + Clone + 'static>(
            registry: &Registry,
            collector: C,
        ) -> C {
            registry
                .register(Box::new(collector.clone()))
                .expect("metric names are unique");
            collector
        }
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            add(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            add(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let metrics = Metrics {
            accepted: counter_vec("herd_connections_accepted_total", "Connections accepted, per listener.", &["listener"]),
            handed_off: counter_vec(
                "herd_connections_handed_off_total",
                "Connections acknowledged by a worker, per worker slot.",
                &["slot"],
            ),
            redispatched: counter_vec(
                "herd_connections_redispatched_total",
                "Connections taken back from a worker and handed to another (worker-gone: it died before acknowledging; refused: it sent NACK; slot-queue: they waited in the kernel-rotation socket of a worker that died or was stopped; hung: its oldest went unacknowledged for hang_timeout, or, taking queued hand-offs, it took nothing queued to it for ack_timeout).",
                &["reason"],
            ),
            kernel_dealt: add(
                &registry,
                prometheus::IntCounter::new(
                    "herd_connections_kernel_dealt_total",
                    "Connections the kernel rotation dealt straight to a worker's own socket (also counted as accepted and handed off).",
                )
                .expect("valid metric"),
            ),
            thread_accepted: counter_vec(
                "herd_handoff_thread_accepted_total",
                "Connections each hand-off thread accepted (handoff_threads; also counted in herd_connections_accepted_total).",
                &["thread"],
            ),
            thread_forwarded: counter_vec(
                "herd_handoff_thread_forwarded_total",
                "Connections a hand-off thread past the first accepted and gave to thread 0 to send: no worker it may send to (one that counts receipts per thread) could take it.",
                &["thread"],
            ),
            dropped: counter_vec(
                "herd_connections_dropped_total",
                "Accepted connections closed without a worker (queue-full: the wait queue was full; no-worker: none could take it within queue_timeout; fd-limit: herd was out of file descriptors for queue_timeout and closed it from the kernel queue).",
                &["reason"],
            ),
            in_flight: add(
                &registry,
                IntGauge::new("herd_handoffs_in_flight", "Connections sent to a worker and not yet acknowledged.")
                    .expect("valid metric"),
            ),
            open_connections: gauge_vec(
                "herd_worker_open_connections",
                "Connections each slot's workers hold (acknowledged, not yet reported closed), for workers that report CLOSED.",
                &["slot"],
            ),
            accept_errors: counter_vec("herd_accept_errors_total", "accept(2) failures, by errno.", &["kind"]),
            workers: gauge_vec("herd_workers", "Worker slots by state.", &["state"]),
            restarts: counter_vec(
                "herd_worker_restarts_total",
                "Workers restarted or replaced, per slot and reason.",
                &["slot", "reason"],
            ),
            worker_memory: gauge_vec(
                "herd_worker_resident_memory_bytes",
                "Resident memory of the worker serving each slot.",
                &["slot"],
            ),
            worker_cpu: add(
                &registry,
                CounterVec::new(
                    Opts::new("herd_worker_cpu_seconds_total", "CPU time used by the workers of each slot."),
                    &["slot"],
                )
                .expect("valid metric"),
            ),
            reloads: counter_vec("herd_reloads_total", "Rolling reloads, by result.", &["result"]),
            reload_duration: add(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new("herd_reload_duration_seconds", "How long rolling reloads took.")
                        .buckets(vec![0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0]),
                )
                .expect("valid metric"),
            ),
            fairness_jain: add(
                &registry,
                prometheus::Gauge::new(
                    "herd_handoff_fairness_jain_index",
                    "Jain's fairness index of hand-offs across the current slots since start (1 = even).",
                )
                .expect("valid metric"),
            ),
            log_lines_dropped: counter_vec(
                "herd_log_lines_dropped_total",
                "Lines of output (workers' and herd's own log) dropped because herd's stdout or stderr could not take them fast enough, per stream.",
                &["stream"],
            ),
            registry: registry.clone(),
        };
        metrics.preset_labels(gauge_vec(
            "herd_build_info",
            "herd's version; always 1.",
            &["version"],
        ));
        metrics
    }

    /// Every label value a series can have shows from the first scrape
    /// (at 0), so `rate()` and alerts see a series before its first event.
    fn preset_labels(&self, build_info: IntGaugeVec) {
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let _ = self.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        for result in ["success", "failure"] {
            self.reloads.with_label_values(&[result]);
        }
        for reason in ["worker-gone", "refused", "slot-queue", "hung"] {
            self.redispatched.with_label_values(&[reason]);
        }
        for reason in ["queue-full", "no-worker", "fd-limit"] {
            self.dropped.with_label_values(&[reason]);
        }
        for stream in Stream::ALL {
            self.log_lines_dropped.with_label_values(&[stream.name()]);
        }
    }

    pub fn restart(&self, slot: SlotIx, reason: RestartReason) {
        self.restarts
            .with_label_values(&[slot.to_string().as_str(), reason.label()])
            .inc();
    }

    pub fn reload_finished(&self, success: bool, took: Duration) {
        let result = if success { "success" } else { "failure" };
        self.reloads.with_label_values(&[result]).inc();
        self.reload_duration.observe(took.as_secs_f64());
    }

    /// Brings every value up to date and encodes the registry (text format).
    pub fn render(
        &self,
        counters: &Counters,
        slots: &[SlotStatus],
        cpu_seconds: &[f64],
    ) -> Vec<u8> {
        let handed = self.sync_connections(counters, slots.len());
        self.sync_slots(counters, slots, cpu_seconds);
        if let Some(fair) = fairness(&handed) {
            self.fairness_jain.set(fair.jain_index);
        }
        let mut out = Vec::with_capacity(16 * 1024);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            warn!(
                event = "metrics_encode_failed",
                "cannot encode metrics: {e}"
            );
        }
        out
    }

    /// The connection counters, from the hand-off loop's; returns the
    /// hand-offs per current slot.
    fn sync_connections(&self, counters: &Counters, slots: usize) -> Vec<u64> {
        let listeners = counters.listener_indices();
        for (listener, count) in counters.accepted.enumerate().take(listeners) {
            sync(
                &self.accepted.with_label_values(&[&listener.to_string()]),
                count.load(Relaxed),
            );
        }
        let handed: Vec<u64> = SlotIx::below(slots)
            .map(|slot| counters.handed_off[slot].load(Relaxed))
            .collect();
        for (slot, count) in handed.iter().enumerate() {
            sync(
                &self.handed_off.with_label_values(&[&slot.to_string()]),
                *count,
            );
        }
        sync(
            &self.redispatched.with_label_values(&["worker-gone"]),
            counters.requeued_worker_gone.load(Relaxed),
        );
        sync(
            &self.redispatched.with_label_values(&["refused"]),
            counters.requeued_refused.load(Relaxed),
        );
        sync(
            &self.redispatched.with_label_values(&["slot-queue"]),
            counters.requeued_slot_queue.load(Relaxed),
        );
        sync(
            &self.redispatched.with_label_values(&["hung"]),
            counters.requeued_hung.load(Relaxed),
        );
        sync(&self.kernel_dealt, counters.kernel_dealt.load(Relaxed));
        let threads = counters.handoff_threads.load(Relaxed) as usize;
        for (thread, count) in counters.thread_accepted.iter().enumerate().take(threads) {
            let label = thread.to_string();
            sync(
                &self.thread_accepted.with_label_values(&[&label]),
                count.load(Relaxed),
            );
            if thread > 0 {
                let forwarded = counters.thread_forwarded[thread].load(Relaxed);
                sync(
                    &self.thread_forwarded.with_label_values(&[&label]),
                    forwarded,
                );
            }
        }
        sync(
            &self.dropped.with_label_values(&["queue-full"]),
            counters.dropped_queue_full.load(Relaxed),
        );
        sync(
            &self.dropped.with_label_values(&["no-worker"]),
            counters.dropped_queue_timeout.load(Relaxed),
        );
        sync(
            &self.dropped.with_label_values(&["fd-limit"]),
            counters.dropped_fd_limit.load(Relaxed),
        );
        self.in_flight.set(counters.in_flight.load(Relaxed) as i64);
        for (kind, count) in ACCEPT_ERROR_KINDS.iter().zip(&counters.accept_errors) {
            sync(
                &self.accept_errors.with_label_values(&[kind]),
                count.load(Relaxed),
            );
        }
        for stream in Stream::ALL {
            sync(
                &self.log_lines_dropped.with_label_values(&[stream.name()]),
                worker_output::lines_dropped(stream),
            );
        }
        handed
    }

    /// The per-slot gauges: open connections, states, memory, CPU.
    fn sync_slots(&self, counters: &Counters, slots: &[SlotStatus], cpu_seconds: &[f64]) {
        self.open_connections.reset();
        for slot in SlotIx::below(slots.len()) {
            if counters.reports_closed[slot].load(Relaxed) {
                let open = counters.open_connections[slot].load(Relaxed) as i64;
                self.open_connections
                    .with_label_values(&[&slot.to_string()])
                    .set(open);
            }
        }
        for state in [
            SlotState::Starting,
            SlotState::Ready,
            SlotState::Replacing,
            SlotState::Waiting,
            SlotState::CrashLooping,
            SlotState::Hung,
        ] {
            let count = slots.iter().filter(|s| s.state == state).count();
            self.workers
                .with_label_values(&[&crate::status::kebab(&state)])
                .set(count as i64);
        }
        // Slots come and go with scaling: show only the current ones.
        self.worker_memory.reset();
        for status in slots {
            if let Some(rss) = status.rss_bytes {
                self.worker_memory
                    .with_label_values(&[&status.slot.to_string()])
                    .set(rss as i64);
            }
        }
        for (slot, seconds) in cpu_seconds.iter().enumerate() {
            let counter = self.worker_cpu.with_label_values(&[&slot.to_string()]);
            if *seconds > counter.get() {
                counter.inc_by(seconds - counter.get());
            }
        }
    }
}

/// Exports the hand-off thread's [`LatencyHistogram`] as a Prometheus
/// histogram, read only when scraped.
struct LatencyCollector {
    counters: Arc<Counters>,
    desc: Desc,
}

const LATENCY_NAME: &str = "herd_handoff_latency_seconds";
const LATENCY_HELP: &str = "Time from accept until the worker acknowledged the connection.";

impl LatencyCollector {
    fn new(counters: Arc<Counters>) -> Self {
        let desc = Desc::new(
            LATENCY_NAME.into(),
            LATENCY_HELP.into(),
            Vec::new(),
            HashMap::new(),
        )
        .expect("valid metric");
        LatencyCollector { counters, desc }
    }
}

impl Collector for LatencyCollector {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let snapshot = self.counters.latency.snapshot();
        let mut cumulative = 0;
        let buckets = LATENCY_BOUNDS_NANOS
            .iter()
            .zip(&snapshot.buckets)
            .map(|(bound, count)| {
                cumulative += count;
                let mut bucket = proto::Bucket::default();
                bucket.set_cumulative_count(cumulative);
                bucket.set_upper_bound(*bound as f64 / 1e9);
                bucket
            })
            .collect();
        let mut histogram = proto::Histogram::default();
        histogram.set_bucket(buckets);
        // Count every bucket, +Inf included, so the count matches the buckets.
        histogram.set_sample_count(snapshot.buckets.iter().sum());
        histogram.set_sample_sum(snapshot.sum_nanos as f64 / 1e9);
        let mut metric = proto::Metric::default();
        metric.set_histogram(histogram);
        let mut family = MetricFamily::default();
        family.set_name(LATENCY_NAME.into());
        family.set_help(LATENCY_HELP.into());
        family.set_field_type(MetricType::HISTOGRAM);
        family.set_metric(vec![metric]);
        vec![family]
    }
}

/// Raises a registry counter to the value of its atomic source.
fn sync(counter: &IntCounter, value: u64) {
    let current = counter.get();
    if value > current {
        counter.inc_by(value - current);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ListenerIx;

    #[test]
    fn render_reflects_the_counters() {
        let counters = Arc::new(Counters::new(&["127.0.0.1:1".parse().unwrap()]));
        let metrics = Metrics::new(counters.clone());
        counters.accepted[ListenerIx(0)].fetch_add(3, Relaxed);
        counters.handed_off[SlotIx(1)].fetch_add(2, Relaxed);
        let text = String::from_utf8(metrics.render(&counters, &[], &[])).unwrap();
        assert!(
            text.contains("herd_connections_accepted_total{listener=\"0\"} 3"),
            "{text}"
        );
        assert!(text.contains("herd_build_info{version="));
        counters.accepted[ListenerIx(0)].fetch_add(2, Relaxed);
        let text = String::from_utf8(metrics.render(&counters, &[], &[])).unwrap();
        assert!(
            text.contains("herd_connections_accepted_total{listener=\"0\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("herd_log_lines_dropped_total{stream=\"stderr\"} 0"),
            "{text}"
        );
    }
}
