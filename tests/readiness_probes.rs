//! Readiness by probe: with `ready = "tcp"` herd connects to the starting
//! worker's own socket and counts it ready once the worker accepted that
//! connection; with `ready = "http:/PATH"`, once `GET PATH` there is
//! answered 2xx. A worker is dealt no connection before, one never ready
//! is killed at `ready_timeout`, and a reload's new worker is probed on
//! sockets of its own. The probe needs a socket per worker (kernel
//! rotation, `reuseport`) and CAP_BPF; elsewhere herd refuses it by name.
//!
//! Every test but the `herd check` refusals needs CAP_BPF.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// tests/fixtures/probe_server.py: never accepts, accepts once a file
/// exists, or answers `/health` 503 until a file exists.
fn probe_server() -> String {
    format!(
        "{}/tests/fixtures/probe_server.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// `count` sequential GETs, each on a new connection; the pids, in order.
fn pids_in_order(herd: &Herd, count: usize) -> Vec<u32> {
    (0..count)
        .map(|i| {
            pids::get_pid(herd.addr(), DEADLINE)
                .unwrap_or_else(|e| panic!("request {i}: {e}\nlog:\n{}", herd.log_text()))
        })
        .collect()
}

/// The state `herd status` shows for `slot`.
fn state_of(status: &Value, slot: u64) -> String {
    workers_of(status)
        .iter()
        .find(|w| w["slot"] == slot)
        .and_then(|w| w["state"].as_str())
        .unwrap_or_else(|| panic!("no slot {slot} in {status:#}"))
        .to_string()
}

/// The pid of the one `worker_ready` of `slot`.
fn ready_pid(herd: &Herd, slot: usize) -> u32 {
    let ready = herd.wait_for_event("worker_ready", &[("slot", json!(slot))], 1);
    number(&ready[0], "pid") as u32
}

/// Waits for slot 0 ready and slot 1 still starting, after at least one
/// probe of slot 1 failed; returns slot 0's pid.
fn only_slot_0_ready(herd: &Herd) -> u32 {
    let first = ready_pid(herd, 0);
    herd.wait_for_event("probe_failed", &[("slot", json!(1))], 1);
    wait_for_status(&herd.dir, "slot 0 ready, slot 1 starting", |s| {
        state_of(s, 0) == "ready" && state_of(s, 1) == "starting"
    });
    assert!(
        herd.events("worker_ready", &[("slot", json!(1))])
            .is_empty(),
        "slot 1 ready before its probe passed:\n{}",
        herd.log_text()
    );
    first
}

/// Once slot 1 is ready too, it gets its turns: a few requests reach it.
fn slot_1_serves(herd: &Herd, first: u32) {
    let second = ready_pid(herd, 1);
    assert_ne!(second, first);
    let pids = pids_in_order(herd, 6);
    assert!(pids.contains(&second), "slot 1 got no turn: {pids:?}");
    assert!(pids.contains(&first), "slot 0 lost its turns: {pids:?}");
}

/// `ready = "tcp"` readies a server that says nothing; `rotation = "auto"`
/// picks kernel rotation for it, so turns strictly alternate.
#[test]
fn tcp_probe_readies_a_silent_server_dealt_in_strict_turns() {
    if !require_cap_bpf("tcp_probe_readies_a_silent_server_dealt_in_strict_turns") {
        return;
    }
    let script = pids::socket_activated();
    let herd = Herd::launch(
        "probe-tcp-turns",
        None,
        2,
        &["--ready", "tcp"],
        &["python3", &script],
    );
    let ready: BTreeSet<u32> = herd.wait_ready(2).into_values().collect();
    assert_eq!(ready.len(), 2, "{ready:?}");
    let pids = pids_in_order(&herd, 20);
    assert_eq!(
        pids[..2].iter().copied().collect::<BTreeSet<_>>(),
        ready,
        "both workers take a turn: {pids:?}"
    );
    for (i, pair) in pids.windows(2).enumerate() {
        assert_ne!(pair[0], pair[1], "turns {i} and {} repeat: {pids:?}", i + 1);
    }
    assert!(
        herd.events("kernel_rotation_unavailable", &[]).is_empty(),
        "{}",
        herd.log_text()
    );
    assert!(herd.stop().success());
}

/// A server that takes its socket and never accepts: every probe
/// connects but is never accepted, and `ready_timeout` kills it.
#[test]
fn tcp_probe_never_accepted_ends_in_ready_timeout() {
    if !require_cap_bpf("tcp_probe_never_accepted_ends_in_ready_timeout") {
        return;
    }
    let script = probe_server();
    let herd = Herd::launch(
        "probe-tcp-never",
        Some("ready_timeout = \"2s\"\n"),
        1,
        &["--ready", "tcp"],
        &["python3", &script, "never"],
    );
    herd.wait_for_event("ready_timeout", &[("slot", json!(0))], 1);
    let failed = herd.events("probe_failed", &[("slot", json!(0))]);
    assert!(!failed.is_empty(), "no probe_failed:\n{}", herd.log_text());
    assert_eq!(number(&failed[0], "total"), 1, "{failed:?}");
    let why = failed[0]["message"].as_str().unwrap_or_default();
    assert!(why.contains("not accepted"), "{failed:?}");
    assert!(
        herd.events("worker_ready", &[]).is_empty(),
        "{}",
        herd.log_text()
    );
}

/// Slot 1's server accepts only once a file exists (slot 0's at once):
/// slot 1 is not ready and gets no connection until then, ready after.
#[test]
fn tcp_probe_waits_for_the_server_to_accept() {
    if !require_cap_bpf("tcp_probe_waits_for_the_server_to_accept") {
        return;
    }
    let script = probe_server();
    let herd = Herd::launch(
        "probe-tcp-later",
        None,
        2,
        &["--ready", "tcp"],
        // Relative: workers run in herd's directory.
        &["python3", &script, "accept-after", "accept", "1"],
    );
    let first = only_slot_0_ready(&herd);
    let pids = pids_in_order(&herd, 6);
    assert!(pids.iter().all(|&p| p == first), "{pids:?}");
    std::fs::write(herd.dir.join("accept"), "").unwrap();
    herd.wait_for_worker_output("exists, accepting", 1);
    slot_1_serves(&herd, first);
    assert!(herd.stop().success());
}

/// `ready = "http:/health"`: slot 1 answers `/` from the start but its
/// `/health` is 503 until a file exists. It gets no request until its
/// health check passes; every one before goes to slot 0.
#[test]
fn http_probe_waits_for_a_2xx_health_check() {
    if !require_cap_bpf("http_probe_waits_for_a_2xx_health_check") {
        return;
    }
    let script = probe_server();
    let herd = Herd::launch(
        "probe-http-later",
        None,
        2,
        &["--ready", "http:/health"],
        &["python3", &script, "health", "healthy", "1"],
    );
    let first = only_slot_0_ready(&herd);
    // The first attempts may find python not serving yet; later ones 503.
    wait_until("a probe of slot 1 answered 503", || {
        let failed = herd.events("probe_failed", &[("slot", json!(1))]);
        failed
            .iter()
            .any(|e| {
                e["message"]
                    .as_str()
                    .unwrap_or_default()
                    .ends_with("answered 503")
            })
            .then_some(())
    });
    let pids = pids_in_order(&herd, 10);
    assert!(pids.iter().all(|&p| p == first), "{pids:?}");
    std::fs::write(herd.dir.join("healthy"), "").unwrap();
    slot_1_serves(&herd, first);
    assert!(herd.stop().success());
}

/// A client sending sequential GETs on new connections, bounded by
/// [`Load::MAX_REQUESTS`] and [`Load::MAX_TIME`], until told to stop.
struct Load {
    /// Requests sent so far, answered or not: what the test waits on.
    sent: Arc<AtomicUsize>,
    /// Why each failed request failed, for the assertion's message.
    failures: Arc<Mutex<Vec<String>>>,
    /// Set by [`Load::finish`]: the client stops before its next request.
    stop: Arc<AtomicBool>,
    /// The pids that answered, and whether it was stopped (not ran out).
    thread: JoinHandle<(BTreeSet<u32>, bool)>,
}

impl Load {
    const MAX_REQUESTS: usize = 2000;
    const MAX_TIME: Duration = Duration::from_secs(10);

    fn start(addr: SocketAddr) -> Load {
        let sent = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, f, halt) = (sent.clone(), failures.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut pids = BTreeSet::new();
            for i in 0..Self::MAX_REQUESTS {
                if halt.load(Ordering::SeqCst) {
                    return (pids, true);
                }
                if started.elapsed() > Self::MAX_TIME {
                    break;
                }
                match pids::get_pid(addr, DEADLINE) {
                    Ok(pid) => drop(pids.insert(pid)),
                    Err(e) => f.lock().unwrap().push(format!("request {i}: {e}")),
                }
                s.fetch_add(1, Ordering::SeqCst);
            }
            (pids, false)
        });
        Load {
            sent,
            failures,
            stop,
            thread,
        }
    }

    fn sent(&self) -> usize {
        self.sent.load(Ordering::SeqCst)
    }

    /// Waits until `count` requests were sent, or the load ran out.
    fn wait_for(&self, count: usize) {
        wait_until(&format!("{count} requests sent"), || {
            (self.sent() >= count || self.thread.is_finished()).then_some(())
        });
    }

    /// Stops it; returns how many were sent, the failures, and the pids.
    /// Fails if it ran out before, so it spanned whatever came before.
    fn finish(self) -> (usize, Vec<String>, BTreeSet<u32>) {
        self.stop.store(true, Ordering::SeqCst);
        let (pids, stopped) = self.thread.join().expect("the load thread");
        assert!(stopped, "the load ran out before it was stopped");
        let failures = self.failures.lock().unwrap().clone();
        (self.sent.load(Ordering::SeqCst), failures, pids)
    }
}

