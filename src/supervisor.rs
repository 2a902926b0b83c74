//! Worker processes: spawning, readiness, restarts, replacement, scaling, stopping.
//!
//! Owns the child processes and the worker slots (`docs/lifecycle.md` draws
//! the states). Each slot `0..N` normally has one serving worker. A worker
//! that dies is logged with its exit code or signal and its slot refilled:
//! at once after a good run, otherwise after a backoff that doubles per
//! failed start; more than `restart.max_restarts` failed starts within
//! `restart.window` mark the slot crash-looping (it keeps retrying at the
//! capped delay). A worker is *replaced* (rolling reload, `max_memory`,
//! `max_connections_per_worker`) by starting the new one first; the hand-off
//! loop moves the slot to it when it is ready and sends the old one DRAIN.
//!
//! All of it is an event-driven state machine on the main thread's tokio
//! runtime: `PR_SET_PDEATHSIG` is tied to the thread that forks, and the main
//! thread lives exactly as long as herd. Timers are tasks that post a
//! [`Notice`] back, so every decision is taken in one place, in order.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::activation::{self, WorkerSockets};
use crate::config::{Settings, WorkerProtocol};
use crate::fdpass;
use crate::handoff::{Command, Controller};
use crate::metrics::{Metrics, RestartReason};
use crate::node_ipc;
use crate::procstat::{self, Sample};

/// How long a worker may outlive its channel before herd stops it. Its exit
/// normally follows the channel's close within milliseconds.
const CHANNEL_LOSS_GRACE: Duration = Duration::from_secs(1);

/// Sent to the supervisor by its own timers and tasks.
#[derive(Debug)]
pub enum Notice {
    /// A worker process ended.
    Exited {
        uid: u64,
        status: std::io::Result<ExitStatus>,
    },
    /// A slot's restart delay is over.
    RestartDue { slot: usize },
    /// `ready_timeout` after a worker's start.
    ReadyDeadline { uid: u64 },
    /// `ready_delay` after a worker's start: count it ready.
    ReadyDelay { uid: u64 },
    /// A worker's channel closed a while ago; is the process still there?
    ChannelLost { uid: u64 },
    /// A worker asked to stop had its time; SIGKILL it if it is still there.
    KillIfAlive { uid: u64 },
}

/// What a slot is doing, as `herd status` shows it (docs/lifecycle.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlotState {
    /// A worker was started and has not said READY yet.
    Starting,
    /// A ready worker holds the slot and gets connections.
    Ready,
    /// A ready worker serves while its replacement starts (reload, memory, recycle).
    Replacing,
    /// No worker: waiting out the restart delay.
    Waiting,
    /// Waiting, after more than `max_restarts` failed starts within `window`.
    CrashLooping,
}

/// What herd as a whole is doing (docs/lifecycle.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Running,
    Reloading,
    Stopping,
}

/// A worker process's part in its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Started, not ready: gets no connections.
    Starting,
    /// Ready: holds the slot.
    Serving,
    /// Sent DRAIN: finishing its connections before it exits.
    Draining,
}

/// Why a worker was started, which decides what its failure means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// To fill an empty slot.
    Fill,
    /// To take over from a serving worker (reload, memory, recycle).
    Replace,
}

#[derive(Debug)]
struct Process {
    uid: u64,
    pid: u32,
    slot: usize,
    role: Role,
    purpose: Purpose,
    started: Instant,
    /// Set when herd killed it for missing `ready_timeout`.
    ready_timed_out: bool,
    /// A replacement has been asked for (memory or recycle); ask only once.
    replacement_requested: bool,
    last_sample: Option<Sample>,
    cpu_percent: f64,
    /// It said READY on its channel, so it also understands DRAIN. A worker
    /// made ready by `ready_delay` may not (a plain socket-activated server
    /// in the OS modes): it is asked to stop with SIGTERM instead.
    speaks_protocol: bool,
}

