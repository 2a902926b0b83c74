//! Workers that break the rules: one that refuses every connection, one that
//! closes its channel and keeps running.

mod common;

use std::net::{IpAddr, Ipv4Addr};

use common::*;

fn odd_worker() -> String {
    format!(
        "{}/tests/fixtures/odd_worker.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// A refused connection goes to another worker, never back to the one that
/// refused it (in sticky mode the hash would otherwise pick it again).
#[test]
fn a_refused_connection_goes_to_another_worker() {
    let herd = Herd::launch(
        "nack",
        None,
        2,
        &["--mode", "sticky"],
        &["python3", &odd_worker(), "nack"],
    );
    let ready = herd.wait_ready(2);
    let addr = herd.addr();
    for last in 2..22u8 {
        let answer = get_from(addr, IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))).unwrap();
        assert_eq!(answer.pid, ready[&1], "only slot 1 serves");
    }
    // Slot 0 was offered (and refused) its sticky clients' connections once each.
    let refusals = herd.worker_output("[worker 0] refused").len();
    assert!((1..=20).contains(&refusals), "{refusals} refusals");
}

/// A worker that closes its channel can never get a connection again:
/// herd stops it and starts a fresh one in its slot.
#[test]
fn a_worker_that_closes_its_channel_is_replaced() {
    let herd = Herd::launch(
        "close-channel",
        None,
        2,
        &[],
        &["python3", &odd_worker(), "close-channel"],
    );
    herd.wait_for_worker_output("[worker 0] closed my channel", 1);
    herd.wait_for_event("channel_lost", &[("slot", json!(0))], 1);
    let restarts = herd.wait_for_event("worker_started", &[("slot", json!(0))], 2);
    assert_eq!(restarts.len(), 2);
    // Meanwhile slot 1 serves everything.
    assert_eq!(get(herd.addr()).unwrap().slot, 1);
}
