//! Watching the per-slot sockets: every [`crate::stall::WATCH_INTERVAL`]
//! herd reads what the programs dealt to each slot and how many wait on each
//! slot's socket, hands both to `stall`, and carries out what it decides:
//! skip a stalled slot and move what waits there on, deal to it again, or
//! name its worker hung. Also what the kernel dealt, into herd's counters.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use herd_protocol::listen_queue::{self, QueueDepth};
use tracing::{info, warn};

use super::SlotGroups;
use crate::counters::Counters;
use crate::ids::{ListenerIx, SlotIx, WorkerId};
use crate::stall::{self, Verdict, Watch};

/// Adds what the kernel dealt to the counters: to `kernel_dealt`, and,
/// unless the workers report each connection themselves (`reported`:
/// ACCEPTED on herd's channel), to `accepted` and `handed_off` as if herd
/// had handed those connections over.
pub fn count(watched: &Watched, counters: &Counters, reported: bool) {
    counters
        .requeued_slot_queue
        .fetch_add(watched.moved, Relaxed);
    for dealt in &watched.dealt {
        counters.kernel_dealt.fetch_add(dealt.count, Relaxed);
        if reported {
            continue;
        }
        if let Some(accepted) = counters.accepted.get(dealt.listener) {
            accepted.fetch_add(dealt.count, Relaxed);
        }
        if let Some(handed_off) = counters.handed_off.get(dealt.slot) {
            handed_off.fetch_add(dealt.count, Relaxed);
        }
    }
}

/// What happened since the last [`SlotGroups::watch`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Watched {
    /// Connections the kernel dealt, per listener and slot.
    pub dealt: Vec<Dealt>,
    /// Connections moved off a dead or stalled slot's socket (each was
    /// counted in `dealt` once, when it arrived).
    pub moved: u64,
    /// Workers whose slot has stalled, without taking what it was dealt
    /// in between, for `hang_timeout`: hung, to be killed and replaced.
    pub hung: Vec<WorkerId>,
}

/// Connections the kernel dealt to one slot on one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dealt {
    pub listener: ListenerIx,
    pub slot: SlotIx,
    pub count: u64,
}

impl SlotGroups {
    /// Samples every slot's queue (see `stall`), skips or resumes slots,
    /// and reads what the programs dealt since the last call.
    pub fn watch(&mut self, now: Instant, hang_timeout: Option<Duration>) -> Watched {
        if self.programs.iter().all(Option::is_none) {
            return Watched::default();
        }
        // The deals first, then the queues: see `stall` for the order.
        let dealt = self.take_dealt();
        let queues: Vec<Option<(u32, bool)>> =
            self.slots.ids().map(|slot| self.waiting(slot)).collect();
        let idle: Vec<SlotIx> = (self.dealt_to.iter().copied())
            .filter(|slot| matches!(queues.get(slot.get()), Some(Some((0, _)))))
            .collect();
        let (mut changed, mut hung) = (false, Vec::new());
        for slot in self.slots.ids().collect::<Vec<_>>() {
            let Some((waiting, full)) = queues[slot.get()] else {
                continue;
            };
            let watch = self.slots[slot].watch;
            if !self.dealt_to.contains(&slot) && !watch.is_skipped() {
                continue;
            }
            let last = match watch {
                Watch::Dealt { last, .. } => last,
                Watch::Skipped { .. } => 0,
            };
            let dealt_here: u64 = (dealt.iter().filter(|d| d.slot == slot))
                .map(|d| d.count)
                .sum();
            let grew = u64::from(waiting.saturating_sub(last));
            let sample = stall::Sample {
                waiting,
                accepted: dealt_here.saturating_sub(grew),
                full,
            };
            let another_idle = idle.iter().any(|&other| other != slot);
            let (next, verdict) = stall::step(watch, sample, another_idle, now);
            self.slots[slot].watch = next;
            hung.extend(self.note_stall(slot, verdict, now, hang_timeout));
            changed |= self.carry_out(slot, verdict, waiting, next);
        }
        if changed {
            self.apply();
        }
        Watched {
            dealt,
            moved: std::mem::take(&mut self.moved),
            hung,
        }
    }

    /// Keeps `stalled_since`: set at the first skip of a run of stalls,
    /// cleared once the slot's earlier stalls are forgiven (`stall`: its
    /// strikes back to 0 after a long clean run). At a skip, a run longer
    /// than `hang_timeout` makes the slot's serving worker hung (said once:
    /// the run starts again).
    fn note_stall(
        &mut self,
        slot: SlotIx,
        verdict: Verdict,
        now: Instant,
        hang_timeout: Option<Duration>,
    ) -> Option<WorkerId> {
        let entry = &mut self.slots[slot];
        if matches!(entry.watch, Watch::Dealt { strikes: 0, .. }) {
            entry.stalled_since = None;
        }
        if verdict != Verdict::Skip {
            return None;
        }
        let since = *entry.stalled_since.get_or_insert(now);
        let timeout = hang_timeout?;
        if now.saturating_duration_since(since) < timeout {
            return None;
        }
        entry.stalled_since = None;
        let worker = entry.serving().and_then(|g| {
            (g.holders.iter().rev()).find_map(|&(id, serving)| serving.then_some(id))
        })?;
        warn!(
            slot = slot.get(),
            event = "slot_hung",
            "slot {slot}'s worker has stalled again and again for hang_timeout ({timeout:?}): hung"
        );
        Some(worker)
    }

