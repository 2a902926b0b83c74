//! Nobody joins herd's socket groups: a second herd started on an address a
//! running herd serves gets "address already in use", whatever the mode,
//! and the first herd keeps all its traffic and its counts.

mod common;

use std::net::{SocketAddr, TcpListener};

use common::*;

fn seed_app() -> String {
    format!(
        "{}/workers/node/cluster-server.js",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// Requests answered by the first herd's workers, out of `count`.
fn served_by(addr: SocketAddr, pids: &std::collections::BTreeSet<u32>, count: usize) -> usize {
    use std::io::{Read, Write};
    (0..count)
        .filter(|_| {
            let mut stream = std::net::TcpStream::connect_timeout(&addr, DEADLINE).unwrap();
            stream.set_read_timeout(Some(DEADLINE)).unwrap();
            stream.write_all(REQUEST).unwrap();
            let mut response = String::new();
            let _ = stream.read_to_string(&mut response);
            response
                .rsplit("Handled by worker ")
                .next()
                .and_then(|pid| pid.trim().parse::<u32>().ok())
                .is_some_and(|pid| pids.contains(&pid))
        })
        .count()
}

/// Node workers under the kernel rotation (a SO_REUSEPORT group and an eBPF
/// program) on a configured listener: a second herd on that address exits
/// 3 before starting any worker.
#[test]
fn a_second_herd_cannot_join_a_kernel_rotation_group() {
    let first = Herd::launch("group-first", None, 2, &[], &["node", &seed_app()]);
    let pids = first.wait_all_ready(2);
    let addr = first.addr();
    let listen = addr.to_string();
    let mut second = Herd::start(
        "group-second",
        &[
            "--listen",
            &listen,
            "--workers",
            "2",
            "--",
            "node",
            &seed_app(),
        ],
    );
    assert_eq!(second.wait_exit().code(), Some(3), "{}", second.log_text());
    // What the user sees; it comes after every event herd logged.
    second.wait_for_error_message("address already in use");
    assert!(second.events("worker_started", &[]).is_empty());
    assert_eq!(served_by(addr, &pids, 20), 20);
}

/// The same where the app says where to listen (no `--listen`): the second
/// herd's worker is told EADDRINUSE, as Node's own primary would tell it.
#[test]
fn a_second_herd_cannot_join_a_group_bound_for_a_node_app() {
    let port = {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port().to_string()
    };
    let first = Herd::start_under(
        &scratch_dir("app-group-first"),
        &["env", &format!("PORT={port}")],
        &["--workers", "2", "--", "node", &seed_app()],
    );
    let pids = first.wait_all_ready(2);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let second = Herd::start_under(
        &scratch_dir("app-group-second"),
        &["env", &format!("PORT={port}")],
        &["--workers", "1", "--", "node", &seed_app()],
    );
    second.wait_for_event("listen_refused", &[("errno", json!("EADDRINUSE"))], 1);
    assert_eq!(served_by(addr, &pids, 20), 20);
}

/// herd workers in `reuseport` mode (one SO_REUSEPORT socket per slot): the
/// second herd is refused too.
#[test]
fn a_second_herd_cannot_join_a_reuseport_group() {
    let first = Herd::launch(
        "reuseport-first",
        None,
        2,
        &["--mode", "reuseport"],
        &[hello_worker()],
    );
    let pids = first.wait_all_ready(2);
    let addr = first.addr();
    let listen = addr.to_string();
    let mut second = Herd::start(
        "reuseport-second",
        &[
            "--listen",
            &listen,
            "--workers",
            "2",
            "--mode",
            "reuseport",
            "--",
            hello_worker(),
        ],
    );
    assert_eq!(second.wait_exit().code(), Some(3), "{}", second.log_text());
    assert_eq!(served_by(addr, &pids, 20), 20);
}
