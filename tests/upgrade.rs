//! `herd upgrade` (and SIGUSR2): herd re-executes its binary in place and
//! goes on with the same workers. Each test runs herd from a copy of its
//! binary in a scratch directory and replaces that copy (by rename, as a
//! package manager does) with what the upgrade is to find: herd again, a
//! broken program, or a wrapper that passes the dry run and then cannot
//! take over. Under a steady load of real requests, no request may fail,
//! the worker pids and herd's pid stay, and the counters go on.

mod common;

use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use common::load::{request, Load, STEADY};
use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;

/// `Handled by worker <pid>`, as the example workers and the seed's Node
/// app answer.
fn pid_in(body: &str) -> Option<u32> {
    body.strip_prefix("Handled by worker ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// What the binary herd was started as is replaced with.
enum Binary {
    /// herd, freshly copied: an upgrade to the same version is a real re-exec.
    Herd,
    /// A program that is no herd at all: it fails the dry run.
    Broken,
    /// Passes the dry run (it runs herd for it), then runs herd with a config
    /// file that does not exist: the takeover fails after the exec, and the
    /// old binary must take over again.
    FailsToTakeOver,
}

/// Copies herd into `dir` as `herd`, the path herd is then started as.
fn install(dir: &Path) -> PathBuf {
    let path = dir.join("herd");
    replace(dir, Binary::Herd);
    path
}

/// Replaces `dir/herd` by renaming a new file over it: a herd running
/// from the old file keeps its inode, as after a package upgrade.
fn replace(dir: &Path, with: Binary) {
    let staged = dir.join("herd.new");
    let _ = std::fs::remove_file(&staged);
    match with {
        Binary::Herd => {
            std::fs::copy(herd_bin(), &staged).unwrap();
        }
        Binary::Broken => script(&staged, "echo 'not herd: a broken build' >&2\nexit 1\n"),
        Binary::FailsToTakeOver => script(
            &staged,
            &format!(
                "if [ \"$1\" = __upgrade-probe ]; then exec {herd} \"$@\"; fi\n\
                 exec {herd} run -c /nonexistent/herd.toml\n",
                herd = herd_bin()
            ),
        ),
    }
    std::fs::rename(&staged, dir.join("herd")).unwrap();
}

fn script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// `herd upgrade`, with its own deadline (the dry run may take seconds).
fn upgrade(dir: &Path) -> CliRun {
    herd_cli_within(dir, &["upgrade"], Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"))
}

fn upgrades(status: &Value) -> (u64, u64) {
    let record = &status["upgrades"];
    (
        record["done"].as_u64().unwrap(),
        record["failed"].as_u64().unwrap(),
    )
}

fn handed_off(status: &Value) -> u64 {
    workers_of(status)
        .iter()
        .map(|w| w["handed_off"].as_u64().unwrap())
        .sum()
}

/// herd from a copy of its binary, with `workers` of `command`.
fn start(name: &str, workers: usize, command: &[&str]) -> (Herd, PathBuf) {
    let workers = workers.to_string();
    let mut flags = vec!["--workers", &workers, "--"];
    flags.extend_from_slice(command);
    start_with_flags(name, &flags)
}

/// herd from a copy of its binary on 127.0.0.1:0, with `flags`.
fn start_with_flags(name: &str, flags: &[&str]) -> (Herd, PathBuf) {
    let dir = scratch_dir(name);
    let binary = install(&dir);
    let mut args = vec!["--listen", "127.0.0.1:0"];
    args.extend_from_slice(flags);
    let herd = Herd::start_binary(&dir, &binary, &[], &args);
    (herd, dir)
}

#[test]
fn upgrades_under_load_keep_every_worker_and_lose_no_request() {
    let (herd, dir) = start("upgrade-load", 2, &[hello_worker()]);
    herd.wait_all_ready(2);
    let before = herd.status();
    let load = Load::start(herd.addr(), pid_in);
    load.settle(STEADY);

    let steps = [
        (Binary::Herd, Some(0), "upgraded: herd"),
        (Binary::Broken, Some(1), "not herd: a broken build"),
        (Binary::FailsToTakeOver, Some(1), "cannot read config file"),
        (Binary::Herd, Some(0), "upgraded: herd"),
    ];
    for (binary, code, says) in steps {
        replace(&dir, binary);
        let run = upgrade(&dir);
        assert_eq!(run.code, code, "{run:?}\nlog:\n{}", herd.log_text());
        assert!(
            run.stdout.contains(says) || run.stderr.contains(says),
            "{says:?} in {run:?}"
        );
        load.settle(STEADY);
    }
    let outcomes = load.finish();
    let failed: Vec<_> = outcomes.iter().filter(|o| o.answer.is_err()).collect();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());

    let after = herd.status();
    assert_eq!(after["pid"], before["pid"], "herd kept its pid");
    assert_eq!(after["pid"].as_u64(), Some(u64::from(herd.pid())));
    assert_eq!(pids_of(&after), pids_of(&before), "the same workers");
    assert_eq!(upgrades(&after), (2, 2), "{after}");
    // Counted across the upgrades: every request answered was handed off.
    assert_eq!(handed_off(&after), outcomes.len() as u64, "{after}");
    assert_eq!(herd.events("upgraded", &[]).len(), 2);
    assert_eq!(herd.events("upgrade_failed", &[]).len(), 2);
    assert!(
        herd.events("worker_started", &[]).len() == 2,
        "no worker was started again:\n{}",
        herd.log_text()
    );
}

#[test]
fn the_seeds_node_cluster_app_is_upgraded_under_load() {
    if skip_unless_node("the_seeds_node_cluster_app_is_upgraded_under_load") {
        return;
    }
    // Kernel rotation (each slot's own socket, dealt to by a BPF program:
    // Node's default where CAP_BPF allows), and the hand-off's.
    for rotation in ["auto", "handoff"] {
        node_app_upgraded_under_load(rotation);
    }
}

fn node_app_upgraded_under_load(rotation: &str) {
    let app = format!(
        "{}/workers/node/cluster-server.js",
        env!("CARGO_MANIFEST_DIR")
    );
    // No `listen`: herd binds what the app listens on (PORT=0, any free
    // port), which is where kernel rotation deals.
    let dir = scratch_dir(&format!("upgrade-node-{rotation}"));
    let binary = install(&dir);
    let args = ["--workers", "2", "--rotation", rotation, "--", "node", &app];
    let herd = Herd::start_binary(&dir, &binary, &[("PORT", "0")], &args);
    herd.wait_all_ready(2);
    let listening: std::net::SocketAddr = herd.status()["listen"][0]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], listening.port()));
    let kernel_dealt = |status: &Value| status["kernel_dealt"].as_u64().unwrap_or(0);
    // Where the program loads (CAP_BPF), `auto` is the kernel's rotation.
    let kernel = rotation == "auto" && herd.events("kernel_rotation_unavailable", &[]).is_empty();
    if kernel {
        wait_until("the kernel dealing", || {
            request(addr, pid_in).unwrap();
            (kernel_dealt(&herd.status()) > 0).then_some(())
        });
    }
    let outcomes = upgraded_under_load(&herd, &dir, addr, pid_in, 2, || {
        if kernel {
            // The kernel deals to the workers' own sockets again after the
            // upgrades (counted every 500 ms), not only herd's hand-off.
            let dealt_after = kernel_dealt(&herd.status());
            wait_until("the kernel dealing after the upgrades", || {
                (kernel_dealt(&herd.status()) > dealt_after).then_some(())
            });
        }
    });
    // Both workers still get their turns after the upgrades.
    assert_eq!(last_answered_by(&outcomes).len(), 2, "{rotation}");
}