    /// Logs a skip or a resume; true when the deal changes.
    fn carry_out(&mut self, slot: SlotIx, verdict: Verdict, waiting: u32, watch: Watch) -> bool {
        match verdict {
            Verdict::Keep => false,
            Verdict::Skip => {
                let Watch::Skipped { until, strikes } = watch else {
                    return false;
                };
                let probation = until.saturating_duration_since(Instant::now());
                warn!(
                    slot = slot.get(),
                    waiting,
                    strikes,
                    event = "slot_stalled",
                    "slot {slot} takes no connections ({waiting} waiting on its socket while others idle): skipped for {probation:.1?}, what waits there moves to the others"
                );
                // Out of the deal first, so that what moves does not come back.
                self.apply();
                let serving = (self.slots[slot].generations.iter())
                    .rposition(|g| g.holders.iter().any(|(_, serving)| *serving));
                if let Some(generation) = serving {
                    self.requeue(slot, generation, "it stalled");
                }
                true
            }
            Verdict::Resume => {
                info!(
                    slot = slot.get(),
                    event = "slot_resumed",
                    "slot {slot} is dealt to again after its probation"
                );
                true
            }
        }
    }

    /// Connections waiting on `slot`'s sockets, summed over listeners, and
    /// whether one of those queues is at its bound. A socket that stopped
    /// listening is made to listen again first (see [`read_or_restore`]).
    fn waiting(&mut self, slot: SlotIx) -> Option<(u32, bool)> {
        let backlog = self.backlog;
        let reads: Vec<(io::Result<QueueDepth>, Option<io::Result<()>>)> =
            (self.slots[slot].current().sockets.iter())
                .map(|socket| read_or_restore(socket.as_fd(), backlog))
                .collect();
        let mut restored = false;
        for outcome in reads.iter().filter_map(|(_, restore)| restore.as_ref()) {
            restored |= outcome.is_ok();
            if let Some(times) = self.failures.record() {
                warn!(
                    slot = slot.get(),
                    times,
                    event = "slot_socket_restored",
                    "slot {slot}'s socket had stopped listening (its worker shut it down?): listening again: {outcome:?}"
                );
            }
        }
        if restored {
            // Out of the program's arrays with the shutdown: set them anew.
            self.dealt_generations.clear();
            self.apply();
        }
        let (mut total, mut full) = (0u32, false);
        for (depth, _) in reads {
            match depth {
                Ok(depth) => {
                    total = total.saturating_add(depth.waiting);
                    full |= depth.waiting >= depth.bound;
                }
                Err(e) => {
                    if let Some(times) = self.failures.record() {
                        warn!(
                            slot = slot.get(),
                            times,
                            event = "queue_unreadable",
                            "cannot read the accept queue of slot {slot}'s socket: {e}"
                        );
                    }
                    return None;
                }
            }
        }
        Some((total, full))
    }

    /// Makes the kernel move what waits on `slot`'s sockets to the slots
    /// dealt to, where it can (else it waits for the slot's next worker).
    pub(super) fn requeue(&mut self, slot: SlotIx, generation: usize, why: &str) {
        if !self.moves_queues() || self.dealt_to.is_empty() {
            return;
        }
        let backlog = self.backlog;
        for socket in &self.slots[slot].generations[generation].sockets {
            let waiting = listen_queue::depth(socket.as_fd()).map_or(0, |d| d.waiting);
            if waiting == 0 {
                continue;
            }
            match listen_queue::requeue_elsewhere(socket.as_fd(), backlog) {
                Ok(()) => {
                    self.moved += u64::from(waiting);
                    info!(
                    slot = slot.get(),
                    moved = waiting,
                    event = "slot_queue_moved",
                    "moved {waiting} connections waiting on slot {slot}'s socket to the others ({why})"
                    )
                }
                Err(e) => {
                    if let Some(times) = self.failures.record() {
                        warn!(
                            slot = slot.get(),
                            times,
                            event = "slot_queue_move_failed",
                            "cannot move what waits on slot {slot}'s socket: {e}"
                        );
                    }
                }
            }
        }
    }

    /// What each program dealt per slot since the last read.
    fn take_dealt(&mut self) -> Vec<Dealt> {
        let mut news = Vec::new();
        for (at, program) in self.programs.iter().enumerate() {
            let Some(program) = program else { continue };
            let Ok(now) = program.dealt() else { continue };
            let before = &mut self.counted[at];
            before.resize(now.len(), 0);
            for (slot, (&now, before)) in now.iter().zip(before.iter_mut()).enumerate() {
                if now > *before {
                    news.push(Dealt {
                        listener: ListenerIx::at(at),
                        slot: SlotIx(slot),
                        count: now - *before,
                    });
                    *before = now;
                }
            }
        }
        news
    }
}

/// A socket's queue depth. A worker holds the same socket as herd and may
/// shut it down (a bug, or worse), which takes it out of its group and the
/// program's arrays: then it is made to listen again (the outcome second)
/// and read once more.
fn read_or_restore(
    socket: BorrowedFd<'_>,
    backlog: u32,
) -> (io::Result<QueueDepth>, Option<io::Result<()>>) {
    match listen_queue::depth(socket) {
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
            let restored = listen_queue::listen_again(socket, backlog);
            (listen_queue::depth(socket), Some(restored))
        }
        read => (read, None),
    }
}
