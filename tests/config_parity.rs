//! Issue 13, point 9: what `herd check` accepts, `herd run` runs; what
//! `herd reload` says, it did.
//!
//! - A value `herd run` would refuse, crash on, or crash-loop its workers
//!   on is refused by `herd check` (exit 1) and by `herd run` (exit 2,
//!   before any worker starts), both naming the key, the value and why.
//! - A reload that changes a key only a restart can apply is refused,
//!   naming each such key, and changes nothing; the `[handoff]` limits are
//!   applied live.
//! - `user = "..."` gives workers the user's `HOME`, `USER`, `LOGNAME` and
//!   supplementary groups, as `su -` and systemd's `User=` do.

mod common;

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

/// `herd run` that must refuse gets this long before it counts as running.
const RUN_REFUSES_WITHIN: Duration = Duration::from_secs(15);

/// Runs `herd check` and `herd run` on `config` (the worker is hello-worker
/// unless the config names one) and asserts that both refuse it with
/// `message`, `run` before starting any worker.
fn both_refuse(dir: &Path, config: &str, message: &str) {
    let path = write_config(dir, config);
    let path = path.to_str().unwrap();
    let check = herd_cli(dir, &["check", "-c", path]);
    assert_eq!(
        check.code,
        Some(1),
        "`herd check` accepted {config:?}: {check:?}"
    );
    assert!(
        check.stderr.contains(message),
        "`herd check` on {config:?}: expected {message:?} in {:?}",
        check.stderr
    );
    let run = herd_cli_within(dir, &["run", "-c", path], RUN_REFUSES_WITHIN).unwrap_or_else(|e| {
        panic!("`herd run` did not refuse {config:?} ({e}): `herd check` and `herd run` disagree")
    });
    assert_eq!(run.code, Some(2), "`herd run` on {config:?}: {run:?}");
    assert!(
        run.stderr.contains(message),
        "`herd run` on {config:?}: expected {message:?} in {:?}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("worker started"),
        "`herd run` started a worker for {config:?}: {run:?}"
    );
}

fn base(command: &str) -> String {
    format!("listen = [\"127.0.0.1:0\"]\nworkers = 1\ncommand = [{command:?}]\n")
}

#[test]
fn check_refuses_what_run_would_crash_or_crash_loop_on() {
    let dir = scratch_dir("parity-values");
    let hello = hello_worker();
    let config = base(hello);
    let long_control = format!("{}/{}.sock", dir.display(), "c".repeat(110));
    let listen_many: Vec<String> = (0..257).map(|_| "\"127.0.0.1:0\"".to_string()).collect();
    // A port nothing listens on: the refusals come before any bind.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for (extra, message) in [
        // tokio's interval panics on a zero period.
        (
            "monitor_interval = \"0s\"\n".to_string(),
            "invalid `monitor_interval` = \"0s\": must be at least 10ms".to_string(),
        ),
        // Every worker would be killed as it starts.
        (
            "ready_timeout = \"0s\"\n".to_string(),
            "invalid `ready_timeout` = \"0s\": must be more than 0s".to_string(),
        ),
        // ... or before ready_delay made it ready.
        (
            "ready_timeout = \"1s\"\nready_delay = \"1s\"\n".to_string(),
            "invalid `ready_delay` = \"1s\": must be shorter than `ready_timeout` (1s)"
                .to_string(),
        ),
        // A crash loop would restart without a pause.
        (
            "[restart]\nbackoff_base = \"0s\"\n".to_string(),
            "invalid `restart.backoff_base` = \"0s\": must be more than 0s".to_string(),
        ),
        // bind(2) takes at most 107 bytes of path.
        (
            format!("control = {long_control:?}\n"),
            format!(
                "invalid `control` = {long_control:?}: {} bytes long; a Unix socket path holds at most 107",
                long_control.len()
            ),
        ),
        (
            "control = \"\"\n".to_string(),
            "invalid `control` = \"\": empty".to_string(),
        ),
        // The second bind would fail as a busy port.
        (
            format!("listen = [\"127.0.0.1:{port}\", \"0.0.0.0:{port}\"]\n"),
            format!("invalid `listen` = \"0.0.0.0:{port}\": overlaps \"127.0.0.1:{port}\""),
        ),
        (
            format!("listen = [\"127.0.0.1:{port}\"]\n[metrics]\naddress = \"127.0.0.1:{port}\"\n"),
            format!(
                "invalid `metrics.address` = \"127.0.0.1:{port}\": overlaps `listen` \"127.0.0.1:{port}\""
            ),
        ),
        (
            format!("listen = [{}]\n", listen_many.join(", ")),
            "invalid `listen` = [257 addresses]: herd holds at most 256 listeners".to_string(),
        ),
        // Spawning would fail on the NUL byte, for every worker.
        (
            "[env]\nGREETING = \"a\\u0000b\"\n".to_string(),
            "invalid `env.GREETING` = \"a\\0b\": contains a NUL byte".to_string(),
        ),
    ] {
        // The extra line replaces the base's `listen` when it has one.
        let text = if extra.starts_with("listen") {
            format!("workers = 1\ncommand = [{hello:?}]\n{extra}")
        } else {
            format!("{config}{extra}")
        };
        both_refuse(&dir, &text, &message);
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A directory `mode` and, in it, a script `worker` (mode `file_mode`) that
/// execs hello-worker.
fn worker_script(dir: &Path, name: &str, dir_mode: u32, file_mode: u32) -> String {
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub).unwrap();
    let script = sub.join("worker");
    std::fs::write(&script, format!("#!/bin/sh\nexec {}\n", hello_worker())).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(file_mode)).unwrap();
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(dir_mode)).unwrap();
    script.display().to_string()
}

