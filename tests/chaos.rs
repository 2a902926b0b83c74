//! Chaos (issue 12, point 8): for a while (60 s; `HERD_CHAOS_SECS`) under
//! steady bounded load, at random: SIGKILL a worker, SIGSTOP/SIGCONT one,
//! `herd scale N`, `herd reload`; once with herd-protocol workers
//! (hello-worker) and once with Node cluster workers (the seed app).
//!
//! At the end: herd never panicked, every slot has a ready worker, no
//! process other than herd and its current workers descends from the test,
//! herd's fd count and RSS are back within a small bound of the start, and
//! failed requests are at most the requests that were in progress in the
//! workers that were killed (each victim is SIGSTOPped first, and the
//! client connections in its fd table counted, then SIGKILLed).
//!
//! The actions come from a seeded xorshift PRNG; the seed is printed first
//! and `HERD_CHAOS_SEED` replays it: the same actions in the same order
//! and at the same intervals (which worker each one hits depends on what
//! herd shows then, and the processes' timing is not replayed). The
//! actions and failed requests are printed with the UTC time of day, as
//! herd logs it; `HERD_CHAOS_LOG=PATH` writes herd's whole log to
//! `PATH.Herd` / `PATH.Node`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::procs::{
    descendants, descends_from, parse_stat, proc_of, process_running, processes, Proc, Usage,
};
use common::sockets::connections_held;
use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;

/// Chaos duration unless `HERD_CHAOS_SECS` says otherwise.
const DEFAULT_SECS: u64 = 60;
/// Client threads, each with one request in progress at a time.
const CLIENTS: usize = 3;
/// Upper bound on requests over the whole run, whatever the duration (a
/// 60 s run on a 2-core machine makes well under a tenth of this).
const MAX_REQUESTS: u64 = 2_000_000;
/// Per request, from connecting to the end of the answer. Longer than a
/// worker is ever SIGSTOPped (800 ms) and than herd's 1 s ack_timeout, so
/// a request to a stopped worker is slow, not failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const START_WORKERS: usize = 2;
/// `herd scale N` picks N in 1..=MAX_SCALE.
const MAX_SCALE: u64 = 4;
/// How long herd gets, after the chaos, to fill every slot with a ready
/// worker, and then to let its drained workers go (they have
/// `shutdown_timeout`, 5 s). The restart backoff is capped at 200 ms and a
/// worker starts in well under a second, so this is generous for a loaded
/// 2-core machine.
const SETTLE: Duration = Duration::from_secs(10);
/// Once one check has failed, the later ones wait only this long: herd is
/// broken already, and the report must come out before nextest's limit.
/// The whole test stays under the 120 s that .config/nextest.toml allows
/// with the default 60 s of chaos: about 62 s to the end of the chaos, up to
/// 10 s for the last requests, then 10 + 10 + 10 + 5 s of checks at most if
/// all pass slowly, 10 + 3 x 2 s if the first fails.
const SETTLE_AFTER_FAILURE: Duration = Duration::from_secs(2);
/// A control command that takes longer than this is recorded as hung. A
/// reload of 4 Node workers takes about a second here.
const CLI_TIMEOUT: Duration = Duration::from_secs(10);
/// herd's fds at the end may exceed the start by this many. The end has
/// the same number of slots as the start (after the chaos, herd is scaled
/// back to START_WORKERS), so the steady-state count is the same, except that with
/// Node workers herd keeps the kernel rotation's socket of each slot a
/// scale-up created (+2 here: slots 2 and 3). The rest of the slack covers
/// what legitimately comes and goes while idle (a control connection being
/// closed, a client connection accepted just as the load stopped). A leak
/// of one fd per kill, restart, reload or request exceeds it by far: a run
/// makes dozens to hundreds of each.
const FD_SLACK: usize = 8;
/// herd's RSS at the end may exceed the start by this much. Measured: at
/// most +0.4 MiB after 60 s (a debug build; glibc keeps some of what the
/// load and the restarts allocated). The bound is 20 times that, for
/// other allocators and machines, yet a leak of 50 bytes per request (a
/// 60 s run makes 100 000 or more) or 40 KiB per worker started (a run
/// starts a couple of hundred) exceeds it.
const RSS_SLACK: u64 = 8 << 20;

/// The config of both tests: restarts at once, a crash loop never marks a
/// slot as given up, and a drain that takes too long is cut short.
const CONFIG: &str = "shutdown_timeout = \"5s\"\n\
[restart]\n\
min_uptime = \"50ms\"\n\
max_restarts = 100000\n\
backoff_base = \"10ms\"\n\
backoff_max = \"200ms\"\n";

