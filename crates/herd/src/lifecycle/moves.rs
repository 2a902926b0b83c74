//! The moves of one worker: start, become ready, drain, be killed, end,
//! and the timers of each stage (docs/lifecycle.md, "A worker process").

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Instant;

use nix::sys::signal::Signal;
use tracing::{debug, error, info, warn};

use super::stop_signal::{self, Drained};
use super::worker::{DrainCause, KillCause, ReplaceCause, Stage, Worker, CHANNEL_LOSS_GRACE};
use super::{describe_exit, slot_span, Action, Lifecycle, RestartReason};
use crate::ids::{SlotIx, WorkerId};

/// How a worker's run ended, for the restart accounting.
pub(super) struct RunEnd {
    /// Logged, and part of a failed reload's message.
    pub why: String,
    /// Counted in `herd_worker_restarts_total`.
    pub reason: RestartReason,
}

impl Lifecycle {
    /// Starts a worker in `slot` on the slot's version.
    pub(super) fn spawn(&mut self, now: Instant, slot: SlotIx, out: &mut Vec<Action>) {
        let fill = self.serving_in(slot).is_none();
        let entry = &mut self.slots[slot];
        entry.started(fill);
        let version = entry.version;
        let policy = *self.policy(version);
        self.next_worker += 1;
        let id = WorkerId(self.next_worker);
        self.insert_worker(Worker {
            id,
            slot,
            version,
            pid: None,
            started: now,
            stage: Stage::Starting {
                ready_by: now + policy.ready_timeout,
                ready_at: policy.ready_delay.map(|delay| now + delay),
            },
            announced: false,
            channel_check_at: None,
        });
        out.push(Action::Spawn {
            worker: id,
            slot,
            version,
        });
    }

