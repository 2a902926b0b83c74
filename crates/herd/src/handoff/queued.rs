//! Counter pages and queued hand-offs: the hand-off path without a
//! message per connection.
//!
//! A worker whose READY sets [`ReadyFlags::PAGE`] counts what it accepted,
//! received and closed in its counter page; herd reads the page every
//! [`PAGE_TALLY_INTERVAL`] (and before it dispatches to a worker with
//! hand-offs queued), and folds what is new into its counts as if the
//! messages had come.
//!
//! A worker that also sets [`ReadyFlags::QUEUED`] sends no ACK. herd sends
//! it what the policy gave it in one turn as one message (up to
//! [`MAX_BATCH`] connections and their fds), closes its own copies at
//! once, and remembers each as [`Queued`] until the page says the worker
//! took it off the channel. herd keeps a copy of the worker's end of the
//! channel, so what is still queued there when the worker dies or hangs is
//! not lost with it: herd reads it back, fds and all ([`HandoffLoop::take_back`]),
//! and hands it to another worker. Every message is read by exactly one of
//! the two, so a connection is never served twice.

use super::*;
use crate::process::WorkerLink;
use herd_protocol::page::Page;
use herd_protocol::wire::{encode_batch, ReadyFlags, MAX_BATCH, MAX_BATCH_LEN};

/// How often counter pages are read into the counters: how stale `herd
/// status`, the metrics and `max_connections_per_worker` can be for a
/// worker that counts in its page.
pub(super) const PAGE_TALLY_INTERVAL: Duration = Duration::from_millis(100);

/// A connection sent to a worker that takes queued hand-offs and not yet
/// taken off its channel. herd's copy of the fd is closed; the one in the
/// channel's queue is what [`HandoffLoop::take_back`] recovers.
pub(super) struct Queued {
    pub(super) handoff: Handoff,
    pub(super) accepted_at: Instant,
    pub(super) sent_at: Instant,
    pub(super) refused_by: Option<SlotIx>,
    pub(super) refusals: Refusals,
}

/// A worker's counter page and how much of each counter herd has counted.
pub(super) struct PageSeen {
    /// Shared with the other hand-off threads (least-conn reads it).
    pub(super) page: Arc<Page>,
    pub(super) received: u64,
    pub(super) closed: u64,
    /// Per inherited listener, as far as any was counted.
    pub(super) accepted: Vec<u64>,
}

impl PageSeen {
    pub(super) fn new(page: Page) -> PageSeen {
        PageSeen {
            page: Arc::new(page),
            received: 0,
            closed: 0,
            accepted: Vec::new(),
        }
    }

    /// What a counter gained since it was last counted; a counter that went
    /// back (a worker writing nonsense) gains nothing until it passes the
    /// old value again.
    fn gained(seen: &mut u64, now: u64) -> u64 {
        let gained = now.saturating_sub(*seen);
        *seen = (*seen).max(now);
        gained
    }
}

impl WorkerChannel {
    /// Does this worker take queued hand-offs (READY said so, and herd
    /// holds its page and its end of the channel)?
    pub(super) fn takes_queued(&self) -> bool {
        self.worker_end.is_some() && self.page.is_some()
    }

    /// Connections sent (or about to be) and not yet taken or acknowledged,
    /// by every hand-off thread.
    pub(super) fn outstanding(&self) -> usize {
        let others = self
            .threads
            .as_ref()
            .map_or(0, |t| t.outstanding() as usize);
        self.in_flight.len() + self.queued.len() + self.unsent.len() + others
    }

    /// Has it queued hand-offs not yet taken, from any thread?
    pub(super) fn has_queued(&self) -> bool {
        !self.queued.is_empty() || self.threads.as_ref().is_some_and(|t| t.outstanding() > 0)
    }

    /// When the oldest queued hand-off still not taken was sent (for the
    /// other threads': since when theirs wait with no take seen).
    pub(super) fn oldest_queued(&self) -> Option<Instant> {
        let own = self.queued.front().map(|entry| entry.sent_at);
        let others = self.threads.as_ref().and_then(|t| t.waiting_since);
        own.into_iter().chain(others).min()
    }

    /// Counts everything still queued as taken off the channel (the kernel
    /// says so, or herd took back what was left), as the page would have:
    /// the page's own count, when it comes, adds nothing.
    pub(super) fn all_queued_taken(&mut self, counters: &Counters) {
        let own = self.queued.len() as u64;
        self.queued.clear();
        if let Some(seen) = self.page.as_mut() {
            seen.received += own;
        }
        let taken = own + self.threads.as_mut().map_or(0, |t| t.all_taken());
        self.count_acknowledged(taken, counters);
        counters.in_flight.fetch_sub(taken, Relaxed);
    }

