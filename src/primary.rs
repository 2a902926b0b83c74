//! The primary process: binds, starts the hand-off loop and the workers, and
//! runs until told to stop.
//!
//! Owns herd's own lifecycle (docs/lifecycle.md) and the wiring between the
//! parts: listeners are bound first (a busy port stops herd before any worker
//! exists), then the control socket, then the hand-off thread, then the
//! supervisor fills the worker slots. The main thread's tokio runtime then
//! multiplexes supervisor notices, hand-off events, signals and control
//! requests, so every decision about workers is taken in one place.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::activation::WorkerSockets;
use crate::config::{ConfigSource, Settings, WorkerProtocol, MAX_WORKERS};
use crate::control::{self, ControlServer, Incoming, Request, Response, StatusReport};
use crate::handoff::{self, Command, Counters, Event};
use crate::listener::{self, ListenError};
use crate::metrics::{self, Metrics, MetricsBindError};
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
        })
    }
}

/// A stop in progress.
struct Stopping {
    deadline: tokio::time::Instant,
    /// Workers were SIGKILLed rather than all exiting in time.
    forced: bool,
    /// `herd stop` clients waiting for the outcome.
    waiters: Vec<oneshot::Sender<Response>>,
}

/// Runs herd until it is stopped. `source` is re-read on every reload.
pub async fn run(source: ConfigSource, settings: Settings) -> Result<Outcome, PrimaryError> {
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
    let (mut supervisor, mut notices) =
        Supervisor::new(settings, controller.clone(), sockets, metrics.clone());
    supervisor.start_all();
    let (requests_tx, mut requests) = mpsc::unbounded_channel::<Incoming>();
    let mut stopping: Option<Stopping> = None;

    loop {
        if stopping.is_some() && supervisor.live() == 0 {
            break;
        }
        let stop_deadline = stopping.as_ref().map(|s| s.deadline);
        tokio::select! {
            Some(notice) = notices.recv() => supervisor.on_notice(notice),
            Some(event) = events.recv() => match event {
                Event::WorkerReady { slot, uid, pid, announced, replaced } => supervisor.on_ready(slot, uid, pid, announced, replaced),
                Event::ChannelClosed { uid, .. } => supervisor.on_channel_closed(uid),
                Event::RecycleDue { slot, uid } => supervisor.on_recycle_due(slot, uid),
            },
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
                        let _ = reply.send(if stopping.is_some() {
                            Response::failed("herd is stopping")
                        } else if !(1..=MAX_WORKERS).contains(&workers) {
                            Response::failed(format!("cannot scale to {workers} workers: must be between 1 and {MAX_WORKERS}"))
                        } else {
                            Response::ok(supervisor.scale(workers))
                        });
                    }
                    Request::Stop => {
                        begin_stop(&mut stopping, &mut supervisor, &controller, "herd stop");
                        if let Some(stop) = stopping.as_mut() {
                            stop.waiters.push(reply);
                        }
                    }
                }
            }
            _ = control.accept(&requests_tx) => {}
            _ = monitor.tick() => supervisor.monitor(),
            _ = signals.terminate.recv() => begin_stop(&mut stopping, &mut supervisor, &controller, "SIGTERM"),
            _ = signals.interrupt.recv() => {
                if let Some(stop) = stopping.as_mut() {
                    warn!("second SIGINT: killing the remaining workers now");
                    supervisor.kill_all();
                    stop.forced = true;
                } else {
                    begin_stop(&mut stopping, &mut supervisor, &controller, "SIGINT");
                }
            }
            _ = signals.quit.recv() => {
                begin_stop(&mut stopping, &mut supervisor, &controller, "SIGQUIT (fast stop)");
                warn!("SIGQUIT: killing workers without waiting");
                supervisor.kill_all();
                if let Some(stop) = stopping.as_mut() {
                    stop.forced = true;
                }
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
            _ = signals.add_worker.recv(), if stopping.is_none() => {
                let target = supervisor.worker_count() + 1;
                info!("SIGTTIN: {}", supervisor.scale(target));
            }
            _ = signals.remove_worker.recv(), if stopping.is_none() => {
                let target = supervisor.worker_count().saturating_sub(1).max(1);
                info!("SIGTTOU: {}", supervisor.scale(target));
            }
            _ = sleep_until_opt(stop_deadline) => {
                if let Some(stop) = stopping.as_mut() {
                    if !stop.forced {
                        warn!(left = supervisor.live(), "workers did not exit within shutdown_timeout; sending SIGKILL");
                        supervisor.kill_all();
                        stop.forced = true;
                    }
                    // Wait for the kills to be reaped without a deadline in the way.
                    stop.deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3600);
                }
            }
        }
    }

    let _ = controller.send(Command::Exit);
    if handoff_thread.join().is_err() {
        warn!("hand-off thread panicked");
    }
    let stop = stopping.expect("the loop only ends while stopping");
    let outcome = if stop.forced {
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
            + counters.requeued_slot_queue.load(Relaxed),
        dropped_queue_full = counters.dropped_queue_full.load(Relaxed),
        dropped_queue_timeout = counters.dropped_queue_timeout.load(Relaxed),
        accept_errors = counters
            .accept_errors
            .iter()
            .map(|c| c.load(Relaxed))
            .sum::<u64>(),
        "stopped{}",
        if stop.forced {
            " (some workers were killed)"
        } else {
            ""
        }
    );
    for waiter in stop.waiters {
        let _ = waiter.send(match outcome {
            Outcome::Clean => Response::ok("stopped: every worker finished in time"),
            Outcome::Forced => Response::failed("stopped, but some workers had to be killed"),
        });
    }
    control.close().await;
    Ok(outcome)
}

/// Stops accepting and asks every worker to drain; the main loop then waits
/// for them until `shutdown_timeout`.
fn begin_stop(
    stopping: &mut Option<Stopping>,
    supervisor: &mut Supervisor,
    controller: &handoff::Controller,
    why: &str,
) {
    if stopping.is_some() {
        return;
    }
    let grace = supervisor.settings().shutdown_timeout;
    info!("{why}: stopping (listeners closed, workers drain for up to {grace:?})");
    let _ = controller.send(Command::StopAccepting);
    supervisor.begin_stop();
    *stopping = Some(Stopping {
        deadline: tokio::time::Instant::now() + grace,
        forced: false,
        waiters: Vec::new(),
    });
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
        fairness: metrics::fairness(&handed),
        kernel_dealt: counters.kernel_dealt.load(Relaxed),
        pid: std::process::id(),
        phase: control::phase_name(supervisor.phase()),
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
