//! The supervisor's decision core: worker slots and worker processes as a
//! pure state machine (docs/lifecycle.md draws it).
//!
//! Owns every decision about workers (start, restart after backoff,
//! replace, drain, kill, mark crash-looping or hung, roll a reload, stop)
//! and nothing else: no process, no socket, no clock. [`Lifecycle::handle`]
//! takes the time and one observed [`Event`] and returns the [`Action`]s
//! that follow; the supervisor carries them out and reports what it
//! observes back as events. Timers are state: each worker's stage and each
//! slot carries its own deadlines, [`Lifecycle::next_deadline`] says when
//! the next one is due, and any event (an [`Event::Tick`] at the least)
//! fires what is due.
//!
//! After every event one `reconcile` step restores the invariant, the way
//! sozu and Kubernetes controllers compare desired with observed state:
//! *every slot below the configured count has a starting or serving
//! worker, or a start waiting on a timer; no starting or serving worker
//! remains beyond the count.* Because the invariant is restored from the
//! state rather than by remembering to do it on each path, a new
//! combination of events cannot leave a slot empty.
//! [`Lifecycle::check_invariants`] states it in code, for the tests.

mod adopt;
mod moves;
mod reconcile;
mod reload;
mod slot;
mod stop_signal;
mod worker;

#[cfg(test)]
mod property_tests;
#[cfg(test)]
mod scenario_tests;
#[cfg(test)]
mod stop_signal_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod world;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::config::{RestartSettings, Settings, MAX_WORKERS};
use crate::ids::{SlotIx, Table, WorkerId};
use crate::status::{Phase, SlotState};
pub use adopt::{Adopted, CarriedCore, CarriedSlot};
use reload::Reload;
use slot::Slot;
#[cfg(test)]
use worker::CHANNEL_LOSS_GRACE;
pub use worker::{KillCause, ReplaceCause, Stage, Worker};

/// One loaded configuration: the first is 0, each reload adds one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub u32);

/// A worker process's part in its slot: the one vocabulary the supervisor
/// and the hand-off loop share. The supervisor decides it; the hand-off
/// loop is told ([`Action::Serve`], [`Action::Drain`]) and routes by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Started, not ready: gets no connections.
    Starting,
    /// Holds its slot: gets the slot's connections.
    Serving,
    /// Asked to stop (or killed): gets nothing more; what it was sent and
    /// has not acknowledged is still collected.
    Draining,
}

/// Why a slot's worker had to be replaced, for `herd_worker_restarts_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartReason {
    /// The worker exited with a status code.
    Exit,
    /// The worker was killed by a signal.
    Signal,
    /// The worker did not become ready within `ready_timeout`.
    ReadyTimeout,
    /// The worker exceeded `max_memory`.
    Memory,
    /// The worker reached `max_connections_per_worker`.
    Recycle,
    /// The worker stopped acknowledging hand-offs for `hang_timeout`.
    Hung,
    /// The worker closed its channel and kept running.
    ChannelClosed,
}

impl RestartReason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            RestartReason::Exit => "exit",
            RestartReason::Signal => "signal",
            RestartReason::ReadyTimeout => "ready-timeout",
            RestartReason::Memory => "memory",
            RestartReason::Recycle => "recycle",
            RestartReason::Hung => "hung",
            RestartReason::ChannelClosed => "channel-closed",
        }
    }
}

/// What the decisions of one configuration version depend on.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub ready_timeout: Duration,
    /// Count a worker ready this long after its start without READY.
    pub ready_delay: Option<Duration>,
    pub shutdown_timeout: Duration,
    /// `stop_signal`: sent to every draining worker, in place of the
    /// SIGTERM herd sends otherwise (`stop_signal::at_drain`).
    pub stop_signal: Option<Signal>,
    pub restart: RestartSettings,
    pub reload_batch: usize,
    pub max_memory: Option<u64>,
    /// Node cluster workers: stopped by `disconnect`, then SIGTERM once
    /// their channel closes (Node's `worker.kill()`), unless `stop_signal`
    /// was sent with the `disconnect`.
    pub node: bool,
}

impl Policy {
    pub fn of(settings: &Settings) -> Policy {
        Policy {
            ready_timeout: settings.ready_timeout,
            ready_delay: settings.ready.delay(),
            shutdown_timeout: settings.shutdown_timeout,
            stop_signal: settings.stop_signal,
            restart: settings.restart,
            reload_batch: settings.reload_batch.max(1),
            max_memory: settings.max_memory,
            node: settings.protocol == crate::config::WorkerProtocol::NodeCluster,
        }
    }
}