/// herd (root, in these tests) can run them; `nobody` cannot, and every
/// start would fail with EACCES.
#[test]
fn check_refuses_a_program_the_configured_user_cannot_run() {
    assert!(nix::unistd::geteuid().is_root(), "these tests run as root");
    let dir = scratch_dir("parity-user");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let private_file = worker_script(&dir, "open", 0o755, 0o700);
    let private_dir = worker_script(&dir, "closed", 0o700, 0o755);
    let runnable = worker_script(&dir, "fine", 0o755, 0o755);
    let private_cwd = dir.join("private-cwd");
    std::fs::create_dir_all(&private_cwd).unwrap();
    std::fs::set_permissions(&private_cwd, std::fs::Permissions::from_mode(0o700)).unwrap();
    for (config, message) in [
        (
            format!("user = \"nobody\"\n{}", base(&private_file)),
            format!(
                "invalid `command` = {private_file:?}: {private_file} is not executable by user \"nobody\""
            ),
        ),
        (
            format!("user = \"nobody\"\n{}", base(&private_dir)),
            format!(
                "invalid `command` = {private_dir:?}: {} is not searchable by user \"nobody\"",
                dir.join("closed").display()
            ),
        ),
        (
            format!(
                "user = \"nobody\"\ncwd = {:?}\n{}",
                private_cwd.display().to_string(),
                base(&runnable)
            ),
            format!(
                "invalid `cwd` = {:?}: {} is not searchable by user \"nobody\"",
                private_cwd.display().to_string(),
                private_cwd.display()
            ),
        ),
    ] {
        both_refuse(&dir, &config, &message);
    }
    // Without `user`, root runs both: check says so, and run serves.
    let check = herd_cli(
        &dir,
        &[
            "check",
            "-c",
            write_config(&dir, &base(&private_file)).to_str().unwrap(),
        ],
    );
    assert_eq!(check.code, Some(0), "{check:?}");
    let _ = std::fs::remove_dir_all(dir);
}

// ---- reload ----

/// A config for a reload test: two hello-workers on 127.0.0.1:0, plus `extra`.
fn reload_config(extra: &str) -> String {
    format!(
        "listen = [\"127.0.0.1:0\"]\nworkers = 2\ncommand = [{:?}]\n{extra}",
        hello_worker()
    )
}

