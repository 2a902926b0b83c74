//! Shared helpers for the process-level tests: start a real `herd` with real
//! workers on 127.0.0.1 port 0, follow its log, send real HTTP requests.
//!
//! herd runs with `--log-format json`; tests wait on its log events by
//! name and fields (`herd.wait_for_event("worker_ready", &[("slot",
//! json!(1))], 1)`), never on a sentence. Every wait has a deadline and
//! waits on a condition (a log event, a response), never on a fixed sleep.

#![allow(dead_code)]

pub mod hosts;
pub mod load;
pub mod output;
pub mod pids;
pub mod procs;
pub mod responses;
pub mod servers;
pub mod sockets;
pub mod threads;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

// For the fields tests match events on: `&[("slot", json!(1))]`.
#[allow(unused_imports)]
pub use serde_json::{json, Value};

use output::Log;

/// Long enough for a loaded 2-core CI machine; a healthy run takes milliseconds.
pub const DEADLINE: Duration = Duration::from_secs(20);

pub fn herd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_herd")
}

pub fn hello_worker() -> &'static str {
    env!("CARGO_BIN_EXE_hello-worker")
}

pub fn python_worker() -> String {
    format!(
        "{}/workers/python/hello_worker.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// A fresh empty directory, so herd does not pick up the repository's config.toml.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("herd-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Whether herd can deal turns in the kernel here: this process (whose
/// capabilities the herd it starts inherits) may load the rotation's eBPF
/// program. Without CAP_BPF, says `skipped {test}` and returns false, except
/// in CI (`CI` set, as .ci/run does), where it fails. Any other refusal by
/// the kernel fails everywhere: herd would fall back to hand-offs unseen.
pub fn require_cap_bpf(test: &str) -> bool {
    herd_protocol::bpf::testable_here(test)
}

/// A test that cannot run here for `why` (a missing program or
/// capability): says `skipped {test}: {why}` and returns false, except in
/// CI (`CI` set, as .ci/run does), where the test fails instead.
pub fn skip_unless_ci(test: &str, why: &str) -> bool {
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} {why}, and CI is set, so it fails rather than skips"
    );
    eprintln!("skipped {test}: {why}");
    false
}

/// A running `herd run`, killed on drop.
pub struct Herd {
    child: Child,
    log: Arc<Log>,
    pub dir: PathBuf,
}

impl Herd {
    /// Starts `herd run ARGS` in an empty scratch directory.
    pub fn start(name: &str, args: &[&str]) -> Herd {
        Herd::start_in(&scratch_dir(name), args)
    }

    /// Starts herd on 127.0.0.1:0 with `workers` copies of `command`, extra
    /// `flags`, and `config` (TOML text) written to a file passed with `-c`.
    pub fn launch(
        name: &str,
        config: Option<&str>,
        workers: usize,
        flags: &[&str],
        command: &[&str],
    ) -> Herd {
        let dir = scratch_dir(name);
        let workers = workers.to_string();
        let config_path = config.map(|text| write_config(&dir, text).display().to_string());
        let mut args = vec!["--listen", "127.0.0.1:0", "--workers", &workers];
        if let Some(path) = &config_path {
            args.extend(["-c", path.as_str()]);
        }
        args.extend_from_slice(flags);
        args.push("--");
        args.extend_from_slice(command);
        Herd::start_in(&dir, &args)
    }

    pub fn start_in(dir: &Path, args: &[&str]) -> Herd {
        Herd::start_under(dir, &[], args)
    }

    /// Starts `PREFIX... herd run ARGS` (e.g. under `setpriv`) in `dir`,
    /// logging JSON unless ARGS choose a `--log-format`.
    pub fn start_under(dir: &Path, prefix: &[&str], args: &[&str]) -> Herd {
        Herd::start_with(dir, prefix, &[], args)
    }

    /// [`Herd::start_under`], with `env` (name, value) set for herd too
    /// (e.g. a `NOTIFY_SOCKET` the test reads).
    pub fn start_with(dir: &Path, prefix: &[&str], env: &[(&str, &str)], args: &[&str]) -> Herd {
        let command = match prefix.split_first() {
            Some((program, prefix_args)) => {
                let mut command = Command::new(program);
                command.args(prefix_args).arg(herd_bin());
                command
            }
            None => Command::new(herd_bin()),
        };
        Herd::spawn(command, dir, env, args)
    }

    /// `BINARY run ARGS` in `dir`: a herd run from a copy of its binary
    /// (tests/upgrade.rs replaces the copy).
    pub fn start_binary(dir: &Path, binary: &Path, env: &[(&str, &str)], args: &[&str]) -> Herd {
        Herd::spawn(Command::new(binary), dir, env, args)
    }

    fn spawn(mut command: Command, dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Herd {
        let herd_args = args.iter().take_while(|&&arg| arg != "--");
        let chosen = herd_args.clone().any(|&arg| arg == "--log-format");
        let format: &[&str] = if chosen {
            &[]
        } else {
            &["--log-format", "json"]
        };
        let mut child = command
            .arg("run")
            .args(format)
            .args(args)
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start herd");
        let log = Arc::new(Log::default());
        log.follow(child.stdout.take().unwrap());
        log.follow(child.stderr.take().unwrap());
        Herd {
            child,
            log,
            dir: dir.to_owned(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until herd has logged `count` events named `event` with every
    /// value in `fields`; returns them all (flat: see [`output::parse_event`]).
    pub fn wait_for_event(
        &self,
        event: &str,
        fields: &[(&str, Value)],
        count: usize,
    ) -> Vec<Value> {
        self.log
            .wait_for(&output::describe(event, fields), count, |lines| {
                lines.events(event, fields)
            })
    }

    /// The events named `event` with every value in `fields` logged so
    /// far, without waiting: for counting them, or checking there is none.
    pub fn events(&self, event: &str, fields: &[(&str, Value)]) -> Vec<Value> {
        self.log.read(|lines| lines.events(event, fields))
    }

    /// Every event herd has logged so far, in order.
    pub fn log_events(&self) -> Vec<Value> {
        self.log.read(|lines| lines.events.clone())
    }

    /// Waits until `count` lines of workers' own output (which herd
    /// forwards prefixed `[worker N] `) contain `needle`; returns them.
    pub fn wait_for_worker_output(&self, needle: &str, count: usize) -> Vec<String> {
        self.log.wait_for(
            &format!("worker output lines containing {needle:?}"),
            count,
            |lines| lines.worker_output(needle),
        )
    }

    /// The lines of workers' own output so far that contain `needle`.
    pub fn worker_output(&self, needle: &str) -> Vec<String> {
        self.log.read(|lines| lines.worker_output(needle))
    }

    /// Waits for herd's plain-text message when it cannot run (`herd: ...`,
    /// what a user sees) containing `needle`; returns it.
    pub fn wait_for_error_message(&self, needle: &str) -> String {
        self.log
            .wait_for(&format!("herd's message {needle:?}"), 1, |lines| {
                lines.error_messages(needle)
            })
            .remove(0)
    }

    /// Everything herd and its workers wrote, as written: for diagnostics.
    pub fn log_text(&self) -> String {
        self.log.read(|lines| lines.raw.join("\n"))
    }

    /// The bound listener addresses, in the order herd logged them.
    pub fn listen_addrs(&self, count: usize) -> Vec<SocketAddr> {
        self.wait_for_event("listening", &[], count)
            .iter()
            .map(address)
            .collect()
    }

    pub fn addr(&self) -> SocketAddr {
        self.listen_addrs(1)[0]
    }

    /// Waits until `count` workers have said READY; returns slot → pid of the
    /// latest ready worker in each slot.
    pub fn wait_ready(&self, count: usize) -> BTreeMap<usize, u32> {
        let mut slots = BTreeMap::new();
        for event in self.wait_for_event("worker_ready", &[], count) {
            slots.insert(
                number(&event, "slot") as usize,
                number(&event, "pid") as u32,
            );
        }
        slots
    }

    /// Sends SIGTERM and waits for herd to exit.
    pub fn stop(mut self) -> ExitStatus {
        signal(self.child.id(), nix::sys::signal::Signal::SIGTERM);
        self.wait_exit()
    }

    /// Waits for herd to exit by itself (with the deadline).
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "herd did not exit; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Herd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The number in field `name` of a log event.
pub fn number(event: &Value, name: &str) -> u64 {
    event[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {name} in {event}"))
}

/// The socket address in field `addr` of a log event.
pub fn address(event: &Value) -> SocketAddr {
    event["addr"]
        .as_str()
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no address in {event}"))
}

/// Reads `name=123` from a line of a worker's output.
pub fn field(line: &str, name: &str) -> u64 {
    let key = format!("{name}=");
    let start = line
        .find(&key)
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        + key.len();
    line[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

pub fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap();
}

/// What a hello worker answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub pid: u32,
    pub slot: usize,
}

/// Parses a hello-worker response: status 200, `X-Herd-Worker`, `Handled by worker <pid>`.
pub fn parse_answer(response: &str) -> Result<Answer, String> {
    let parsed = responses::parse(response.as_bytes())?;
    if (parsed.version, parsed.status) != (1, 200) {
        return Err(format!("unexpected response {response:?}"));
    }
    let slot = parsed
        .header("X-Herd-Worker")
        .ok_or_else(|| format!("no X-Herd-Worker in {response:?}"))?
        .trim()
        .parse()
        .map_err(|e| format!("bad slot: {e}"))?;
    let pid = parsed
        .body
        .trim()
        .strip_prefix("Handled by worker ")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("no pid in {response:?}"))?;
    Ok(Answer { pid, slot })
}

pub const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: herd-test\r\nConnection: close\r\n\r\n";

/// Opens a connection and sends one request, without reading the answer.
pub fn send_request(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&addr, DEADLINE)?;
    stream.write_all(REQUEST)?;
    Ok(stream)
}

/// Reads a whole `Connection: close` response, waiting at most `timeout`.
pub fn read_answer(mut stream: TcpStream, timeout: Duration) -> Result<Answer, String> {
    stream.set_read_timeout(Some(timeout)).unwrap();
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("read: {e}"))?;
    parse_answer(&response)
}

/// One request on a new connection.
pub fn get(addr: SocketAddr) -> Result<Answer, String> {
    let stream = send_request(addr).map_err(|e| format!("connect/send: {e}"))?;
    read_answer(stream, DEADLINE)
}

/// Opens a connection from a chosen source address and sends one request.
pub fn send_request_from(addr: SocketAddr, source: IpAddr) -> Result<TcpStream, String> {
    use nix::sys::socket::{
        bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrStorage,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(
        fd.as_raw_fd(),
        &SockaddrStorage::from(SocketAddr::new(source, 0)),
    )
    .map_err(|e| format!("bind {source}: {e}"))?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(|e| format!("connect: {e}"))?;
    let mut stream = TcpStream::from(fd);
    stream
        .write_all(REQUEST)
        .map_err(|e| format!("send: {e}"))?;
    Ok(stream)
}

/// One request on a new connection from a chosen source address.
pub fn get_from(addr: SocketAddr, source: IpAddr) -> Result<Answer, String> {
    read_answer(send_request_from(addr, source)?, DEADLINE)
}

/// Sends `count` sequential requests and counts answers per worker pid.
pub fn count_pids(addr: SocketAddr, count: usize) -> BTreeMap<u32, usize> {
    let mut per_pid = BTreeMap::new();
    for i in 0..count {
        let answer = get(addr).unwrap_or_else(|e| panic!("request {i}: {e}"));
        *per_pid.entry(answer.pid).or_insert(0) += 1;
    }
    per_pid
}

/// A section of the README, from its `## title` to the next `## `.
pub fn readme_section(title: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let readme =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let heading = format!("\n## {title}\n");
    let start = readme
        .find(&heading)
        .unwrap_or_else(|| panic!("README has no section {title:?}"))
        + heading.len();
    let rest = &readme[start..];
    rest[..rest.find("\n## ").unwrap_or(rest.len())].to_string()
}

/// Writes a config file into `dir` and returns its path.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("herd-test.toml");
    std::fs::write(&path, text).unwrap();
    path
}

// ---- control commands against a running herd ----

/// What one `herd <control command>` printed, and how it exited.
#[derive(Debug)]
pub struct CliRun {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `herd ARGS` in `dir` (so the default `herd.sock` resolves there) and
/// waits for it, at most `DEADLINE`.
pub fn herd_cli(dir: &Path, args: &[&str]) -> CliRun {
    herd_cli_within(dir, args, DEADLINE).unwrap_or_else(|e| panic!("{e}"))
}

/// How [`herd_cli_within`] says that herd did not answer in time.
pub const NO_ANSWER: &str = "got no answer within";

/// Runs `herd ARGS` in `dir`; Err if it did not finish within `timeout`
/// (then it is killed), so a caller may record that rather than panic.
pub fn herd_cli_within(dir: &Path, args: &[&str], timeout: Duration) -> Result<CliRun, String> {
    herd_cli_under(dir, &[], args, timeout)
}

/// [`herd_cli_within`], with herd started through `prefix` (e.g.
/// `setpriv --bounding-set ...`): `PREFIX... herd ARGS`.
pub fn herd_cli_under(
    dir: &Path,
    prefix: &[&str],
    args: &[&str],
    timeout: Duration,
) -> Result<CliRun, String> {
    let mut command = match prefix.split_first() {
        Some((first, rest)) => {
            let mut command = Command::new(first);
            command.args(rest).arg(herd_bin());
            command
        }
        None => Command::new(herd_bin()),
    };
    let mut child = command
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("start herd {}: {e}", args.join(" ")))?;
    let drain = |mut stream: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stream.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("`herd {}` {NO_ANSWER} {timeout:?}", args.join(" ")));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(CliRun {
        code: status.code(),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    })
}

/// Runs a control command that must succeed; returns its stdout.
pub fn herd_ok(dir: &Path, args: &[&str]) -> String {
    let run = herd_cli(dir, args);
    assert_eq!(run.code, Some(0), "`herd {}`: {run:?}", args.join(" "));
    run.stdout
}

/// `herd status --json`, parsed.
pub fn status_json(dir: &Path) -> Value {
    let text = herd_ok(dir, &["status", "--json"]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("status JSON: {e} in {text:?}"))
}

pub fn workers_of(status: &Value) -> &Vec<Value> {
    status["workers"].as_array().expect("workers array")
}

/// slot → pid of every row in a status report.
pub fn pids_of(status: &Value) -> BTreeMap<usize, u32> {
    workers_of(status)
        .iter()
        .map(|w| {
            (
                w["slot"].as_u64().unwrap() as usize,
                w["pid"].as_u64().unwrap() as u32,
            )
        })
        .collect()
}

/// Polls `check` every 20 ms until it returns `Some`, at most `DEADLINE`.
pub fn wait_until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `herd status --json` until `accept` likes it; returns that report.
pub fn wait_for_status(dir: &Path, what: &str, accept: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let status = status_json(dir);
        if accept(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for status with {what}; last: {status:#}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every row of the report is `ready`, and there are `count` of them.
pub fn all_ready(status: &Value, count: usize) -> bool {
    let workers = workers_of(status);
    workers.len() == count && workers.iter().all(|w| w["state"] == "ready")
}

impl Herd {
    /// Runs a control command against this herd, once its socket is up.
    pub fn control(&self, args: &[&str]) -> CliRun {
        self.wait_for_event("control_ready", &[], 1);
        herd_cli(&self.dir, args)
    }

    /// `herd status --json` of this herd.
    pub fn status(&self) -> Value {
        self.wait_for_event("control_ready", &[], 1);
        status_json(&self.dir)
    }

    /// Waits until status shows `count` slots, all ready; returns their pids.
    pub fn wait_all_ready(&self, count: usize) -> BTreeSet<u32> {
        self.wait_for_event("control_ready", &[], 1);
        let status = wait_for_status(&self.dir, &format!("{count} ready workers"), |s| {
            all_ready(s, count)
        });
        pids_of(&status).into_values().collect()
    }
}

/// A port on 127.0.0.1 free a moment ago, for a server whose config must
/// name its port (nginx, a program that binds its own).
pub fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().port()
}

/// nginx's binary, in PATH or where Debian puts it.
pub fn nginx() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file())
}

/// The address herd logged for its metrics endpoint.
pub fn metrics_addr(herd: &Herd) -> SocketAddr {
    address(&herd.wait_for_event("metrics_listening", &[], 1)[0])
}

/// One plain HTTP/1.1 request; returns (status code, headers, body).
pub fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect_timeout(&addr, DEADLINE).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let parsed = if method == "HEAD" {
        responses::parse_answer_to_head(response.as_bytes())
    } else {
        responses::parse(response.as_bytes())
    };
    let parsed = parsed.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (parsed.status, parsed.head.to_lowercase(), parsed.body)
}

/// The value of the one sample named exactly `series` (name plus labels).
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

/// Sum of every sample of a metric name, whatever its labels.
pub fn sum_of(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How many fds process `pid` has open.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Sets `pid`'s open-file limit (soft and hard) with prlimit (util-linux).
pub fn set_fd_limit(pid: u32, limit: usize) {
    let status = Command::new("prlimit")
        .args([format!("--pid={pid}"), format!("--nofile={limit}:{limit}")])
        .status()
        .expect("prlimit (util-linux)");
    assert!(status.success(), "prlimit failed");
}

/// Sets `pid`'s soft `RLIMIT_NOFILE` only (the hard one stays, so it can
/// be raised again: this sandbox has no CAP_SYS_RESOURCE to raise a hard one).
pub fn set_soft_fd_limit(pid: u32, soft: usize) {
    let status = Command::new("prlimit")
        .args([format!("--pid={pid}"), format!("--nofile={soft}:")])
        .status()
        .expect("prlimit (util-linux)");
    assert!(status.success(), "prlimit failed");
}

/// Leaves `pid` only `headroom` fds above what it has open now.
pub fn squeeze_fds(pid: u32, headroom: usize) {
    set_fd_limit(pid, open_fds(pid) + headroom);
}
