//! Node workers stop like Node's `worker.kill()`: herd sends `disconnect`,
//! and once the worker's channel has closed, SIGTERM; SIGKILL comes only at
//! `shutdown_timeout`. A Node worker holding any handle besides its server
//! (a timer, a Redis client) never exits by itself after `disconnect`, so
//! without the SIGTERM every stop would sit out `shutdown_timeout` and exit
//! 1, and every reload would leave the old workers running that long.
//!
//! Every test here sets `shutdown_timeout = "60s"`, three times the tests'
//! 20 s DEADLINE: a herd that exits, or an old worker that is gone, within
//! the deadline cannot have waited for the timeout. No test measures time.
//!
//! The Redis tests run the seed's Express + express-session + connect-redis
//! app against a real `redis-server` on 127.0.0.1. They need `npm ci` in
//! tests/fixtures/node-express (CI runs it in .ci/run) and fail without it;
//! without `redis-server` they are skipped, except in CI (`CI` set), where
//! they fail.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use common::servers::*;
use common::*;
use nix::sys::signal::Signal;

/// Far longer than DEADLINE: see the module comment.
const LONG_SHUTDOWN: &str = "shutdown_timeout = \"60s\"\n";

/// The event herd logs when a stop had to wait for `shutdown_timeout`.
const STOP_TIMED_OUT: &str = "shutdown_timeout";

/// The event herd logs when one draining worker outlived `shutdown_timeout`.
const DRAIN_TIMED_OUT: &str = "drain_timeout";

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

fn interval_app() -> String {
    fixture("node/interval.js").display().to_string()
}

/// The seed's session app; fails (never skips) when its packages are not
/// installed.
fn session_app() -> String {
    let dir = fixture("node-express");
    for package in ["express", "express-session", "connect-redis", "redis"] {
        assert!(
            dir.join("node_modules")
                .join(package)
                .join("package.json")
                .is_file(),
            "{package} is not installed for the fixture: run `npm ci` in {} (CI does it in .ci/run)",
            dir.display()
        );
    }
    dir.join("session-app.js").display().to_string()
}

// ---- processes, by pid and start time ----

/// A process as it was when first seen. A pid alone could be reused by an
/// unrelated process once the worker is gone; the start time tells them apart.
#[derive(Debug)]
struct Proc {
    pid: u32,
    start_ticks: u64,
}

/// `/proc/PID/stat`'s state letter and start time, if the pid exists.
fn stat_of(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: split after it.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // Fields 3 (state) and 22 (starttime) of proc(5), counted from 1.
    let state = fields.first()?.chars().next()?;
    let start_ticks = fields.get(19)?.parse().ok()?;
    Some((state, start_ticks))
}

impl Proc {
    fn of(pid: u32) -> Proc {
        let (_, start_ticks) =
            stat_of(pid).unwrap_or_else(|| panic!("worker {pid} is not running"));
        Proc { pid, start_ticks }
    }

    /// Its state letter while it is still in the process table (`Z`: it
    /// exited, but herd has not reaped it yet).
    fn state(&self) -> Option<char> {
        stat_of(self.pid)
            .filter(|&(_, start)| start == self.start_ticks)
            .map(|(state, _)| state)
    }
}

fn procs_of(pids: &BTreeSet<u32>) -> Vec<Proc> {
    pids.iter().map(|&pid| Proc::of(pid)).collect()
}

/// Waits, at most DEADLINE, until none of `procs` is left in the process
/// table; else fails with the ones left and herd's log.
fn assert_gone(procs: &[Proc], what: &str, herd: &Herd) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left: Vec<(u32, char)> = procs
            .iter()
            .filter_map(|p| p.state().map(|state| (p.pid, state)))
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: after {DEADLINE:?}, (pid, state) {left:?} still there \
             (with shutdown_timeout 60s, herd never sent them SIGTERM); herd's log:\n{}",
            herd.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// herd exited with 0 within the deadline (so before `shutdown_timeout`),
/// never logging that it waited for the timeout.
fn assert_clean_exit(status: ExitStatus, herd: &Herd) {
    // herd's last event, its closing tally: once it is read, so is every
    // line before it.
    herd.wait_for_event("stopped", &[], 1);
    let log = herd.log_text();
    assert_eq!(status.code(), Some(0), "herd's exit: {status}; log:\n{log}");
    assert!(herd.events(STOP_TIMED_OUT, &[]).is_empty(), "{log}");
    assert!(herd.events(DRAIN_TIMED_OUT, &[]).is_empty(), "{log}");
}

// ---- HTTP ----

/// One `GET /` on a new connection, with `cookie` if given; returns the
/// response.
fn get_page(addr: SocketAddr, cookie: Option<&str>) -> responses::Response {
    let cookie = cookie
        .map(|c| format!("Cookie: {c}\r\n"))
        .unwrap_or_default();
    let parsed = load::exchange(addr, "/", &cookie).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!((parsed.version, parsed.status), (1, 200), "{parsed:?}");
    parsed
}

