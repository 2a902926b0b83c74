//! `herd bench`: the load generator run as a process against a real herd
//! with real workers, against a closed port, and with bad targets.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;

use common::*;
use serde_json::Value;

/// Runs `herd bench ARGS` (bounded by `DEADLINE` through `herd_cli`).
fn bench(args: &[&str]) -> CliRun {
    let mut full = vec!["bench"];
    full.extend_from_slice(args);
    herd_cli(&std::env::temp_dir(), &full)
}

/// Runs `herd bench ARGS --json`, which must exit 0; returns the report.
fn bench_json(args: &[&str]) -> Value {
    let mut full = args.to_vec();
    full.push("--json");
    let run = bench(&full);
    assert_eq!(run.code, Some(0), "herd bench {}: {run:?}", full.join(" "));
    serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("bench JSON: {e} in {:?}", run.stdout))
}

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}/")
}

fn u(report: &Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {report:#}"))
}

/// pid → count from the report's `workers`.
fn pids(report: &Value) -> Vec<(u64, u64)> {
    report["workers"]
        .as_array()
        .expect("workers array")
        .iter()
        .map(|w| (w["pid"].as_u64().unwrap(), w["count"].as_u64().unwrap()))
        .collect()
}

#[test]
fn bench_reports_exactly_the_requests_it_made() {
    let herd = Herd::launch("bench-exact", None, 4, &[], &[hello_worker()]);
    let ready: BTreeSet<u64> = herd.wait_ready(4).values().map(|&p| p as u64).collect();
    let target = url(herd.addr());

    // Keep-alive: each connection stays on one worker, so only totals are exact.
    let report = bench_json(&[&target, "--requests", "1000", "--connections", "8"]);
    assert_eq!(u(&report, "requests"), 1000, "{report:#}");
    assert_eq!(u(&report, "succeeded"), 1000, "{report:#}");
    assert_eq!(u(&report, "errors"), 0, "{report:#}");
    assert_eq!(u(&report, "requests_limit"), 1000);
    assert_eq!(report["mode"], "keep-alive");
    assert!(u(&report, "connections_opened") <= 8, "{report:#}");
    assert_eq!(pids(&report).iter().map(|p| p.1).sum::<u64>(), 1000);

    // A connection per request: round-robin gives each worker exactly 250.
    let report = bench_json(&[
        &target,
        "--requests",
        "1000",
        "--connections",
        "8",
        "--new-connection-per-request",
    ]);
    assert_eq!(u(&report, "requests"), 1000, "{report:#}");
    assert_eq!(u(&report, "succeeded"), 1000, "{report:#}");
    assert_eq!(u(&report, "errors"), 0, "{report:#}");
    assert_eq!(u(&report, "connections_opened"), 1000);
    let per_pid = pids(&report);
    assert_eq!(per_pid.len(), 4, "{report:#}");
    for (pid, count) in &per_pid {
        assert_eq!(*count, 250, "worker {pid}: {report:#}");
        assert!(ready.contains(pid), "unknown pid {pid}");
    }
    assert_eq!(report["fairness"]["jain_index"].as_f64(), Some(1.0));
    assert_eq!(report["fairness"]["max_min_ratio"].as_f64(), Some(1.0));
    let latency = &report["latency"];
    assert!(latency["p50_us"].as_u64().unwrap() <= latency["max_us"].as_u64().unwrap());
    assert!(herd.stop().success());
}

#[test]
fn bench_counts_errors_when_the_server_is_down() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let report = bench_json(&[
        &format!("127.0.0.1:{port}"),
        "--requests",
        "50",
        "--connections",
        "5",
    ]);
    assert_eq!(u(&report, "requests"), 50, "{report:#}");
    assert_eq!(u(&report, "errors"), 50, "{report:#}");
    assert_eq!(u(&report, "succeeded"), 0, "{report:#}");
    let kinds = report["errors_by_kind"].as_object().unwrap();
    assert!(
        kinds.keys().all(|k| k.starts_with("connect: ")),
        "{report:#}"
    );
    assert!(report["latency"].is_null());
}

#[test]
fn bench_refuses_remote_and_malformed_targets() {
    for (target, problem) in [
        ("example.com:80", "host names are refused"),
        ("http://", "missing address"),
        ("http://127.0.0.1/", "missing port"),
    ] {
        let run = bench(&[target, "--requests", "1"]);
        assert_eq!(run.code, Some(2), "{target}: {run:?}");
        assert!(
            run.stderr.contains(problem) && run.stderr.contains(target),
            "{target}: {run:?}"
        );
        assert!(run.stdout.is_empty(), "{target}: {run:?}");
    }
    for (args, problem) in [
        (&["127.0.0.1:1", "--requests", "0"][..], "--requests"),
        (&["127.0.0.1:1", "--duration", "11m"], "--duration"),
        (
            &["127.0.0.1:1", "--source-range", "127.0.0.9-127.0.0.2"],
            "source range",
        ),
        (
            &["127.0.0.1:1", "--duration", "1s", "--requests", "5"],
            "cannot be used with",
        ),
    ] {
        let run = bench(args);
        assert_eq!(run.code, Some(2), "{args:?}: {run:?}");
        assert!(run.stderr.contains(problem), "{args:?}: {run:?}");
    }
}

#[test]
fn bench_binds_the_source_range() {
    let herd = Herd::launch(
        "bench-sticky",
        None,
        4,
        &["--mode", "sticky"],
        &[hello_worker()],
    );
    herd.wait_ready(4);
    let report = bench_json(&[
        &url(herd.addr()),
        "--new-connection-per-request",
        "--requests",
        "200",
        "--source-range",
        "127.0.0.2-127.0.0.11",
    ]);
    assert_eq!(u(&report, "succeeded"), 200, "{report:#}");
    let per_pid = pids(&report);
    assert!(
        (2..=4).contains(&per_pid.len()),
        "10 client IPs should reach 2-4 workers: {report:#}"
    );
    // Each source address is used 20 times and always lands on the same
    // worker, so every worker's count is a multiple of 20.
    assert!(per_pid.iter().all(|(_, n)| n % 20 == 0), "{report:#}");
    assert!(herd.stop().success());
}

#[test]
fn bench_runs_for_a_duration() {
    let herd = Herd::launch("bench-duration", None, 2, &[], &[hello_worker()]);
    herd.wait_ready(2);
    let target = url(herd.addr());
    let report = bench_json(&[&target, "--duration", "300ms", "--connections", "2"]);
    assert!(u(&report, "requests") > 0, "{report:#}");
    assert_eq!(u(&report, "errors"), 0, "{report:#}");
    assert!(report["requests_limit"].is_null());
    assert_eq!(report["duration_limit_secs"].as_f64(), Some(0.3));
    let secs = report["duration_secs"].as_f64().unwrap();
    assert!((0.3..5.0).contains(&secs), "{report:#}");

    // The text report names the essentials.
    let run = bench(&[&target, "--duration", "200ms", "--connections", "2"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    for needle in [
        "requests:",
        "succeeded:",
        "errors:",
        "latency:",
        "p99",
        "workers:",
    ] {
        assert!(run.stdout.contains(needle), "{needle}: {}", run.stdout);
    }
    assert!(herd.stop().success());
}
