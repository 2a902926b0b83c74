//! Worker processes: carries out what the decision core decides.
//!
//! Owns the child processes, their cgroups and output, the settings of
//! every configuration version still in use, and the answers owed to
//! `herd reload` clients. Every decision (start, restart, replace, drain,
//! kill, stop) is [`crate::lifecycle`]'s: this module turns what it
//! observes (a READY from the hand-off loop, a `READY=1` on a worker's
//! NOTIFY_SOCKET, a reaped exit, a memory sample, a timer) into an [`Event`] for the core and carries out the
//! [`Action`]s that come back, in order, on the main thread.
//!
//! `record` holds what herd knows of each live worker process beside the
//! core's view; `start` starts one.
//!
//! The main thread is also the one that forks: `PR_SET_PDEATHSIG` is tied
//! to the forking thread, and the main thread lives exactly as long as herd.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

mod app_primary;
mod handover;
mod record;
mod start;
mod sweep;

pub use handover::CarriedSupervisor;
use record::Process;

use crate::activation::WorkerSockets;
use crate::cgroup::{CgroupTree, Leaf};
use crate::config::{Readiness, Settings};
use crate::counters::Counters;
use crate::fd_budget::FdLimit;
use crate::handoff::{self, Command, Controller, NewWorker};
use crate::ids::{SlotIx, WorkerId};
use crate::lifecycle::{self, Action, Event, Lifecycle, Policy, Version};
use crate::metrics::Metrics;
use crate::node_primary::supervise::AppPrimary;
use crate::notify::{Heard, Message, Note, NotifySocket};
use crate::probe::{self, Probing};
use crate::process::{self, Launch};
use crate::rate_limit::Occurrences;
use crate::status::{Phase, SlotStatus};
use crate::worker_output;

/// How long the last sweep at exit waits for leftover processes to die.
const SWEEP_WAIT: Duration = Duration::from_secs(2);

/// Exits reaped per call, so a flood of exiting orphans cannot hold the
/// main thread; the rest are reaped on the next SIGCHLD or monitor tick.
const REAP_BATCH: usize = 1024;

/// Spawns and tracks the worker processes.
pub struct Supervisor {
    core: Lifecycle,
    /// The settings of every version the core still refers to.
    versions: BTreeMap<Version, Arc<Settings>>,
    next_version: u32,
    handoff: Controller,
    /// The listening sockets workers inherit (OS-scheduled modes).
    sockets: WorkerSockets,
    metrics: Arc<Metrics>,
    processes: BTreeMap<WorkerId, Process>,
    by_pid: BTreeMap<u32, WorkerId>,
    /// CPU seconds used per slot, by every worker that held it.
    cpu_seconds: Vec<f64>,
    /// `herd reload` clients waiting for their answer, by ticket.
    reload_replies: BTreeMap<u64, oneshot::Sender<Result<String, String>>>,
    next_ticket: u64,
    /// A cgroup per worker (kill_mode control-group); `None`: process groups.
    cgroups: Option<CgroupTree>,
    /// Cgroups of exited workers, removed once empty.
    dead_leaves: Vec<Leaf>,
    /// herd's open-file limit: scaling past it is refused, and workers get
    /// the original soft limit back.
    fd_limit: FdLimit,
    /// Where the workers' notification sockets' readers send what they read.
    notes: mpsc::Sender<Note>,
    /// The configured listeners as bound (port 0 resolved), in `listen` order.
    served: Vec<SocketAddr>,
    /// A Node app's own primary (`node.primary = "run"`).
    app_primary: Option<AppPrimary>,
    /// Orphans reaped: processes a worker left that were re-parented to
    /// herd (its subreaper, or PID 1). Logged at the 1st, 2nd, 4th, ...
    orphans: Occurrences,
    /// Children herd started that are not workers (`herd upgrade`'s dry
    /// run): reaped without being logged as orphans.
    expected: std::collections::BTreeSet<u32>,
}

impl Supervisor {
    pub fn new(
        settings: Settings,
        handoff: Controller,
        sockets: WorkerSockets,
        metrics: Arc<Metrics>,
        cgroups: Option<CgroupTree>,
        fd_limit: FdLimit,
        notes: mpsc::Sender<Note>,
    ) -> Supervisor {
        let core = Lifecycle::new(Policy::of(&settings), settings.workers);
        Supervisor {
            app_primary: AppPrimary::of(&settings),
            orphans: Occurrences::default(),
            expected: Default::default(),
            cpu_seconds: vec![0.0; core.slot_count()],
            core,
            versions: BTreeMap::from([(Version(0), Arc::new(settings))]),
            next_version: 1,
            handoff,
            sockets,
            metrics,
            processes: BTreeMap::new(),
            by_pid: BTreeMap::new(),
            reload_replies: BTreeMap::new(),
            next_ticket: 0,
            cgroups,
            dead_leaves: Vec::new(),
            fd_limit,
            notes,
            served: Vec::new(),
        }
    }