/// Something the supervisor observed, or was asked.
#[derive(Debug, Clone)]
pub enum Event {
    /// The [`Action::Spawn`] for this worker succeeded.
    Started { worker: WorkerId, pid: u32 },
    /// The [`Action::Spawn`] for this worker failed.
    StartFailed { worker: WorkerId, error: String },
    /// The worker said READY (Node: `listening`).
    Ready { worker: WorkerId },
    /// The worker's main process sent `READY=1` to its `NOTIFY_SOCKET`:
    /// ready, and it may not read DRAIN (it is sent SIGTERM too).
    Notified { worker: WorkerId },
    /// The worker's channel reached EOF.
    ChannelClosed { worker: WorkerId },
    /// The worker's main process exited and was reaped.
    Exited {
        worker: WorkerId,
        status: ExitStatus,
    },
    /// The worker was sent its `max_connections_per_worker`.
    RecycleDue { worker: WorkerId },
    /// Resident memory of every worker sampled, in bytes: one event per
    /// monitor tick, not one per worker.
    Memory { samples: Vec<(WorkerId, u64)> },
    /// The worker's oldest unacknowledged hand-off is older than
    /// `hang_timeout`; the hand-off loop already sent its connections on.
    Hung { worker: WorkerId },
    /// `herd scale`, SIGTTIN, SIGTTOU.
    Scale { workers: usize },
    /// A validated new configuration, as `version`; `workers` is its
    /// `workers` value (a reload that leaves it unchanged keeps the count
    /// set at runtime).
    Reload {
        ticket: u64,
        version: Version,
        policy: Policy,
        workers: usize,
    },
    /// A graceful stop: stop accepting, drain every worker.
    Stop,
    /// Kill every worker now (second SIGINT, SIGQUIT).
    KillAll,
    /// Time passed; fire what is due.
    Tick,
}

/// What the supervisor is to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a worker process for `slot` running `version`; answer with
    /// [`Event::Started`] or [`Event::StartFailed`].
    Spawn {
        worker: WorkerId,
        slot: SlotIx,
        version: Version,
    },
    /// Hand-off loop: the worker holds its slot and gets its connections.
    Serve { worker: WorkerId },
    /// Hand-off loop: no more connections; send DRAIN (Node: `disconnect`).
    Drain { worker: WorkerId },
    /// Signal the worker's processes (SIGKILL: its cgroup too).
    Signal { worker: WorkerId, signal: Signal },
    /// Hand-off loop: the worker's process is gone; send what it had not
    /// acknowledged to other workers now, and close its channel.
    Forget { worker: WorkerId },
    /// Hand-off loop (and per-slot sockets): only slots below `count` remain.
    SetSlots { count: usize },
    /// Hand-off loop: close the listeners; herd is stopping.
    StopAccepting,
    /// Count a restart of `slot` for `reason` (metrics).
    Restarted { slot: SlotIx, reason: RestartReason },
    /// A reload ended (or was refused: `took` is `None`); answer the
    /// client that asked with `ticket`.
    ReloadFinished {
        ticket: u64,
        result: Result<String, String>,
        took: Option<Duration>,
    },
}

/// One slot as `herd status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotView {
    pub slot: SlotIx,
    pub state: SlotState,
    /// The worker the row describes: the serving one, else the starting
    /// one, else the hung one being killed.
    pub worker: Option<WorkerId>,
    pub restarts: u64,
}

/// A stop in progress.
#[derive(Debug, Clone, Copy)]
struct Stopping {
    /// Some worker had to be SIGKILLed.
    forced: bool,
    /// "did not exit within shutdown_timeout" was logged.
    warned: bool,
}

/// The state of every slot and worker.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    /// By slot; the length is the configured count.
    slots: Table<SlotIx, Slot>,
    workers: BTreeMap<WorkerId, Worker>,
    /// (slot, worker) for every worker: a slot's workers in O(log n), so
    /// an event costs O(slots) rather than O(slots × workers).
    by_slot: BTreeSet<(SlotIx, WorkerId)>,
    policies: BTreeMap<Version, Policy>,
    /// What new slots run, and a finished reload moves to.
    current: Version,
    /// `workers` as last read from the config (see [`Event::Reload`]).
    configured_workers: usize,
    reload: Option<Reload>,
    /// herd is stopping: the one place that says so.
    stopping: Option<Stopping>,
    next_worker: u64,
}