/// Under `cargo test` both tests share one process; the descendant check
/// must not see the other test's herd, so they take turns. (Under nextest
/// each test has its own process and this lock is uncontended.)
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn chaos_with_herd_workers() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    chaos(Kind::Herd);
}

#[test]
fn chaos_with_node_workers() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    chaos(Kind::Node);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The Rust hello-worker, speaking herd's protocol (hand-offs).
    Herd,
    /// The unmodified Node seed app, speaking Node's cluster IPC. It listens
    /// on port 0, so herd serves it on the configured listener with the
    /// kernel rotation (where herd may use it), Node's default path.
    Node,
}

fn chaos(kind: Kind) {
    let secs: u64 = env_number("HERD_CHAOS_SECS").unwrap_or(DEFAULT_SECS);
    let seed = env_number("HERD_CHAOS_SEED").unwrap_or_else(fresh_seed);
    println!("chaos {kind:?}: seed={seed} secs={secs} (replay with HERD_CHAOS_SEED={seed})");
    let mut rng = XorShift::new(seed);
    // Orphans of our descendants (a worker's child whose worker died, a
    // helper herd left) become ours instead of init's, so that the check
    // for leftovers sees them: without this they would leave the tree.
    nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");

    let app = format!(
        "{}/workers/node/cluster-server.js",
        env!("CARGO_MANIFEST_DIR")
    );
    let herd = match kind {
        Kind::Herd => Herd::launch(
            "chaos-herd",
            Some(CONFIG),
            START_WORKERS,
            &[],
            &[hello_worker()],
        ),
        Kind::Node => Herd::launch(
            "chaos-node",
            Some(&format!("{CONFIG}[env]\nPORT = \"0\"\n")),
            START_WORKERS,
            &[],
            &["node", &app],
        ),
    };
    let herd_pid = herd.pid();
    let addr = herd.addr();
    let port = addr.port();
    herd.wait_all_ready(START_WORKERS);

    // Warm up, so the baseline includes what herd allocates once (buffers,
    // the runtime's threads, the first status reports), not only its start.
    for i in 0..200 {
        if let Err(e) = request(addr) {
            panic!("warm-up request {i} failed: {e}\n{}", herd.log_text());
        }
    }
    herd.wait_all_ready(START_WORKERS);
    let start = Usage::of(herd_pid).expect("herd's /proc entry");
    println!("chaos: herd pid {herd_pid} on {addr}; at start {start:?}");

    let mut tally = Tally::default();
    let load = Load::start(addr, Duration::from_secs(secs) + SETTLE);
    let mut victims = Victims::new(herd_pid, port);
    let mut reloads: Vec<JoinHandle<Result<CliRun, String>>> = Vec::new();
    let began = Instant::now();
    let end = began + Duration::from_secs(secs);
    let mut target = START_WORKERS;
    let mut next_action = began + gap(&mut rng);
    // Each pass either acts, or resumes a stopped worker, or ends the run.
    // Every action runs `herd status` (a process start and a round trip:
    // milliseconds), so there are far fewer than 200 actions a second, each
    // stopping at most one worker: a correct loop never reaches this bound.
    let max_passes = secs * 400 + 100;
    let mut passes = 0;
    loop {
        passes += 1;
        assert!(passes <= max_passes, "the chaos loop did not end");
        let wake = victims
            .next_due()
            .map_or(next_action, |due| due.min(next_action));
        let now = Instant::now();
        // The chaos cadence, not a synchronisation.
        std::thread::sleep(wake.min(end).saturating_duration_since(now));
        tally.lost_while_stopped(victims.resume_due(Instant::now()));
        reap_reloads(&mut reloads, &mut tally);
        let now = Instant::now();
        if now >= end {
            break;
        }
        if now < next_action {
            continue;
        }
        // Every action draws the same four numbers, whatever it turns out
        // to be, so a replayed seed makes the same choices in the same
        // order; only the pids they land on depend on what herd shows.
        let (what, pick, coin, extra) = (rng.below(100), rng.next(), rng.next(), rng.next());
        next_action = now + gap(&mut rng);
        let at = clock();
        if !process_running(herd_pid) {
            tally.note(format!("{at} herd is gone; ending the chaos early"));
            break;
        }
        let (rows, changing) = match status_of(&herd.dir) {
            Ok(status) => (slot_pids(&status), changing_slots(&status)),
            Err(e) => {
                if e.contains(NO_ANSWER) {
                    tally.hung.push(format!("{at} status: {e}"));
                }
                tally.note(format!("{at} status failed: {e}"));
                tally.status_failures += 1;
                continue;
            }
        };
        match what {
            0..=29 => {
                // Supervision races live where a slot is changing (a
                // worker starting, a reload's replacement starting): half
                // the kills go there when there is such a slot.
                let pool = if !changing.is_empty() && extra % 2 == 0 {
                    &changing
                } else {
                    &rows
                };
                let Some(&(slot, victim)) = choose(pool, pick) else {
                    continue;
                };
                kill(&mut victims, &mut tally, victim);
                // Half the kills also kill whatever herd puts in that slot
                // next: a restart that fails to start, or, during a
                // reload, the replacement that was starting while the
                // worker it was to replace died.
                if coin % 2 == 0 {
                    match next_in_slot(&herd.dir, slot, victim) {
                        Some(next) => {
                            println!("chaos {}: slot {slot} now has pid {next}", clock());
                            kill(&mut victims, &mut tally, next);
                        }
                        None => println!("chaos {}: slot {slot} has no next worker", clock()),
                    }
                }
            }
            30..=54 => {
                let Some(&(_, victim)) = choose(&rows, pick) else {
                    continue;
                };
                let pause = Duration::from_millis(100 + extra % 701);
                if let Some(held) = victims.stop(victim, Instant::now() + pause) {
                    tally.stops += 1;
                    println!("chaos {at}: SIGSTOP pid {victim} holding {held} for {pause:?}");
                }
            }
            55..=79 => {
                let n = (1 + pick % MAX_SCALE) as usize;
                if scale(&herd.dir, n, &mut tally, &at) {
                    target = n;
                }
            }
            _ => {
                // In the background, so kills, stops and scales race the
                // reload (and a second reload meets the first). At most
                // three at a time: each is a thread and a process.
                if reloads.len() < 3 {
                    println!("chaos {at}: herd reload");
                    let dir = herd.dir.clone();
                    reloads.push(std::thread::spawn(move || {
                        cli(&dir, &["reload"], CLI_TIMEOUT)
                    }));
                }
            }
        }
    }

    // The end: stop the load, resume what is stopped, collect the reloads.
    // The SIGCONTs come before waiting for the clients: a request in
    // progress on a stopped worker completes only once it runs again.
    load.stop();
    tally.lost_while_stopped(victims.resume_all());
    let stats = load.finish();
    for handle in reloads.drain(..) {
        record_reload(handle.join().unwrap(), &mut tally);
    }

    let mut checks = Checks::new(herd_pid);
    // 2. Every slot has a ready worker: first as the chaos left them (the
    // last successful scale), then back at the starting count, so that
    // herd's fds compare with the start (herd holds some per slot).
    if let Err(why) = wait_all_ready(&herd.dir, herd_pid, target, checks.limit(SETTLE)) {
        checks.fail(format!("after the chaos: {why}"));
    }
    let at = clock();
    let scaled_back = scale(&herd.dir, START_WORKERS, &mut tally, &at);
    if scaled_back {
        target = START_WORKERS;
    }
    let final_status = match wait_all_ready(&herd.dir, herd_pid, target, checks.limit(SETTLE)) {
        Ok(status) => Some(status),
        Err(why) => {
            checks.fail(format!("after scaling back to {START_WORKERS}: {why}"));
            None
        }
    };
    // 3. No process other than herd and its current workers descends from
    // the test (drained workers get shutdown_timeout to go).
    let (mut family, mut reaped) = (0, 0);
    let limit = checks.limit(SETTLE);
    let strays = wait_for(limit, || {
        let mut allowed: BTreeSet<u32> = status_of(&herd.dir)
            .map(|s| slot_pids(&s).into_iter().map(|(_, pid)| pid).collect())
            .unwrap_or_default();
        allowed.insert(herd_pid);
        reaped += reap_orphans(herd_pid);
        let all = descendants(std::process::id());
        family = all.len();
        let strays: Vec<Proc> = all
            .into_iter()
            .filter(|p| !allowed.contains(&p.pid))
            .collect();
        Some((strays.is_empty(), strays))
    });
    if let Err(Some(strays)) = strays {
        let list: Vec<String> = strays.iter().map(|p| format!("{p}")).collect();
        checks.fail(format!(
            "processes other than herd and its current workers descend from the test after {limit:?}:\n  {}",
            list.join("\n  ")
        ));
    }
    // 4. herd's fds and RSS are back near the start (transient fds, such
    // as a closing control connection, get a few seconds to go).
    let usage = wait_for(checks.limit(Duration::from_secs(5)), || {
        let usage = Usage::of(herd_pid)?;
        let ok = usage.fds <= start.fds + FD_SLACK && usage.rss <= start.rss + RSS_SLACK;
        Some((ok, usage))
    });
    let end_usage = match usage {
        Ok(usage) => Some(usage),
        Err(last) => {
            let caveat = if scaled_back {
                ""
            } else {
                " (the scale back to the starting count failed)"
            };
            checks.fail(format!(
                "herd's fds/RSS not back within +{FD_SLACK} fds / +{} MiB of the start {start:?}{caveat}: {last:?}; fds now: {}",
                RSS_SLACK >> 20,
                last.map_or(String::new(), |_| fd_targets(herd_pid))
            ));
            last
        }
    };
    // 1. herd still runs and never panicked.
    let log = herd.log_text();
    if let Ok(path) = std::env::var("HERD_CHAOS_LOG") {
        // herd's whole log, for matching failures with what herd did.
        let path = format!("{path}.{kind:?}");
        match std::fs::write(&path, &log) {
            Ok(()) => println!("chaos: herd's log is in {path}"),
            Err(e) => println!("chaos: cannot write herd's log to {path}: {e}"),
        }
    }
    if !process_running(herd_pid) {
        checks.fail("herd is no longer running".into());
    }
    // A panic's message follows on the next line; a worker's own output
    // comes prefixed `[worker N]` (a worker panicking is a bug too: the
    // Rust worker library is part of herd).
    let lines: Vec<&str> = log.lines().collect();
    for (whose, is_worker) in [("herd", false), ("a worker", true)] {
        let panics: Vec<String> = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.contains("panicked") && l.starts_with("[worker ") == is_worker)
            .map(|(i, _)| lines[i..lines.len().min(i + 2)].join(" / "))
            .collect();
        if !panics.is_empty() {
            checks.fail(format!("{whose} panicked:\n  {}", panics.join("\n  ")));
        }
    }
    // herd answers every control command, if only to refuse it.
    if !tally.hung.is_empty() {
        checks.fail(format!(
            "control commands got no answer:\n  {}",
            tally.hung.join("\n  ")
        ));
    }
    // 5. Only requests in progress in killed workers failed.
    if stats.failed > tally.allowed_failures {
        checks.fail(format!(
            "{} requests failed, more than the {} in progress in killed workers; first failures:\n  {}",
            stats.failed,
            tally.allowed_failures,
            stats.reasons.join("\n  ")
        ));
    }

    let end_fds = end_usage.map_or("?".into(), |u| format!("{}", u.fds));
    let end_rss = end_usage.map_or("?".into(), |u| format!("{}", u.rss >> 10));
    println!(
        "chaos tally: kind={kind:?} seed={seed} secs={secs} requests={} ok={} failed={} allowed={} \
         kills={} (skipped {}, died while stopped {}) stops={} scales=(ok {}, failed {}) \
         reloads=(ok {}, refused {}, failed {}, other {}) status_failures={} \
         descendants={family} orphans_reaped={reaped} \
         fds start/end={}/{end_fds} rss start/end={}/{end_rss} KiB",
        stats.requests,
        stats.ok,
        stats.failed,
        tally.allowed_failures,
        tally.kills,
        tally.kills_skipped,
        tally.died_while_stopped,
        tally.stops,
        tally.scales_ok,
        tally.scales_failed,
        tally.reloads_ok,
        tally.reloads_refused,
        tally.reloads_failed,
        tally.reloads_other,
        tally.status_failures,
        start.fds,
        start.rss >> 10,
    );
    if !stats.reasons.is_empty() {
        println!(
            "chaos: first failed requests:\n  {}",
            stats.reasons.join("\n  ")
        );
    }
    if !tally.notes.is_empty() {
        println!("chaos: notes:\n  {}", tally.notes.join("\n  "));
    }
    if let Some(status) = &final_status {
        println!("chaos: final slots {:?}", slot_pids(status));
    }
    if !checks.problems.is_empty() {
        let tail: Vec<&str> = log
            .lines()
            .filter(|l| !l.starts_with("[worker "))
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        panic!(
            "chaos {kind:?} (seed {seed}) failed:\n- {}\nlast lines of herd's own log:\n{}",
            checks.problems.join("\n- "),
            tail.join("\n")
        );
    }
}

