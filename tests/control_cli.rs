//! The control plane of a running herd: `herd status`, `scale`, `reload` and
//! `stop` over the control socket, the socket's guards, SIGTTIN/SIGTTOU/SIGHUP,
//! restart backoff and crash-loop reporting, and the privilege drop for
//! workers. Real herd, real workers, real sockets; every wait has a deadline.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;
use nix::sys::signal::Signal;

/// The event saying how worker `pid` ended, once there is one.
fn exit_of(herd: &Herd, pid: u32) -> Value {
    herd.wait_for_event("worker_exited", &[("pid", json!(pid))], 1)
        .remove(0)
}

/// Seconds since midnight (UTC) of a log event's RFC 3339 timestamp,
/// e.g. `2026-11-23T22:32:19.010947Z`.
fn log_seconds(event: &Value) -> f64 {
    let stamp = event["timestamp"].as_str().expect("timestamp");
    let time = stamp
        .split('T')
        .nth(1)
        .and_then(|t| t.strip_suffix('Z'))
        .unwrap_or_else(|| panic!("no RFC 3339 timestamp in {event}"));
    let parts: Vec<f64> = time.split(':').map(|p| p.parse().unwrap()).collect();
    parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
}

/// `herd run` in `dir` that must refuse to start: exit 3 with `message`, no
/// worker. Returns the exited herd (dropping it removes `dir`).
fn expect_refusal(dir: &Path, extra: &[&str], message: &str) -> Herd {
    let mut args = vec!["--listen", "127.0.0.1:0", "--workers", "1"];
    args.extend_from_slice(extra);
    args.extend(["--", hello_worker()]);
    let mut herd = Herd::start_in(dir, &args);
    // Wait for the line itself: the process may exit before its output is read.
    herd.wait_for_error_message(message);
    let status = herd.wait_exit();
    let log = herd.log_text();
    assert_eq!(status.code(), Some(3), "exit status; log:\n{log}");
    // stderr is one ordered stream: a worker start would precede the error.
    let started = herd.events("worker_started", &[]);
    assert!(started.is_empty(), "a worker started:\n{log}");
    herd
}

