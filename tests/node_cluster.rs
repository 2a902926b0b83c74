//! Unmodified Node.js cluster apps under herd: herd speaks Node's cluster
//! IPC, so `cluster.isPrimary` is false in the workers and herd deals the
//! connections in strict rotation (the kernel deals them over per-worker
//! sockets where the app listens where herd does, else herd's primary
//! accepts and hands each over), with restarts, reloads, graceful stops and
//! no connection lost to a worker that dies or refuses before accepting.
//!
//! The kernel rotation tests need CAP_BPF (root has it): without it they
//! are skipped (`require_cap_bpf`), except in CI (`CI` set), where they
//! fail. The fallback to hand-offs without CAP_BPF is tested either way.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;

fn seed_app() -> String {
    format!(
        "{}/workers/node/cluster-server.js",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn facts_app() -> String {
    format!(
        "{}/tests/fixtures/node/cluster-facts.js",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// Sends one `Connection: close` request without reading the answer.
fn send(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect_timeout(&addr, DEADLINE).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.write_all(REQUEST).unwrap();
    stream
}

/// Reads a whole response; returns its body.
fn body_of(mut stream: TcpStream) -> String {
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let parsed = responses::parse(response.as_bytes()).unwrap();
    assert_eq!(
        (parsed.version, parsed.status, parsed.reason.as_str()),
        (1, 200, "OK"),
        "{response:?}"
    );
    parsed.body
}

fn seed_pid(body: &str) -> u32 {
    body.strip_prefix("Handled by worker ")
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("{body:?}"))
}

#[test]
fn the_seed_app_runs_unmodified_in_strict_rotation() {
    let app = seed_app();
    let herd = Herd::launch("node-seed", None, 2, &[], &["node", &app]);
    let pids = herd.wait_all_ready(2);
    let order: Vec<u32> = (0..20)
        .map(|_| seed_pid(&body_of(send(herd.addr()))))
        .collect();
    assert_eq!(order.iter().copied().collect::<BTreeSet<_>>(), pids);
    for pair in order.windows(2) {
        assert_ne!(pair[0], pair[1], "strict rotation: {order:?}");
    }
    let status = herd.status();
    for worker in workers_of(&status) {
        assert_eq!(worker["handed_off"], 10, "{status:#}");
    }
    // Graceful stop: `disconnect`, the workers close their servers and exit 0.
    assert!(herd.stop().success());
}

#[test]
fn workers_see_themselves_as_cluster_workers_of_their_slot() {
    let app = facts_app();
    let herd = Herd::launch("node-facts", None, 2, &[], &["node", &app]);
    herd.wait_all_ready(2);
    let slots = pids_of(&herd.status());
    for _ in 0..4 {
        let facts: Value = serde_json::from_str(&body_of(send(herd.addr()))).unwrap();
        let pid = facts["pid"].as_u64().unwrap() as u32;
        let slot = slots.iter().find(|(_, &p)| p == pid).map(|(&s, _)| s);
        assert_eq!(facts["isPrimary"], false);
        // Node's worker ids count from 1: the slot + 1.
        assert_eq!(facts["workerId"].as_u64().map(|id| id as usize - 1), slot);
        // PM2's variable for the instance: the slot itself.
        let instance = facts["appInstance"].as_str().and_then(|i| i.parse().ok());
        assert_eq!(instance, slot, "{facts}");
        // The app asked for port 3000; herd serves it on its own listener.
        assert_eq!(facts["address"]["port"], 3000, "{facts}");
        assert_eq!(facts["address"]["address"], "127.0.0.1", "{facts}");
    }
    assert!(herd.stop().success());
}

/// `--protocol node-cluster` makes a program that is not named `node` (here
/// `sh`, which execs node) a Node cluster app, as `protocol =` does.
#[test]
fn the_protocol_flag_names_a_node_app_behind_another_program() {
    let app = facts_app();
    let script = format!("exec node {app}");
    let herd = Herd::launch(
        "node-protocol-flag",
        None,
        1,
        &["--protocol", "node-cluster"],
        &["sh", "-c", &script],
    );
    herd.wait_all_ready(1);
    let facts: Value = serde_json::from_str(&body_of(send(herd.addr()))).unwrap();
    assert_eq!(facts["isPrimary"], false, "{facts}");
    assert_eq!(facts["workerId"], 1, "{facts}");
    assert!(herd.stop().success());
}

/// A script whose `#!` line runs node, started by its own path, and
/// `/usr/bin/env node app.js`: both are Node cluster apps to herd.
#[test]
fn a_shebang_script_and_env_node_are_node_apps() {
    let dir = scratch_dir("node-shebang");
    let script = dir.join("app");
    let body = format!("#!/usr/bin/env node\nrequire({:?});\n", facts_app());
    std::fs::write(&script, body).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let script = script.display().to_string();
    let app = facts_app();
    let commands: [&[&str]; 2] = [&[&script], &["/usr/bin/env", "node", &app]];
    for command in commands {
        let herd = Herd::launch("node-shebang-run", None, 1, &[], command);
        herd.wait_all_ready(1);
        let facts: Value = serde_json::from_str(&body_of(send(herd.addr()))).unwrap();
        assert_eq!(facts["isPrimary"], false, "{command:?}: {facts}");
        assert!(herd.stop().success());
    }
}

/// A worker's own `process.send()` goes to a primary branch herd does not
/// run: it is dropped, but said, at the 1st, 2nd, 4th, ... message.
#[test]
fn a_workers_own_messages_are_logged_as_dropped() {
    let app = facts_app();
    let herd = Herd::launch(
        "node-app-messages",
        Some("[env]\nSEND_TO_PRIMARY = \"1\"\n"),
        1,
        &[],
        &["node", &app],
    );
    herd.wait_all_ready(1);
    for _ in 0..4 {
        body_of(send(herd.addr()));
    }
    let dropped = herd.wait_for_event("node_message_dropped", &[], 3);
    let totals: Vec<u64> = dropped.iter().map(|e| number(e, "total")).collect();
    assert_eq!(totals, [1, 2, 4]);
    assert!(herd.stop().success());
}

#[test]
fn a_killed_worker_is_replaced_and_a_reload_replaces_all() {
    let app = seed_app();
    let herd = Herd::launch("node-restart", None, 2, &[], &["node", &app]);
    let first = herd.wait_all_ready(2);
    let victim = *first.first().unwrap();
    signal(victim, Signal::SIGKILL);
    let status = wait_for_status(&herd.dir, "the slot refilled", |s| {
        all_ready(s, 2) && !pids_of(s).values().any(|&p| p == victim)
    });
    let survivors: BTreeSet<u32> = pids_of(&status).into_values().collect();
    for _ in 0..6 {
        assert!(survivors.contains(&seed_pid(&body_of(send(herd.addr())))));
    }
    let reload = herd.control(&["reload"]);
    assert_eq!(reload.code, Some(0), "{}", reload.stderr);
    let reloaded = herd.wait_all_ready(2);
    assert!(reloaded.is_disjoint(&survivors));
    for _ in 0..6 {
        assert!(reloaded.contains(&seed_pid(&body_of(send(herd.addr())))));
    }
    // The replaced workers left cleanly: `disconnect`, then, once their
    // channel closed, SIGTERM (Node's worker.kill()), unless they exited
    // first; never killed at the shutdown timeout.
    for pid in &survivors {
        let old = [("slot", json!(slot_of(&status, *pid))), ("pid", json!(pid))];
        let exit = herd.wait_for_event("worker_exited", &old, 1).remove(0);
        assert!(exit["code"] == 0 || exit["signal"] == 15, "{exit}");
    }
    assert!(herd.events("drain_timeout", &[]).is_empty());
    assert!(herd.stop().success());
}

fn slot_of(status: &Value, pid: u32) -> usize {
    *pids_of(status)
        .iter()
        .find(|(_, &p)| p == pid)
        .unwrap_or_else(|| panic!("{pid} not in {status:#}"))
        .0
}

/// Node's own primary leaks a connection handed to a worker that dies
/// before accepting it: the client hangs forever. herd keeps its copy
/// until the worker says `accepted`, so the connection goes to another.
#[test]
fn a_connection_handed_to_a_dying_worker_is_served_by_another() {
    let app = seed_app();
    let herd = Herd::launch(
        "node-no-leak",
        None,
        2,
        &["--rotation", "handoff"],
        &["node", &app],
    );
    herd.wait_all_ready(2);
    let victim = pids_of(&herd.status())[&0];
    signal(victim, Signal::SIGSTOP);
    // Every other one is handed to the stopped worker (one on its channel,
    // the rest waiting their turn in herd); the others are served.
    let clients: Vec<TcpStream> = (0..6).map(|_| send(herd.addr())).collect();
    wait_for_status(&herd.dir, "the running worker served its share", |s| {
        workers_of(s)
            .iter()
            .map(|w| w["handed_off"].as_u64().unwrap())
            .sum::<u64>()
            >= 3
    });
    signal(victim, Signal::SIGKILL);
    for client in clients {
        let pid = seed_pid(&body_of(client));
        assert_ne!(pid, victim);
    }
    assert_requeued_at_least(herd, 3);
}

/// A worker that answers `accepted: false` (here: it reached
/// `server.maxConnections` = 1) gets its connections handed to another.
#[test]
fn connections_a_worker_refuses_go_to_another() {
    let app = facts_app();
    // `accepted: false` exists on the hand-off path only.
    let herd = Herd::launch(
        "node-refuse",
        Some("[env]\nREFUSE_SLOT = \"0\"\n"),
        2,
        &["--rotation", "handoff"],
        &["node", &app],
    );
    herd.wait_all_ready(2);
    let slots = pids_of(&herd.status());
    // Fill slot 0's one connection with an idle keep-alive (round-robin
    // reaches slot 0 within two connections).
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect_timeout(&herd.addr(), DEADLINE).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let response = responses::read_one(&mut stream).unwrap();
        let facts: Value = serde_json::from_str(&response.body).unwrap();
        held.push(stream);
        if facts["pid"].as_u64() == Some(u64::from(slots[&0])) {
            break;
        }
    }
    for _ in 0..6 {
        let facts: Value = serde_json::from_str(&body_of(send(herd.addr()))).unwrap();
        assert_eq!(facts["pid"].as_u64(), Some(u64::from(slots[&1])), "{facts}");
    }
    drop(held);
    // Round-robin offers at least every other one to slot 0 first.
    assert_requeued_at_least(herd, 3);
}

/// Stops herd and checks its closing tally of connections it had to hand
/// to another worker.
fn assert_requeued_at_least(herd: Herd, count: u64) {
    let stopped = herd.control(&["stop"]);
    assert_eq!(stopped.code, Some(0), "{}", stopped.stderr);
    let tally = herd.wait_for_event("stopped", &[], 1).remove(0);
    assert!(number(&tally, "requeued") >= count, "{tally}");
}

/// Sticky mode keeps a client IP on one Node worker, as for native workers.
#[test]
fn sticky_keeps_a_client_on_one_node_worker() {
    let app = seed_app();
    let herd = Herd::launch(
        "node-sticky",
        None,
        2,
        &["--mode", "sticky"],
        &["node", &app],
    );
    let pids = herd.wait_all_ready(2);
    let from = |last: u8| -> u32 {
        let source = std::net::IpAddr::from([127, 0, 0, last]);
        let stream = send_request_from(herd.addr(), source).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        seed_pid(&body_of(stream))
    };
    let mut seen = BTreeSet::new();
    for last in 2..=21 {
        let first = from(last);
        for _ in 0..3 {
            assert_eq!(from(last), first, "client 127.0.0.{last} moved");
        }
        seen.insert(first);
    }
    assert_eq!(seen, pids, "20 clients spread over both workers");
    assert!(herd.stop().success());
}

/// Starts herd without `--listen`, so the app's own `listen` decides where
/// herd listens; `env` is the workers' environment (the config's `[env]`).
fn launch_listening_where_the_app_asks(
    name: &str,
    workers: usize,
    flags: &[&str],
    env: &[(&str, String)],
    app: &str,
) -> Herd {
    launch_under(&[], "", name, workers, flags, env, app)
}

/// [`launch_listening_where_the_app_asks`], with herd started under `prefix`
/// and `config` (top-level TOML keys) in its config file.
fn launch_under(
    prefix: &[&str],
    config: &str,
    name: &str,
    workers: usize,
    flags: &[&str],
    env: &[(&str, String)],
    app: &str,
) -> Herd {
    let dir = scratch_dir(name);
    let env: String = env.iter().map(|(k, v)| format!("{k} = {v:?}\n")).collect();
    let config = write_config(&dir, &format!("{config}\n[env]\n{env}"));
    let workers = workers.to_string();
    let mut args = vec!["-c", config.to_str().unwrap(), "--workers", &workers];
    args.extend_from_slice(flags);
    args.extend(["--", "node", app]);
    Herd::start_under(&dir, prefix, &args)
}

/// The port of a listener herd bound, as a loopback address to connect to.
fn loopback(listener: SocketAddr) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], listener.port()))
}

