//! A rolling reload: moving the slots to a new version `reload_batch` at a
//! time, and what a failed one leaves (docs/lifecycle.md, "reloading").
//!
//! A reload only changes which version each slot *wants*; reconcile does
//! the rest (start a replacement for a serving worker on another version,
//! kill a starting one). A slot is done once a worker of the new version
//! serves it. A starting worker of the new version that fails (exits, or
//! misses `ready_timeout`) fails the reload: the slots still in progress
//! go back to the version they ran, and the reply says what is true of
//! each, including a slot that lost its old worker meanwhile and restarts.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Instant;

use tracing::{error, info};

use super::{Action, Lifecycle, Policy, Version};
use crate::ids::SlotIx;

#[derive(Debug, Clone)]
pub(super) struct Reload {
    /// Who asked, for the answer.
    pub ticket: u64,
    pub version: Version,
    /// `current` before the reload: what a failed one returns to.
    pub before: Version,
    /// Per slot moved to the new version, what it ran before.
    pub previous: BTreeMap<SlotIx, Version>,
    /// Slots still to move, in order.
    pub pending: VecDeque<SlotIx>,
    /// Slots moved and not yet served by a worker of the new version.
    pub in_progress: BTreeSet<SlotIx>,
    /// Slots the reload added (a larger `workers`): they start on the new
    /// version at once and do not count against the batch, which exists to
    /// keep serving capacity while old workers are replaced.
    pub grown: BTreeSet<SlotIx>,
    /// Slots done.
    pub replaced: usize,
    pub started: Instant,
    /// Slots in progress at a time (`reload_batch` of the new version).
    pub batch: usize,
}

impl Lifecycle {
    pub(super) fn begin_reload(
        &mut self,
        now: Instant,
        ticket: u64,
        version: Version,
        policy: Policy,
        workers: usize,
        out: &mut Vec<Action>,
    ) {
        let refuse = if self.stopping.is_some() {
            Some("herd is stopping")
        } else if self.reload.is_some() {
            Some("a reload is already in progress")
        } else {
            None
        };
        if let Some(why) = refuse {
            out.push(Action::ReloadFinished {
                ticket,
                result: Err(why.into()),
                took: None,
            });
            return;
        }
        self.policies.insert(version, policy);
        // A reload that leaves `workers` as it was keeps the count set at
        // runtime (`herd scale`, SIGTTIN/SIGTTOU).
        let count = if workers == self.configured_workers {
            self.slots.len()
        } else {
            workers
        };
        self.configured_workers = workers;
        info!(workers = count, event = "reloading", "reloading");
        self.reload = Some(Reload {
            ticket,
            version,
            before: self.current,
            previous: BTreeMap::new(),
            pending: SlotIx::below(self.slots.len().min(count)).collect(),
            in_progress: BTreeSet::new(),
            grown: BTreeSet::new(),
            replaced: 0,
            started: now,
            batch: policy.reload_batch.max(1),
        });
        // Count changes apply at once: new slots start on the new version
        // (and are part of the reload), surplus slots drain.
        self.resize(count, out);
    }

    /// Is a starting worker of `version` in `slot` the reload's new worker?
    pub(super) fn reload_is_replacing(&self, slot: SlotIx, version: Version) -> bool {
        self.reload
            .as_ref()
            .is_some_and(|r| r.version == version && r.in_progress.contains(&slot))
    }

    /// Counts the slots a worker of the new version now serves, moves the
    /// next batch, and finishes the reload when every slot is done.
    pub(super) fn advance_reload(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some(reload) = self.reload.as_ref() else {
            return;
        };
        let done: Vec<SlotIx> = reload
            .in_progress
            .iter()
            .copied()
            .filter(|&slot| {
                self.in_slot(slot)
                    .any(|w| w.is_serving() && w.version == reload.version)
            })
            .collect();
        let reload = self.reload.as_mut().expect("checked above");
        for slot in done {
            reload.in_progress.remove(&slot);
            reload.replaced += 1;
        }
        while reload.in_progress.difference(&reload.grown).count() < reload.batch {
            let Some(slot) = reload.pending.pop_front() else {
                break;
            };
            let entry = &mut self.slots[slot];
            reload.previous.insert(slot, entry.version);
            entry.version = reload.version;
            reload.in_progress.insert(slot);
        }
        if !reload.pending.is_empty() || !reload.in_progress.is_empty() {
            return;
        }
        let reload = self.reload.take().expect("checked above");
        self.current = reload.version;
        let took = now.saturating_duration_since(reload.started);
        let message = format!(
            "reloaded {} worker(s) in {} ms",
            reload.replaced,
            took.as_millis()
        );
        info!(
            replaced = reload.replaced,
            took_ms = took.as_millis() as u64,
            event = "reload_finished",
            "{message}"
        );
        out.push(Action::ReloadFinished {
            ticket: reload.ticket,
            result: Ok(message),
            took: Some(took),
        });
    }

    /// The new version failed in `slot` (`why`): the slots in progress go
    /// back to what they ran; done slots keep the new version.
    pub(super) fn fail_reload(
        &mut self,
        now: Instant,
        slot: SlotIx,
        why: &str,
        out: &mut Vec<Action>,
    ) {
        let Some(reload) = self.reload.take() else {
            return;
        };
        for (&moved, &version) in &reload.previous {
            if reload.in_progress.contains(&moved) && moved.get() < self.slots.len() {
                self.slots[moved].version = version;
            }
        }
        self.current = reload.before;
        let orphaned = self.serving_in(slot).is_none();
        let message = if orphaned {
            format!(
                "reload failed: the new worker for slot {slot} {why}, and the slot's old worker \
                 is gone too: slot {slot} restarts on the running version; {} slot(s) run the new \
                 version, the others stay on the running one",
                reload.replaced
            )
        } else {
            format!(
                "reload failed: the new worker for slot {slot} {why}; {} slot(s) run the new \
                 version, the others stay on the running one",
                reload.replaced
            )
        };
        error!(slot = slot.get(), event = "reload_failed", "{message}");
        out.push(Action::ReloadFinished {
            ticket: reload.ticket,
            result: Err(message),
            took: Some(now.saturating_duration_since(reload.started)),
        });
    }
}
