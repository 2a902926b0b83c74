//! Every mode, above all the OS-scheduled ones: `shared` (every worker inherits the same
//! listening sockets, systemd's LISTEN_FDS) and `reuseport` (one
//! SO_REUSEPORT socket per slot). The example workers run unchanged, herd
//! still supervises, reloads and counts what the workers report, and a
//! plain socket-activated server with no herd code works too.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};

use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;

const REQUESTS: usize = 40;

fn handed_off_total(status: &Value) -> u64 {
    workers_of(status)
        .iter()
        .map(|w| w["handed_off"].as_u64().unwrap_or(0))
        .sum()
}

/// Serves requests, counts them as the workers report them (status and
/// /metrics), refills a killed worker's slot, and reloads to new workers,
/// answering every request throughout.
fn serves_survives_kill_and_reload(name: &str, mode: &str, worker: &[&str]) {
    let herd = Herd::launch(
        name,
        None,
        2,
        &["--mode", mode, "--metrics", "127.0.0.1:0"],
        worker,
    );
    let first = herd.wait_all_ready(2);
    let served = count_pids(herd.addr(), REQUESTS);
    assert!(
        served.keys().all(|pid| first.contains(pid)),
        "{served:?} vs {first:?}"
    );
    // Workers report each connection they accept; herd counts those.
    wait_for_status(&herd.dir, "every connection reported", |s| {
        handed_off_total(s) == REQUESTS as u64
    });
    let metrics = metrics_addr(&herd);
    let (code, _, text) = http(metrics, "GET", "/metrics");
    assert_eq!(code, 200);
    assert_eq!(
        sum_of(&text, "herd_connections_accepted_total"),
        REQUESTS as f64
    );
    assert_eq!(
        sum_of(&text, "herd_connections_handed_off_total"),
        REQUESTS as f64
    );

    // Kill slot 0's worker: the slot is refilled and everything is answered.
    let victim = pids_of(&herd.status())[&0];
    signal(victim, Signal::SIGKILL);
    let after_kill = wait_for_status(&herd.dir, "slot 0 refilled", |s| {
        all_ready(s, 2) && pids_of(s)[&0] != victim
    });
    let survivors: BTreeSet<u32> = pids_of(&after_kill).into_values().collect();
    let served = count_pids(herd.addr(), 20);
    assert!(served.keys().all(|pid| survivors.contains(pid)));

    // A rolling reload replaces both workers.
    let reload = herd.control(&["reload"]);
    assert_eq!(reload.code, Some(0), "{}", reload.stderr);
    let reloaded = herd.wait_all_ready(2);
    assert!(reloaded.is_disjoint(&survivors), "{reloaded:?}");
    let served = count_pids(herd.addr(), 20);
    assert!(
        served.keys().all(|pid| reloaded.contains(pid)),
        "{served:?} vs {reloaded:?}"
    );
    assert!(herd.stop().success());
}

#[test]
fn shared_serves_the_rust_worker_through_kill_and_reload() {
    serves_survives_kill_and_reload("shared-rust", "shared", &[hello_worker()]);
}

#[test]
fn shared_serves_the_python_worker_through_kill_and_reload() {
    let script = python_worker();
    serves_survives_kill_and_reload("shared-python", "shared", &["python3", &script]);
}

#[test]
fn reuseport_serves_the_rust_worker_through_kill_and_reload() {
    serves_survives_kill_and_reload("reuseport-rust", "reuseport", &[hello_worker()]);
}

#[test]
fn reuseport_serves_the_python_worker_through_kill_and_reload() {
    let script = python_worker();
    serves_survives_kill_and_reload("reuseport-python", "reuseport", &["python3", &script]);
}

/// The inode of the socket a process has at `fd`.
fn socket_inode(pid: u32, fd: u32) -> String {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
    let link = link.display().to_string();
    assert!(link.starts_with("socket:["), "{link}");
    link
}