impl Lifecycle {
    /// `workers` slots on `policy` (version 0). The first event fills them.
    pub fn new(policy: Policy, workers: usize) -> Lifecycle {
        let workers = workers.clamp(1, MAX_WORKERS);
        Lifecycle {
            slots: (0..workers).map(|_| Slot::new(Version(0))).collect(),
            workers: BTreeMap::new(),
            by_slot: BTreeSet::new(),
            policies: BTreeMap::from([(Version(0), policy)]),
            current: Version(0),
            configured_workers: workers,
            reload: None,
            stopping: None,
            next_worker: 0,
        }
    }

    /// Takes one event at `now`; returns what to do, in order.
    pub fn handle(&mut self, now: Instant, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Started { worker, pid } => {
                // Only a fact to remember: nothing is due and nothing to reconcile.
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.pid = Some(pid);
                }
                return out;
            }
            Event::StartFailed { worker, error } => {
                self.on_start_failed(now, worker, error, &mut out)
            }
            Event::Ready { worker } => self.promote(now, worker, true, &mut out),
            Event::Notified { worker } => self.promote(now, worker, false, &mut out),
            Event::ChannelClosed { worker } => self.on_channel_closed(now, worker, &mut out),
            Event::Exited { worker, status } => self.on_exited(now, worker, status, &mut out),
            Event::RecycleDue { worker } => {
                let why = "served its max_connections_per_worker".to_string();
                self.request_replacement(worker, ReplaceCause::Recycle, why, &mut out)
            }
            Event::Memory { samples } => {
                for (worker, rss) in samples {
                    let limit = self.policy_of(worker).and_then(|p| p.max_memory);
                    if limit.is_some_and(|limit| rss > limit) {
                        let why = format!("uses {} MiB, over max_memory", rss >> 20);
                        self.request_replacement(worker, ReplaceCause::Memory, why, &mut out);
                    }
                }
            }
            Event::Hung { worker } => self.on_hung(now, worker, &mut out),
            Event::Scale { workers } => self.resize(workers, &mut out),
            Event::Reload {
                ticket,
                version,
                policy,
                workers,
            } => self.begin_reload(now, ticket, version, policy, workers, &mut out),
            Event::Stop => self.begin_stop(&mut out),
            Event::KillAll => self.kill_all(&mut out),
            Event::Tick => {}
        }
        self.fire_timers(now, &mut out);
        self.reconcile(now, &mut out);
        out
    }

    /// When the next timer is due, if any runs.
    pub fn next_deadline(&self) -> Option<Instant> {
        let workers = self.workers.values().filter_map(Worker::next_deadline);
        let slots = self.slots.iter().filter_map(|s| s.retry_at);
        workers.chain(slots).min()
    }

    pub fn phase(&self) -> Phase {
        if self.stopping.is_some() {
            Phase::Stopping
        } else if self.reload.is_some() {
            Phase::Reloading
        } else {
            Phase::Running
        }
    }

    /// Stopping, and every worker process has exited.
    pub fn finished(&self) -> bool {
        self.stopping.is_some() && self.workers.is_empty()
    }

    /// The stop had to SIGKILL a worker.
    pub fn forced(&self) -> bool {
        self.stopping.is_some_and(|s| s.forced)
    }

    /// The version new slots run, and a finished reload moved to.
    pub fn current(&self) -> Version {
        self.current
    }

    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// Every worker process not yet reaped.
    #[cfg(test)]
    pub fn workers(&self) -> impl Iterator<Item = &Worker> {
        self.workers.values()
    }

    #[cfg(test)]
    pub fn worker(&self, id: WorkerId) -> Option<&Worker> {
        self.workers.get(&id)
    }

    /// The policy of `version` (the current one if it was forgotten).
    pub fn policy(&self, version: Version) -> &Policy {
        self.policies
            .get(&version)
            .or_else(|| self.policies.get(&self.current))
            .expect("the current version always has a policy")
    }

    /// Versions a slot, a worker or a reload still refers to.
    pub fn versions_in_use(&self) -> BTreeSet<Version> {
        self.policies.keys().copied().collect()
    }

    /// One row per slot for `herd status`.
    pub fn slots(&self) -> Vec<SlotView> {
        self.slots
            .enumerate()
            .map(|(slot, entry)| {
                let mine = || self.in_slot(slot);
                let serving = mine().find(|w| w.is_serving());
                let starting = mine().find(|w| w.is_starting());
                let hung = mine().find(|w| {
                    matches!(
                        w.stage,
                        Stage::Killed {
                            cause: KillCause::Hung
                        }
                    )
                });
                let state = match (serving, starting) {
                    (Some(_), Some(_)) => SlotState::Replacing,
                    (Some(_), None) => SlotState::Ready,
                    (None, _) if entry.hung => SlotState::Hung,
                    (None, Some(_)) => SlotState::Starting,
                    (None, None) if entry.crash_looping => SlotState::CrashLooping,
                    (None, None) => SlotState::Waiting,
                };
                SlotView {
                    slot,
                    state,
                    worker: serving.or(starting).or(hung).map(|w| w.id),
                    restarts: entry.restarts,
                }
            })
            .collect()
    }

    /// The invariant `reconcile` restores after every event (module docs),
    /// and the structural facts the rest relies on.
    #[cfg(test)]
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.by_slot.len() != self.workers.len() {
            return Err("the slot index and the workers disagree".into());
        }
        for (id, w) in &self.workers {
            if *id != w.id || !self.by_slot.contains(&(w.slot, w.id)) {
                return Err(format!("worker {id} filed under the wrong id"));
            }
            if !self.policies.contains_key(&w.version) {
                return Err(format!("worker {id} runs a forgotten version"));
            }
            if w.is_live() && (w.slot.get() >= self.slots.len() || self.stopping.is_some()) {
                return Err(format!(
                    "worker {id} in slot {} is {:?} beyond the count or while stopping",
                    w.slot, w.stage
                ));
            }
        }
        for slot in self.slots.ids() {
            let mine: Vec<&Worker> = self.in_slot(slot).collect();
            let serving = mine.iter().filter(|w| w.is_serving()).count();
            let starting = mine.iter().filter(|w| w.is_starting()).count();
            if serving > 1 || starting > 1 {
                return Err(format!(
                    "slot {slot} has {serving} serving and {starting} starting workers"
                ));
            }
            let covered = serving + starting > 0 || self.slots[slot].retry_at.is_some();
            if self.stopping.is_none() && !covered {
                return Err(format!("slot {slot} is empty with no start pending"));
            }
            if !self.policies.contains_key(&self.slots[slot].version) {
                return Err(format!("slot {slot} wants a forgotten version"));
            }
        }
        Ok(())
    }

    /// After an event at `now`, nothing may still be due: a timer left due
    /// would wake the supervisor again at once, and again, forever.
    #[cfg(test)]
    pub fn check_timers(&self, now: Instant) -> Result<(), String> {
        match self.next_deadline() {
            Some(at) if at <= now => Err(format!(
                "a timer is still due after the event: {:?} before now",
                now - at
            )),
            _ => Ok(()),
        }
    }

    fn policy_of(&self, worker: WorkerId) -> Option<Policy> {
        self.workers.get(&worker).map(|w| *self.policy(w.version))
    }

    fn serving_in(&self, slot: SlotIx) -> Option<WorkerId> {
        self.in_slot(slot).find(|w| w.is_serving()).map(|w| w.id)
    }

    fn starting_in(&self, slot: SlotIx) -> Option<WorkerId> {
        self.in_slot(slot).find(|w| w.is_starting()).map(|w| w.id)
    }

    /// The workers of `slot`, any stage.
    fn in_slot(&self, slot: SlotIx) -> impl Iterator<Item = &Worker> + '_ {
        self.by_slot
            .range((slot, WorkerId(0))..=(slot, WorkerId(u64::MAX)))
            .map(|(_, id)| &self.workers[id])
    }

    fn insert_worker(&mut self, worker: Worker) {
        self.by_slot.insert((worker.slot, worker.id));
        self.workers.insert(worker.id, worker);
    }

    fn remove_worker(&mut self, id: WorkerId) -> Option<Worker> {
        let worker = self.workers.remove(&id)?;
        self.by_slot.remove(&(worker.slot, id));
        Some(worker)
    }
}

/// The span every log line about a slot is recorded in (`worker{slot=N}`).
pub fn slot_span(slot: SlotIx) -> tracing::Span {
    tracing::info_span!("worker", slot = slot.get())
}

/// "exited with code 3", "was killed by signal 9 (SIGKILL)".
pub fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => {
            let name = Signal::try_from(signal).map_or("unknown", |s| s.as_str());
            format!("was killed by signal {signal} ({name})")
        }
        _ => format!("ended ({status})"),
    }
}
