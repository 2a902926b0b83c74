//! Workers that send herd the worst they can: a Node worker flooding its
//! channel, a Node app opening hundreds of servers, a worker sending
//! oversized messages, stray fds and unknown ids by the thousand, workers
//! that refuse every connection, a worker that reports a connection closed
//! that it was never sent. herd stays small, quiet and idle, and keeps
//! serving the others.

mod common;

use std::time::{Duration, Instant};

use common::procs::status_field;
use common::*;

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// herd's resident memory, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status_field(&status, "VmRSS:").unwrap() << 10
}

/// herd's CPU time so far (user + system), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// One request on a new connection; the pid that answered.
fn answered_by(addr: std::net::SocketAddr) -> Result<u32, String> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, DEADLINE).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(REQUEST).map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| e.to_string())?;
    response
        .rsplit("Handled by worker ")
        .next()
        .and_then(|pid| pid.trim().parse().ok())
        .ok_or_else(|| format!("unexpected response {response:?}"))
}

/// A Node cluster worker writing its channel full of tiny lines as fast as
/// it can (48 MiB of them): herd reads a bounded amount per wakeup and
/// parses as it goes, so its memory stays flat, and the other worker keeps
/// being handed connections meanwhile.
#[test]
fn a_flooding_node_worker_neither_grows_herd_nor_starves_the_others() {
    let script = format!(
        "if [ \"$HERD_WORKER_ID\" = 0 ]; then exec python3 {flood:?} 48; fi; exec node {app:?}",
        flood = fixture("node_ipc_flood.py"),
        app = fixture("node/flood.js"),
    );
    let herd = Herd::launch(
        "node-flood",
        Some("protocol = \"node-cluster\"\n"),
        2,
        &["--rotation", "handoff"],
        &["sh", "-c", &script],
    );
    herd.wait_for_event("worker_ready", &[("slot", json!(1))], 1);
    let before = rss(herd.pid());
    let addr = herd.addr();
    // Requests while the flood runs, each answered within 5 s.
    let started = Instant::now();
    let mut served = 0;
    while herd.worker_output("flooded ").is_empty() {
        assert!(started.elapsed() < DEADLINE * 3, "the flood never ended");
        answered_by(addr).unwrap_or_else(|e| panic!("request {served} during the flood: {e}"));
        served += 1;
        let grown = rss(herd.pid()).saturating_sub(before);
        assert!(
            grown < 32 << 20,
            "herd grew by {} MiB during the flood",
            grown >> 20
        );
    }
    // And once the flood has been read.
    for _ in 0..5 {
        answered_by(addr).unwrap();
    }
    let grown = rss(herd.pid()).saturating_sub(before);
    assert!(grown < 32 << 20, "herd grew by {} MiB", grown >> 20);
}

/// A Node app that opens and closes a server 300 times: herd releases each
/// server once no worker listens on it (as Node's primary does), so its
/// listener table never fills.
#[test]
fn servers_a_node_app_closed_are_released() {
    // COUNT and CLOSE reach the app through herd's environment.
    let herd = Herd::start_under(
        &scratch_dir("node-many-closed"),
        &["env", "COUNT=300", "CLOSE=1"],
        &[
            "--workers",
            "1",
            "--",
            "node",
            &fixture("node/many-listens.js"),
        ],
    );
    herd.wait_for_worker_output("opened 300 servers", 1);
    let failed = herd.worker_output("failed:");
    assert!(failed.is_empty(), "{}", herd.log_text());
    let refused = herd.events("listen_refused", &[]);
    assert!(refused.is_empty(), "{}", herd.log_text());
}

/// 300 servers open at once: past herd's listener limit the app's listen
/// fails with an error that is not EMFILE, and herd's log names the limit.
#[test]
fn past_the_listener_limit_a_node_listen_fails_naming_it() {
    let herd = Herd::start_under(
        &scratch_dir("node-many-open"),
        &["env", "COUNT=300", "CLOSE=0"],
        &[
            "--workers",
            "1",
            "--",
            "node",
            &fixture("node/many-listens.js"),
        ],
    );
    let failed = herd.wait_for_worker_output("failed:", 1).remove(0);
    assert!(!failed.contains("EMFILE"), "{failed}");
    let refusal = herd.wait_for_event("listen_refused", &[], 1).remove(0);
    // The point: the refusal names the limit.
    let message = refusal["message"].as_str().unwrap();
    assert!(message.contains("MAX_LISTENERS"), "{refusal}");
}

