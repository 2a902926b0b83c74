//! Counter pages and queued hand-offs (docs/protocol.md, "Counting without
//! messages"), by workers that abuse them: connections sent back (RETURN),
//! returns that are not connections, a page full of lies. herd serves every
//! client all the same, and its counts stay within what it sent.
//! (A queued worker that dies or hangs: tests/faults.rs, whose hello-workers
//! take queued hand-offs.)

mod common;

use common::*;
use serde_json::json;

fn page_worker(mode: &str) -> Vec<String> {
    vec![
        "python3".into(),
        fixture("page_worker.py"),
        mode.to_string(),
    ]
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// herd with metrics and two `page_worker.py MODE` slots.
fn launch(name: &str, mode: &str) -> Herd {
    launch_with(name, mode, None, 2)
}

/// herd with metrics, `config`, and `workers` slots of `page_worker.py MODE`.
fn launch_with(name: &str, mode: &str, config: Option<&str>, workers: usize) -> Herd {
    let command = page_worker(mode);
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    Herd::launch(
        name,
        config,
        workers,
        &["--metrics", "127.0.0.1:0"],
        &command,
    )
}

/// Slot 0 sends back every connection with RETURN: each goes to slot 1
/// and is answered there, none is lost, and herd counts them redispatched.
#[test]
fn connections_a_queued_worker_returns_are_served_by_another() {
    let herd = launch("queued-return", "return-all");
    let ready = herd.wait_ready(2);
    herd.wait_all_ready(2);
    for _ in 0..20 {
        let answer = get(herd.addr()).expect("every connection is answered");
        assert_eq!(answer.pid, ready[&1], "only slot 1 serves");
    }
    herd.wait_for_worker_output("[worker 0] returned 1", 1);
    let metrics = http(metrics_addr(&herd), "GET", "/metrics").2;
    let refused = sample(
        &metrics,
        "herd_connections_redispatched_total{reason=\"refused\"}",
    );
    assert!(refused >= 1.0, "{metrics}");
}

/// Slot 0 answers each connection with three bad RETURNs (a pipe's fd, a
/// listener herd does not have, no fd) before the real one: the bad ones
/// are logged and closed, the real one served by slot 1.
#[test]
fn returns_that_are_not_connections_are_refused_by_name() {
    let herd = launch("queued-junk", "return-junk");
    let ready = herd.wait_ready(2);
    herd.wait_all_ready(2);
    for _ in 0..10 {
        let answer = get(herd.addr()).expect("every connection is answered");
        assert_eq!(answer.pid, ready[&1]);
    }
    herd.wait_for_worker_output("[worker 0] returned junk", 1);
    let bad = herd.wait_for_event("bad_message", &[("slot", json!(0))], 2);
    let text = format!("{bad:?}");
    assert!(text.contains("not a connection from listener"), "{text}");
    assert!(text.contains("without its connection's fd"), "{text}");
    // Logged at the 1st, 2nd, 4th, ... only.
    assert!(herd.events("bad_message", &[]).len() < 12);
}

/// Slot 0 writes huge counters into its page, then smaller ones, and tries
/// to truncate it (the seals refuse). herd's counts stay within what it
/// sent, the worker is still served its share, and herd is unharmed.
#[test]
fn a_page_full_of_lies_cannot_break_herds_counts() {
    let herd = launch("queued-lies", "lying-page");
    herd.wait_ready(2);
    herd.wait_all_ready(2);
    herd.wait_for_worker_output("[worker 0] lied", 1);
    let shrink = herd.worker_output("[worker 0] could not shrink the page");
    assert_eq!(shrink.len(), 1, "{:?}", herd.worker_output("[worker 0]"));
    let mut by = std::collections::BTreeMap::new();
    for _ in 0..40 {
        let answer = get(herd.addr()).expect("every connection is answered");
        *by.entry(answer.pid).or_insert(0) += 1;
    }
    assert_eq!(by.len(), 2, "both workers serve: {by:?}");
    let status = herd.status();
    let handed: u64 = workers_of(&status)
        .iter()
        .map(|w| w["handed_off"].as_u64().unwrap())
        .sum();
    assert!(handed <= 40, "{handed} handed off of 40 sent: {status}");
    let metrics = http(metrics_addr(&herd), "GET", "/metrics").2;
    for slot in 0..2 {
        let open = sample(
            &metrics,
            &format!("herd_worker_open_connections{{slot=\"{slot}\"}}"),
        );
        assert!(open <= 40.0, "slot {slot}: {open} open connections");
    }
    let accepted = sample(&metrics, "herd_connections_accepted_total{listener=\"0\"}");
    assert_eq!(accepted, 40.0, "herd's own accepts are its own count");
}

/// A worker of queued hand-offs sends nothing when it takes a connection.
/// With `max_unacked = 1` it holds one at a time and the other 299 wait in
/// herd's queue: herd must see each take at once (it watches the channel
/// for the room a take makes), not at its next 100 ms tally, which would
/// take 30 s, past `queue_timeout`, and close most of them unserved.
#[test]
fn a_full_worker_is_seen_taking_so_nothing_waits_for_a_tally() {
    let herd = Herd::launch(
        "queued-full",
        Some("[handoff]\nmax_unacked = 1\n"),
        1,
        &[],
        &[hello_worker()],
    );
    herd.wait_all_ready(1);
    let streams: Vec<_> = (0..300)
        .map(|_| send_request(herd.addr()).unwrap())
        .collect();
    let started = std::time::Instant::now();
    let readers: Vec<_> = streams
        .into_iter()
        .map(|stream| std::thread::spawn(move || read_answer(stream, DEADLINE)))
        .collect();
    for reader in readers {
        reader
            .join()
            .unwrap()
            .expect("every queued connection is served");
    }
    eprintln!("300 served one at a time in {:?}", started.elapsed());
    assert!(herd.events("queue_timeout", &[]).is_empty());
}

/// A worker counted ready by `ready_delay` is sent HANDOFFs before it says
/// READY, as to a worker that ACKs; when its READY then asks for queued
/// hand-offs, what was sent counts as queued (it will not ACK them), so
/// herd neither holds those connections nor stops sending to it.
#[test]
fn hand_offs_sent_before_a_late_ready_count_as_queued() {
    let herd = launch_with(
        "queued-late-ready",
        "late-ready",
        Some("ready_delay = \"200ms\"\n"),
        1,
    );
    herd.wait_all_ready(1);
    // Sent while it sleeps, before its READY.
    let early: Vec<_> = (0..2)
        .map(|_| {
            let stream = send_request(herd.addr()).unwrap();
            std::thread::spawn(move || read_answer(stream, DEADLINE))
        })
        .collect();
    for client in early {
        client.join().unwrap().expect("answered once it reads");
    }
    // Past ack_timeout (1 s) since those were sent: a worker that owed ACKs
    // for them would be skipped now, and these would wait for queue_timeout.
    for _ in 0..10 {
        get(herd.addr()).expect("served after its READY");
    }
    let status = herd.status();
    assert_eq!(workers_of(&status)[0]["handed_off"], 12, "{status}");
}

/// A worker that takes its queued hand-offs but never counts them looks,
/// by its page, as if it took nothing: with `hang_timeout` it would be
/// killed as hung. herd asks the kernel first (nothing of its is left on
/// the channel), so it is not, and it keeps getting connections.
#[test]
fn a_worker_that_takes_without_counting_is_not_found_hung() {
    let herd = launch_with(
        "queued-uncounted",
        "uncounted",
        Some("hang_timeout = \"1s\"\n"),
        1,
    );
    let ready = herd.wait_ready(1);
    herd.wait_all_ready(1);
    herd.wait_for_worker_output("[worker 0] taking without counting", 1);
    for _ in 0..5 {
        assert_eq!(get(herd.addr()).expect("served").pid, ready[&0]);
    }
    // A measurement window, not a synchronisation: idle for longer than
    // hang_timeout and herd's check after it, with those 5 uncounted.
    std::thread::sleep(std::time::Duration::from_millis(1600));
    assert_eq!(get(herd.addr()).expect("served").pid, ready[&0]);
    assert!(
        herd.events("worker_hung", &[]).is_empty(),
        "{}",
        herd.log_text()
    );
    assert_eq!(herd.wait_ready(1), ready, "the worker was not replaced");
}

/// Slot 0 says READY for queued hand-offs, then closes its channel and
/// runs on. herd holds its own copy of that end, so no end of file shows
/// it; what was queued there is taken back after `ack_timeout` and served
/// by slot 1, instead of waiting for the worker to exit.
#[test]
fn what_waits_on_a_worker_that_closed_its_channel_is_served_by_another() {
    let herd = launch("queued-closed", "close-channel");
    let ready = herd.wait_ready(2);
    herd.wait_all_ready(2);
    herd.wait_for_worker_output("[worker 0] closed my channel", 1);
    let clients: Vec<_> = (0..10)
        .map(|_| {
            let stream = send_request(herd.addr()).unwrap();
            std::thread::spawn(move || read_answer(stream, DEADLINE))
        })
        .collect();
    for client in clients {
        let answer = client
            .join()
            .unwrap()
            .expect("every connection is answered");
        assert_eq!(answer.pid, ready[&1]);
    }
    herd.wait_for_event("worker_stalled", &[("slot", json!(0))], 1);
    let metrics = http(metrics_addr(&herd), "GET", "/metrics").2;
    let taken_back = sample(
        &metrics,
        "herd_connections_redispatched_total{reason=\"hung\"}",
    );
    assert!(taken_back >= 1.0, "{metrics}");
}
