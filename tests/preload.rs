//! Issue 16, points 1 to 3: programs that bind their own port, unmodified,
//! take herd's hand-offs through its preload library (`protocol =
//! "preload"`, crates/herd-preload).
//!
//! - `python3 -m http.server PORT` (binds the wildcard `::`): strict turns
//!   in round-robin, sticky by client address, least-conn (which needs the
//!   library's CLOSED reports), through a SIGKILL and a reload under load
//!   with nothing failed but what the killed worker held, a slow request
//!   finished across a reload (the library's drain), and the OS-scheduled
//!   modes, where the library hands over the inherited socket instead.
//! - nginx from Debian with a plain config (`listen 127.0.0.1:PORT`,
//!   `master_process on`, two worker processes per slot): the worker
//!   processes, which inherit the captured socket, take the hand-offs.
//! - A C server with edge-triggered epoll and non-blocking `accept4`
//!   (tests/fixtures/preload/epoll_server.c, compiled here with `cc`).
//! - A bind to another port is left to the program and logged; statically
//!   linked and Go programs are refused, by `herd check` as by `herd run`.
//!
//! The programs must be told their port, so each test picks a free one
//! (bound and released a moment before) and gives it to herd's `listen`
//! and the program's command line.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::load::*;
use common::pids::get_pid;
use common::*;

/// The preload library, built now if it is missing or stale (the test
/// harness builds herd's binaries, not this cdylib). `None`: cargo failed.
fn preload_built() -> bool {
    let bin_dir = Path::new(herd_bin()).parent().unwrap();
    let profile = bin_dir.file_name().unwrap().to_str().unwrap().to_string();
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args(["build", "--quiet", "-p", "herd-preload", "--target-dir"])
        .arg(bin_dir.parent().unwrap())
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile == "release" {
        cargo.arg("--release");
    }
    let built = cargo.status().is_ok_and(|s| s.success());
    built && bin_dir.join("libherd_preload.so").is_file()
}

/// The page the http.server tests fetch, and what it says.
const PAGE: &str = "index.html";
const PAGE_TEXT: &str = "served by python3 -m http.server under herd\n";

/// herd running `workers` copies of `python3 -m http.server PORT` in a
/// scratch directory holding [`PAGE`], with `flags`; the port.
fn http_server(name: &str, workers: usize, flags: &[&str]) -> (Herd, u16) {
    let dir = scratch_dir(name);
    std::fs::write(dir.join(PAGE), PAGE_TEXT).unwrap();
    let command = ["python3", "-m", "http.server", "PORT"];
    preloaded(&dir, workers, flags, &command)
}

/// herd running `workers` copies of `command` in `dir`, under the preload
/// library, with `flags`, on a free port that replaces each `PORT` word
/// of `command`; the port.
fn preloaded(dir: &Path, workers: usize, flags: &[&str], command: &[&str]) -> (Herd, u16) {
    assert!(preload_built(), "cargo could not build herd-preload");
    let port = free_port();
    let (listen, workers, port_arg) = (
        format!("127.0.0.1:{port}"),
        workers.to_string(),
        port.to_string(),
    );
    let mut args = vec!["--listen", &listen, "--workers", &workers];
    args.extend(["--protocol", "preload"]);
    args.extend_from_slice(flags);
    args.push("--");
    args.extend(command.iter().map(|word| {
        if *word == "PORT" {
            port_arg.as_str()
        } else {
            word
        }
    }));
    (Herd::start_in(dir, &args), port)
}

/// The slot whose worker logged the request for `path` (http.server logs
/// each request to stderr; herd prefixes it `[worker N] `).
fn slots_that_served(herd: &Herd, tag: &str, count: usize) -> BTreeMap<usize, usize> {
    let lines = herd.wait_for_worker_output(tag, count);
    let mut by_turn = BTreeMap::new();
    for line in lines {
        let slot: usize = line["[worker ".len()..]
            .split(']')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let turn: usize = line
            .split(tag)
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no turn in {line:?}"));
        by_turn.insert(turn, slot);
    }
    by_turn
}

/// One GET of [`PAGE`] with `?tag=N`, from `source`; the status.
fn fetch(addr: SocketAddr, source: IpAddr, tag: &str, n: usize) -> u16 {
    let mut stream = send_request_to(addr, source, &format!("/{PAGE}?{tag}{n}"));
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let response = responses::parse(&response).unwrap_or_else(|e| panic!("{tag}{n}: {e}"));
    assert_eq!(response.body, PAGE_TEXT);
    response.status
}