/// The end checks' findings. Each is printed at once, so that it shows
/// even if the test is then killed for taking too long.
struct Checks {
    herd_pid: u32,
    problems: Vec<String>,
}

impl Checks {
    fn new(herd_pid: u32) -> Checks {
        Checks {
            herd_pid,
            problems: Vec::new(),
        }
    }

    fn fail(&mut self, problem: String) {
        println!("chaos {}: FAILED: {problem}", clock());
        self.problems.push(problem);
    }

    /// How long the next check may wait: `normal`, or little once herd is
    /// known broken (nothing if it is gone: a dead herd settles nothing).
    fn limit(&self, normal: Duration) -> Duration {
        if !process_running(self.herd_pid) {
            Duration::ZERO
        } else if self.problems.is_empty() {
            normal
        } else {
            normal.min(SETTLE_AFTER_FAILURE)
        }
    }
}

/// Waits until status shows `count` slots, each `ready` with a worker that
/// is a live descendant of herd; Err says what it showed last.
fn wait_all_ready(
    dir: &Path,
    herd_pid: u32,
    count: usize,
    limit: Duration,
) -> Result<Value, String> {
    let settled = wait_for(limit, || {
        let status = status_of(dir).ok()?;
        let workers = workers_of(&status);
        let full = workers.len() == count
            && workers.iter().all(|w| {
                w["state"] == "ready"
                    && w["pid"]
                        .as_u64()
                        .is_some_and(|pid| descends_from(pid as u32, herd_pid))
            });
        Some((full, status))
    });
    settled.map_err(|last| {
        format!(
            "not {count} ready slots within {limit:?}; last status: {}",
            last.map_or("none".into(), |s| format!("{s:#}"))
        )
    })
}

