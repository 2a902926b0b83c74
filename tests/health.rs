//! Issue 17, points 1 and 2: the probes on the metrics address (`/livez`,
//! `/readyz`, `/status`), fetched with curl as a load balancer or the
//! kubelet would, and `shutdown_delay`: on SIGTERM `/readyz` fails at once
//! while everything is still served, and only then does herd stop.

mod common;

use std::net::SocketAddr;
use std::process::Command;

use common::*;
use nix::sys::signal::Signal;

/// `curl URL`: the status code and the body, as a probe sees them.
fn curl(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let url = format!("http://{addr}{path}");
    let out = Command::new("curl")
        .args(["-s", "-m", "5", "-w", "\n%{http_code}", &url])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n')?;
    Some((code.parse().ok()?, body.to_string()))
}

fn have_curl(test: &str) -> bool {
    let here = Command::new("curl").arg("--version").output().is_ok();
    if !here {
        skip_unless_ci(test, "needs curl");
    }
    here
}

/// herd with the metrics endpoint, `workers` hello-workers and `config`.
fn launch(name: &str, workers: usize, config: &str) -> (Herd, SocketAddr) {
    let herd = Herd::launch(
        name,
        Some(config),
        workers,
        &["--metrics", "127.0.0.1:0"],
        &[hello_worker()],
    );
    let metrics = metrics_addr(&herd);
    (herd, metrics)
}

/// Waits until `path` answers `code`; the body then.
fn until(metrics: SocketAddr, path: &str, code: u16) -> String {
    wait_until(&format!("{path} to answer {code}"), || {
        curl(metrics, path)
            .filter(|(got, _)| *got == code)
            .map(|(_, body)| body)
    })
}

#[test]
fn the_probes_say_live_ready_and_the_status() {
    let test = "the_probes_say_live_ready_and_the_status";
    if !have_curl(test) {
        return;
    }
    let (herd, metrics) = launch("health-probes", 2, "ready_min = 2\n");
    let pids: std::collections::BTreeSet<u32> = herd.wait_all_ready(2);
    assert_eq!(until(metrics, "/livez", 200), "live\n");
    assert_eq!(
        until(metrics, "/readyz", 200),
        "ready: 2 worker(s) ready (ready_min 2)\n"
    );
    // `/status` is `herd status --json`'s document.
    let (code, body) = curl(metrics, "/status").unwrap();
    assert_eq!(code, 200);
    let status: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["pid"], json!(herd.pid()));
    assert_eq!(
        pids_of(&status)
            .into_values()
            .collect::<std::collections::BTreeSet<u32>>(),
        pids
    );
    // Fewer ready workers than ready_min: not ready, and says why.
    let scaled = herd.control(&["scale", "1"]);
    assert_eq!(scaled.code, Some(0), "{scaled:?}");
    assert_eq!(
        until(metrics, "/readyz", 503),
        "not ready: 1 worker(s) ready, ready_min is 2\n"
    );
    // Still live: liveness is herd's loops, not its workers.
    assert_eq!(curl(metrics, "/livez"), Some((200, "live\n".into())));
    // Anything else is not found; /metrics is as before.
    assert_eq!(curl(metrics, "/healthz").map(|(code, _)| code), Some(404));
    let (code, text) = curl(metrics, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(text.contains("herd_workers"), "{text}");
    assert!(herd.stop().success());
}

#[test]
fn readyz_fails_while_no_worker_is_ready() {
    let test = "readyz_fails_while_no_worker_is_ready";
    if !have_curl(test) {
        return;
    }
    // A worker that never says READY: herd waits (ready_timeout) and /readyz says so.
    let herd = Herd::launch(
        "health-not-ready",
        Some("ready_timeout = \"60s\"\n"),
        1,
        &["--metrics", "127.0.0.1:0"],
        &["sleep", "60"],
    );
    let metrics = metrics_addr(&herd);
    herd.wait_for_event("worker_started", &[], 1);
    assert_eq!(
        until(metrics, "/readyz", 503),
        "not ready: 0 worker(s) ready, ready_min is 1\n"
    );
    assert_eq!(until(metrics, "/livez", 200), "live\n");
    signal(herd.pid(), Signal::SIGINT);
    let mut herd = herd;
    herd.wait_exit();
}

#[test]
fn on_sigterm_readyz_fails_first_and_herd_serves_through_shutdown_delay() {
    let test = "on_sigterm_readyz_fails_first_and_herd_serves_through_shutdown_delay";
    if !have_curl(test) {
        return;
    }
    // Long enough that the checks below run inside it on a loaded machine.
    let (mut herd, metrics) = launch("health-delay", 2, "shutdown_delay = \"30s\"\n");
    herd.wait_all_ready(2);
    until(metrics, "/readyz", 200);
    signal(herd.pid(), Signal::SIGTERM);
    herd.wait_for_event("stop_delayed", &[("delay_ms", json!(30_000))], 1);
    assert_eq!(
        until(metrics, "/readyz", 503),
        "not ready: stopping after shutdown_delay\n"
    );
    // Still accepting and serving: the load balancer is the one to stop.
    for _ in 0..4 {
        let (code, _, body) = http(herd.addr(), "GET", "/");
        assert_eq!(code, 200);
        assert!(body.starts_with("Handled by worker"), "{body}");
    }
    assert!(
        herd.events("stopping", &[]).is_empty(),
        "stopped before the delay"
    );
    // A second SIGTERM does not wait again: herd stops now, and cleanly.
    signal(herd.pid(), Signal::SIGTERM);
    herd.wait_for_event("stopping", &[], 1);
    assert!(herd.wait_exit().success(), "{}", herd.log_text());
}

#[test]
fn ready_min_over_the_workers_is_refused_by_name() {
    let dir = scratch_dir("health-ready-min");
    let config = write_config(&dir, "ready_min = 3\nworkers = 2\n");
    let config = config.display().to_string();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "-c",
        &config,
        "--",
        hello_worker(),
    ];
    let check = herd_cli(&dir, &[&["check"][..], &args[..]].concat());
    assert_eq!(check.code, Some(1), "{check:?}");
    assert!(
        check
            .stderr
            .contains("invalid `ready_min` = 3: more than the 2 worker(s) herd runs"),
        "{check:?}"
    );
    let run = herd_cli(&dir, &[&["run"][..], &args[..]].concat());
    assert_eq!(run.code, Some(2), "{run:?}");
    assert_eq!(run.stderr, check.stderr);
}
