//! File descriptors are planned, not hoped for: herd raises its soft limit
//! to the hard one (workers keep the original), warns about a
//! configuration that could run out naming the keys, refuses to scale past
//! its budget with the numbers, and when it does run out for longer than
//! `queue_timeout`, the connections waiting in the kernel's queue are
//! closed (an answer) rather than left hanging.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

/// (soft, hard) "Max open files" of a process.
fn open_file_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

fn start_limited(name: &str, nofile: &str, config: &str, workers: &str) -> Herd {
    let dir = scratch_dir(name);
    let config = write_config(&dir, config);
    let limit = format!("--nofile={nofile}");
    Herd::start_under(
        &dir,
        &["prlimit", &limit],
        &[
            "-c",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--workers",
            workers,
            "--",
            hello_worker(),
        ],
    )
}

#[test]
fn herd_raises_its_open_file_limit_and_its_workers_keep_the_original() {
    let herd = start_limited("fd-raise", "1024:8192", "", "2");
    let workers = herd.wait_all_ready(2);
    let limit = [("soft", json!(8192)), ("worker_soft", json!(1024))];
    herd.wait_for_event("fd_limit", &limit, 1);
    assert_eq!(open_file_limits(herd.pid()), (8192, 8192));
    for pid in workers {
        assert_eq!(open_file_limits(pid), (1024, 8192), "worker {pid}");
    }
}

#[test]
fn a_configuration_that_may_run_out_of_fds_is_warned_about_naming_the_keys() {
    let herd = start_limited(
        "fd-warn",
        "2048:2048",
        "[handoff]\nqueue_limit = 100000\n",
        "2",
    );
    let warning = herd
        .wait_for_event("fd_budget_exceeded", &[("limit", json!(2048))], 1)
        .remove(0);
    // The point of the warning is that it names the keys to lower.
    let message = warning["message"].as_str().unwrap();
    assert!(
        message.contains("handoff.queue_limit = 100000"),
        "{warning}"
    );
    assert!(message.contains("handoff.max_unacked = 64"), "{warning}");
    herd.wait_all_ready(2);
}

#[test]
fn scaling_past_the_fd_budget_is_refused_with_the_numbers() {
    // 128 for herd + 1 listener + 1024 queued + 68 per worker: 3 fit in 1400.
    let herd = start_limited("fd-scale", "1400:1400", "", "2");
    herd.wait_all_ready(2);
    let refused = herd.control(&["scale", "10"]);
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(
        refused.stderr.contains("cannot scale to 10 workers")
            && refused.stderr.contains("at most 3 workers fit")
            && refused.stderr.contains("1400"),
        "{}",
        refused.stderr
    );
    assert_eq!(herd.status()["workers"].as_array().unwrap().len(), 2);
    herd_ok(&herd.dir, &["scale", "3"]);
    herd.wait_all_ready(3);
}

/// herd's fd table full of connections its frozen workers hold: the
/// connections that queue in the kernel behind them are closed once herd
/// has been out of fds for `queue_timeout`, instead of hanging for as long
/// as the workers stay frozen; once they resume, herd serves again.
#[test]
fn out_of_fds_for_queue_timeout_the_waiting_connections_are_closed_not_left_hanging() {
    let herd = Herd::launch(
        "fd-shed",
        Some("[handoff]\nack_timeout = \"60s\"\nqueue_timeout = \"1s\"\n"),
        2,
        &[],
        // Workers that ACK: herd holds what it sent them until they do
        // (a queued hand-off holds none of herd's fds).
        &[hello_worker(), "--by-message"],
    );
    let ready = herd.wait_ready(2);
    let addr = herd.addr();
    squeeze_fds(herd.pid(), 10);
    for pid in ready.values() {
        signal(*pid, Signal::SIGSTOP);
    }
    // 30 connections: about 10 go to the frozen workers and hold herd's
    // last fds; the rest wait in the kernel's queue.
    let closed = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..30)
        .map(|_| {
            let stream = send_request(addr).unwrap();
            let closed = closed.clone();
            std::thread::spawn(move || {
                // Far longer than queue_timeout: a hang shows as a timeout.
                let answer = read_answer(stream, Duration::from_secs(15));
                if matches!(&answer, Err(e) if !e.contains("os error 11")) {
                    closed.fetch_add(1, Ordering::SeqCst);
                }
                answer
            })
        })
        .collect();
    wait_until("the queued connections to be closed", || {
        (closed.load(Ordering::SeqCst) >= 15).then_some(())
    });
    herd.wait_for_event("out_of_fds", &[], 1);
    for pid in ready.values() {
        signal(*pid, Signal::SIGCONT);
    }
    let mut served = 0;
    for handle in handles {
        if handle.join().unwrap().is_ok() {
            served += 1;
        }
    }
    assert!(served >= 1, "the connections the workers held are served");
    assert!(get(addr).is_ok());
}

/// A reload whose limits would not fit is refused as a scale is, and the
/// running config kept.
#[test]
fn a_reload_past_the_fd_budget_is_refused_with_the_numbers() {
    let herd = start_limited("fd-reload", "1400:1400", "", "2");
    let before = herd.wait_all_ready(2);
    let config = herd.dir.join("herd-test.toml");
    std::fs::write(&config, "[handoff]\nqueue_limit = 100000\n").unwrap();
    let refused = herd.control(&["reload"]);
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(
        refused.stderr.contains("reload refused")
            && refused.stderr.contains("handoff.queue_limit = 100000")
            && refused.stderr.contains("1400"),
        "{}",
        refused.stderr
    );
    assert_eq!(herd.wait_all_ready(2), before);
}