fn status_listeners(status: &Value) -> Vec<SocketAddr> {
    status["listen"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().parse().unwrap())
        .collect()
}

/// With no `--listen`, herd binds what the seed app asks for, as Node's
/// primary does: no address means all interfaces, dual-stack `[::]`, and
/// `listen(0)` picks one port that every worker shares.
#[test]
fn without_listen_herd_binds_what_the_app_asks_for() {
    let app = seed_app();
    let herd = launch_listening_where_the_app_asks(
        "node-app-listens",
        2,
        &[],
        &[("PORT", "0".into())],
        &app,
    );
    let pids = herd.wait_all_ready(2);
    let status = herd.status();
    let listeners = status_listeners(&status);
    assert_eq!(listeners.len(), 1, "one port, shared: {status:#}");
    let bound = listeners[0];
    assert!(bound.ip().is_unspecified() && bound.port() != 0, "{bound}");
    let order: Vec<u32> = (0..10)
        .map(|_| seed_pid(&body_of(send(loopback(bound)))))
        .collect();
    assert_eq!(order.iter().copied().collect::<BTreeSet<_>>(), pids);
    for pair in order.windows(2) {
        assert_ne!(pair[0], pair[1], "strict rotation: {order:?}");
    }
    if bound.is_ipv6() {
        // Dual-stack: IPv6 clients reach the same socket.
        let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, bound.port()));
        assert!(pids.contains(&seed_pid(&body_of(send(v6)))));
    }
    assert!(herd.stop().success());
}