#[derive(Debug)]
struct Slot {
    /// What this slot's workers run; a reload moves it to the new settings slot by slot.
    settings: Arc<Settings>,
    /// Failed starts in a row (exits before `min_uptime`); drives the backoff.
    failures: u32,
    /// When the recent failed starts happened, for crash-loop detection.
    recent_failures: VecDeque<Instant>,
    crash_looping: bool,
    restarts: u64,
    /// A restart timer is running.
    restart_pending: bool,
    /// CPU time used by every worker that held this slot.
    cpu_seconds: f64,
}

/// A rolling reload in progress.
struct Reload {
    settings: Arc<Settings>,
    /// Slots still to replace, in order.
    pending: VecDeque<usize>,
    /// Replacement workers started and not yet ready (uid → slot).
    starting: BTreeMap<u64, usize>,
    replaced: usize,
    started: Instant,
    reply: Option<oneshot::Sender<Result<String, String>>>,
}

/// One row of `herd status` (and of its JSON).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SlotStatus {
    pub slot: usize,
    pub pid: Option<u32>,
    pub state: SlotState,
    pub uptime_secs: Option<f64>,
    pub restarts: u64,
    pub handed_off: u64,
    pub rss_bytes: Option<u64>,
    pub cpu_percent: Option<f64>,
}

/// Spawns and tracks the worker processes.
pub struct Supervisor {
    /// The settings new slots and finished reloads use.
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
    handoff: Controller,
    /// The listening sockets workers inherit (OS-scheduled modes).
    sockets: WorkerSockets,
    slots: Vec<Slot>,
    processes: BTreeMap<u64, Process>,
    next_uid: u64,
    notices: mpsc::UnboundedSender<Notice>,
    reload: Option<Reload>,
    /// Set once herd is stopping: exits are no longer followed by restarts.
    stopping: bool,
    /// `workers` as last read from the config: a reload that leaves it
    /// unchanged keeps the count set at runtime (`herd scale`, SIGTTIN/SIGTTOU).
    configured_workers: usize,
}

impl Supervisor {
    pub fn new(
        settings: Settings,
        handoff: Controller,
        sockets: WorkerSockets,
        metrics: Arc<Metrics>,
    ) -> (Supervisor, mpsc::UnboundedReceiver<Notice>) {
        let (notices, inbox) = mpsc::unbounded_channel();
        let settings = Arc::new(settings);
        let mut supervisor = Supervisor {
            settings: settings.clone(),
            metrics,
            handoff,
            sockets,
            slots: Vec::new(),
            processes: BTreeMap::new(),
            next_uid: 0,
            notices,
            reload: None,
            stopping: false,
            configured_workers: settings.workers,
        };
        supervisor.add_slots(settings.workers, &settings);
        (supervisor, inbox)
    }

    /// Starts a worker in every slot.
    pub fn start_all(&mut self) {
        for slot in 0..self.slots.len() {
            self.spawn(slot, Purpose::Fill, self.slots[slot].settings.clone());
        }
    }

    pub fn settings(&self) -> &Arc<Settings> {
        &self.settings
    }

    pub fn phase(&self) -> Phase {
        if self.stopping {
            Phase::Stopping
        } else if self.reload.is_some() {
            Phase::Reloading
        } else {
            Phase::Running
        }
    }

    /// How many worker processes are alive (in any role).
    pub fn live(&self) -> usize {
        self.processes.len()
    }

