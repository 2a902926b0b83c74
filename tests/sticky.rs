//! Sticky mode: a client IP keeps its worker slot, across requests and
//! across a restart of that slot's worker.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use common::*;

fn client(i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i))
}

#[test]
fn fifty_clients_each_stay_on_one_worker_and_return_to_their_slot_after_a_restart() {
    let herd = Herd::launch("sticky", None, 4, &["--mode", "sticky"], &[hello_worker()]);
    let ready = herd.wait_ready(4);
    let addr = herd.addr();

    let mut slot_of = BTreeMap::new();
    for i in 0..50 {
        let first = get_from(addr, client(i)).unwrap();
        for _ in 0..4 {
            assert_eq!(
                get_from(addr, client(i)).unwrap(),
                first,
                "client {} moved",
                client(i)
            );
        }
        slot_of.insert(i, first.slot);
    }
    let used: BTreeSet<_> = slot_of.values().collect();
    assert_eq!(
        used.len(),
        4,
        "50 clients should spread over all 4 workers: {slot_of:?}"
    );

    // Kill slot 1's worker; once its replacement is ready, slot 1's clients come back to it.
    let old_pid = ready[&1];
    signal(old_pid, nix::sys::signal::Signal::SIGKILL);
    let ready = herd.wait_for_event("worker_ready", &[], 5);
    let new_pid = number(ready.last().unwrap(), "pid") as u32;
    assert_eq!(number(ready.last().unwrap(), "slot"), 1);
    assert_ne!(new_pid, old_pid);
    for (i, slot) in &slot_of {
        let answer = get_from(addr, client(*i)).unwrap();
        assert_eq!(
            answer.slot,
            *slot,
            "client {} changed slot after the restart",
            client(*i)
        );
        if *slot == 1 {
            assert_eq!(answer.pid, new_pid);
        }
    }
}
