//! Desired against observed: the slot count, the version each slot wants
//! and whether herd is stopping, against the workers there are. Run after
//! every event; restores the invariant in the module docs of `lifecycle`.

use std::time::Instant;

use tracing::info;

use super::slot::{Slot, StartGate};
use super::worker::{DrainCause, KillCause, Stage};
use super::{slot_span, Action, Lifecycle, Stopping, MAX_WORKERS};
use crate::ids::{SlotIx, WorkerId};

impl Lifecycle {
    pub(super) fn reconcile(&mut self, now: Instant, out: &mut Vec<Action>) {
        // Nothing starting or serving stays beyond the count, or while stopping.
        let stopping = self.stopping.is_some();
        let surplus: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| w.is_live() && (stopping || w.slot.get() >= self.slots.len()))
            .map(|w| w.id)
            .collect();
        let cause = if stopping {
            DrainCause::Stopping
        } else {
            DrainCause::ScaledDown
        };
        for id in surplus {
            self.drain(now, id, cause, out);
        }
        if !stopping {
            self.advance_reload(now, out);
            for slot in self.slots.ids() {
                self.reconcile_slot(now, slot, out);
            }
        }
        self.forget_unused_versions();
    }

    /// Gives `slot` a worker of the version it wants, or a timer to start one.
    fn reconcile_slot(&mut self, now: Instant, slot: SlotIx, out: &mut Vec<Action>) {
        let wanted = self.slots[slot].version;
        if let Some(id) = self.starting_in(slot) {
            if self.workers[&id].version == wanted {
                return; // wait for it
            }
            // A start of a version the slot no longer wants (a reload began,
            // or failed) is cut short; it has no connection to lose.
            self.kill(id, KillCause::Superseded, out);
        }
        let serving = self.serving_in(slot).map(|id| &self.workers[&id]);
        let replace = serving.map(|w| (w.version != wanted, w.stage));
        let needs_start = match replace {
            None => true,
            Some((other_version, Stage::Serving { replace })) => other_version || replace.is_some(),
            Some(_) => false,
        };
        if !needs_start {
            // A backoff set for a start no longer needed (a failed reload
            // took the slot back to the version it serves) must not stay
            // due, or it would fire again and again.
            self.slots[slot].retry_at = None;
            return;
        }
        let restart = self.policy(wanted).restart;
        let entry = &mut self.slots[slot];
        match entry.start_gate(now, &restart) {
            StartGate::Now => self.spawn(now, slot, out),
            StartGate::Scheduled(at) => {
                let _span = slot_span(slot).entered();
                let delay_ms = at.saturating_duration_since(now).as_millis() as u64;
                let what = if serving.is_some() {
                    "starting the replacement after backoff"
                } else {
                    "restarting worker after backoff"
                };
                info!(
                    slot = slot.get(),
                    failures = entry.failures,
                    delay_ms,
                    replacement = serving.is_some(),
                    event = "restart_scheduled",
                    "{what}"
                );
            }
            StartGate::Waiting(_) => {}
        }
    }

    /// Sets the number of slots: new ones start on the version new slots
    /// run (a reload's, during one), the highest-numbered surplus ones drain.
    pub(super) fn resize(&mut self, workers: usize, out: &mut Vec<Action>) {
        if self.stopping.is_some() {
            return;
        }
        let count = workers.clamp(1, MAX_WORKERS);
        let before = self.slots.len();
        if count > before {
            let version = self.reload.as_ref().map_or(self.current, |r| r.version);
            for _ in before..count {
                let slot = self.slots.push(Slot::new(version));
                if let Some(reload) = self.reload.as_mut() {
                    reload.previous.insert(slot, reload.before);
                    reload.in_progress.insert(slot);
                    reload.grown.insert(slot);
                }
            }
        } else if count < before {
            self.slots.truncate(count);
            if let Some(reload) = self.reload.as_mut() {
                reload.pending.retain(|&slot| slot.get() < count);
                reload.in_progress.retain(|&slot| slot.get() < count);
                reload.previous.retain(|&slot, _| slot.get() < count);
                reload.grown.retain(|&slot| slot.get() < count);
            }
            out.push(Action::SetSlots { count });
        }
        if count != before {
            info!(
                from = before,
                to = count,
                event = "scaled",
                "scaled workers"
            );
        }
    }

    /// A graceful stop: no more starts; reconcile drains every worker.
    pub(super) fn begin_stop(&mut self, out: &mut Vec<Action>) {
        if self.stopping.is_some() {
            return;
        }
        self.stopping = Some(Stopping {
            forced: false,
            warned: false,
        });
        for slot in &mut self.slots {
            slot.retry_at = None;
        }
        if let Some(reload) = self.reload.take() {
            self.current = reload.before;
            out.push(Action::ReloadFinished {
                ticket: reload.ticket,
                result: Err("herd is stopping".into()),
                took: None,
            });
        }
        // Connections still waiting go out before anyone is told to drain.
        out.push(Action::StopAccepting);
    }

    /// Kills every worker now; a stop if none was under way.
    pub(super) fn kill_all(&mut self, out: &mut Vec<Action>) {
        self.begin_stop(out);
        let alive: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| !matches!(w.stage, Stage::Killed { .. }))
            .map(|w| w.id)
            .collect();
        if let Some(stop) = self.stopping.as_mut() {
            stop.forced |= !alive.is_empty();
        }
        for id in alive {
            self.kill(id, KillCause::FastStop, out);
        }
    }

    /// Drops policies nothing refers to any more, so reloads do not pile up.
    fn forget_unused_versions(&mut self) {
        let mut used: Vec<_> = self.slots.iter().map(|s| s.version).collect();
        used.extend(self.workers.values().map(|w| w.version));
        used.push(self.current);
        if let Some(reload) = &self.reload {
            used.push(reload.version);
            used.push(reload.before);
            used.extend(reload.previous.values().copied());
        }
        self.policies.retain(|version, _| used.contains(version));
    }
}
