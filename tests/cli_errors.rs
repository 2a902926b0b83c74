//! Bad input: flags, config files, a busy port, a missing worker binary.
//! Each gives a clear message and the documented exit code, and none
//! starts a worker.

mod common;

use std::process::{Command, Output};

use common::*;

fn herd(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(herd_bin())
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .output()
        .unwrap()
}

fn expect_failure(name: &str, args: &[&str], code: i32, message: &str) {
    let dir = scratch_dir(name);
    let output = herd(&dir, args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(code),
        "exit code for {args:?}; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains(message),
        "expected {message:?} in stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains("worker started"),
        "a worker started despite the error:\n{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_busy_port_exits_3_before_any_worker_starts() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    expect_failure(
        "busy",
        &[
            "run",
            "--listen",
            &addr,
            "--workers",
            "2",
            "--",
            hello_worker(),
        ],
        3,
        &format!("cannot listen on {addr}: address already in use"),
    );
}

#[test]
fn an_address_this_host_does_not_have_exits_3() {
    expect_failure(
        "foreign-addr",
        &["run", "--listen", "192.0.2.1:8080", "--", hello_worker()],
        3,
        "cannot listen on 192.0.2.1:8080: this host has no such address",
    );
}

#[test]
fn a_malformed_address_exits_2_naming_the_key() {
    expect_failure(
        "bad-addr",
        &["run", "--listen", "localhost:99999", "--", hello_worker()],
        2,
        "invalid `listen` = \"localhost:99999\": expected IP:PORT",
    );
}

#[test]
fn a_missing_worker_binary_exits_2() {
    expect_failure(
        "missing-bin",
        &["run", "--listen", "127.0.0.1:0", "--", "/nonexistent/worker"],
        2,
        "invalid `command` = \"/nonexistent/worker\": /nonexistent/worker: No such file or directory",
    );
    expect_failure(
        "missing-path",
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--",
            "no-such-worker-in-path",
        ],
        2,
        "invalid `command` = \"no-such-worker-in-path\": not found in PATH",
    );
}

#[test]
fn impossible_worker_counts_and_modes_exit_2() {
    for (workers, message) in [
        ("0", "invalid `workers` = 0: must be between 1 and 1024"),
        (
            "1025",
            "invalid `workers` = 1025: must be between 1 and 1024",
        ),
        (
            "lots",
            "invalid `workers` = \"lots\": expected a number from 1 to 1024 or \"max\"",
        ),
    ] {
        expect_failure(
            "workers",
            &[
                "run",
                "--listen",
                "127.0.0.1:0",
                "--workers",
                workers,
                "--",
                hello_worker(),
            ],
            2,
            message,
        );
    }
    expect_failure(
        "mode",
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--mode",
            "fastest",
            "--",
            hello_worker(),
        ],
        2,
        "invalid `mode` = \"fastest\": expected one of: round-robin, sticky, least-conn",
    );
}

#[test]
fn no_listen_address_and_unknown_flags_exit_2() {
    expect_failure(
        "no-listen",
        &["run", "--", hello_worker()],
        2,
        "invalid `listen` = []: no address to listen on",
    );
    // Node cluster apps may leave it out (herd binds what they ask for),
    // but not in reuseport mode, which Node's protocol cannot express.
    let dir = scratch_dir("node-no-listen");
    let app = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/workers/node/cluster-server.js"
    );
    let checked = herd(&dir, &["check", "--", "node", app]);
    let stdout = String::from_utf8_lossy(&checked.stdout);
    assert!(
        checked.status.success()
            && stdout.contains("on the addresses the app listens on")
            && stdout.contains("mode round-robin (turns dealt by the kernel over one socket per slot, else by hand-off)"),
        "{checked:?}"
    );
    expect_failure(
        "herd-kernel-rotation",
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--rotation",
            "kernel",
            "--mode",
            "least-conn",
            "--",
            hello_worker(),
        ],
        2,
        "invalid `rotation` = \"kernel\": kernel rotation is round-robin's; mode \"least-conn\" has its own way of dealing",
    );
    expect_failure(
        "node-reuseport",
        &["run", "--mode", "reuseport", "--", "node", app],
        2,
        "invalid `mode` = \"reuseport\": Node cluster workers run in round-robin, sticky, least-conn or shared mode",
    );
    // A package runner would take the cluster channel and the signals.
    expect_failure(
        "npm-start",
        &["run", "--listen", "127.0.0.1:0", "--", "npm", "start"],
        2,
        "invalid `command` = [\"npm\", \"start\"]: npm would start your app as a child of its own process",
    );
    expect_failure(
        "bad-flag",
        &["run", "--wrokers", "4"],
        2,
        "unexpected argument '--wrokers'",
    );
}

