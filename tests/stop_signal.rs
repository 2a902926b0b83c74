//! Issue 15, point 2: `stop_signal` stops a server by its own convention.
//! The fixture, a plain socket-activated server, stops gracefully on
//! SIGQUIT alone (as nginx does) and ignores SIGTERM: with
//! `stop_signal = "SIGQUIT"` herd stops it in time and exits 0, a request
//! in flight completing; without it, it is SIGKILLed at `shutdown_timeout`
//! and herd exits 1. Reload, scale-down and a `max_memory` replacement
//! send the same signal. Then nginx itself as a `--mode shared` worker:
//! with `stop_signal = "SIGQUIT"` a download in flight completes across
//! `herd reload`; with herd's SIGTERM (nginx's fast shutdown) it is cut.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

fn quit_only_server() -> String {
    format!(
        "{}/tests/fixtures/quit_only_server.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// `workers` fixture servers in `--mode shared`, ready by `ready_delay`,
/// with `config` and `flags`.
fn launch(name: &str, config: &str, workers: usize, flags: &[&str]) -> Herd {
    let config = format!("mode = \"shared\"\nready_delay = \"200ms\"\n{config}");
    let server = quit_only_server();
    Herd::launch(name, Some(&config), workers, flags, &["python3", &server])
}

/// slot -> pid of `count` workers that are ready and have said they
/// serve, their signal handlers set (`ready_delay` may pass before).
fn serving(herd: &Herd, count: usize) -> std::collections::BTreeMap<usize, u32> {
    let slots = herd.wait_ready(count);
    let said = pids_that(herd, "serving pid=", count);
    for pid in slots.values() {
        assert!(said.contains(pid), "{pid} not in {said:?}");
    }
    slots
}

/// A `GET /slow` in progress: it returns once a worker has begun it.
fn slow_request(herd: &Herd, addr: SocketAddr, already: usize) -> JoinHandle<(u16, String)> {
    let request = std::thread::spawn(move || {
        let (code, _, body) = http(addr, "GET", "/slow");
        (code, body)
    });
    herd.wait_for_worker_output("slow request pid=", already + 1);
    request
}

/// The pids the workers said they got `what` in (`got SIGQUIT`, `ignored SIGTERM`).
fn pids_that(herd: &Herd, what: &str, count: usize) -> Vec<u32> {
    let mut pids: Vec<u32> = herd
        .wait_for_worker_output(what, count)
        .iter()
        .map(|line| field(line, "pid") as u32)
        .collect();
    pids.sort();
    pids
}

/// The exit code herd logged for worker `pid` (`None`: killed by a signal).
fn exit_code(herd: &Herd, pid: u32) -> Option<i64> {
    herd.wait_for_event("worker_exited", &[("pid", json!(pid))], 1)[0]["code"].as_i64()
}

#[test]
fn stop_signal_stops_a_server_that_ignores_sigterm_in_time_and_herd_exits_0() {
    let mut herd = launch(
        "stop-signal-stop",
        "stop_signal = \"SIGQUIT\"\nshutdown_timeout = \"8s\"\n",
        2,
        &[],
    );
    let mut pids: Vec<u32> = serving(&herd, 2).into_values().collect();
    pids.sort();
    let request = slow_request(&herd, herd.addr(), 0);
    let asked = Instant::now();
    signal(herd.pid(), Signal::SIGTERM);
    let status = herd.wait_exit();
    let took = asked.elapsed();
    assert_eq!(status.code(), Some(0), "{}", herd.log_text());
    assert!(took < Duration::from_secs(8), "took {took:?}");
    let (code, body) = request.join().unwrap();
    assert_eq!(code, 200);
    assert!(body.ends_with(" slow"), "{body}");
    assert_eq!(pids_that(&herd, "got SIGQUIT", 2), pids);
    assert!(
        herd.worker_output("ignored").is_empty(),
        "{}",
        herd.log_text()
    );
    for pid in pids {
        assert_eq!(exit_code(&herd, pid), Some(0));
    }
}

#[test]
fn without_stop_signal_such_a_server_is_killed_at_shutdown_timeout_and_herd_exits_1() {
    let mut herd = launch("stop-signal-unset", "shutdown_timeout = \"1s\"\n", 2, &[]);
    let mut pids: Vec<u32> = serving(&herd, 2).into_values().collect();
    pids.sort();
    signal(herd.pid(), Signal::SIGTERM);
    // Made ready by `ready_delay`, they are sent SIGTERM, which they ignore.
    assert_eq!(pids_that(&herd, "ignored SIGTERM", 2), pids);
    herd.wait_for_event("shutdown_timeout", &[], 1);
    assert_eq!(herd.wait_exit().code(), Some(1));
    for pid in pids {
        let exited = &herd.wait_for_event("worker_exited", &[("pid", json!(pid))], 1)[0];
        assert_eq!(exited["signal"], json!(Signal::SIGKILL as i32), "{exited}");
    }
    assert!(herd.worker_output("got SIGQUIT").is_empty());
}

#[test]
fn a_reload_stops_each_old_worker_with_the_stop_signal_and_lets_its_request_finish() {
    let herd = launch(
        "stop-signal-reload",
        "stop_signal = \"SIGQUIT\"\nshutdown_timeout = \"8s\"\n",
        2,
        &[],
    );
    let mut old: Vec<u32> = serving(&herd, 2).into_values().collect();
    old.sort();
    let request = slow_request(&herd, herd.addr(), 0);
    let reload = herd.control(&["reload"]);
    assert_eq!(reload.code, Some(0), "{reload:?}");
    let (code, body) = request.join().unwrap();
    assert_eq!((code, body.ends_with(" slow")), (200, true), "{body}");
    assert_eq!(pids_that(&herd, "got SIGQUIT", 2), old);
    for &pid in &old {
        assert_eq!(exit_code(&herd, pid), Some(0), "{}", herd.log_text());
    }
    // The new workers serve.
    let (code, _, body) = http(herd.addr(), "GET", "/");
    assert_eq!(code, 200);
    assert!(!old.contains(&(field(&body, "pid") as u32)), "{body}");
    assert!(
        herd.worker_output("ignored").is_empty(),
        "{}",
        herd.log_text()
    );
}

#[test]
fn a_scale_down_sends_the_stop_signal_given_as_a_flag() {
    let mut herd = launch(
        "stop-signal-scale",
        "shutdown_timeout = \"8s\"\n",
        2,
        &["--stop-signal", "QUIT"],
    );
    let slots = serving(&herd, 2);
    let scale = herd.control(&["scale", "1"]);
    assert_eq!(scale.code, Some(0), "{scale:?}");
    assert_eq!(pids_that(&herd, "got SIGQUIT", 1), [slots[&1]]);
    assert_eq!(exit_code(&herd, slots[&1]), Some(0));
    signal(herd.pid(), Signal::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0), "{}", herd.log_text());
    assert_eq!(pids_that(&herd, "got SIGQUIT", 2)[..].len(), 2);
    assert!(
        herd.worker_output("ignored").is_empty(),
        "{}",
        herd.log_text()
    );
}

#[test]
fn a_worker_over_max_memory_is_replaced_and_stopped_with_the_stop_signal() {
    let dir = scratch_dir("stop-signal-memory");
    let marker = dir.join("fat-once");
    let config = format!(
        "stop_signal = \"SIGQUIT\"\nshutdown_timeout = \"8s\"\nmax_memory = \"40MiB\"\n\
         monitor_interval = \"100ms\"\nenv = {{ FAT_ONCE = {:?} }}\n",
        marker.display().to_string()
    );
    let mut herd = launch("stop-signal-memory", &config, 1, &[]);
    let fat = serving(&herd, 1)[&0];
    herd.wait_for_event("memory_exceeded", &[("pid", json!(fat))], 1);
    assert_eq!(pids_that(&herd, "got SIGQUIT", 1), [fat]);
    assert_eq!(exit_code(&herd, fat), Some(0), "{}", herd.log_text());
    let (code, _, body) = http(herd.addr(), "GET", "/");
    assert_eq!(code, 200);
    assert_ne!(field(&body, "pid") as u32, fat, "{body}");
    signal(herd.pid(), Signal::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0), "{}", herd.log_text());
}