/// Connections that arrive while a slot's worker is stopped wait in the
/// accept queue of the socket herd keeps for the slot; the next worker of
/// that slot gets the very same socket and serves them.
fn queued_connections_survive_a_restart(name: &str, mode: &str) {
    let herd = Herd::launch(name, None, 1, &["--mode", mode], &[hello_worker()]);
    let old = *herd.wait_all_ready(1).first().unwrap();
    let socket = socket_inode(old, 3);
    signal(old, Signal::SIGSTOP);
    let waiting: Vec<TcpStream> = (0..5).map(|_| send_request(herd.addr()).unwrap()).collect();
    signal(old, Signal::SIGKILL);
    let new = wait_for_status(&herd.dir, "a new worker", |s| {
        all_ready(s, 1) && pids_of(s)[&0] != old
    });
    let new = pids_of(&new)[&0];
    assert_eq!(socket_inode(new, 3), socket, "the slot kept its socket");
    for stream in waiting {
        let answer = read_answer(stream, DEADLINE).unwrap();
        assert_eq!(answer.pid, new);
    }
    assert!(herd.stop().success());
}

#[test]
fn reuseport_keeps_a_slots_socket_and_its_queue_across_restarts() {
    queued_connections_survive_a_restart("reuseport-queue", "reuseport");
}

#[test]
fn shared_keeps_the_socket_and_its_queue_across_restarts() {
    queued_connections_survive_a_restart("shared-queue", "shared");
}

/// In reuseport mode every slot has its own socket; in shared mode all
/// workers have the same one.
#[test]
fn reuseport_gives_each_slot_its_own_socket_and_shared_the_same() {
    for (mode, distinct) in [("reuseport", 2), ("shared", 1)] {
        let herd = Herd::launch(
            &format!("sockets-{mode}"),
            None,
            2,
            &["--mode", mode],
            &[hello_worker()],
        );
        let pids = herd.wait_all_ready(2);
        let sockets: BTreeSet<String> = pids.iter().map(|&pid| socket_inode(pid, 3)).collect();
        assert_eq!(sockets.len(), distinct, "{mode}: {sockets:?}");
        // The channel comes right after the listening socket.
        for &pid in &pids {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
            let environ = String::from_utf8_lossy(&environ);
            assert!(environ.contains("HERD_CHANNEL_FD=4\0"), "{environ}");
            assert!(environ.contains("LISTEN_FDS=1\0"));
            assert!(environ.contains("LISTEN_FDNAMES=listen0\0"));
            assert!(environ.contains(&format!("LISTEN_PID={pid}\0")));
        }
        assert!(herd.stop().success());
    }
}

/// One request to the plain socket-activated example; returns its body.
fn plain_get(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect_timeout(&addr, DEADLINE).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.write_all(REQUEST).unwrap();
    // The example keeps the connection open (HTTP/1.1); read the one answer.
    let response = responses::read_one(&mut stream).unwrap();
    assert_eq!(
        (response.version, response.status, response.reason.as_str()),
        (1, 200, "OK"),
        "{response:?}"
    );
    response.body
}

/// A server with no herd code: it refuses to start unless LISTEN_PID is its
/// own pid, and says both pids in every answer. `ready_delay` makes it
/// ready; SIGTERM (it never reads DRAIN) stops it.
#[test]
fn shared_sets_listen_pid_to_each_workers_own_pid() {
    let script = format!(
        "{}/workers/python/socket_activated.py",
        env!("CARGO_MANIFEST_DIR")
    );
    for mode in ["shared", "reuseport"] {
        let herd = Herd::launch(
            &format!("listen-pid-{mode}"),
            None,
            2,
            &["--mode", mode, "--ready-delay", "100ms"],
            &["python3", &script],
        );
        let pids = herd.wait_all_ready(2);
        for _ in 0..10 {
            let body = plain_get(herd.addr());
            let (pid, listen_pid) = body
                .strip_prefix("Handled by worker ")
                .and_then(|rest| rest.strip_suffix(')'))
                .and_then(|rest| rest.split_once(" (LISTEN_PID="))
                .unwrap_or_else(|| panic!("{body}"));
            assert_eq!(pid, listen_pid);
            assert!(pids.contains(&pid.parse().unwrap()), "{body}");
        }
        // A clean stop: SIGTERM ended them, no SIGKILL after shutdown_timeout.
        assert!(herd.stop().success());
    }
}