/// A reload that changes a key only a restart can apply exits 1 naming it,
/// and changes nothing, not even the keys a reload could apply.
#[test]
fn reload_refuses_each_key_that_needs_a_restart_and_changes_nothing() {
    let dir = scratch_dir("parity-reload");
    let path = write_config(&dir, &reload_config(""));
    let herd = Herd::start_in(&dir, &["-c", path.to_str().unwrap()]);
    herd.wait_all_ready(2);
    let before = pids_of(&herd.status());
    let cases = [
        ("listen", "listen = [\"127.0.0.2:0\"]\n"),
        ("backlog", "backlog = 128\n"),
        ("mode", "mode = \"sticky\"\n"),
        ("kill_mode", "kill_mode = \"process-group\"\n"),
        ("protocol", "protocol = \"node-cluster\"\n"),
        ("control", "control = \"other.sock\"\n"),
        ("monitor_interval", "monitor_interval = \"2s\"\n"),
        ("metrics.address", "[metrics]\naddress = \"127.0.0.1:0\"\n"),
    ];
    for (key, change) in cases {
        // `workers` could change by reload: it must not, with a refused key.
        let text = if key == "listen" {
            format!("workers = 3\ncommand = [{:?}]\n{change}", hello_worker())
        } else {
            format!(
                "listen = [\"127.0.0.1:0\"]\nworkers = 3\ncommand = [{:?}]\n{change}",
                hello_worker()
            )
        };
        std::fs::write(&path, text).unwrap();
        let run = herd_cli(&dir, &["reload"]);
        assert_eq!(run.code, Some(1), "a reload changing `{key}`: {run:?}");
        assert!(
            run.stderr.contains(&format!("`{key}`")) && run.stderr.contains("restart herd"),
            "a reload changing `{key}` must name it and say it needs a restart: {run:?}"
        );
        let status = status_json(&dir);
        assert_eq!(pids_of(&status), before, "`{key}`: {status:#}");
        assert_eq!(status["phase"], "running");
    }
    // Several at once are named together.
    std::fs::write(
        &path,
        reload_config("backlog = 64\nmode = \"least-conn\"\n"),
    )
    .unwrap();
    let run = herd_cli(&dir, &["reload"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains("`backlog` (511 -> 64)")
            && run.stderr.contains("`mode` (round-robin -> least-conn)"),
        "{run:?}"
    );
    // What a reload applies, it applies: new workers with the new environment.
    std::fs::write(
        &path,
        reload_config("[env]\nRELOADED = \"yes\"\n[handoff]\nmax_unacked = 8\n"),
    )
    .unwrap();
    let out = herd_ok(&dir, &["reload"]);
    assert!(out.starts_with("reloaded 2 worker(s)"), "{out}");
    let after = pids_of(&wait_for_status(&dir, "2 new workers", |s| {
        all_ready(s, 2)
            && pids_of(s)
                .values()
                .all(|pid| !before.values().any(|b| b == pid))
    }));
    for pid in after.values() {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        assert!(
            String::from_utf8_lossy(&environ).contains("RELOADED=yes\0"),
            "pid {pid}"
        );
    }
    assert!(get(herd.addr()).is_ok());
    herd.stop();
}

/// `rotation` is fixed when the hand-off loop starts (the kernel program is
/// attached to the listeners then): a Node app's reload cannot change it.
#[test]
fn reload_refuses_a_rotation_change() {
    let app = format!(
        "{}/workers/node/cluster-server.js",
        env!("CARGO_MANIFEST_DIR")
    );
    let herd = Herd::launch(
        "parity-rotation",
        Some("rotation = \"auto\"\n"),
        1,
        &[],
        &["node", &app],
    );
    let before = herd.wait_all_ready(1);
    write_config(&herd.dir, "rotation = \"handoff\"\n");
    let run = herd.control(&["reload"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains("`rotation` (kernel -> handoff)")
            && run.stderr.contains("restart herd"),
        "{run:?}"
    );
    assert_eq!(herd.wait_all_ready(1), before);
    herd.stop();
}

fn scrape(addr: std::net::SocketAddr) -> String {
    let (code, _, text) = http(addr, "GET", "/metrics");
    assert_eq!(code, 200);
    text
}

/// `[handoff]` limits apply from the reload on: with the one worker
/// stopped, `max_unacked` connections go to it, and the next one finds
/// the wait queue full at the new `queue_limit`.
#[test]
fn reload_applies_the_handoff_limits_live() {
    let limits = |max_unacked: u32, queue_limit: u32| {
        format!(
            "hang_timeout = \"0s\"\n[handoff]\nmax_unacked = {max_unacked}\n\
             ack_timeout = \"60s\"\nqueue_limit = {queue_limit}\n"
        )
    };
    let herd = Herd::launch(
        "parity-handoff",
        Some(&limits(1, 1000)),
        1,
        &["--metrics", "127.0.0.1:0"],
        &[hello_worker()],
    );
    let first = herd.wait_all_ready(1);
    let metrics = metrics_addr(&herd);
    write_config(&herd.dir, &limits(2, 0));
    let out = herd.control(&["reload"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let worker = wait_until("the reloaded worker", || {
        let pids = herd.wait_all_ready(1);
        (pids != first).then(|| *pids.first().unwrap())
    });
    signal(worker, Signal::SIGSTOP);
    let in_flight = |n: f64| {
        wait_until(&format!("{n} hand-offs in flight"), || {
            (sample(&scrape(metrics), "herd_handoffs_in_flight") == n).then_some(())
        })
    };
    let first_conn = send_request(herd.addr()).unwrap();
    in_flight(1.0);
    // max_unacked = 2 now (1 before the reload): the stopped worker takes a second.
    let second_conn = send_request(herd.addr()).unwrap();
    in_flight(2.0);
    // queue_limit = 0 now (1000 before): the third is closed at once.
    let third_conn = send_request(herd.addr()).unwrap();
    wait_until("a connection dropped for a full queue", || {
        let text = scrape(metrics);
        (sample(
            &text,
            "herd_connections_dropped_total{reason=\"queue-full\"}",
        ) == 1.0)
            .then_some(())
    });
    assert!(read_answer(third_conn, DEADLINE).is_err());
    signal(worker, Signal::SIGCONT);
    for conn in [first_conn, second_conn] {
        assert_eq!(read_answer(conn, DEADLINE).unwrap().pid, worker);
    }
    herd.stop();
}

// ---- user ----

/// `NAME=value` pairs of a process's environment.
fn environment(pid: u32) -> Vec<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    String::from_utf8_lossy(&environ)
        .split('\0')
        .map(str::to_string)
        .collect()
}

/// The ids on a line of /proc/PID/status (`Uid:`, `Gid:`, `Groups:`).
fn status_ids(pid: u32, key: &str) -> BTreeSet<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(key)).unwrap();
    line.split_whitespace()
        .skip(1)
        .map(|n| n.parse().unwrap())
        .collect()
}

/// The groups `initgroups(user, its primary group)` gives.
fn groups_of(user: &nix::unistd::User) -> BTreeSet<u32> {
    let name = CString::new(user.name.as_str()).unwrap();
    nix::unistd::getgrouplist(&name, user.gid)
        .unwrap()
        .into_iter()
        .map(|g| g.as_raw())
        .collect()
}

/// A user on this host whom the group database lists in a group besides
/// its own (e.g. postgres in ssl-cert), if there is one.
fn user_with_supplementary_groups() -> Option<nix::unistd::User> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups
        .lines()
        .filter_map(|line| line.split(':').nth(3))
        .flat_map(|members| members.split(','))
        .filter(|name| !name.is_empty())
        .find_map(|name| nix::unistd::User::from_name(name).ok().flatten())
        .filter(|user| groups_of(user).len() > 1)
}

