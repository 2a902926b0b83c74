//! Observability: `/metrics` checked by promtool and scraped by a real
//! Prometheus server, counters that add up, worker-state and restart
//! metrics, and machine-readable logs with a span per worker slot.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::servers::*;
use common::*;
use serde_json::Value;

/// After N requests the per-slot hand-off counters add up to N, the
/// exposition has the right content type, and promtool accepts it.
#[test]
fn metrics_count_every_handoff_and_pass_promtool() {
    let herd = Herd::launch(
        "metrics",
        None,
        4,
        &["--metrics", "127.0.0.1:0"],
        &[hello_worker()],
    );
    herd.wait_ready(4);
    let addr = metrics_addr(&herd);
    count_pids(herd.addr(), 200);

    let (status, head, body) = http(addr, "GET", "/metrics");
    assert_eq!(status, 200);
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert_eq!(
        sum_of(&body, "herd_connections_handed_off_total"),
        200.0,
        "{body}"
    );
    for slot in 0..4 {
        assert_eq!(
            sample(
                &body,
                &format!("herd_connections_handed_off_total{{slot=\"{slot}\"}}")
            ),
            50.0
        );
    }
    assert_eq!(
        sample(&body, "herd_connections_accepted_total{listener=\"0\"}"),
        200.0
    );
    assert_eq!(sample(&body, "herd_handoff_latency_seconds_count"), 200.0);
    assert_eq!(sample(&body, "herd_workers{state=\"ready\"}"), 4.0);
    assert_eq!(sample(&body, "herd_handoffs_in_flight"), 0.0);
    assert_eq!(sample(&body, "herd_handoff_fairness_jain_index"), 1.0);
    assert!(
        body.contains("process_resident_memory_bytes"),
        "process collector missing"
    );
    assert!(body.contains("herd_build_info{version=\""));

    // The same spread as `herd status` reports it.
    let status = herd.status();
    assert_eq!(status["fairness"]["max_min_ratio"], 1.0);
    assert_eq!(status["fairness"]["jain_index"], 1.0);
    let table = herd.control(&["status"]).stdout;
    assert!(
        table.contains("fairness: max/min 1.00 · Jain's index 1.000"),
        "{table}"
    );

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}

/// Only GET/HEAD /metrics is served.
#[test]
fn other_paths_are_404_and_other_methods_405() {
    let herd = Herd::launch(
        "metrics-paths",
        None,
        1,
        &["--metrics", "127.0.0.1:0"],
        &[hello_worker()],
    );
    let addr = metrics_addr(&herd);
    assert_eq!(http(addr, "GET", "/").0, 404);
    assert_eq!(http(addr, "GET", "/metricsx").0, 404);
    assert_eq!(http(addr, "POST", "/metrics").0, 405);
    assert_eq!(http(addr, "HEAD", "/metrics").0, 200);
}

/// A busy metrics port stops herd before any worker starts, like a busy listener.
#[test]
fn a_busy_metrics_port_exits_3() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().to_string();
    let mut herd = Herd::launch(
        "metrics-busy",
        None,
        1,
        &["--metrics", &busy],
        &[hello_worker()],
    );
    herd.wait_for_error_message(&format!("cannot serve metrics on {busy}"));
    assert_eq!(herd.wait_exit().code(), Some(3));
    assert!(herd.events("worker_started", &[]).is_empty());
}