    /// When the oldest connection it has not acknowledged or taken was sent.
    pub(super) fn oldest_sent(&self) -> Option<Instant> {
        let acked = self.in_flight.front().map(|entry| entry.sent_at);
        acked.into_iter().chain(self.oldest_queued()).min()
    }
}

impl HandoffLoop {
    /// READY's flags: keep the page if the worker counts in it, and the
    /// worker's end of the channel if it takes queued hand-offs; close
    /// what it does not use (so its channel's EOF is seen again).
    pub(super) fn on_ready_flags(&mut self, channel: ChannelIx, flags: ReadyFlags) {
        let Some(worker) = self.channels[channel].as_mut() else {
            return;
        };
        let Some(WorkerLink { page, worker_end }) = worker.link.take() else {
            return;
        };
        if flags.contains(ReadyFlags::PAGE) {
            worker.page = Some(PageSeen::new(page));
            self.page_tally_due
                .get_or_insert(Instant::now() + PAGE_TALLY_INTERVAL);
            if flags.contains(ReadyFlags::QUEUED) {
                worker.worker_end = Some(worker_end);
                if flags.contains(ReadyFlags::THREADS) {
                    self.share_worker(channel);
                }
                let Some(worker) = self.channels[channel].as_mut() else {
                    return;
                };
                // Sent before READY (a worker counted ready by
                // `ready_delay`): it takes these as queued too, with no ACK.
                let now = Instant::now();
                if !worker.in_flight.is_empty() && !worker.queued_listed {
                    worker.queued_listed = true;
                    self.queued_channels.push(channel);
                }
                for entry in worker.in_flight.drain(..) {
                    worker.queued.push_back(Queued {
                        handoff: entry.conn.handoff,
                        accepted_at: entry.conn.accepted_at,
                        sent_at: entry.sent_at.min(now),
                        refused_by: entry.conn.refused_by,
                        refusals: entry.conn.refusals,
                    });
                }
            }
        } else if flags.contains(ReadyFlags::QUEUED) {
            worker.bad_message(
                BadMessage::Malformed,
                "READY with QUEUED but not PAGE (queued hand-offs are counted in the page); it gets HANDOFFs one at a time, to ACK",
            );
        }
    }

    /// Folds what worker `channel`'s page counted since the last look into
    /// herd's counts, as the messages would have: hand-offs taken off the
    /// channel, connections accepted by itself on the first `listeners`
    /// (OS modes; 0 skips that look at every listener), closed ones.
    pub(super) fn catch_up(&mut self, channel: ChannelIx, listeners: usize) {
        let taken_from_others = self.catch_up_threads(channel, Instant::now());
        let Some(worker) = self.channels.get_mut(channel).and_then(Option::as_mut) else {
            return;
        };
        let Some(seen) = worker.page.as_mut() else {
            return;
        };
        // Closed first: a worker counts a connection taken before it counts
        // it closed, so every close read here has its take read below.
        let closed_now = seen.page.closed();
        // No more taken than were queued: the page is the worker's word.
        let limit = seen.received + worker.queued.len() as u64;
        let taken = PageSeen::gained(&mut seen.received, seen.page.received().min(limit));
        let mut accepted_itself = 0;
        for listener in 0..listeners.min(herd_protocol::page::PAGE_LISTENERS) {
            let now = seen.page.accepted(listener);
            if now == 0 {
                continue;
            }
            if seen.accepted.len() <= listener {
                seen.accepted.resize(listener + 1, 0);
            }
            let gained = PageSeen::gained(&mut seen.accepted[listener], now);
            if gained > 0 {
                accepted_itself += gained;
                self.counters.accepted[ListenerIx::at(listener)].fetch_add(gained, Relaxed);
            }
        }
        let seen_closed = seen.closed;
        worker.queued.drain(..taken as usize);
        if taken > 0 {
            self.counters.in_flight.fetch_sub(taken, Relaxed);
            self.capacity_epoch += 1;
        }
        worker.count_acknowledged(taken + accepted_itself, &self.counters);
        if accepted_itself > 0 && worker.count_sent(accepted_itself) {
            let _ = self.events.send(Event::RecycleDue {
                worker: worker.worker,
            });
        }
        // Never more closed than taken: what runs ahead waits for its take.
        let counted = worker.count_closed(closed_now.saturating_sub(seen_closed), &self.counters);
        if let Some(seen) = worker.page.as_mut() {
            seen.closed = seen_closed + counted;
        }
        if worker.blocked && taken + taken_from_others > 0 {
            worker.blocked = false;
            self.send_pending_drain(channel);
        }
    }

