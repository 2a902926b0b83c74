//! The primary process: binds, starts the hand-off loop and the workers, and
//! runs until told to stop.
//!
//! Owns the wiring between the parts and herd's signals: herd makes itself
//! the subreaper of its workers' descendants and sets up their cgroups
//! (killing what a SIGKILLed herd left there), then binds the listeners (a
//! busy port stops herd before any worker exists), the control socket and
//! the hand-off thread, and the supervisor fills the worker slots. The main
//! thread's tokio runtime then multiplexes hand-off events, reaped exits,
//! timers, signals and control requests, so every decision about workers
//! is taken in one place, in order; whether herd is stopping is the
//! supervisor's to say ([`Phase`]).

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::activation::WorkerSockets;
use crate::cgroup::{CgroupError, CgroupTree};
use crate::config::{ConfigSource, KillMode, Settings, WorkerProtocol, MAX_WORKERS};
use crate::control::{self, ControlServer, Incoming, Request, Response};
use crate::counters::Counters;
use crate::fd_budget::{FdLimit, Plan};
use crate::handoff::{self, Command};
use crate::listener::{self, ListenError};
use crate::metrics::{self, Metrics, MetricsBindError};
use crate::process;
use crate::status::{self, Phase, StatusReport};
use crate::supervisor::Supervisor;

