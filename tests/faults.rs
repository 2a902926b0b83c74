//! Faults on the hand-off path: a hung worker, a worker that dies with
//! connections queued on its channel, a full wait queue, and fd exhaustion
//! in the primary. (Workers killed at random under load: tests/supervision.rs.) In every case herd keeps serving and no
//! accepted connection is lost.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

/// Sends requests on `count` new connections, then reads every answer on its
/// own thread so a hung connection holds up nobody. `answered` counts
/// replies, `refused` connections closed without one.
fn fire_counting(
    addr: SocketAddr,
    count: usize,
    answered: &Arc<AtomicUsize>,
    refused: &Arc<AtomicUsize>,
) -> Vec<JoinHandle<Result<Answer, String>>> {
    let streams: Vec<TcpStream> = (0..count).map(|_| send_request(addr).unwrap()).collect();
    streams
        .into_iter()
        .map(|stream| {
            let (answered, refused) = (answered.clone(), refused.clone());
            std::thread::spawn(move || {
                let answer = read_answer(stream, DEADLINE * 2);
                let counter = if answer.is_ok() { answered } else { refused };
                counter.fetch_add(1, Ordering::SeqCst);
                answer
            })
        })
        .collect()
}

/// Resumes the stopped workers; every connection fired meanwhile is served.
fn resume_and_serve<'a>(
    workers: impl Iterator<Item = &'a u32>,
    handles: Vec<JoinHandle<Result<Answer, String>>>,
) {
    for pid in workers {
        signal(*pid, Signal::SIGCONT);
    }
    for handle in handles {
        handle
            .join()
            .unwrap()
            .expect("every connection is served once the workers resume");
    }
}

fn fire(
    addr: SocketAddr,
    count: usize,
    answered: &Arc<AtomicUsize>,
) -> Vec<JoinHandle<Result<Answer, String>>> {
    fire_counting(addr, count, answered, &Arc::new(AtomicUsize::new(0)))
}

