//! Real Node.js apps under herd, beyond the seed example: an unmodified
//! Express cluster app (routing, route parameters, JSON bodies, strict
//! rotation, graceful stop).
//!
//! The Express fixture needs `npm ci` in tests/fixtures/node-express (CI
//! runs it in .ci/run); without it the Express test fails and says so.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};

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
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {response:?}"))?;
    let code = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status line in {response:?}"))?;
    Ok((code, body.to_string()))
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
        assert_eq!(root["workerId"].as_u64().map(|id| id as usize), slot);
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