/// An app with two servers on `listen(0)` gets two ports, each bound once
/// for every worker (and for restarted ones): `server.address()` is right
/// in each, and each listener's connections go to that server.
#[test]
fn each_server_of_the_app_gets_its_own_listener_shared_by_all_workers() {
    let app = facts_app();
    let herd = launch_listening_where_the_app_asks(
        "node-two-servers",
        2,
        &[],
        &[
            ("HOST", "127.0.0.1".into()),
            ("PORT", "0".into()),
            ("SECOND_PORT", "0".into()),
        ],
        &app,
    );
    herd.wait_all_ready(2);
    let listeners = status_listeners(&herd.status());
    assert_eq!(listeners.len(), 2, "{listeners:?}");
    let check = |herd: &Herd| {
        let slots = pids_of(&herd.status());
        for (&listener, name) in listeners.iter().zip(["first", "second"]) {
            let mut ids = BTreeSet::new();
            for _ in 0..4 {
                let facts: Value = serde_json::from_str(&body_of(send(listener))).unwrap();
                assert_eq!(facts["server"], name, "{facts}");
                assert_eq!(facts["address"]["port"], listener.port(), "{facts}");
                assert_eq!(facts["address"]["address"], "127.0.0.1", "{facts}");
                let pid = facts["pid"].as_u64().unwrap() as u32;
                assert!(slots.values().any(|&p| p == pid), "{facts} {slots:?}");
                ids.insert(facts["workerId"].as_u64().unwrap());
            }
            assert_eq!(ids.len(), 2, "both workers serve {name}");
        }
    };
    check(&herd);
    // A restarted worker asks again and is given the same two sockets.
    let victim = pids_of(&herd.status())[&1];
    signal(victim, Signal::SIGKILL);
    let status = wait_for_status(&herd.dir, "slot 1 refilled", |s| {
        all_ready(s, 2) && pids_of(s)[&1] != victim
    });
    assert_eq!(status_listeners(&status), listeners);
    check(&herd);
    assert!(herd.stop().success());
}

