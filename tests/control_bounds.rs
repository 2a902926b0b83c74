//! Issue 13, point 5: the control socket, its client and `/metrics` are
//! bounded. An oversized or silent control request is dropped while other
//! clients are answered; out of fds, the control accept loop backs off
//! instead of spinning; the client gives up on a herd that does not answer
//! and says what it waited for, and exits quietly when its reader goes
//! away; `/metrics` serves a bounded number of connections at once, so a
//! client hammering it cannot take the fds service connections need.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::procs::status_field;
use common::sockets::connections_held;
use common::*;
use nix::sys::signal::Signal;

/// The bounds under test (README, Limits).
const MAX_REQUEST_BYTES: usize = 64 * 1024;
const MAX_METRICS_CONNECTIONS: u64 = 32;

/// `VmHWM` (peak resident memory) of `pid`, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status_field(&status, "VmHWM:").expect("VmHWM") << 10
}

/// User plus system CPU time `pid` has used, in seconds (all its threads).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let (_, rest) = stat.rsplit_once(')').unwrap();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // stat(5) fields 14 and 15 (utime, stime), in USER_HZ = 100 ticks a second;
    // `rest` starts at field 3.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// A client sends an endless request without a newline, another connects
/// and says nothing. Today herd reads the first until its 5 s timeout,
/// growing by all it was sent. Now it stops reading past 64 KiB and closes
/// that client, and meanwhile answers everyone else; the silent one gets
/// its answer once the read timeout passes.
#[test]
fn an_oversized_or_silent_control_request_is_dropped_while_others_are_answered() {
    const SENT_AT_MOST: usize = 256 << 20;
    let herd = Herd::launch("control-oversized", None, 1, &[], &[hello_worker()]);
    herd.wait_all_ready(1);
    let socket = herd.dir.join("herd.sock");
    let before = peak_rss(herd.pid());

    let mut silent = UnixStream::connect(&socket).unwrap();
    let mut flood = UnixStream::connect(&socket).unwrap();
    let flooding = std::thread::spawn(move || {
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0;
        while sent < SENT_AT_MOST {
            match flood.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) => return (sent, Some(e.kind())),
            }
        }
        (sent, None)
    });
    // Others are answered meanwhile.
    for _ in 0..3 {
        herd_ok(&herd.dir, &["status"]);
    }
    let (sent, error) = flooding.join().unwrap();
    eprintln!("herd took {sent} bytes of an oversized request before closing it ({error:?})");
    assert!(
        error.is_some(),
        "herd read all {sent} bytes of a request without a newline: requests must be capped at {MAX_REQUEST_BYTES} bytes"
    );
    // What the socket buffers hold, on top of the cap.
    assert!(
        sent < 4 << 20,
        "herd read {sent} bytes of one request before closing it"
    );
    let grew = peak_rss(herd.pid()).saturating_sub(before);
    assert!(
        grew < 8 << 20,
        "herd's peak RSS grew by {grew} bytes for one oversized request"
    );

    // The silent client is answered (refused) and closed, not held for good.
    silent.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut answer = String::new();
    silent
        .read_to_string(&mut answer)
        .expect("herd closes a silent control client");
    assert!(answer.contains("\"ok\":false"), "answer: {answer:?}");
    herd_ok(&herd.dir, &["status"]);
}

/// herd out of fds with a control client waiting: today `accept` fails at
/// once every time round the select loop and herd spins on a core. It must
/// back off (herd nearly idle meanwhile), and answer control commands once
/// fds are free again.
#[test]
fn out_of_fds_the_control_socket_backs_off_and_recovers() {
    // A worker that ACKs: herd holds what it sent it until it does (a
    // queued hand-off holds none of herd's fds).
    let herd = Herd::launch(
        "control-emfile",
        None,
        1,
        &[],
        &[hello_worker(), "--by-message"],
    );
    let ready = herd.wait_ready(1);
    herd.wait_all_ready(1);
    let worker = ready[&0];
    let pid = herd.pid();

    // With the worker frozen herd holds every connection it accepts; a
    // few more than the fds it has left exhaust them.
    set_fd_limit(pid, open_fds(pid) + 4);
    signal(worker, Signal::SIGSTOP);
    let held: Vec<TcpStream> = (0..12)
        .map(|_| send_request(herd.addr()).unwrap())
        .collect();
    herd.wait_for_event("accept_paused", &[], 1);

    // A control client waits in the control socket's queue meanwhile: the
    // socket is readable, and each accept fails with EMFILE.
    let mut waiting = UnixStream::connect(herd.dir.join("herd.sock")).unwrap();
    waiting.write_all(b"{\"command\":\"status\"}\n").unwrap();

    let (cpu_before, wall_before) = (cpu_seconds(pid), Instant::now());
    // A measurement window, not a synchronisation: how much CPU herd burns
    // while it cannot accept.
    std::thread::sleep(Duration::from_secs(2));
    let busy = (cpu_seconds(pid) - cpu_before) / wall_before.elapsed().as_secs_f64();
    eprintln!("herd used {:.0}% of a core while out of fds", busy * 100.0);
    assert!(
        busy < 0.25,
        "herd used {:.0}% of a core while out of fds: the control accept loop must back off",
        busy * 100.0
    );

    signal(worker, Signal::SIGCONT);
    for stream in held {
        read_answer(stream, DEADLINE).expect("held connections are served");
    }
    waiting.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut answer = String::new();
    waiting
        .read_to_string(&mut answer)
        .expect("the waiting client is answered once fds are free");
    assert!(answer.contains("\"ok\":true"), "answer: {answer:?}");
    herd_ok(&herd.dir, &["status"]);
    let warnings = herd.events("control_accept_failed", &[]).len();
    assert!(
        (1..=3).contains(&warnings),
        "{warnings} control accept warnings: one per episode"
    );
}