/// A rolling reload of `workers` healthy `http:/health` workers under
/// load: each new worker is probed on its own socket, not one request
/// fails, and every slot ends with a new worker, which serves.
fn reload_under_load(name: &str, workers: usize) {
    if !require_cap_bpf(name) {
        return;
    }
    let script = probe_server();
    let herd = Herd::launch(
        name,
        None,
        workers,
        &["--ready", "http:/health"],
        &["python3", &script, "health"],
    );
    let before = herd.wait_all_ready(workers);
    let load = Load::start(herd.addr());
    load.wait_for(20);
    let output = herd.control(&["reload"]);
    assert_eq!(output.code, Some(0), "{output:?}\n{}", herd.log_text());
    let replaced = format!("reloaded {workers} worker(s)");
    assert!(output.stdout.starts_with(&replaced), "{output:?}");
    let after = herd.wait_all_ready(workers);
    assert!(before.is_disjoint(&after), "{before:?} then {after:?}");
    load.wait_for(load.sent() + 20);
    let (sent, failures, pids) = load.finish();
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed: {failures:#?}\nlog:\n{}",
        failures.len(),
        herd.log_text()
    );
    assert!(pids.is_superset(&after), "{pids:?} answered; new {after:?}");
    assert!(herd.stop().success());
}

