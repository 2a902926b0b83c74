//! Faults a production supervisor meets, each of which once left herd with
//! an empty slot, a crashed primary or stranded connections: a failed
//! replacement whose old worker dies meanwhile (reload, `max_memory`,
//! `max_connections_per_worker`), a scale-down racing a worker's READY, a
//! worker that exits leaving a helper on its channel, and a worker that hangs.

mod common;

use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::procs::process_running as alive;
use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;

fn fixture() -> String {
    format!(
        "{}/tests/fixtures/lifecycle_worker.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// A shell command that runs hello-worker with `$1` in its slot's first
/// generation, then one generation that never says READY, then plainly:
/// each start of the slot appends to `gen-<slot>` in herd's directory.
const GENERATIONS: &str = "f=gen-$HERD_WORKER_ID; echo >> $f; n=$(wc -l < $f); \
     case $n in 1) exec \"$0\" $1;; 2) exec \"$0\" --unready-slot $HERD_WORKER_ID;; *) exec \"$0\";; esac";

fn slot_row(status: &Value, slot: usize) -> Value {
    workers_of(status)
        .iter()
        .find(|w| w["slot"] == slot)
        .cloned()
        .unwrap_or(Value::Null)
}

/// Waits until slot `slot` is ready with a worker that is none of `gone`.
fn wait_refilled(herd: &Herd, slot: usize, gone: &[u32]) -> u32 {
    let status = wait_for_status(&herd.dir, "the slot refilled", |s| {
        let row = slot_row(s, slot);
        row["state"] == "ready"
            && row["pid"]
                .as_u64()
                .is_some_and(|pid| !gone.contains(&(pid as u32)))
    });
    slot_row(&status, slot)["pid"].as_u64().unwrap() as u32
}

/// A reload whose new worker never becomes ready, while the worker it was
/// to replace is SIGKILLed: the reload fails and says what is true (the
/// slot lost its worker and restarts), and the slot gets a worker again.
#[test]
fn a_failed_reload_whose_old_worker_died_meanwhile_refills_the_slot() {
    let dir = scratch_dir("reload-lost-old");
    let config = write_config(
        &dir,
        &format!("command = [{:?}]\nready_timeout = \"1s\"\n", hello_worker()),
    );
    let herd = Herd::start_in(
        &dir,
        &[
            "-c",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
        ],
    );
    let old = herd.wait_ready(1)[&0];
    std::fs::write(
        &config,
        format!(
            "command = [{:?}, \"--unready-slot\", \"0\"]\nready_timeout = \"1s\"\n",
            hello_worker()
        ),
    )
    .unwrap();
    herd.wait_for_event("control_ready", &[], 1);
    let reload = {
        let dir = dir.clone();
        std::thread::spawn(move || herd_cli(&dir, &["reload"]))
    };
    herd.wait_for_worker_output("never saying READY", 1);
    signal(old, Signal::SIGKILL);
    let output = reload.join().unwrap();
    assert_eq!(output.code, Some(1), "{output:?}");
    let message = &output.stderr;
    assert!(message.contains("reload failed"), "{message}");
    assert!(
        !message.contains("keep the old one") && !message.contains("keeps serving"),
        "the old worker is dead, yet: {message}"
    );
    assert!(message.contains("restart"), "{message}");
    let new = wait_refilled(&herd, 0, &[old]);
    assert_eq!(get(herd.addr()).unwrap().pid, new);
}

/// The same path through a `max_memory` replacement: the replacement never
/// becomes ready and the worker over the limit is SIGKILLed meanwhile.
#[test]
fn a_failed_memory_replacement_whose_old_worker_died_refills_the_slot() {
    let config = "max_memory = \"40MiB\"\nmonitor_interval = \"100ms\"\nready_timeout = \"1s\"\n";
    let herd = Herd::launch(
        "memory-lost-old",
        Some(config),
        1,
        &[],
        &["sh", "-c", GENERATIONS, hello_worker(), "--memory-mb 64"],
    );
    let fat = herd.wait_ready(1)[&0];
    herd.wait_for_event("memory_exceeded", &[("pid", json!(fat))], 1);
    herd.wait_for_worker_output("never saying READY", 1);
    signal(fat, Signal::SIGKILL);
    let new = wait_refilled(&herd, 0, &[fat]);
    assert_eq!(get(herd.addr()).unwrap().pid, new);
}

/// The same path through a `max_connections_per_worker` recycle.
#[test]
fn a_failed_recycle_whose_old_worker_died_refills_the_slot() {
    let config = "max_connections_per_worker = 5\nready_timeout = \"1s\"\n";
    let herd = Herd::launch(
        "recycle-lost-old",
        Some(config),
        1,
        &[],
        &["sh", "-c", GENERATIONS, hello_worker(), ""],
    );
    let first = herd.wait_ready(1)[&0];
    for _ in 0..5 {
        assert_eq!(get(herd.addr()).unwrap().pid, first);
    }
    herd.wait_for_event("recycling", &[("pid", json!(first))], 1);
    herd.wait_for_worker_output("never saying READY", 1);
    signal(first, Signal::SIGKILL);
    let new = wait_refilled(&herd, 0, &[first]);
    assert_eq!(get(herd.addr()).unwrap().pid, new);
}

/// Scale down in the same instant the new worker says READY, with workers
/// that close their channel on DRAIN and keep finishing requests for 3 s:
/// herd never crashes, and the drained worker never serves again.
#[test]
fn scaling_down_as_a_worker_becomes_ready_never_crashes_herd() {
    let herd = Herd::launch(
        "scale-race",
        None,
        1,
        &[],
        &["python3", &fixture(), "ready-on-usr1"],
    );
    let first = herd.wait_ready(1)[&0];
    herd.wait_for_event("control_ready", &[], 1);
    const ROUNDS: usize = 24;
    for round in 1..=ROUNDS {
        herd_ok(&herd.dir, &["scale", "2"]);
        let line = herd
            .wait_for_worker_output("waiting for SIGUSR1", round)
            .pop()
            .unwrap();
        let newcomer = field(&line, "pid") as u32;
        // Freeze herd and let READY reach its channel; thaw it and scale
        // down at once (SIGCONT would discard a stop signal such as SIGTTOU
        // sent while frozen). The hand-off thread then sees READY in the
        // instant the supervisor sees the scale-down; the spin after the
        // thaw sweeps the gap across rounds.
        signal(herd.pid(), Signal::SIGSTOP);
        signal(newcomer, Signal::SIGUSR1);
        let marker = herd.dir.join(format!("ready-sent-{newcomer}"));
        wait_until("the newcomer to send READY", || {
            marker.exists().then_some(())
        });
        signal(herd.pid(), Signal::SIGCONT);
        let spin = Duration::from_micros(((round % 6) * 20) as u64);
        let thawed = Instant::now();
        while thawed.elapsed() < spin {
            std::hint::spin_loop();
        }
        signal(herd.pid(), Signal::SIGTTOU);
        let status = wait_for_status(&herd.dir, "one slot again", |s| all_ready(s, 1));
        assert_eq!(pids_of(&status)[&0], first, "round {round}");
    }
    // The drained workers finish and exit; herd outlives every one of them.
    wait_until("the drained workers to exit", || {
        let draining = herd.wait_for_worker_output("draining pid=", 1);
        draining
            .iter()
            .all(|l| !alive(field(l, "pid") as u32))
            .then_some(())
    });
    assert!(!herd.log_text().contains("panicked"), "{}", herd.log_text());
    let status = herd.status();
    assert!(all_ready(&status, 1), "{status:#}");
    for _ in 0..10 {
        assert_eq!(get(herd.addr()).unwrap().pid, first);
    }
}

/// Sends `count` connections at once and reads each answer on its own
/// thread; each yields the pid that answered ("Handled by worker PID", as
/// hello-worker, the Python worker and the seed Node app all say).
fn fire(addr: SocketAddr, count: usize) -> Vec<JoinHandle<Result<u32, String>>> {
    let streams: Vec<_> = (0..count).map(|_| send_request(addr).unwrap()).collect();
    streams
        .into_iter()
        .map(|mut stream| {
            std::thread::spawn(move || {
                use std::io::Read;
                stream.set_read_timeout(Some(DEADLINE)).unwrap();
                let mut response = String::new();
                stream
                    .read_to_string(&mut response)
                    .map_err(|e| format!("read: {e}"))?;
                responses::parse(response.as_bytes())
                    .ok()
                    .filter(|r| (r.version, r.status) == (1, 200))
                    .and_then(|r| {
                        let pid = r.body.trim().strip_prefix("Handled by worker ")?;
                        pid.parse().ok()
                    })
                    .ok_or_else(|| format!("unexpected response {response:?}"))
            })
        })
        .collect()
}

/// A worker takes three hand-offs without acknowledging them, forks a helper
/// that keeps its channel open for 60 s (out of its process group), and
/// exits: the three connections go to the other worker at once, not when
/// the helper lets the channel go.
fn connections_follow_the_process(name: &str, config: Option<&str>) {
    let script = format!(
        "if [ -e first-done ]; then exec python3 {hello:?}; fi; \
         [ \"$HERD_WORKER_ID\" = 0 ] && touch first-done; exec python3 {fixture:?} hold-and-exit",
        hello = python_worker(),
        fixture = fixture(),
    );
    let config = format!("{}[handoff]\nack_timeout = \"60s\"\n", config.unwrap_or(""));
    let herd = Herd::launch(name, Some(&config), 2, &[], &["sh", "-c", &script]);
    let ready = herd.wait_all_ready(2);
    let status = herd.status();
    let holder = pids_of(&status)[&0];
    let addr = herd.addr();
    let answers: Vec<u32> = fire(addr, 6)
        .into_iter()
        .map(|h| h.join().unwrap().expect("every connection is answered"))
        .collect();
    assert!(answers.iter().all(|&pid| pid != holder), "{answers:?}");
    assert!(ready.contains(&holder));
    herd.wait_for_worker_output("exiting with 3 unacknowledged hand-offs", 1);
    herd.wait_for_event(
        "requeued",
        &[("pid", json!(holder)), ("requeued", json!(3))],
        1,
    );
}

#[test]
fn connections_sent_to_a_worker_whose_process_exited_go_to_another_at_once() {
    connections_follow_the_process("follow-process", None);
}

/// The same with cgroups out of the picture: the helper survives its
/// worker's exit, so only herd's own bookkeeping (the worker's process
/// exited) can send the connections on.
#[test]
fn connections_follow_the_process_even_when_a_helper_survives() {
    connections_follow_the_process("follow-process-pg", Some("kill_mode = \"process-group\"\n"));
}

/// A worker that stops acknowledging (SIGSTOP) for longer than
/// `hang_timeout` is hung: its connections go to the other worker, it is
/// killed and replaced, `herd status` shows `hung` meanwhile, and
/// `herd_worker_restarts_total{reason="hung"}` counts it.
fn a_hung_worker_is_replaced(name: &str, extra_config: &str, flags: &[&str], command: &[&str]) {
    let config = format!("hang_timeout = \"1s\"\n{extra_config}");
    let mut all_flags = vec!["--metrics", "127.0.0.1:0"];
    all_flags.extend_from_slice(flags);
    let herd = Herd::launch(name, Some(&config), 2, &all_flags, command);
    herd.wait_all_ready(2);
    let status = herd.status();
    let victim = pids_of(&status)[&0];
    signal(victim, Signal::SIGSTOP);
    let addr = herd.addr();
    let handles = fire(addr, 8);
    let hung = wait_for_status(&herd.dir, "slot 0 hung", |s| {
        slot_row(s, 0)["state"] == "hung"
    });
    assert_ne!(slot_row(&hung, 1)["state"], "hung");
    for handle in handles {
        let pid = handle
            .join()
            .unwrap()
            .expect("every connection is answered");
        assert_ne!(pid, victim);
    }
    wait_refilled(&herd, 0, &[victim]);
    wait_until("the hung worker to be gone", || {
        (!alive(victim)).then_some(())
    });
    let metrics = http(metrics_addr(&herd), "GET", "/metrics").2;
    assert_eq!(
        sample(
            &metrics,
            "herd_worker_restarts_total{reason=\"hung\",slot=\"0\"}"
        ),
        1.0
    );
    let victim_fields = [("slot", json!(0)), ("pid", json!(victim))];
    herd.wait_for_event("worker_hung", &victim_fields, 1);
    herd.wait_for_event("hung_worker_killed", &victim_fields, 1);
}

/// The slow second start keeps the slot `hung` long enough to be seen.
fn slow_second_start(command: &str) -> String {
    format!("f=gen-$HERD_WORKER_ID; echo >> $f; [ $(wc -l < $f) -gt 1 ] && sleep 2; exec {command}")
}

#[test]
fn a_hung_herd_worker_is_killed_and_replaced() {
    let script = slow_second_start(&format!("{:?}", hello_worker()));
    a_hung_worker_is_replaced("hung-herd", "", &[], &["sh", "-c", &script]);
}

#[test]
fn a_hung_node_worker_is_killed_and_replaced() {
    let app = format!(
        "{}/workers/node/cluster-server.js",
        env!("CARGO_MANIFEST_DIR")
    );
    let script = slow_second_start(&format!("node {app:?}"));
    a_hung_worker_is_replaced(
        "hung-node",
        "protocol = \"node-cluster\"\n",
        &["--rotation", "handoff"],
        &["sh", "-c", &script],
    );
}