#[test]
fn a_stop_signal_no_server_can_catch_is_refused_before_any_worker_starts() {
    let dir = scratch_dir("stop-signal-refused");
    for (flag, reason) in [
        ("SIGKILL", "SIGKILL cannot be caught"),
        ("STOP", "SIGSTOP cannot be caught"),
        ("SIGTERMINATE", "expected one of: SIGTERM, SIGQUIT, SIGINT"),
    ] {
        let args = [
            "run",
            "--listen",
            "127.0.0.1:0",
            "--stop-signal",
            flag,
            "--",
            "true",
        ];
        let run = herd_cli(&dir, &args);
        assert_eq!(run.code, Some(2), "{run:?}");
        let message = format!("invalid `stop_signal` = {flag:?}: {reason}");
        assert!(run.stderr.contains(&message), "{message} in {run:?}");
    }
}

// ---- nginx, a real server that stops on SIGQUIT ----

/// herd running one nginx in `--mode shared` on a fresh port, serving a
/// 300 KB file at 150 KB/s from `dir`; `stop_signal` if given.
fn launch_nginx(name: &str, nginx: &Path, stop_signal: Option<&str>) -> (Herd, Vec<u8>) {
    let dir = scratch_dir(name);
    let port = free_port();
    let template = std::fs::read_to_string(format!(
        "{}/tests/fixtures/nginx/nginx.conf",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let conf = template
        .replace("@DIR@", &dir.display().to_string())
        .replace("@PORT@", &port.to_string());
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.join("big.bin"), &big).unwrap();
    let stop_signal = stop_signal.map_or(String::new(), |s| format!("stop_signal = {s:?}\n"));
    let config = format!(
        "listen = [\"127.0.0.1:{port}\"]\nworkers = 1\nmode = \"shared\"\n\
         ready_delay = \"500ms\"\nshutdown_timeout = \"10s\"\n{stop_signal}\
         env = {{ NGINX = \"3;\" }}\n"
    );
    let config_path = write_config(&dir, &config);
    let (prefix, conf) = (
        dir.display().to_string(),
        format!("{}/nginx.conf", dir.display()),
    );
    let nginx = nginx.display().to_string();
    let args = [
        "-c",
        config_path.to_str().unwrap(),
        "--",
        &nginx,
        "-p",
        &prefix,
        "-c",
        &conf,
        "-e",
        "stderr",
    ];
    (Herd::start_in(&dir, &args), big)
}

/// `GET /big.bin` that has begun to arrive: the thread returns the body.
fn download(addr: SocketAddr) -> JoinHandle<Vec<u8>> {
    let (begun, started) = std::sync::mpsc::channel();
    let download = std::thread::spawn(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        write!(
            stream,
            "GET /big.bin HTTP/1.1\r\nHost: herd\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut bytes = vec![0; 4096];
        let first = stream.read(&mut bytes).unwrap();
        bytes.truncate(first);
        begun.send(()).unwrap();
        let _ = stream.read_to_end(&mut bytes);
        let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        bytes.split_off(head_end)
    });
    started.recv_timeout(DEADLINE).expect("the download began");
    download
}

/// nginx serving, its master's pid: it took herd's socket, did not bind its own.
fn nginx_serving(herd: &Herd) -> u32 {
    let pid = herd.wait_ready(1)[&0];
    herd.wait_for_worker_output("using inherited sockets from \"3;\"", 1);
    pid
}

#[test]
fn nginx_with_stop_signal_sigquit_finishes_a_download_across_a_reload() {
    let test = "nginx_with_stop_signal_sigquit_finishes_a_download_across_a_reload";
    let Some(nginx) = nginx() else {
        skip_unless_ci(test, "needs nginx (apt-get install nginx-light)");
        return;
    };
    let (mut herd, big) = launch_nginx("stop-signal-nginx", &nginx, Some("SIGQUIT"));
    let old = nginx_serving(&herd);
    let download = download(herd.addr());
    let reload = herd.control(&["reload"]);
    assert_eq!(reload.code, Some(0), "{reload:?}");
    let body = download.join().unwrap();
    assert!(body == big, "got {} of {} bytes", body.len(), big.len());
    assert_eq!(exit_code(&herd, old), Some(0), "{}", herd.log_text());
    herd.wait_for_worker_output("gracefully shutting down", 1);
    // The new nginx serves; herd stops it the same way, in time: exit 0.
    let (code, _, body) = http(herd.addr(), "GET", "/");
    assert_eq!(code, 200);
    assert_ne!(field(&body, "pid") as u32, old, "{body}");
    signal(herd.pid(), Signal::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0), "{}", herd.log_text());
}

/// The contrast: herd's SIGTERM is nginx's fast shutdown, which cuts the
/// download; this is why nginx wants `stop_signal = "SIGQUIT"`.
#[test]
fn nginx_without_stop_signal_is_sent_sigterm_and_cuts_the_download() {
    let test = "nginx_without_stop_signal_is_sent_sigterm_and_cuts_the_download";
    let Some(nginx) = nginx() else {
        skip_unless_ci(test, "needs nginx (apt-get install nginx-light)");
        return;
    };
    let (mut herd, big) = launch_nginx("stop-signal-nginx-term", &nginx, None);
    nginx_serving(&herd);
    let download = download(herd.addr());
    let reload = herd.control(&["reload"]);
    assert_eq!(reload.code, Some(0), "{reload:?}");
    let body = download.join().unwrap();
    assert!(body.len() < big.len(), "got all {} bytes", body.len());
    herd.wait_for_worker_output("signal 15 (SIGTERM) received", 1);
    signal(herd.pid(), Signal::SIGTERM);
    assert_eq!(herd.wait_exit().code(), Some(0), "{}", herd.log_text());
}