/// Runs one worker as `user` in `mode` and checks its ids, groups and
/// environment.
fn worker_runs_as(user: &nix::unistd::User, mode: &str) {
    let config = format!("user = {:?}\n[env]\nLOGNAME = \"from-env\"\n", user.name);
    let herd = Herd::launch(
        &format!("parity-user-{}-{mode}", user.name),
        Some(&config),
        1,
        &["--mode", mode],
        &[hello_worker()],
    );
    let pid = *herd.wait_all_ready(1).first().unwrap();
    assert_eq!(status_ids(pid, "Uid:"), BTreeSet::from([user.uid.as_raw()]));
    assert_eq!(status_ids(pid, "Gid:"), BTreeSet::from([user.gid.as_raw()]));
    assert_eq!(
        status_ids(pid, "Groups:"),
        groups_of(user),
        "{}: supplementary groups as initgroups sets them",
        user.name
    );
    let env = environment(pid);
    for expected in [
        format!("HOME={}", user.dir.display()),
        format!("USER={}", user.name),
        // `env` wins over what `user` sets.
        "LOGNAME=from-env".to_string(),
    ] {
        assert!(env.contains(&expected), "{expected} not in {env:?}");
    }
    assert!(get(herd.addr()).is_ok());
    assert!(herd.stop().success());
}

#[test]
fn workers_get_the_users_home_name_and_groups() {
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("user nobody");
    worker_runs_as(&nobody, "round-robin");
    // Started through herd's own binary (the LISTEN_PID shim), as the user.
    worker_runs_as(&nobody, "shared");
    match user_with_supplementary_groups() {
        Some(user) => worker_runs_as(&user, "round-robin"),
        None => eprintln!("no user with supplementary groups on this host: checked nobody only"),
    }
}