/// A port herd cannot bind is answered with Node's errno, so the app's
/// server emits EADDRINUSE as it would under Node's primary, and herd's log
/// says why.
#[test]
fn a_busy_port_the_app_asks_for_is_refused_with_eaddrinuse() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let app = facts_app();
    let herd = launch_listening_where_the_app_asks(
        "node-busy-port",
        1,
        &[],
        &[("HOST", "127.0.0.1".into()), ("PORT", port.to_string())],
        &app,
    );
    herd.wait_for_worker_output("listen error EADDRINUSE", 1);
    herd.wait_for_event("listen_refused", &[("errno", json!("EADDRINUSE"))], 1);
    assert!(status_listeners(&herd.status()).is_empty());
    drop(taken);
}

/// `--mode shared`: herd binds once and sends every worker the listening
/// socket itself (Node's SharedHandle); the workers accept from it
/// directly, through restarts and a reload.
#[test]
fn shared_mode_gives_node_workers_the_listening_socket() {
    let app = facts_app();
    let herd = launch_listening_where_the_app_asks(
        "node-shared",
        2,
        &["--mode", "shared"],
        &[("HOST", "127.0.0.1".into()), ("PORT", "0".into())],
        &app,
    );
    herd.wait_all_ready(2);
    let listeners = status_listeners(&herd.status());
    assert_eq!(listeners.len(), 1, "{listeners:?}");
    let serves = |herd: &Herd| {
        let slots = pids_of(&herd.status());
        for _ in 0..6 {
            let facts: Value = serde_json::from_str(&body_of(send(listeners[0]))).unwrap();
            let pid = facts["pid"].as_u64().unwrap() as u32;
            let slot = slots.iter().find(|(_, &p)| p == pid).map(|(&s, _)| s);
            assert_eq!(facts["workerId"].as_u64().map(|id| id as usize - 1), slot);
            // PM2's variable for the instance: the slot too.
            let instance = facts["appInstance"].as_str().and_then(|i| i.parse().ok());
            assert_eq!(instance, slot, "{facts}");
            // The worker holds the real socket: its own getsockname.
            assert_eq!(facts["address"]["port"], listeners[0].port(), "{facts}");
        }
    };
    serves(&herd);
    let victim = pids_of(&herd.status())[&0];
    signal(victim, Signal::SIGKILL);
    wait_for_status(&herd.dir, "slot 0 refilled", |s| {
        all_ready(s, 2) && pids_of(s)[&0] != victim
    });
    serves(&herd);
    let before: BTreeSet<u32> = pids_of(&herd.status()).into_values().collect();
    assert!(herd.control(&["reload"]).code == Some(0));
    let status = wait_for_status(&herd.dir, "every worker replaced", |s| {
        all_ready(s, 2) && pids_of(s).values().all(|p| !before.contains(p))
    });
    assert_eq!(status_listeners(&status), listeners);
    serves(&herd);
    assert!(herd.stop().success());
}