/// 20 000 each of oversized messages, messages with an fd and ACKs for ids
/// herd never sent: every such error is logged at the 1st, 2nd, 4th, 8th,
/// ... time only, and herd serves on.
#[test]
fn a_worker_flooding_bad_messages_is_logged_sparingly() {
    const COUNT: &str = "20000";
    let herd = Herd::launch(
        "bad-messages",
        None,
        2,
        &[],
        &["python3", &fixture("hostile_worker.py"), "oversized", COUNT],
    );
    herd.wait_for_worker_output("sent 20000 of each", 1);
    // The flood is read: slot 0 answers requests again (it reads its
    // channel after the flood), so herd has got past it.
    let ready = herd.wait_all_ready(2);
    wait_until("slot 0 to be served again", || {
        ready
            .contains(&answered_by(herd.addr()).ok()?)
            .then_some(())
    });
    for _ in 0..4 {
        answered_by(herd.addr()).unwrap();
    }
    let logged = herd
        .log_events()
        .iter()
        .filter(|e| e["level"] == "WARN" && e["slot"] == 0)
        .count();
    // log2(20 000) is about 15: three kinds of error, ~15 lines each.
    assert!(
        logged <= 3 * 16,
        "{logged} warnings for 60 000 bad messages"
    );
    assert!(
        logged >= 3,
        "each kind of bad message is logged at least once"
    );
}

/// Workers that refuse every connection: the connection waits until some
/// worker's state changes instead of bouncing between them until
/// `queue_timeout`, so herd stays idle.
#[test]
fn a_connection_every_worker_refuses_waits_instead_of_bouncing() {
    let herd = Herd::launch(
        "nack-all",
        Some("[handoff]\nqueue_timeout = \"3s\"\n"),
        2,
        &[],
        &["python3", &fixture("hostile_worker.py"), "nack-all"],
    );
    herd.wait_all_ready(2);
    let stream = send_request(herd.addr()).unwrap();
    let before = cpu_ticks(herd.pid());
    // The connection is closed at queue_timeout, unanswered.
    assert!(read_answer(stream, DEADLINE).is_err());
    let spent = cpu_ticks(herd.pid()) - before;
    // 3 s of bouncing costs herd most of a core; waiting costs nothing.
    assert!(spent < 30, "herd used {spent} ticks of CPU in 3 s");
    let refusals = herd.worker_output("] refused ").len();
    assert_eq!(refusals, 0, "a worker refused over 1000 times");
}

/// A worker that reports a connection closed that it was never sent: the
/// report is ignored; its open-connection count does not wrap, and
/// least-conn keeps giving it connections.
#[test]
fn a_closed_report_for_a_connection_never_sent_is_ignored() {
    let herd = Herd::launch(
        "closed-first",
        None,
        2,
        &["--mode", "least-conn", "--metrics", "127.0.0.1:0"],
        &["python3", &fixture("hostile_worker.py"), "closed-first"],
    );
    let ready = herd.wait_all_ready(2);
    herd.wait_for_worker_output("sent a CLOSED for a connection never sent", 2);
    let mut served = std::collections::BTreeSet::new();
    for _ in 0..20 {
        served.insert(answered_by(herd.addr()).unwrap());
    }
    assert_eq!(served, ready, "least-conn starved a worker");
    let metrics = http(metrics_addr(&herd), "GET", "/metrics").2;
    for slot in 0..2 {
        let open = sample(
            &metrics,
            &format!("herd_worker_open_connections{{slot=\"{slot}\"}}"),
        );
        assert!(open < 1000.0, "slot {slot}: {open} open connections");
    }
}