    pub fn on_notice(&mut self, notice: Notice) {
        match notice {
            Notice::Exited { uid, status } => self.on_exit(uid, status),
            Notice::RestartDue { slot } => {
                let Some(entry) = self.slots.get_mut(slot) else {
                    return;
                };
                entry.restart_pending = false;
                let settings = entry.settings.clone();
                if !self.stopping && !self.slot_has_worker(slot) {
                    self.slots[slot].restarts += 1;
                    self.spawn(slot, Purpose::Fill, settings);
                }
            }
            Notice::ReadyDeadline { uid } => {
                let Some(process) = self.processes.get_mut(&uid) else {
                    return;
                };
                if process.role == Role::Starting {
                    process.ready_timed_out = true;
                    let timeout = self
                        .slots
                        .get(process.slot)
                        .map_or(Duration::ZERO, |s| s.settings.ready_timeout);
                    warn!(
                        slot = process.slot,
                        pid = process.pid,
                        "worker not ready within {timeout:?}; killing it"
                    );
                    kill_group(process.pid, Signal::SIGKILL);
                }
            }
            Notice::ReadyDelay { uid } => {
                if self
                    .processes
                    .get(&uid)
                    .is_some_and(|p| p.role == Role::Starting)
                {
                    let _ = self.handoff.send(Command::MarkReady { uid });
                }
            }
            Notice::ChannelLost { uid } => {
                let Some(process) = self.processes.get(&uid) else {
                    return;
                };
                if process.role != Role::Draining && !self.stopping {
                    warn!(
                        slot = process.slot,
                        pid = process.pid,
                        "worker closed its channel but is still running; stopping it"
                    );
                    kill_group(process.pid, Signal::SIGTERM);
                    let grace = self.slots[process.slot].settings.shutdown_timeout;
                    self.notify_after(grace, Notice::KillIfAlive { uid });
                }
            }
            Notice::KillIfAlive { uid } => {
                if let Some(process) = self.processes.get(&uid) {
                    warn!(
                        slot = process.slot,
                        pid = process.pid,
                        "worker did not stop in time; sending SIGKILL"
                    );
                    kill_group(process.pid, Signal::SIGKILL);
                }
            }
        }
    }

    /// The hand-off loop made `uid` the slot's worker; `replaced` was sent DRAIN.
    pub fn on_ready(
        &mut self,
        slot: usize,
        uid: u64,
        pid: u32,
        announced: bool,
        replaced: Option<u64>,
    ) {
        let _span = slot_span(slot).entered();
        if let Some(process) = self.processes.get_mut(&uid) {
            process.role = Role::Serving;
            process.speaks_protocol = announced;
            info!(slot, pid, "worker ready");
        }
        if let Some(old) = replaced {
            self.begin_draining(old);
        }
        let reload_step = self
            .reload
            .as_mut()
            .and_then(|reload| reload.starting.remove(&uid));
        if reload_step.is_some() {
            let reload = self.reload.as_mut().expect("reload in progress");
            reload.replaced += 1;
            self.slots[slot].settings = reload.settings.clone();
            self.advance_reload();
        }
    }

    /// The hand-off loop lost a worker's channel. Normally its exit follows
    /// at once; one still alive after [`CHANNEL_LOSS_GRACE`] is stopped.
    pub fn on_channel_closed(&mut self, uid: u64) {
        self.notify_after(CHANNEL_LOSS_GRACE, Notice::ChannelLost { uid });
    }

    /// The worker reached `max_connections_per_worker`: replace it gracefully.
    pub fn on_recycle_due(&mut self, slot: usize, uid: u64) {
        self.request_replacement(
            slot,
            uid,
            RestartReason::Recycle,
            "served its max_connections_per_worker",
        );
    }

    fn request_replacement(&mut self, slot: usize, uid: u64, reason: RestartReason, why: &str) {
        let _span = slot_span(slot).entered();
        if self.stopping || self.slot_is_replacing(slot) {
            return;
        }
        let Some(process) = self.processes.get_mut(&uid) else {
            return;
        };
        if process.role != Role::Serving || process.replacement_requested {
            return;
        }
        process.replacement_requested = true;
        info!(
            slot,
            pid = process.pid,
            "worker {why}; replacing it gracefully"
        );
        self.metrics.restart(slot, reason);
        self.spawn(slot, Purpose::Replace, self.slots[slot].settings.clone());
    }

    fn begin_draining(&mut self, uid: u64) {
        let Some(process) = self.processes.get_mut(&uid) else {
            return;
        };
        if process.role == Role::Draining {
            return;
        }
        let _span = slot_span(process.slot).entered();
        process.role = Role::Draining;
        info!(slot = process.slot, pid = process.pid, "worker draining");
        if !process.speaks_protocol {
            kill_group(process.pid, Signal::SIGTERM);
        }
        let grace = self.settings.shutdown_timeout;
        self.notify_after(grace, Notice::KillIfAlive { uid });
    }

    fn slot_has_worker(&self, slot: usize) -> bool {
        self.processes
            .values()
            .any(|p| p.slot == slot && p.role != Role::Draining)
    }