/// `herd status` shows one row per slot, as a table and as JSON, with the pids
/// that said READY and the connections each slot was handed.
#[test]
fn status_shows_a_table_and_json_for_every_slot() {
    let herd = Herd::launch("ctl-status", None, 3, &[], &[hello_worker()]);
    let ready = herd.wait_ready(3);
    let dir = &herd.dir;

    let table = herd_ok(dir, &["status"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with(&format!("herd pid {} · running · up ", herd.pid())),
        "{table}"
    );
    assert!(
        lines[0].contains(&format!(
            "· mode round-robin · listening on {}",
            herd.addr()
        )),
        "{table}"
    );
    let header: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        header,
        ["slot", "pid", "state", "uptime", "restarts", "handed", "memory", "cpu"]
    );
    assert_eq!(lines.len(), 5, "header + 3 rows:\n{table}");
    for (row, (slot, pid)) in lines[2..].iter().zip(&ready) {
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[..3], [&slot.to_string(), &pid.to_string(), "ready"]);
    }

    let status = status_json(dir);
    assert_eq!(status["pid"], herd.pid());
    assert_eq!(status["phase"], "running");
    assert_eq!(status["mode"], "round-robin");
    assert_eq!(status["listen"][0], herd.addr().to_string());
    assert!(all_ready(&status, 3), "{status:#}");
    assert_eq!(pids_of(&status), ready);

    let mut answered: BTreeMap<u64, u64> = BTreeMap::new();
    for i in 0..7 {
        let answer = get(herd.addr()).unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(ready[&answer.slot], answer.pid);
        *answered.entry(answer.slot as u64).or_default() += 1;
    }
    // Counted when the worker acknowledges, which may trail its answer.
    let status = wait_for_status(dir, "7 connections handed off", |s| {
        workers_of(s)
            .iter()
            .map(|w| w["handed_off"].as_u64().unwrap())
            .sum::<u64>()
            >= 7
    });
    let handed: BTreeMap<u64, u64> = workers_of(&status)
        .iter()
        .map(|w| {
            (
                w["slot"].as_u64().unwrap(),
                w["handed_off"].as_u64().unwrap(),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(handed, answered, "handed_off per slot vs answers per slot");
    herd.stop();
}

/// `herd scale N` adds slots that start serving and drains the highest ones.
#[test]
fn scale_up_and_down_at_runtime() {
    let herd = Herd::launch("ctl-scale", None, 2, &[], &[hello_worker()]);
    herd.wait_ready(2);
    let dir = &herd.dir;

    assert_eq!(herd_ok(dir, &["scale", "4"]).trim(), "workers: 2 -> 4");
    let ready = herd.wait_ready(4);
    assert_eq!(ready.keys().copied().collect::<Vec<_>>(), [0, 1, 2, 3]);
    let status = wait_for_status(dir, "4 ready slots", |s| all_ready(s, 4));
    assert_eq!(pids_of(&status), ready);

    assert_eq!(herd_ok(dir, &["scale", "1"]).trim(), "workers: 4 -> 1");
    let status = status_json(dir);
    assert!(all_ready(&status, 1), "{status:#}");
    assert_eq!(pids_of(&status), BTreeMap::from([(0, ready[&0])]));
    for slot in 1..4 {
        let exit = exit_of(&herd, ready[&slot]);
        assert_eq!(exit["code"], 0, "slot {slot} did not drain cleanly: {exit}");
    }
    for i in 0..4 {
        let answer = get(herd.addr()).unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(answer.pid, ready[&0]);
    }
    herd.stop();
}

/// SIGTTIN adds a worker, SIGTTOU removes one but never the last.
#[test]
fn sigttin_and_sigttou_change_the_worker_count() {
    let herd = Herd::launch("ctl-signals", None, 2, &[], &[hello_worker()]);
    herd.wait_ready(2);
    let dir = &herd.dir;

    signal(herd.pid(), Signal::SIGTTIN);
    let ttin = [("signal", json!("SIGTTIN")), ("workers", json!(3))];
    herd.wait_for_event("signal_scaled", &ttin, 1);
    herd.wait_for_event("scaled", &[("from", json!(2)), ("to", json!(3))], 1);
    let ready = herd.wait_ready(3);
    wait_for_status(dir, "3 ready slots", |s| all_ready(s, 3));

    // One at a time: the kernel may merge a pending signal with the next.
    for (i, (from, to)) in [(3, 2), (2, 1), (1, 1)].into_iter().enumerate() {
        signal(herd.pid(), Signal::SIGTTOU);
        // This SIGTTOU is answered, with `to` workers.
        let ttou = herd.wait_for_event("signal_scaled", &[("signal", json!("SIGTTOU"))], i + 1);
        assert_eq!(ttou[i]["workers"], to, "{ttou:?}");
        if from != to {
            herd.wait_for_event("scaled", &[("from", json!(from)), ("to", json!(to))], 1);
        }
    }
    let status = status_json(dir);
    assert_eq!(pids_of(&status), BTreeMap::from([(0, ready[&0])]));
    for slot in 1..3 {
        let exit = exit_of(&herd, ready[&slot]);
        assert_eq!(exit["code"], 0, "{exit}");
    }
    assert_eq!(get(herd.addr()).unwrap().pid, ready[&0]);
    herd.stop();
}

/// `herd stop` returns once herd has stopped cleanly and its socket is gone.
#[test]
fn stop_waits_for_herd_and_removes_the_socket() {
    let mut herd = Herd::launch("ctl-stop", None, 2, &[], &[hello_worker()]);
    herd.wait_ready(2);
    let dir = herd.dir.clone();
    let socket = dir.join("herd.sock");
    assert!(socket.exists());

    let run = herd_cli(&dir, &["stop"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.stdout.trim(), "stopped: every worker finished in time");
    let status = herd.wait_exit();
    assert_eq!(status.code(), Some(0), "log:\n{}", herd.log_text());
    assert!(!socket.exists(), "control socket left behind");

    let run = herd_cli(&dir, &["status"]);
    assert_eq!(run.code, Some(3), "{run:?}");
    assert!(
        run.stderr
            .contains("no herd is running with control socket"),
        "{run:?}"
    );
}

/// The control socket is 0600 and herd refuses a live, foreign or non-socket
/// path at exit 3, but replaces its own stale socket.
#[test]
fn control_socket_is_private_and_guarded() {
    let herd = Herd::launch("ctl-guard", None, 1, &[], &[hello_worker()]);
    herd.wait_ready(1);
    let socket = herd.dir.join("herd.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");

    let live = socket.display().to_string();
    expect_refusal(
        &scratch_dir("ctl-guard-live"),
        &["--control", &live],
        "another herd is running there",
    );
    // The refused herd left the running one's socket alone.
    assert_eq!(status_json(&herd.dir)["pid"], herd.pid());

    let dir = scratch_dir("ctl-guard-file");
    std::fs::write(dir.join("herd.sock"), "not a socket").unwrap();
    let refused = expect_refusal(&dir, &[], "exists and is not a socket");
    let text = std::fs::read_to_string(dir.join("herd.sock")).unwrap();
    assert_eq!(text, "not a socket", "the file was replaced");
    drop(refused);

    let dir = scratch_dir("ctl-guard-uid");
    drop(std::os::unix::net::UnixListener::bind(dir.join("herd.sock")).unwrap());
    std::os::unix::fs::chown(dir.join("herd.sock"), Some(65534), None).unwrap();
    let refused = expect_refusal(&dir, &[], "owned by uid 65534, not by this user");
    assert!(
        dir.join("herd.sock").exists(),
        "the foreign socket was removed"
    );
    drop(refused);

    let dir = scratch_dir("ctl-guard-stale");
    drop(std::os::unix::net::UnixListener::bind(dir.join("herd.sock")).unwrap());
    let stale = Herd::start_in(
        &dir,
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--",
            hello_worker(),
        ],
    );
    let ready = stale.wait_ready(1);
    let status = status_json(&dir);
    assert_eq!(status["pid"], stale.pid());
    assert_eq!(pids_of(&status), ready);
    assert_eq!(stale.stop().code(), Some(0));
    herd.stop();
}

/// `herd reload` re-reads the config and replaces every worker; an invalid
/// config is refused and the running workers keep serving; SIGHUP reloads too.
#[test]
fn reload_re_reads_the_config_and_refuses_an_invalid_one() {
    let dir = scratch_dir("ctl-reload");
    let config = write_config(&dir, "workers = 2\n");
    let config = config.display().to_string();
    let herd = Herd::start_in(
        &dir,
        &[
            "-c",
            &config,
            "--listen",
            "127.0.0.1:0",
            "--",
            hello_worker(),
        ],
    );
    let before = herd.wait_ready(2);

    let out = herd_ok(&dir, &["reload"]);
    assert!(out.starts_with("reloaded 2 worker(s) in "), "{out}");
    let after = herd.wait_ready(4);
    assert_eq!(after.len(), 2);
    for slot in 0..2 {
        assert_ne!(before[&slot], after[&slot], "slot {slot} was not replaced");
        let exit = exit_of(&herd, before[&slot]);
        assert_eq!(exit["code"], 0, "{exit}");
    }
    let status = wait_for_status(&dir, "2 ready slots", |s| all_ready(s, 2));
    assert_eq!(pids_of(&status), after);

    std::fs::write(&config, "workers = 0\n").unwrap();
    let run = herd_cli(&dir, &["reload"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr
            .contains("reload refused, keeping the running config: invalid `workers` = 0"),
        "{run:?}"
    );
    assert_eq!(pids_of(&status_json(&dir)), after);
    for i in 0..4 {
        let answer = get(herd.addr()).unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(after[&answer.slot], answer.pid);
    }

    std::fs::write(&config, "workers = 3\n").unwrap();
    let out = herd_ok(&dir, &["reload"]);
    assert!(out.starts_with("reloaded "), "{out}");
    let status = wait_for_status(&dir, "3 ready slots", |s| all_ready(s, 3));
    let third = pids_of(&status);
    for slot in 0..2 {
        assert_ne!(third[&slot], after[&slot], "slot {slot} was not replaced");
    }

    signal(herd.pid(), Signal::SIGHUP);
    herd.wait_for_event("sighup_reloaded", &[], 1);
    // The SIGHUP's answer follows the end of the reload it started.
    let finished = herd.events("reload_finished", &[]);
    assert_eq!(finished.last().unwrap()["replaced"], 3, "{finished:?}");
    let status = wait_for_status(&dir, "3 ready slots", |s| all_ready(s, 3));
    for (slot, pid) in pids_of(&status) {
        assert_ne!(pid, third[&slot], "SIGHUP did not replace slot {slot}");
    }
    herd.stop();
}

/// A worker that keeps failing is restarted after a doubling, capped delay,
/// reported crash-looping, and does not disturb the other slots.
#[test]
fn a_crash_looping_slot_backs_off_and_is_reported() {
    let config = "[restart]\nbackoff_base = \"50ms\"\nbackoff_max = \"400ms\"\n\
                  max_restarts = 3\nwindow = \"60s\"\n";
    let script = "if [ \"$HERD_WORKER_ID\" = 1 ]; then exit 7; fi; exec \"$0\"";
    let herd = Herd::launch(
        "ctl-crashloop",
        Some(config),
        3,
        &[],
        &["sh", "-c", script, hello_worker()],
    );
    let looping = [("slot", json!(1)), ("max_restarts", json!(3))];
    herd.wait_for_event("crash_looping", &looping, 1);
    let exits = herd.wait_for_event("worker_exited", &[("code", json!(7))], 6);
    assert!(exits.iter().all(|e| e["slot"] == 1), "{exits:#?}");

    // Each restart waits the logged delay, which doubles from 50 ms to 400 ms.
    let restart = [("slot", json!(1)), ("replacement", json!(false))];
    let delays: Vec<u64> = herd
        .wait_for_event("restart_scheduled", &restart, 5)
        .iter()
        .map(|e| number(e, "delay_ms"))
        .collect();
    assert_eq!(delays[..5], [50, 100, 200, 400, 400], "{delays:?}");
    let times: Vec<f64> = exits.iter().map(log_seconds).collect();
    let gaps: Vec<f64> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).rem_euclid(86_400.0))
        .collect();
    // herd never restarts sooner than the delay it logged (how much later
    // depends on the machine's load, so that is not asserted).
    for (i, gap) in gaps.iter().take(5).enumerate() {
        assert!(
            *gap >= delays[i] as f64 / 1000.0 - 0.005,
            "gap {i} {gap:.3}s shorter than its delay {} ms: {gaps:?}",
            delays[i]
        );
    }

    let ready = herd.wait_ready(2);
    assert_eq!(ready.keys().copied().collect::<Vec<_>>(), [0, 2]);
    let status = wait_for_status(&herd.dir, "slot 1 crash-looping", |s| {
        let state = |slot: usize| s["workers"][slot]["state"].clone();
        state(0) == "ready" && state(1) == "crash-looping" && state(2) == "ready"
    });
    assert_eq!(status["phase"], "running");
    assert!(status["workers"][1]["restarts"].as_u64().unwrap() >= 5);
    for i in 0..6 {
        let answer = get(herd.addr()).unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_ne!(answer.slot, 1);
        assert_eq!(ready[&answer.slot], answer.pid);
    }
    herd.stop();
}

/// With `user = "nobody"` every worker runs as nobody and still serves.
#[test]
fn workers_can_run_as_an_unprivileged_user() {
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("user nobody");
    // nobody must be able to reach and run the worker binary.
    let worker = Path::new(hello_worker());
    for path in worker.ancestors().filter(|p| !p.as_os_str().is_empty()) {
        let mode = std::fs::metadata(path).unwrap().permissions().mode();
        assert!(
            mode & 0o001 != 0,
            "{} is not executable/searchable by others (mode {mode:o})",
            path.display()
        );
    }

    let herd = Herd::launch(
        "ctl-nobody",
        Some("user = \"nobody\"\n"),
        2,
        &[],
        &[hello_worker()],
    );
    let ready = herd.wait_ready(2);
    for pid in ready.values() {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let ids = |key: &str| -> Vec<u32> {
            let line = status.lines().find(|l| l.starts_with(key)).unwrap();
            line.split_whitespace()
                .skip(1)
                .map(|n| n.parse().unwrap())
                .collect()
        };
        assert_eq!(ids("Uid:"), [nobody.uid.as_raw(); 4], "pid {pid}");
        assert_eq!(ids("Gid:"), [nobody.gid.as_raw(); 4], "pid {pid}");
        assert!(!ids("Groups:").contains(&0), "pid {pid} kept root's group");
    }
    for i in 0..4 {
        let answer = get(herd.addr()).unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(ready[&answer.slot], answer.pid);
    }
    herd.stop();
}

/// Control commands with no herd behind the socket exit 3 and say so.
#[test]
fn control_commands_without_a_running_herd_say_so() {
    let dir = scratch_dir("ctl-none");
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["reload"],
        &["scale", "2"],
        &["stop"],
    ] {
        let run = herd_cli(&dir, args);
        assert_eq!(run.code, Some(3), "`herd {}`: {run:?}", args.join(" "));
        assert!(
            run.stderr
                .contains("no herd is running with control socket"),
            "`herd {}`: {run:?}",
            args.join(" ")
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Scaling down while a rolling reload is under way leaves herd running and
/// the reload finishes on the remaining slots.
#[test]
fn scale_down_during_a_reload_keeps_herd_running() {
    let dir = scratch_dir("ctl-reload-scale");
    let hello = hello_worker();
    let config = write_config(&dir, &format!("workers = 3\ncommand = [{hello:?}]\n"));
    let config = config.display().to_string();
    let herd = Herd::start_in(&dir, &["-c", &config, "--listen", "127.0.0.1:0"]);
    herd.wait_ready(3);
    // The new version starts only once the file `go` exists (bounded by
    // ready_timeout), so the reload is certainly still running when we scale.
    let gated = r#"while [ ! -e go ]; do sleep 0.02; done; exec \"$0\""#;
    let reloaded = format!(
        "workers = 3\nready_timeout = \"20s\"\ncommand = [\"sh\", \"-c\", \"{gated}\", {hello:?}]\n"
    );
    std::fs::write(&config, reloaded).unwrap();
    signal(herd.pid(), Signal::SIGHUP);
    herd.wait_for_event("reloading", &[("workers", json!(3))], 1);
    assert_eq!(herd_ok(&dir, &["scale", "1"]).trim(), "workers: 3 -> 1");
    std::fs::write(dir.join("go"), "").unwrap();
    let status = wait_for_status(&dir, "the reload to finish", |s| {
        s["phase"] == "running" && all_ready(s, 1)
    });
    herd.wait_for_event("sighup_reloaded", &[], 1);
    assert_eq!(get(herd.addr()).unwrap().pid, pids_of(&status)[&0]);
    herd.stop();
}