    /// The room event of a watched worker comes while it takes a message
    /// off its channel, before it counts it in the page (and a worker that
    /// looks hung may only have failed to count): if the kernel
    /// says less than a message herd sent is left there (every message is
    /// charged more than its bytes), everything queued was taken,
    /// whatever the page says yet (it is counted as if the page had said
    /// so, and the page's own count, when it comes, adds nothing).
    pub(super) fn taken_if_emptied(&mut self, channel: ChannelIx) {
        let Some(worker) = self.channels.get_mut(channel).and_then(Option::as_mut) else {
            return;
        };
        if !worker.has_queued() {
            return;
        }
        // Less than one message: the kernel wakes herd from inside the
        // free of the last one, while it still counts a byte of it.
        let unread = fdpass::unread_by_peer(worker.channel.as_fd()).unwrap_or(usize::MAX);
        if unread >= HANDOFF_LEN {
            return;
        }
        worker.all_queued_taken(&self.counters);
        self.capacity_epoch += 1;
    }

    /// A serving worker of queued hand-offs that took nothing for
    /// `ack_timeout` (it stopped reading, closed its channel without DRAIN
    /// and runs on, or is stopped) is skipped anyway; what is queued to it
    /// is taken back and served by the others rather than left waiting for
    /// it, for `hang_timeout` or for its exit (a worker that ACKs would
    /// have shown its channel's end of file). It gets nothing for another
    /// `ack_timeout`, then is tried again: a stalled worker delays at most
    /// `max_unacked` connections by twice `ack_timeout`.
    pub(super) fn reclaim_stalled(&mut self, now: Instant) {
        let limit = self.limits.ack_timeout;
        let stale = |worker: &WorkerChannel| {
            worker.role == Role::Serving
                && !worker.hung
                && worker
                    .oldest_queued()
                    .is_some_and(|oldest| now.duration_since(oldest) >= limit)
        };
        for at in 0..self.queued_channels.len() {
            let channel = self.queued_channels[at];
            if !self.channels[channel].as_ref().is_some_and(stale) {
                continue;
            }
            self.taken_if_emptied(channel);
            if !self.channels[channel].as_ref().is_some_and(stale) {
                continue;
            }
            let back = self.take_back(channel);
            self.counters.requeued_hung.fetch_add(back as u64, Relaxed);
            let Some(worker) = self.channels[channel].as_mut() else {
                continue;
            };
            worker.reclaimed_at = Some(now);
            if let Some(total) = worker.errors.stalls.record() {
                warn!(
                    slot = worker.slot.get(),
                    pid = worker.pid,
                    requeued = back,
                    total,
                    event = "worker_stalled",
                    "worker took nothing queued to it for {limit:?} (ack_timeout): handed those connections to other workers"
                );
            }
        }
    }

    /// Reads every worker's page (the timer; also the closing tally).
    pub(super) fn tally_pages(&mut self) {
        let listeners = self.counters.listener_count();
        for channel in self.channels.ids() {
            self.catch_up(channel, listeners);
        }
    }

    /// Catches up with the workers that have hand-offs queued, so what
    /// they took counts before anything is dispatched this turn.
    pub(super) fn catch_up_queued(&mut self) {
        let mut waiting = std::mem::take(&mut self.queued_channels);
        waiting.retain(|&channel| {
            self.catch_up(channel, 0);
            let Some(worker) = self.channels.get_mut(channel).and_then(Option::as_mut) else {
                return false;
            };
            worker.queued_listed = worker.has_queued();
            worker.queued_listed
        });
        // Channels `catch_up` found the other threads' waiting on meanwhile
        // (each once: `queued_listed`).
        waiting.append(&mut self.queued_channels);
        self.queued_channels = waiting;
    }

    /// A worker of queued hand-offs tells nothing when it takes one off its
    /// channel, and nothing needs telling while herd has nothing waiting.
    /// While connections wait in herd's queue, though, a worker at its
    /// `max_unacked` (or stalled past `ack_timeout`) must be seen to take,
    /// or they would wait for the next tally: herd then watches the
    /// channels of the workers with hand-offs queued for room, which every
    /// message taken off makes (edge-triggered: a wake-up per take, only
    /// while it matters), and stops once its queue is empty.
    pub(super) fn watch_takes(&mut self) {
        let waiting = !self.queue.is_empty();
        let mut watched = std::mem::take(&mut self.takes_watched);
        watched.retain(|&channel| {
            let Some(worker) = self.channels.get_mut(channel).and_then(Option::as_mut) else {
                return false;
            };
            let keep = waiting && worker.has_queued();
            if !keep {
                worker.watching_takes = false;
                let writable = worker.wants_write();
                self.watch_writable(channel, writable);
            }
            keep
        });
        if waiting {
            for at in 0..self.queued_channels.len() {
                let channel = self.queued_channels[at];
                let Some(worker) = self.channels.get_mut(channel).and_then(Option::as_mut) else {
                    continue;
                };
                if !worker.watching_takes && worker.has_queued() {
                    worker.watching_takes = true;
                    watched.push(channel);
                    self.watch_writable(channel, true);
                }
            }
        }
        self.takes_watched = watched;
    }