    /// The listeners as bound, which a preloaded worker is told it serves.
    pub fn serving(mut self, served: Vec<SocketAddr>) -> Supervisor {
        self.served = served;
        self
    }

    /// `pid` is a child herd started for itself: reaped, not reported.
    pub fn expect_child(&mut self, pid: u32) {
        self.expected.insert(pid);
    }

    /// The listeners as bound, in `listen` order.
    pub fn served(&self) -> &[SocketAddr] {
        &self.served
    }

    /// herd's open-file limit.
    pub fn fd_limit(&self) -> FdLimit {
        self.fd_limit
    }

    /// Starts a worker in every slot.
    pub fn start_all(&mut self) {
        self.start_app_primary();
        self.handle(Event::Tick);
    }

    /// The running configuration.
    pub fn settings(&self) -> &Arc<Settings> {
        self.versions
            .get(&self.core.current())
            .expect("the current version has settings")
    }

    pub fn phase(&self) -> Phase {
        self.core.phase()
    }

    pub fn worker_count(&self) -> usize {
        self.core.slot_count()
    }

    /// herd is stopping and every worker process has exited.
    pub fn finished(&self) -> bool {
        self.core.finished() && !self.app_primary.as_ref().is_some_and(AppPrimary::running)
    }

    /// The stop had to SIGKILL a worker.
    pub fn forced(&self) -> bool {
        self.core.forced()
    }

    /// When [`Supervisor::tick`] is due next.
    pub fn next_deadline(&self) -> Option<Instant> {
        let primary = self
            .app_primary
            .as_ref()
            .and_then(AppPrimary::next_deadline);
        self.core.next_deadline().into_iter().chain(primary).min()
    }

    /// Whether workers have sockets of their own for [`Self::watch_sockets`].
    pub fn watches_sockets(&mut self) -> bool {
        self.sockets.per_slot().is_some()
    }

    /// Samples the per-slot sockets' queues (a stalled slot loses its
    /// turns; one stalled for `hang_timeout` is hung, killed and replaced)
    /// and counts what the kernel dealt to each slot.
    pub fn watch_sockets(&mut self, counters: &Counters) {
        // Workers that speak herd's channel report each connection (ACCEPTED).
        let reported = self.settings().ready == Readiness::Herd;
        let hang_timeout = self.settings().hang_timeout;
        let watched = self.sockets.watch(Instant::now(), hang_timeout);
        crate::slot_sockets::count(&watched, counters, reported);
        for worker in watched.hung {
            self.handle(Event::Hung { worker });
        }
    }

    /// Fires the timers that are due.
    pub fn tick(&mut self) {
        self.handle(Event::Tick);
        self.tick_app_primary();
    }

    /// What the hand-off loop observed.
    pub fn on_handoff(&mut self, event: handoff::Event) {
        if let handoff::Event::Serving { worker } = event {
            // Logged now, not when decided: from this line on the worker
            // gets connections (tests and operators rely on that order).
            if let Some(process) = self.processes.get(&worker) {
                let _span = lifecycle::slot_span(process.slot).entered();
                info!(
                    slot = process.slot.get(),
                    pid = process.pid,
                    event = "worker_ready",
                    "worker ready"
                );
            }
            return;
        }
        self.handle(match event {
            handoff::Event::Ready { worker } => Event::Ready { worker },
            handoff::Event::ChannelClosed { worker } => Event::ChannelClosed { worker },
            handoff::Event::RecycleDue { worker } => Event::RecycleDue { worker },
            handoff::Event::Hung { worker } => Event::Hung { worker },
            handoff::Event::Serving { .. } => return,
        });
    }

    /// What a worker's main process said on its NOTIFY_SOCKET.
    pub fn on_note(&mut self, note: Note) {
        let Some(process) = self.processes.get_mut(&note.worker) else {
            return;
        };
        match note.message {
            Message::Ready => self.handle(Event::Notified {
                worker: note.worker,
            }),
            Message::Stopping => {
                let _span = lifecycle::slot_span(process.slot).entered();
                info!(
                    slot = process.slot.get(),
                    pid = process.pid,
                    event = "worker_stopping",
                    "worker says it is stopping (STOPPING=1)"
                );
            }
            Message::Status(text) => process.heard.status = Some(text),
            Message::Watchdog => process.heard.ping(Instant::now()),
        }
    }

