//! Real Node.js apps under herd, beyond the seed example: an unmodified
//! Express cluster app (routing, route parameters, JSON bodies, strict
//! rotation, graceful stop), and least-conn steering new connections away
//! from a Node worker whose event loop is blocked (herd counts, per Node
//! worker, the connections it handed over and the worker has not accepted
//! yet), where round-robin keeps handing it every other one.
//!
//! The Express fixture needs `npm ci` in tests/fixtures/node-express (CI
//! runs it in .ci/run); without it the Express test fails and says so.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use common::*;
use serde_json::{json, Value};

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

/// The Express app; fails (never skips) when Express is not installed.
fn express_app() -> String {
    let dir = fixture("node-express");
    assert!(
        dir.join("node_modules/express/package.json").is_file(),
        "Express is not installed for the fixture: run `npm ci` in {} (CI does it in .ci/run)",
        dir.display()
    );
    dir.join("app.js").display().to_string()
}

fn busy_app() -> String {
    fixture("node/busy.js").display().to_string()
}

/// Opens a connection and sends one `Connection: close` request, with a
/// JSON body if given, without reading the answer.
fn send(addr: SocketAddr, method: &str, path: &str, json_body: Option<&str>) -> TcpStream {
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: herd-test\r\nConnection: close\r\n");
    if let Some(body) = json_body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(json_body.unwrap_or(""));
    let mut stream = TcpStream::connect_timeout(&addr, DEADLINE).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    stream
}

/// Reads a whole response; returns its status code and body.
fn answer(mut stream: TcpStream) -> Result<(u16, String), String> {
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("read: {e}"))?;
    let parsed = responses::parse(response.as_bytes())?;
    if parsed.version != 1 {
        return Err(format!("no HTTP/1.1 status line in {response:?}"));
    }
    Ok((parsed.status, parsed.body))
}

/// One request that must be answered 200 with JSON; returns the JSON.
fn json_of(addr: SocketAddr, method: &str, path: &str, json_body: Option<&str>) -> Value {
    let (code, body) = answer(send(addr, method, path, json_body))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    assert_eq!(code, 200, "{method} {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{method} {path}: {e} in {body:?}"))
}

/// Connections the workers have accepted, as far as herd knows.
fn acked(status: &Value) -> u64 {
    workers_of(status)
        .iter()
        .map(|w| w["handed_off"].as_u64().unwrap())
        .sum()
}

#[test]
fn an_express_app_runs_unmodified() {
    let app = express_app();
    let herd = Herd::launch("node-express", None, 2, &[], &["node", &app]);
    let pids = herd.wait_all_ready(2);
    let slots = pids_of(&herd.status());
    // herd reports its own address with the port the app asked for.
    let asked_port = std::env::var("PORT")
        .ok()
        .and_then(|port| port.parse::<u64>().ok())
        .unwrap_or(3000);
    let mut order = Vec::new();
    for _ in 0..10 {
        let root = json_of(herd.addr(), "GET", "/", None);
        let pid = root["pid"].as_u64().unwrap() as u32;
        let slot = slots.iter().find(|(_, &p)| p == pid).map(|(&s, _)| s);
        assert!(slot.is_some(), "pid {pid} is none of herd's {slots:?}");
        assert_eq!(root["isPrimary"], false, "{root}");
        // Node's worker ids count from 1: the slot + 1.
        assert_eq!(root["workerId"].as_u64().map(|id| id as usize - 1), slot);
        assert_eq!(root["address"]["port"], asked_port, "{root}");
        assert_eq!(root["address"]["address"], "127.0.0.1", "{root}");
        order.push(pid);
    }
    assert_eq!(order.iter().copied().collect::<BTreeSet<_>>(), pids);
    for pair in order.windows(2) {
        assert_ne!(pair[0], pair[1], "strict rotation: {order:?}");
    }

    let user = json_of(herd.addr(), "GET", "/users/42", None);
    assert_eq!(user["id"], "42", "{user}");
    assert!(pids.contains(&(user["pid"].as_u64().unwrap() as u32)));

    let sent = json!({"name": "herd", "workers": 2, "tags": ["a", "b"], "nested": {"ok": true}});
    let echoed = json_of(herd.addr(), "POST", "/echo", Some(&sent.to_string()));
    assert_eq!(echoed, sent);

    let (code, _) = answer(send(herd.addr(), "GET", "/no-such-route", None)).unwrap();
    assert_eq!(code, 404, "Express's own 404");

    // 13 connections in strict rotation: 7 and 6.
    let status = wait_for_status(&herd.dir, "13 connections accepted", |s| acked(s) == 13);
    let mut handed: Vec<u64> = workers_of(&status)
        .iter()
        .map(|w| w["handed_off"].as_u64().unwrap())
        .collect();
    handed.sort();
    assert_eq!(handed, [6, 7], "{status:#}");
    // Graceful stop: `disconnect`, Express's server closes, the workers exit 0.
    assert!(herd.stop().success());
}