fn send_request_to(addr: SocketAddr, source: IpAddr, path: &str) -> TcpStream {
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    let mut stream = TcpStream::from(socket);
    let from = nix::sys::socket::SockaddrIn::from(std::net::SocketAddrV4::new(
        match source {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(_) => panic!("IPv4 sources only"),
        },
        0,
    ));
    nix::sys::socket::bind(std::os::fd::AsRawFd::as_raw_fd(&stream), &from).unwrap();
    let to = nix::sys::socket::SockaddrIn::from(match addr {
        SocketAddr::V4(v4) => v4,
        SocketAddr::V6(_) => panic!("IPv4 only"),
    });
    nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&stream), &to).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let request = format!("GET {path} HTTP/1.0\r\nHost: herd-test\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    stream
}

const LOCALHOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Every slot's worker said its bind was captured, and what it asked for.
fn captured_binds(herd: &Herd, workers: usize) -> BTreeSet<String> {
    herd.wait_for_event("preload_captured", &[], workers)
        .iter()
        .map(|event| event["asked"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn python_http_server_takes_strict_turns_in_round_robin() {
    let (herd, port) = http_server("preload-http-turns", 3, &["--mode", "round-robin"]);
    herd.wait_ready(3);
    // http.server binds the wildcard, `::` on a dual-stack host.
    let asked = captured_binds(&herd, 3);
    assert!(
        asked
            .iter()
            .all(|a| a == &format!("[::]:{port}") || a == &format!("0.0.0.0:{port}")),
        "{asked:?}"
    );
    let turns = 30;
    for n in 0..turns {
        assert_eq!(fetch(herd.addr(), LOCALHOST, "turn=", n), 200);
    }
    let served = slots_that_served(&herd, "turn=", turns);
    let mut per_slot = BTreeMap::new();
    for slot in served.values() {
        *per_slot.entry(*slot).or_insert(0) += 1;
    }
    assert_eq!(
        per_slot,
        BTreeMap::from([(0, 10), (1, 10), (2, 10)]),
        "{served:?}"
    );
    // Not only the counts: one fixed cycle.
    for n in 0..turns {
        assert_eq!(served[&n], served[&(n % 3)], "turn {n} of {served:?}");
    }
    assert!(herd.stop().success());
}

#[test]
fn python_http_server_under_sticky_keeps_each_client_address_on_one_worker() {
    let (herd, _) = http_server("preload-http-sticky", 2, &["--mode", "sticky"]);
    herd.wait_ready(2);
    let sources: Vec<IpAddr> = (2..8).map(|i| IpAddr::from([127, 0, 0, i])).collect();
    let rounds = 4;
    let mut n = 0;
    let mut sent_from = BTreeMap::new();
    for _ in 0..rounds {
        for source in &sources {
            assert_eq!(fetch(herd.addr(), *source, "sticky=", n), 200);
            sent_from.insert(n, *source);
            n += 1;
        }
    }
    let served = slots_that_served(&herd, "sticky=", n);
    let mut slots_of: BTreeMap<IpAddr, BTreeSet<usize>> = BTreeMap::new();
    for (turn, slot) in &served {
        slots_of.entry(sent_from[turn]).or_default().insert(*slot);
    }
    assert!(
        slots_of.values().all(|slots| slots.len() == 1),
        "{slots_of:?}"
    );
    assert_eq!(slots_of.len(), sources.len());
    assert!(herd.stop().success());
}

#[test]
fn python_http_server_under_least_conn_is_sent_where_fewest_are_open() {
    let flags = ["--mode", "least-conn", "--metrics", "127.0.0.1:0"];
    let (herd, _) = http_server("preload-http-least-conn", 2, &flags);
    herd.wait_ready(2);
    let metrics = metrics_addr(&herd);
    // herd's count of open connections, once it is `open` (the library
    // reports CLOSED after the close, so the count lags by a moment).
    let open_becomes = |open: f64| {
        wait_until(&format!("{open} open connections"), || {
            let (_, _, text) = http(metrics, "GET", "/metrics");
            (sum_of(&text, "herd_worker_open_connections") == open).then_some(())
        })
    };
    // Three connections that send nothing: http.server's threads wait on
    // them, so they stay open, two on one worker and one on the other.
    let idle: Vec<TcpStream> = (1..=3)
        .map(|open| {
            let stream = TcpStream::connect(herd.addr()).unwrap();
            open_becomes(f64::from(open));
            stream
        })
        .collect();
    // Each request closes when answered (HTTP/1.0), and the library
    // reports CLOSED: every one goes to the worker with one idle connection.
    let requests = 6;
    for n in 0..requests {
        assert_eq!(fetch(herd.addr(), LOCALHOST, "least=", n), 200);
        open_becomes(3.0);
    }
    let served = slots_that_served(&herd, "least=", requests);
    let slots: BTreeSet<usize> = served.values().copied().collect();
    assert_eq!(slots.len(), 1, "{served:?}");
    drop(idle);
    assert!(herd.stop().success());
}

/// http.server's answer to `/index.html`: [`PAGE_TEXT`].
fn the_page(body: &str) -> Option<u32> {
    (body == PAGE_TEXT).then_some(0)
}

#[test]
fn python_http_server_drops_nothing_through_kill_and_reload() {
    let name = "python_http_server_drops_nothing_through_kill_and_reload";
    let (herd, _) = http_server("preload-http-faults", 2, &["--mode", "round-robin"]);
    let first = herd.wait_all_ready(2);
    let addr = herd.addr();
    let load = Load::start_on(addr, "/index.html", the_page);
    load.settle(STEADY);
    let (kill, steps) = kill_then_reload(&herd, &load, &first);
    let outcomes = load.finish();
    assert_only_the_kill_failed(name, &outcomes, &kill, &steps);
    // The reloaded workers drained and stopped themselves (SIGTERM from the
    // library once nothing was open), in time: herd killed none of them.
    let killed = herd.events("drain_timeout", &[]);
    assert!(killed.is_empty(), "{killed:?}");
    assert!(herd.stop().success());
}

#[test]
fn python_http_server_finishes_a_slow_request_across_a_reload() {
    let (herd, _) = http_server("preload-http-slow", 1, &[]);
    let old = herd.wait_ready(1)[&0];
    // Half a request: the old worker has accepted it and waits for the rest.
    let mut slow = TcpStream::connect(herd.addr()).unwrap();
    slow.write_all(b"GET /index.html HTTP/1.0\r\n").unwrap();
    wait_until("the slow connection handed over", || {
        let handed: u64 = workers_of(&herd.status())
            .iter()
            .map(|w| w["handed_off"].as_u64().unwrap_or(0))
            .sum();
        (handed >= 1).then_some(())
    });
    let reload = herd.control(&["reload"]);
    assert_eq!(reload.code, Some(0), "{reload:?}");
    herd.wait_for_event("worker_draining", &[("pid", json!(old))], 1);
    // The old worker still has the connection open, so it has not stopped.
    assert!(Path::new(&format!("/proc/{old}")).exists());
    slow.write_all(b"Host: herd-test\r\n\r\n").unwrap();
    let mut response = String::new();
    slow.set_read_timeout(Some(DEADLINE)).unwrap();
    slow.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.0 200"), "{response:?}");
    assert!(response.ends_with(PAGE_TEXT), "{response:?}");
    herd.wait_for_event("worker_exited", &[("pid", json!(old))], 1);
    assert!(herd.events("drain_timeout", &[]).is_empty());
    assert!(herd.stop().success());
}

/// In the OS-scheduled modes the library hands http.server the socket herd
/// passed: every worker serves, nothing fails, and no bind reached the
/// kernel (it would have failed: herd holds the port).
fn serves_from_the_inherited_socket(mode: &[&str]) {
    let name = format!("preload-http-{}", mode.join("-"));
    let (herd, port) = http_server(&name, 2, mode);
    let pids = herd.wait_all_ready(2);
    assert_eq!(pids.len(), 2);
    captured_binds(&herd, 2);
    for n in 0..20 {
        assert_eq!(fetch(herd.addr(), LOCALHOST, "os=", n), 200);
    }
    let served = slots_that_served(&herd, "os=", 20);
    assert_eq!(served.len(), 20);
    assert!(
        herd.events("preload_bind_passed", &[]).is_empty(),
        "port {port}"
    );
    assert!(herd.stop().success());
}

#[test]
fn python_http_server_in_shared_mode_serves_from_the_inherited_socket() {
    serves_from_the_inherited_socket(&["--mode", "shared"]);
}

#[test]
fn python_http_server_in_reuseport_mode_serves_from_the_inherited_socket() {
    serves_from_the_inherited_socket(&["--mode", "reuseport"]);
}

#[test]
fn kernel_rotation_gives_preloaded_http_servers_strict_turns() {
    let name = "kernel_rotation_gives_preloaded_http_servers_strict_turns";
    if !require_cap_bpf(name) {
        return;
    }
    let mode = ["--mode", "round-robin", "--rotation", "kernel"];
    let (herd, _) = http_server("preload-http-kernel", 2, &mode);
    herd.wait_all_ready(2);
    for n in 0..20 {
        assert_eq!(fetch(herd.addr(), LOCALHOST, "kernel=", n), 200);
    }
    let served = slots_that_served(&herd, "kernel=", 20);
    for n in 0..20 {
        assert_eq!(served[&n], served[&(n % 2)], "turn {n} of {served:?}");
    }
    assert_ne!(served[&0], served[&1]);
    assert!(herd.stop().success());
}

// ---- nginx, prefork: its worker processes inherit the captured socket ----

/// A plain nginx config: it binds `listen 127.0.0.1:PORT` itself, its
/// master forks two worker processes, and each answers with its pid.
fn nginx_conf(dir: &Path, port: u16) -> String {
    let dir = dir.display();
    format!(
        "daemon off;\nmaster_process on;\nworker_processes 2;\npid {dir}/nginx.pid;\n\
         error_log stderr notice;\nevents {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n\
         proxy_temp_path {dir}/proxy;\n  fastcgi_temp_path {dir}/fastcgi;\n\
         uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n\
         server {{\n    listen 127.0.0.1:{port};\n\
         location = / {{ return 200 \"nginx pid=$pid\\n\"; }}\n  }}\n}}\n"
    )
}

#[test]
fn nginx_with_master_process_on_serves_from_its_worker_processes() {
    let test = "nginx_with_master_process_on_serves_from_its_worker_processes";
    let Some(nginx) = nginx() else {
        skip_unless_ci(test, "needs nginx (apt-get install nginx-light)");
        return;
    };
    assert!(preload_built());
    let workers = 2;
    let dir = scratch_dir("preload-nginx");
    let port = free_port();
    // Two herd slots, two masters: each its own pid file.
    let command = format!(
        "exec {} -p {dir} -c {dir}/nginx-$HERD_WORKER_ID.conf",
        nginx.display(),
        dir = dir.display()
    );
    for slot in 0..workers {
        let conf = nginx_conf(&dir, port).replace("nginx.pid", &format!("nginx-{slot}.pid"));
        std::fs::write(dir.join(format!("nginx-{slot}.conf")), conf).unwrap();
    }
    let listen = format!("127.0.0.1:{port}");
    let herd = Herd::start_in(
        &dir,
        &[
            "--listen",
            &listen,
            "--workers",
            "2",
            "--protocol",
            "preload",
            "--stop-signal",
            "SIGQUIT",
            "--",
            "sh",
            "-c",
            &command,
        ],
    );
    let masters = herd.wait_ready(workers);
    assert_eq!(
        captured_binds(&herd, workers),
        BTreeSet::from([listen.clone()])
    );
    // Each master's two worker processes, by the master's slot.
    let slot_of: BTreeMap<u32, usize> = wait_until("nginx's worker processes", || {
        let children: BTreeMap<u32, usize> = masters
            .iter()
            .flat_map(|(slot, master)| {
                procs::descendants(*master)
                    .into_iter()
                    .map(move |p| (p.pid, *slot))
            })
            .collect();
        (children.len() == 2 * workers).then_some(children)
    });
    let turns = 20;
    let served: Vec<u32> = (0..turns)
        .map(|_| {
            let (code, _, body) = http(herd.addr(), "GET", "/");
            assert_eq!(code, 200, "{body}");
            field(&body, "pid") as u32
        })
        .collect();
    // Answered by worker processes, never a master, in strict turns of slots.
    let slots: Vec<usize> = served
        .iter()
        .map(|pid| {
            *slot_of
                .get(pid)
                .unwrap_or_else(|| panic!("pid {pid} is no nginx worker process: {slot_of:?}"))
        })
        .collect();
    for (n, slot) in slots.iter().enumerate() {
        assert_eq!(*slot, slots[n % 2], "turn {n} of {slots:?}");
    }
    assert_ne!(slots[0], slots[1]);
    let processes: BTreeSet<u32> = served.iter().copied().collect();
    eprintln!("nginx: {turns} answers from worker processes {processes:?} of masters {masters:?}");
    // SIGQUIT is nginx's graceful stop: herd stops it in time, exit 0.
    let log = herd.log_text();
    assert!(herd.stop().success(), "{log}");
}

// ---- a C server: edge-triggered epoll, non-blocking accept4 ----

/// tests/fixtures/preload/epoll_server.c, compiled into `dir`.
fn epoll_server(dir: &Path) -> Option<PathBuf> {
    let source = format!(
        "{}/tests/fixtures/preload/epoll_server.c",
        env!("CARGO_MANIFEST_DIR")
    );
    let binary = dir.join("epoll_server");
    let built = Command::new("cc")
        .args(["-O2", "-Wall", "-o"])
        .arg(&binary)
        .arg(&source)
        .status()
        .is_ok_and(|s| s.success());
    built.then_some(binary)
}

#[test]
fn an_epoll_server_gets_what_a_real_nonblocking_accept4_gives() {
    let test = "an_epoll_server_gets_what_a_real_nonblocking_accept4_gives";
    let dir = scratch_dir("preload-epoll");
    let Some(server) = epoll_server(&dir) else {
        skip_unless_ci(test, "needs a C compiler (apt-get install gcc)");
        return;
    };
    let server = server.display().to_string();
    let (herd, port) = preloaded(&dir, 2, &[], &[&server, "PORT"]);
    let pids: BTreeSet<u32> = herd.wait_ready(2).into_values().collect();
    let mut answered = Vec::new();
    for n in 0..12u8 {
        let source = IpAddr::from([127, 0, 0, 2 + n % 3]);
        let mut stream = send_request_to(herd.addr(), source, "/");
        let client = stream.local_addr().unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).unwrap();
        let answer = responses::parse(&response).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(answer.status, 200);
        let body = answer.body.as_str();
        let word = |name: &str| -> String {
            let key = format!("{name}=");
            body.split_whitespace()
                .find_map(|w| w.strip_prefix(key.as_str()))
                .unwrap_or_else(|| panic!("no {name} in {body:?}"))
                .to_string()
        };
        // The real client address, from accept4 and from the fd itself.
        assert_eq!(word("peer"), client.to_string(), "{body}");
        assert_eq!(word("getpeername"), client.to_string(), "{body}");
        // SOCK_NONBLOCK | SOCK_CLOEXEC, as asked.
        assert_eq!(
            (word("nonblock"), word("cloexec")),
            ("1".into(), "1".into()),
            "{body}"
        );
        // getsockname on its listener: the address it bound.
        assert_eq!(word("listener"), format!("0.0.0.0:{port}"), "{body}");
        let pid = body
            .strip_prefix("Handled by worker ")
            .and_then(|rest| rest.split(' ').next());
        answered.push(
            pid.and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("{body:?}")),
        );
    }
    assert_eq!(answered.iter().copied().collect::<BTreeSet<u32>>(), pids);
    for (n, pid) in answered.iter().enumerate() {
        assert_eq!(*pid, answered[n % 2], "turn {n} of {answered:?}");
    }
    assert!(herd.stop().success());
}

// ---- what the library leaves alone, and what herd refuses ----

#[test]
fn a_bind_to_another_port_is_left_to_the_program_and_logged() {
    let dir = scratch_dir("preload-two-ports");
    std::fs::write(dir.join(PAGE), PAGE_TEXT).unwrap();
    let admin = free_port();
    let script = format!(
        "{}/tests/fixtures/preload/two_ports.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let admin_arg = admin.to_string();
    let command = ["python3", &script, "PORT", &admin_arg];
    let (herd, port) = preloaded(&dir, 1, &[], &command);
    herd.wait_ready(1);
    let passed = herd.wait_for_event("preload_bind_passed", &[], 1);
    assert_eq!(passed[0]["address"], json!(format!("127.0.0.1:{admin}")));
    assert_eq!(
        captured_binds(&herd, 1),
        BTreeSet::from([format!("0.0.0.0:{port}")])
    );
    // The admin port is the program's own socket: reachable directly.
    let (code, _, body) = http(SocketAddr::from(([127, 0, 0, 1], admin)), "GET", "/");
    assert_eq!(
        (code, body.as_str()),
        (200, "admin port, bound by the program itself\n")
    );
    assert_eq!(fetch(herd.addr(), LOCALHOST, "served=", 0), 200);
    assert!(herd.stop().success());
}

/// `herd check` and `herd run` both refuse `program` under preload, with
/// a message containing `why` and the alternatives.
fn refused(name: &str, program: &Path, why: &str) {
    assert!(preload_built());
    let dir = scratch_dir(name);
    let program = program.display().to_string();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--protocol",
        "preload",
        "--",
        program.as_str(),
    ];
    let mut check = vec!["check"];
    check.extend(args);
    let checked = herd_cli(&dir, &check);
    let mut run = vec!["run"];
    run.extend(args);
    let ran = herd_cli(&dir, &run);
    // `check` says a config is bad with 1, `run` with 2; the words agree.
    assert_eq!(
        (checked.code, ran.code),
        (Some(1), Some(2)),
        "{checked:?} {ran:?}"
    );
    assert_eq!(checked.stderr, ran.stderr);
    for result in [&checked, &ran] {
        assert!(
            result.stderr.contains("invalid `protocol` = \"preload\""),
            "{result:?}"
        );
        assert!(result.stderr.contains(why), "{result:?}");
        assert!(result.stderr.contains("LISTEN_FDS"), "{result:?}");
    }
}

/// [`refused`], for a `binary` that `make` makes; skipped (outside CI)
/// when it cannot, saying what it `needs`.
fn refused_once_made(test: &str, make: &mut Command, needs: &str, binary: &Path, why: &str) {
    if !make.status().is_ok_and(|s| s.success()) {
        skip_unless_ci(test, needs);
        return;
    }
    refused(test, binary, why);
}

#[test]
fn a_statically_linked_program_is_refused_with_the_alternatives() {
    let test = "a_statically_linked_program_is_refused_with_the_alternatives";
    let dir = scratch_dir("preload-static-build");
    let source = dir.join("static.c");
    std::fs::write(&source, "int main(void) { return 0; }\n").unwrap();
    let binary = dir.join("static-server");
    let mut make = Command::new("cc");
    make.arg("-static").arg("-o").arg(&binary).arg(&source);
    let needs = "needs gcc with a static libc (libc6-dev)";
    refused_once_made(test, &mut make, needs, &binary, "statically linked");
}

#[test]
fn a_go_program_is_refused_with_the_alternatives() {
    let test = "a_go_program_is_refused_with_the_alternatives";
    let dir = scratch_dir("preload-go-build");
    // What herd looks for in a Go binary, added to a dynamic one.
    let binary = dir.join("go-server");
    std::fs::copy("/bin/true", &binary).unwrap();
    let mut make = Command::new("objcopy");
    make.arg("--add-section")
        .arg(".go.buildinfo=/dev/null")
        .arg(&binary);
    refused_once_made(
        test,
        &mut make,
        "needs objcopy (binutils)",
        &binary,
        "Go program",
    );
}

#[test]
fn a_set_id_program_is_refused_with_the_alternatives() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch_dir("preload-setuid-build");
    let binary = dir.join("setuid-server");
    std::fs::copy("/bin/true", &binary).unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o4755)).unwrap();
    refused(
        "a_set_id_program_is_refused_with_the_alternatives",
        &binary,
        "set-user-ID",
    );
}