    fn slot_is_replacing(&self, slot: usize) -> bool {
        self.processes
            .values()
            .any(|p| p.slot == slot && p.role == Role::Starting && p.purpose == Purpose::Replace)
    }

    fn add_slots(&mut self, count: usize, settings: &Arc<Settings>) {
        for _ in 0..count {
            self.slots.push(Slot {
                settings: settings.clone(),
                failures: 0,
                recent_failures: VecDeque::new(),
                crash_looping: false,
                restarts: 0,
                restart_pending: false,
                cpu_seconds: 0.0,
            });
        }
    }

    /// Starts a worker for `slot` running `settings`; returns its uid, or
    /// `None` if it could not be started (a failed start, already handled).
    fn spawn(&mut self, slot: usize, purpose: Purpose, settings: Arc<Settings>) -> Option<u64> {
        let _span = slot_span(slot).entered();
        match self.try_spawn(slot, &settings) {
            Ok((uid, pid)) => {
                info!(slot, pid, "worker started");
                self.processes.insert(
                    uid,
                    Process {
                        uid,
                        pid,
                        slot,
                        role: Role::Starting,
                        purpose,
                        started: Instant::now(),
                        ready_timed_out: false,
                        replacement_requested: false,
                        last_sample: None,
                        cpu_percent: 0.0,
                        speaks_protocol: false,
                    },
                );
                self.notify_after(settings.ready_timeout, Notice::ReadyDeadline { uid });
                if let Some(delay) = settings.ready_delay {
                    self.notify_after(delay, Notice::ReadyDelay { uid });
                }
                Some(uid)
            }
            Err(e) => {
                error!(slot, program = %settings.program.display(), "cannot start worker: {e}");
                if purpose == Purpose::Replace {
                    self.replacement_failed(slot, format!("could not be started: {e}"));
                } else {
                    self.record_failed_start(slot);
                    self.schedule_restart(slot);
                }
                None
            }
        }
    }

