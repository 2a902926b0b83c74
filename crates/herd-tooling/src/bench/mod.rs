//! `herd bench`: a small, bounded HTTP/1.1 load generator.
//!
//! Owns what a run is asked to do ([`BenchOptions`], its bounds and their
//! checks) and [`run`], which starts the client tasks and merges what they
//! counted. It sends `GET` requests to one explicit address (an IP, or
//! `localhost`; never a name that needs DNS), from `connections` concurrent
//! tasks, on keep-alive connections or on a fresh connection per request,
//! optionally binding each new client socket to the next address of a
//! source range so that sticky mode sees many clients.
//!
//! Every run is bounded: by a duration (at most [`MAX_DURATION`]) or by an
//! exact request budget (at most [`MAX_REQUESTS`]) that the tasks claim one
//! request at a time from a shared atomic, and each request by a timeout.
//! Failures never abort a run: they are counted by kind in the report.
//!
//! # Layout
//! - `target`: [`Target`] and [`SourceRange`], parsed from the command line.
//! - `client`: one client task's loop: connect, send, read, count.
//! - `response`: reading one response, its head parsed by httparse.
//! - `report`: the counts, latency and worker shares, and how they print.

mod client;
mod report;
mod response;
mod target;

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

pub use report::{BenchReport, Latency, WorkerShare};
pub use response::{parse_head, worker_pid, ResponseHead};
pub use target::{SourceRange, Target};

use report::Tally;

/// Longest run `--duration` accepts.
pub const MAX_DURATION: Duration = Duration::from_secs(600);
/// Largest `--requests` budget.
pub const MAX_REQUESTS: u64 = 100_000_000;
/// Most concurrent client tasks.
pub const MAX_CONNECTIONS: usize = 10_000;

/// A bad target, range or option: nothing was sent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BenchError {
    #[error("bad target {target:?}: {reason}")]
    Target { target: String, reason: String },
    #[error("bad source range {range:?}: {reason}")]
    SourceRange { range: String, reason: String },
    #[error("{0}")]
    Options(String),
}

/// When a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Send requests until this much time has passed.
    Duration(Duration),
    /// Attempt exactly this many requests in total.
    Requests(u64),
}

/// Everything `herd bench` was asked to do.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub target: Target,
    pub connections: usize,
    pub limit: Limit,
    pub new_connection_per_request: bool,
    pub source_range: Option<SourceRange>,
    /// Per request (connecting included); a request that takes longer is an error.
    pub timeout: Duration,
}

impl BenchOptions {
    /// Checks the bounds every run must respect.
    pub fn validate(&self) -> Result<(), BenchError> {
        let bad = |s: String| Err(BenchError::Options(s));
        if self.connections == 0 || self.connections > MAX_CONNECTIONS {
            return bad(format!(
                "--connections must be from 1 to {MAX_CONNECTIONS}, not {}",
                self.connections
            ));
        }
        match self.limit {
            Limit::Duration(d) if d.is_zero() || d > MAX_DURATION => {
                return bad(format!(
                    "--duration must be above 0 and at most 10m, not {d:?}"
                ))
            }
            Limit::Requests(n) if n == 0 || n > MAX_REQUESTS => {
                return bad(format!(
                    "--requests must be from 1 to {MAX_REQUESTS}, not {n}"
                ))
            }
            _ => {}
        }
        if self.timeout.is_zero() || self.timeout > MAX_DURATION {
            return bad(format!(
                "--timeout must be above 0 and at most 10m, not {:?}",
                self.timeout
            ));
        }
        if self.source_range.is_some() && !self.target.addr.is_ipv4() {
            return bad("--source-range is IPv4 but the target is IPv6".into());
        }
        Ok(())
    }
}

/// Runs the load and reports. Fails only on invalid options; every failed
/// request is counted in the report instead.
pub async fn run(options: BenchOptions) -> Result<BenchReport, BenchError> {
    options.validate()?;
    let shared = Arc::new(Shared {
        request: request_bytes(&options),
        budget: AtomicU64::new(match options.limit {
            Limit::Requests(n) => n,
            Limit::Duration(_) => u64::MAX,
        }),
        next_source: AtomicUsize::new(0),
        options: options.clone(),
    });
    let start = Instant::now();
    let deadline = match options.limit {
        Limit::Duration(d) => Some(start + d),
        Limit::Requests(_) => None,
    };
    let tasks = match options.limit {
        Limit::Requests(n) => options.connections.min(n as usize),
        Limit::Duration(_) => options.connections,
    };
    let mut set = JoinSet::new();
    for _ in 0..tasks {
        set.spawn(client::run(shared.clone(), deadline));
    }
    let mut total = Tally::new();
    while let Some(result) = set.join_next().await {
        match result {
            Ok(tally) => total.merge(tally),
            Err(e) => *total.errors.entry(format!("task: {e}")).or_insert(0) += 1,
        }
    }
    Ok(total.report(&options, start.elapsed()))
}

/// What every client task reads.
struct Shared {
    options: BenchOptions,
    /// The request every task sends, built once.
    request: Vec<u8>,
    /// Requests left to claim (`u64::MAX` for a duration run).
    budget: AtomicU64,
    /// Index of the next source address to bind.
    next_source: AtomicUsize,
}

/// `GET path`, with `Connection: close` when every request gets its own connection.
fn request_bytes(options: &BenchOptions) -> Vec<u8> {
    let close = if options.new_connection_per_request {
        "Connection: close\r\n"
    } else {
        ""
    };
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n{close}\r\n",
        options.target.path, options.target.addr
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(text: &str) -> Result<Target, BenchError> {
        Target::parse(text)
    }

    #[test]
    fn options_are_bounded() {
        let ok = BenchOptions {
            target: target("127.0.0.1:1").unwrap(),
            connections: 10,
            limit: Limit::Duration(Duration::from_secs(5)),
            new_connection_per_request: false,
            source_range: None,
            timeout: Duration::from_secs(10),
        };
        assert_eq!(ok.validate(), Ok(()));
        let with = |f: &dyn Fn(&mut BenchOptions)| {
            let mut o = ok.clone();
            f(&mut o);
            o.validate()
        };
        assert!(with(&|o| o.connections = 0).is_err());
        assert!(with(&|o| o.limit = Limit::Requests(0)).is_err());
        assert!(with(&|o| o.limit = Limit::Requests(MAX_REQUESTS + 1)).is_err());
        assert!(with(&|o| o.limit = Limit::Duration(Duration::from_secs(601))).is_err());
        assert!(with(&|o| o.limit = Limit::Duration(Duration::ZERO)).is_err());
        assert!(with(&|o| o.timeout = Duration::ZERO).is_err());
        assert!(with(&|o| {
            o.target = target("[::1]:80").unwrap();
            o.source_range = Some(SourceRange::parse("127.0.0.2").unwrap());
        })
        .is_err());
    }
}