    /// Sets the number of worker slots; returns what changed. More slots
    /// than herd's fd limit can hold (each worker's channel, pipes and the
    /// connections it may have in flight) is refused with the numbers.
    pub fn scale(&mut self, workers: usize) -> Result<String, String> {
        let before = self.core.slot_count();
        if workers > before {
            self.fits(workers)?;
        }
        self.handle(Event::Scale { workers });
        Ok(format!("workers: {before} -> {}", self.core.slot_count()))
    }

    fn fits(&self, workers: usize) -> Result<(), String> {
        self.fd_limit
            .fits(self.settings(), workers)
            .map_err(|why| format!("cannot scale to {workers} workers: {why}"))
    }

    /// Starts a rolling reload to `settings`; the reply comes when it is
    /// done or has failed.
    pub fn reload(&mut self, settings: Settings, reply: oneshot::Sender<Result<String, String>>) {
        // Refused as a whole, so nothing of the new config is half applied.
        if let Some(message) = self.settings().reload_refusal(&settings) {
            warn!(event = "reload_refused", "{message}");
            let _ = reply.send(Err(message));
            return;
        }
        // The new limits (or count) must fit in herd's fds, as a scale must.
        let workers = settings.workers.max(self.core.slot_count());
        if let Err(why) = self.fd_limit.fits(&settings, workers) {
            self.metrics.reload_finished(false, Duration::ZERO);
            let message = format!("reload refused, keeping the running config: {why}");
            error!(event = "reload_refused", "{message}");
            let _ = reply.send(Err(message));
            return;
        }
        let version = Version(self.next_version);
        self.next_version += 1;
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        let policy = Policy::of(&settings);
        let workers = settings.workers;
        info!(program = %settings.program.display(), event = "reload_requested", "reloading");
        self.versions.insert(version, Arc::new(settings));
        self.reload_replies.insert(ticket, reply);
        self.handle(Event::Reload {
            ticket,
            version,
            policy,
            workers,
        });
    }

    /// Graceful stop: listeners close, every worker drains.
    pub fn stop(&mut self) {
        if let Some(primary) = self.app_primary.as_mut() {
            primary.stop();
        }
        self.handle(Event::Stop);
    }

    /// SIGKILL every worker now.
    pub fn kill_all(&mut self) {
        self.handle(Event::KillAll);
    }

    /// Reaps every child that exited. A worker's process group and cgroup
    /// are killed before its main process is reaped, so nothing it started
    /// outlives it.
    pub fn reap(&mut self) {
        for _ in 0..REAP_BATCH {
            let Some(pid) = process::next_exited() else {
                break;
            };
            if self.reaped_app_primary(pid) {
                continue;
            }
            let worker = self.by_pid.get(&pid).copied();
            if let Some(process) = worker.and_then(|id| self.processes.get(&id)) {
                process::signal_group(pid, Signal::SIGKILL);
                if let Some(leaf) = &process.leaf {
                    leaf.kill();
                }
            }
            let Some(status) = process::reap(pid) else {
                break;
            };
            let Some(id) = worker else {
                if !self.expected.remove(&pid) {
                    self.reaped_orphan(pid, status);
                }
                continue;
            };
            self.by_pid.remove(&pid);
            if let Some(process) = self.processes.remove(&id) {
                self.tell_app_primary_exit(process.slot, pid, status);
                self.dead_leaves.extend(process.leaf);
            }
            self.handle(Event::Exited { worker: id, status });
        }
        self.dead_leaves
            .retain(|leaf| !(leaf.is_empty() && leaf.remove().is_ok()));
        self.tick_app_primary();
    }

    /// A process that is not a worker exited: an orphan a worker left, which
    /// the kernel re-parented to herd. Reaped (so no zombie stays), and
    /// logged at the 1st, 2nd, 4th, ... so a worker that forks without end
    /// cannot flood the log.
    fn reaped_orphan(&mut self, pid: u32, status: std::process::ExitStatus) {
        match self.orphans.record() {
            Some(total) => info!(
                pid,
                total,
                status = %status,
                event = "orphan_reaped",
                "reaped an orphan a worker left behind ({status}; herd is its subreaper{})",
                if std::process::id() == 1 { " and PID 1" } else { "" }
            ),
            None => debug!(pid, "reaped an orphan a worker left behind"),
        }
    }