#[test]
fn http_probed_reload_under_load_fails_no_request() {
    reload_under_load("http_probed_reload_under_load_fails_no_request", 2);
}

/// With one worker the slot's old worker serves until its successor is.
#[test]
fn http_probed_reload_of_a_single_worker_fails_no_request() {
    reload_under_load("http_probed_reload_of_a_single_worker_fails_no_request", 1);
}

/// A reload whose new workers fail the probe (`kind`: `tcp`, never
/// accepted; `http`, `/health` 503) while the old ones would pass it: the
/// probe reaches the new worker's own socket, so the reload fails at
/// `ready_timeout` and the old workers keep every request.
fn reload_to_failing_workers(name: &str, kind: &str) {
    if !require_cap_bpf(name) {
        return;
    }
    let (script, ready) = (
        probe_server(),
        if kind == "tcp" { "tcp" } else { "http:/health" },
    );
    let herd = Herd::launch(
        name,
        Some("ready_timeout = \"3s\"\n"),
        2,
        &["--ready", ready],
        // Relative: workers run in herd's directory.
        &["python3", &script, "spoiled-by", "spoiled", kind],
    );
    let before = herd.wait_all_ready(2);
    std::fs::write(herd.dir.join("spoiled"), "").unwrap();
    let output = herd.control(&["reload"]);
    assert_eq!(
        output.code,
        Some(1),
        "{output:?}\nlog:\n{}",
        herd.log_text()
    );
    assert!(
        output.stderr.contains("reload failed")
            && output.stderr.contains("not ready within ready_timeout"),
        "{output:?}"
    );
    let slot_0 = [("slot", json!(0))];
    herd.wait_for_event("ready_timeout", &slot_0, 1);
    assert!(!herd.events("probe_failed", &slot_0).is_empty());
    // Once the new worker is gone, the old ones serve every request.
    assert_eq!(herd.wait_all_ready(2), before);
    let pids = pids_in_order(&herd, 10);
    assert!(
        pids.iter().all(|p| before.contains(p)),
        "{pids:?} of {before:?}"
    );
    assert!(herd.stop().success());
}

