//! Issue 15, point 2: `stop_signal` stops a server by its own convention.
//! The fixture, a plain socket-activated server, stops gracefully on
//! SIGQUIT alone (as nginx does) and ignores SIGTERM: with
//! `stop_signal = "SIGQUIT"` herd stops it in time and exits 0, a request
//! in flight completing; without it, it is SIGKILLed at `shutdown_timeout`
//! and herd exits 1. Reload and scale-down send the same signal.

mod common;

use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

fn quit_only_server() -> String {
    format!(
        "{}/tests/fixtures/quit_only_server.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// `workers` fixture servers in `--mode shared`, ready by `ready_delay`,
/// with `config` and `flags`.
fn launch(name: &str, config: &str, workers: usize, flags: &[&str]) -> Herd {
    let config = format!("mode = \"shared\"\nready_delay = \"200ms\"\n{config}");
    let server = quit_only_server();
    Herd::launch(name, Some(&config), workers, flags, &["python3", &server])
}

/// slot -> pid of `count` workers that are ready and have said they
/// serve, their signal handlers set (`ready_delay` may pass before).
fn serving(herd: &Herd, count: usize) -> std::collections::BTreeMap<usize, u32> {
    let slots = herd.wait_ready(count);
    let said = pids_that(herd, "serving pid=", count);
    for pid in slots.values() {
        assert!(said.contains(pid), "{pid} not in {said:?}");
    }
    slots
}

/// A `GET /slow` in progress: it returns once a worker has begun it.
fn slow_request(herd: &Herd, addr: SocketAddr, already: usize) -> JoinHandle<(u16, String)> {
    let request = std::thread::spawn(move || {
        let (code, _, body) = http(addr, "GET", "/slow");
        (code, body)
    });
    herd.wait_for_worker_output("slow request pid=", already + 1);
    request
}

/// The pids the workers said they got `what` in (`got SIGQUIT`, `ignored SIGTERM`).
fn pids_that(herd: &Herd, what: &str, count: usize) -> Vec<u32> {
    let mut pids: Vec<u32> = herd
        .wait_for_worker_output(what, count)
        .iter()
        .map(|line| field(line, "pid") as u32)
        .collect();
    pids.sort();
    pids
}

/// The exit code herd logged for worker `pid` (`None`: killed by a signal).
fn exit_code(herd: &Herd, pid: u32) -> Option<i64> {
    herd.wait_for_event("worker_exited", &[("pid", json!(pid))], 1)[0]["code"].as_i64()
}

#[test]
fn stop_signal_stops_a_server_that_ignores_sigterm_in_time_and_herd_exits_0() {
    let mut herd = launch(
        "stop-signal-stop",
        "stop_signal = \"SIGQUIT\"\nshutdown_timeout = \"8s\"\n",
        2,
        &[],
    );
    let mut pids: Vec<u32> = serving(&herd, 2).into_values().collect();
    pids.sort();
    let request = slow_request(&herd, herd.addr(), 0);
    let asked = Instant::now();
    signal(herd.pid(), Signal::SIGTERM);
    let status = herd.wait_exit();
    let took = asked.elapsed();
    assert_eq!(status.code(), Some(0), "{}", herd.log_text());
    assert!(took < Duration::from_secs(8), "took {took:?}");
    let (code, body) = request.join().unwrap();
    assert_eq!(code, 200);
    assert!(body.ends_with(" slow"), "{body}");
    assert_eq!(pids_that(&herd, "got SIGQUIT", 2), pids);
    assert!(
        herd.worker_output("ignored").is_empty(),
        "{}",
        herd.log_text()
    );
    for pid in pids {
        assert_eq!(exit_code(&herd, pid), Some(0));
    }
}

#[test]
fn without_stop_signal_such_a_server_is_killed_at_shutdown_timeout_and_herd_exits_1() {
    let mut herd = launch("stop-signal-unset", "shutdown_timeout = \"1s\"\n", 2, &[]);
    let mut pids: Vec<u32> = serving(&herd, 2).into_values().collect();
    pids.sort();
    signal(herd.pid(), Signal::SIGTERM);
    // Made ready by `ready_delay`, they are sent SIGTERM, which they ignore.
    assert_eq!(pids_that(&herd, "ignored SIGTERM", 2), pids);
    herd.wait_for_event("shutdown_timeout", &[], 1);
    assert_eq!(herd.wait_exit().code(), Some(1));
    for pid in pids {
        let exited = &herd.wait_for_event("worker_exited", &[("pid", json!(pid))], 1)[0];
        assert_eq!(exited["signal"], json!(Signal::SIGKILL as i32), "{exited}");
    }
    assert!(herd.worker_output("got SIGQUIT").is_empty());
}

#[test]
fn a_reload_stops_each_old_worker_with_the_stop_signal_and_lets_its_request_finish() {
    let herd = launch(
        "stop-signal-reload",
        "stop_signal = \"SIGQUIT\"\nshutdown_timeout = \"8s\"\n",
        2,
        &[],
    );
    let mut old: Vec<u32> = serving(&herd, 2).into_values().collect();
    old.sort();
    let request = slow_request(&herd, herd.addr(), 0);
    let reload = herd.control(&["reload"]);
    assert_eq!(reload.code, Some(0), "{reload:?}");
    let (code, body) = request.join().unwrap();
    assert_eq!((code, body.ends_with(" slow")), (200, true), "{body}");
    assert_eq!(pids_that(&herd, "got SIGQUIT", 2), old);
    for &pid in &old {
        assert_eq!(exit_code(&herd, pid), Some(0), "{}", herd.log_text());
    }
    // The new workers serve.
    let (code, _, body) = http(herd.addr(), "GET", "/");
    assert_eq!(code, 200);
    assert!(!old.contains(&(field(&body, "pid") as u32)), "{body}");
    assert!(
        herd.worker_output("ignored").is_empty(),
        "{}",
        herd.log_text()
    );
}

#[test]
fn a_scale_down_sends_the_stop_signal_given_as_a_flag() {
    let mut herd = launch(
        "stop-signal-scale",
        "shutdown_timeout = \"8s\"\n",
        2,
        &["--stop-signal", "QUIT"],
    );
    let slots = serving(&herd, 2);
    let scale = herd.control(&["scale", "1"]);
    assert_eq!(scale.code, Some(0), "{scale:?}");
    assert_eq!(pids_that(&herd, "got SIGQUIT", 1), [slots[&1]]);
    assert_eq!(exit_code(&herd, slots[&1]), Some(0));
    signal(herd.pid(), Signal::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0), "{}", herd.log_text());
    assert_eq!(pids_that(&herd, "got SIGQUIT", 2)[..].len(), 2);
    assert!(
        herd.worker_output("ignored").is_empty(),
        "{}",
        herd.log_text()
    );
}

#[test]
fn a_stop_signal_no_server_can_catch_is_refused_before_any_worker_starts() {
    let dir = scratch_dir("stop-signal-refused");
    for (flag, reason) in [
        ("SIGKILL", "SIGKILL cannot be caught"),
        ("STOP", "SIGSTOP cannot be caught"),
        ("SIGTERMINATE", "expected one of: SIGTERM, SIGQUIT, SIGINT"),
    ] {
        let args = [
            "run",
            "--listen",
            "127.0.0.1:0",
            "--stop-signal",
            flag,
            "--",
            "true",
        ];
        let run = herd_cli(&dir, &args);
        assert_eq!(run.code, Some(2), "{run:?}");
        let message = format!("invalid `stop_signal` = {flag:?}: {reason}");
        assert!(run.stderr.contains(&message), "{message} in {run:?}");
    }
}
