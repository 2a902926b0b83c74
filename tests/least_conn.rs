//! Least-connections dispatch: new connections go to the worker holding the
//! fewest, which workers report with CLOSED (the Rust library and the
//! Python example both do).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;

/// One worker holds 10 idle keep-alive connections; after a second worker
/// joins, every new connection goes to the idle one (round-robin would
/// alternate).
fn routes_away_from_the_busy_worker(name: &str, worker: &[&str]) {
    let herd = Herd::launch(name, None, 1, &["--mode", "least-conn"], worker);
    herd.wait_all_ready(1);
    let mut idle = Vec::new();
    for _ in 0..10 {
        let mut stream = TcpStream::connect(herd.addr()).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 512];
        let n = stream.read(&mut buf).unwrap();
        assert_eq!(
            parse_answer(&String::from_utf8_lossy(&buf[..n]))
                .unwrap()
                .slot,
            0
        );
        idle.push(stream);
    }
    let output = herd.control(&["scale", "2"]);
    assert_eq!(output.code, Some(0), "{}", output.stderr);
    herd.wait_all_ready(2);
    for i in 0..20 {
        assert_eq!(
            get(herd.addr()).unwrap().slot,
            1,
            "request {i} went to the busy worker"
        );
    }
    // Once the idle connections close, the load evens out again.
    drop(idle);
    let deadline = std::time::Instant::now() + DEADLINE;
    while get(herd.addr()).unwrap().slot != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "slot 0 never got work again"
        );
    }
}

#[test]
fn least_conn_routes_away_from_a_worker_holding_idle_connections_rust() {
    routes_away_from_the_busy_worker("least-conn-rust", &[hello_worker()]);
}

#[test]
fn least_conn_routes_away_from_a_worker_holding_idle_connections_python() {
    routes_away_from_the_busy_worker("least-conn-python", &["python3", &python_worker()]);
}
