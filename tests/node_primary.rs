//! Node cluster apps whose primary branch does work (issue 16, points 4
//! and 6), run with `node.primary = "run"`: herd starts the app once more
//! as its primary, whose `cluster` sees herd's workers, and relays the
//! messages between them, handles included.
//!
//! - socket.io's documented cluster example (`@socket.io/sticky` passes
//!   each connection from the primary to a worker with `worker.send(msg,
//!   socket)`; `@socket.io/cluster-adapter` relays broadcasts through the
//!   primary): polling clients from several loopback addresses all
//!   handshake, spread over the workers, and hear one client's broadcast.
//! - prom-client's `AggregatorRegistry` in the primary sums every worker's metrics.
//! - A primary with a timer counts `exit` events: a SIGKILLed worker is an
//!   `exit`, and the slot's restart a new `online`; a SIGKILLed primary is
//!   started again and sees the running workers.
//! - Relays faster than the other side reads, and an oversized line: herd
//!   stays flat and logs the drops.
//! - `node.primary = "run"` without a Node app is refused by name.
//!
//! The npm packages are pinned by tests/fixtures/node-primary's lockfile
//! and installed by scripts/test (`npm ci`). Without node the tests skip,
//! except in CI; without the installed packages they fail and say so.

mod common;

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

const RUN: &str = "[node]\nprimary = \"run\"\n";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/node-primary")
}

fn fixture(name: &str) -> String {
    fixtures().join(name).display().to_string()
}

/// Node is here (else the test skips, or fails in CI), and so are the
/// fixture's packages (else it fails, naming the fix).
fn node_here(test: &str) -> bool {
    let node = std::process::Command::new("node").arg("--version").output();
    if !node.is_ok_and(|out| out.status.success()) {
        return skip_unless_ci(test, "needs node (apt-get install nodejs npm)");
    }
    let installed = ["socket.io", "@socket.io/sticky", "prom-client"]
        .iter()
        .all(|name| {
            fixtures()
                .join("node_modules")
                .join(name)
                .join("package.json")
                .is_file()
        });
    assert!(
        installed,
        "the node-primary fixture's packages are not installed: run `npm ci` in {} (scripts/test does it)",
        fixtures().display()
    );
    true
}

/// A port free now, for an app that takes its port from the environment.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `count`th line the app's primary wrote (herd prefixes them
/// `[primary] `) containing `needle`; its last word as a port.
fn primary_port(herd: &Herd, needle: &str, count: usize) -> u16 {
    wait_until(&format!("{count} primary lines with {needle:?}"), || {
        let text = herd.log_text();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("[primary] ") && l.contains(needle))
            .collect();
        lines.get(count - 1)?.rsplit(' ').next()?.parse().ok()
    })
}

/// The exit counter's report: what its primary saw.
fn primary_report(port: u16) -> Option<Value> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    let (code, _, body) = http(addr, "GET", "/");
    (code == 200).then(|| serde_json::from_str(&body).unwrap())
}

