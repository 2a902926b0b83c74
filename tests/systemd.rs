//! herd under systemd, without systemd as PID 1: herd's `sd_notify`
//! messages to a `NOTIFY_SOCKET` the test binds (READY, STATUS, RELOADING
//! with MONOTONIC_USEC, STOPPING, WATCHDOG), and herd's listeners passed
//! by `systemd-socket-activate` (Debian's systemd package) as a socket
//! unit passes them. The unit files in deploy/systemd are read too, and
//! checked against what herd does.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// The test's end of herd's NOTIFY_SOCKET: what herd said, in order.
struct Manager {
    socket: UnixDatagram,
    heard: Vec<String>,
}

impl Manager {
    fn bind(dir: &Path) -> (Manager, String) {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let manager = Manager {
            socket,
            heard: Vec::new(),
        };
        (manager, path.display().to_string())
    }

    /// Reads until a message has a line `line` (e.g. `READY=1`) and
    /// satisfies `also`, at most `within`; returns it, or None at the end.
    fn next_within(
        &mut self,
        line: &str,
        also: impl Fn(&str) -> bool,
        within: Duration,
    ) -> Option<String> {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 8192];
        while Instant::now() < deadline {
            let Ok(n) = self.socket.recv(&mut buf) else {
                continue;
            };
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            self.heard.push(message.clone());
            if message.lines().any(|l| l == line) && also(&message) {
                return Some(message);
            }
        }
        None
    }

    fn next(&mut self, line: &str, also: impl Fn(&str) -> bool) -> String {
        self.next_within(line, also, DEADLINE)
            .unwrap_or_else(|| panic!("no {line} from herd; heard: {:#?}", self.heard))
    }
}

/// `KEY=VALUE` lines of a message.
fn fields(message: &str) -> BTreeMap<&str, &str> {
    message.lines().filter_map(|l| l.split_once('=')).collect()
}

fn start_notified(name: &str, env: &[(&str, &str)]) -> (Herd, Manager) {
    start_notified_with(name, env, "")
}

/// [`start_notified`], with `extra` config lines.
fn start_notified_with(name: &str, env: &[(&str, &str)], extra: &str) -> (Herd, Manager) {
    let dir = scratch_dir(name);
    let (manager, path) = Manager::bind(&dir);
    let config = write_config(
        &dir,
        &format!(
            "listen = [\"127.0.0.1:0\"]\nworkers = 2\ncommand = [\"{}\"]\n{extra}",
            hello_worker()
        ),
    );
    let mut env = env.to_vec();
    env.push(("NOTIFY_SOCKET", &path));
    let config = config.display().to_string();
    let herd = Herd::start_with(&dir, &[], &env, &["-c", &config]);
    (herd, manager)
}

#[test]
fn notify_ready_status_reloading_and_stopping_in_order() {
    let (mut herd, mut manager) = start_notified("systemd-notify", &[]);
    let ready = manager.next("READY=1", |_| true);
    let addr = herd.addr();
    assert_eq!(
        fields(&ready)["STATUS"],
        format!("2/2 workers ready, mode round-robin, listening on {addr}"),
        "{ready}"
    );
    // Before it, STATUS= lines only, counting the workers as they came up.
    let before = &manager.heard[..manager.heard.len() - 1];
    assert!(!before.is_empty(), "no STATUS= before READY=1");
    for message in before {
        let status = fields(message)["STATUS"];
        assert!(
            !message.contains("READY=1")
                && status.ends_with(&format!(
                    "/2 workers ready, mode round-robin, listening on {addr}"
                )),
            "{message}"
        );
    }
    herd.wait_for_event("systemd_ready", &[], 1);
    // A reload: RELOADING=1 stamped with CLOCK_MONOTONIC, then READY=1.
    herd_ok(&herd.dir, &["reload"]);
    let reloading = manager.next("RELOADING=1", |_| true);
    let stamp: u64 = fields(&reloading)["MONOTONIC_USEC"].parse().unwrap();
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        stamp > 0 && stamp as f64 <= (uptime + 1.0) * 1e6,
        "{reloading}"
    );
    let done = manager.next("READY=1", |_| true);
    assert!(
        fields(&done)["STATUS"].starts_with("reload finished"),
        "{done}"
    );
    // A refused reload still ends in READY=1: herd serves on, and says why.
    write_config(
        &herd.dir,
        "listen = [\"127.0.0.1:0\"]\nworkers = \"many\"\n",
    );
    assert_ne!(herd.control(&["reload"]).code, Some(0));
    manager.next("RELOADING=1", |_| true);
    let refused = manager.next("READY=1", |_| true);
    assert!(
        fields(&refused)["STATUS"].starts_with("reload failed: reload refused"),
        "{refused}"
    );
    // A stop starts with STOPPING=1.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(herd.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    manager.next("STOPPING=1", |_| true);
    assert!(herd.wait_exit().success(), "{}", herd.log_text());
}