#[test]
fn a_server_that_closes_every_inherited_fd_keeps_herds_channel() {
    let dir = scratch_dir("preload-closes-everything");
    std::fs::write(dir.join(PAGE), PAGE_TEXT).unwrap();
    let script = format!(
        "{}/tests/fixtures/preload/closes_everything.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let (herd, _) = preloaded(&dir, 2, &[], &["python3", &script, "PORT"]);
    herd.wait_ready(2);
    for n in 0..6 {
        assert_eq!(fetch(herd.addr(), LOCALHOST, "closed=", n), 200);
    }
    assert_eq!(slots_that_served(&herd, "closed=", 6).len(), 6);
    assert!(herd.stop().success());
}

#[test]
fn a_library_the_workers_user_cannot_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let test = "a_library_the_workers_user_cannot_read_is_refused";
    if !nix::unistd::geteuid().is_root() {
        skip_unless_ci(test, "needs root, to run workers as nobody");
        return;
    }
    assert!(preload_built());
    // A copy of the library where only root can reach it.
    let dir = scratch_dir("preload-unreadable");
    let private = dir.join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let library = private.join("libherd_preload.so");
    let built = Path::new(herd_bin()).with_file_name("libherd_preload.so");
    std::fs::copy(built, &library).unwrap();
    let named = format!("HERD_PRELOAD_LIBRARY={}", library.display());
    let config = write_config(&dir, "user = \"nobody\"\n")
        .display()
        .to_string();
    let args = [
        "check",
        "-c",
        &config,
        "--listen",
        "127.0.0.1:0",
        "--protocol",
        "preload",
        "--",
        "python3",
        "-m",
        "http.server",
        "3000",
    ];
    let check = herd_cli_under(&dir, &["env", &named], &args, DEADLINE).unwrap();
    assert_eq!(check.code, Some(1), "{check:?}");
    assert!(
        check
            .stderr
            .contains("the workers cannot load herd's preload library")
            && check
                .stderr
                .contains("private is not searchable by user \"nobody\""),
        "{check:?}"
    );
}

