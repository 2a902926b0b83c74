//! What a run measured: each task's [`Tally`] (counts, errors by kind,
//! answers per worker pid, a latency histogram), merged into the
//! [`BenchReport`] with its [`Latency`] percentiles, [`WorkerShare`]s and
//! fairness, and the report's text form.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use herd::status::{fairness, Fairness};

use super::{BenchOptions, Limit};

/// Latencies are recorded in microseconds up to one hour (longer saturate).
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// Latency of successful requests, write to full response, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Latency {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// How many successful answers one worker process gave.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerShare {
    pub pid: u32,
    pub count: u64,
    pub share_percent: f64,
}

/// The result of a run: what was sent, what came back, how fast.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub target: String,
    /// `keep-alive` or `new-connection-per-request`.
    pub mode: &'static str,
    pub connections: usize,
    /// The `--requests` budget, when the run was bounded by one.
    pub requests_limit: Option<u64>,
    /// The `--duration`, in seconds, when the run was bounded by one.
    pub duration_limit_secs: Option<f64>,
    pub requests: u64,
    pub succeeded: u64,
    pub errors: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    pub duration_secs: f64,
    pub requests_per_sec: f64,
    pub connections_opened: u64,
    pub connections_per_sec: f64,
    /// `None` when no request succeeded.
    pub latency: Option<Latency>,
    /// Answers per worker pid (from `Handled by worker <pid>` bodies), by pid.
    pub workers: Vec<WorkerShare>,
    /// Spread over `workers`; `None` when no pid was seen.
    pub fairness: Option<Fairness>,
}

/// One task's counts, merged at the end.
pub(super) struct Tally {
    /// Requests attempted: each one claimed from the budget and finished.
    pub(super) requests: u64,
    /// Answered with a 2xx status.
    pub(super) succeeded: u64,
    /// Failed requests by kind (`timeout`, `connect: ...`, `status 5xx`).
    pub(super) errors: BTreeMap<String, u64>,
    pub(super) connections_opened: u64,
    /// Successful answers per worker pid, from the bodies.
    pub(super) pids: BTreeMap<u32, u64>,
    /// Microseconds from write to full response, of successful requests.
    pub(super) latency: Histogram<u64>,
}

impl Tally {
    pub(super) fn new() -> Tally {
        Tally {
            requests: 0,
            succeeded: 0,
            errors: BTreeMap::new(),
            connections_opened: 0,
            pids: BTreeMap::new(),
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid bounds"),
        }
    }

    pub(super) fn error(&mut self, kind: String) {
        *self.errors.entry(kind).or_insert(0) += 1;
    }

    pub(super) fn merge(&mut self, other: Tally) {
        self.requests += other.requests;
        self.succeeded += other.succeeded;
        self.connections_opened += other.connections_opened;
        for (kind, n) in other.errors {
            *self.errors.entry(kind).or_insert(0) += n;
        }
        for (pid, n) in other.pids {
            *self.pids.entry(pid).or_insert(0) += n;
        }
        self.latency
            .add(&other.latency)
            .expect("histograms with the same bounds");
    }

    pub(super) fn report(self, options: &BenchOptions, elapsed: Duration) -> BenchReport {
        let secs = elapsed.as_secs_f64();
        let per_sec = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let errors = self.errors.values().sum();
        let latency = (!self.latency.is_empty()).then(|| Latency {
            p50_us: self.latency.value_at_quantile(0.50),
            p90_us: self.latency.value_at_quantile(0.90),
            p99_us: self.latency.value_at_quantile(0.99),
            max_us: self.latency.max(),
        });
        let answered: u64 = self.pids.values().sum();
        let workers = self
            .pids
            .iter()
            .map(|(&pid, &count)| WorkerShare {
                pid,
                count,
                share_percent: 100.0 * count as f64 / answered as f64,
            })
            .collect();
        let counts: Vec<u64> = self.pids.values().copied().collect();
        BenchReport {
            target: options.target.url(),
            mode: if options.new_connection_per_request {
                "new-connection-per-request"
            } else {
                "keep-alive"
            },
            connections: options.connections,
            requests_limit: match options.limit {
                Limit::Requests(n) => Some(n),
                Limit::Duration(_) => None,
            },
            duration_limit_secs: match options.limit {
                Limit::Duration(d) => Some(d.as_secs_f64()),
                Limit::Requests(_) => None,
            },
            requests: self.requests,
            succeeded: self.succeeded,
            errors,
            errors_by_kind: self.errors,
            duration_secs: secs,
            requests_per_sec: per_sec(self.requests),
            connections_opened: self.connections_opened,
            connections_per_sec: per_sec(self.connections_opened),
            latency,
            workers,
            fairness: fairness(&counts),
        }
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bound = match (self.requests_limit, self.duration_limit_secs) {
            (Some(n), _) => format!("exactly {n} requests"),
            (None, Some(secs)) => format!("for {}", human_secs(secs)),
            (None, None) => String::new(),
        };
        writeln!(
            f,
            "herd bench {}: {} connections, {}, {bound}",
            self.target, self.connections, self.mode
        )?;
        match self.requests_limit {
            Some(n) => writeln!(f, "requests:     {} (of {n} requested)", self.requests)?,
            None => writeln!(f, "requests:     {}", self.requests)?,
        }
        writeln!(f, "succeeded:    {}", self.succeeded)?;
        writeln!(f, "errors:       {}", self.errors)?;
        for (kind, n) in &self.errors_by_kind {
            writeln!(f, "  {n:>10}  {kind}")?;
        }
        writeln!(f, "duration:     {}", human_secs(self.duration_secs))?;
        writeln!(f, "throughput:   {:.1} requests/s", self.requests_per_sec)?;
        writeln!(
            f,
            "connections:  {} opened, {:.1}/s",
            self.connections_opened, self.connections_per_sec
        )?;
        match &self.latency {
            Some(l) => writeln!(
                f,
                "latency:      p50 {}  p90 {}  p99 {}  max {}",
                human_us(l.p50_us),
                human_us(l.p90_us),
                human_us(l.p99_us),
                human_us(l.max_us)
            )?,
            None => writeln!(f, "latency:      - (no successful request)")?,
        }
        if !self.workers.is_empty() {
            writeln!(f, "workers:      {} answered", self.workers.len())?;
            for w in &self.workers {
                writeln!(
                    f,
                    "  pid {:>8}  {:>10}  {:>5.1}%",
                    w.pid, w.count, w.share_percent
                )?;
            }
            if let Some(fair) = &self.fairness {
                let ratio = fair
                    .max_min_ratio
                    .map_or("-".to_string(), |r| format!("{r:.2}"));
                writeln!(
                    f,
                    "fairness:     max/min {ratio}, Jain's index {:.3}",
                    fair.jain_index
                )?;
            }
        }
        Ok(())
    }
}

fn human_secs(secs: f64) -> String {
    if secs < 1.0 {
        format!("{:.0} ms", secs * 1000.0)
    } else {
        format!("{secs:.2} s")
    }
}

fn human_us(us: u64) -> String {
    if us < 1000 {
        format!("{us} µs")
    } else if us < 1_000_000 {
        format!("{:.2} ms", us as f64 / 1000.0)
    } else {
        format!("{:.2} s", us as f64 / 1_000_000.0)
    }
}