#[test]
fn systemd_watchdog_pings_for_herd_and_not_for_another_pid() {
    let (herd, mut manager) = start_notified("systemd-watchdog", &[("WATCHDOG_USEC", "200000")]);
    manager.next("READY=1", |_| true);
    for _ in 0..3 {
        manager.next("WATCHDOG=1", |_| true);
    }
    herd.wait_for_event("systemd_watchdog", &[("every_ms", json!(100))], 1);
    drop(herd);
    // WATCHDOG_PID names another process (pid 1): the pings are not herd's.
    let (herd, mut manager) = start_notified(
        "systemd-watchdog-other",
        &[("WATCHDOG_USEC", "200000"), ("WATCHDOG_PID", "1")],
    );
    manager.next("READY=1", |_| true);
    // Five of the periods it would ping in: a bounded wait for what must not come.
    let ping = manager.next_within("WATCHDOG=1", |_| true, Duration::from_millis(500));
    assert_eq!(ping, None, "heard: {:#?}", manager.heard);
    assert!(herd.events("systemd_watchdog", &[]).is_empty());
}

/// `systemd-socket-activate`, or None (the test skips, outside CI).
fn socket_activate(test: &str) -> Option<&'static str> {
    let path = "/usr/bin/systemd-socket-activate";
    if Path::new(path).is_file() {
        return Some(path);
    }
    skip_unless_ci(
        test,
        "needs systemd-socket-activate (apt-get install systemd)",
    );
    None
}

/// Connects to `addr` once something listens there (the activator binds
/// before it runs herd), retrying refusals until the deadline.
fn connect_when_listening(addr: std::net::SocketAddr) -> std::net::TcpStream {
    wait_until(&format!("a listener on {addr}"), || {
        std::net::TcpStream::connect(addr).ok()
    })
}

#[test]
fn socket_activated_herd_serves_the_inherited_socket_and_its_queue() {
    let test = "socket_activated_herd_serves_the_inherited_socket_and_its_queue";
    let Some(activate) = socket_activate(test) else {
        return;
    };
    let dir = scratch_dir("systemd-activate");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let listen = ["-l", addr.as_str(), "-E", "RUST_LOG"];
    let prefix: Vec<&str> = std::iter::once(activate).chain(listen).collect();
    // The worker says what it sees of herd's LISTEN_* (nothing, as herd
    // hands connections off), then runs the example worker.
    let script = format!(
        "echo \"sees LISTEN_PID=${{LISTEN_PID:-none}} LISTEN_FDS=${{LISTEN_FDS:-none}}\"; exec {}",
        hello_worker()
    );
    let args = [
        "--listen",
        &addr,
        "--workers",
        "2",
        "--",
        "sh",
        "-c",
        &script,
    ];
    let herd = Herd::start_under(&dir, &prefix, &args);
    // The activator holds the socket and runs herd on the first
    // connection: this one waits in the queue while herd is not yet up.
    let early = connect_when_listening(addr.parse().unwrap());
    let answer = read_answer_after_request(early);
    assert!(answer.is_ok(), "{answer:?}: {}", herd.log_text());
    let inherited = herd.wait_for_event("listener_inherited", &[("fd", json!(3))], 1);
    assert_eq!(inherited[0]["addr"], json!(addr));
    // herd did not bind: it logged what it inherited, and serves on.
    get(addr.parse().unwrap()).unwrap();
    herd.wait_ready(2);
    let seen = herd.wait_for_worker_output("sees LISTEN_PID", 2);
    assert!(
        seen.iter()
            .all(|l| l.ends_with("sees LISTEN_PID=none LISTEN_FDS=none")),
        "{seen:?}"
    );
    assert_eq!(herd.stop().code(), Some(0));
}