/// `cluster.workers` as the primary reports it: id -> pid.
fn primary_workers(report: &Value) -> Vec<(u64, u64)> {
    let mut workers: Vec<(u64, u64)> = report["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["id"].as_u64().unwrap(), w["pid"].as_u64().unwrap()))
        .collect();
    workers.sort();
    workers
}

/// Every slot has a ready worker.
fn status_ready(status: &Value) -> bool {
    workers_of(status)
        .iter()
        .all(|w| w["state"] == "ready" && w["pid"].is_u64())
}

/// The socket.io example forks `os.cpus().length` workers: herd runs as many.
fn node_cpus() -> usize {
    let out = std::process::Command::new("node")
        .args(["-p", "require('os').cpus().length"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Polling clients from `sources`, one after another, against the app's
/// primary at `addr`: every handshake succeeds, the clients spread over
/// every worker in `pids`, and one client's shout reaches them all.
fn clients_handshake_and_hear_a_broadcast(
    herd: &Herd,
    addr: SocketAddr,
    sources: &[String],
    pids: &BTreeSet<u32>,
) {
    let out = std::process::Command::new("node")
        .arg(fixture("socketio-clients.js"))
        .arg(format!("http://{addr}"))
        .args(sources)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{e}: {stdout}\n{}", herd.log_text()));
    assert!(
        report.get("error").is_none(),
        "{report}\n{}",
        herd.log_text()
    );
    let clients = report["clients"].as_array().unwrap();
    assert_eq!(clients.len(), sources.len(), "{report}");
    let mut greeted_by = BTreeSet::new();
    for client in clients {
        // Handshake: a session id, and a greeting from one of herd's workers.
        assert!(
            client["sid"].as_str().is_some_and(|s| !s.is_empty()),
            "{client}"
        );
        let pid = client["pid"].as_u64().unwrap() as u32;
        assert!(
            pids.contains(&pid),
            "greeted by {pid}, not one of herd's {pids:?}"
        );
        greeted_by.insert(pid);
        // One client's shout reached every client, on every worker.
        assert_eq!(client["heard"].as_array().unwrap().len(), 1, "{client}");
    }
    assert_eq!(
        &greeted_by, pids,
        "the clients spread over every worker: {report}"
    );
}

#[test]
fn the_socket_io_cluster_example_runs_with_its_node_primary() {
    if !node_here("the_socket_io_cluster_example_runs_with_its_node_primary") {
        return;
    }
    let port = free_port();
    let workers = node_cpus().clamp(2, 4);
    let config = format!("{RUN}[env]\nPORT = \"{port}\"\n");
    let app = fixture("socketio-cluster.js");
    let herd = Herd::launch("np-socketio", Some(&config), workers, &[], &["node", &app]);
    let pids = herd.wait_all_ready(workers);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // The primary listens itself (workers never do): wait for its port.
    wait_until("the app's primary listening", || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()
    });
    let sources: Vec<String> = (2..2 + 2 * workers)
        .map(|n| format!("127.0.0.{n}"))
        .collect();
    clients_handshake_and_hear_a_broadcast(&herd, addr, &sources, &pids);

    // A worker killed: the example's `cluster.on("exit", () =>
    // cluster.fork())` gets the slot's next worker, and new clients reach
    // it too.
    let victim = *pids.iter().next().unwrap();
    signal(victim, Signal::SIGKILL);
    let pids = wait_until("the slot refilled", || {
        let status = herd.status();
        let now: BTreeSet<u32> = workers_of(&status)
            .iter()
            .filter_map(|w| w["pid"].as_u64().map(|p| p as u32))
            .collect();
        (status_ready(&status) && now.len() == workers && !now.contains(&victim)).then_some(now)
    });
    let sources: Vec<String> = (2..2 + 2 * workers)
        .map(|n| format!("127.0.1.{n}"))
        .collect();
    clients_handshake_and_hear_a_broadcast(&herd, addr, &sources, &pids);
    let beyond = herd.events("node_primary_unsupported", &[]);
    assert!(
        !beyond
            .iter()
            .any(|e| e["what"].as_str().is_some_and(|w| w.contains("beyond"))),
        "the re-fork in the exit handler took the restarted slot: {beyond:?}"
    );
    // The example asks for `serialization: "advanced"`: herd says it relays JSON.
    let unsupported = herd.events("node_primary_unsupported", &[]);
    assert!(
        unsupported
            .iter()
            .any(|e| e["what"].as_str().is_some_and(|w| w.contains("advanced"))),
        "{unsupported:?}"
    );
}

#[test]
fn prom_clients_aggregator_in_the_node_primary_sums_every_worker() {
    if !node_here("prom_clients_aggregator_in_the_node_primary_sums_every_worker") {
        return;
    }
    let app = fixture("prom-aggregator.js");
    let herd = Herd::launch("np-prom", Some(RUN), 2, &[], &["node", &app]);
    let pids = herd.wait_all_ready(2);
    let port = primary_port(&herd, "metrics on", 1);
    // A worker is ready once online, and listens a moment later: requests
    // until both have answered (each one counted by the worker that did).
    let mut served = BTreeSet::new();
    let mut sent = 0;
    wait_until("both workers serving", || {
        served.insert(pids::get_pid(herd.addr(), DEADLINE).unwrap());
        sent += 1;
        (served == pids && sent >= 10).then_some(())
    });
    let metrics = SocketAddr::from(([127, 0, 0, 1], port));
    let (code, _, body) = http(metrics, "GET", "/cluster_metrics");
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        sample(&body, "fixture_requests_total"),
        sent as f64,
        "{body}"
    );
    // Worker ids 1 and 2: every worker answered the primary.
    assert_eq!(sample(&body, "fixture_worker_ids"), 3.0, "{body}");

    // herd stops: the primary is sent SIGTERM with the workers' drain and
    // is not started again; herd waits for it and exits cleanly.
    let primary = number(
        &herd.wait_for_event("node_primary_started", &[], 1)[0],
        "pid",
    );
    signal(herd.pid(), Signal::SIGTERM);
    let mut herd = herd;
    assert!(herd.wait_exit().success(), "{}", herd.log_text());
    let exited = herd.events("node_primary_exited", &[("pid", json!(primary))]);
    assert_eq!(exited.len(), 1, "{exited:?}");
    assert_eq!(exited[0]["signal"], 15, "{exited:?}");
    assert_eq!(herd.events("node_primary_started", &[]).len(), 1);
    assert!(
        herd.events("killing_leftovers", &[]).is_empty(),
        "{}",
        herd.log_text()
    );
}

/// The pid herd runs in every slot, once every slot is ready again and
/// none of them is in `gone`.
fn ready_pids_without(herd: &Herd, gone: &BTreeSet<u64>) -> BTreeSet<u64> {
    wait_until("every slot ready with a new worker", || {
        let status = Some(herd.status()).filter(status_ready)?;
        let pids: BTreeSet<u64> = pids_of(&status).values().map(|&p| p as u64).collect();
        pids.is_disjoint(gone).then_some(pids)
    })
}

/// The pids of the processes the primary saw `event` for.
fn seen_pids(report: &Value, event: &str) -> BTreeSet<u64> {
    report["seen"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == event)
        .map(|e| e["pid"].as_u64().unwrap())
        .collect()
}

/// Worker `victim` (slot 0) is killed by `kill`: the primary sees its
/// `exit` with SIGKILL, herd refills the slot, and the primary sees the
/// new worker `online` there. Returns the primary's report.
fn a_killed_worker_is_an_exit_and_a_new_online(
    herd: &Herd,
    port: u16,
    exits: u64,
    victim: u64,
    kill: impl FnOnce(),
) -> Value {
    kill();
    let new = ready_pids_without(herd, &BTreeSet::from([victim]));
    let report = wait_until("the exit and the new worker's online seen", || {
        primary_report(port)
            .filter(|r| r["exits"] == exits && seen_pids(r, "online").is_superset(&new))
    });
    let seen = report["seen"].as_array().unwrap();
    let exit = seen.iter().rfind(|e| e["event"] == "exit").unwrap();
    assert_eq!(
        (&exit["id"], &exit["pid"], &exit["signal"], &exit["code"]),
        (&json!(1), &json!(victim), &json!("SIGKILL"), &Value::Null),
        "{report}"
    );
    let known: BTreeSet<u64> = primary_workers(&report)
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(known, new, "cluster.workers holds herd's workers: {report}");
    report
}

#[test]
fn a_node_primary_with_a_timer_counts_exits_and_is_restarted() {
    if !node_here("a_node_primary_with_a_timer_counts_exits_and_is_restarted") {
        return;
    }
    let app = fixture("exit-counter.js");
    let herd = Herd::launch("np-exits", Some(RUN), 2, &[], &["node", &app]);
    herd.wait_all_ready(2);
    let slots = pids_of(&herd.status());
    let port = primary_port(&herd, "primary on", 1);
    let report = wait_until("the primary's cluster.workers", || {
        primary_report(port).filter(|r| primary_workers(r).len() == 2)
    });
    let expected: Vec<(u64, u64)> = slots
        .iter()
        .map(|(&s, &p)| (s as u64 + 1, p as u64))
        .collect();
    assert_eq!(primary_workers(&report), expected, "{report}");

    // Killed from outside, then by the primary's own worker.kill().
    let victim = slots[&0] as u64;
    let after = a_killed_worker_is_an_exit_and_a_new_online(&herd, port, 1, victim, || {
        signal(victim as u32, Signal::SIGKILL)
    });
    assert!(
        after["ticks"].as_u64() > report["ticks"].as_u64(),
        "the timer runs"
    );
    let victim = primary_workers(&after)[0].1;
    a_killed_worker_is_an_exit_and_a_new_online(&herd, port, 2, victim, || {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        assert_eq!(http(addr, "GET", "/kill/1").0, 200);
    });

    // The primary killed: herd logs it, starts it again, and the new one
    // finds both running workers in cluster.workers.
    let primary = after["pid"].as_u64().unwrap();
    signal(primary as u32, Signal::SIGKILL);
    herd.wait_for_event("node_primary_exited", &[("pid", json!(primary))], 1);
    herd.wait_for_event("node_primary_started", &[], 2);
    let port = primary_port(&herd, "primary on", 2);
    let again = wait_until("the new primary's cluster.workers", || {
        primary_report(port).filter(|r| primary_workers(r).len() == 2)
    });
    assert_eq!(again["exits"], 0, "{again}");
    let now = ready_pids_without(&herd, &BTreeSet::new());
    let known: BTreeSet<u64> = primary_workers(&again)
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(known, now);

    // A rolling reload: each slot's new worker comes `online` while the old
    // one drains, then the old one's `exit`; cluster.workers ends with the new.
    let reload = herd.control(&["reload"]);
    assert_eq!(reload.code, Some(0), "{reload:?}");
    let new = ready_pids_without(&herd, &now);
    let reloaded = wait_until("the reload seen", || {
        primary_report(port).filter(|r| {
            let known: BTreeSet<u64> = primary_workers(r).into_iter().map(|(_, p)| p).collect();
            r["exits"] == 2 && known == new
        })
    });
    assert_eq!(seen_pids(&reloaded, "exit"), now, "{reloaded}");
    assert!(
        seen_pids(&reloaded, "online").is_superset(&new),
        "{reloaded}"
    );
}

#[test]
fn a_node_worker_passes_a_connection_to_its_primary_with_process_send() {
    if !node_here("a_node_worker_passes_a_connection_to_its_primary_with_process_send") {
        return;
    }
    let app = fixture("handle-to-primary.js");
    let herd = Herd::launch("np-handle-up", Some(RUN), 2, &[], &["node", &app]);
    let pids = herd.wait_all_ready(2);
    let primary = number(
        &herd.wait_for_event("node_primary_started", &[], 1)[0],
        "pid",
    );
    // Until both workers passed one on (a worker is ready once online, and
    // listens a moment later), every answer the primary's.
    let mut workers = BTreeSet::new();
    wait_until("both workers passing connections on", || {
        let mut stream = TcpStream::connect_timeout(&herd.addr(), DEADLINE).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut stream, &mut answer).unwrap();
        let words: Vec<&str> = answer.split_whitespace().collect();
        assert_eq!(words[..3], ["answered", "by", "primary"], "{answer:?}");
        assert_eq!(words[3], primary.to_string(), "{answer:?}");
        let pid: u32 = words[8].trim_end_matches(')').parse().unwrap();
        assert!(pids.contains(&pid), "{answer:?}");
        workers.insert(pid);
        (workers == pids).then_some(())
    });
}

/// herd's resident memory, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .unwrap();
    kib << 10
}