/// `upgrades` upgrades of `herd` (to herd again) under a steady load on
/// `addr`, `between` called after them with the load still on: no request
/// may fail and the workers stay the same. The outcomes.
fn upgraded_under_load(
    herd: &Herd,
    dir: &Path,
    addr: std::net::SocketAddr,
    identify: common::load::Identify,
    upgrades: usize,
    between: impl Fn(),
) -> Vec<common::load::Outcome> {
    let before = pids_of(&herd.status());
    let load = Load::start(addr, identify);
    load.settle(STEADY);
    for _ in 0..upgrades {
        replace(dir, Binary::Herd);
        let run = upgrade(dir);
        assert_eq!(run.code, Some(0), "{run:?}\nlog:\n{}", herd.log_text());
        load.settle(STEADY);
    }
    between();
    let outcomes = load.finish();
    let failed: Vec<_> = outcomes.iter().filter(|o| o.answer.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} failed: {failed:?}\nlog:\n{}",
        failed.len(),
        herd.log_text()
    );
    assert_eq!(pids_of(&herd.status()), before, "the same workers");
    outcomes
}

/// The workers that answered the last [`STEADY`] requests.
fn last_answered_by(outcomes: &[common::load::Outcome]) -> std::collections::BTreeSet<u32> {
    outcomes
        .iter()
        .rev()
        .take(STEADY)
        .filter_map(|o| o.answer.as_ref().ok().copied())
        .collect()
}