/// `activate -l ADDR herd run --listen ADDR --workers 2 FLAGS -- hello-worker`
/// in scratch dir `name`, once the first connection (which starts herd,
/// and waits in the passed socket's queue meanwhile) is answered.
fn start_activated(activate: &str, name: &str, flags: &[&str]) -> (Herd, SocketAddr) {
    let dir = scratch_dir(name);
    let addr = format!("127.0.0.1:{}", free_port());
    let prefix = [activate, "-l", addr.as_str()];
    let mut args = vec!["--listen", &addr, "--workers", "2"];
    args.extend_from_slice(flags);
    args.extend(["--", hello_worker()]);
    let herd = Herd::start_under(&dir, &prefix, &args);
    let addr: SocketAddr = addr.parse().unwrap();
    let early = connect_when_listening(addr);
    let answer = read_answer_after_request(early);
    assert!(answer.is_ok(), "{answer:?}: {}", herd.log_text());
    (herd, addr)
}

/// A socket passed without SO_REUSEPORT cannot be copied for a second
/// hand-off thread: herd says so once and thread 0 serves it alone.
#[test]
fn a_passed_socket_without_reuseport_is_served_by_thread_0_alone() {
    let test = "a_passed_socket_without_reuseport_is_served_by_thread_0_alone";
    let Some(activate) = socket_activate(test) else {
        return;
    };
    let flags = ["--handoff-threads", "3"];
    let (herd, addr) = start_activated(activate, "systemd-activate-threads", &flags);
    herd.wait_ready(2);
    let counts = count_pids(addr, 50);
    assert_eq!(counts.values().sum::<usize>(), 50, "{counts:?}");
    let refused = herd.wait_for_event("listener_not_shared", &[("listener", json!(0))], 1);
    assert_eq!(refused.len(), 1, "said once, not per thread: {refused:?}");
    assert_eq!(herd.stop().code(), Some(0));
}

#[test]
fn socket_activated_herd_in_shared_mode_passes_the_socket_to_its_workers() {
    let test = "socket_activated_herd_in_shared_mode_passes_the_socket_to_its_workers";
    let Some(activate) = socket_activate(test) else {
        return;
    };
    let flags = ["--mode", "shared"];
    let (herd, addr) = start_activated(activate, "systemd-activate-shared", &flags);
    herd.wait_for_event("listener_inherited", &[], 1);
    // The workers accept from it themselves (herd accepts nothing in shared mode).
    let pids = count_pids(addr, 4);
    assert_eq!(pids.values().sum::<usize>(), 4);
    assert!(herd
        .wait_ready(2)
        .values()
        .any(|pid| pids.contains_key(pid)));
    assert_eq!(herd.stop().code(), Some(0));
}

fn read_answer_after_request(mut stream: std::net::TcpStream) -> Result<Answer, String> {
    use std::io::Write;
    stream.write_all(REQUEST).unwrap();
    read_answer(stream, DEADLINE)
}