/// `herd status | head -1`: the reader goes away before herd prints. Today
/// `println!` panics on the broken pipe; it must exit quietly.
#[test]
fn status_into_a_closed_pipe_exits_quietly() {
    let herd = Herd::launch("control-epipe", None, 1, &[], &[hello_worker()]);
    herd.wait_all_ready(1);
    for args in [&["status"][..], &["status", "--json"][..]] {
        let (read_end, write_end): (OwnedFd, OwnedFd) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        // The reader is gone before herd writes a byte.
        drop(read_end);
        let child = Command::new(herd_bin())
            .args(args)
            .current_dir(&herd.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(write_end))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut child = child;
        let status = wait_until("herd status to exit", || child.try_wait().unwrap());
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert!(
            !stderr.contains("panicked"),
            "`herd {}` into a closed pipe panicked: {stderr}",
            args.join(" ")
        );
        assert_eq!(
            status.code(),
            Some(0),
            "`herd {}` into a closed pipe: {status}; stderr {stderr:?}",
            args.join(" ")
        );
    }
}

/// A herd that took the connection but never answers (here: a socket
/// nobody accepts on). Today `herd status` waits for good; it must give up
/// and say what it waited for (exit 3, like any herd that does not answer).
#[test]
fn the_control_client_gives_up_on_a_silent_herd_and_says_why() {
    let dir = scratch_dir("control-silent");
    let _listener = std::os::unix::net::UnixListener::bind(dir.join("herd.sock")).unwrap();
    let run = herd_cli_within(&dir, &["status"], DEADLINE).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(run.code, Some(3), "{run:?}");
    assert!(
        run.stderr.contains("waited") && run.stderr.contains("status"),
        "says what it waited for: {:?}",
        run.stderr
    );
    let run = herd_cli_within(&dir, &["status", "--timeout", "200ms"], DEADLINE)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(run.code, Some(3), "{run:?}");
    assert!(run.stderr.contains("200ms"), "{:?}", run.stderr);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The kernel's accept queue of the TCP socket listening on `port`: the
/// connections the kernel completed and the server has not accepted.
fn accept_queue(port: u16) -> u64 {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
    text.lines()
        .skip(1)
        .find_map(|line| {
            // sl local_address rem_address st tx_queue:rx_queue ...
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(fields[1].rsplit(':').next()?, 16).ok()?;
            if local_port != port || fields[3] != "0A" {
                return None;
            }
            u64::from_str_radix(fields[4].split(':').nth(1)?, 16).ok()
        })
        .unwrap_or(0)
}

/// 40 idle connections to /metrics: herd serves 32 at once and leaves the
/// rest in the kernel's queue (today it takes all 40, and every further one
/// costs it an fd); /metrics answers again once they are gone.
#[test]
fn metrics_serves_a_bounded_number_of_connections_at_once() {
    const OPENED: u64 = 40;
    let herd = Herd::launch(
        "metrics-bounded",
        None,
        1,
        &["--metrics", "127.0.0.1:0"],
        &[hello_worker()],
    );
    herd.wait_all_ready(1);
    let metrics = metrics_addr(&herd);
    let idle: Vec<TcpStream> = (0..OPENED)
        .map(|_| TcpStream::connect_timeout(&metrics, DEADLINE).unwrap())
        .collect();
    let deadline = Instant::now() + DEADLINE;
    let mut most_held = 0;
    loop {
        let held = connections_held(&[herd.pid()], metrics.port());
        let queued = accept_queue(metrics.port());
        most_held = most_held.max(held);
        assert!(
            held <= MAX_METRICS_CONNECTIONS,
            "herd holds {held} /metrics connections at once (at most {MAX_METRICS_CONNECTIONS})"
        );
        if held == MAX_METRICS_CONNECTIONS && queued == OPENED - MAX_METRICS_CONNECTIONS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out: herd holds {held} /metrics connections (most {most_held}), {queued} wait in the queue"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(idle);
    let (code, _, body) = http(metrics, "GET", "/metrics");
    assert_eq!(code, 200);
    assert!(body.contains("herd_build_info"));
}

/// Keeps `window` connections to `metrics` open, each with a request sent
/// and its answer never read, opening a new one whenever a connect fails,
/// until `stop`. `opened` counts the connections opened.
fn hammer(
    metrics: SocketAddr,
    window: usize,
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut open = Vec::with_capacity(window);
        let until = Instant::now() + DEADLINE * 2;
        while !stop.load(Ordering::SeqCst) && Instant::now() < until {
            if open.len() == window {
                // Holding them all: nothing to do but wait for the end.
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            let Ok(mut stream) = TcpStream::connect_timeout(&metrics, Duration::from_secs(1))
            else {
                continue;
            };
            let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: hammer\r\n\r\n");
            open.push(stream);
            opened.fetch_add(1, Ordering::SeqCst);
        }
    })
}

/// herd's fd limit lowered to what it uses plus 128; a client keeps 200
/// connections to /metrics open. Today herd accepts them until it has no
/// fd left, and service connections wait until herd drops idle ones (10 s
/// later): they time out. Now /metrics holds at most 32, and every request
/// is served.
#[test]
fn hammering_metrics_under_an_fd_limit_does_not_starve_service_requests() {
    let herd = Herd::launch(
        "metrics-hammer",
        None,
        2,
        &["--metrics", "127.0.0.1:0"],
        &[hello_worker()],
    );
    herd.wait_all_ready(2);
    let (addr, metrics) = (herd.addr(), metrics_addr(&herd));
    set_fd_limit(herd.pid(), open_fds(herd.pid()) + 128);

    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let hammering = hammer(metrics, 200, stop.clone(), opened.clone());
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let _stop = StopOnDrop(stop.clone());
    // 150: more than herd has fds for, fewer than it has fds for plus
    // what the kernel queues for /metrics (so the hammer gets there either way).
    wait_until("the hammer to open 150 connections", || {
        (opened.load(Ordering::SeqCst) >= 150).then_some(())
    });

    // A healthy herd answers in milliseconds; five seconds means starved.
    const STARVED: Duration = Duration::from_secs(5);
    for i in 0..20 {
        let stream = send_request(addr).unwrap();
        read_answer(stream, STARVED).unwrap_or_else(|e| {
            panic!(
                "service request {i} while /metrics is hammered: {e} (herd holds {} /metrics connections)",
                connections_held(&[herd.pid()], metrics.port())
            )
        });
    }
    stop.store(true, Ordering::SeqCst);
    hammering.join().unwrap();
}

/// A reload that waits for a worker: herd tells the client every 2 s that
/// it is at it, then answers; so the client's timeout bounds herd's
/// silence, not the reload.
#[test]
fn a_long_reload_sends_heartbeats_until_its_answer() {
    use std::io::{BufRead, BufReader};
    let dir = scratch_dir("control-heartbeat");
    let hello = hello_worker();
    let config = write_config(&dir, &format!("workers = 1\ncommand = [{hello:?}]\n"));
    let config = config.display().to_string();
    let herd = Herd::start_in(&dir, &["-c", &config, "--listen", "127.0.0.1:0"]);
    herd.wait_all_ready(1);
    // The new worker starts only once the file `go` exists.
    let gated = r#"while [ ! -e go ]; do sleep 0.02; done; exec \"$0\""#;
    let reloaded = format!(
        "workers = 1\nready_timeout = \"20s\"\ncommand = [\"sh\", \"-c\", \"{gated}\", {hello:?}]\n"
    );
    std::fs::write(&config, reloaded).unwrap();

    let mut client = UnixStream::connect(dir.join("herd.sock")).unwrap();
    client.write_all(b"{\"command\":\"reload\"}\n").unwrap();
    client.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut lines = BufReader::new(client);
    for _ in 0..2 {
        let mut line = String::new();
        lines.read_line(&mut line).expect("a heartbeat");
        assert_eq!(line, "{\"waiting\":\"reload\"}\n");
    }
    std::fs::write(dir.join("go"), "").unwrap();
    // Bounded: heartbeats until the new worker is ready, then the answer.
    let answer = (0..20)
        .find_map(|_| {
            let mut line = String::new();
            lines.read_line(&mut line).expect("a line");
            line.contains("\"ok\"").then_some(line)
        })
        .expect("an answer within 20 lines");
    assert!(answer.contains("\"ok\":true"), "{answer}");
    herd.stop();
}