/// Node is installed by scripts/test; without it (outside CI) skip.
fn skip_unless_node(test: &str) -> bool {
    let found = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    !found && skip_unless_ci(test, "needs node")
}

/// Connections sent to a worker that has not acknowledged them yet, and
/// connections waiting in herd for a worker, are carried over the exec:
/// the worker is stopped while they come in, herd upgrades, and once the
/// worker goes on every one is answered.
#[test]
fn connections_in_flight_and_queued_are_carried_over() {
    let dir = scratch_dir("upgrade-in-flight");
    let binary = install(&dir);
    let config = write_config(&dir, "hang_timeout = \"60s\"\n[handoff]\nmax_unacked = 2\n");
    let config = config.display().to_string();
    let args = [
        "-c",
        &config,
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--",
        hello_worker(),
    ];
    let herd = Herd::start_binary(&dir, &binary, &[], &args);
    let worker = *herd.wait_all_ready(1).iter().next().unwrap();
    let addr = herd.addr();
    let metrics = metrics_addr(&herd);
    let accepted = || {
        let (_, _, text) = http(metrics, "GET", "/metrics");
        sample(&text, "herd_connections_accepted_total{listener=\"0\"}")
    };
    signal(worker, Signal::SIGSTOP);
    let clients: Vec<_> = (0..5)
        .map(|_| thread::spawn(move || request(addr, pid_in)))
        .collect();
    // Two in flight to the stopped worker (max_unacked), three queued.
    wait_until("5 connections accepted", || {
        (accepted() >= 5.0).then_some(())
    });
    replace(&dir, Binary::Herd);
    let run = upgrade(&dir);
    assert_eq!(run.code, Some(0), "{run:?}\nlog:\n{}", herd.log_text());
    // Counted before the exec, carried over it.
    assert_eq!(accepted(), 5.0);
    signal(worker, Signal::SIGCONT);
    for client in clients {
        let answered = client.join().unwrap();
        assert_eq!(answered.ok(), Some(worker), "log:\n{}", herd.log_text());
    }
}

#[test]
fn sigusr2_upgrades_as_herd_upgrade_does() {
    let (herd, dir) = start("upgrade-sigusr2", 1, &[hello_worker()]);
    let before = herd.wait_all_ready(1);
    replace(&dir, Binary::Herd);
    signal(herd.pid(), Signal::SIGUSR2);
    herd.wait_for_event("upgraded", &[], 1);
    assert_eq!(herd.wait_all_ready(1), before);
    assert_eq!(upgrades(&herd.status()), (1, 0));
    request(herd.addr(), pid_in).unwrap();
}

/// The OS-scheduled modes' sockets are carried too: `reuseport` (each
/// slot its own socket, dealt by the kernel's hash), kernel rotation of
/// workers that accept from their own sockets, and `shared`.
#[test]
fn workers_that_accept_themselves_are_upgraded_under_load() {
    for flags in [
        &["--mode", "reuseport"][..],
        &["--mode", "round-robin", "--rotation", "kernel"][..],
        &["--mode", "shared"][..],
    ] {
        let name = format!("upgrade-{}", flags.last().unwrap());
        let mut args = vec!["--workers", "2"];
        args.extend_from_slice(flags);
        args.extend(["--", hello_worker()]);
        let (herd, dir) = start_with_flags(&name, &args);
        herd.wait_all_ready(2);
        let outcomes = upgraded_under_load(&herd, &dir, herd.addr(), pid_in, 1, || {});
        // Both workers are still dealt to.
        assert_eq!(last_answered_by(&outcomes).len(), 2, "{flags:?}");
    }
}