/// Floods the relay in `direction` (the fixture's FLOOD mode of that
/// name): herd drops past its bound, logs it, and does not grow while a
/// thousand 64 KiB messages more (64 MiB) are dropped.
fn flood_stays_bounded(direction: &str) {
    let config = format!("{RUN}[env]\nFLOOD = \"{direction}\"\n");
    let app = fixture("flood.js");
    let herd = Herd::launch(
        &format!("np-flood-{direction}"),
        Some(&config),
        1,
        &[],
        &["node", &app],
    );
    herd.wait_all_ready(1);
    let dropped = |at_least: u64| {
        herd.events("node_relay_dropped", &[("direction", json!(direction))])
            .iter()
            .any(|e| number(e, "total") >= at_least)
    };
    wait_until("the first drop", || dropped(1).then_some(()));
    let before = rss(herd.pid());
    wait_until("a thousand drops more", || dropped(1024).then_some(()));
    let grown = rss(herd.pid()).saturating_sub(before);
    assert!(grown < 16 << 20, "herd grew by {} MiB", grown >> 20);
}

#[test]
fn a_node_primary_that_never_reads_does_not_grow_herd() {
    if node_here("a_node_primary_that_never_reads_does_not_grow_herd") {
        flood_stays_bounded("to_primary");
    }
}