#[test]
fn a_reload_to_workers_never_accepting_fails_and_keeps_the_old_ones() {
    reload_to_failing_workers("a_reload_to_workers_never_accepting_fails", "tcp");
}

#[test]
fn a_reload_to_unhealthy_workers_fails_and_keeps_the_old_ones() {
    reload_to_failing_workers("a_reload_to_unhealthy_workers_fails", "http");
}

/// A worker killed at `ready_timeout` is restarted into its slot, on the
/// same socket, and probed again: once its server accepts, it is ready.
#[test]
fn a_worker_restarted_after_ready_timeout_is_probed_again() {
    if !require_cap_bpf("a_worker_restarted_after_ready_timeout_is_probed_again") {
        return;
    }
    let script = probe_server();
    let herd = Herd::launch(
        "probe-tcp-restarted",
        Some("ready_timeout = \"2s\"\n"),
        1,
        &["--ready", "tcp"],
        // Relative: workers run in herd's directory.
        &["python3", &script, "accept-after", "accept", "0"],
    );
    let first = herd.wait_for_event("ready_timeout", &[("slot", json!(0))], 1);
    std::fs::write(herd.dir.join("accept"), "").unwrap();
    let outcome = wait_until("a restarted worker ready, or a probe refused", || {
        let refused = herd.events("probe_unavailable", &[]);
        if !refused.is_empty() {
            return Some(Err(refused));
        }
        herd.events("worker_ready", &[]).pop().map(Ok)
    });
    let ready = outcome.unwrap_or_else(|refused| {
        panic!(
            "the restart cannot be probed: {refused:?}\nlog:\n{}",
            herd.log_text()
        )
    });
    let pid = number(&ready, "pid") as u32;
    assert_ne!(pid, number(&first[0], "pid") as u32);
    assert_eq!(pids::get_pid(herd.addr(), DEADLINE), Ok(pid));
    assert!(herd.stop().success());
}