/// The seed app on `listen(0)` with no `--listen`, started under `prefix`:
/// herd, its ready workers' pids and the loopback address to connect to.
fn seed_on_any_port(
    prefix: &[&str],
    name: &str,
    workers: usize,
    flags: &[&str],
) -> (Herd, BTreeSet<u32>, SocketAddr) {
    seed_configured(prefix, "", name, workers, flags)
}

/// [`seed_on_any_port`] with `config` (top-level TOML keys) in its config file.
fn seed_configured(
    prefix: &[&str],
    config: &str,
    name: &str,
    workers: usize,
    flags: &[&str],
) -> (Herd, BTreeSet<u32>, SocketAddr) {
    let app = seed_app();
    let herd = launch_under(
        prefix,
        config,
        name,
        workers,
        flags,
        &[("PORT", "0".into())],
        &app,
    );
    let pids = herd.wait_all_ready(workers);
    let addr = loopback(status_listeners(&herd.status())[0]);
    (herd, pids, addr)
}

/// Connections the kernel rotation has dealt, from `herd status`.
fn kernel_dealt(status: &Value) -> u64 {
    status["kernel_dealt"].as_u64().unwrap()
}

fn handed_off(status: &Value) -> u64 {
    workers_of(status)
        .iter()
        .map(|w| w["handed_off"].as_u64().unwrap())
        .sum()
}