/// Upper bound of the block; the test ends it (RELEASE_FILE) well before.
const BLOCK_MS: u64 = 15_000;

/// herd running busy.js on 2 workers in `mode`, with the files the app and
/// the test share in herd's scratch directory.
struct Busy {
    // Dropped first: a failed test ends the block before herd is killed.
    release_file: ReleaseOnDrop,
    herd: Herd,
    pids: BTreeSet<u32>,
    block_file: PathBuf,
}

/// The RELEASE_FILE, created on drop (if its directory is still there) so
/// no worker stays busy after the test.
struct ReleaseOnDrop(PathBuf);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, "");
    }
}

impl Busy {
    fn launch(name: &str, mode: &str) -> Busy {
        // Herd::launch recreates this same directory before herd starts, and
        // the files appear in it only later, so their paths can go in the
        // config now.
        let dir = scratch_dir(name);
        let block_file = dir.join("blocked.pid");
        let release_file = dir.join("release");
        // A late ack never makes herd skip the blocked worker here: only the
        // mode decides where connections go.
        let config = format!(
            "[env]\nBLOCK_FILE = \"{}\"\nRELEASE_FILE = \"{}\"\n\n[handoff]\nack_timeout = \"60s\"\n",
            block_file.display(),
            release_file.display()
        );
        let app = busy_app();
        let herd = Herd::launch(name, Some(&config), 2, &["--mode", mode], &["node", &app]);
        assert_eq!(herd.dir, dir);
        let pids = herd.wait_all_ready(2);
        Busy {
            release_file: ReleaseOnDrop(release_file),
            herd,
            pids,
            block_file,
        }
    }

    /// Sends `GET /block` and waits until a worker is blocked in it and herd
    /// has its ack of that connection. Returns the reader of its answer
    /// (which comes when the block ends) and the blocked worker's pid.
    fn block_a_worker(&self) -> (Reader, u32) {
        let path = format!("/block?ms={BLOCK_MS}");
        let blocked = read_later(send(self.herd.addr(), "GET", &path, None));
        let pid = wait_until("a worker blocked in /block", || {
            std::fs::read_to_string(&self.block_file)
                .ok()?
                .trim()
                .parse::<u32>()
                .ok()
        });
        assert!(self.pids.contains(&pid), "{pid} is none of {:?}", self.pids);
        wait_for_status(&self.herd.dir, "the /block connection accepted", |s| {
            acked(s) == 1
        });
        (blocked, pid)
    }

    /// Ends the block; returns what the blocked worker answered.
    fn release(&self, blocked: Reader) -> String {
        std::fs::write(&self.release_file.0, "").unwrap();
        let (code, body) = blocked
            .join()
            .unwrap()
            .expect("the /block request answered");
        assert_eq!(code, 200, "{body}");
        body
    }
}

/// A thread reading one answer: its status code and body.
type Reader = JoinHandle<Result<(u16, String), String>>;