/// gunicorn, ready by `NOTIFY_SOCKET` in `shared` mode: each arbiter's
/// notification socket is carried, with what it said there, and read on:
/// what it says when it stops after the upgrade still reaches herd.
#[test]
fn gunicorn_ready_by_notify_is_upgraded_under_load() {
    let gunicorn = format!("{}/.venv-tests/bin/gunicorn", env!("CARGO_MANIFEST_DIR"));
    if !Path::new(&gunicorn).exists() {
        skip_unless_ci(
            "gunicorn_ready_by_notify_is_upgraded_under_load",
            "needs gunicorn in .venv-tests (scripts/test installs it)",
        );
        return;
    }
    let fixtures = format!("{}/tests/fixtures", env!("CARGO_MANIFEST_DIR"));
    let (herd, dir) = start_with_flags(
        "upgrade-gunicorn",
        &[
            "--workers",
            "2",
            "--mode",
            "shared",
            "--ready",
            "notify",
            "--",
            &gunicorn,
            "--chdir",
            &fixtures,
            "--workers",
            "1",
            // Two arbiters would share gunicorn's default control socket path.
            "--no-control-socket",
            "gunicorn_app:app",
        ],
    );
    herd.wait_all_ready(2);
    upgraded_under_load(&herd, &dir, herd.addr(), arbiter_in, 1, || {});
    let after = herd.status();
    for worker in workers_of(&after) {
        assert_eq!(
            worker["notify_status"], "Gunicorn arbiter booted",
            "{after:#}"
        );
    }
}

/// A notification socket is read on after the upgrade: what the worker
/// says there later (a STATUS= after each answer) reaches `herd status`.
#[test]
fn a_notify_workers_socket_is_read_after_the_upgrade() {
    let server = format!(
        "{}/tests/fixtures/notify_server.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let (herd, dir) = start_with_flags(
        "upgrade-notify",
        &[
            "--workers",
            "1",
            "--mode",
            "shared",
            "--ready",
            "notify",
            "--",
            "python3",
            &server,
            "counting",
        ],
    );
    herd.wait_all_ready(1);
    let answer = || {
        let (code, _, body) = http(herd.addr(), "GET", "/");
        assert_eq!(
            (code, body.starts_with("notified by")),
            (200, true),
            "{body}"
        );
    };
    answer();
    let said = |status: &Value| workers_of(status)[0]["notify_status"].clone();
    wait_until("served 1 in herd status", || {
        (said(&herd.status()) == "served 1").then_some(())
    });
    replace(&dir, Binary::Herd);
    let run = upgrade(&dir);
    assert_eq!(run.code, Some(0), "{run:?}\n{}", herd.log_text());
    assert_eq!(said(&herd.status()), "served 1", "carried");
    answer();
    wait_until("served 2 in herd status, after the upgrade", || {
        (said(&herd.status()) == "served 2").then_some(())
    });
}