    /// Samples every worker's memory and CPU; the core replaces those over
    /// `max_memory`. Reaps too, in case a SIGCHLD was missed.
    pub fn monitor(&mut self) {
        self.reap();
        let mut samples = Vec::new();
        for (id, process) in &mut self.processes {
            let Some((rss, cpu)) = process.sample() else {
                continue;
            };
            if let Some(seconds) = self.cpu_seconds.get_mut(process.slot.get()) {
                *seconds += cpu;
            }
            samples.push((*id, rss));
        }
        if !samples.is_empty() {
            self.handle(Event::Memory { samples });
        }
        let now = Instant::now();
        let silent: Vec<(WorkerId, u32)> = (self.processes.iter_mut())
            .filter_map(|(id, p)| p.heard.watchdog_expired(now).then_some((*id, p.pid)))
            .collect();
        for (worker, pid) in silent {
            warn!(
                pid,
                event = "watchdog_expired",
                "no WATCHDOG=1 for hang_timeout"
            );
            self.handle(Event::Hung { worker });
        }
    }

    /// CPU seconds used per slot, by every worker that held it.
    pub fn cpu_seconds(&self) -> Vec<f64> {
        self.cpu_seconds.clone()
    }

    /// One row per slot for `herd status`.
    pub fn status(&self, handed_off: impl Fn(SlotIx) -> u64) -> Vec<SlotStatus> {
        self.core
            .slots()
            .into_iter()
            .map(|view| {
                let process = view.worker.and_then(|id| self.processes.get(&id));
                SlotStatus {
                    slot: view.slot.get(),
                    pid: process.map(|p| p.pid),
                    state: view.state,
                    uptime_secs: process.map(|p| p.started.elapsed().as_secs_f64()),
                    restarts: view.restarts,
                    handed_off: handed_off(view.slot),
                    rss_bytes: process.and_then(|p| p.last_sample.map(|s| s.rss)),
                    cpu_percent: process.and_then(|p| p.last_sample.map(|_| p.cpu_percent)),
                    notify_status: process.and_then(|p| p.heard.status.clone()),
                }
            })
            .collect()
    }

    /// Hands `event` to the core and carries out what follows, including
    /// the events that carrying it out produces (a spawn's outcome).
    fn handle(&mut self, event: Event) {
        let mut events = VecDeque::from([event]);
        while let Some(event) = events.pop_front() {
            for action in self.core.handle(Instant::now(), event) {
                events.extend(self.execute(action));
            }
        }
        let in_use = self.core.versions_in_use();
        self.versions.retain(|version, _| in_use.contains(version));
    }

    fn execute(&mut self, action: Action) -> Option<Event> {
        match action {
            Action::Spawn {
                worker,
                slot,
                version,
            } => {
                return Some(match self.start(worker, slot, version) {
                    Ok(pid) => Event::Started { worker, pid },
                    Err(error) => {
                        // It holds no socket: the next start takes the slot's.
                        self.sockets.gone(worker);
                        Event::StartFailed { worker, error }
                    }
                });
            }
            Action::Serve { worker } => {
                self.tell(Command::Serve { worker });
                if let Some(process) = self.processes.get(&worker) {
                    self.sockets.serve(process.slot, worker);
                }
            }
            Action::Drain { worker } => {
                self.tell(Command::Drain { worker });
                self.sockets.drain(worker);
            }
            Action::Forget { worker } => {
                self.tell(Command::Forget { worker });
                self.sockets.gone(worker);
            }
            Action::Signal { worker, signal } => {
                if let Some(process) = self.processes.get(&worker) {
                    process::signal_group(process.pid, signal);
                    if signal == Signal::SIGKILL {
                        if let Some(leaf) = &process.leaf {
                            leaf.kill();
                        }
                    }
                }
            }
            Action::SetSlots { count } => {
                self.tell(Command::SetSlots { count });
                self.sockets.remove_slots_from(count);
                self.cpu_seconds.resize(count, 0.0);
            }
            Action::StopAccepting => self.tell(Command::StopAccepting),
            Action::Restarted { slot, reason } => self.metrics.restart(slot, reason),
            Action::ReloadFinished {
                ticket,
                result,
                took,
            } => {
                if let Some(took) = took {
                    self.metrics.reload_finished(result.is_ok(), took);
                }
                // The reload is done and its version current: its `[handoff]`
                // limits apply from now on (a failed one keeps the old ones).
                if result.is_ok() {
                    self.tell(Command::SetLimits(self.settings().handoff));
                }
                if let Some(reply) = self.reload_replies.remove(&ticket) {
                    let _ = reply.send(result);
                }
            }
        }
        if self.cpu_seconds.len() < self.core.slot_count() {
            self.cpu_seconds.resize(self.core.slot_count(), 0.0);
        }
        None
    }

    fn tell(&self, command: Command) {
        // Fails only once the loop has ended, which happens after the last worker.
        let _ = self.handoff.send(command);
    }
}
