//! A comparison to render in tests: two scenarios, each with a measured row
//! and a row whose herd failed (with a note that needs escaping).

use std::collections::BTreeMap;

use super::{CompareReport, Row, Scenario, SpreadSource};
use crate::bench::{BenchReport, Latency, WorkerShare};
use herd::status::fairness;

/// One measured load: `requests`, of which `timeouts` timed out.
pub(super) fn bench_report(requests: u64, timeouts: u64, p99_us: u64) -> BenchReport {
    let mut errors_by_kind = BTreeMap::new();
    if timeouts > 0 {
        errors_by_kind.insert("timeout".to_string(), timeouts);
    }
    BenchReport {
        target: "http://127.0.0.1:1/".into(),
        mode: "keep-alive",
        connections: 4,
        requests_limit: None,
        duration_limit_secs: Some(1.0),
        requests,
        succeeded: requests - timeouts,
        errors: timeouts,
        errors_by_kind,
        duration_secs: 1.0,
        requests_per_sec: requests as f64,
        connections_opened: 4,
        connections_per_sec: 4.0,
        latency: Some(Latency {
            p50_us: 400,
            p90_us: 800,
            p99_us,
            max_us: p99_us * 2,
        }),
        workers: vec![WorkerShare {
            pid: 10,
            count: requests - timeouts,
            share_percent: 100.0,
        }],
        fairness: None,
    }
}

/// The comparison every rendering test draws.
pub(super) fn report() -> CompareReport {
    let measured = |scenario, mode: &str, requests, timeouts, p99| Row {
        scenario,
        mode: mode.into(),
        bench: Some(bench_report(requests, timeouts, p99)),
        fairness: fairness(&[600, 400]),
        spread_from: Some(SpreadSource::Herd),
        herd_counts: vec![600, 400],
        primary_rss_bytes: Some(8 << 20),
        primary_cpu_us_per_connection: Some(12.5),
        note: None,
    };
    CompareReport {
        command: vec!["worker".into(), "--flag".into()],
        workers: 2,
        connections: 4,
        duration_secs: Some(1.0),
        requests: None,
        timeout_secs: 0.25,
        scenarios: vec![Scenario::Uniform, Scenario::Stalled],
        modes: vec!["round-robin".into(), "shared".into()],
        rows: vec![
            measured(Scenario::Uniform, "round-robin", 1000, 0, 1500),
            Row::failed(
                Scenario::Uniform,
                "shared",
                "herd exited (exit status: 2): invalid `mode` = \"shared\", | bad".into(),
            ),
            measured(Scenario::Stalled, "round-robin", 500, 7, 250_000),
            Row::failed(Scenario::Stalled, "shared", "no\nsuch mode".into()),
        ],
    }
}