/// After a reload failed (its new worker never accepted), the next reload,
/// to workers that accept, is probed and succeeds.
#[test]
fn a_reload_after_a_failed_one_is_probed_and_succeeds() {
    if !require_cap_bpf("a_reload_after_a_failed_one_is_probed_and_succeeds") {
        return;
    }
    let script = probe_server();
    let herd = Herd::launch(
        "probe-tcp-reload-again",
        Some("ready_timeout = \"3s\"\n"),
        1,
        &["--ready", "tcp"],
        &["python3", &script, "spoiled-by", "spoiled", "tcp"],
    );
    let before = herd.wait_all_ready(1);
    std::fs::write(herd.dir.join("spoiled"), "").unwrap();
    let failed = herd.control(&["reload"]);
    assert_eq!(failed.code, Some(1), "{failed:?}");
    assert_eq!(herd.wait_all_ready(1), before);
    std::fs::remove_file(herd.dir.join("spoiled")).unwrap();
    let output = herd.control(&["reload"]);
    let refused = herd.events("probe_unavailable", &[]);
    assert!(refused.is_empty(), "{refused:?}\nlog:\n{}", herd.log_text());
    assert_eq!(
        output.code,
        Some(0),
        "{output:?}\nlog:\n{}",
        herd.log_text()
    );
    let after = herd.wait_all_ready(1);
    assert!(before.is_disjoint(&after), "{before:?} then {after:?}");
    let pid = pids::get_pid(herd.addr(), DEADLINE).unwrap();
    assert!(after.contains(&pid), "{pid} of {after:?}");
    assert!(herd.stop().success());
}

/// A reload's new worker dies before it is ready while a connection waits
/// on the old worker's socket (the old worker is stopped): the old socket
/// stays dealt to, and that connection and the next are served by it.
#[test]
fn a_replacement_dying_unready_leaves_the_old_socket_dealt_to() {
    if !require_cap_bpf("a_replacement_dying_unready_leaves_the_old_socket_dealt_to") {
        return;
    }
    let script = probe_server();
    let herd = Herd::launch(
        "probe-tcp-replacement-dies",
        None,
        1,
        &["--ready", "tcp"],
        &["python3", &script, "spoiled-by", "spoiled", "tcp"],
    );
    let old = herd.wait_all_ready(1).pop_first().unwrap();
    std::fs::write(herd.dir.join("spoiled"), "").unwrap();
    herd.wait_for_event("control_ready", &[], 1);
    let dir = herd.dir.clone();
    let reload = std::thread::spawn(move || herd_cli(&dir, &["reload"]));
    let started = herd.wait_for_event("worker_started", &[("slot", json!(0))], 2);
    let new = number(&started[1], "pid") as u32;
    // One slot: nothing is skipped as stalled, so the connection waits.
    signal(old, Signal::SIGSTOP);
    let waiting = send_request(herd.addr()).expect("connect");
    signal(new, Signal::SIGKILL);
    let output = reload.join().expect("the reload thread");
    assert_eq!(output.code, Some(1), "{output:?}");
    herd.wait_for_event("worker_exited", &[("pid", json!(new))], 1);
    signal(old, Signal::SIGCONT);
    let served = pids::answer_pid(waiting, DEADLINE);
    assert_eq!(
        served,
        Ok(old),
        "the waiting one\nlog:\n{}",
        herd.log_text()
    );
    for i in 0..6 {
        let pid = pids::get_pid(herd.addr(), DEADLINE);
        assert_eq!(pid, Ok(old), "request {i}\nlog:\n{}", herd.log_text());
    }
    assert!(herd.stop().success());
}

/// `reuseport` gives each slot its own socket, so `tcp` probes work there
/// too: both workers ready, requests served by them.
#[test]
fn tcp_probe_readies_workers_in_reuseport_mode() {
    if !require_cap_bpf("tcp_probe_readies_workers_in_reuseport_mode") {
        return;
    }
    let script = pids::socket_activated();
    let herd = Herd::launch(
        "probe-tcp-reuseport",
        None,
        2,
        &["--mode", "reuseport", "--ready", "tcp"],
        &["python3", &script],
    );
    let ready: BTreeSet<u32> = herd.wait_ready(2).into_values().collect();
    assert_eq!(ready, herd.wait_all_ready(2));
    let pids = pids_in_order(&herd, 10);
    assert!(
        pids.iter().all(|p| ready.contains(p)),
        "{pids:?} of {ready:?}"
    );
    assert!(herd.stop().success());
}

