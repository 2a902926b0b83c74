//! A worker's processes live and die with it: helpers a worker forks (what
//! nginx, uvicorn `--workers 2` or any process pool does) are killed when
//! the worker's main process exits, `herd stop` leaves no descendant
//! behind, and a helper never keeps the port from the next `herd run`.

mod common;

use std::net::TcpListener;

use common::procs::{descendants, process_running as alive};
use common::*;
use nix::sys::signal::Signal;

fn fixture() -> String {
    format!(
        "{}/tests/fixtures/lifecycle_worker.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn wait_gone(what: &str, pids: &[u32]) {
    wait_until(what, || pids.iter().all(|&pid| !alive(pid)).then_some(()));
}

/// The pids of the helpers the workers logged forking.
fn helpers(herd: &Herd, count: usize) -> Vec<u32> {
    herd.wait_for_worker_output("helper pid=", count)
        .iter()
        .map(|line| field(line, "pid") as u32)
        .collect()
}

/// herd can put each worker in a cgroup of its own here (cgroup v2,
/// writable): what catches helpers that left the worker's process group.
/// Skips (returns false) where it cannot, except in CI, where it must.
fn cgroups_available(test: &str) -> bool {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let writable = mountinfo.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let fstype = line.split(" - ").nth(1).and_then(|s| s.split(' ').next());
        fstype == Some("cgroup2")
            && fields
                .get(5)
                .is_some_and(|opts| opts.split(',').any(|o| o == "rw"))
    });
    writable || skip_unless_ci(test, "needs a writable cgroup v2 hierarchy")
}

/// `shared` mode (the helper accepts from the inherited socket, as a
/// prefork server's children do), `workers` workers of `mode`.
fn start(name: &str, config: &str, workers: usize, mode: &str) -> Herd {
    Herd::launch(
        name,
        Some(config),
        workers,
        &["--mode", "shared"],
        &["python3", &fixture(), mode],
    )
}

/// A worker's helper in its process group dies when the worker does, and
/// the slot serves again.
#[test]
fn a_workers_helper_dies_with_it() {
    for kill_mode in ["auto", "process-group"] {
        let herd = start(
            &format!("helper-dies-{kill_mode}"),
            &format!("kill_mode = \"{kill_mode}\"\n"),
            1,
            "fork-helper",
        );
        let worker = herd.wait_ready(1)[&0];
        let helper = helpers(&herd, 1)[0];
        assert!(alive(helper));
        signal(worker, Signal::SIGKILL);
        wait_gone("the helper to die with its worker", &[helper]);
        herd.wait_for_worker_output("helper pid=", 2);
        herd.wait_all_ready(1);
        assert!(get(herd.addr()).is_ok());
        // Stopped, not dropped: a SIGKILLed herd would leave the new
        // worker's helper behind in process-group mode (nothing holds it).
        let helpers = helpers(&herd, 2);
        herd.stop();
        wait_gone("every helper, once herd stopped", &helpers);
    }
}

/// A helper that left the worker's process group (setsid) is still the
/// worker's: herd's cgroup per worker catches it when the worker dies.
#[test]
fn a_helper_that_left_the_process_group_dies_with_its_worker() {
    if !cgroups_available("a_helper_that_left_the_process_group_dies_with_its_worker") {
        return;
    }
    let herd = start("setsid-helper-dies", "", 1, "fork-helper-setsid");
    let worker = herd.wait_ready(1)[&0];
    let helper = helpers(&herd, 1)[0];
    signal(worker, Signal::SIGKILL);
    wait_gone("the setsid helper to die with its worker", &[helper]);
    herd.wait_all_ready(1);
}

/// `herd stop` leaves no descendant behind, helpers that left the process
/// group included, and the port is free for the next `herd run` at once.
fn stop_leaves_nothing(name: &str, kill_mode: &str) {
    // Orphans become this test's children rather than init's, so one that
    // escaped herd would still be seen below.
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let mut herd = start(
        name,
        &format!("kill_mode = \"{kill_mode}\"\nshutdown_timeout = \"2s\"\n"),
        2,
        "fork-helper-setsid",
    );
    herd.wait_all_ready(2);
    let helpers = helpers(&herd, 2);
    let addr = herd.addr();
    let herd_pid = herd.pid();
    herd_ok(&herd.dir, &["stop"]);
    herd.wait_exit();
    wait_gone("every helper to be gone after herd stop", &helpers);
    let left: Vec<String> = descendants(herd_pid)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    // The next herd can bind the port: no helper holds it.
    let probe = TcpListener::bind(addr);
    assert!(probe.is_ok(), "{addr} is still held: {probe:?}");
}

#[test]
fn herd_stop_leaves_no_descendant_behind() {
    if cgroups_available("herd_stop_leaves_no_descendant_behind") {
        stop_leaves_nothing("stop-nothing-left", "auto");
    }
}

/// Without cgroups herd is still the subreaper of everything its workers
/// fork: helpers that left the process group are reparented to herd when
/// their worker exits, and herd kills them before it exits.
#[test]
fn herd_stop_leaves_no_descendant_behind_with_process_groups_only() {
    stop_leaves_nothing("stop-nothing-left-pg", "process-group");
}

/// herd itself SIGKILLed: its workers die with it (PR_SET_PDEATHSIG), and a
/// helper that left the process group, which nothing could reach then, is
/// killed by the next herd that starts in the same cgroup, so it can bind
/// the port. (Any herd starting in that cgroup may be the one to clean up,
/// another test's too, so this checks the outcome; `cgroup::tests` checks
/// the clean-up itself.)
#[test]
fn the_next_herd_cleans_up_after_a_sigkilled_one() {
    if !cgroups_available("the_next_herd_cleans_up_after_a_sigkilled_one") {
        return;
    }
    let mut herd = start("sigkilled-herd", "", 1, "fork-helper-setsid");
    let worker = herd.wait_ready(1)[&0];
    let helper = helpers(&herd, 1)[0];
    let addr = herd.addr();
    signal(herd.pid(), Signal::SIGKILL);
    herd.wait_exit();
    wait_gone("the worker to die with herd", &[worker]);
    let addr = addr.to_string();
    let next = Herd::start(
        "sigkilled-herd-next",
        &[
            "--listen",
            &addr,
            "--workers",
            "1",
            "--mode",
            "shared",
            "--",
            hello_worker(),
        ],
    );
    next.wait_all_ready(1);
    wait_gone("the old helper to be cleaned up", &[helper]);
    assert!(get(next.addr()).is_ok());
}
