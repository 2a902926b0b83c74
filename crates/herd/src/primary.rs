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
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use tokio::signal::unix::{signal, SignalKind};

mod answers;
mod main_loop;
mod stopping;
mod taking_over;
mod upgrading;

use main_loop::{drive, Parts, Start};
pub use taking_over::run_carried;

use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::activation::{SocketPlan, WorkerSockets};
use crate::cgroup::{CgroupError, CgroupTree};
use crate::config::{ConfigSource, HandoffSettings, Settings, WorkerProtocol, MAX_WORKERS};
use crate::control::{self, ControlRequest, ControlServer, PendingRequest, Response};
use crate::counters::Counters;
use crate::endpoint::{self, MetricsBindError};
use crate::fd_budget::{FdLimit, Plan};
use crate::handoff::{self, Command, Controller};
use crate::listener::{self, BindOptions, BoundListener, ListenError};
use crate::metrics::Metrics;
use crate::process;
use crate::signals::{self, SignalEvent};
use crate::status::{self, Phase, StatusReport};
use crate::supervisor::Supervisor;
use crate::systemd::{self, ActivationError, Systemd};
use crate::upgrade;

/// Why herd could not run.
#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    Activation(#[from] ActivationError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error(transparent)]
    Metrics(#[from] MetricsBindError),
    #[error("cannot start the hand-off loop: {0}")]
    HandoffLoop(#[source] std::io::Error),
    #[error("{0}")]
    Probe(String),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("`kill_mode` = \"control-group\", but herd cannot give workers cgroups: {0}")]
    Cgroups(#[source] CgroupError),
    #[error("herd upgrade: {0}")]
    Upgrade(String),
}

impl PrimaryError {
    /// The process exit code for this error (documented in README.md).
    pub fn exit_code(&self) -> u8 {
        match self {
            PrimaryError::Listen(_)
            | PrimaryError::Activation(_)
            | PrimaryError::Control(_)
            | PrimaryError::Metrics(_) => 3,
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

/// Everything herd holds before its first worker starts: a busy port, a
/// control socket in use or a refused cgroup stops herd here, with
/// nothing started. Tests read the bound addresses from it before
/// [`run`].
pub struct Bound {
    /// The configured listeners, as bound (port 0 resolved).
    listen_addrs: Vec<SocketAddr>,
    /// The listeners the hand-off loop accepts from (none in the OS modes).
    listeners: Vec<BoundListener>,
    /// The sockets workers inherit in the OS modes.
    sockets: WorkerSockets,
    metrics: Option<tokio::net::TcpListener>,
    control: ControlServer,
    cgroups: Option<CgroupTree>,
    fd_limit: FdLimit,
}

impl Bound {
    /// The addresses herd listens on, in `listen` order.
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.listen_addrs
    }

    /// Where `/metrics` is served, if it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }
}

/// Prepares the process (subreaper, cgroups, open-file limit) and binds
/// the listeners, `/metrics` and the control socket. Call it inside a
/// tokio runtime.
pub fn bind(settings: &Settings) -> Result<Bound, PrimaryError> {
    // Orphans among the workers' descendants become herd's, not init's:
    // herd reaps them, and kills them when it stops.
    if let Err(e) = process::become_subreaper() {
        warn!(
            event = "subreaper_failed",
            "cannot become the subreaper of the workers' descendants: {e}"
        );
    }
    let cgroups = crate::cgroup::for_workers(settings.kill_mode).map_err(PrimaryError::Cgroups)?;
    start_log_files(settings);
    let fd_limit = FdLimit::raise();
    info!(
        soft = fd_limit.soft,
        hard = fd_limit.hard,
        worker_soft = fd_limit.original,
        event = "fd_limit",
        "open-file limit (RLIMIT_NOFILE): {} (workers get {})",
        fd_limit.soft,
        fd_limit.original
    );
    let need = Plan::of(settings, settings.workers).need();
    if need.total > fd_limit.soft {
        warn!(
            need = need.total,
            limit = fd_limit.soft,
            event = "fd_budget_exceeded",
            "this configuration may need {need}, over herd's open-file limit of {} (RLIMIT_NOFILE): lower those keys, or raise the limit (LimitNOFILE= under systemd, ulimit -n); past it, accepting pauses",
            fd_limit.soft
        );
    }
    let plan = SocketPlan::of(settings)
        .available(&settings.ready)
        .map_err(PrimaryError::Probe)?;
    let options = BindOptions {
        // Node's kernel rotation deals over a group herd's own socket is
        // in; hand-off threads accept each on a socket of the group.
        reuse_port: node_kernel_rotation(settings) || settings.handoff_threads > 1,
        ..BindOptions::PLAIN
    };
    // A socket unit's sockets (LISTEN_FDS) when systemd passed them.
    let own = systemd::own_sockets(settings, plan, node_kernel_rotation(settings));
    let listeners = match systemd::inherited_listeners(&settings.listen, own)? {
        Some(inherited) => inherited,
        None => listener::bind_all(&settings.listen, settings.backlog, options)?,
    };
    let listen_addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local).collect();
    for bound in &listeners {
        info!(
            listener = bound.index.get(),
            addr = %bound.local,
            event = "listening",
            "listening on {}",
            bound.local
        );
    }
    let (sockets, listeners) =
        WorkerSockets::new(plan, listeners, settings.backlog, settings.workers)?;
    let metrics = settings.metrics.map(endpoint::bind).transpose()?;
    let control = ControlServer::bind(&settings.control)?;
    info!(path = %settings.control.display(), event = "control_ready", "control socket ready");
    Ok(Bound {
        listen_addrs,
        listeners,
        sockets,
        metrics,
        control,
        cgroups,
        fd_limit,
    })
}

/// `herd run`: binds, forwards the process's signals, and runs until
/// stopped. `source` is re-read on every reload.
pub async fn run_with_os_signals(
    source: ConfigSource,
    settings: Settings,
) -> Result<Outcome, PrimaryError> {
    let bound = bind(&settings)?;
    let signals = signals::forward_os_signals().map_err(PrimaryError::Signals)?;
    run(bound, signals, source, settings).await
}

/// Runs herd on what [`bind`] bound until it is stopped: by a
/// [`SignalEvent`] from `signals`, or by `herd stop`. `source` is re-read
/// on every reload. Reaping needs SIGCHLD, which this installs itself.
pub async fn run(
    bound: Bound,
    signals: mpsc::Receiver<SignalEvent>,
    source: ConfigSource,
    settings: Settings,
) -> Result<Outcome, PrimaryError> {
    let counters = Arc::new(Counters::new(&bound.listen_addrs));
    let (events_tx, events) = mpsc::unbounded_channel();
    let (controller, handoff_thread) =
        spawn_handoff(bound.listeners, &settings, events_tx, counters.clone())?;
    let parts = Parts {
        listen_addrs: bound.listen_addrs,
        sockets: bound.sockets,
        metrics: bound.metrics,
        control: bound.control,
        cgroups: bound.cgroups,
        fd_limit: bound.fd_limit,
        counters,
        controller,
        handoff_thread,
        events,
        signals,
    };
    drive(parts, source, settings, Start::Fresh).await
}

/// Starts the per-slot log files (`log_dir`), before any worker prints.
fn start_log_files(settings: &Settings) {
    let Some(files) = settings.log_files.clone() else {
        return;
    };
    // `resolve` proved the directory writable; failing now is a race.
    let dir = files.dir.display().to_string();
    match crate::log_files::start(files) {
        Ok(()) => info!(
            dir,
            event = "log_files",
            "workers' lines also go to log files in {dir}"
        ),
        Err(e) => error!(
            dir,
            event = "log_files_failed",
            "cannot write log files in {dir}: {e}"
        ),
    }
}

/// The `starting_workers` line: how many, in which mode, of what.
fn log_starting(settings: &Settings) {
    info!(
        workers = settings.workers,
        mode = settings.mode.name(),
        program = %settings.program.display(),
        event = "starting_workers",
        "starting workers"
    );
}

/// Starts the hand-off loop's thread with herd's listeners (none in the
/// OS modes and kernel rotation: it then only keeps the worker channels).
fn spawn_handoff(
    listeners: Vec<BoundListener>,
    settings: &Settings,
    events: mpsc::UnboundedSender<handoff::Event>,
    counters: Arc<Counters>,
) -> Result<(Controller, std::thread::JoinHandle<()>), PrimaryError> {
    // The hand-off thread times each hand-off only when someone can read it.
    let measure_latency = settings.metrics.is_some();
    let limits = HandoffSettings {
        // The hand-off loop's own kernel rotation is for Node workers; the
        // others' is their per-slot sockets (`WorkerSockets`).
        kernel_rotation: node_kernel_rotation(settings),
        ..settings.handoff
    };
    handoff::spawn(
        listeners,
        settings.mode,
        limits,
        events,
        counters,
        measure_latency,
        settings.backlog,
        settings.handoff_threads,
    )
    .map_err(PrimaryError::HandoffLoop)
}

/// Every 100 ms (`stall::WATCH_INTERVAL`): the per-slot sockets' queues are
/// sampled. A late tick is delayed, not repeated in a burst.
fn socket_watch() -> tokio::time::Interval {
    let mut watch = tokio::time::interval(crate::stall::WATCH_INTERVAL);
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    watch
}

/// Round-robin over Node workers dealt by the kernel, in the hand-off
/// loop (Node workers are sent their slot sockets over the cluster channel).
fn node_kernel_rotation(settings: &Settings) -> bool {
    settings.handoff.kernel_rotation && settings.protocol == WorkerProtocol::NodeCluster
}

/// Serves `/metrics` if it was bound; scrapes arrive on the returned
/// channel, to be answered by the main thread.
fn serve_metrics(
    listener: Option<tokio::net::TcpListener>,
) -> mpsc::UnboundedReceiver<endpoint::Asked> {
    let (scrapes_tx, scrapes) = mpsc::unbounded_channel();
    if let Some(listener) = listener {
        if let Ok(addr) = listener.local_addr() {
            info!(addr = %addr, event = "metrics_listening", "metrics on http://{addr}/metrics");
        }
        tokio::spawn(endpoint::serve(listener, scrapes_tx));
    }
    scrapes
}

/// The main thread's state while herd runs: every decision about workers
/// is taken here, one event at a time.
struct Primary {
    supervisor: Supervisor,
    counters: Arc<Counters>,
    metrics: Arc<Metrics>,
    /// Where the config is re-read from on reload.
    source: ConfigSource,
    started: Instant,
    /// `herd stop` clients waiting for the outcome.
    stop_waiters: Vec<oneshot::Sender<Response>>,
    /// A stop waiting out `shutdown_delay`: when it begins, and why.
    stop_at: Option<(Instant, &'static str)>,
    /// The hand-off loop, for `/livez` to ask whether it answers.
    handoff: Controller,
    /// What herd owes its service manager (`NOTIFY_SOCKET`).
    systemd: Systemd,
    /// `herd upgrade`: what it needs, and one under way.
    upgrading: upgrading::Upgrading,
}

impl Primary {
    fn stopping(&self) -> bool {
        self.supervisor.phase() == Phase::Stopping
    }

    fn on_request(&mut self, pending: PendingRequest) {
        let PendingRequest { request, reply } = pending;
        match request {
            ControlRequest::Status => {
                self.handoff.tally(handoff::TALLY_WAIT);
                let report = status_report(
                    &self.supervisor,
                    &self.counters,
                    self.started,
                    &self.upgrading.record,
                );
                let _ = reply.send(Response {
                    ok: true,
                    message: String::new(),
                    status: Some(report),
                });
            }
            ControlRequest::Reload => start_reload(self, reply),
            ControlRequest::Scale { workers } => {
                let _ = reply.send(if self.stopping() {
                    Response::failed("herd is stopping")
                } else if !(1..=MAX_WORKERS).contains(&workers) {
                    Response::failed(format!(
                        "cannot scale to {workers} workers: must be between 1 and {MAX_WORKERS}"
                    ))
                } else {
                    match self.supervisor.scale(workers) {
                        Ok(done) => Response::ok(done),
                        Err(refused) => Response::failed(refused),
                    }
                });
            }
            ControlRequest::Stop => {
                self.stop_after_delay("herd stop");
                self.stop_waiters.push(reply);
            }
            ControlRequest::Upgrade => self.start_upgrade("herd upgrade", Some(reply)),
        }
    }

    /// After the last worker is gone: the tally, and the answer to every
    /// `herd stop` that waited for it.
    fn finish(mut self) -> Outcome {
        self.supervisor.sweep();
        // The last of what the kernel dealt, for the closing tally.
        self.supervisor.watch_sockets(&self.counters);
        let forced = self.supervisor.forced();
        let outcome = if forced {
            Outcome::Forced
        } else {
            Outcome::Clean
        };
        log_tally(&self.counters, forced);
        for waiter in self.stop_waiters {
            let _ = waiter.send(match outcome {
                Outcome::Clean => Response::ok("stopped: every worker finished in time"),
                Outcome::Forced => Response::failed("stopped, but some workers had to be killed"),
            });
        }
        outcome
    }
}

/// The closing line: what herd did over its whole run.
fn log_tally(counters: &Counters, forced: bool) {
    fn sum<'a>(values: impl IntoIterator<Item = &'a std::sync::atomic::AtomicU64>) -> u64 {
        values.into_iter().map(|c| c.load(Relaxed)).sum()
    }
    info!(
        accepted = sum(&counters.accepted),
        handed_off = sum(&counters.handed_off),
        requeued = counters.requeued_worker_gone.load(Relaxed)
            + counters.requeued_refused.load(Relaxed)
            + counters.requeued_slot_queue.load(Relaxed)
            + counters.requeued_hung.load(Relaxed),
        dropped_queue_full = counters.dropped_queue_full.load(Relaxed),
        dropped_queue_timeout = counters.dropped_queue_timeout.load(Relaxed),
        accept_errors = sum(&counters.accept_errors),
        event = "stopped",
        "stopped{}",
        if forced {
            " (some workers were killed)"
        } else {
            ""
        }
    );
}

/// Re-reads the config and starts a rolling reload; an invalid config is
/// refused and the running one kept.
fn start_reload(primary: &mut Primary, reply: oneshot::Sender<Response>) {
    let notifier = primary.systemd.reload_started();
    let settings = match primary.source.load() {
        Ok(settings) => settings,
        Err(e) => {
            primary
                .metrics
                .reload_finished(false, std::time::Duration::ZERO);
            let message = format!("reload refused, keeping the running config: {e}");
            error!(event = "reload_refused", "{message}");
            systemd::reload_finished(notifier, Err(&message));
            let _ = reply.send(Response::failed(message));
            return;
        }
    };
    let (done, outcome) = oneshot::channel();
    primary.supervisor.reload(settings, done);
    tokio::spawn(async move {
        let response = match outcome.await {
            Ok(Ok(message)) => Response::ok(message),
            Ok(Err(message)) => Response::failed(message),
            Err(_) => Response::failed("reload abandoned"),
        };
        let told = response.message.as_str();
        systemd::reload_finished(notifier, if response.ok { Ok(told) } else { Err(told) });
        let _ = reply.send(response);
    });
}

fn status_report(
    supervisor: &Supervisor,
    counters: &Counters,
    started: Instant,
    upgrades: &status::UpgradeRecord,
) -> StatusReport {
    let settings = supervisor.settings();
    let workers = supervisor.status(|slot| counters.handed_off[slot].load(Relaxed));
    let handed: Vec<u64> = workers.iter().map(|w| w.handed_off).collect();
    StatusReport {
        fairness: status::fairness(&handed),
        kernel_dealt: counters.kernel_dealt.load(Relaxed),
        handoff_threads: counters.handoff_threads.load(Relaxed),
        upgrades: upgrades.clone(),
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
