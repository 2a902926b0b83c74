//! Supervision under real load: rolling reloads and crashes that drop
//! nothing, graceful and forced stops, readiness, and recycling by memory
//! and by connection count.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

fn alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

fn wait_gone(pids: impl IntoIterator<Item = u32>) {
    let deadline = Instant::now() + DEADLINE;
    for pid in pids {
        while alive(pid) {
            assert!(Instant::now() < deadline, "process {pid} is still alive");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A client sending requests one after another, each on a new connection,
/// until stopped; it counts successes and failures.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    thread: JoinHandle<BTreeSet<u32>>,
}

impl Load {
    fn start(addr: std::net::SocketAddr) -> Load {
        let (stop, done, failed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let thread = {
            let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut pids = BTreeSet::new();
                // Bounded: at most 200 000 requests, and the test stops it much sooner.
                for _ in 0..200_000 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    match get(addr) {
                        Ok(answer) => {
                            pids.insert(answer.pid);
                        }
                        Err(e) => {
                            eprintln!("request failed: {e}");
                            failed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
                pids
            })
        };
        Load {
            stop,
            done,
            failed,
            thread,
        }
    }

    fn wait_for(&self, requests: usize) {
        let deadline = Instant::now() + DEADLINE;
        while self.done.load(Ordering::SeqCst) < requests {
            assert!(
                Instant::now() < deadline,
                "load stalled at {}",
                self.done.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the client; returns (requests, failures, pids that answered).
    fn finish(self) -> (usize, usize, BTreeSet<u32>) {
        self.stop.store(true, Ordering::SeqCst);
        let pids = self.thread.join().unwrap();
        (
            self.done.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
            pids,
        )
    }
}

/// Three rolling reloads of 4 workers while a client keeps connecting: not
/// one request fails, and every worker is replaced each time.
#[test]
fn rolling_reloads_under_load_fail_no_request() {
    let herd = Herd::launch("reload-load", None, 4, &[], &[hello_worker()]);
    let first = herd.wait_all_ready(4);
    let load = Load::start(herd.addr());
    let mut generations = vec![first];
    for round in 1..=3 {
        load.wait_for(round * 100);
        let output = herd.control(&["reload"]);
        assert!(output.code == Some(0), "reload {round}: {}", &output.stderr);
        assert!(output.stdout.starts_with("reloaded 4 worker(s)"));
        generations.push(herd.wait_all_ready(4));
    }
    load.wait_for(400);
    let (requests, failed, _) = load.finish();
    assert_eq!(
        failed, 0,
        "{failed} of {requests} requests failed during reloads"
    );
    for pair in generations.windows(2) {
        assert!(
            pair[0].is_disjoint(&pair[1]),
            "a worker survived a reload: {pair:?}"
        );
    }
}

/// SIGKILL a random worker every 200 ms for 10 s under load: each slot comes
/// back, and a request fails only if its worker died holding it.
#[test]
fn crashes_under_load_lose_at_most_the_requests_in_progress() {
    let config = "[restart]\nmin_uptime = \"50ms\"\nmax_restarts = 1000\n";
    let herd = Herd::launch("crash-load", Some(config), 4, &[], &[hello_worker()]);
    herd.wait_all_ready(4);
    let load = Load::start(herd.addr());
    let mut seed = u64::from(std::process::id()) | 1;
    let mut kills = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200)); // the kill cadence, not a synchronisation
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let workers = herd.status()["workers"].as_array().unwrap().clone();
        let pids: Vec<u64> = workers.iter().filter_map(|w| w["pid"].as_u64()).collect();
        if pids.is_empty() {
            continue;
        }
        let victim = pids[(seed % pids.len() as u64) as usize] as u32;
        if nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGKILL)
            .is_ok()
        {
            kills += 1;
        }
    }
    let (requests, failed, _) = load.finish();
    assert!(kills >= 40, "only {kills} kills");
    assert!(
        failed <= kills,
        "{failed} of {requests} requests failed after {kills} kills"
    );
    herd.wait_all_ready(4);
    // Every kill was followed by exactly one restart of that slot.
    herd.wait_for_event("worker_started", &[], 4 + kills);
}

/// SIGTERM while a slow request is in progress: the request completes, every
/// worker exits, herd exits 0, and no process is left behind.
#[test]
fn graceful_stop_lets_a_slow_request_finish() {
    let herd = Herd::launch(
        "slow-stop",
        None,
        2,
        &[],
        &[hello_worker(), "--delay-ms", "1000"],
    );
    let pids: Vec<u32> = herd.wait_ready(2).values().copied().collect();
    let addr = herd.addr();
    let request = std::thread::spawn(move || get(addr));
    // The request is in progress once its worker has acknowledged it.
    let deadline = Instant::now() + DEADLINE;
    while herd.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["handed_off"].as_u64().unwrap())
        .sum::<u64>()
        == 0
    {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = herd.stop();
    assert!(status.success(), "herd exit {status:?}");
    assert!(
        request.join().unwrap().is_ok(),
        "the in-flight request was not completed"
    );
    wait_gone(pids);
}

/// A worker that ignores the request to stop is killed when the shutdown
/// timeout runs out, and herd then exits non-zero.
#[test]
fn a_worker_that_ignores_the_stop_is_killed_after_the_timeout() {
    let herd = Herd::launch(
        "stubborn",
        Some("shutdown_timeout = \"300ms\"\n"),
        2,
        &[],
        &[hello_worker(), "--ignore-drain"],
    );
    let pids: Vec<u32> = herd.wait_ready(2).values().copied().collect();
    let mut herd = herd;
    signal(herd.pid(), Signal::SIGTERM);
    herd.wait_for_event("shutdown_timeout", &[], 1);
    assert_eq!(herd.wait_exit().code(), Some(1));
    wait_gone(pids);
}

/// A second SIGINT kills the workers at once; SIGQUIT stops fast. Both exit 1.
#[test]
fn second_sigint_and_sigquit_stop_without_waiting() {
    for (name, signals) in [
        ("sigint2", &[Signal::SIGINT, Signal::SIGINT][..]),
        ("sigquit", &[Signal::SIGQUIT][..]),
    ] {
        let config = "shutdown_timeout = \"60s\"\n";
        let mut herd = Herd::launch(
            name,
            Some(config),
            2,
            &[],
            &[hello_worker(), "--ignore-drain"],
        );
        let pids: Vec<u32> = herd.wait_ready(2).values().copied().collect();
        for (i, sig) in signals.iter().enumerate() {
            signal(herd.pid(), *sig);
            if i == 0 && signals.len() > 1 {
                herd.wait_for_worker_output("[worker 1] ignoring the request to stop", 1);
            }
        }
        // Well before the 60 s shutdown timeout.
        assert_eq!(herd.wait_exit().code(), Some(1), "{name}");
        wait_gone(pids);
    }
}

/// herd SIGKILLed: the kernel kills its workers too (PR_SET_PDEATHSIG).
#[test]
fn workers_die_with_herd_even_when_it_is_sigkilled() {
    let mut herd = Herd::launch("orphans", None, 3, &[], &[hello_worker()]);
    let pids: Vec<u32> = herd.wait_ready(3).values().copied().collect();
    signal(herd.pid(), Signal::SIGKILL);
    herd.wait_exit();
    wait_gone(pids);
}

/// A reload whose new workers fail to start is stopped: the old workers keep
/// serving and `herd reload` reports why, for a worker that exits at once
/// and for one that never becomes ready.
#[test]
fn a_failed_reload_keeps_the_old_workers() {
    let dir = scratch_dir("bad-reload");
    let good = format!(
        "command = [{:?}]\nready_timeout = \"500ms\"\n",
        hello_worker()
    );
    let config = write_config(&dir, &good);
    let herd = Herd::start_in(
        &dir,
        &[
            "-c",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
        ],
    );
    let before = herd.wait_all_ready(2);
    for (broken, reason) in [
        (
            "command = [\"sh\", \"-c\", \"exit 3\"]\nready_timeout = \"500ms\"\n".to_string(),
            "exited with code 3",
        ),
        (
            format!(
                "command = [{:?}, \"--unready-slot\", \"0\"]\nready_timeout = \"500ms\"\n",
                hello_worker()
            ),
            "not ready within ready_timeout",
        ),
    ] {
        std::fs::write(&config, broken).unwrap();
        let output = herd.control(&["reload"]);
        let stderr = &output.stderr;
        assert_eq!(output.code, Some(1), "{stderr}");
        assert!(
            stderr.contains("reload failed") && stderr.contains(reason),
            "{stderr}"
        );
        for _ in 0..20 {
            assert!(
                before.contains(&get(herd.addr()).unwrap().pid),
                "served by a new worker"
            );
        }
        assert_eq!(herd.wait_all_ready(2), before);
    }
}

/// A worker that never says READY is killed after `ready_timeout`, counted
/// as a failed start and retried with backoff; the others serve meanwhile.
#[test]
fn a_worker_that_never_becomes_ready_is_killed_and_retried() {
    let config = "ready_timeout = \"200ms\"\n[restart]\nbackoff_base = \"50ms\"\n";
    let herd = Herd::launch(
        "unready",
        Some(config),
        2,
        &[],
        &[hello_worker(), "--unready-slot", "1"],
    );
    let slot_1 = ("slot", json!(1));
    herd.wait_for_event(
        "ready_timeout",
        &[slot_1.clone(), ("timeout_ms", json!(200))],
        2,
    );
    let restart = [
        slot_1,
        ("failures", json!(2)),
        ("replacement", json!(false)),
    ];
    herd.wait_for_event("restart_scheduled", &restart, 1);
    let status = herd.status();
    assert_eq!(status["workers"][0]["state"], "ready");
    assert_ne!(status["workers"][1]["state"], "ready");
    for _ in 0..10 {
        assert_eq!(get(herd.addr()).unwrap().slot, 0);
    }
}

/// `ready_delay` makes workers that never send READY usable.
#[test]
fn ready_delay_serves_workers_that_never_say_ready() {
    let fixture = format!(
        "{}/tests/fixtures/odd_worker.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let herd = Herd::launch(
        "ready-delay",
        Some("ready_delay = \"100ms\"\n"),
        2,
        &[],
        &["python3", &fixture, "no-ready"],
    );
    herd.wait_ready(2);
    let slots: BTreeSet<usize> = (0..4).map(|_| get(herd.addr()).unwrap().slot).collect();
    assert_eq!(slots.len(), 2);
}

/// `ready = "delay:DUR"` is `ready_delay` by its new name.
#[test]
fn ready_delay_by_the_ready_key_serves_workers_that_never_say_ready() {
    let fixture = format!(
        "{}/tests/fixtures/odd_worker.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let herd = Herd::launch(
        "ready-key-delay",
        Some("ready = \"delay:100ms\"\n"),
        2,
        &[],
        &["python3", &fixture, "no-ready"],
    );
    herd.wait_ready(2);
    let slots: BTreeSet<usize> = (0..4).map(|_| get(herd.addr()).unwrap().slot).collect();
    assert_eq!(slots.len(), 2);
}

/// A worker over `max_memory` is replaced: its successor starts first, then
/// it drains; no request fails meanwhile.
#[test]
fn a_worker_over_max_memory_is_replaced_gracefully() {
    let config = "max_memory = \"40MiB\"\nmonitor_interval = \"100ms\"\n";
    let fat_slot_0 =
        "if [ \"$HERD_WORKER_ID\" = 0 ]; then exec \"$0\" --memory-mb 64; fi; exec \"$0\"";
    let herd = Herd::launch(
        "memory",
        Some(config),
        2,
        &[],
        &["sh", "-c", fat_slot_0, hello_worker()],
    );
    let first = herd.wait_ready(2)[&0];
    let load = Load::start(herd.addr());
    let over = herd.wait_for_event("memory_exceeded", &[], 1).remove(0);
    assert_eq!(number(&over, "pid") as u32, first, "{over}");
    let old = [("slot", json!(0)), ("pid", json!(first))];
    herd.wait_for_event("worker_draining", &old, 1);
    herd.wait_for_event("worker_exited", &old, 1);
    load.wait_for(load.done.load(Ordering::SeqCst) + 50);
    let (requests, failed, _) = load.finish();
    assert_eq!(failed, 0, "{failed} of {requests} failed");
}

/// `max_connections_per_worker` recycles workers after that many
/// connections, without failing a request.
#[test]
fn workers_are_recycled_after_max_connections() {
    let config = "max_connections_per_worker = 50\n";
    let herd = Herd::launch("recycle", Some(config), 2, &[], &[hello_worker()]);
    herd.wait_ready(2);
    let per_pid = count_pids(herd.addr(), 300);
    assert!(
        per_pid.values().all(|&n| n <= 50),
        "a worker served more than 50: {per_pid:?}"
    );
    assert!(per_pid.len() >= 6, "{per_pid:?}");
    herd.wait_for_event("recycling", &[], 5);
}

/// `reload_batch` replaces several slots at a time; the reload still
/// replaces every worker.
#[test]
fn reload_in_batches_replaces_every_worker() {
    let herd = Herd::launch(
        "reload-batch",
        Some("reload_batch = 3\n"),
        4,
        &[],
        &[hello_worker()],
    );
    let before = herd.wait_all_ready(4);
    let output = herd.control(&["reload"]);
    assert_eq!(output.code, Some(0), "{}", output.stderr);
    assert!(
        output.stdout.starts_with("reloaded 4 worker(s)"),
        "{}",
        output.stdout
    );
    assert!(herd.wait_all_ready(4).is_disjoint(&before));
}