/// SIGKILLs `victim`, counting what it held (see `kill_counting`).
fn kill(victims: &mut Victims, tally: &mut Tally, victim: u32) {
    match victims.kill(victim) {
        Some(held) => {
            tally.kills += 1;
            tally.allowed_failures += held;
            println!("chaos {}: SIGKILL pid {victim} holding {held}", clock());
        }
        None => tally.kills_skipped += 1,
    }
}

/// The worker herd puts in `slot` after `gone`, once status shows one
/// (polled for at most a second: herd sees a SIGKILL within milliseconds).
fn next_in_slot(dir: &Path, slot: u64, gone: u32) -> Option<u32> {
    wait_for(Duration::from_secs(1), || {
        let status = status_of(dir).ok()?;
        let pid = slot_pids(&status)
            .into_iter()
            .find(|&(s, _)| s == slot)
            .map(|(_, pid)| pid);
        Some((pid.is_some_and(|p| p != gone), pid))
    })
    .ok()
    .flatten()
}

/// The time to the next action: mostly a few hundred ms, so herd has time
/// to react and the load to run in between; but one in four follows at
/// once, so that actions also race each other and herd's reactions (a scale
/// down while the workers a scale up or a kill started are getting ready,
/// a kill while a reload's replacement for that slot is starting).
fn gap(rng: &mut XorShift) -> Duration {
    if rng.below(4) == 0 {
        rng.millis(0, 20)
    } else {
        rng.millis(200, 600)
    }
}

