//! Helpers for the hand-off thread tests (tests/handoff_threads.rs and
//! tests/handoff_thread_faults.rs): herd with two threads, its threads by
//! name, its metrics scraped and read per thread.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::*;

/// The config every test starts from (top level: before any `[table]`).
pub const TWO: &str = "handoff_threads = 2\n";

/// herd with `config`, metrics on 127.0.0.1:0 and `workers` hello-workers.
pub fn launch(name: &str, config: &str, workers: usize) -> Herd {
    Herd::launch(
        name,
        Some(config),
        workers,
        &["--metrics", "127.0.0.1:0"],
        &[hello_worker()],
    )
}

/// The hand-off threads of process `pid`, by the names /proc shows.
pub fn handoff_thread_names(pid: u32) -> BTreeSet<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return BTreeSet::new();
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
        .map(|comm| comm.trim().to_string())
        .filter(|comm| comm.starts_with("herd-handoff"))
        .collect()
}

pub fn two_thread_names() -> BTreeSet<String> {
    ["herd-handoff", "herd-handoff-1"].map(String::from).into()
}

/// Waits until herd runs exactly the two hand-off threads.
pub fn wait_for_two_threads(herd: &Herd) {
    let pid = herd.pid();
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        seen = handoff_thread_names(pid);
        if seen == two_thread_names() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("herd's hand-off threads are {seen:?}, not herd-handoff and herd-handoff-1");
}

/// One `GET /metrics`; None if the endpoint does not answer 200 now.
pub fn try_scrape(addr: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, DEADLINE).ok()?;
    stream.set_read_timeout(Some(DEADLINE)).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).ok()?;
    let parsed = responses::parse(&bytes).ok()?;
    (parsed.status == 200).then_some(parsed.body)
}

/// herd's metrics, from the endpoint it logged last (an upgraded herd
/// logs it again).
pub fn scrape(herd: &Herd) -> String {
    metrics_addr(herd);
    wait_until("a scrape of /metrics", || {
        let events = herd.events("metrics_listening", &[]);
        try_scrape(address(events.last()?))
    })
}

/// Scrapes until `settled` likes the text or the deadline passes; the
/// last text either way, for the caller's assertions to judge.
pub fn scrape_until(herd: &Herd, settled: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let text = scrape(herd);
        if settled(&text) || Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The value of `series`, or None when herd does not show it.
pub fn sample_of(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Connections hand-off thread `thread` accepted (0 if not shown yet).
pub fn thread_accepted(text: &str, thread: usize) -> f64 {
    let series = format!("herd_handoff_thread_accepted_total{{thread=\"{thread}\"}}");
    sample_of(text, &series).unwrap_or(0.0)
}

pub fn accepted(text: &str) -> f64 {
    sum_of(text, "herd_connections_accepted_total")
}

/// Both threads accepted some of what the test sent: the rule under test
/// was exercised across threads, not within one.
pub fn assert_both_threads_accepted(herd: &Herd) {
    let text = scrape(herd);
    for thread in 0..2 {
        assert!(
            thread_accepted(&text, thread) > 0.0,
            "hand-off thread {thread} accepted nothing:\n{text}"
        );
    }
}

pub fn thread_forwarded(text: &str, thread: usize) -> f64 {
    let series = format!("herd_handoff_thread_forwarded_total{{thread=\"{thread}\"}}");
    sample_of(text, &series).unwrap_or(0.0)
}

/// `Handled by worker <pid>`, as hello-worker answers.
pub fn pid_in(body: &str) -> Option<u32> {
    body.strip_prefix("Handled by worker ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