    /// The policy gave `conn` to a worker that takes queued hand-offs: it
    /// goes with the rest of this turn's (sent now if that makes a batch).
    pub(super) fn give_queued(&mut self, channel: ChannelIx, conn: Accepted) {
        let Some(worker) = self.channels[channel].as_mut() else {
            return;
        };
        if worker.unsent.is_empty() {
            self.unsent_channels.push(channel);
        }
        worker.unsent.push(conn);
        if worker.unsent.len() >= MAX_BATCH {
            self.send_unsent(channel);
        }
    }

    /// Sends every worker what this turn gave it.
    pub(super) fn flush_unsent(&mut self) {
        while let Some(channel) = self.unsent_channels.pop() {
            self.send_unsent(channel);
        }
    }

    /// Sends worker `channel` its batch: one message, every fd in it, then
    /// closes herd's copies. A full channel blocks the worker and puts the
    /// batch back at the front of the queue, for the next pick.
    fn send_unsent(&mut self, channel: ChannelIx) {
        let Some(worker) = self.channels.get_mut(channel).and_then(Option::as_mut) else {
            return;
        };
        if worker.unsent.is_empty() {
            return;
        }
        // The spare keeps its capacity from batch to batch: no allocation
        // per connection, nor per batch.
        let mut batch =
            std::mem::replace(&mut worker.unsent, std::mem::take(&mut self.spare_batch));
        let mut buf = [0u8; MAX_BATCH_LEN];
        let bytes = encode_batch(batch.iter().map(|conn| &conn.handoff), &mut buf);
        let mut fds = [0; MAX_BATCH];
        for (fd, conn) in fds.iter_mut().zip(&batch) {
            *fd = conn.stream.as_raw_fd();
        }
        let sent = fdpass::send_with_fds(worker.channel.as_fd(), bytes, &fds[..batch.len()]);
        match sent {
            Ok(()) => {
                let now = Instant::now();
                if !worker.queued_listed {
                    worker.queued_listed = true;
                    self.queued_channels.push(channel);
                }
                // What stays queued too long is looked for (`reclaim_stalled`).
                self.hang_check_due.get_or_insert(now + HANG_CHECK_INTERVAL);
                let count = batch.len() as u64;
                for conn in batch.drain(..) {
                    if self.measure_latency {
                        // No ACK comes: accept to send is the hand-off's time.
                        let nanos = now.duration_since(conn.accepted_at).as_nanos() as u64;
                        self.counters.latency.record(nanos);
                    }
                    worker.queued.push_back(Queued {
                        handoff: conn.handoff,
                        accepted_at: conn.accepted_at,
                        sent_at: now,
                        refused_by: conn.refused_by,
                        refusals: conn.refusals,
                    });
                    // Dropping `conn` closes herd's copy; the queue holds one.
                }
                self.counters.in_flight.fetch_add(count, Relaxed);
                if let Some(seen) = &worker.threads {
                    bump(&seen.shared.sent[0], count);
                }
                if worker.count_sent(count) {
                    let _ = self.events.send(Event::RecycleDue {
                        worker: worker.worker,
                    });
                }
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.raw_os_error() == Some(libc::ETOOMANYREFS) =>
            {
                worker.blocked = true;
                self.watch_writable(channel, true);
                self.put_back(&mut batch);
            }
            Err(e) => {
                debug!(
                    slot = worker.slot.get(),
                    "worker channel failed on send: {e}"
                );
                self.put_back(&mut batch);
                self.retire(channel, Retired::ChannelClosed);
            }
        }
        self.spare_batch = batch;
    }
}

/// Does herd watch worker `channel`'s takes (see [`HandoffLoop::watch_takes`])?
pub(super) fn worker_watched(
    channels: &Table<ChannelIx, Option<WorkerChannel>>,
    channel: ChannelIx,
) -> bool {
    channels
        .get(channel)
        .and_then(Option::as_ref)
        .is_some_and(|worker| worker.watching_takes)
}