/// `gunicorn arbiter <pid> worker <pid>`: the arbiter, herd's worker.
fn arbiter_in(body: &str) -> Option<u32> {
    body.strip_prefix("gunicorn arbiter ")?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

/// A Node app's own primary (`node.primary = "run"`) goes on through the
/// upgrade: the same process (its timer still ticking), told of a
/// worker's exit and of its replacement after it, as before.
#[test]
fn a_node_apps_own_primary_is_carried_over() {
    if skip_unless_node("a_node_apps_own_primary_is_carried_over") {
        return;
    }
    let app = format!(
        "{}/tests/fixtures/node-primary/exit-counter.js",
        env!("CARGO_MANIFEST_DIR")
    );
    let dir = scratch_dir("upgrade-node-primary");
    let binary = install(&dir);
    let config = write_config(&dir, "[node]\nprimary = \"run\"\n");
    let config = config.display().to_string();
    let args = [
        "-c",
        &config,
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--",
        "node",
        &app,
    ];
    let herd = Herd::start_binary(&dir, &binary, &[], &args);
    herd.wait_all_ready(2);
    let port: u16 = wait_until("the primary's port", || {
        let text = herd.log_text();
        let line = text
            .lines()
            .find(|l| l.starts_with("[primary] primary on "))?;
        line.rsplit(' ').next()?.parse().ok()
    });
    let primary = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let report = |path: &str| -> Value {
        let (code, _, body) = http(primary, "GET", path);
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    let before = report("/");
    let outcomes = upgraded_under_load(&herd, &dir, herd.addr(), pid_in, 1, || {});
    assert!(!outcomes.is_empty());
    let after = report("/");
    assert_eq!(after["pid"], before["pid"], "the same primary");
    assert!(
        after["ticks"].as_u64() > before["ticks"].as_u64(),
        "{after}"
    );
    // The primary kills worker 1 itself: herd tells it of the exit, and
    // of the worker that replaces it, over the carried channel.
    report("/kill/1");
    wait_until(
        "the exit and a new worker online, seen by the primary",
        || {
            let seen = report("/");
            let onlines = seen["seen"]
                .as_array()?
                .iter()
                .filter(|e| e["event"] == "online")
                .count();
            (seen["exits"] == 1 && onlines >= 3).then_some(())
        },
    );
}

/// What herd cannot carry yet is refused by name, before anything is
/// frozen, and herd goes on serving.
#[test]
fn what_cannot_be_carried_over_is_refused_by_name() {
    // A worker not serving yet (this one never says READY=1).
    let (herd, dir) = start_with_flags(
        "upgrade-refused",
        &["--workers", "1", "--ready", "notify", "--", "sleep", "60"],
    );
    herd.wait_for_event("worker_started", &[], 1);
    let run = upgrade(&dir);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains("the worker in slot 0 is starting"),
        "{run:?}"
    );
    assert_eq!(upgrades(&herd.status()), (0, 1));
}

/// The dry run answers every handover version the binary reads, a line
/// each: an older herd finds its own, and this one finds version 2, which
/// carries counter pages and queued hand-offs.
#[test]
fn the_dry_run_names_every_handover_version_it_reads() {
    let dir = scratch_dir("upgrade-probe-versions");
    let run = herd_cli(
        &dir,
        &[
            "__upgrade-probe",
            "-c",
            "/dev/null",
            "--listen",
            "127.0.0.1:0",
            "--",
            hello_worker(),
        ],
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines,
        ["herd-handover 1", "herd-handover 2", "herd-handover 3"],
        "{run:?}"
    );
}

/// Counter pages and herd's copies of the workers' ends are carried: the
/// counts go on from where they were, and hand-offs queued to a worker
/// that is killed after the upgrade are taken back by the new herd and
/// served by the other worker.
#[test]
fn counter_pages_and_queued_hand_offs_are_carried() {
    let (herd, dir) = start_with_flags(
        "upgrade-pages",
        &[
            "--metrics",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--",
            hello_worker(),
        ],
    );
    let pids = herd.wait_ready(2);
    herd.wait_all_ready(2);
    let addr = herd.addr();
    let metrics = metrics_addr(&herd);
    for _ in 0..10 {
        request(addr, pid_in).unwrap();
    }
    assert_eq!(handed_off(&herd.status()), 10);
    let stopped = pids[&0];
    signal(stopped, Signal::SIGSTOP);
    let clients: Vec<_> = (0..4)
        .map(|_| thread::spawn(move || request(addr, pid_in)))
        .collect();
    wait_until("2 hand-offs queued to the stopped worker", || {
        let (_, _, text) = http(metrics, "GET", "/metrics");
        (sample(&text, "herd_handoffs_in_flight") == 2.0).then_some(())
    });
    replace(&dir, Binary::Herd);
    let run = upgrade(&dir);
    assert_eq!(run.code, Some(0), "{run:?}\nlog:\n{}", herd.log_text());
    signal(stopped, Signal::SIGKILL);
    for client in clients {
        let answered = client.join().unwrap();
        assert_eq!(answered.ok(), Some(pids[&1]), "log:\n{}", herd.log_text());
    }
    herd.wait_for_event("requeued", &[("requeued", serde_json::json!(2))], 1);
    wait_until("14 counted, before and after the upgrade", || {
        (handed_off(&herd.status()) == 14).then_some(())
    });
}