/// Reads the answer of `stream` in a thread.
fn read_later(stream: TcpStream) -> Reader {
    std::thread::spawn(move || answer(stream))
}

/// The pid in a `Handled by worker <pid>` answer.
fn handled_by(reader: Reader) -> u32 {
    let (code, body) = reader
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("a client lost: {e}"));
    assert_eq!(code, 200, "{body}");
    body.strip_prefix("Handled by worker ")
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("{body:?}"))
}

/// Node workers never say when a connection closes, so least-conn counts
/// the connections herd handed over that the worker has not accepted yet.
/// A worker whose event loop is blocked accepts nothing: once one
/// connection waits for it, every later one goes to the other worker.
#[test]
fn least_conn_steers_away_from_a_node_worker_whose_event_loop_is_blocked() {
    let busy = Busy::launch("node-least-conn", "least-conn");
    let (blocked, blocked_pid) = busy.block_a_worker();
    let mut readers = Vec::new();
    while readers.len() < 10 && !blocked.is_finished() {
        readers.push(read_later(send(busy.herd.addr(), "GET", "/", None)));
        // Before the next one, herd has the acks of all connections so far
        // (the /block one included) but one: at most one waits unaccepted,
        // so the next can go to the blocked worker only if that one is the
        // running worker's. Were the blocked worker handed two, this would
        // wait for the end of the block.
        let sent = readers.len() as u64;
        wait_until("the connections so far accepted but one", || {
            (blocked.is_finished() || acked(&busy.herd.status()) >= sent).then_some(())
        });
    }
    let sent = readers.len();
    let ended_early = blocked.is_finished();
    assert_eq!(
        busy.release(blocked),
        format!("Blocked worker {blocked_pid}")
    );
    // Every client is answered, the one that waited for the blocked worker
    // too, once the block ended.
    let (order, to_blocked) = answers_and_count(readers, blocked_pid);
    assert!(
        to_blocked <= 1,
        "{to_blocked} of {sent} went to the blocked worker {blocked_pid}: {order:?}"
    );
    assert!(
        !ended_early,
        "the block ({BLOCK_MS} ms) ended after {sent} of the 10 connections"
    );
    assert!(order.iter().all(|pid| busy.pids.contains(pid)), "{order:?}");
    assert!(busy.herd.stop().success());
}

/// Which worker answered each client, in order, and how many were `pid`.
fn answers_and_count(readers: Vec<Reader>, pid: u32) -> (Vec<u32>, usize) {
    let order: Vec<u32> = readers.into_iter().map(handled_by).collect();
    let count = order.iter().filter(|&&p| p == pid).count();
    (order, count)
}

/// The contrast: round-robin ignores load and keeps handing the blocked
/// worker every other connection; they wait on its channel (herd still
/// holds each until the worker accepts it) and are served once the block ends.
#[test]
fn round_robin_keeps_handing_connections_to_a_blocked_node_worker() {
    let busy = Busy::launch("node-rr-blocked", "round-robin");
    let (blocked, blocked_pid) = busy.block_a_worker();
    let readers: Vec<_> = (0..10)
        .map(|_| read_later(send(busy.herd.addr(), "GET", "/", None)))
        .collect();
    // Strict rotation: half of them reach the running worker and are
    // answered during the block.
    wait_until("the running worker's half answered", || {
        (readers.iter().filter(|r| r.is_finished()).count() >= 5).then_some(())
    });
    assert!(
        !blocked.is_finished(),
        "the block ({BLOCK_MS} ms) ended before the running worker's share was answered"
    );
    assert_eq!(
        busy.release(blocked),
        format!("Blocked worker {blocked_pid}")
    );
    let (order, to_blocked) = answers_and_count(readers, blocked_pid);
    assert_eq!(
        to_blocked, 5,
        "strict rotation hands the blocked worker {blocked_pid} half of 10: {order:?}"
    );
    assert!(order.iter().all(|pid| busy.pids.contains(pid)), "{order:?}");
    assert!(busy.herd.stop().success());
}