#[test]
fn bad_config_files_name_the_key() {
    let dir = scratch_dir("bad-config");
    for (text, message) in [
        ("wrokers = 4\n", "unknown field `wrokers`"),
        ("backlog = \"big\"\n", "backlog"),
        (
            "[handoff]\nqueue_timeout = \"soon\"\n",
            "invalid `handoff.queue_timeout` = \"soon\"",
        ),
        (
            "[handoff]\nmax_unacked = 0\n",
            "invalid `handoff.max_unacked` = 0: must be between 1 and 4096",
        ),
        ("listen = [\"127.0.0.1:0\"\n", "config file"),
    ] {
        let path = write_config(&dir, text);
        let args = [
            "run",
            "-c",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--",
            hello_worker(),
        ];
        let output = herd(&dir, &args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{text:?}: {stderr}");
        assert!(
            stderr.contains(message),
            "{text:?}: expected {message:?} in:\n{stderr}"
        );

        let check = herd(&dir, &["check", "-c", path.to_str().unwrap()]);
        assert_eq!(
            check.status.code(),
            Some(1),
            "herd check must refuse {text:?}"
        );
    }
    let missing = herd(&dir, &["run", "-c", "/nonexistent/herd.toml"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr)
        .contains("cannot read config file /nonexistent/herd.toml"));
}

#[test]
fn check_accepts_the_repository_config_and_reports_it() {
    let dir = scratch_dir("check-ok");
    let repo_config = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");
    // The repository config names target/release/hello-worker; point it at this build's.
    let output = herd(&dir, &["check", "-c", repo_config, "--", hello_worker()]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.starts_with("config OK: "), "{stdout}");
    assert!(stdout.contains("127.0.0.1:3000"), "{stdout}");
    // What supervision will do, as `herd run` would do it.
    assert!(stdout.contains("(kill_mode auto)"), "{stdout}");
    assert!(
        stdout.contains("30s unacknowledged (hang_timeout)"),
        "{stdout}"
    );
    // What it waits for before a worker gets connections.
    assert!(
        stdout.contains("once ready: READY on the worker's herd channel (ready = \"herd\")"),
        "{stdout}"
    );
    let delay = herd(
        &dir,
        &[
            "check",
            "-c",
            repo_config,
            "--ready",
            "delay:250ms",
            "--",
            hello_worker(),
        ],
    );
    let stdout = String::from_utf8_lossy(&delay.stdout);
    assert!(
        stdout.contains("once ready: 250ms after it starts, unasked (ready = \"delay:250ms\")"),
        "{stdout}"
    );
    let refused = herd(
        &dir,
        &[
            "check",
            "-c",
            repo_config,
            "--ready",
            "soon",
            "--",
            hello_worker(),
        ],
    );
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr)
        .contains("invalid `ready` = \"soon\": expected one of: herd,"));
}

/// `herd run` with no arguments reads ./config.toml (here: the repository's
/// file with only the port and the worker path changed).
#[test]
fn run_without_arguments_reads_config_toml_in_the_current_directory() {
    let dir = scratch_dir("default-config");
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"))
        .unwrap()
        .replace("\"127.0.0.1:3000\"", "\"127.0.0.1:0\"")
        .replace("\"127.0.0.1:9464\"", "\"127.0.0.1:0\"")
        .replace(
            "\"target/release/hello-worker\"",
            &format!("{:?}", hello_worker()),
        );
    std::fs::write(dir.join("config.toml"), text).unwrap();
    let herd = Herd::start_in(&dir, &[]);
    let cores = std::thread::available_parallelism().unwrap().get();
    herd.wait_ready(cores);
    assert_eq!(metrics_addr(&herd).ip().to_string(), "127.0.0.1");
    assert!(get(herd.addr()).is_ok());
    assert!(herd.stop().success());
}