/// Scaling in `reuseport` binds a new socket for a new slot and closes the
/// sockets of removed slots; every request is answered throughout.
#[test]
fn reuseport_scales_up_and_down() {
    let herd = Herd::launch(
        "reuseport-scale",
        None,
        2,
        &["--mode", "reuseport"],
        &[hello_worker()],
    );
    herd.wait_all_ready(2);
    let scaled = herd.control(&["scale", "3"]);
    assert_eq!(scaled.code, Some(0), "{}", scaled.stderr);
    let three = herd.wait_all_ready(3);
    let sockets: BTreeSet<String> = three.iter().map(|&pid| socket_inode(pid, 3)).collect();
    assert_eq!(sockets.len(), 3, "one socket per slot");
    count_pids(herd.addr(), 30);
    let scaled = herd.control(&["scale", "1"]);
    assert_eq!(scaled.code, Some(0), "{}", scaled.stderr);
    let one = herd.wait_all_ready(1);
    // The removed slots' workers drain and exit, closing the last copies of
    // their sockets.
    herd.wait_for_event("worker_exited", &[("code", json!(0))], 2);
    // With one socket left in the group, every connection reaches the one worker.
    let served = count_pids(herd.addr(), 20);
    assert_eq!(served.keys().copied().collect::<BTreeSet<u32>>(), one);
    assert!(herd.stop().success());
}

/// Scaling down closes the removed slot's socket with connections queued
/// on it (its worker is stopped, so they wait): they move to the socket of
/// the slot that stays, and every one is answered, none reset.
#[test]
fn reuseport_scaling_down_hands_a_removed_slots_queue_to_the_others() {
    let test = "reuseport_scaling_down_hands_a_removed_slots_queue_to_the_others";
    if !require_cap_bpf(test) {
        return;
    }
    let herd = Herd::launch(
        "reuseport-migrate",
        Some("shutdown_timeout = \"1s\"\n"),
        2,
        &["--mode", "reuseport"],
        &[hello_worker()],
    );
    herd.wait_all_ready(2);
    let pids = pids_of(&herd.status());
    let (staying, leaving) = (pids[&0], pids[&1]);
    signal(leaving, Signal::SIGSTOP);
    // The kernel's hash sends about half of them to the stopped worker's queue.
    let waiting: Vec<TcpStream> = (0..20)
        .map(|_| send_request(herd.addr()).unwrap())
        .collect();
    let scaled = herd.control(&["scale", "1"]);
    assert_eq!(scaled.code, Some(0), "{}", scaled.stderr);
    // It never reads DRAIN: killed at shutdown_timeout, closing the socket.
    herd.wait_for_event("worker_exited", &[("pid", json!(leaving))], 1);
    for (n, stream) in waiting.into_iter().enumerate() {
        let answer = read_answer(stream, DEADLINE)
            .unwrap_or_else(|e| panic!("connection {n} was not served: {e}"));
        assert_eq!(answer.pid, staying);
    }
    assert!(herd.stop().success());
}

/// The same check in herd's own hand-off modes, so every mode is covered
/// with both example workers.
#[test]
fn every_hand_off_mode_serves_both_workers_through_kill_and_reload() {
    let script = python_worker();
    for mode in ["round-robin", "sticky", "least-conn"] {
        serves_survives_kill_and_reload(&format!("{mode}-rust"), mode, &[hello_worker()]);
        serves_survives_kill_and_reload(&format!("{mode}-python"), mode, &["python3", &script]);
    }
}