    fn try_spawn(&mut self, slot: usize, settings: &Settings) -> std::io::Result<(u64, u32)> {
        let listen_fds = self.sockets.for_slot(slot).map_err(std::io::Error::other)?;
        let node = settings.protocol == WorkerProtocol::NodeCluster;
        let (primary_end, child_end) = if node {
            fdpass::stream_pair()?
        } else {
            fdpass::channel_pair()?
        };
        let channel_fd = activation::channel_fd(listen_fds.len()).to_string();
        let mut command = if listen_fds.is_empty() {
            tokio::process::Command::new(&settings.program)
        } else {
            // Through the shim, which sets LISTEN_PID to the worker's pid.
            let mut shim = tokio::process::Command::new("/proc/self/exe");
            shim.arg(activation::EXEC_WORKER_ARG)
                .arg(&settings.program)
                .envs(activation::listen_env(listen_fds.len()));
            shim
        };
        command
            .args(&settings.args)
            .envs(&settings.env)
            .env(crate::worker::CHANNEL_FD_ENV, &channel_fd)
            .env(crate::worker::WORKER_ID_ENV, slot.to_string())
            .env("HERD_WORKERS", self.slots.len().to_string())
            .env("HERD_PROTOCOL", crate::protocol::VERSION.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group: a terminal's Ctrl-C reaches herd only, and
            // herd decides how workers stop; signals go to the whole group,
            // so `sh -c` wrappers and their children stop too.
            .process_group(0);
        if node {
            // An unmodified Node cluster app: it finds herd as its cluster primary.
            command
                .env_remove(crate::worker::CHANNEL_FD_ENV)
                .env(node_ipc::NODE_UNIQUE_ID_ENV, slot.to_string())
                .env(node_ipc::NODE_CHANNEL_FD_ENV, &channel_fd)
                .env(node_ipc::NODE_CHANNEL_SERIALIZATION_MODE_ENV, "json");
        }
        if let Some(dir) = &settings.cwd {
            command.current_dir(dir);
        }
        if let Some((uid, gid)) = settings.run_as {
            command.uid(uid).gid(gid);
        }
        let mut inherited = listen_fds;
        inherited.push(child_end.as_raw_fd());
        fdpass::place_fds_and_die_with_parent(&mut command, inherited);
        let mut child = command.spawn()?;
        drop(child_end);
        let pid = child.id().unwrap_or_default();
        self.next_uid += 1;
        let uid = self.next_uid;
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward_lines(out, slot, false));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward_lines(err, slot, true));
        }
        let notices = self.notices.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = notices.send(Notice::Exited { uid, status });
        });
        let recycle_after = settings
            .max_connections_per_worker
            .map(|limit| limit + jitter(settings.max_connections_jitter, uid));
        self.handoff
            .send(Command::AddWorker {
                slot,
                uid,
                pid,
                channel: primary_end,
                node,
                recycle_after,
            })
            .map_err(|e| std::io::Error::other(format!("hand-off loop: {e}")))?;
        Ok((uid, pid))
    }

    fn on_exit(&mut self, uid: u64, status: std::io::Result<ExitStatus>) {
        let Some(process) = self.processes.remove(&uid) else {
            return;
        };
        let slot = process.slot;
        let _span = slot_span(slot).entered();
        let uptime = process.started.elapsed();
        let how = match &status {
            Ok(status) => describe_exit(*status),
            Err(e) => format!("ended with unknown status ({e})"),
        };
        let how = if process.ready_timed_out {
            format!("{how} (not ready within ready_timeout)")
        } else {
            how
        };
        let uptime_ms = uptime.as_millis() as u64;
        if self.stopping || process.role == Role::Draining || slot >= self.slots.len() {
            info!(slot, pid = process.pid, uptime_ms, "worker {how}");
            return;
        }
        warn!(slot, pid = process.pid, uptime_ms, "worker {how}");
        if process.role == Role::Starting && process.purpose == Purpose::Replace {
            // The slot's old worker still serves; this only stops a reload.
            return self.replacement_failed(slot, format!("worker {how}"));
        }
        let reason = match &status {
            _ if process.ready_timed_out => RestartReason::ReadyTimeout,
            Ok(status) if status.signal().is_some() => RestartReason::Signal,
            _ => RestartReason::Exit,
        };
        self.metrics.restart(slot, reason);
        if process.role == Role::Starting || uptime < self.slots[slot].settings.restart.min_uptime {
            self.record_failed_start(slot);
        } else {
            let entry = &mut self.slots[slot];
            entry.failures = 0;
            entry.crash_looping = false;
        }
        if !self.slot_has_worker(slot) {
            self.schedule_restart(slot);
        }
    }

    fn record_failed_start(&mut self, slot: usize) {
        let _span = slot_span(slot).entered();
        let entry = &mut self.slots[slot];
        let restart = entry.settings.restart;
        entry.failures += 1;
        let now = Instant::now();
        entry.recent_failures.push_back(now);
        while entry
            .recent_failures
            .front()
            .is_some_and(|at| now.duration_since(*at) > restart.window)
        {
            entry.recent_failures.pop_front();
        }
        if entry.recent_failures.len() > restart.max_restarts as usize && !entry.crash_looping {
            entry.crash_looping = true;
            error!(
                slot,
                failures = entry.recent_failures.len(),
                "worker is crash-looping: more than {} failed starts within {:?}; retrying every {:?}",
                restart.max_restarts,
                restart.window,
                restart.backoff_max
            );
        }
    }

    /// Refills the slot now after a good run, or after a doubling delay
    /// while starts keep failing, so a crash loop never spins.
    fn schedule_restart(&mut self, slot: usize) {
        let _span = slot_span(slot).entered();
        let entry = &mut self.slots[slot];
        if entry.restart_pending {
            return;
        }
        entry.restart_pending = true;
        let restart = entry.settings.restart;
        let delay = restart_delay(entry.failures, restart.backoff_base, restart.backoff_max);
        if entry.failures > 0 {
            info!(
                slot,
                failures = entry.failures,
                delay_ms = delay.as_millis() as u64,
                "restarting worker after backoff"
            );
        }
        self.notify_after(delay, Notice::RestartDue { slot });
    }

    fn notify_after(&self, delay: Duration, notice: Notice) {
        let notices = self.notices.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = notices.send(notice);
        });
    }

    /// Starts a rolling reload to `settings`; the reply comes when it is
    /// done or has failed. Refused while one is already running.
    pub fn reload(&mut self, settings: Settings, reply: oneshot::Sender<Result<String, String>>) {
        if self.stopping {
            let _ = reply.send(Err("herd is stopping".into()));
            return;
        }
        if self.reload.is_some() {
            let _ = reply.send(Err("a reload is already in progress".into()));
            return;
        }
        if settings.listen != self.settings.listen
            || settings.mode != self.settings.mode
            || settings.backlog != self.settings.backlog
        {
            let _ = reply.send(Err(
                "reload cannot change `listen`, `backlog` or `mode`: restart herd for that".into(),
            ));
            return;
        }
        let mut settings = settings;
        let configured = settings.workers;
        if configured == self.configured_workers {
            settings.workers = self.slots.len();
        }
        self.configured_workers = configured;
        let settings = Arc::new(settings);
        let kept = self.slots.len().min(settings.workers);
        info!(workers = settings.workers, program = %settings.program.display(), "reloading");
        self.reload = Some(Reload {
            settings: settings.clone(),
            pending: (0..kept).collect(),
            starting: BTreeMap::new(),
            replaced: 0,
            started: Instant::now(),
            reply: Some(reply),
        });
        // Count changes apply at once: new slots start on the new settings,
        // surplus slots drain.
        self.resize(settings.workers, settings.clone());
        self.advance_reload();
    }

    /// Starts the next batch once the current one is ready; finishes the reload.
    fn advance_reload(&mut self) {
        let Some(reload) = self.reload.as_mut() else {
            return;
        };
        if !reload.starting.is_empty() {
            return;
        }
        let batch = reload.settings.reload_batch;
        let mut next = Vec::new();
        while next.len() < batch {
            match reload.pending.pop_front() {
                Some(slot) => next.push(slot),
                None => break,
            }
        }
        if next.is_empty() {
            let reload = self.reload.take().expect("reload in progress");
            self.settings = reload.settings.clone();
            self.metrics.reload_finished(true, reload.started.elapsed());
            let message = format!(
                "reloaded {} worker(s) in {} ms",
                reload.replaced,
                reload.started.elapsed().as_millis()
            );
            info!("{message}");
            if let Some(reply) = reload.reply {
                let _ = reply.send(Ok(message));
            }
            return;
        }
        let settings = reload.settings.clone();
        for slot in next {
            if !self.slot_has_worker(slot) {
                // Nothing serves this slot (it waits to restart): it restarts on the new version.
                self.slots[slot].settings = settings.clone();
                self.reload.as_mut().expect("reload").replaced += 1;
                continue;
            }
            match self.spawn(slot, Purpose::Replace, settings.clone()) {
                Some(uid) => {
                    self.reload
                        .as_mut()
                        .expect("reload")
                        .starting
                        .insert(uid, slot);
                }
                // The reload was stopped by replacement_failed.
                None => return,
            }
        }
        if self.reload.as_ref().is_some_and(|r| r.starting.is_empty()) {
            self.advance_reload();
        }
    }

    /// A replacement worker failed before becoming ready. During a reload
    /// this stops the reload; the slot's old worker keeps serving.
    fn replacement_failed(&mut self, slot: usize, why: String) {
        if let Some(serving) = self
            .processes
            .values_mut()
            .find(|p| p.slot == slot && p.role == Role::Serving)
        {
            serving.replacement_requested = false;
        }
        let Some(mut reload) = self.reload.take() else {
            warn!(
                slot,
                "replacement worker failed ({why}); the current worker keeps serving"
            );
            return;
        };
        // Stop the rest of the batch; their slots keep the old workers too.
        for uid in reload.starting.keys() {
            if let Some(process) = self.processes.get(uid) {
                kill_group(process.pid, Signal::SIGKILL);
            }
        }
        self.metrics
            .reload_finished(false, reload.started.elapsed());
        let message = format!(
            "reload failed: the new worker for slot {slot} {why}; {} slot(s) run the new version, the rest keep the old one",
            reload.replaced
        );
        error!("{message}");
        if let Some(reply) = reload.reply.take() {
            let _ = reply.send(Err(message));
        }
    }

    /// Sets the number of worker slots: new slots start at once, surplus
    /// slots (the highest-numbered) drain gracefully.
    pub fn scale(&mut self, workers: usize) -> String {
        self.resize(workers, self.settings.clone())
    }

    fn resize(&mut self, workers: usize, settings: Arc<Settings>) -> String {
        let workers = workers.clamp(1, crate::config::MAX_WORKERS);
        let before = self.slots.len();
        if workers > before {
            self.add_slots(workers - before, &settings);
            for slot in before..workers {
                self.spawn(slot, Purpose::Fill, settings.clone());
            }
        } else if workers < before {
            let _ = self.handoff.send(Command::SetSlots { count: workers });
            let surplus: Vec<u64> = self
                .processes
                .values()
                .filter(|p| p.slot >= workers)
                .map(|p| p.uid)
                .collect();
            for uid in surplus {
                self.begin_draining(uid);
            }
            self.slots.truncate(workers);
            self.sockets.remove_slots_from(workers);
            // A reload in progress forgets the removed slots (their new
            // workers, if started, are draining with the rest).
            if let Some(reload) = self.reload.as_mut() {
                reload.pending.retain(|&slot| slot < workers);
                reload.starting.retain(|_, slot| *slot < workers);
                self.advance_reload();
            }
        }
        if workers != before {
            info!(from = before, to = workers, "scaled workers");
        }
        format!("workers: {before} -> {workers}")
    }

    pub fn worker_count(&self) -> usize {
        self.slots.len()
    }

    /// Samples every worker's memory and CPU; replaces those over `max_memory`.
    pub fn monitor(&mut self) {
        let mut over_limit = Vec::new();
        for process in self.processes.values_mut() {
            let Some(sample) = procstat::sample(process.pid) else {
                continue;
            };
            let new_ticks = match &process.last_sample {
                Some(previous) => {
                    process.cpu_percent = procstat::cpu_percent(previous, &sample);
                    sample.cpu_ticks.saturating_sub(previous.cpu_ticks)
                }
                None => sample.cpu_ticks,
            };
            if let Some(slot) = self.slots.get_mut(process.slot) {
                slot.cpu_seconds += procstat::ticks_to_seconds(new_ticks);
            }
            process.last_sample = Some(sample);
            let limit = self
                .slots
                .get(process.slot)
                .and_then(|s| s.settings.max_memory);
            if process.role == Role::Serving && limit.is_some_and(|limit| sample.rss > limit) {
                over_limit.push((process.slot, process.uid, sample.rss));
            }
        }
        for (slot, uid, rss) in over_limit {
            self.request_replacement(
                slot,
                uid,
                RestartReason::Memory,
                &format!("uses {} MiB, over max_memory", rss >> 20),
            );
        }
    }

    /// CPU seconds used per slot, by every worker that held it.
    pub fn cpu_seconds(&self) -> Vec<f64> {
        self.slots.iter().map(|s| s.cpu_seconds).collect()
    }

    /// One row per slot for `herd status`.
    pub fn status(&self, handed_off: impl Fn(usize) -> u64) -> Vec<SlotStatus> {
        (0..self.slots.len())
            .map(|slot| {
                let entry = &self.slots[slot];
                let serving = self
                    .processes
                    .values()
                    .find(|p| p.slot == slot && p.role == Role::Serving);
                let starting = self
                    .processes
                    .values()
                    .find(|p| p.slot == slot && p.role == Role::Starting);
                let state = match (serving, starting) {
                    (Some(_), Some(_)) => SlotState::Replacing,
                    (Some(_), None) => SlotState::Ready,
                    (None, Some(_)) => SlotState::Starting,
                    (None, None) if entry.crash_looping => SlotState::CrashLooping,
                    (None, None) => SlotState::Waiting,
                };
                let shown = serving.or(starting);
                SlotStatus {
                    slot,
                    pid: shown.map(|p| p.pid),
                    state,
                    uptime_secs: shown.map(|p| p.started.elapsed().as_secs_f64()),
                    restarts: entry.restarts,
                    handed_off: handed_off(slot),
                    rss_bytes: shown.and_then(|p| p.last_sample.map(|s| s.rss)),
                    cpu_percent: shown.and_then(|p| p.last_sample.map(|_| p.cpu_percent)),
                }
            })
            .collect()
    }

    /// Graceful stop begins: no more restarts; every worker is draining
    /// (the hand-off loop sends DRAIN with `StopAccepting`).
    pub fn begin_stop(&mut self) {
        self.stopping = true;
        if let Some(mut reload) = self.reload.take() {
            if let Some(reply) = reload.reply.take() {
                let _ = reply.send(Err("herd is stopping".into()));
            }
        }
        for process in self.processes.values_mut() {
            // DRAIN goes to every channel; a worker that may not read it
            // (made ready, or to be made ready, by `ready_delay` alone) gets SIGTERM.
            let plain = match process.role {
                Role::Serving => !process.speaks_protocol,
                Role::Starting => self
                    .slots
                    .get(process.slot)
                    .is_some_and(|s| s.settings.ready_delay.is_some()),
                Role::Draining => false, // told already
            };
            if plain {
                kill_group(process.pid, Signal::SIGTERM);
            }
            process.role = Role::Draining;
        }
    }

    /// SIGKILL every worker's process group now.
    pub fn kill_all(&self) {
        for process in self.processes.values() {
            kill_group(process.pid, Signal::SIGKILL);
        }
    }
}

