//! The primary driven in-process, as mini-redis and pingora test theirs:
//! `herd::primary::bind` on port 0, then `herd::primary::run` on a thread
//! of the test, with signals injected as `SignalEvent`s. No signal is sent
//! to any process; what herd did is read from its status report, through
//! the control socket's client (not the `herd` CLI: the primary reaps
//! every child of the process it runs in, as the subreaper it is).

mod common;

use std::net::SocketAddr;

use herd::config::{ConfigSource, Overrides};
use herd::control::{self, ControlRequest};
use herd::primary::{self, Outcome, PrimaryError};
use herd::signals::SignalEvent;
use herd::status::{SlotState, StatusReport};
use tokio::sync::mpsc;

use common::*;

/// A primary running on a thread of this test.
struct InProcess {
    addr: SocketAddr,
    control: std::path::PathBuf,
    signals: mpsc::Sender<SignalEvent>,
    run: std::thread::JoinHandle<Result<Outcome, PrimaryError>>,
}

fn start(dir: &std::path::Path, workers: usize, extra: &str) -> InProcess {
    let config = write_config(
        dir,
        &format!(
            "listen = [\"127.0.0.1:0\"]\nworkers = {workers}\ncommand = [{:?}]\ncontrol = {:?}\nkill_mode = \"process-group\"\n{extra}",
            hello_worker(),
            dir.join("herd.sock"),
        ),
    );
    let source = ConfigSource {
        path: Some(config),
        overrides: Overrides::default(),
    };
    let settings = source.load().unwrap_or_else(|e| panic!("{e}"));
    let (signals, events) = mpsc::channel(8);
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let run = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async move {
            let bound = primary::bind(&settings)?;
            let _ = bound_tx.send(bound.listen_addrs()[0]);
            primary::run(bound, events, source, settings).await
        })
    });
    let addr = bound_rx
        .recv_timeout(DEADLINE)
        .expect("the primary bound its listener");
    InProcess {
        addr,
        control: dir.join("herd.sock"),
        signals,
        run,
    }
}

#[test]
fn injected_signals_scale_reload_and_stop_an_in_process_primary() {
    let dir = scratch_dir("in-process");
    let herd = start(&dir, 2, "");
    let ready =
        |count: usize| herd.wait_for(&format!("{count} ready workers"), |s| all_serving(s, count));
    let before = pids(&ready(2));
    assert!(get(herd.addr).is_ok_and(|answer| before.contains(&answer.pid)));

    herd.signals.blocking_send(SignalEvent::AddWorker).unwrap();
    ready(3);
    herd.signals
        .blocking_send(SignalEvent::RemoveWorker)
        .unwrap();
    ready(2);

    // A reload replaces every worker, one batch at a time.
    let kept = pids(&ready(2));
    herd.signals.blocking_send(SignalEvent::Reload).unwrap();
    let after = herd.wait_for("every worker replaced", |s| {
        all_serving(s, 2) && pids(s).iter().all(|pid| !kept.contains(pid))
    });
    assert_eq!(pids(&after).len(), 2);
    assert!(get(herd.addr).is_ok());

    herd.signals.blocking_send(SignalEvent::Terminate).unwrap();
    wait_until("the primary to stop", || {
        herd.run.is_finished().then_some(())
    });
    let outcome = herd.run.join().expect("the primary's thread");
    assert_eq!(outcome.unwrap(), Outcome::Clean);
    // Its listener is closed with it.
    assert!(std::net::TcpStream::connect(herd.addr).is_err());
}

/// A second SIGINT while stopping kills the workers that are still draining:
/// the run ends Forced, not Clean.
#[test]
fn a_second_injected_interrupt_forces_the_stop() {
    let dir = scratch_dir("in-process-interrupt");
    // Without the second SIGINT the worker would get a minute to drain.
    let herd = start(&dir, 1, "shutdown_timeout = \"60s\"\n");
    herd.wait_for("1 ready worker", |s| all_serving(s, 1));
    // A connection held open keeps the worker draining.
    let held = send_request_without_reading(herd.addr);
    herd.signals.blocking_send(SignalEvent::Interrupt).unwrap();
    herd.wait_for("stopping", |s| s.phase == "stopping");
    herd.signals.blocking_send(SignalEvent::Interrupt).unwrap();
    wait_until("the primary to stop", || {
        herd.run.is_finished().then_some(())
    });
    let outcome = herd.run.join().expect("the primary's thread");
    drop(held);
    assert_eq!(outcome.unwrap(), Outcome::Forced);
}

/// Opens a connection and sends half a request, so the worker holds it open.
fn send_request_without_reading(addr: SocketAddr) -> std::net::TcpStream {
    use std::io::Write;
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    stream
}

impl InProcess {
    /// Polls the status report until `accept` likes it.
    fn wait_for(&self, what: &str, accept: impl Fn(&StatusReport) -> bool) -> StatusReport {
        wait_until(what, || {
            let status = control::request(&self.control, &ControlRequest::Status)
                .ok()?
                .status?;
            accept(&status).then_some(status)
        })
    }
}

fn all_serving(status: &StatusReport, count: usize) -> bool {
    status.workers.len() == count && status.workers.iter().all(|w| w.state == SlotState::Ready)
}

fn pids(status: &StatusReport) -> Vec<u32> {
    status.workers.iter().filter_map(|w| w.pid).collect()
}
