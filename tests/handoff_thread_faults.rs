//! Hand-off threads (`handoff_threads`) under faults and odd workers: a
//! worker that dies or stalls with connections queued from both threads, a
//! worker that does not count per thread (everything goes through thread
//! 0), the Python example, seven threads, a worker that lies on every
//! thread's page counter. (The policies, config, upgrade and stop:
//! tests/handoff_threads.rs.)

mod common;

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use common::load::process_state;
use common::threads::*;
use common::*;
use nix::sys::signal::Signal;
use serde_json::json;

/// Thread 1 sends to workers that count per thread itself, and gives
/// thread 0 everything for workers that do not (`--by-message`: no page).
#[test]
fn the_other_thread_sends_itself_only_to_workers_that_count_per_thread() {
    for (by_message, name) in [(false, "threads-direct"), (true, "threads-forwarded")] {
        let mut command = vec![hello_worker()];
        if by_message {
            command.push("--by-message");
        }
        let herd = Herd::launch(name, Some(TWO), 2, &["--metrics", "127.0.0.1:0"], &command);
        herd.wait_all_ready(2);
        wait_for_two_threads(&herd);
        // One at a time: no channel is ever full, nothing needs forwarding.
        count_pids(herd.addr(), 200);
        let text = scrape_until(&herd, |text| accepted(text) >= 200.0);
        let (accepted_1, forwarded_1) = (thread_accepted(&text, 1), thread_forwarded(&text, 1));
        assert!(accepted_1 > 0.0, "thread 1 accepted none:\n{text}");
        let expected = if by_message { accepted_1 } else { 0.0 };
        assert_eq!(forwarded_1, expected, "by_message = {by_message}:\n{text}");
    }
}

/// The Python example counts each take on its sender's counter: every
/// hand-off of both threads is counted taken, none left in flight.
#[test]
fn the_python_example_counts_each_threads_takes() {
    let worker = python_worker();
    let command = ["python3", worker.as_str()];
    // No stall check within the test's deadline: only the page counts.
    let config = format!("{TWO}[handoff]\nack_timeout = \"60s\"\n");
    let herd = Herd::launch(
        "threads-python",
        Some(&config),
        2,
        &["--metrics", "127.0.0.1:0"],
        &command,
    );
    herd.wait_all_ready(2);
    wait_for_two_threads(&herd);
    count_pids(herd.addr(), 200);
    let counted = |text: &str| {
        sum_of(text, "herd_connections_handed_off_total") >= 200.0
            && sample_of(text, "herd_handoffs_in_flight") == Some(0.0)
    };
    let text = scrape_until(&herd, counted);
    assert!(counted(&text), "not every take was counted:\n{text}");
    assert_eq!(thread_forwarded(&text, 1), 0.0, "{text}");
    assert!(thread_accepted(&text, 1) > 0.0, "{text}");
}

/// Seven threads, the most a page counts receipts for: every thread's
/// takes land on its own counter (none past the page's), all are counted.
#[test]
fn seven_threads_each_count_on_their_own_counter() {
    let config = "handoff_threads = 7\n[handoff]\nack_timeout = \"60s\"\n";
    let herd = launch("threads-seven", config, 2);
    herd.wait_all_ready(2);
    let sent = 700;
    count_pids(herd.addr(), sent);
    let counted = |text: &str| {
        sum_of(text, "herd_connections_handed_off_total") >= sent as f64
            && sample_of(text, "herd_handoffs_in_flight") == Some(0.0)
    };
    let text = scrape_until(&herd, counted);
    assert!(counted(&text), "not every take was counted:\n{text}");
    let busy = (0..7).filter(|&t| thread_accepted(&text, t) > 0.0).count();
    assert!(
        busy >= 6,
        "the kernel spread {sent} over only {busy} of 7 threads:\n{text}"
    );
    for thread in 1..7 {
        assert_eq!(thread_forwarded(&text, thread), 0.0, "{text}");
    }
}

