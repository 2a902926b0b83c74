//! Issue 17, point 4: herd as a good PID 1 (a container's entrypoint) and
//! as the subreaper it always is: an orphan a worker leaves (a double
//! fork: the child's parent exits first) is re-parented to herd, and when
//! it exits herd reaps it, so no zombie stays, and logs it
//! (`orphan_reaped`, rate-limited). As PID 1 in a PID namespace of its own
//! (`unshare --pid --fork`, what a container runtime does), herd still
//! stops gracefully on SIGTERM, which the kernel delivers to PID 1 only
//! because herd handles it.

mod common;

use common::*;
use nix::sys::signal::Signal;

/// A worker that double-forks: a subshell starts `sleep` in the background
/// and exits at once, so `sleep` is orphaned; it says the orphan's pid,
/// then becomes the hello-worker.
fn double_forking_worker() -> Vec<String> {
    let script = format!(
        "( sleep 0.3 & echo \"orphan=$!\" ) ; exec {}",
        hello_worker()
    );
    vec!["sh".into(), "-c".into(), script]
}

/// The orphan's pid, as the worker said it (in the worker's PID namespace).
fn orphan_pid(herd: &Herd) -> u64 {
    let line = herd.wait_for_worker_output("orphan=", 1).remove(0);
    field(&line, "orphan")
}

#[test]
fn an_orphan_a_worker_leaves_is_reaped_and_logged() {
    let command = double_forking_worker();
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let herd = Herd::launch("pid1-orphan", None, 1, &[], &command);
    herd.wait_ready(1);
    let orphan = orphan_pid(&herd);
    let reaped = herd.wait_for_event("orphan_reaped", &[("pid", json!(orphan))], 1);
    assert_eq!(reaped[0]["total"], json!(1));
    // Reaped: gone, not a zombie under herd.
    assert!(!std::path::Path::new(&format!("/proc/{orphan}")).exists());
    let zombies: Vec<u32> = procs::descendants(herd.pid())
        .iter()
        .filter(|p| p.state == 'Z')
        .map(|p| p.pid)
        .collect();
    assert!(zombies.is_empty(), "zombies under herd: {zombies:?}");
    assert!(herd.stop().success());
}

/// Whether this machine lets the test make a PID namespace (`unshare`,
/// CAP_SYS_ADMIN); if not, `test` is skipped (outside CI).
fn pid_namespaces(test: &str) -> bool {
    let unshare = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .status();
    let can = unshare.is_ok_and(|s| s.success());
    if !can {
        skip_unless_ci(
            test,
            "needs unshare (util-linux) and CAP_SYS_ADMIN for a PID namespace",
        );
    }
    can
}

#[test]
fn as_pid_1_herd_reaps_orphans_and_stops_on_sigterm() {
    let test = "as_pid_1_herd_reaps_orphans_and_stops_on_sigterm";
    if !pid_namespaces(test) {
        return;
    }
    let dir = scratch_dir("pid1-namespace");
    let command = double_forking_worker();
    let mut args = vec!["--listen", "127.0.0.1:0", "--workers", "1", "--"];
    args.extend(command.iter().map(String::as_str));
    let prefix = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"];
    let mut herd = Herd::start_under(&dir, &prefix, &args);
    herd.wait_ready(1);
    // herd is PID 1 in there: the orphan is re-parented to it and reaped.
    let orphan = orphan_pid(&herd);
    herd.wait_for_event("orphan_reaped", &[("pid", json!(orphan))], 1);
    let listening = herd.wait_for_event("starting_workers", &[], 1);
    assert!(!listening.is_empty());
    let (code, _, body) = http(herd.addr(), "GET", "/");
    assert_eq!(code, 200, "{body}");
    // SIGTERM to PID 1 (herd, the child of `unshare`): a graceful stop.
    let namespace_init = wait_until("herd under unshare", || {
        procs::descendants(herd.pid()).first().map(|p| p.pid)
    });
    signal(namespace_init, Signal::SIGTERM);
    herd.wait_for_event("stopped", &[], 1);
    assert!(herd.wait_exit().success(), "{}", herd.log_text());
}

/// Two herds in one cgroup, one of them PID 1 in a namespace of its own (as
/// in containers that share the host's cgroup hierarchy): the namespaced
/// one cannot see the other's pid, so it must not take the other's worker
/// cgroups for a dead herd's leftovers and kill them.
#[test]
fn a_herd_in_another_pid_namespace_leaves_this_ones_workers_alone() {
    let test = "a_herd_in_another_pid_namespace_leaves_this_ones_workers_alone";
    if !pid_namespaces(test) {
        return;
    }
    let first = Herd::launch("pid1-neighbour", None, 2, &[], &[hello_worker()]);
    let workers = first.wait_all_ready(2);
    let dir = scratch_dir("pid1-namespaced-neighbour");
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--",
        hello_worker(),
    ];
    let prefix = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"];
    let second = Herd::start_under(&dir, &prefix, &args);
    second.wait_ready(1);
    assert!(
        second.events("previous_run_killed", &[]).is_empty(),
        "{}",
        second.log_text()
    );
    // The first herd's workers are the same processes, still serving.
    assert_eq!(first.wait_all_ready(2), workers);
    let (code, _, _) = http(first.addr(), "GET", "/");
    assert_eq!(code, 200);
    let namespace_init = wait_until("herd under unshare", || {
        procs::descendants(second.pid()).first().map(|p| p.pid)
    });
    signal(namespace_init, Signal::SIGTERM);
    let mut second = second;
    assert!(second.wait_exit().success());
    assert!(first.stop().success());
}