#[test]
fn a_socket_moved_by_dup2_still_takes_hand_offs() {
    let dir = scratch_dir("preload-dup2");
    let script = format!(
        "{}/tests/fixtures/preload/moves_its_socket.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let (herd, port) = preloaded(&dir, 2, &[], &["python3", &script, "PORT"]);
    let pids: BTreeSet<u32> = herd.wait_ready(2).into_values().collect();
    // The wrapped fd still answers getsockname with the bound address.
    let moved = format!("moved listener on fd 100: ('0.0.0.0', {port})");
    herd.wait_for_worker_output(&moved, 2);
    let answered: Vec<u32> = (0..8)
        .map(|_| {
            let (code, _, body) = http(herd.addr(), "GET", "/");
            assert_eq!(code, 200, "{body}");
            field(&body, "worker") as u32
        })
        .collect();
    assert_eq!(answered.iter().copied().collect::<BTreeSet<u32>>(), pids);
    assert!(herd.stop().success());
}

#[test]
fn a_program_binding_in_a_loop_cannot_flood_herds_log() {
    let dir = scratch_dir("preload-bind-flood");
    std::fs::write(dir.join(PAGE), PAGE_TEXT).unwrap();
    let script = format!(
        "{}/tests/fixtures/preload/binds_in_a_loop.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let binds = 1000;
    let count = binds.to_string();
    let (herd, _) = preloaded(&dir, 1, &[], &["python3", &script, "PORT", &count]);
    herd.wait_ready(1);
    // Logged at the 1st, 2nd, 4th, ... 512th bind: 10 lines for 1000.
    let logged = herd.wait_for_event("preload_bind_passed", &[("total", json!(512))], 1);
    assert_eq!(logged.len(), 1);
    assert_eq!(herd.events("preload_bind_passed", &[]).len(), 10);
    // And the bind that mattered is logged all the same.
    assert_eq!(herd.wait_for_event("preload_captured", &[], 1).len(), 1);
    assert_eq!(fetch(herd.addr(), LOCALHOST, "flood=", 0), 200);
    assert!(herd.stop().success());
}

#[test]
fn a_java_server_takes_strict_turns() {
    let test = "a_java_server_takes_strict_turns";
    let has_jdk = Command::new("javac")
        .arg("-version")
        .output()
        .is_ok_and(|out| out.status.success());
    if !has_jdk {
        skip_unless_ci(
            test,
            "needs a JDK (apt-get install openjdk-17-jdk-headless)",
        );
        return;
    }
    let dir = scratch_dir("preload-java");
    let source = format!(
        "{}/tests/fixtures/preload/Server.java",
        env!("CARGO_MANIFEST_DIR")
    );
    let (herd, port) = preloaded(&dir, 2, &[], &["java", &source, "PORT"]);
    let pids: BTreeSet<u32> = herd.wait_ready(2).into_values().collect();
    let asked = captured_binds(&herd, 2);
    assert_eq!(asked, BTreeSet::from([format!("[::]:{port}")]));
    let answered: Vec<u32> = (0..10)
        .map(|n| get_pid(herd.addr(), DEADLINE).unwrap_or_else(|e| panic!("request {n}: {e}")))
        .collect();
    assert_eq!(answered.iter().copied().collect::<BTreeSet<u32>>(), pids);
    for (n, pid) in answered.iter().enumerate() {
        assert_eq!(*pid, answered[n % 2], "turn {n} of {answered:?}");
    }
    assert!(herd.stop().success());
}