/// `count` requests in a row; the pid that answered each.
fn rotation_of(addr: SocketAddr, count: usize) -> Vec<u32> {
    (0..count).map(|_| seed_pid(&body_of(send(addr)))).collect()
}

fn assert_strict(order: &[u32], pids: &BTreeSet<u32>) {
    assert_eq!(
        &order.iter().copied().collect::<BTreeSet<_>>(),
        pids,
        "{order:?}"
    );
    let n = pids.len();
    for window in order.windows(n) {
        let distinct: BTreeSet<u32> = window.iter().copied().collect();
        assert_eq!(distinct.len(), n, "strict rotation: {order:?}");
    }
}

/// Where herd listens where the app does, round-robin is dealt by the
/// kernel over each worker's own socket: no hand-off per connection, still
/// strict turns, and the connections are counted per worker as hand-offs.
#[test]
fn kernel_rotation_deals_strict_turns_and_counts_them_per_worker() {
    if !require_cap_bpf("kernel_rotation_deals_strict_turns_and_counts_them_per_worker") {
        return;
    }
    let (herd, pids, addr) = seed_on_any_port(&[], "node-kernel-turns", 3, &[]);
    assert_strict(&rotation_of(addr, 12), &pids);
    let status = wait_for_status(&herd.dir, "12 dealt by the kernel", |s| {
        kernel_dealt(s) == 12 && handed_off(s) == 12
    });
    for worker in workers_of(&status) {
        assert_eq!(worker["handed_off"], 4, "{status:#}");
    }
    let table = herd.control(&["status"]).stdout;
    assert!(table.contains("kernel rotation: 12 connections"), "{table}");
    assert!(herd.stop().success());
}

/// `--rotation handoff`: the same strict turns, every connection accepted
/// by herd and handed over Node's cluster channel.
#[test]
fn rotation_handoff_keeps_the_primary_handing_each_connection_over() {
    let flags = ["--rotation", "handoff"];
    let (herd, pids, addr) = seed_on_any_port(&[], "node-handoff-turns", 2, &flags);
    assert_strict(&rotation_of(addr, 10), &pids);
    let status = wait_for_status(&herd.dir, "10 handed off", |s| handed_off(s) == 10);
    assert_eq!(kernel_dealt(&status), 0, "{status:#}");
    assert!(herd.stop().success());
}

