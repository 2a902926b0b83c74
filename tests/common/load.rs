//! A bounded load of real HTTP requests and the kill of one slot under it
//! (tests/real_servers.rs, tests/preload.rs): client threads send one GET
//! after another, each on a new connection, and every outcome is kept
//! with when it began and ended, so a failure can be judged against what
//! the killed worker held when it was frozen.
//!
//! **What may fail.** A request may fail only if the killed slot's
//! processes held it when they were frozen: [`kill_slot`] SIGSTOPs the
//! victim and its descendants, counts the TCP connections they hold on
//! the port (`held`), then SIGKILLs the victim. A failure is allowed when
//! it is a request that was written and then cut (reset, or closed before a
//! whole answer), that began before the freeze and ended after it; there
//! may be at most `held` of them.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::sockets::connections_held;
use super::*;

/// Who answered, from a response's body (a pid, or any number the server
/// puts there); `None`: not an answer of the server under test.
pub type Identify = fn(&str) -> Option<u32>;

/// A request not answered within this failed. Healthy ones take
/// milliseconds; one queued for a slot whose gunicorn restarts waits a
/// Python start-up (about a second on a loaded 2-core machine).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// The load never runs longer than this, whatever happens to the test.
pub const LOAD_CAP: Duration = Duration::from_secs(100);

/// Client threads, each sending one request after another.
pub const CLIENTS: usize = 3;

/// At most this many requests per client thread.
pub const MAX_REQUESTS_PER_CLIENT: usize = 20_000;

/// Successful requests to see after each step before the next one.
pub const STEADY: usize = 60;

/// How a request went wrong (with what the client saw, beside it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Refused, or failed before the whole request was written.
    NotSent,
    /// Written, then reset or closed before a whole answer came.
    Cut,
    /// Written, and nothing (or not all) came within [`REQUEST_TIMEOUT`].
    NoAnswer,
    /// A whole answer, but not a 200 from one of the servers.
    Wrong,
}

/// One request: when it began and ended, and the pid that answered.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub began: Instant,
    pub ended: Instant,
    pub answer: Result<u32, (Failure, String)>,
}

/// One GET on a new connection, classified.
pub fn request(addr: SocketAddr, identify: Identify) -> Result<u32, (Failure, String)> {
    request_for(addr, "/", identify)
}

/// One GET of `path` on a new connection, classified.
pub fn request_for(
    addr: SocketAddr,
    path: &str,
    identify: Identify,
) -> Result<u32, (Failure, String)> {
    let response = exchange(addr, path, "")?;
    match identify(&response.body) {
        Some(pid) if response.status == 200 => Ok(pid),
        _ => Err((
            Failure::Wrong,
            format!("{} {:?}", response.status, response.body),
        )),
    }
}

/// One GET of `path` with `headers` (each line ending in CRLF) on a new
/// connection; the whole response, or how it failed.
pub fn exchange(
    addr: SocketAddr,
    path: &str,
    headers: &str,
) -> Result<responses::Response, (Failure, String)> {
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: herd-test\r\nConnection: close\r\n{headers}\r\n");
    let mut stream = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)
        .map_err(|e| (Failure::NotSent, format!("connect: {e}")))?;
    stream
        .write_all(request.as_bytes())
        .map_err(|e| (Failure::NotSent, format!("send: {e}")))?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT)).unwrap();
    let mut bytes = Vec::new();
    match stream.read_to_end(&mut bytes) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            return Err((Failure::NoAnswer, format!("{REQUEST_TIMEOUT:?}: {e}")))
        }
        Err(e) => return Err((Failure::Cut, format!("read: {e}"))),
        Ok(_) => {}
    }
    responses::parse(&bytes).map_err(|e| (Failure::Cut, format!("{e} in {} bytes", bytes.len())))
}

/// [`CLIENTS`] client threads sending requests one after another, each on
/// a new connection, until told to stop (or their bounds).
pub struct Load {
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(addr: SocketAddr, identify: Identify) -> Load {
        Load::start_on(addr, "/", identify)
    }

    /// The load, each request a GET of `path`.
    pub fn start_on(addr: SocketAddr, path: &'static str, identify: Identify) -> Load {
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..CLIENTS)
            .map(|_| {
                let (outcomes, stop) = (outcomes.clone(), stop.clone());
                std::thread::spawn(move || {
                    let started = Instant::now();
                    for _ in 0..MAX_REQUESTS_PER_CLIENT {
                        if stop.load(SeqCst) || started.elapsed() > LOAD_CAP {
                            break;
                        }
                        let began = Instant::now();
                        let answer = request_for(addr, path, identify);
                        let ended = Instant::now();
                        let outcome = Outcome {
                            began,
                            ended,
                            answer,
                        };
                        outcomes.lock().unwrap().push(outcome);
                    }
                })
            })
            .collect();
        Load {
            outcomes,
            stop,
            threads,
        }
    }

    pub fn succeeded(&self) -> usize {
        let outcomes = self.outcomes.lock().unwrap();
        outcomes.iter().filter(|o| o.answer.is_ok()).count()
    }

    /// Waits for `more` successful requests from now.
    pub fn settle(&self, more: usize) {
        let target = self.succeeded() + more;
        wait_until(&format!("{more} more answered requests"), || {
            (self.succeeded() >= target).then_some(())
        });
    }

    /// Every failed request so far.
    pub fn failures(&self) -> Vec<Outcome> {
        let outcomes = self.outcomes.lock().unwrap();
        outcomes
            .iter()
            .filter(|o| o.answer.is_err())
            .cloned()
            .collect()
    }

    pub fn finish(mut self) -> Vec<Outcome> {
        self.stop.store(true, SeqCst);
        for thread in self.threads.drain(..) {
            thread.join().unwrap();
        }
        std::mem::take(&mut *self.outcomes.lock().unwrap())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
    }
}