// ---- the random source ----

/// xorshift64: small, seedable, good enough to pick actions.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        // Zero is xorshift's one fixed point.
        XorShift(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform enough in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// In `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
}

/// The UTC time of day, as herd's log prints it, so that the actions and
/// failed requests printed here can be matched with herd's log lines.
fn clock() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        now.subsec_micros()
    )
}

/// The item a random number lands on, if there is any.
fn choose<T>(items: &[T], random: u64) -> Option<&T> {
    if items.is_empty() {
        return None;
    }
    items.get((random % items.len() as u64) as usize)
}

fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ u64::from(std::process::id()) << 32
}

/// A decimal (or 0x-hex) number from the environment, if set.
fn env_number(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    let text = text.trim();
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={text:?}: {e}")))
}

// ---- the load ----

/// What the clients did.
struct LoadStats {
    requests: u64,
    ok: u64,
    failed: u64,
    /// The first few failures, with when they happened.
    reasons: Vec<String>,
}

/// CLIENTS threads, each sending one request after another on a new
/// connection, until stopped, until MAX_REQUESTS in all, or until their own
/// time limit (should the test die without stopping them).
struct Load {
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    reasons: Arc<Mutex<Vec<String>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, limit: Duration) -> Load {
        let mut load = Load {
            stop: Arc::default(),
            requests: Arc::default(),
            ok: Arc::default(),
            failed: Arc::default(),
            reasons: Arc::default(),
            threads: Vec::new(),
        };
        let began = Instant::now();
        for _ in 0..CLIENTS {
            let (stop, requests, ok, failed, reasons) = (
                load.stop.clone(),
                load.requests.clone(),
                load.ok.clone(),
                load.failed.clone(),
                load.reasons.clone(),
            );
            load.threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) && began.elapsed() < limit {
                    if requests.fetch_add(1, Ordering::SeqCst) >= MAX_REQUESTS {
                        requests.fetch_sub(1, Ordering::SeqCst);
                        break;
                    }
                    match request(addr) {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::SeqCst);
                            let mut reasons = reasons.lock().unwrap();
                            if reasons.len() < 10 {
                                let at = clock();
                                reasons.push(format!("{at} {e}"));
                            }
                        }
                    }
                }
            }));
        }
        load
    }

    /// Tells the clients to stop after the request each has in progress.
    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Stops the clients and waits for them.
    fn finish(mut self) -> LoadStats {
        self.stop();
        for thread in self.threads.drain(..) {
            thread.join().unwrap();
        }
        LoadStats {
            requests: self.requests.load(Ordering::SeqCst),
            ok: self.ok.load(Ordering::SeqCst),
            failed: self.failed.load(Ordering::SeqCst),
            reasons: self.reasons.lock().unwrap().clone(),
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        // A panicking test stops its clients too.
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// One `Connection: close` request on a new connection; Ok if a whole 200
/// response from a worker came back within REQUEST_TIMEOUT.
fn request(addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let mut stream =
        TcpStream::connect_timeout(&addr, left()).map_err(|e| format!("connect: {e}"))?;
    stream.set_write_timeout(Some(left())).unwrap();
    stream
        .write_all(REQUEST)
        .map_err(|e| format!("send: {e}"))?;
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    // Bounded by the deadline: every read waits at most what is left of it.
    loop {
        if Instant::now() >= deadline {
            return Err(format!("no whole answer within {REQUEST_TIMEOUT:?}"));
        }
        stream.set_read_timeout(Some(left())).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {e} after {} bytes", response.len())),
        }
    }
    match responses::parse(&response) {
        Ok(r) if (r.version, r.status) == (1, 200) && r.body.contains("Handled by worker ") => {
            Ok(())
        }
        _ => Err(format!(
            "unexpected response {:?}",
            String::from_utf8_lossy(&response)
        )),
    }
}

// ---- the actions ----

#[derive(Default)]
struct Tally {
    kills: u64,
    /// The victim was gone (or no longer herd's) before we could stop it.
    kills_skipped: u64,
    /// Workers that died while we had them stopped: herd may kill a worker
    /// that does not respond (after `shutdown_timeout` if it drains, or as
    /// hung). Killed all the same, so what they held counts as allowed.
    died_while_stopped: u64,
    /// Requests in progress in the killed workers: the failures allowed.
    allowed_failures: u64,
    stops: u64,
    scales_ok: u64,
    scales_failed: u64,
    reloads_ok: u64,
    /// "a reload is already in progress"
    reloads_refused: u64,
    /// "reload failed: ..." (a new worker died: we may have killed it)
    reloads_failed: u64,
    /// Anything else: a hang, an unexpected answer.
    reloads_other: u64,
    status_failures: u64,
    /// Control commands herd never answered (within CLI_TIMEOUT): never
    /// legitimate, unlike a refusal.
    hung: Vec<String>,
    /// Unusual outcomes, printed at the end.
    notes: Vec<String>,
}

impl Tally {
    fn lost_while_stopped(&mut self, (died, held): (u64, u64)) {
        self.died_while_stopped += died;
        self.allowed_failures += held;
    }

    fn note(&mut self, note: String) {
        println!("chaos: {note}");
        if self.notes.len() < 20 {
            self.notes.push(note);
        }
    }
}

/// `herd scale n`; true if herd took it.
fn scale(dir: &Path, n: usize, tally: &mut Tally, at: &str) -> bool {
    let n_text = n.to_string();
    let run = cli(dir, &["scale", &n_text], CLI_TIMEOUT);
    println!("chaos {at}: herd scale {n}: {}", summary(&run));
    match run {
        Ok(run) if run.code == Some(0) => {
            tally.scales_ok += 1;
            true
        }
        Err(e) => {
            tally.scales_failed += 1;
            tally.hung.push(format!("{at} scale {n}: {e}"));
            false
        }
        other => {
            tally.scales_failed += 1;
            tally.note(format!("{at} scale {n}: {}", summary(&other)));
            false
        }
    }
}

fn reap_reloads(reloads: &mut Vec<JoinHandle<Result<CliRun, String>>>, tally: &mut Tally) {
    let mut i = 0;
    while i < reloads.len() {
        if reloads[i].is_finished() {
            let outcome = reloads.swap_remove(i).join().unwrap();
            record_reload(outcome, tally);
        } else {
            i += 1;
        }
    }
}

fn record_reload(outcome: Result<CliRun, String>, tally: &mut Tally) {
    println!("chaos {}: herd reload done: {}", clock(), summary(&outcome));
    match &outcome {
        Ok(run) if run.code == Some(0) => tally.reloads_ok += 1,
        Ok(run) if run.code == Some(1) && run.stderr.contains("already in progress") => {
            tally.reloads_refused += 1
        }
        Ok(run) if run.code == Some(1) && run.stderr.contains("reload failed") => {
            tally.reloads_failed += 1
        }
        Err(e) => {
            tally.reloads_other += 1;
            tally.hung.push(format!("reload: {e}"));
        }
        _ => {
            tally.reloads_other += 1;
            tally.note(format!("reload: {}", summary(&outcome)));
        }
    }
}

/// SIGSTOPs `victim` (a worker of herd's), counts the client connections
/// it holds on herd's listening port, and SIGKILLs it. Stopped, it can no
/// longer accept, answer or close anything, so what it holds at that moment
/// is all its death can lose: connections herd has not handed over, or
/// whose hand-off the worker has not received, or that wait in a kernel
/// accept queue, are not in its fd table; herd keeps them and gives them to
/// another worker. (Some it holds may survive all the same: an answer
/// already written, a hand-off herd also still holds.) None if it was gone.
fn kill_counting(herd_pid: u32, victim: u32, port: u16) -> Option<u64> {
    let held = stop_counting(herd_pid, victim, port)?;
    send(victim, Signal::SIGKILL);
    Some(held)
}

/// SIGSTOPs `victim` if it is one of herd's, waits until it is stopped and
/// counts the client connections it (or its process group) holds on
/// herd's port; its fd table cannot change until it runs again.
fn stop_counting(herd_pid: u32, victim: u32, port: u16) -> Option<u64> {
    if !descends_from(victim, herd_pid) || !send(victim, Signal::SIGSTOP) {
        return None;
    }
    wait_stopped(victim);
    // These workers have no processes of their own, but a worker's process
    // group is what herd stops, so count whatever is in it.
    let mut holders: Vec<u32> = processes()
        .into_iter()
        .filter(|p| p.pgrp == victim)
        .map(|p| p.pid)
        .collect();
    if !holders.contains(&victim) {
        holders.push(victim);
    }
    Some(connections_held(&holders, port))
}

/// Waits until every thread of `pid` is stopped (or it is gone), so that
/// its fd table no longer changes: a SIGSTOP is delivered asynchronously.
fn wait_stopped(pid: u32) {
    // Milliseconds normally; a task in uninterruptible sleep stops later.
    let limit = Duration::from_secs(2);
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return;
        };
        let all_stopped = tasks.filter_map(Result::ok).all(|task| {
            std::fs::read_to_string(task.path().join("stat"))
                .ok()
                .and_then(|stat| parse_stat(&stat))
                .is_none_or(|p| matches!(p.state, 'T' | 't' | 'Z' | 'X'))
        });
        if all_stopped {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    println!("chaos: pid {pid} did not stop within {limit:?}; counting anyway");
}

/// The workers we SIGSTOPped, each with when it is due its SIGCONT (every
/// one gets it, if need be on drop: a panicking test must not leave one
/// stopped), and those we SIGKILLed.
struct Victims {
    herd_pid: u32,
    /// herd's listening port, whose connections a worker holds.
    port: u16,
    frozen: Vec<Frozen>,
    /// (pid, start time) of the workers we SIGKILLed: until herd has seen
    /// one die, status still shows it, and it must not be counted twice.
    killed: BTreeSet<(u32, u64)>,
}

struct Frozen {
    pid: u32,
    /// Its start time, so that a pid reused meanwhile is never signalled.
    started: u64,
    resume_at: Instant,
    /// The connections it held when stopped (it cannot take more).
    held: u64,
}

impl Victims {
    fn new(herd_pid: u32, port: u16) -> Victims {
        Victims {
            herd_pid,
            port,
            frozen: Vec::new(),
            killed: BTreeSet::new(),
        }
    }

    /// Stops `pid` until `resume_at`; returns what it holds.
    fn stop(&mut self, pid: u32, resume_at: Instant) -> Option<u64> {
        let started = proc_of(pid)?.started;
        if self.killed.contains(&(pid, started)) {
            return None;
        }
        let held = stop_counting(self.herd_pid, pid, self.port)?;
        self.frozen.push(Frozen {
            pid,
            started,
            resume_at,
            held,
        });
        Some(held)
    }

    /// SIGKILLs `victim`, counting what it held (see `kill_counting`);
    /// None if it was gone, or killed already.
    fn kill(&mut self, victim: u32) -> Option<u64> {
        let started = proc_of(victim)?.started;
        if !self.killed.insert((victim, started)) {
            return None;
        }
        // It needs no SIGCONT after this.
        self.frozen.retain(|f| f.pid != victim);
        kill_counting(self.herd_pid, victim, self.port)
    }

    fn next_due(&self) -> Option<Instant> {
        self.frozen.iter().map(|f| f.resume_at).min()
    }

    /// SIGCONTs those due; returns how many had died meanwhile and the
    /// connections they held.
    fn resume_due(&mut self, now: Instant) -> (u64, u64) {
        let due: BTreeSet<u32> = self
            .frozen
            .iter()
            .filter(|f| f.resume_at <= now)
            .map(|f| f.pid)
            .collect();
        // A worker stopped twice runs again at the first SIGCONT: its later
        // entry goes too, or its exit after running would look like a death
        // while stopped.
        let (resumed, still) = std::mem::take(&mut self.frozen)
            .into_iter()
            .partition(|f| due.contains(&f.pid));
        self.frozen = still;
        self.resume(resumed)
    }

    fn resume_all(&mut self) -> (u64, u64) {
        let all = std::mem::take(&mut self.frozen);
        self.resume(all)
    }

    fn resume(&self, frozen: Vec<Frozen>) -> (u64, u64) {
        let (mut died, mut held) = (0, 0);
        // A pid stopped twice is resumed (and counted) once.
        let mut seen = BTreeSet::new();
        for f in frozen {
            if !seen.insert(f.pid) {
                continue;
            }
            let same = proc_of(f.pid).is_some_and(|p| {
                p.started == f.started
                    && !matches!(p.state, 'Z' | 'X')
                    && descends_from(f.pid, self.herd_pid)
            });
            if same {
                send(f.pid, Signal::SIGCONT);
                println!("chaos {}: SIGCONT pid {}", clock(), f.pid);
            } else {
                println!(
                    "chaos {}: pid {} died while stopped, holding {}",
                    clock(),
                    f.pid,
                    f.held
                );
                died += 1;
                held += f.held;
            }
        }
        (died, held)
    }
}

impl Drop for Victims {
    fn drop(&mut self) {
        self.resume_all();
    }
}

fn send(pid: u32, signal: Signal) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).is_ok()
}

