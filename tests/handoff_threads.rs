//! `handoff_threads`: several hand-off threads (`herd-handoff`,
//! `herd-handoff-1`, ...), each with its own `SO_REUSEPORT` copy of every
//! listener, each accepting, picking a worker by the mode and sending the
//! fd over that worker's channel. What is tested: the key's bounds and
//! the modes it refuses (`herd check`, `herd run`, `herd reload`), the
//! per-thread accept counters, that the kernel spreads connections over
//! both threads, that round-robin, sticky and least-conn still hold with
//! two threads dealing, that nothing queued on a worker that dies or
//! stalls is lost, and that `herd upgrade` and a graceful stop go as
//! with one thread.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::load::{process_state, Load, STEADY};
use common::procs::{descendants, process_running};
use common::*;
use nix::sys::signal::Signal;

/// The config every test starts from (top level: before any `[table]`).
const TWO: &str = "handoff_threads = 2\n";

/// herd with `config`, metrics on 127.0.0.1:0 and `workers` hello-workers.
fn launch(name: &str, config: &str, workers: usize) -> Herd {
    Herd::launch(
        name,
        Some(config),
        workers,
        &["--metrics", "127.0.0.1:0"],
        &[hello_worker()],
    )
}

/// The hand-off threads of process `pid`, by the names /proc shows.
fn handoff_thread_names(pid: u32) -> BTreeSet<String> {
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

fn two_thread_names() -> BTreeSet<String> {
    ["herd-handoff", "herd-handoff-1"].map(String::from).into()
}

/// Waits until herd runs exactly the two hand-off threads.
fn wait_for_two_threads(herd: &Herd) {
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
fn try_scrape(addr: SocketAddr) -> Option<String> {
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
fn scrape(herd: &Herd) -> String {
    metrics_addr(herd);
    wait_until("a scrape of /metrics", || {
        let events = herd.events("metrics_listening", &[]);
        try_scrape(address(events.last()?))
    })
}

/// Scrapes until `settled` likes the text or the deadline passes; the
/// last text either way, for the caller's assertions to judge.
fn scrape_until(herd: &Herd, settled: impl Fn(&str) -> bool) -> String {
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
fn sample_of(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Connections hand-off thread `thread` accepted (0 if not shown yet).
fn thread_accepted(text: &str, thread: usize) -> f64 {
    let series = format!("herd_handoff_thread_accepted_total{{thread=\"{thread}\"}}");
    sample_of(text, &series).unwrap_or(0.0)
}

fn accepted(text: &str) -> f64 {
    sum_of(text, "herd_connections_accepted_total")
}

/// Both threads accepted some of what the test sent: the rule under test
/// was exercised across threads, not within one.
fn assert_both_threads_accepted(herd: &Herd) {
    let text = scrape(herd);
    for thread in 0..2 {
        assert!(
            thread_accepted(&text, thread) > 0.0,
            "hand-off thread {thread} accepted nothing:\n{text}"
        );
    }
}

/// `herd ARGS -c FILE --listen 127.0.0.1:0 --workers 1 -- hello-worker`.
fn with_config(dir: &Path, command: &str, config: &str) -> CliRun {
    let path = write_config(dir, config).display().to_string();
    let args = [
        command,
        "-c",
        &path,
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--",
        hello_worker(),
    ];
    herd_cli(dir, &args)
}

#[test]
fn out_of_range_values_and_os_scheduled_modes_are_refused_naming_key_and_value() {
    let dir = scratch_dir("threads-refused");
    for (config, value) in [
        ("handoff_threads = 0\n", "0"),
        ("handoff_threads = 8\n", "8"),
        ("handoff_threads = \"many\"\n", "\"many\""),
        ("handoff_threads = -1\n", "-1"),
        ("handoff_threads = 2\nmode = \"shared\"\n", "2"),
        ("handoff_threads = 2\nmode = \"reuseport\"\n", "2"),
    ] {
        // The repository's exit codes for a refused config: check 1, run 2.
        for (command, code) in [("check", 1), ("run", 2)] {
            let run = with_config(&dir, command, config);
            assert_eq!(
                run.code,
                Some(code),
                "`herd {command}` of {config:?}: {run:?}"
            );
            let named = run
                .stderr
                .lines()
                .any(|line| line.contains("handoff_threads") && line.contains(value));
            assert!(
                named,
                "`herd {command}` of {config:?} should name `handoff_threads` and {value}:\n{}",
                run.stderr
            );
            assert!(
                !run.stderr.contains("unknown field") && !run.stderr.contains("worker started"),
                "`herd {command}` of {config:?}: the key is known, and no worker starts:\n{}",
                run.stderr
            );
        }
    }
}

#[test]
fn one_to_seven_threads_and_auto_pass_check_in_the_hand_off_modes() {
    let dir = scratch_dir("threads-accepted");
    for config in [
        "handoff_threads = 2\n",
        "handoff_threads = 1\n",
        "handoff_threads = 7\n",
        "handoff_threads = \"auto\"\n",
        "handoff_threads = 2\nmode = \"round-robin\"\n",
        "handoff_threads = 2\nmode = \"sticky\"\n",
        "handoff_threads = 2\nmode = \"least-conn\"\n",
        // "auto" is the default, so it must go with every mode there is.
        "handoff_threads = \"auto\"\nmode = \"shared\"\n",
        "handoff_threads = \"auto\"\nmode = \"reuseport\"\n",
    ] {
        let run = with_config(&dir, "check", config);
        assert_eq!(run.code, Some(0), "`herd check` of {config:?}: {run:?}");
        assert!(run.stdout.starts_with("config OK: "), "{run:?}");
    }
}

#[test]
fn a_reload_that_changes_handoff_threads_is_refused_and_the_threads_stay() {
    let herd = launch("threads-reload", TWO, 2);
    let before = herd.wait_all_ready(2);
    wait_for_two_threads(&herd);
    std::fs::write(herd.dir.join("herd-test.toml"), "handoff_threads = 3\n").unwrap();
    let refused = herd.control(&["reload"]);
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(
        refused.stderr.contains("reload refused")
            && refused.stderr.contains("handoff_threads")
            && !refused.stderr.contains("unknown field"),
        "{}",
        refused.stderr
    );
    assert_eq!(herd.wait_all_ready(2), before, "no worker was replaced");
    assert_eq!(handoff_thread_names(herd.pid()), two_thread_names());
    for i in 0..10 {
        get(herd.addr()).unwrap_or_else(|e| panic!("request {i} after the refusal: {e}"));
    }
}

#[test]
fn per_thread_accept_counters_add_up_to_herds_accepted_connections() {
    let herd = launch("threads-metrics", TWO, 3);
    herd.wait_all_ready(3);
    let sent = 300;
    let per_pid = count_pids(herd.addr(), sent);
    assert_eq!(per_pid.values().sum::<usize>(), sent);
    let text = scrape_until(&herd, |text| {
        accepted(text) >= sent as f64
            && sum_of(text, "herd_handoff_thread_accepted_total") >= sent as f64
            && sum_of(text, "herd_connections_handed_off_total") >= sent as f64
    });
    assert_eq!(accepted(&text), sent as f64, "{text}");
    let by_threads = thread_accepted(&text, 0) + thread_accepted(&text, 1);
    assert_eq!(
        sum_of(&text, "herd_handoff_thread_accepted_total"),
        by_threads,
        "only threads 0 and 1 are counted:\n{text}"
    );
    assert_eq!(by_threads, accepted(&text), "{text}");
    assert_eq!(
        sum_of(&text, "herd_connections_handed_off_total"),
        sent as f64,
        "{text}"
    );
}

#[test]
fn the_kernel_spreads_connections_over_both_threads() {
    let herd = launch("threads-spread", TWO, 2);
    herd.wait_all_ready(2);
    wait_for_two_threads(&herd);
    // Each from its own ephemeral port: a 4-tuple hash puts all 300 in
    // one thread with a chance of 2^-299.
    count_pids(herd.addr(), 300);
    let text = scrape_until(&herd, |text| accepted(text) >= 300.0);
    for thread in 0..2 {
        assert!(
            thread_accepted(&text, thread) > 0.0,
            "thread {thread} accepted none of 300:\n{text}"
        );
    }
}

fn thread_forwarded(text: &str, thread: usize) -> f64 {
    let series = format!("herd_handoff_thread_forwarded_total{{thread=\"{thread}\"}}");
    sample_of(text, &series).unwrap_or(0.0)
}

/// Thread 1 sends to workers that count per thread itself, and gives
/// thread 0 everything for workers that do not (`--by-message`: no page).
#[test]
fn the_other_thread_sends_itself_only_to_workers_that_count_per_thread() {
    for (by_message, name) in [(false, "threads-direct"), (true, "threads-forwarded")] {
        let mut command = vec![hello_worker()];
        if by_message {
            command.push("--by-message");
        }
        let herd = Herd::launch(name, Some(TWO), 2, &["--metrics", "127.0.0.1:0"], &command);
        herd.wait_all_ready(2);
        wait_for_two_threads(&herd);
        // One at a time: no channel is ever full, nothing needs forwarding.
        count_pids(herd.addr(), 200);
        let text = scrape_until(&herd, |text| accepted(text) >= 200.0);
        let (accepted_1, forwarded_1) = (thread_accepted(&text, 1), thread_forwarded(&text, 1));
        assert!(accepted_1 > 0.0, "thread 1 accepted none:\n{text}");
        let expected = if by_message { accepted_1 } else { 0.0 };
        assert_eq!(forwarded_1, expected, "by_message = {by_message}:\n{text}");
    }
}

/// The Python example counts each take on its sender's counter: every
/// hand-off of both threads is counted taken, none left in flight.
#[test]
fn the_python_example_counts_each_threads_takes() {
    let worker = python_worker();
    let command = ["python3", worker.as_str()];
    // No stall check within the test's deadline: only the page counts.
    let config = format!("{TWO}[handoff]\nack_timeout = \"60s\"\n");
    let herd = Herd::launch(
        "threads-python",
        Some(&config),
        2,
        &["--metrics", "127.0.0.1:0"],
        &command,
    );
    herd.wait_all_ready(2);
    wait_for_two_threads(&herd);
    count_pids(herd.addr(), 200);
    let counted = |text: &str| {
        sum_of(text, "herd_connections_handed_off_total") >= 200.0
            && sample_of(text, "herd_handoffs_in_flight") == Some(0.0)
    };
    let text = scrape_until(&herd, counted);
    assert!(counted(&text), "not every take was counted:\n{text}");
    assert_eq!(thread_forwarded(&text, 1), 0.0, "{text}");
    assert!(thread_accepted(&text, 1) > 0.0, "{text}");
}

/// Seven threads, the most a page counts receipts for: every thread's
/// takes land on its own counter (none past the page's), all are counted.
#[test]
fn seven_threads_each_count_on_their_own_counter() {
    let config = "handoff_threads = 7\n[handoff]\nack_timeout = \"60s\"\n";
    let herd = launch("threads-seven", config, 2);
    herd.wait_all_ready(2);
    let sent = 700;
    count_pids(herd.addr(), sent);
    let counted = |text: &str| {
        sum_of(text, "herd_connections_handed_off_total") >= sent as f64
            && sample_of(text, "herd_handoffs_in_flight") == Some(0.0)
    };
    let text = scrape_until(&herd, counted);
    assert!(counted(&text), "not every take was counted:\n{text}");
    let busy = (0..7).filter(|&t| thread_accepted(&text, t) > 0.0).count();
    assert!(
        busy >= 6,
        "the kernel spread {sent} over only {busy} of 7 threads:\n{text}"
    );
    for thread in 1..7 {
        assert_eq!(thread_forwarded(&text, thread), 0.0, "{text}");
    }
}

/// A worker that says it counts per thread and writes 2^63 and 0 by turns
/// into every thread's counter: every client is answered, and herd's counts
/// stay within what it sent (nothing handed off twice, nothing in flight
/// below zero).
#[test]
fn a_worker_lying_on_every_threads_counter_breaks_no_count() {
    let fixture = format!(
        "{}/tests/fixtures/page_worker.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let command = ["python3", fixture.as_str(), "lying-threads"];
    let config = format!("{TWO}[handoff]\nack_timeout = \"60s\"\n");
    let flags = ["--metrics", "127.0.0.1:0"];
    let herd = Herd::launch("threads-lies", Some(&config), 2, &flags, &command);
    herd.wait_all_ready(2);
    wait_for_two_threads(&herd);
    let sent = 200;
    let per_pid = count_pids(herd.addr(), sent);
    assert_eq!(per_pid.values().sum::<usize>(), sent, "{per_pid:?}");
    herd.wait_for_worker_output("[worker 0] lied per thread", 1);
    let text = scrape(&herd);
    let handed = sum_of(&text, "herd_connections_handed_off_total");
    let in_flight = sample(&text, "herd_handoffs_in_flight");
    assert!(
        handed <= sent as f64,
        "{handed} handed off of {sent}:\n{text}"
    );
    assert!(
        (0.0..=sent as f64).contains(&in_flight),
        "{in_flight} in flight:\n{text}"
    );
    assert_both_threads_accepted(&herd);
}

#[test]
fn round_robin_stays_within_one_per_thread_of_even() {
    let (workers, threads, sent) = (3, 2, 600);
    let herd = launch("threads-rr", TWO, workers);
    let ready: BTreeSet<u32> = herd.wait_all_ready(workers);
    let per_pid = count_pids(herd.addr(), sent);
    assert_eq!(per_pid.len(), workers, "every worker served: {per_pid:?}");
    assert!(
        per_pid.keys().all(|pid| ready.contains(pid)),
        "{per_pid:?} vs {ready:?}"
    );
    let most = per_pid.values().max().unwrap();
    let least = per_pid.values().min().unwrap();
    assert!(
        most - least <= threads,
        "each thread's rotation is exact, so no two workers differ by more than {threads}: {per_pid:?}"
    );
    assert_both_threads_accepted(&herd);
}

fn client(i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i))
}

#[test]
fn sticky_keeps_each_client_ip_on_one_worker_whichever_thread_accepts() {
    let herd = Herd::launch(
        "threads-sticky",
        Some(TWO),
        3,
        &["--mode", "sticky", "--metrics", "127.0.0.1:0"],
        &[hello_worker()],
    );
    herd.wait_all_ready(3);
    let addr = herd.addr();
    let mut pid_of: BTreeMap<IpAddr, u32> = BTreeMap::new();
    // Round after round, so each client's connections meet both threads.
    for round in 0..20 {
        for i in 0..12 {
            let source = client(i);
            let answer =
                get_from(addr, source).unwrap_or_else(|e| panic!("{source}, round {round}: {e}"));
            let first = *pid_of.entry(source).or_insert(answer.pid);
            assert_eq!(
                answer.pid, first,
                "client {source} moved from worker {first} in round {round}"
            );
        }
    }
    let used: BTreeSet<u32> = pid_of.values().copied().collect();
    assert!(
        used.len() >= 2,
        "12 client addresses all on one worker: {pid_of:?}"
    );
    assert_both_threads_accepted(&herd);
}

/// Opens a keep-alive connection, asks once and reads the answer; the
/// connection (left open) and the pid that answered.
fn open_and_ask(addr: SocketAddr) -> (TcpStream, u32) {
    let mut stream = TcpStream::connect_timeout(&addr, DEADLINE).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: herd-test\r\n\r\n")
        .unwrap();
    let response = responses::read_one(&mut stream).unwrap();
    assert_eq!(response.status, 200, "{response:?}");
    let pid = pid_in(&response.body).unwrap_or_else(|| panic!("no pid in {response:?}"));
    (stream, pid)
}

#[test]
fn least_conn_sees_the_connections_every_thread_handed_off() {
    let herd = Herd::launch(
        "threads-least-conn",
        Some(TWO),
        3,
        &["--mode", "least-conn", "--metrics", "127.0.0.1:0"],
        &[hello_worker()],
    );
    let ready = herd.wait_all_ready(3);
    let mut held = Vec::new();
    let mut open: BTreeMap<u32, usize> = ready.iter().map(|&pid| (pid, 0)).collect();
    for _ in 0..24 {
        let (stream, pid) = open_and_ask(herd.addr());
        *open
            .get_mut(&pid)
            .unwrap_or_else(|| panic!("answer from unknown pid {pid}")) += 1;
        held.push(stream);
    }
    let most = open.values().max().unwrap();
    let least = open.values().min().unwrap();
    assert!(
        most - least <= 1,
        "24 open connections over 3 workers, each new one to the least loaded: {open:?}"
    );
    assert_both_threads_accepted(&herd);
    drop(held);
}

/// `Handled by worker <pid>`, as hello-worker answers.
fn pid_in(body: &str) -> Option<u32> {
    body.strip_prefix("Handled by worker ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Sends `count` requests at once, each on a new connection, then reads
/// each answer on its own thread (so one held up holds up nobody);
/// `answered` counts the answers.
fn fire(
    addr: SocketAddr,
    count: usize,
    answered: &Arc<AtomicUsize>,
) -> Vec<JoinHandle<Result<Answer, String>>> {
    let streams: Vec<TcpStream> = (0..count).map(|_| send_request(addr).unwrap()).collect();
    streams
        .into_iter()
        .map(|stream| {
            let answered = answered.clone();
            std::thread::spawn(move || {
                let answer = read_answer(stream, DEADLINE);
                if answer.is_ok() {
                    answered.fetch_add(1, Ordering::SeqCst);
                }
                answer
            })
        })
        .collect()
}

/// Every request is answered, none by `victim`.
fn all_answered_by_others(handles: Vec<JoinHandle<Result<Answer, String>>>, victim: u32) {
    for (i, handle) in handles.into_iter().enumerate() {
        let answer = handle
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("request {i} was not answered: {e}"));
        assert_ne!(answer.pid, victim, "request {i}");
    }
}

/// SIGSTOPs slot `slot`'s worker and waits until it is stopped.
fn stop_worker(herd: &Herd, slot: usize) -> u32 {
    let victim = pids_of(&herd.status())[&slot];
    signal(victim, Signal::SIGSTOP);
    wait_until("the worker to stop", || {
        (process_state(victim) == Some('T')).then_some(())
    });
    victim
}

#[test]
fn connections_queued_from_both_threads_on_a_worker_that_dies_are_served_by_others() {
    let config = format!("{TWO}[handoff]\nack_timeout = \"60s\"\n");
    let herd = launch("threads-queued-death", &config, 3);
    herd.wait_all_ready(3);
    let victim = stop_worker(&herd, 1);
    let sent = 60;
    let answered = Arc::new(AtomicUsize::new(0));
    let handles = fire(herd.addr(), sent, &answered);
    // The others answer theirs; the stopped worker's sit on its channel.
    let text = scrape_until(&herd, |text| {
        let queued = sample_of(text, "herd_handoffs_in_flight").unwrap_or(0.0);
        queued >= 1.0 && answered.load(Ordering::SeqCst) as f64 + queued == sent as f64
    });
    let queued = sample(&text, "herd_handoffs_in_flight");
    assert!(
        queued >= 1.0 && answered.load(Ordering::SeqCst) as f64 + queued == sent as f64,
        "{} answered, expected the rest queued on the stopped worker:\n{text}",
        answered.load(Ordering::SeqCst)
    );
    for thread in 0..2 {
        assert!(thread_accepted(&text, thread) > 0.0, "{text}");
    }
    signal(victim, Signal::SIGKILL);
    all_answered_by_others(handles, victim);
    herd.wait_for_event("requeued", &[("pid", json!(victim))], 1);
}

#[test]
fn connections_queued_from_both_threads_on_a_stalled_worker_are_served_by_others() {
    let config = format!("{TWO}[handoff]\nack_timeout = \"300ms\"\n");
    let herd = launch("threads-queued-stall", &config, 3);
    herd.wait_all_ready(3);
    let victim = stop_worker(&herd, 1);
    let answered = Arc::new(AtomicUsize::new(0));
    let handles = fire(herd.addr(), 60, &answered);
    all_answered_by_others(handles, victim);
    herd.wait_for_event("worker_stalled", &[("slot", json!(1))], 1);
    assert_both_threads_accepted(&herd);
    // Not killed: let it run on, so it ends with herd.
    signal(victim, Signal::SIGCONT);
}

/// Copies herd into `dir/herd` by renaming over it, as a package upgrade
/// does (the running herd keeps its inode); the path.
fn install(dir: &Path) -> PathBuf {
    let staged = dir.join("herd.new");
    let _ = std::fs::remove_file(&staged);
    std::fs::copy(herd_bin(), &staged).unwrap();
    let path = dir.join("herd");
    std::fs::rename(&staged, &path).unwrap();
    path
}

#[test]
fn an_upgrade_under_load_loses_nothing_and_both_threads_accept_after_it() {
    let dir = scratch_dir("threads-upgrade");
    let binary = install(&dir);
    let config = write_config(&dir, TWO).display().to_string();
    let args = [
        "-c",
        &config,
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--",
        hello_worker(),
    ];
    let herd = Herd::start_binary(&dir, &binary, &[], &args);
    herd.wait_all_ready(2);
    wait_for_two_threads(&herd);
    let before = pids_of(&herd.status());
    let load = Load::start(herd.addr(), pid_in);
    load.settle(STEADY);
    install(&dir);
    let run = herd_cli_within(&dir, &["upgrade"], Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(run.code, Some(0), "{run:?}\nlog:\n{}", herd.log_text());
    load.settle(STEADY);
    let outcomes = load.finish();
    let failed: Vec<_> = outcomes.iter().filter(|o| o.answer.is_err()).collect();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    assert_eq!(pids_of(&herd.status()), before, "the same workers");
    wait_for_two_threads(&herd);

    let then = scrape(&herd);
    count_pids(herd.addr(), 300);
    let now = scrape_until(&herd, |text| {
        (0..2).all(|t| thread_accepted(text, t) > thread_accepted(&then, t))
    });
    for thread in 0..2 {
        assert!(
            thread_accepted(&now, thread) > thread_accepted(&then, thread),
            "thread {thread} accepted none of 300 after the upgrade:\nbefore:\n{then}\nafter:\n{now}"
        );
    }
}

#[test]
fn sigterm_with_two_idle_threads_exits_0_and_leaves_no_worker() {
    let herd = Herd::launch(
        "threads-stop",
        None,
        2,
        &["--handoff-threads", "2"],
        &[hello_worker()],
    );
    herd.wait_all_ready(2);
    wait_for_two_threads(&herd);
    for i in 0..10 {
        get(herd.addr()).unwrap_or_else(|e| panic!("request {i}: {e}"));
    }
    let family: Vec<u32> = descendants(herd.pid()).iter().map(|p| p.pid).collect();
    assert!(family.len() >= 2, "{family:?}");
    let status = herd.stop();
    assert_eq!(status.code(), Some(0), "herd exit {status:?}");
    // herd waits for its workers before it exits: none may be left.
    let left: Vec<u32> = family
        .into_iter()
        .filter(|&pid| process_running(pid))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
