//! Issue 13, point 1: what workers print is bounded and never blocks herd.
//! A line without a newline is split at a fixed size instead of growing
//! herd's memory; when herd's own stdout and stderr cannot take more (a
//! pipe nobody reads), lines are dropped and counted, and status, requests,
//! metrics and SIGTERM keep working. Real herd, real workers, real pipes.

mod common;

use std::io::{BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use common::procs::status_field;
use common::*;

/// What herd appends to each piece of a line it had to split (README, Limits).
const SPLIT_MARKER: &str = " [herd: split at 64 KiB]";
/// The longest line herd forwards, before its `[worker N] ` prefix and marker.
const MAX_LINE_BYTES: usize = 64 * 1024;

fn huge_line_fixture() -> String {
    format!(
        "{}/tests/fixtures/bounds/huge_line.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// `VmHWM` (the peak resident memory) of `pid`, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status_field(&status, "VmHWM:").expect("VmHWM in /proc/pid/status") << 10
}

/// A worker writes a 64 MiB line with no newline. Today herd keeps the whole
/// line in memory until the newline comes (a 1 GB line grows herd by 1 GB);
/// it must forward it in pieces of at most 64 KiB, each but the last marked,
/// with herd's peak memory growing by far less than the line, and keep serving.
#[test]
fn a_line_without_a_newline_is_split_and_herd_stays_small() {
    const LINE_BYTES: usize = 64 << 20;
    let dir = scratch_dir("huge-line");
    let fifo = dir.join("go");
    let done = dir.join("done");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let fixture = huge_line_fixture();
    let size = LINE_BYTES.to_string();
    let (fifo_arg, done_arg) = (fifo.display().to_string(), done.display().to_string());
    let herd = Herd::start_in(
        &dir,
        &[
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--",
            "sh",
            "-c",
            r#"python3 "$1" "$2" "$3" "$4" & exec "$0""#,
            hello_worker(),
            &fixture,
            &fifo_arg,
            &size,
            &done_arg,
        ],
    );
    herd.wait_ready(1);
    let addr = herd.addr();
    let before = peak_rss(herd.pid());

    // Open and close the FIFO: the helper starts writing its line.
    let trigger = wait_until("the helper to open its trigger FIFO", || {
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&fifo)
            .ok()
    });
    drop(trigger);
    wait_until("the helper to have written its line", || {
        done.exists().then_some(())
    });
    herd.wait_for_worker_output("huge line done", 1);
    let grew = peak_rss(herd.pid()).saturating_sub(before);
    eprintln!(
        "herd's peak RSS grew by {:.1} MiB for a {} MiB line",
        grew as f64 / 1048576.0,
        LINE_BYTES >> 20
    );
    assert!(
        grew < 16 << 20,
        "herd's peak RSS grew by {:.1} MiB while forwarding a {} MiB line: it must not buffer the line",
        grew as f64 / 1048576.0,
        LINE_BYTES >> 20
    );

    // The pieces: none longer than the bound, each marked but the last.
    let log = herd.log_text();
    let pieces: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("[worker 0] xxxx"))
        .collect();
    assert!(
        pieces.iter().any(|l| l.ends_with(SPLIT_MARKER)),
        "no piece of the line ends with {SPLIT_MARKER:?}"
    );
    let longest = pieces.iter().map(|l| l.len()).max().unwrap_or(0);
    assert!(
        longest <= "[worker 0] ".len() + MAX_LINE_BYTES + SPLIT_MARKER.len(),
        "a forwarded line is {longest} bytes long"
    );
    assert!(get(addr).is_ok(), "herd still serves");
    herd.stop();
}

/// A herd started with `Command` whose stdout and stderr go to one pipe the
/// test stops reading; SIGKILLed (with its workers, by their death signal)
/// if the test fails before it exits.
struct StalledHerd {
    child: Child,
    /// The pipe's read end, kept open and unread: herd's writes would fail
    /// with EPIPE if it were closed, instead of blocking.
    _unread: BufReader<std::fs::File>,
}

impl Drop for StalledHerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// herd's stdout and stderr are a pipe that stops being read (a stalled log
/// shipper), and its workers print a lot. Today the main thread blocks in
/// `write_all` as soon as the pipe is full: no status, no metrics, SIGTERM
/// ignored. Now: status answers, requests are served, /metrics counts the
/// dropped lines, and SIGTERM stops herd.
#[test]
fn a_stalled_stdout_and_stderr_block_nothing_and_drops_are_counted() {
    let dir = scratch_dir("stalled-output");
    let (read_end, write_end): (OwnedFd, OwnedFd) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let chatty =
        r#"yes "a line of worker output that nobody will read" | head -n 400000 & exec "$0""#;
    let child = Command::new(herd_bin())
        .args([
            "run",
            "--log-format",
            "json",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--metrics",
            "127.0.0.1:0",
            "--",
            "sh",
            "-c",
            chatty,
            hello_worker(),
        ])
        .current_dir(&dir)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end.try_clone().unwrap()))
        .stderr(Stdio::from(write_end))
        .spawn()
        .expect("start herd");
    let pid = child.id();

    // Read herd's first events, up to where it is about to start the
    // workers (the addresses), then never read again.
    let (events_tx, events) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut reader = BufReader::new(std::fs::File::from(read_end));
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            if let Some(event) = output::parse_event(line.trim_end()) {
                let last = event["event"] == "starting_workers";
                let _ = events_tx.send(event);
                if last {
                    break;
                }
            }
            line.clear();
        }
        reader
    });
    let mut startup = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while !startup
        .iter()
        .any(|e: &Value| e["event"] == "starting_workers")
    {
        let wait = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(wait) {
            Ok(event) => startup.push(event),
            Err(e) => panic!("herd's startup events ({e}); so far: {startup:?}"),
        }
    }
    let herd = StalledHerd {
        child,
        _unread: reader.join().unwrap(),
    };
    let logged = |name: &str| address(startup.iter().find(|e| e["event"] == name).unwrap());
    let (addr, metrics) = (logged("listening"), logged("metrics_listening"));

    // The workers print far more than the pipe holds; herd keeps working.
    let status = wait_for_status(&dir, "2 ready workers", |s| all_ready(s, 2));
    assert_eq!(status["pid"], pid);
    for _ in 0..20 {
        get(addr).expect("a request while herd's output is stalled");
    }
    let dropped = wait_until("dropped lines in /metrics", || {
        let (code, _, body) = http(metrics, "GET", "/metrics");
        assert_eq!(code, 200);
        let dropped = sum_of(&body, "herd_log_lines_dropped_total");
        (dropped > 0.0).then_some(dropped)
    });
    eprintln!("herd dropped {dropped} lines of output");

    let mut herd = herd;
    signal(pid, nix::sys::signal::Signal::SIGTERM);
    let exit = wait_until("herd to exit after SIGTERM", || {
        herd.child.try_wait().unwrap()
    });
    assert!(exit.success(), "herd exited with {exit}");
    let _ = std::fs::remove_dir_all(&dir);
}