/// Why herd could not run.
#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error(transparent)]
    Metrics(#[from] MetricsBindError),
    #[error("cannot start the hand-off loop: {0}")]
    HandoffLoop(#[source] std::io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("`kill_mode` = \"control-group\", but herd cannot give workers cgroups: {0}")]
    Cgroups(#[source] CgroupError),
}

impl PrimaryError {
    /// The process exit code for this error (documented in README.md).
    pub fn exit_code(&self) -> u8 {
        match self {
            PrimaryError::Listen(_) | PrimaryError::Control(_) | PrimaryError::Metrics(_) => 3,
            _ => 1,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every worker exited within the shutdown timeout.
    Clean,
    /// Some workers had to be SIGKILLed (timeout, second SIGINT, SIGQUIT).
    Forced,
}

/// The signals herd acts on (README "Signals").
struct Signals {
    terminate: Signal,
    interrupt: Signal,
    quit: Signal,
    hangup: Signal,
    add_worker: Signal,
    remove_worker: Signal,
    /// A child exited: reap it.
    child: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
            hangup: signal(SignalKind::hangup())?,
            add_worker: signal(SignalKind::from_raw(nix::libc::SIGTTIN))?,
            remove_worker: signal(SignalKind::from_raw(nix::libc::SIGTTOU))?,
            child: signal(SignalKind::child())?,
        })
    }
}

/// Where a worker's processes are: a cgroup per worker where herd can,
/// else process groups. Killing what a SIGKILLed herd left in its cgroups
/// comes first, as it may still hold the port herd is about to bind.
fn worker_cgroups(mode: KillMode) -> Result<Option<CgroupTree>, PrimaryError> {
    if mode == KillMode::ProcessGroup {
        return Ok(None);
    }
    match CgroupTree::create() {
        Ok((tree, leftovers)) => {
            for left in leftovers {
                warn!(
                    killed = left.killed,
                    "killed the processes left behind by herd pid {} (it did not stop cleanly, e.g. it was SIGKILLed)",
                    left.herd_pid
                );
            }
            info!(path = %tree.path().display(), "a cgroup per worker");
            Ok(Some(tree))
        }
        Err(e) if mode == KillMode::ControlGroup => Err(PrimaryError::Cgroups(e)),
        Err(e) => {
            info!("workers' processes are their process groups (no cgroup: {e})");
            Ok(None)
        }
    }
}

/// Runs herd until it is stopped. `source` is re-read on every reload.
pub async fn run(source: ConfigSource, settings: Settings) -> Result<Outcome, PrimaryError> {
    // Orphans among the workers' descendants become herd's, not init's:
    // herd reaps them, and kills them when it stops.
    if let Err(e) = process::become_subreaper() {
        warn!("cannot become the subreaper of the workers' descendants: {e}");
    }
    let cgroups = worker_cgroups(settings.kill_mode)?;
    let fd_limit = FdLimit::raise();
    info!(
        soft = fd_limit.soft,
        hard = fd_limit.hard,
        "open-file limit (RLIMIT_NOFILE): {} (workers get {})",
        fd_limit.soft,
        fd_limit.original
    );
    let need = Plan::of(&settings, settings.workers).need();
    if need.total > fd_limit.soft {
        warn!(
            "this configuration may need {need}, over herd's open-file limit of {} (RLIMIT_NOFILE): lower those keys, or raise the limit (LimitNOFILE= under systemd, ulimit -n); past it, accepting pauses",
            fd_limit.soft
        );
    }
    let listeners = listener::bind_all(
        &settings.listen,
        settings.backlog,
        settings.handoff.kernel_rotation,
    )?;
    let listen_addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local).collect();
    for bound in &listeners {
        info!(listener = bound.index, "listening on {}", bound.local);
    }
    let (sockets, listeners) = match settings.protocol {
        // Node workers are sent their server sockets over the cluster channel.
        WorkerProtocol::NodeCluster => (WorkerSockets::HandOff, listeners),
        WorkerProtocol::Herd => {
            WorkerSockets::new(settings.mode, listeners, settings.backlog, settings.workers)?
        }
    };
    let metrics_listener = settings.metrics.map(metrics::bind).transpose()?;
    let mut control = ControlServer::bind(&settings.control)?;
    info!(path = %settings.control.display(), "control socket ready");
    let mut signals = Signals::install().map_err(PrimaryError::Signals)?;

    let counters = Arc::new(Counters::new(&listen_addrs));
    let metrics = Arc::new(Metrics::new(counters.clone()));
    let (scrapes_tx, mut scrapes) = mpsc::unbounded_channel::<metrics::Scrape>();
    if let Some(listener) = metrics_listener {
        if let Ok(addr) = listener.local_addr() {
            info!("metrics on http://{addr}/metrics");
        }
        tokio::spawn(metrics::serve(listener, scrapes_tx));
    }
    // The hand-off thread times each hand-off only when someone can read it.
    // In the OS modes it has no listeners: it only keeps the worker channels.
    let measure_latency = settings.metrics.is_some();
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (controller, handoff_thread) = handoff::spawn(
        listeners,
        settings.mode,
        settings.handoff,
        events_tx,
        counters.clone(),
        measure_latency,
        settings.backlog,
    )
    .map_err(PrimaryError::HandoffLoop)?;

    info!(
        workers = settings.workers,
        mode = settings.mode.name(),
        program = %settings.program.display(),
        "starting workers"
    );
    let started = Instant::now();
    let mut monitor = tokio::time::interval(settings.monitor_interval);
    let mut supervisor = Supervisor::new(
        settings,
        controller.clone(),
        sockets,
        metrics.clone(),
        cgroups,
        fd_limit,
    );
    supervisor.start_all();
    let (requests_tx, mut requests) = mpsc::unbounded_channel::<Incoming>();
    // `herd stop` clients waiting for the outcome.
    let mut stop_waiters: Vec<oneshot::Sender<Response>> = Vec::new();

    while !supervisor.finished() {
        let stopping = supervisor.phase() == Phase::Stopping;
        let due = supervisor
            .next_deadline()
            .map(tokio::time::Instant::from_std);
        tokio::select! {
            Some(event) = events.recv() => supervisor.on_handoff(event),
            _ = signals.child.recv() => supervisor.reap(),
            _ = sleep_until_opt(due) => supervisor.tick(),
            Some(scrape) = scrapes.recv() => {
                let slots = supervisor.status(|slot| counters.handed_off[slot].load(Relaxed));
                let _ = scrape.send(metrics.render(&counters, &slots, &supervisor.cpu_seconds()));
            }
            Some(incoming) = requests.recv() => {
                let Incoming { request, reply } = incoming;
                match request {
                    Request::Status => {
                        let report = status_report(&supervisor, &counters, started);
                        let _ = reply.send(Response { ok: true, message: String::new(), status: Some(report) });
                    }
                    Request::Reload => start_reload(&mut supervisor, &source, &metrics, reply),
                    Request::Scale { workers } => {
                        let _ = reply.send(if stopping {
                            Response::failed("herd is stopping")
                        } else if !(1..=MAX_WORKERS).contains(&workers) {
                            Response::failed(format!("cannot scale to {workers} workers: must be between 1 and {MAX_WORKERS}"))
                        } else {
                            match supervisor.scale(workers) {
                                Ok(done) => Response::ok(done),
                                Err(refused) => Response::failed(refused),
                            }
                        });
                    }
                    Request::Stop => {
                        begin_stop(&mut supervisor, "herd stop");
                        stop_waiters.push(reply);
                    }
                }
            }
            _ = control.accept(&requests_tx) => {}
            _ = monitor.tick() => supervisor.monitor(),
            _ = signals.terminate.recv() => begin_stop(&mut supervisor, "SIGTERM"),
            _ = signals.interrupt.recv() => {
                if stopping {
                    warn!("second SIGINT: killing the remaining workers now");
                    supervisor.kill_all();
                } else {
                    begin_stop(&mut supervisor, "SIGINT");
                }
            }
            _ = signals.quit.recv() => {
                begin_stop(&mut supervisor, "SIGQUIT (fast stop)");
                warn!("SIGQUIT: killing workers without waiting");
                supervisor.kill_all();
            }
            _ = signals.hangup.recv() => {
                let (reply, answer) = oneshot::channel();
                start_reload(&mut supervisor, &source, &metrics, reply);
                tokio::spawn(async move {
                    match answer.await {
                        Ok(response) if response.ok => info!("SIGHUP: {}", response.message),
                        Ok(response) => error!("SIGHUP: {}", response.message),
                        Err(_) => {}
                    }
                });
            }
            _ = signals.add_worker.recv(), if !stopping => {
                let target = supervisor.worker_count() + 1;
                match supervisor.scale(target) {
                    Ok(done) => info!("SIGTTIN: {done}"),
                    Err(refused) => warn!("SIGTTIN: {refused}"),
                }
            }
            _ = signals.remove_worker.recv(), if !stopping => {
                let target = supervisor.worker_count().saturating_sub(1).max(1);
                match supervisor.scale(target) {
                    Ok(done) => info!("SIGTTOU: {done}"),
                    Err(refused) => warn!("SIGTTOU: {refused}"),
                }
            }
        }
    }

    let _ = controller.send(Command::Exit);
    if handoff_thread.join().is_err() {
        warn!("hand-off thread panicked");
    }
    supervisor.sweep();
    let forced = supervisor.forced();
    let outcome = if forced {
        Outcome::Forced
    } else {
        Outcome::Clean
    };
    info!(
        accepted = counters
            .accepted
            .iter()
            .map(|c| c.load(Relaxed))
            .sum::<u64>(),
        handed_off = counters
            .handed_off
            .iter()
            .map(|c| c.load(Relaxed))
            .sum::<u64>(),
        requeued = counters.requeued_worker_gone.load(Relaxed)
            + counters.requeued_refused.load(Relaxed)
            + counters.requeued_slot_queue.load(Relaxed)
            + counters.requeued_hung.load(Relaxed),
        dropped_queue_full = counters.dropped_queue_full.load(Relaxed),
        dropped_queue_timeout = counters.dropped_queue_timeout.load(Relaxed),
        accept_errors = counters
            .accept_errors
            .iter()
            .map(|c| c.load(Relaxed))
            .sum::<u64>(),
        "stopped{}",
        if forced {
            " (some workers were killed)"
        } else {
            ""
        }
    );
    for waiter in stop_waiters {
        let _ = waiter.send(match outcome {
            Outcome::Clean => Response::ok("stopped: every worker finished in time"),
            Outcome::Forced => Response::failed("stopped, but some workers had to be killed"),
        });
    }
    control.close().await;
    Ok(outcome)
}

