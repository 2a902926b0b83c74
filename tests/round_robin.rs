//! Round-robin: strict rotation, with the Rust and the Python worker, on
//! several listeners (IPv4 and IPv6).

mod common;

use common::*;

fn exact_rotation(name: &str, worker: &[&str]) {
    let herd = Herd::launch(name, None, 4, &[], worker);
    let ready = herd.wait_ready(4);
    let per_pid = count_pids(herd.addr(), 4000);
    assert_eq!(per_pid.len(), 4, "expected 4 workers, got {per_pid:?}");
    for (pid, count) in &per_pid {
        assert_eq!(
            *count, 1000,
            "worker {pid} got {count} of 4000: {per_pid:?}"
        );
        assert!(
            ready.values().any(|p| p == pid),
            "answer from unknown pid {pid}"
        );
    }
    assert!(herd.stop().success());
}

#[test]
fn rust_workers_get_exactly_1000_of_4000_connections_each() {
    exact_rotation("rr-rust", &[hello_worker()]);
}

#[test]
fn python_workers_get_exactly_1000_of_4000_connections_each() {
    exact_rotation("rr-python", &["python3", &python_worker()]);
}

#[test]
fn several_listeners_ipv4_and_ipv6_share_one_rotation() {
    let herd = Herd::start(
        "rr-listeners",
        &[
            "--listen",
            "127.0.0.1:0",
            "--listen",
            "[::1]:0",
            "--workers",
            "2",
            "--",
            hello_worker(),
        ],
    );
    let addrs = herd.listen_addrs(2);
    assert!(addrs[0].is_ipv4() && addrs[1].is_ipv6(), "{addrs:?}");
    assert!(addrs.iter().all(|a| a.port() != 0));
    herd.wait_ready(2);
    let mut slots = Vec::new();
    for i in 0..8 {
        slots.push(get(addrs[i % 2]).unwrap().slot);
    }
    assert_eq!(
        slots,
        [0, 1, 0, 1, 0, 1, 0, 1],
        "one rotation across both listeners"
    );
}

#[test]
fn keep_alive_requests_stay_on_their_connection() {
    use std::io::{Read, Write};
    let herd = Herd::launch("rr-keepalive", None, 2, &[], &[hello_worker()]);
    herd.wait_ready(2);
    let mut stream = std::net::TcpStream::connect(herd.addr()).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut pids = Vec::new();
    for _ in 0..3 {
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 512];
        let n = stream.read(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        pids.push(parse_answer(&text).unwrap().pid);
    }
    assert!(pids.windows(2).all(|w| w[0] == w[1]), "{pids:?}");
}

#[test]
fn worker_output_is_forwarded_with_its_slot() {
    let herd = Herd::start(
        "rr-output",
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--",
            "sh",
            "-c",
            "echo out-$HERD_WORKER_ID; echo err-$HERD_WORKER_ID >&2; exec \"$0\"",
            hello_worker(),
        ],
    );
    herd.wait_ready(2);
    herd.wait_for_worker_output("[worker 0] out-0", 1);
    herd.wait_for_worker_output("[worker 1] err-1", 1);
}