#[test]
fn an_activated_socket_listen_does_not_list_is_refused_by_name() {
    let Some(activate) =
        socket_activate("an_activated_socket_listen_does_not_list_is_refused_by_name")
    else {
        return;
    };
    let dir = scratch_dir("systemd-activate-mismatch");
    let (passed, configured) = (free_port(), free_port());
    let passed = format!("127.0.0.1:{passed}");
    let configured = format!("127.0.0.1:{configured}");
    let prefix = [activate, "-l", passed.as_str()];
    let args = ["--listen", &configured, "--", hello_worker()];
    let mut herd = Herd::start_under(&dir, &prefix, &args);
    let _trigger = connect_when_listening(passed.parse().unwrap());
    let message = herd.wait_for_error_message("`listen`");
    assert!(
        message.contains(&format!("`listen` lists {configured}, but no socket systemd passed is bound to it (passed: {passed} as fd 3")),
        "{message}"
    );
    assert_eq!(herd.wait_exit().code(), Some(3));
}

#[test]
fn an_activated_socket_cannot_serve_reuseport_and_says_so() {
    let Some(activate) = socket_activate("an_activated_socket_cannot_serve_reuseport_and_says_so")
    else {
        return;
    };
    let dir = scratch_dir("systemd-activate-reuseport");
    let addr = format!("127.0.0.1:{}", free_port());
    let prefix = [activate, "-l", addr.as_str()];
    let args = [
        "--listen",
        &addr,
        "--mode",
        "reuseport",
        "--",
        hello_worker(),
    ];
    let mut herd = Herd::start_under(&dir, &prefix, &args);
    let _trigger = connect_when_listening(addr.parse().unwrap());
    let message = herd.wait_for_error_message("`mode` = \"reuseport\"");
    assert!(message.contains("LISTEN_FDS"), "{message}");
    assert_eq!(herd.wait_exit().code(), Some(3));
}

/// A systemd unit file: section → key → values (a key may repeat).
fn unit(name: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let path = format!("{}/deploy/systemd/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut sections: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{path}: {line:?}"));
        sections
            .entry(section.clone())
            .or_default()
            .entry(key.trim().to_string())
            .or_default()
            .push(value.trim().to_string());
    }
    sections
}

fn one<'a>(
    unit: &'a BTreeMap<String, BTreeMap<String, Vec<String>>>,
    section: &str,
    key: &str,
) -> &'a str {
    match unit
        .get(section)
        .and_then(|s| s.get(key))
        .map(Vec::as_slice)
    {
        Some([value]) => value,
        other => panic!("[{section}] {key}: {other:?}"),
    }
}