// ---- herd's control CLI ----

/// Runs `herd ARGS` in `dir`; Err if it did not finish within `timeout`.
/// Unlike common's `herd_cli`, a failure is an outcome to record, not a
/// panic: herd may legitimately refuse under chaos.
fn cli(dir: &Path, args: &[&str], timeout: Duration) -> Result<CliRun, String> {
    herd_cli_within(dir, args, timeout)
}

fn summary(run: &Result<CliRun, String>) -> String {
    match run {
        Ok(run) => format!(
            "exit {:?} {}{}",
            run.code,
            run.stdout.trim(),
            run.stderr.trim()
        ),
        Err(e) => e.clone(),
    }
}

fn status_of(dir: &Path) -> Result<Value, String> {
    let run = cli(dir, &["status", "--json"], CLI_TIMEOUT)?;
    if run.code != Some(0) {
        return Err(format!("exit {:?}: {}", run.code, run.stderr.trim()));
    }
    serde_json::from_str(&run.stdout).map_err(|e| format!("status JSON: {e} in {:?}", run.stdout))
}

/// (slot, pid) of each row that has a worker: the slot's serving worker,
/// else its starting one.
fn slot_pids(status: &Value) -> Vec<(u64, u32)> {
    workers_of(status)
        .iter()
        .filter_map(|w| Some((w["slot"].as_u64()?, w["pid"].as_u64()? as u32)))
        .collect()
}