/// Restarts are counted per slot and reason, and a crash-looping slot shows
/// in `herd_workers{state="crash-looping"}`.
#[test]
fn restarts_and_crash_loops_show_in_metrics() {
    let config = "[restart]\nbackoff_base = \"20ms\"\nbackoff_max = \"100ms\"\nmax_restarts = 2\n";
    let crash_slot_1 = "if [ \"$HERD_WORKER_ID\" = 1 ]; then exit 7; fi; exec \"$0\"";
    let herd = Herd::launch(
        "metrics-crash",
        Some(config),
        2,
        &["--metrics", "127.0.0.1:0"],
        &["sh", "-c", crash_slot_1, hello_worker()],
    );
    herd.wait_for_event("crash_looping", &[], 1);
    let addr = metrics_addr(&herd);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let body = http(addr, "GET", "/metrics").2;
        let looping = sample(&body, "herd_workers{state=\"crash-looping\"}");
        let restarts = sample(
            &body,
            "herd_worker_restarts_total{reason=\"exit\",slot=\"1\"}",
        );
        if looping == 1.0 && restarts >= 3.0 {
            assert_eq!(sample(&body, "herd_workers{state=\"ready\"}"), 1.0);
            break;
        }
        assert!(Instant::now() < deadline, "crash loop not visible:\n{body}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A real Prometheus scrapes herd: the target is up and `herd_` series are there.
#[test]
fn a_real_prometheus_scrapes_herd() {
    let herd = Herd::launch(
        "metrics-scraped",
        None,
        2,
        &["--metrics", "127.0.0.1:0"],
        &[hello_worker()],
    );
    herd.wait_ready(2);
    count_pids(herd.addr(), 10);
    let prometheus = Prometheus::scraping(metrics_addr(&herd));
    // Prometheus takes a few seconds to start and scrape; allow it more than DEADLINE.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut up = false;
    loop {
        if !up {
            up = prometheus.api("/api/v1/targets").is_some_and(|targets| {
                targets["data"]["activeTargets"]
                    .as_array()
                    .is_some_and(|t| t.iter().any(|t| t["health"] == "up"))
            });
        }
        if up {
            let query = prometheus.api("/api/v1/query?query=herd_connections_handed_off_total");
            let series = query
                .as_ref()
                .and_then(|q| q["data"]["result"].as_array().cloned())
                .unwrap_or_default();
            if series.len() == 2 {
                let total: f64 = series
                    .iter()
                    .map(|s| s["value"][1].as_str().unwrap().parse::<f64>().unwrap())
                    .sum();
                assert_eq!(total, 10.0);
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped herd (target up: {up})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `--log-format json`: one JSON object per line, each naming its event,
/// and lines about a worker carry its slot's span.
#[test]
fn json_logs_carry_a_span_per_worker_slot() {
    let herd = Herd::launch(
        "json-logs",
        None,
        2,
        &["--log-format", "json"],
        &[hello_worker()],
    );
    herd.wait_for_event("worker_ready", &[], 2);
    // The lines as herd printed them, not as the harness flattens them.
    let text = herd.log_text();
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| !l.starts_with("[worker"))
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    let ready: Vec<&Value> = lines
        .iter()
        .filter(|line| line["fields"]["event"] == "worker_ready")
        .collect();
    assert_eq!(ready.len(), 2, "{text}");
    for line in ready {
        assert_eq!(line["span"]["name"], "worker");
        assert_eq!(line["span"]["slot"], line["fields"]["slot"]);
    }
    for line in &lines {
        assert!(line["fields"]["event"].is_string(), "no event name: {line}");
    }
}

/// Workers that report CLOSED get an open-connections gauge per slot that
/// follows their keep-alive connections up and back down.
#[test]
fn open_connections_follow_what_workers_report() {
    let fixture = format!(
        "{}/tests/fixtures/odd_worker.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let herd = Herd::launch(
        "metrics-open",
        None,
        2,
        &["--metrics", "127.0.0.1:0"],
        &["python3", &fixture, "report-closed"],
    );
    herd.wait_for_event("worker_ready", &[], 2);
    let (metrics, addr) = (metrics_addr(&herd), herd.addr());
    let open_total = |expected: f64| {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let body = http(metrics, "GET", "/metrics").2;
            if sum_of(&body, "herd_worker_open_connections") == expected {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "open connections never reached {expected}:\n{body}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // One request each on 6 keep-alive connections, left open.
    let mut kept = Vec::new();
    for _ in 0..6 {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 512];
        assert!(stream.read(&mut buf).unwrap() > 0);
        kept.push(stream);
    }
    let body = open_total(6.0);
    assert!(
        body.contains("herd_worker_open_connections{slot=\"0\"} 3"),
        "{body}"
    );
    kept.pop();
    open_total(5.0);
    drop(kept);
    open_total(0.0);
}

/// Short of file descriptors (fewer than 64 free), `/metrics` takes no
/// scrape. One it had already accepted gets `503` with `Retry-After`
/// rather than a reset; the next waits in the kernel's queue and is
/// answered once herd has fds to spare again.
#[test]
fn short_of_fds_a_scrape_is_refused_or_waits_but_never_reset() {
    let herd = Herd::launch(
        "metrics-fds",
        None,
        1,
        &["--metrics", "127.0.0.1:0"],
        &[hello_worker()],
    );
    herd.wait_all_ready(1);
    let metrics = metrics_addr(&herd);
    let before = open_fds(herd.pid());
    set_soft_fd_limit(herd.pid(), before + 10);
    // The endpoint was waiting in accept, with fds to spare then.
    let (code, head, _) = http(metrics, "GET", "/metrics");
    assert_eq!(code, 503, "{head}");
    assert!(head.contains("retry-after: 1"), "{head}");
    let waiting = std::thread::spawn(move || http(metrics, "GET", "/metrics"));
    herd.wait_for_event("metrics_paused", &[], 1);
    set_soft_fd_limit(herd.pid(), before + 1000);
    let (code, _, body) = waiting.join().unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("herd_connections_accepted_total"));
}