/// `herd check ARGS -- python3 socket_activated.py` on 127.0.0.1:0.
fn check(dir: &Path, args: &[&str], prefix: &[&str]) -> CliRun {
    let script = pids::socket_activated();
    let mut full = vec!["check", "--listen", "127.0.0.1:0"];
    full.extend_from_slice(args);
    full.extend(["--", "python3", script.as_str()]);
    herd_cli_under(dir, prefix, &full, DEADLINE).unwrap_or_else(|e| panic!("{e}"))
}

/// Probes are refused where they cannot reach the worker's own socket,
/// and a path that is no path, in words that name `ready` and why.
#[test]
fn herd_check_refuses_probes_it_cannot_steer() {
    let dir = scratch_dir("probe-check-refusals");
    let refused: &[(&[&str], &str)] = &[
        (
            &["--ready", "tcp", "--mode", "shared"],
            "invalid `ready` = \"tcp\": in mode \"shared\" every worker accepts from one queue",
        ),
        (
            &["--ready", "http:/x", "--mode", "least-conn"],
            "invalid `ready` = \"http:/x\": a probe needs the worker's own socket",
        ),
        (
            &["--ready", "tcp", "--rotation", "handoff"],
            "invalid `ready` = \"tcp\": a probe needs the worker's own socket",
        ),
        (
            &["--ready", "http:nopath"],
            "invalid `ready` = \"http:nopath\": the path \"nopath\" must start with /",
        ),
    ];
    for (args, why) in refused {
        let run = check(&dir, args, &[]);
        assert_eq!(run.code, Some(1), "{args:?}: {run:?}");
        assert!(run.stderr.contains(why), "{args:?}: {run:?}");
    }
}

/// `herd check` says what a `tcp` probe waits for; without CAP_BPF it and
/// `herd run` refuse to start rather than wait for a probe that cannot
/// arrive.
#[test]
fn herd_check_describes_the_tcp_probe_and_needs_cap_bpf() {
    if !require_cap_bpf("herd_check_describes_the_tcp_probe_and_needs_cap_bpf") {
        return;
    }
    let dir = scratch_dir("probe-check-tcp");
    let run = check(&dir, &["--ready", "tcp"], &[]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let expected = "readiness: a worker gets connections once ready: a connection herd makes to the worker's own socket, accepted by it (ready = \"tcp\")";
    assert!(run.stdout.contains(expected), "{run:?}");
    let without_bpf = [
        "setpriv",
        "--bounding-set",
        "-bpf,-sys_admin,-perfmon",
        "--",
    ];
    for ready in ["tcp", "http:/health"] {
        let run = check(&dir, &["--ready", ready], &without_bpf);
        assert_eq!(run.code, Some(1), "{ready}: {run:?}");
        let why = format!("`ready` = \"{ready}\" steers its probe to the starting worker's socket with herd's eBPF program, which the kernel refused here");
        assert!(run.stderr.contains(&why), "{ready}: {run:?}");
        assert!(run.stderr.contains("CAP_BPF"), "{ready}: {run:?}");
    }
    let script = pids::socket_activated();
    let args = [
        "run",
        "--listen",
        "127.0.0.1:0",
        "--ready",
        "tcp",
        "--",
        "python3",
        &script,
    ];
    let run = herd_cli_under(&dir, &without_bpf, &args, DEADLINE).unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(run.code, Some(0), "{run:?}");
    assert!(run.stderr.contains("needs CAP_BPF"), "{run:?}");
}