#[test]
fn the_shipped_systemd_units_agree_with_what_herd_does() {
    let service = unit("herd.service");
    let socket = unit("herd.socket");
    // herd speaks sd_notify, and only herd's main process does.
    assert_eq!(one(&service, "Service", "Type"), "notify");
    assert_eq!(one(&service, "Service", "NotifyAccess"), "main");
    assert_eq!(one(&service, "Service", "Sockets"), "herd.socket");
    assert_eq!(one(&socket, "Socket", "Service"), "herd.service");
    assert!(socket["Socket"].get("Accept").is_none_or(|a| a == &["no"]));
    assert!(
        !socket["Socket"].contains_key("ReusePort"),
        "herd refuses per-slot modes on it"
    );
    // ExecReload sends SIGHUP, which herd documents as its reload.
    assert_eq!(
        one(&service, "Service", "ExecReload"),
        "/bin/kill -HUP $MAINPID"
    );
    let readme =
        std::fs::read_to_string(format!("{}/README.md", env!("CARGO_MANIFEST_DIR"))).unwrap();
    assert!(
        readme.contains("| `SIGHUP` | rolling reload"),
        "README's signal table"
    );
    // SIGTERM to herd alone (it stops its workers), in time for shutdown_timeout.
    assert_eq!(one(&service, "Service", "KillMode"), "mixed");
    assert_eq!(one(&service, "Service", "KillSignal"), "SIGTERM");
    let config_path = format!("{}/deploy/systemd/config.toml", env!("CARGO_MANIFEST_DIR"));
    let config: toml::Table = std::fs::read_to_string(&config_path)
        .unwrap()
        .parse()
        .unwrap();
    let secs = |text: &str| text.trim_end_matches('s').parse::<u64>().unwrap();
    let shutdown = secs(config["shutdown_timeout"].as_str().unwrap());
    assert!(secs(one(&service, "Service", "TimeoutStopSec")) >= shutdown + 5);
    // The socket holds exactly what `listen` says, and the config is valid.
    let listen: Vec<&str> = config["listen"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let streams: Vec<&str> = socket["Socket"]["ListenStream"]
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(streams, listen);
    let exec = one(&service, "Service", "ExecStart");
    assert_eq!(exec, "/usr/local/bin/herd run -c /etc/herd/config.toml");
    // Valid as herd reads it (with a command this host has).
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let check = herd_cli(dir, &["check", "-c", &config_path, "--", hello_worker()]);
    assert_eq!(check.code, Some(0), "{check:?}");
    assert!(
        check.stdout.contains("on 0.0.0.0:3000, mode round-robin"),
        "{check:?}"
    );
}

/// herd's pid, from `herd status` (the test started the socket unit).
fn herd_pid(dir: &Path) -> u32 {
    status_json(dir)["pid"].as_u64().unwrap() as u32
}

#[test]
fn a_restart_of_socket_activated_herd_refuses_nothing() {
    let dir = scratch_dir("systemd-restart");
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let unit = format!(
        "{}/tests/fixtures/socket_unit.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let port_arg = port.to_string();
    let prefix = [
        "python3",
        unit.as_str(),
        "127.0.0.1",
        port_arg.as_str(),
        "2",
    ];
    let listen = addr.to_string();
    let args = ["--listen", &listen, "--workers", "2", "--", hello_worker()];
    let mut herd = Herd::start_under(&dir, &prefix, &args);
    // The first connection starts the first herd.
    read_answer_after_request(connect_when_listening(addr)).unwrap();
    herd.wait_for_event("listener_inherited", &[("name", json!("test-unit"))], 1);
    let first = herd_pid(&dir);
    signal(first, nix::sys::signal::Signal::SIGTERM);
    herd.wait_for_event("stopped", &[], 1);
    // No herd runs: this connection is not refused, it waits in the
    // unit's queue, and starts the next herd, which serves it.
    let waiting = std::net::TcpStream::connect(addr).expect("the unit's socket takes it");
    let answer = read_answer_after_request(waiting);
    assert!(answer.is_ok(), "{answer:?}\n{}", herd.log_text());
    herd.wait_for_event("listener_inherited", &[], 2);
    let second = herd_pid(&dir);
    assert_ne!(first, second);
    signal(second, nix::sys::signal::Signal::SIGTERM);
    assert!(herd.wait_exit().success(), "{}", herd.log_text());
    assert_eq!(herd.events("listening", &[]).len(), 2);
}

/// With `shutdown_delay`, systemd hears STOPPING=1 as the delay begins (so
/// `systemctl status` says so while herd still serves), not after it.
#[test]
fn systemd_hears_stopping_when_shutdown_delay_begins() {
    let (mut herd, mut manager) =
        start_notified_with("systemd-delay", &[], "shutdown_delay = \"30s\"\n");
    manager.next("READY=1", |_| true);
    let pid = nix::unistd::Pid::from_raw(herd.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    manager.next("STOPPING=1", |_| true);
    herd.wait_for_event("stop_delayed", &[], 1);
    assert!(
        herd.events("stopping", &[]).is_empty(),
        "the delay was skipped"
    );
    let (code, _, _) = http(herd.addr(), "GET", "/");
    assert_eq!(code, 200, "still serving during shutdown_delay");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(herd.wait_exit().success());
}