/// The scheduler state of `pid` (`T` once SIGSTOP took effect).
pub fn process_state(pid: u32) -> Option<char> {
    procs::proc_of(pid).map(|p| p.state)
}

/// The kill of one slot's worker: when it was frozen, and what it held.
#[derive(Debug)]
pub struct Kill {
    pub frozen: Instant,
    pub held: u64,
}

impl Kill {
    /// A failure this kill may explain: cut, in progress at the freeze.
    pub fn explains(&self, outcome: &Outcome) -> bool {
        matches!(outcome.answer, Err((Failure::Cut, _)))
            && outcome.began < self.frozen
            && outcome.ended > self.frozen
    }
}

/// Freezes slot `slot`'s worker and everything it started (gunicorn's
/// arbiter and its worker), counts the connections they hold, SIGKILLs
/// the worker (herd kills the rest) and waits until herd refilled the slot.
pub fn kill_slot(herd: &Herd, slot: usize, workers: usize) -> Kill {
    let victim = pids_of(&herd.status())[&slot];
    let mut tree: Vec<u32> = vec![victim];
    tree.extend(procs::descendants(victim).iter().map(|p| p.pid));
    for &pid in &tree {
        signal(pid, Signal::SIGSTOP);
    }
    wait_until("the victim's processes to stop", || {
        tree.iter()
            .all(|&pid| process_state(pid) == Some('T'))
            .then_some(())
    });
    let frozen = Instant::now();
    let held = connections_held(&tree, herd.addr().port());
    signal(victim, Signal::SIGKILL);
    wait_for_status(&herd.dir, "the victim's slot refilled", |s| {
        all_ready(s, workers) && pids_of(s)[&slot] != victim
    });
    Kill { frozen, held }
}

/// The failures among `outcomes` that `kill` does not explain, and how
/// many it does.
pub fn judge(outcomes: &[Outcome], kill: &Kill) -> (Vec<Outcome>, usize) {
    let failed = outcomes.iter().filter(|o| o.answer.is_err());
    let (explained, unexplained): (Vec<&Outcome>, Vec<&Outcome>) =
        failed.partition(|o| kill.explains(o));
    (unexplained.into_iter().cloned().collect(), explained.len())
}

/// Fails the test `name` if any request among `outcomes` failed beyond
/// what `kill` explains, naming the step (from `steps`, each with when it
/// began) each failure happened in.
pub fn assert_only_the_kill_failed(
    name: &str,
    outcomes: &[Outcome],
    kill: &Kill,
    steps: &[(&str, Instant)],
) {
    let (unexplained, explained) = judge(outcomes, kill);
    let during: Vec<(&str, &Outcome)> = unexplained
        .iter()
        .map(|o| {
            (
                steps
                    .iter()
                    .rfind(|s| s.1 <= o.began)
                    .map_or("start", |s| s.0),
                o,
            )
        })
        .collect();
    assert!(
        unexplained.is_empty(),
        "{name}: {} of {} requests failed beyond those the killed worker held \
         ({kill:?}), during: {during:#?}",
        unexplained.len(),
        outcomes.len()
    );
    assert!(
        explained as u64 <= kill.held,
        "{name}: {explained} requests cut at the kill, but it held only {}",
        kill.held
    );
    eprintln!(
        "{name}: {} requests, {explained} cut at the kill (held {})",
        outcomes.len(),
        kill.held
    );
}

/// Under `load`, on herd's 2 workers (`first`: their pids): SIGKILL slot
/// 0's ([`kill_slot`]), then a rolling reload; each step waits for
/// [`STEADY`] more answers. The kill, and when each step began (to say in
/// which one a request failed).
pub fn kill_then_reload(
    herd: &Herd,
    load: &Load,
    first: &BTreeSet<u32>,
) -> (Kill, Vec<(&'static str, Instant)>) {
    let mut steps = vec![("kill", Instant::now())];
    let kill = kill_slot(herd, 0, 2);
    load.settle(STEADY);
    steps.push(("reload", Instant::now()));
    let reload = herd.control(&["reload"]);
    assert_eq!(reload.code, Some(0), "{reload:?}");
    let reloaded = herd.wait_all_ready(2);
    assert!(reloaded.is_disjoint(first), "{reloaded:?} vs {first:?}");
    load.settle(STEADY);
    (kill, steps)
}
