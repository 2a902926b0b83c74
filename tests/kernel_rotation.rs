//! Kernel rotation for workers that take an inherited socket
//! (`--mode round-robin --rotation kernel`): each slot has its own
//! SO_REUSEPORT socket and herd's eBPF program deals new connections to the
//! ready slots strictly in turn. What waits on a dead or stalled slot's
//! socket moves to the others; a stalled slot loses its turns for a
//! probation. `reuseport` mode deals by hash over the ready slots, counted.
//!
//! Every test here but the `herd check` one needs CAP_BPF: without it herd
//! hands off instead, and none of this would be seen.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// `count` sequential GETs, each on a new connection; the pids, in order.
fn pids_in_order(addr: SocketAddr, count: usize) -> Vec<u32> {
    (0..count)
        .map(|i| pids::get_pid(addr, DEADLINE).unwrap_or_else(|e| panic!("request {i}: {e}")))
        .collect()
}

fn kernel_dealt(status: &Value) -> u64 {
    status["kernel_dealt"].as_u64().expect("kernel_dealt")
}

/// slot → connections counted for it.
fn handed_off_by_slot(status: &Value) -> BTreeMap<usize, u64> {
    workers_of(status)
        .iter()
        .map(|w| {
            (
                w["slot"].as_u64().unwrap() as usize,
                w["handed_off"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Both events name the slot whose queue moved (or was skipped); either
/// may come first, depending on whether the stall detector beat the kill.
fn queue_moved_or_stalled(herd: &Herd, slot: usize) -> Vec<Value> {
    let fields = [("slot", json!(slot))];
    let mut seen = herd.events("slot_queue_moved", &fields);
    seen.extend(herd.events("slot_stalled", &fields));
    seen
}

/// Every slot skipped so far has been dealt to again (each `slot_stalled`
/// has its `slot_resumed`).
fn no_slot_skipped(herd: &Herd) -> bool {
    herd.events("slot_stalled", &[]).len() == herd.events("slot_resumed", &[]).len()
}

/// A worker made ready by a delay may not accept yet when the delay is
/// over (python starting on a loaded machine): the first connection dealt
/// to it waits, the slot is found stalled, skipped for a probation and its
/// queue moved on, as herd means it to. Serve until every worker has
/// answered and no slot is skipped, so that what follows sees the steady
/// deal. Returns how many connections it sent.
fn warm_up(herd: &Herd, workers: &BTreeSet<u32>) -> u64 {
    let mut seen = BTreeSet::new();
    let mut sent = 0;
    while seen != *workers {
        assert!(sent < 50, "warm-up: only {seen:?} of {workers:?} answered");
        wait_until("every skipped slot dealt to again", || {
            no_slot_skipped(herd).then_some(())
        });
        seen.insert(
            pids::get_pid(herd.addr(), DEADLINE).unwrap_or_else(|e| panic!("warm-up: {e}")),
        );
        sent += 1;
    }
    wait_until("every skipped slot dealt to again", || {
        no_slot_skipped(herd).then_some(())
    });
    sent
}

/// Polls status until `accept` likes it, at most `DEADLINE`; fails with
/// the last status and herd's log (a stall shows there).
fn wait_for_counts(herd: &Herd, what: &str, accept: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let status = status_json(&herd.dir);
        if accept(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last status: {status:#}\nlog:\n{}",
            herd.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The counts once every one of `sent` connections so far is counted,
/// once each: a connection moved off a stalled slot is not dealt (nor
/// counted) again, herd workers report each one they accept once, and a
/// server that reports nothing is counted by what the kernel dealt.
fn settled_counts(herd: &Herd, sent: u64) -> Value {
    wait_for_counts(herd, "the warm-up counted", |s| {
        kernel_dealt(s) == sent && handed_off_by_slot(s).values().sum::<u64>() == sent
    })
}

/// Three workers, 30 sequential connections: the kernel deals them to the
/// slots strictly in turn, and herd counts each once, per slot (herd
/// workers report ACCEPTED; for others herd reads the program's counts).
fn strict_turns(name: &str, flags: &[&str], worker: &[&str]) {
    if !require_cap_bpf(&format!("strict_turns {name}")) {
        return;
    }
    let mut args = vec!["--rotation", "kernel"];
    args.extend_from_slice(flags);
    let herd = Herd::launch(name, None, 3, &args, worker);
    let ready = herd.wait_all_ready(3);
    let sent = warm_up(&herd, &ready);
    let before = settled_counts(&herd, sent);
    let (dealt, counted) = (kernel_dealt(&before), handed_off_by_slot(&before));
    let pids = pids_in_order(herd.addr(), 30);
    let first: BTreeSet<u32> = pids[..3].iter().copied().collect();
    assert_eq!(first, ready, "a turn goes round every worker: {pids:?}");
    for (i, pid) in pids.iter().enumerate() {
        assert_eq!(*pid, pids[i % 3], "turn {i} broke the cycle: {pids:?}");
    }
    // The program's counts are read every 100 ms: wait for them.
    wait_for_counts(&herd, "30 more dealt, 10 more per slot", |s| {
        let now = handed_off_by_slot(s);
        kernel_dealt(s) == dealt + 30 && counted.iter().all(|(slot, n)| now[slot] == n + 10)
    });
    assert!(herd.stop().success());
}

#[test]
fn the_rust_worker_takes_strict_turns_dealt_by_the_kernel() {
    strict_turns("kturns-rust", &[], &[hello_worker()]);
}

#[test]
fn the_python_herd_worker_takes_strict_turns_dealt_by_the_kernel() {
    strict_turns("kturns-python", &[], &["python3", &python_worker()]);
}

#[test]
fn a_plain_socket_activated_server_takes_strict_turns_counted_by_herd() {
    let script = pids::socket_activated();
    strict_turns(
        "kturns-plain",
        &["--ready", "delay:300ms"],
        &["python3", &script],
    );
}

/// A worker that stops, then dies, with connections dealt to it waiting on
/// its socket: they move to the other slot (by the stall detector or on
/// the death, whichever is first) or reach its replacement; none is reset.
#[test]
fn a_dying_workers_queue_is_served_by_the_others() {
    if !require_cap_bpf("a_dying_workers_queue_is_served_by_the_others") {
        return;
    }
    let script = pids::socket_activated();
    let herd = Herd::launch(
        "kdying",
        None,
        2,
        &["--rotation", "kernel", "--ready", "delay:300ms"],
        &["python3", &script],
    );
    let ready = herd.wait_all_ready(2);
    let sent = warm_up(&herd, &ready);
    let before = handed_off_by_slot(&settled_counts(&herd, sent))[&1];
    let victim = pids_of(&herd.status())[&1];
    signal(victim, Signal::SIGSTOP);
    let waiting: Vec<TcpStream> = (0..6)
        .map(|i| send_request(herd.addr()).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    // Turns alternate, so about half were dealt to the stopped worker
    // (fewer if it was found stalled before all six were sent).
    wait_for_counts(&herd, "some dealt to slot 1", |s| {
        handed_off_by_slot(s)[&1] > before
    });
    // SIGKILL ends a stopped process too.
    signal(victim, Signal::SIGKILL);
    for (i, stream) in waiting.into_iter().enumerate() {
        let pid = pids::answer_pid(stream, DEADLINE)
            .unwrap_or_else(|e| panic!("connection {i} was not served: {e}"));
        assert_ne!(pid, victim, "connection {i}");
    }
    let moved = wait_until("slot 1's queue moved on", || {
        Some(queue_moved_or_stalled(&herd, 1)).filter(|seen| !seen.is_empty())
    });
    assert!(moved.iter().all(|e| number(e, "slot") == 1), "{moved:?}");
    assert!(herd.stop().success());
}

/// How often `event` was logged for `slot` so far.
fn count_for_slot(herd: &Herd, event: &str, slot: usize) -> usize {
    herd.events(event, &[("slot", json!(slot))]).len()
}

/// A stopped worker keeps no turns: what was dealt to it moves to slot 0
/// once it is found stalled, it is skipped for a probation, and once it
/// runs again and the probation is over it takes its turns again.
#[test]
fn a_stalled_worker_loses_its_turns_until_it_recovers() {
    if !require_cap_bpf("a_stalled_worker_loses_its_turns_until_it_recovers") {
        return;
    }
    let herd = Herd::launch(
        "kstalled",
        None,
        2,
        &["--rotation", "kernel"],
        &[hello_worker()],
    );
    herd.wait_all_ready(2);
    let pids = pids_of(&herd.status());
    let (healthy, stalled) = (pids[&0], pids[&1]);
    signal(stalled, Signal::SIGSTOP);
    // Well within 5 s: a stall is found after 3 samples of 100 ms.
    for i in 0..20 {
        let pid = pids::get_pid(herd.addr(), Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("request {i}: {e}\n{}", herd.log_text()));
        assert_eq!(
            pid, healthy,
            "request {i}: the stopped worker cannot answer"
        );
    }
    herd.wait_for_event("slot_stalled", &[("slot", json!(1))], 1);
    signal(stalled, Signal::SIGCONT);
    // Each probation may have ended while it was still stopped (then it is
    // dealt to, stalls again, a longer probation); wait until every stall
    // so far has been followed by its resume.
    wait_until("slot 1 resumed after its last stall", || {
        let stalls = count_for_slot(&herd, "slot_stalled", 1);
        (count_for_slot(&herd, "slot_resumed", 1) >= stalls).then_some(())
    });
    let back = (0..10).any(|i| {
        let pid =
            pids::get_pid(herd.addr(), DEADLINE).unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert!(pid == healthy || pid == stalled, "request {i}: pid {pid}");
        pid == stalled
    });
    assert!(
        back,
        "slot 1's worker got no turn in 10:\n{}",
        herd.log_text()
    );
    assert!(herd.stop().success());
}

/// `reuseport` with the program: the kernel's hash picks among the ready
/// slots, and herd counts per slot what a server that reports nothing
/// took: exactly what each answered.
#[test]
fn reuseport_counts_each_slots_connections() {
    if !require_cap_bpf("reuseport_counts_each_slots_connections") {
        return;
    }
    let script = pids::socket_activated();
    let herd = Herd::launch(
        "kreuseport",
        None,
        2,
        &["--mode", "reuseport", "--ready", "delay:300ms"],
        &["python3", &script],
    );
    let ready = herd.wait_all_ready(2);
    let sent = warm_up(&herd, &ready);
    let before = settled_counts(&herd, sent);
    let (dealt, counted) = (kernel_dealt(&before), handed_off_by_slot(&before));
    let mut answered: BTreeMap<u32, u64> = BTreeMap::new();
    for pid in pids_in_order(herd.addr(), 20) {
        *answered.entry(pid).or_insert(0) += 1;
    }
    let total: u64 = counted.values().sum();
    let status = wait_for_counts(&herd, "20 more counted", |s| {
        kernel_dealt(s) == dealt + 20 && handed_off_by_slot(s).values().sum::<u64>() == total + 20
    });
    assert!(all_ready(&status, 2), "{status:#}");
    let now = handed_off_by_slot(&status);
    for (slot, pid) in pids_of(&status) {
        let served = answered.get(&pid).copied().unwrap_or(0);
        assert_eq!(
            now[&slot] - counted[&slot],
            served,
            "slot {slot} (pid {pid}): {answered:?}"
        );
    }
    assert!(herd.stop().success());
}

/// `herd check` with `args`; its exit code and what it printed.
fn check(name: &str, args: &[&str]) -> CliRun {
    let dir = scratch_dir(name);
    let mut full = vec!["check", "--listen", "127.0.0.1:0"];
    full.extend_from_slice(args);
    let run = herd_cli(&dir, &full);
    let _ = std::fs::remove_dir_all(&dir);
    run
}

/// Kernel rotation is round-robin's only; `herd check` says which
/// configurations get turns dealt by the kernel.
#[test]
fn check_refuses_kernel_rotation_outside_round_robin_and_says_who_gets_it() {
    for mode in ["sticky", "least-conn", "shared", "reuseport"] {
        let run = check(
            "kcheck-mode",
            &["--rotation", "kernel", "--mode", mode, "--", hello_worker()],
        );
        assert_eq!(run.code, Some(1), "{mode}: {run:?}");
        assert!(
            run.stderr.contains("kernel rotation is round-robin's"),
            "{mode}: {run:?}"
        );
    }
    let script = pids::socket_activated();
    let kernel = " mode round-robin (turns dealt by the kernel over one socket per slot)";
    let cases: [(&[&str], bool); 3] = [
        // `auto` picks the kernel for a server ready by notify...
        (&["--ready", "notify", "--", "python3", &script], true),
        // ...but herd-protocol workers keep hand-offs unless told.
        (&["--", hello_worker()], false),
        (&["--rotation", "kernel", "--", hello_worker()], true),
    ];
    for (args, dealt_by_kernel) in cases {
        let run = check("kcheck-ok", args);
        assert_eq!(run.code, Some(0), "{args:?}: {run:?}");
        let first = run.stdout.lines().next().unwrap_or_default();
        assert!(first.starts_with("config OK: "), "{args:?}: {run:?}");
        assert_eq!(
            first.ends_with(kernel),
            dealt_by_kernel,
            "{args:?}: {first}"
        );
    }
}

/// Scaling down under kernel rotation: the removed slot leaves the turns,
/// and the two that stay alternate strictly.
#[test]
fn scaling_down_keeps_strict_turns_over_the_slots_that_stay() {
    if !require_cap_bpf("scaling_down_keeps_strict_turns_over_the_slots_that_stay") {
        return;
    }
    let herd = Herd::launch(
        "kscale",
        None,
        3,
        &["--rotation", "kernel"],
        &[hello_worker()],
    );
    herd.wait_all_ready(3);
    let removed = pids_of(&herd.status())[&2];
    let scaled = herd.control(&["scale", "2"]);
    assert_eq!(scaled.code, Some(0), "{}", scaled.stderr);
    let staying = herd.wait_all_ready(2);
    // It reads DRAIN, finishes and exits: out of the turns before that.
    herd.wait_for_event("worker_exited", &[("pid", json!(removed))], 1);
    let pids = pids_in_order(herd.addr(), 20);
    let served: BTreeSet<u32> = pids.iter().copied().collect();
    assert_eq!(served, staying, "{pids:?}");
    assert!(
        pids.windows(2).all(|pair| pair[0] != pair[1]),
        "strict alternation: {pids:?}"
    );
    assert!(herd.stop().success());
}

/// `herd_connections_accepted_total` for a server that reports nothing.
fn accepted_total(herd: &Herd) -> u64 {
    let (code, _, text) = http(metrics_addr(herd), "GET", "/metrics");
    assert_eq!(code, 200);
    sum_of(&text, "herd_connections_accepted_total") as u64
}

/// A connection moved off a stalled slot is one connection: counted once
/// as accepted and dealt, for the slot first dealt it, and as redispatched
/// (`slot-queue`).
#[test]
fn a_moved_connection_is_counted_once() {
    if !require_cap_bpf("a_moved_connection_is_counted_once") {
        return;
    }
    let script = pids::socket_activated();
    let herd = Herd::launch(
        "kcounted",
        None,
        2,
        &[
            "--rotation",
            "kernel",
            "--ready",
            "delay:300ms",
            "--metrics",
            "127.0.0.1:0",
        ],
        &["python3", &script],
    );
    let ready = herd.wait_all_ready(2);
    let sent = warm_up(&herd, &ready);
    let before = settled_counts(&herd, sent);
    let (dealt, counted) = (kernel_dealt(&before), handed_off_by_slot(&before));
    let accepted = accepted_total(&herd);
    let moved_before = herd.events("slot_queue_moved", &[]).len();
    let redispatched_before = redispatched(&herd);
    let pids = pids_of(&before);
    signal(pids[&1], Signal::SIGSTOP);
    // Turns alternate: the second is dealt to the stopped worker, found
    // stalled and moved to slot 0; the rest go to slot 0 while it is skipped.
    for i in 0..6 {
        let pid =
            pids::get_pid(herd.addr(), DEADLINE).unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(pid, pids[&0], "request {i}");
    }
    let moved: u64 = herd.events("slot_queue_moved", &[])[moved_before..]
        .iter()
        .map(|e| number(e, "moved"))
        .sum();
    assert!(moved > 0, "{}", herd.log_text());
    // The program does not count a moved connection again.
    let status = wait_for_counts(&herd, "every deal read", |s| kernel_dealt(s) == dealt + 6);
    signal(pids[&1], Signal::SIGCONT);
    let now = handed_off_by_slot(&status);
    assert_eq!(accepted_total(&herd) - accepted, 6, "six connections");
    assert_eq!(now[&1] - counted[&1], moved, "slot 1 was dealt what moved");
    assert_eq!(now[&0] - counted[&0], 6 - moved, "slot 0 the rest");
    assert_eq!(redispatched(&herd) - redispatched_before, moved);
}

/// `herd_connections_redispatched_total{reason="slot-queue"}`.
fn redispatched(herd: &Herd) -> u64 {
    let (_, _, text) = http(metrics_addr(herd), "GET", "/metrics");
    sample(
        &text,
        "herd_connections_redispatched_total{reason=\"slot-queue\"}",
    ) as u64
}

/// A worker that stays stopped stalls again at every return from its
/// probation: once that has gone on for `hang_timeout` it is hung, killed
/// and replaced, and the replacement takes its turns; no request fails.
#[test]
fn a_worker_stalled_for_hang_timeout_is_killed_and_replaced() {
    if !require_cap_bpf("a_worker_stalled_for_hang_timeout_is_killed_and_replaced") {
        return;
    }
    let herd = Herd::launch(
        "khung",
        Some("hang_timeout = \"2s\"\n"),
        2,
        &["--rotation", "kernel"],
        &[hello_worker()],
    );
    let ready = herd.wait_all_ready(2);
    let pids = pids_of(&herd.status());
    let (healthy, stopped) = (pids[&0], pids[&1]);
    warm_up(&herd, &ready);
    signal(stopped, Signal::SIGSTOP);
    // Requests keep it dealt to at each return, until it is found hung.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sent = 0;
    while herd.events("slot_hung", &[("slot", json!(1))]).is_empty() {
        assert!(
            Instant::now() < deadline && sent < 20_000,
            "never hung:\n{}",
            herd.log_text()
        );
        let pid = pids::get_pid(herd.addr(), Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("request {sent}: {e}\n{}", herd.log_text()));
        assert_eq!(pid, healthy, "request {sent}");
        sent += 1;
    }
    herd.wait_for_event("hung_worker_killed", &[("slot", json!(1))], 1);
    let replaced = wait_until("slot 1 replaced and ready", || {
        let status = herd.status();
        // Between the kill and the replacement the slot has no pid.
        let row = &workers_of(&status)[1];
        let pid = row["pid"].as_u64()? as u32;
        (pid != stopped && row["state"] == "ready").then_some(pid)
    });
    let served: BTreeSet<u32> = pids_in_order(herd.addr(), 10).into_iter().collect();
    assert_eq!(served, BTreeSet::from([healthy, replaced]));
    assert!(herd.stop().success());
}