fn wait_count(counter: &AtomicUsize, at_least: usize) {
    let deadline = std::time::Instant::now() + DEADLINE;
    while counter.load(Ordering::SeqCst) < at_least {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {at_least} answered",
            counter.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A worker that says READY and then never reads its channel: it gets at
/// most `max_unacked` connections, everyone else keeps being served, and
/// when it is killed the connections it never acknowledged are served by
/// the others.
#[test]
fn a_hung_worker_is_skipped_and_its_connections_are_served_after_it_dies() {
    let herd = Herd::launch(
        "hung",
        Some("[handoff]\nmax_unacked = 4\nack_timeout = \"60s\"\n"),
        4,
        &[],
        &[hello_worker(), "--stall-slot", "0"],
    );
    let ready = herd.wait_ready(4);
    herd.wait_for_worker_output("[worker 0] stalling on purpose", 1);
    let stalled = ready[&0];
    let addr = herd.addr();

    // 40 connections: strict rotation sends slot 0 one in four until it holds 4 unacknowledged.
    let answered = Arc::new(AtomicUsize::new(0));
    let first_wave = fire(addr, 40, &answered);
    wait_count(&answered, 36);

    // Nothing blocks: sequential requests keep being answered, never by the hung worker.
    for _ in 0..100 {
        assert_ne!(get(addr).unwrap().pid, stalled);
    }
    assert_eq!(
        answered.load(Ordering::SeqCst),
        36,
        "exactly max_unacked connections wait on the hung worker"
    );

    signal(stalled, Signal::SIGKILL);
    for handle in first_wave {
        let answer = handle
            .join()
            .unwrap()
            .expect("every accepted connection is answered");
        assert_ne!(answer.pid, stalled);
    }
    herd.wait_for_event(
        "requeued",
        &[("pid", json!(stalled)), ("requeued", json!(4))],
        1,
    );
}

/// The scenario: SIGSTOP a worker, send connections until some are
/// queued on its channel, SIGKILL it: every one of them still gets its answer.
#[test]
fn connections_queued_on_a_worker_that_dies_before_acknowledging_are_served_by_others() {
    let herd = Herd::launch(
        "stopped",
        Some("[handoff]\nack_timeout = \"60s\"\n"),
        4,
        &[],
        &[hello_worker()],
    );
    let ready = herd.wait_ready(4);
    let victim = ready[&2];
    signal(victim, Signal::SIGSTOP);

    let answered = Arc::new(AtomicUsize::new(0));
    let handles = fire(herd.addr(), 40, &answered);
    // The three running workers answer their 30; slot 2's 10 sit unread on its channel.
    wait_count(&answered, 30);
    assert_eq!(answered.load(Ordering::SeqCst), 30);

    signal(victim, Signal::SIGKILL);
    let mut answers = Vec::new();
    for handle in handles {
        answers.push(
            handle
                .join()
                .unwrap()
                .expect("every accepted connection is answered"),
        );
    }
    assert!(answers.iter().all(|a| a.pid != victim));
    herd.wait_for_event(
        "requeued",
        &[("pid", json!(victim)), ("requeued", json!(10))],
        1,
    );
}

/// With its fd limit lowered, herd runs out of descriptors while workers are
/// frozen: it logs once, pauses accepting without spinning, and once the
/// workers resume every connection is served.
#[test]
fn fd_exhaustion_pauses_accepting_and_loses_nothing() {
    // Workers that ACK: herd holds what it sent them until they do (what
    // it queues to a worker that takes queued hand-offs holds none of
    // herd's fds: the next test).
    let herd = Herd::launch("emfile", None, 2, &[], &[hello_worker(), "--by-message"]);
    let ready = herd.wait_ready(2);
    let addr = herd.addr();
    squeeze_fds(herd.pid(), 10);
    for pid in ready.values() {
        signal(*pid, Signal::SIGSTOP);
    }

    // 30 connections while no worker reads: herd can hold about 10, then accept fails.
    let answered = Arc::new(AtomicUsize::new(0));
    let handles = fire(addr, 30, &answered);
    herd.wait_for_event("accept_paused", &[], 1);

    resume_and_serve(ready.values(), handles);
    let pauses = herd.events("accept_paused", &[]).len();
    assert!(
        pauses <= 3,
        "logged {pauses} times: should log once per episode, not per retry"
    );
    assert!(get(addr).is_ok());
}

/// The same squeeze with workers that take queued hand-offs: herd closes
/// its copy of each connection once it is queued on a worker's channel, so
/// 150 connections to frozen workers, more than the 100 fds herd has left,
/// cost it none once sent (at most a batch, 32, while it sends them); it
/// never runs out, and once the workers resume every connection is served.
/// (The metrics endpoint that tells how many are queued wants 64 fds free.)
#[test]
fn queued_hand_offs_to_frozen_workers_hold_none_of_herds_fds() {
    let herd = Herd::launch(
        "queued-fds",
        Some("[handoff]\nmax_unacked = 100\n"),
        2,
        &["--metrics", "127.0.0.1:0"],
        &[hello_worker()],
    );
    let ready = herd.wait_ready(2);
    herd.wait_all_ready(2);
    let addr = herd.addr();
    let metrics = metrics_addr(&herd);
    let before = open_fds(herd.pid());
    squeeze_fds(herd.pid(), 100);
    for pid in ready.values() {
        signal(*pid, Signal::SIGSTOP);
    }
    let answered = Arc::new(AtomicUsize::new(0));
    let handles = fire(addr, 150, &answered);
    wait_until("150 connections queued to the frozen workers", || {
        let text = http(metrics, "GET", "/metrics").2;
        (sample(&text, "herd_handoffs_in_flight") == 150.0).then_some(())
    });
    let held = open_fds(herd.pid());
    assert!(
        held <= before + 2,
        "herd holds {held} fds with 150 connections queued, {before} before"
    );
    resume_and_serve(ready.values(), handles);
    assert_eq!(answered.load(Ordering::SeqCst), 150);
    assert!(herd.events("accept_paused", &[]).is_empty());
}

/// When no worker can take a connection it waits in a bounded queue; past
/// the bound new connections are closed at once (and logged), the primary
/// neither blocks nor grows, and the queued ones are served once workers can.
#[test]
fn past_the_queue_bound_new_connections_are_closed_and_queued_ones_served() {
    let herd = Herd::launch(
        "queue",
        Some("[handoff]\nmax_unacked = 1\nack_timeout = \"60s\"\nqueue_limit = 5\n"),
        2,
        &[],
        &[hello_worker()],
    );
    let ready = herd.wait_ready(2);
    for pid in ready.values() {
        signal(*pid, Signal::SIGSTOP);
    }
    // 2 in flight (one per frozen worker), 5 queued, 13 closed.
    let (answered, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let handles = fire_counting(herd.addr(), 20, &answered, &refused);
    wait_count(&refused, 13);
    herd.wait_for_event("queue_full", &[], 1);
    for pid in ready.values() {
        signal(*pid, Signal::SIGCONT);
    }
    let served = handles
        .into_iter()
        .filter_map(|h| h.join().unwrap().ok())
        .count();
    assert_eq!(served, 7);
    assert_eq!(refused.load(Ordering::SeqCst), 13);
}