/// The kernel rotation also serves a configured listener, when the app
/// listens on its port (or on 0): the app's server is herd's socket.
#[test]
fn kernel_rotation_serves_a_configured_listener_the_app_listens_on() {
    if !require_cap_bpf("kernel_rotation_serves_a_configured_listener_the_app_listens_on") {
        return;
    }
    let app = facts_app();
    let herd = Herd::launch(
        "node-kernel-configured",
        Some("[env]\nPORT = \"0\"\n"),
        2,
        &[],
        &["node", &app],
    );
    herd.wait_all_ready(2);
    let mut ids = BTreeSet::new();
    for _ in 0..4 {
        let facts: Value = serde_json::from_str(&body_of(send(herd.addr()))).unwrap();
        assert_eq!(facts["address"]["port"], herd.addr().port(), "{facts}");
        ids.insert(facts["workerId"].as_u64().unwrap());
    }
    assert_eq!(ids.len(), 2);
    wait_for_status(&herd.dir, "4 dealt by the kernel", |s| kernel_dealt(s) == 4);
    assert!(herd.stop().success());
}

/// A worker that stops accepting still gets its turns: those connections
/// wait in its socket's queue. When it dies herd keeps the socket, takes
/// the queue over and hands each waiting connection to a live worker.
#[test]
fn a_dead_workers_queued_turns_are_served_by_the_others() {
    if !require_cap_bpf("a_dead_workers_queued_turns_are_served_by_the_others") {
        return;
    }
    let flags = ["--metrics", "127.0.0.1:0"];
    let (herd, _, addr) = seed_on_any_port(&[], "node-kernel-no-leak", 2, &flags);
    let victim = pids_of(&herd.status())[&0];
    signal(victim, Signal::SIGSTOP);
    let clients: Vec<TcpStream> = (0..6).map(|_| send(addr)).collect();
    wait_for_status(&herd.dir, "6 dealt by the kernel", |s| kernel_dealt(s) == 6);
    signal(victim, Signal::SIGKILL);
    for client in clients {
        assert_ne!(seed_pid(&body_of(client)), victim);
    }
    let text = http(metrics_addr(&herd), "GET", "/metrics").2;
    assert_eq!(sample(&text, "herd_connections_kernel_dealt_total"), 6.0);
    let taken = "herd_connections_redispatched_total{reason=\"slot-queue\"}";
    assert!(sample(&text, taken) >= 3.0, "{text}");
    assert_requeued_at_least(herd, 3);
}

/// A rolling reload and scaling under a steady stream of requests: the
/// new workers take over the slot sockets (and what waits in them), the
/// old ones finish what they accepted; no request fails.
#[test]
fn reload_and_scaling_under_kernel_rotation_fail_no_request() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
    use std::sync::Arc;
    if !require_cap_bpf("reload_and_scaling_under_kernel_rotation_fail_no_request") {
        return;
    }
    let (herd, before, addr) = seed_on_any_port(&[], "node-kernel-reload", 2, &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    // One request after another until told to stop (bounded in count and
    // time); any failed request panics the thread, and the join below.
    let load = {
        let (stop, done) = (stop.clone(), done.clone());
        std::thread::spawn(move || {
            let mut answered = Vec::new();
            let deadline = std::time::Instant::now() + DEADLINE;
            while !stop.load(Relaxed) && answered.len() < 50_000 {
                assert!(std::time::Instant::now() < deadline, "load ran too long");
                answered.push(seed_pid(&body_of(send(addr))));
                done.fetch_add(1, Relaxed);
            }
            answered
        })
    };
    let progressed = |since: usize| {
        wait_until("more requests answered", || {
            (done.load(Relaxed) > since).then_some(())
        })
    };
    progressed(0);
    assert_eq!(herd.control(&["reload"]).code, Some(0));
    let status = wait_for_status(&herd.dir, "both workers replaced", |s| {
        all_ready(s, 2) && pids_of(s).values().all(|p| !before.contains(p))
    });
    progressed(done.load(Relaxed));
    let reloaded: BTreeSet<u32> = pids_of(&status).into_values().collect();
    assert_eq!(herd.control(&["scale", "3"]).code, Some(0));
    let scaled = herd.wait_all_ready(3);
    assert!(scaled.is_superset(&reloaded));
    progressed(done.load(Relaxed));
    assert_eq!(herd.control(&["scale", "1"]).code, Some(0));
    let last = herd.wait_all_ready(1);
    progressed(done.load(Relaxed));
    stop.store(true, Relaxed);
    let answered = load.join().expect("every request answered");
    assert!(answered.iter().any(|pid| last.contains(pid)));
    // The one worker left takes every turn.
    assert_strict(&rotation_of(addr, 4), &last);
    wait_for_status(&herd.dir, "some dealt by the kernel", |s| {
        kernel_dealt(s) > 0
    });
    assert!(herd.stop().success());
}