    /// A starting worker is ready: it takes its slot and the worker that
    /// held the slot drains. A restart, a reload and a recycle are this move.
    pub(super) fn promote(
        &mut self,
        now: Instant,
        id: WorkerId,
        announced: bool,
        out: &mut Vec<Action>,
    ) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        // Only a starting worker becomes serving: a draining one never
        // serves again, whatever arrives late from its channel.
        if !w.is_starting() || self.stopping.is_some() || w.slot.get() >= self.slots.len() {
            return;
        }
        let slot = w.slot;
        if w.version != self.slots[slot].version {
            return; // superseded: reconcile kills it
        }
        let old = self.serving_in(slot);
        let w = self.workers.get_mut(&id).expect("looked up above");
        w.stage = Stage::Serving { replace: None };
        w.announced = announced;
        let _span = slot_span(slot).entered();
        debug!(
            slot = slot.get(),
            pid = w.pid.unwrap_or(0),
            "worker promoted"
        );
        self.slots[slot].hung = false;
        out.push(Action::Serve { worker: id });
        if let Some(old) = old {
            self.drain(now, old, DrainCause::Replaced, out);
        }
    }

    /// Asks a starting or serving worker to stop gracefully: the hand-off
    /// loop gives it nothing more and sends DRAIN (Node: `disconnect`);
    /// `stop_signal` (or SIGTERM where DRAIN may go unread) follows at once,
    /// SIGKILL at `shutdown_timeout`.
    pub(super) fn drain(
        &mut self,
        now: Instant,
        id: WorkerId,
        cause: DrainCause,
        out: &mut Vec<Action>,
    ) {
        let Some(policy) = self.policy_of(id) else {
            return;
        };
        let w = self.workers.get_mut(&id).expect("policy_of found it");
        if !w.is_live() {
            return;
        }
        let drained = Drained {
            announced: w.announced,
            was_starting: w.is_starting(),
            cause,
        };
        w.stage = Stage::Draining {
            kill_at: now + policy.shutdown_timeout,
            cause,
        };
        let signal = stop_signal::at_drain(&policy, drained);
        let _span = slot_span(w.slot).entered();
        info!(
            slot = w.slot.get(),
            pid = w.pid.unwrap_or(0),
            signal = signal.map(Signal::as_str),
            event = "worker_draining",
            "worker draining"
        );
        out.push(Action::Drain { worker: id });
        if let Some(signal) = signal {
            out.push(Action::Signal { worker: id, signal });
        }
    }

    /// SIGKILLs a worker (its process group and cgroup); its exit follows.
    pub(super) fn kill(&mut self, id: WorkerId, cause: KillCause, out: &mut Vec<Action>) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if matches!(w.stage, Stage::Killed { .. }) {
            return;
        }
        if w.is_serving() {
            // It gets nothing more while the kill lands.
            out.push(Action::Drain { worker: id });
        }
        w.stage = Stage::Killed { cause };
        out.push(Action::Signal {
            worker: id,
            signal: Signal::SIGKILL,
        });
    }

    pub(super) fn on_start_failed(
        &mut self,
        now: Instant,
        id: WorkerId,
        error: String,
        out: &mut Vec<Action>,
    ) {
        let Some(w) = self.remove_worker(id) else {
            return;
        };
        let _span = slot_span(w.slot).entered();
        error!(
            slot = w.slot.get(),
            event = "start_failed",
            "cannot start worker: {error}"
        );
        let end = RunEnd {
            why: format!("could not be started: {error}"),
            reason: RestartReason::Exit,
        };
        self.run_ended(now, &w, end, out);
    }

    /// The worker's main process exited (its process group and cgroup have
    /// been killed already). What it had not acknowledged goes elsewhere at
    /// once, whoever still holds its channel.
    pub(super) fn on_exited(
        &mut self,
        now: Instant,
        id: WorkerId,
        status: ExitStatus,
        out: &mut Vec<Action>,
    ) {
        let Some(w) = self.remove_worker(id) else {
            return;
        };
        out.push(Action::Forget { worker: id });
        let _span = slot_span(w.slot).entered();
        let (slot, pid) = (w.slot, w.pid.unwrap_or(0));
        let uptime_ms = now.saturating_duration_since(w.started).as_millis() as u64;
        let how = describe_exit(status);
        match w.stage {
            Stage::Starting { .. } | Stage::Serving { .. } if self.stopping.is_none() => {
                warn!(
                    slot = slot.get(),
                    pid,
                    uptime_ms,
                    code = status.code(),
                    signal = status.signal(),
                    event = "worker_exited",
                    "worker {how}"
                );
                let reason = if status.signal().is_some() {
                    RestartReason::Signal
                } else {
                    RestartReason::Exit
                };
                let end = RunEnd {
                    why: how.to_string(),
                    reason,
                };
                self.run_ended(now, &w, end, out);
            }
            Stage::Killed {
                cause: KillCause::ReadyTimeout,
            } => {
                info!(
                    slot = slot.get(),
                    pid,
                    uptime_ms,
                    code = status.code(),
                    signal = status.signal(),
                    event = "worker_exited",
                    "worker {how} (not ready within ready_timeout)"
                );
            }
            _ => info!(
                slot = slot.get(),
                pid,
                uptime_ms,
                code = status.code(),
                signal = status.signal(),
                event = "worker_exited",
                "worker {how}"
            ),
        }
    }

    pub(super) fn on_channel_closed(&mut self, now: Instant, id: WorkerId, out: &mut Vec<Action>) {
        let Some(policy) = self.policy_of(id) else {
            return;
        };
        let w = self.workers.get_mut(&id).expect("policy_of found it");
        match w.stage {
            // Node's worker.kill(): disconnect, and once the worker has
            // closed its channel, SIGTERM (`stop_signal::after_disconnect`).
            Stage::Draining { .. } => {
                if let Some(signal) = stop_signal::after_disconnect(&policy) {
                    let _span = slot_span(w.slot).entered();
                    info!(
                        slot = w.slot.get(),
                        pid = w.pid.unwrap_or(0),
                        signal = signal.as_str(),
                        event = "node_disconnected",
                        "Node worker disconnected; sending {signal}"
                    );
                    out.push(Action::Signal { worker: id, signal });
                }
            }
            // Its exit normally follows within milliseconds; if not, the
            // timer finds it still there.
            Stage::Starting { .. } | Stage::Serving { .. } => {
                w.channel_check_at.get_or_insert(now + CHANNEL_LOSS_GRACE);
            }
            Stage::Killed { .. } => {}
        }
    }

    /// The hand-off loop found the worker hung and sent its unacknowledged
    /// connections to others: it is killed and its slot refilled.
    pub(super) fn on_hung(&mut self, now: Instant, id: WorkerId, out: &mut Vec<Action>) {
        let Some(w) = self.workers.get(&id).cloned() else {
            return;
        };
        // Only a worker that was handed connections can hang on them.
        if matches!(w.stage, Stage::Killed { .. } | Stage::Starting { .. }) {
            return;
        }
        let _span = slot_span(w.slot).entered();
        warn!(
            slot = w.slot.get(),
            pid = w.pid.unwrap_or(0),
            event = "hung_worker_killed",
            "worker is hung (a hand-off unacknowledged, no WATCHDOG=1, or its own socket's connections untaken, for hang_timeout); killing it"
        );
        self.kill(id, KillCause::Hung, out);
        if w.is_live() {
            if let Some(slot) = self.slots.get_mut(w.slot) {
                slot.hung = true;
            }
            let end = RunEnd {
                why: "was hung".into(),
                reason: RestartReason::Hung,
            };
            self.run_ended(now, &w, end, out);
        }
    }

    /// A serving worker is to be replaced gracefully (`max_memory`,
    /// `max_connections_per_worker`); reconcile starts the replacement.
    pub(super) fn request_replacement(
        &mut self,
        id: WorkerId,
        cause: ReplaceCause,
        why: String,
        out: &mut Vec<Action>,
    ) {
        if self.stopping.is_some() {
            return;
        }
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let Stage::Serving { replace } = &mut w.stage else {
            return;
        };
        if replace.is_some() {
            return;
        }
        *replace = Some(cause);
        let _span = slot_span(w.slot).entered();
        info!(
            slot = w.slot.get(),
            pid = w.pid.unwrap_or(0),
            event = match cause {
                ReplaceCause::Memory => "memory_exceeded",
                ReplaceCause::Recycle => "recycling",
            },
            "worker {why}; replacing it gracefully"
        );
        let reason = match cause {
            ReplaceCause::Memory => RestartReason::Memory,
            ReplaceCause::Recycle => RestartReason::Recycle,
        };
        out.push(Action::Restarted {
            slot: w.slot,
            reason,
        });
    }

    /// A worker stopped counting for its slot against its will: a failed
    /// start (ended before ready or within `min_uptime`) delays the slot's
    /// next start; a good run resets the delay. A failed start of the
    /// version a reload is rolling out fails the reload.
    pub(super) fn run_ended(
        &mut self,
        now: Instant,
        w: &Worker,
        end: RunEnd,
        out: &mut Vec<Action>,
    ) {
        if self.stopping.is_some() || w.slot.get() >= self.slots.len() {
            return;
        }
        let restart = self.policy(w.version).restart;
        out.push(Action::Restarted {
            slot: w.slot,
            reason: end.reason,
        });
        let uptime = now.saturating_duration_since(w.started);
        let failed_start = w.is_starting() || uptime < restart.min_uptime;
        let slot = &mut self.slots[w.slot];
        if w.is_starting() {
            // A replacement for a hung worker that fails is a failed start
            // like any other: the slot says waiting or crash-looping again.
            slot.hung = false;
        }
        if failed_start {
            if slot.record_failure(now, &restart) {
                error!(
                    slot = w.slot.get(),
                    failures = slot.failures,
                    max_restarts = restart.max_restarts,
                    event = "crash_looping",
                    "worker is crash-looping: more than {} failed starts within {:?}; retrying every {:?}",
                    restart.max_restarts,
                    restart.window,
                    restart.backoff_max
                );
            }
        } else {
            slot.record_good_run();
        }
        if !w.is_starting() {
            return;
        }
        if self.reload_is_replacing(w.slot, w.version) {
            self.fail_reload(now, w.slot, &end.why, out);
        } else if self.serving_in(w.slot).is_some() {
            warn!(
                slot = w.slot.get(),
                event = "replacement_failed",
                "replacement worker failed ({}); the current worker keeps serving",
                end.why
            );
        }
    }

    /// Fires every worker timer due at `now`.
    pub(super) fn fire_timers(&mut self, now: Instant, out: &mut Vec<Action>) {
        let due: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| w.next_deadline().is_some_and(|at| at <= now))
            .map(|w| w.id)
            .collect();
        for id in due {
            let Some(w) = self.workers.get(&id).cloned() else {
                continue;
            };
            let _span = slot_span(w.slot).entered();
            let pid = w.pid.unwrap_or(0);
            if w.is_live() && w.channel_check_at.is_some_and(|at| at <= now) {
                warn!(
                    slot = w.slot.get(),
                    pid,
                    event = "channel_lost",
                    "worker closed its channel but is still running; stopping it"
                );
                let end = RunEnd {
                    why: "closed its channel".into(),
                    reason: RestartReason::ChannelClosed,
                };
                self.drain(now, id, DrainCause::ChannelLost, out);
                self.run_ended(now, &w, end, out);
                continue;
            }
            match w.stage {
                Stage::Starting { ready_at, .. } if ready_at.is_some_and(|at| at <= now) => {
                    self.promote(now, id, false, out);
                }
                Stage::Starting { ready_by, .. } if ready_by <= now => {
                    let timeout = self.policy(w.version).ready_timeout;
                    warn!(
                        slot = w.slot.get(),
                        pid,
                        timeout_ms = timeout.as_millis() as u64,
                        event = "ready_timeout",
                        "worker not ready within {timeout:?}; killing it"
                    );
                    self.kill(id, KillCause::ReadyTimeout, out);
                    let end = RunEnd {
                        why: format!("was not ready within ready_timeout ({timeout:?})"),
                        reason: RestartReason::ReadyTimeout,
                    };
                    self.run_ended(now, &w, end, out);
                }
                Stage::Draining { kill_at, .. } if kill_at <= now => {
                    match self.stopping.as_mut() {
                        Some(stop) => {
                            stop.forced = true;
                            if !std::mem::replace(&mut stop.warned, true) {
                                let left = self
                                    .workers
                                    .values()
                                    .filter(|w| !matches!(w.stage, Stage::Killed { .. }))
                                    .count();
                                warn!(
                                    left,
                                    event = "shutdown_timeout",
                                    "workers did not exit within shutdown_timeout; sending SIGKILL"
                                );
                            }
                        }
                        None => warn!(
                            slot = w.slot.get(),
                            pid,
                            event = "drain_timeout",
                            "worker did not stop in time; sending SIGKILL"
                        ),
                    }
                    self.kill(id, KillCause::DrainTimeout, out);
                }
                _ => {}
            }
        }
    }
}
