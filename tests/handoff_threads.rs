//! `handoff_threads`: several hand-off threads (`herd-handoff`,
//! `herd-handoff-1`, ...), each with its own `SO_REUSEPORT` copy of every
//! listener, each accepting, picking a worker by the mode and sending the
//! fd over that worker's channel. What is tested: the key's bounds and
//! the modes it refuses (`herd check`, `herd run`, `herd reload`), the
//! per-thread accept counters, that the kernel spreads connections over
//! both threads, that round-robin, sticky and least-conn still hold with
//! two threads dealing, and that `herd upgrade` and a graceful stop go as
//! with one thread. (Faults and odd workers: tests/handoff_thread_faults.rs.)

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::load::{Load, STEADY};
use common::procs::{descendants, process_running};
use common::threads::*;
use common::*;

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
    // `herd status` says how many run.
    assert_eq!(herd.status()["handoff_threads"], 2);
    let table = herd_ok(&herd.dir, &["status"]);
    assert!(
        table.contains("mode round-robin (2 hand-off threads)"),
        "{table}"
    );
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

/// A rolling reload and scaling up and down under a steady load, with
/// three threads dealing: slots change hands while every thread sends
/// (each drain closes the worker's gate first), and no request fails.
#[test]
fn a_reload_and_scaling_under_load_with_three_threads_fail_no_request() {
    let herd = launch("threads-reload", "handoff_threads = 3\n", 3);
    let before = herd.wait_all_ready(3);
    let load = Load::start(herd.addr(), pid_in);
    load.settle(STEADY);
    for args in [&["reload"][..], &["scale", "5"], &["scale", "2"]] {
        let run = herd_cli_within(&herd.dir, args, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            run.code,
            Some(0),
            "{args:?}: {run:?}\nlog:\n{}",
            herd.log_text()
        );
        load.settle(5 * STEADY);
    }
    let outcomes = load.finish();
    let failed: Vec<_> = outcomes.iter().filter(|o| o.answer.is_err()).collect();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    let after = herd.wait_all_ready(2);
    assert!(
        after.is_disjoint(&before),
        "the reload replaced every worker"
    );
    let text = scrape_until(&herd, |text| {
        sample_of(text, "herd_handoffs_in_flight") == Some(0.0)
    });
    assert_eq!(
        sample_of(&text, "herd_handoffs_in_flight"),
        Some(0.0),
        "{text}"
    );
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