#[test]
fn a_node_worker_that_never_reads_its_primary_does_not_grow_herd() {
    if node_here("a_node_worker_that_never_reads_its_primary_does_not_grow_herd") {
        flood_stays_bounded("to_worker");
    }
}

#[test]
fn a_node_primary_sending_an_oversized_line_is_stopped_and_started_again() {
    if !node_here("a_node_primary_sending_an_oversized_line_is_stopped_and_started_again") {
        return;
    }
    let config = format!("{RUN}[env]\nFLOOD = \"long_line\"\n");
    let app = fixture("flood.js");
    let herd = Herd::launch("np-long-line", Some(&config), 1, &[], &["node", &app]);
    let broken = herd.wait_for_event("node_primary_broken", &[], 1);
    let pid = number(&broken[0], "pid");
    herd.wait_for_event("node_primary_exited", &[("pid", json!(pid))], 1);
    herd.wait_for_event("node_primary_started", &[], 2);
}

#[test]
fn node_primary_run_without_a_node_app_is_refused_by_name() {
    let dir = scratch_dir("np-refused");
    let config = format!(
        "listen = [\"127.0.0.1:0\"]\nworkers = 1\ncommand = [{:?}]\n{RUN}",
        hello_worker()
    );
    let path = write_config(&dir, &config);
    let path = path.to_str().unwrap();
    let wanted = "invalid `node.primary` = \"run\"";
    let check = herd_cli(&dir, &["check", "-c", path]);
    assert_eq!(check.code, Some(1), "{check:?}");
    assert!(check.stderr.contains(wanted), "{check:?}");
    let run = herd_cli_within(&dir, &["run", "-c", path], Duration::from_secs(15)).unwrap();
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.stderr.contains(wanted) && !run.stderr.contains("worker started"),
        "{run:?}"
    );
    // The flag is the key's, refused alike.
    let flag = herd_cli(
        &dir,
        &[
            "check",
            "--listen",
            "127.0.0.1:0",
            "--node-primary",
            "run",
            "--",
            hello_worker(),
        ],
    );
    assert_eq!(flag.code, Some(1), "{flag:?}");
    assert!(flag.stderr.contains(wanted), "{flag:?}");
    let bad = herd_cli(&dir, &["check", "-c", path, "--node-primary", "sometimes"]);
    assert!(
        bad.stderr.contains("`node.primary`") && bad.stderr.contains("herd, run"),
        "{bad:?}"
    );
}
