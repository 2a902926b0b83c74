//! `ready`: herd waits for what the worker's own convention says. With
//! `ready = "notify"` a worker is ready once its main process sends
//! `READY=1` to the `NOTIFY_SOCKET` herd gave it (systemd's `sd_notify`),
//! not before; one that never does is killed at `ready_timeout`.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use serde_json::json;

fn fixture() -> String {
    format!(
        "{}/tests/fixtures/notify_server.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// One HTTP/1.0 GET; the body of a 200 answer.
fn body_of_get(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: herd\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"),
        "{answer}"
    );
    answer
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

#[test]
fn notify_workers_are_ready_once_they_send_ready_1_and_not_before() {
    let herd = Herd::launch(
        "ready-notify",
        None,
        2,
        &["--mode", "shared", "--ready", "notify"],
        &["python3", &fixture(), "1.0"],
    );
    herd.wait_for_event("worker_started", &[], 2);
    std::thread::sleep(Duration::from_millis(400));
    assert!(
        herd.events("worker_ready", &[]).is_empty(),
        "ready before READY=1:\n{}",
        herd.log_text()
    );
    let ready = herd.wait_ready(2);
    assert_eq!(herd.wait_for_worker_output("sending READY=1", 2).len(), 2);
    let pids: BTreeSet<u32> = herd.wait_all_ready(2);
    assert_eq!(pids, ready.values().copied().collect());
    // What the worker said in STATUS= is in `herd status`.
    let status = status_json(&herd.dir);
    for worker in workers_of(&status) {
        assert_eq!(
            worker["notify_status"],
            json!("serving since 1.0s"),
            "{status:#}"
        );
    }
    let table = herd.control(&["status"]);
    assert!(
        table.stdout.contains("serving since 1.0s"),
        "{}",
        table.stdout
    );
    for _ in 0..6 {
        let body = body_of_get(herd.addr());
        let pid: u32 = body.strip_prefix("notified by ").unwrap().parse().unwrap();
        assert!(pids.contains(&pid), "{body}");
    }
    // It reads no DRAIN: SIGTERM stops it, with no SIGKILL after shutdown_timeout.
    assert!(herd.stop().success());
}

#[test]
fn a_notify_worker_that_never_says_ready_is_killed_at_ready_timeout() {
    let herd = Herd::launch(
        "ready-notify-never",
        Some("ready_timeout = \"1s\"\n"),
        1,
        &["--mode", "shared", "--ready", "notify"],
        &["python3", &fixture(), "never"],
    );
    herd.wait_for_event("ready_timeout", &[("slot", json!(0))], 1);
    assert!(
        herd.events("worker_ready", &[]).is_empty(),
        "{}",
        herd.log_text()
    );
}

/// With `hang_timeout` on, a notify worker is told `WATCHDOG_USEC`; once
/// it pinged (`WATCHDOG=1`), going silent for longer makes it hung: killed
/// and replaced, as a hung hand-off worker is.
#[test]
fn a_notify_worker_that_stops_its_watchdog_pings_is_hung_and_replaced() {
    let herd = Herd::launch(
        "ready-notify-watchdog",
        Some("hang_timeout = \"500ms\"\nmonitor_interval = \"50ms\"\n"),
        1,
        &["--mode", "shared", "--ready", "notify"],
        &["python3", &fixture(), "watchdog", "8"],
    );
    herd.wait_ready(1);
    assert_eq!(
        herd.wait_for_worker_output("WATCHDOG_USEC=500000", 1).len(),
        1
    );
    herd.wait_for_worker_output("watchdog pings stopped", 1);
    herd.wait_for_event("watchdog_expired", &[], 1);
    herd.wait_for_event("hung_worker_killed", &[("slot", json!(0))], 1);
    // Its replacement starts (and, pinging again, is ready).
    herd.wait_for_event("worker_started", &[("slot", json!(0))], 2);
    herd.wait_ready(2);
}

/// gunicorn, from PyPI into `.venv-tests` by scripts/test (or
/// `HERD_TEST_GUNICORN`): its path, if it is there.
fn gunicorn() -> Option<String> {
    let path = std::env::var("HERD_TEST_GUNICORN")
        .unwrap_or_else(|_| format!("{}/.venv-tests/bin/gunicorn", env!("CARGO_MANIFEST_DIR")));
    std::path::Path::new(&path).exists().then_some(path)
}

/// An unmodified gunicorn in `--mode shared`: it takes herd's socket as
/// systemd's (LISTEN_FDS) and says READY=1 on NOTIFY_SOCKET once its
/// arbiter booted; then it serves, and SIGTERM stops it cleanly.
#[test]
fn gunicorn_is_ready_by_notify_and_serves_in_shared_mode() {
    let Some(gunicorn) = gunicorn() else {
        skip_unless_ci(
            "gunicorn_is_ready_by_notify_and_serves_in_shared_mode",
            "needs gunicorn in .venv-tests (scripts/test installs it)",
        );
        return;
    };
    let fixtures = format!("{}/tests/fixtures", env!("CARGO_MANIFEST_DIR"));
    let herd = Herd::launch(
        "ready-gunicorn",
        None,
        2,
        &["--mode", "shared", "--ready", "notify"],
        &[
            &gunicorn,
            "--chdir",
            &fixtures,
            "--workers",
            "2",
            // Two arbiters would share gunicorn's default control socket path.
            "--no-control-socket",
            "gunicorn_app:app",
        ],
    );
    let arbiters = herd.wait_all_ready(2);
    let status = status_json(&herd.dir);
    for worker in workers_of(&status) {
        assert_eq!(
            worker["notify_status"],
            json!("Gunicorn arbiter booted"),
            "{status:#}"
        );
    }
    let mut answered = BTreeSet::new();
    for _ in 0..20 {
        let body = body_of_get(herd.addr());
        let arbiter: u32 = body
            .strip_prefix("gunicorn arbiter ")
            .and_then(|rest| rest.split(' ').next())
            .and_then(|pid| pid.parse().ok())
            .unwrap_or_else(|| panic!("{body}"));
        assert!(arbiters.contains(&arbiter), "{body} not from {arbiters:?}");
        answered.insert(arbiter);
    }
    assert!(herd.stop().success());
}