/// (slot, pid) of the rows whose slot is not simply `ready`: a worker is
/// starting there (a restart, a scale-up), or a reload is replacing it.
fn changing_slots(status: &Value) -> Vec<(u64, u32)> {
    workers_of(status)
        .iter()
        .filter(|w| w["state"] != "ready")
        .filter_map(|w| Some((w["slot"].as_u64()?, w["pid"].as_u64()? as u32)))
        .collect()
}

/// Polls `check` (every 50 ms, for at most `limit`) until it says done;
/// Ok with its last value, or Err with the last value it gave.
fn wait_for<T>(
    limit: Duration,
    mut check: impl FnMut() -> Option<(bool, T)>,
) -> Result<T, Option<T>> {
    let deadline = Instant::now() + limit;
    let mut last = None;
    loop {
        if let Some((done, value)) = check() {
            if done {
                return Ok(value);
            }
            last = Some(value);
        }
        if Instant::now() >= deadline {
            return Err(last);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reaps the test's own zombie children other than herd: orphans adopted
/// as subreaper that have exited since (the test waits for every process
/// it starts itself: herd's CLI runs are over by now). Returns how many.
fn reap_orphans(herd_pid: u32) -> usize {
    let me = std::process::id();
    processes()
        .into_iter()
        .filter(|p| p.ppid == me && p.state == 'Z' && p.pid != herd_pid)
        .filter(|p| {
            let pid = nix::unistd::Pid::from_raw(p.pid as i32);
            let flags = Some(nix::sys::wait::WaitPidFlag::WNOHANG);
            nix::sys::wait::waitpid(pid, flags).is_ok()
        })
        .count()
}

/// What herd's fds point at, counted by kind, for a failure report.
fn fd_targets(pid: u32) -> String {
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.filter_map(Result::ok) {
            let target = std::fs::read_link(fd.path())
                .map(|t| t.to_string_lossy().to_string())
                .unwrap_or_default();
            let kind = target.split(':').next().unwrap_or("").to_string();
            *kinds.entry(kind).or_insert(0) += 1;
        }
    }
    format!("{kinds:?}")
}