/// The span every log line about a slot is recorded in (`worker{slot=N}`).
fn slot_span(slot: usize) -> tracing::Span {
    tracing::info_span!("worker", slot)
}

fn kill_group(pid: u32, signal: Signal) {
    let _ = killpg(Pid::from_raw(pid as i32), signal);
}

/// A per-worker random-looking offset in `0..=max`, so recycles don't align.
fn jitter(max: u64, uid: u64) -> u64 {
    if max == 0 {
        return 0;
    }
    let seed =
        uid ^ u64::from(std::process::id()) << 32 ^ Instant::now().elapsed().subsec_nanos() as u64;
    let mixed = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
    mixed % (max + 1)
}

/// 0 after a good run; then base, 2·base, 4·base, … capped at `max`.
fn restart_delay(failures: u32, base: Duration, max: Duration) -> Duration {
    match failures {
        0 => Duration::ZERO,
        n => base.saturating_mul(1u32 << (n - 1).min(20)).min(max),
    }
}

fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => {
            let name = Signal::try_from(signal).map_or("unknown", |s| s.as_str());
            format!("was killed by signal {signal} ({name})")
        }
        _ => format!("ended ({status})"),
    }
}

/// Copies a worker's output to herd's, one whole line at a time, tagged
/// with its slot so interleaved workers stay readable.
async fn forward_lines(stream: impl AsyncRead + Unpin, slot: usize, is_stderr: bool) {
    use std::io::Write;
    let mut lines = BufReader::new(stream).split(b'\n');
    let prefix = format!("[worker {slot}] ");
    let mut line_out = Vec::with_capacity(256);
    while let Ok(Some(line)) = lines.next_segment().await {
        line_out.clear();
        line_out.extend_from_slice(prefix.as_bytes());
        line_out.extend_from_slice(&line);
        line_out.push(b'\n');
        let _ = if is_stderr {
            std::io::stderr().lock().write_all(&line_out)
        } else {
            std::io::stdout().lock().write_all(&line_out)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_base_to_cap() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        let delays: Vec<_> = (0..7)
            .map(|n| restart_delay(n, base, max).as_millis())
            .collect();
        assert_eq!(delays, [0, 100, 200, 400, 800, 1600, 2000]);
        assert_eq!(restart_delay(u32::MAX, base, max), max);
    }

    #[test]
    fn exits_are_described_with_code_or_signal() {
        assert_eq!(
            describe_exit(ExitStatus::from_raw(3 << 8)),
            "exited with code 3"
        );
        assert_eq!(
            describe_exit(ExitStatus::from_raw(9)),
            "was killed by signal 9 (SIGKILL)"
        );
    }

    #[test]
    fn jitter_stays_in_range() {
        assert_eq!(jitter(0, 7), 0);
        for uid in 0..100 {
            assert!(jitter(10, uid) <= 10);
        }
    }
}