/// A worker that says it counts per thread and writes 2^63 and 0 by turns
/// into every thread's counter: every client is answered, and herd's counts
/// stay within what it sent (nothing handed off twice, nothing in flight
/// below zero).
#[test]
fn a_worker_lying_on_every_threads_counter_breaks_no_count() {
    let fixture = format!(
        "{}/tests/fixtures/page_worker.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let command = ["python3", fixture.as_str(), "lying-threads"];
    let config = format!("{TWO}[handoff]\nack_timeout = \"60s\"\n");
    let flags = ["--metrics", "127.0.0.1:0"];
    let herd = Herd::launch("threads-lies", Some(&config), 2, &flags, &command);
    herd.wait_all_ready(2);
    wait_for_two_threads(&herd);
    let sent = 200;
    let per_pid = count_pids(herd.addr(), sent);
    assert_eq!(per_pid.values().sum::<usize>(), sent, "{per_pid:?}");
    herd.wait_for_worker_output("[worker 0] lied per thread", 1);
    let text = scrape(&herd);
    let handed = sum_of(&text, "herd_connections_handed_off_total");
    let in_flight = sample(&text, "herd_handoffs_in_flight");
    assert!(
        handed <= sent as f64,
        "{handed} handed off of {sent}:\n{text}"
    );
    assert!(
        (0.0..=sent as f64).contains(&in_flight),
        "{in_flight} in flight:\n{text}"
    );
    assert_both_threads_accepted(&herd);
}

/// Sends `count` requests at once, each on a new connection, then reads
/// each answer on its own thread (so one held up holds up nobody);
/// `answered` counts the answers.
fn fire(
    addr: SocketAddr,
    count: usize,
    answered: &Arc<AtomicUsize>,
) -> Vec<JoinHandle<Result<Answer, String>>> {
    let streams: Vec<TcpStream> = (0..count).map(|_| send_request(addr).unwrap()).collect();
    streams
        .into_iter()
        .map(|stream| {
            let answered = answered.clone();
            std::thread::spawn(move || {
                let answer = read_answer(stream, DEADLINE);
                if answer.is_ok() {
                    answered.fetch_add(1, Ordering::SeqCst);
                }
                answer
            })
        })
        .collect()
}

/// Every request is answered, none by `victim`.
fn all_answered_by_others(handles: Vec<JoinHandle<Result<Answer, String>>>, victim: u32) {
    for (i, handle) in handles.into_iter().enumerate() {
        let answer = handle
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("request {i} was not answered: {e}"));
        assert_ne!(answer.pid, victim, "request {i}");
    }
}

/// SIGSTOPs slot `slot`'s worker and waits until it is stopped.
fn stop_worker(herd: &Herd, slot: usize) -> u32 {
    let victim = pids_of(&herd.status())[&slot];
    signal(victim, Signal::SIGSTOP);
    wait_until("the worker to stop", || {
        (process_state(victim) == Some('T')).then_some(())
    });
    victim
}

#[test]
fn connections_queued_from_both_threads_on_a_worker_that_dies_are_served_by_others() {
    let config = format!("{TWO}[handoff]\nack_timeout = \"60s\"\n");
    let herd = launch("threads-queued-death", &config, 3);
    herd.wait_all_ready(3);
    let victim = stop_worker(&herd, 1);
    let sent = 60;
    let answered = Arc::new(AtomicUsize::new(0));
    let handles = fire(herd.addr(), sent, &answered);
    // The others answer theirs; the stopped worker's sit on its channel.
    let text = scrape_until(&herd, |text| {
        let queued = sample_of(text, "herd_handoffs_in_flight").unwrap_or(0.0);
        queued >= 1.0 && answered.load(Ordering::SeqCst) as f64 + queued == sent as f64
    });
    let queued = sample(&text, "herd_handoffs_in_flight");
    assert!(
        queued >= 1.0 && answered.load(Ordering::SeqCst) as f64 + queued == sent as f64,
        "{} answered, expected the rest queued on the stopped worker:\n{text}",
        answered.load(Ordering::SeqCst)
    );
    for thread in 0..2 {
        assert!(thread_accepted(&text, thread) > 0.0, "{text}");
    }
    signal(victim, Signal::SIGKILL);
    all_answered_by_others(handles, victim);
    herd.wait_for_event("requeued", &[("pid", json!(victim))], 1);
}

#[test]
fn connections_queued_from_both_threads_on_a_stalled_worker_are_served_by_others() {
    let config = format!("{TWO}[handoff]\nack_timeout = \"300ms\"\n");
    let herd = launch("threads-queued-stall", &config, 3);
    herd.wait_all_ready(3);
    let victim = stop_worker(&herd, 1);
    let answered = Arc::new(AtomicUsize::new(0));
    let handles = fire(herd.addr(), 60, &answered);
    all_answered_by_others(handles, victim);
    herd.wait_for_event("worker_stalled", &[("slot", json!(1))], 1);
    assert_both_threads_accepted(&herd);
    // Not killed: let it run on, so it ends with herd.
    signal(victim, Signal::SIGCONT);
}