/// Without CAP_BPF the kernel refuses the program: herd says so once and
/// hands connections over the cluster channel instead, in the same turns.
#[test]
fn without_cap_bpf_round_robin_falls_back_to_hand_offs() {
    let without_bpf = [
        "setpriv",
        "--bounding-set",
        "-bpf,-sys_admin,-perfmon",
        "--",
    ];
    let (herd, pids, addr) = seed_on_any_port(&without_bpf, "node-kernel-refused", 2, &[]);
    let warning = herd
        .wait_for_event("kernel_rotation_unavailable", &[], 1)
        .remove(0);
    // The point: the warning says what is missing.
    assert!(
        warning["message"].as_str().unwrap().contains("CAP_BPF"),
        "{warning}"
    );
    assert_strict(&rotation_of(addr, 10), &pids);
    let status = wait_for_status(&herd.dir, "10 handed off", |s| handed_off(s) == 10);
    assert_eq!(kernel_dealt(&status), 0);
    assert!(herd.stop().success());
}

/// `max_connections_per_worker` counts the connections the kernel dealt
/// (read twice a second, so a worker may take a few more before it is
/// replaced): each worker is replaced gracefully once it has served its
/// share, and no request fails meanwhile.
#[test]
fn kernel_dealt_connections_count_towards_recycling() {
    if !require_cap_bpf("kernel_dealt_connections_count_towards_recycling") {
        return;
    }
    let config = "max_connections_per_worker = 5";
    let (herd, before, addr) = seed_configured(&[], config, "node-kernel-recycle", 2, &[]);
    rotation_of(addr, 10);
    wait_for_status(&herd.dir, "some dealt by the kernel", |s| {
        kernel_dealt(s) > 0
    });
    herd.wait_for_event("recycling", &[], 2);
    let status = wait_for_status(&herd.dir, "both workers replaced", |s| {
        all_ready(s, 2) && pids_of(s).values().all(|p| !before.contains(p))
    });
    let after: BTreeSet<u32> = pids_of(&status).into_values().collect();
    assert_strict(&rotation_of(addr, 4), &after);
    assert!(herd.stop().success());
}

/// A server the app closed everywhere is released, as Node's primary
/// releases it: its port refuses connections at once (rather than herd
/// holding them until `queue_timeout` for nobody), and the app's other
/// server is not held up at all.
#[test]
fn a_server_the_app_closed_everywhere_is_released() {
    let app = facts_app();
    let herd = launch_under(
        &[],
        "[handoff]\nqueue_timeout = \"60s\"",
        "node-closed-listener",
        1,
        &["--rotation", "handoff"],
        &[
            ("HOST", "127.0.0.1".into()),
            ("PORT", "0".into()),
            ("SECOND_PORT", "0".into()),
            ("CLOSE_SECOND", "1".into()),
        ],
        &app,
    );
    herd.wait_all_ready(1);
    let addr = address(&herd.wait_for_event("listener_released", &[], 1)[0]);
    let refused = TcpStream::connect(addr).map(|_| ()).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    let listeners = status_listeners(&herd.status());
    assert_eq!(listeners.len(), 1, "{listeners:?}");
    for _ in 0..3 {
        let facts: Value = serde_json::from_str(&body_of(send(listeners[0]))).unwrap();
        assert_eq!(facts["server"], "first", "{facts}");
    }
    assert!(herd.stop().success());
}
