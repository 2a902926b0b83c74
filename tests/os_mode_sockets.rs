//! Issue 13, point 7: in the OS-scheduled modes herd never changes a
//! listening socket under a live worker. The socket's file status flags
//! (O_NONBLOCK) belong to the one open file description every holder
//! shares, so flipping it to blocking for a new worker flips it under the
//! workers already accepting from it. An event-loop server (asyncio here,
//! as uvicorn and hypercorn use it) then blocks in accept() with a request
//! it has just accepted unanswered.
//!
//! Each test runs asyncio workers that take their socket from LISTEN_FDS,
//! under a steady sequential load, through a SIGKILL of one worker and a
//! rolling reload; only the requests the killed worker held may fail.

mod common;

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::sockets::connections_held;
use common::*;
use nix::sys::signal::Signal;

/// A request that takes longer than this failed. Healthy requests take
/// milliseconds; a worker restart in the slot a queued request waits for
/// takes a Python start-up (well under a second even on a loaded machine).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The load never runs longer than this, whatever happens to the test.
const LOAD_CAP: Duration = Duration::from_secs(180);

/// Successful requests to see after each step before the next one.
const STEADY: usize = 40;

fn asyncio_worker() -> String {
    format!(
        "{}/tests/fixtures/asyncio_worker.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// What the client thread saw so far.
#[derive(Debug, Default)]
struct Tally {
    succeeded: usize,
    /// Each failure, with what went wrong.
    failed: Vec<String>,
}

/// One client thread sending one request after another, each on a new
/// connection, until told to stop (or [`LOAD_CAP`]).
struct Load {
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: std::net::SocketAddr) -> Load {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (tally, stop) = (tally.clone(), stop.clone());
            std::thread::spawn(move || {
                let started = Instant::now();
                while !stop.load(SeqCst) && started.elapsed() < LOAD_CAP {
                    let outcome = send_request(addr)
                        .map_err(|e| format!("connect/send: {e}"))
                        .and_then(|stream| read_answer(stream, REQUEST_TIMEOUT))
                        .map_err(|e| {
                            // The read timeout: accepted, and never answered.
                            if e.contains("os error 11") {
                                format!("no answer within {REQUEST_TIMEOUT:?} ({e})")
                            } else {
                                e
                            }
                        });
                    let mut tally = tally.lock().unwrap();
                    match outcome {
                        Ok(_) => tally.succeeded += 1,
                        Err(e) => tally.failed.push(e),
                    }
                }
            })
        };
        Load {
            tally,
            stop,
            thread: Some(thread),
        }
    }

    /// Waits for `more` successful requests from now; returns the failures
    /// so far. The client is sequential, so every request before those has
    /// finished.
    fn settle(&self, more: usize) -> Vec<String> {
        let target = self.tally.lock().unwrap().succeeded + more;
        wait_until(&format!("{more} more answered requests"), || {
            let tally = self.tally.lock().unwrap();
            (tally.succeeded >= target).then(|| tally.failed.clone())
        })
    }

    fn finish(mut self) -> Tally {
        self.stop.store(true, SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
        std::mem::take(&mut *self.tally.lock().unwrap())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
    }
}

/// The scheduler state of `pid` (`T` once SIGSTOP took effect).
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

fn event_loop_workers_survive_kill_and_reload(mode: &str) {
    let script = asyncio_worker();
    let mut herd = Herd::launch(
        &format!("asyncio-{mode}"),
        None,
        2,
        &["--mode", mode, "--ready-delay", "200ms"],
        &["python3", &script],
    );
    let first = herd.wait_all_ready(2);
    let addr = herd.addr();
    let load = Load::start(addr);
    assert!(load.settle(STEADY).is_empty(), "{:?}", load.tally);

    // Kill one worker under load. What it held when it stopped may fail:
    // count it while the worker is frozen, then kill it.
    let victim = pids_of(&herd.status())[&0];
    signal(victim, Signal::SIGSTOP);
    wait_until("the victim to stop", || {
        (process_state(victim) == Some('T')).then_some(())
    });
    let held = connections_held(&[victim], addr.port());
    signal(victim, Signal::SIGKILL);
    let refilled = wait_for_status(&herd.dir, "slot 0 refilled", |s| {
        all_ready(s, 2) && pids_of(s)[&0] != victim
    });
    let after_kill = load.settle(STEADY);
    assert!(
        after_kill.len() as u64 <= held,
        "{mode}: {} requests failed around the kill, but the killed worker held only {held}: {after_kill:?}",
        after_kill.len()
    );

    // A rolling reload under load: nothing may fail.
    let reload = herd.control(&["reload"]);
    assert_eq!(reload.code, Some(0), "{reload:?}");
    let reloaded = herd.wait_all_ready(2);
    let survivors: std::collections::BTreeSet<u32> = pids_of(&refilled).into_values().collect();
    assert!(reloaded.is_disjoint(&survivors), "{reloaded:?}");
    assert!(reloaded.is_disjoint(&first), "{reloaded:?}");
    let after_reload = load.settle(STEADY);
    let tally = load.finish();
    assert_eq!(
        after_reload.len(),
        after_kill.len(),
        "{mode}: requests failed during the reload: {:?}",
        &after_reload[after_kill.len()..]
    );
    assert!(tally.succeeded >= 3 * STEADY, "{tally:?}");
    // Every worker finished on SIGTERM in time: none hung in accept().
    signal(herd.pid(), Signal::SIGTERM);
    let status = herd.wait_exit();
    assert!(
        status.success(),
        "{mode}: herd had to kill workers ({status}):\n{}",
        herd.log_text()
    );
}

#[test]
fn shared_never_makes_an_event_loop_workers_socket_blocking() {
    event_loop_workers_survive_kill_and_reload("shared");
}

#[test]
fn reuseport_never_makes_an_event_loop_workers_socket_blocking() {
    event_loop_workers_survive_kill_and_reload("reuseport");
}