/// Stops accepting and asks every worker to drain; they get until
/// `shutdown_timeout`, then SIGKILL.
fn begin_stop(supervisor: &mut Supervisor, why: &str) {
    if supervisor.phase() == Phase::Stopping {
        return;
    }
    let grace = supervisor.settings().shutdown_timeout;
    info!("{why}: stopping (listeners closed, workers drain for up to {grace:?})");
    supervisor.stop();
}

/// Re-reads the config and starts a rolling reload; an invalid config is
/// refused and the running one kept.
fn start_reload(
    supervisor: &mut Supervisor,
    source: &ConfigSource,
    metrics: &Metrics,
    reply: oneshot::Sender<Response>,
) {
    let settings = match source.load() {
        Ok(settings) => settings,
        Err(e) => {
            metrics.reload_finished(false, std::time::Duration::ZERO);
            let message = format!("reload refused, keeping the running config: {e}");
            error!("{message}");
            let _ = reply.send(Response::failed(message));
            return;
        }
    };
    let (done, outcome) = oneshot::channel();
    supervisor.reload(settings, done);
    tokio::spawn(async move {
        let response = match outcome.await {
            Ok(Ok(message)) => Response::ok(message),
            Ok(Err(message)) => Response::failed(message),
            Err(_) => Response::failed("reload abandoned"),
        };
        let _ = reply.send(response);
    });
}

fn status_report(supervisor: &Supervisor, counters: &Counters, started: Instant) -> StatusReport {
    let settings = supervisor.settings();
    let workers = supervisor.status(|slot| counters.handed_off[slot].load(Relaxed));
    let handed: Vec<u64> = workers.iter().map(|w| w.handed_off).collect();
    StatusReport {
        fairness: status::fairness(&handed),
        kernel_dealt: counters.kernel_dealt.load(Relaxed),
        pid: std::process::id(),
        phase: status::phase_name(supervisor.phase()),
        uptime_secs: started.elapsed().as_secs_f64(),
        mode: settings.mode.name().to_string(),
        listen: counters
            .listen_addrs()
            .iter()
            .map(ToString::to_string)
            .collect(),
        workers,
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