/// The pids of the interval app's workers that answer `count` requests.
fn interval_pids(addr: SocketAddr, count: usize) -> BTreeSet<u32> {
    (0..count)
        .map(|_| {
            let body = get_page(addr, None).body;
            body.strip_prefix("Handled by worker ")
                .and_then(|pid| pid.parse().ok())
                .unwrap_or_else(|| panic!("{body:?}"))
        })
        .collect()
}

// ---- the interval app: no Redis needed ----

#[test]
fn herd_stop_does_not_wait_for_shutdown_timeout_for_a_node_worker_holding_a_timer() {
    let app = interval_app();
    let mut herd = Herd::launch(
        "node-stop-interval",
        Some(LONG_SHUTDOWN),
        2,
        &[],
        &["node", &app],
    );
    let pids = herd.wait_all_ready(2);
    assert_eq!(interval_pids(herd.addr(), 4), pids);
    let workers = procs_of(&pids);
    // `herd stop` answers only once herd has stopped; meanwhile wait_exit
    // fails with herd's log if herd is still running at the deadline.
    let dir = herd.dir.clone();
    let stop = std::thread::spawn(move || herd_cli(&dir, &["stop"]));
    let status = herd.wait_exit();
    let stop = stop.join().unwrap();
    assert_eq!(stop.code, Some(0), "`herd stop`: {stop:?}");
    assert_clean_exit(status, &herd);
    assert_gone(&workers, "the workers after herd stop", &herd);
}

#[test]
fn a_reload_leaves_no_old_node_worker_holding_a_timer_running() {
    let app = interval_app();
    let herd = Herd::launch(
        "node-reload-interval",
        Some(LONG_SHUTDOWN),
        2,
        &[],
        &["node", &app],
    );
    let old = herd.wait_all_ready(2);
    assert_eq!(interval_pids(herd.addr(), 4), old);
    let old_workers = procs_of(&old);
    let reload = herd.control(&["reload"]);
    assert_eq!(reload.code, Some(0), "`herd reload`: {reload:?}");
    // The reload answers once every slot has its new worker; the old ones
    // were sent `disconnect` and must now be gone well before 60 s.
    let new = herd.wait_all_ready(2);
    assert!(new.is_disjoint(&old), "old {old:?}, new {new:?}");
    assert_gone(&old_workers, "the old workers after the reload", &herd);
    // herd itself runs on, and serves with the new workers only.
    assert_eq!(interval_pids(herd.addr(), 4), new);
    assert!(herd.events(DRAIN_TIMED_OUT, &[]).is_empty());
    assert_eq!(herd.wait_all_ready(2), new);
    assert!(herd.stop().success());
}

// ---- the seed's Express + Redis session app ----

/// herd running the session app `app` on 2 workers against `redis`.
fn session_herd(name: &str, app: &str, redis: &Redis) -> Herd {
    let config = format!("{LONG_SHUTDOWN}\n[env]\nREDIS_URL = \"{}\"\n", redis.url());
    Herd::launch(name, Some(&config), 2, &[], &["node", app])
}

/// Every visit by one client counts in the same session, in Redis, while
/// strict rotation hands the visits to both workers in turn.
fn shared_sessions(herd: &Herd, visitor: &mut Visitor, seen: u64, pids: &BTreeSet<u32>) {
    let answered = visitor.visits(herd.addr(), seen, 6);
    assert_eq!(&answered, pids, "both workers served the session");
}

#[test]
fn the_seeds_express_redis_session_app_stops_at_once_with_exit_0() {
    // A missing `npm ci` fails the test even where Redis skips it.
    let app = session_app();
    let Some(redis) = Redis::start("node-stop-session") else {
        return;
    };
    let mut herd = session_herd("node-stop-session", &app, &redis);
    let pids = herd.wait_all_ready(2);
    shared_sessions(&herd, &mut Visitor::default(), 0, &pids);
    let workers = procs_of(&pids);
    // SIGTERM, as a service manager stops herd.
    signal(herd.pid(), Signal::SIGTERM);
    let status = herd.wait_exit();
    assert_clean_exit(status, &herd);
    assert_gone(&workers, "the workers after SIGTERM to herd", &herd);
}

#[test]
fn the_seeds_express_redis_session_app_reloads_without_leftover_workers() {
    // A missing `npm ci` fails the test even where Redis skips it.
    let app = session_app();
    let Some(redis) = Redis::start("node-reload-session") else {
        return;
    };
    let herd = session_herd("node-reload-session", &app, &redis);
    let old = herd.wait_all_ready(2);
    let mut visitor = Visitor::default();
    shared_sessions(&herd, &mut visitor, 0, &old);
    let old_workers = procs_of(&old);
    let reload = herd.control(&["reload"]);
    assert_eq!(reload.code, Some(0), "`herd reload`: {reload:?}");
    let new = herd.wait_all_ready(2);
    assert!(new.is_disjoint(&old), "old {old:?}, new {new:?}");
    // Each old worker holds its Redis connection open after `disconnect`.
    assert_gone(&old_workers, "the old workers after the reload", &herd);
    // The session outlives the workers that served it: it is in Redis.
    shared_sessions(&herd, &mut visitor, 6, &new);
    assert!(herd.events(DRAIN_TIMED_OUT, &[]).is_empty());
    assert!(herd.stop().success());
}
