//! Workers coming and going: a channel added, made serving, drained,
//! found hung, unblocked, retired, and what it had in flight taken back.

use super::*;

/// Why a worker left the hand-off loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Retired {
    /// Its channel reached EOF or failed: the supervisor is told.
    ChannelClosed,
    /// The supervisor said its process exited ([`Command::Forget`]).
    ProcessExited,
}

impl HandoffLoop {
    pub(super) fn add_worker(&mut self, added: NewWorker, fd: OwnedFd) {
        let Some(channel) = self.insert_channel(added, fd) else {
            return;
        };
        self.app_primary_worker_added(channel);
        // READY may already be waiting on the channel.
        self.read_worker(channel);
    }

    /// Files a new worker's channel (starting, nothing sent) and watches it.
    pub(super) fn insert_channel(&mut self, added: NewWorker, fd: OwnedFd) -> Option<ChannelIx> {
        let NewWorker {
            slot,
            worker,
            pid,
            node,
            recycle_after,
            hang_timeout,
            link,
        } = added;
        if slot.get() >= MAX_WORKERS {
            error!(
                slot = slot.get(),
                event = "slot_out_of_range",
                "worker slot out of range; closing its channel"
            );
            return None;
        }
        self.active.reach(slot, || None);
        let channel = match self.channels.position(Option::is_none) {
            Some(free) => free,
            None => self.channels.push(None),
        };
        let raw = fd.as_raw_fd();
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&raw),
            channel_token(channel),
            Interest::READABLE,
        ) {
            error!(
                slot = slot.get(),
                event = "channel_watch_failed",
                "cannot watch worker channel: {e}"
            );
            return None;
        }
        if hang_timeout.is_some() {
            self.hang_check_due
                .get_or_insert(Instant::now() + HANG_CHECK_INTERVAL);
        }
        self.channels[channel] = Some(WorkerChannel {
            slot,
            worker,
            pid,
            channel: Arc::new(fd),
            role: Role::Starting,
            hung: false,
            hang_timeout,
            blocked: false,
            drain_pending: false,
            in_flight: VecDeque::with_capacity(self.limits.max_unacked),
            sent: 0,
            refused: 0,
            acked: 0,
            closed: None,
            recycle_after,
            errors: ProtocolErrors::default(),
            more_to_read: false,
            protocol: if node {
                Protocol::Node(NodeChannel::default())
            } else {
                Protocol::Herd
            },
            link,
            page: None,
            worker_end: None,
            queued: VecDeque::new(),
            unsent: Vec::new(),
            watching_takes: false,
            reclaimed_at: None,
            threads: None,
            queued_listed: false,
        });
        Some(channel)
    }

    /// The worker said READY: the supervisor decides what follows.
    pub(super) fn report_ready(&mut self, channel: ChannelIx) {
        if let Some(worker) = self.channels[channel].as_ref() {
            let _ = self.events.send(Event::Ready {
                worker: worker.worker,
            });
        }
    }

    /// The supervisor made the worker its slot's: it gets the slot's
    /// connections from now on. A worker told to drain stays drained.
    pub(super) fn serve(&mut self, channel: ChannelIx) {
        let Some(worker) = self.channels[channel].as_mut() else {
            return;
        };
        if worker.role != Role::Starting {
            return;
        }
        worker.role = Role::Serving;
        self.capacity_epoch += 1;
        let (slot, id) = (worker.slot, worker.worker);
        self.active.reach(slot, || None);
        self.active[slot] = Some(channel);
        self.update_gate(channel);
        self.roster_changed = true;
        let _ = self.events.send(Event::Serving { worker: id });
    }

    /// Every `hang_timeout` worker whose oldest unacknowledged hand-off is
    /// older than that is hung: it gets nothing more, its unacknowledged
    /// connections go back to the front of the queue, and the supervisor
    /// is told (it kills and replaces it). A late ACK from it is ignored.
    pub(super) fn find_hung(&mut self, now: Instant) {
        for channel in self.channels.ids() {
            let Some(worker) = self.channels[channel].as_mut() else {
                continue;
            };
            let Some(limit) = worker.hang_timeout else {
                continue;
            };
            let stale = |worker: &WorkerChannel| {
                worker
                    .oldest_sent()
                    .is_some_and(|oldest| now.duration_since(oldest) >= limit)
            };
            if worker.hung || !stale(worker) {
                continue;
            }
            // A queued worker that took everything but did not count it
            // (its page is its word) is not hung: the kernel says so.
            self.taken_if_emptied(channel);
            let Some(worker) = self.channels[channel].as_mut() else {
                continue;
            };
            if !stale(worker) {
                continue;
            }
            worker.hung = true;
            if self.active.get(worker.slot) == Some(&Some(channel)) {
                self.active[worker.slot] = None;
            }
            self.roster_changed = true;
            let requeued = self.requeue_in_flight(channel);
            self.counters
                .requeued_hung
                .fetch_add(requeued as u64, Relaxed);
            let worker = self.channels[channel].as_ref().expect("looked up above");
            warn!(
                slot = worker.slot.get(),
                pid = worker.pid,
                requeued,
                event = "worker_hung",
                "worker acknowledged nothing for {limit:?} (hang_timeout): it is hung; handing its connections to other workers"
            );
            let _ = self.events.send(Event::Hung {
                worker: worker.worker,
            });
        }
    }

    /// Stops giving a worker connections and sends it DRAIN (now, or as
    /// soon as its channel has room).
    pub(super) fn drain(&mut self, channel: ChannelIx) {
        // No other thread sends after DRAIN (nor while it is sent).
        self.close_gate(channel);
        let Some(worker) = self.channels[channel].as_mut() else {
            return;
        };
        if worker.role == Role::Draining {
            return;
        }
        worker.role = Role::Draining;
        worker.drain_pending = true;
        if self.active.get(worker.slot) == Some(&Some(channel)) {
            self.active[worker.slot] = None;
        }
        self.roster_changed = true;
        // Given to it this turn but not sent: to other workers, not after DRAIN.
        let mut unsent = std::mem::take(&mut worker.unsent);
        self.put_back(&mut unsent);
        // Its slot socket leaves the kernel's rotation before it is told to
        // stop: what is queued there by then, herd accepts and hands on.
        self.update_rotations(channel, SlotRotation::stop_turns);
        self.send_pending_drain(channel);
    }

    pub(super) fn send_pending_drain(&mut self, channel: ChannelIx) {
        let Some(worker) = self.channels[channel].as_mut() else {
            return;
        };
        if !worker.drain_pending {
            return;
        }
        if let Protocol::Node(_) = worker.protocol {
            // A Node worker's outbox takes the line whether or not the
            // channel has room now.
            worker.drain_pending = false;
            let sent = worker.send_drain();
            return self.after_node_send(channel, sent);
        }
        match worker.send_drain() {
            Ok(()) => worker.drain_pending = false,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                worker.blocked = true;
                self.watch_writable(channel, true);
            }
            // The worker is gone; its channel's EOF will retire it.
            Err(_) => worker.drain_pending = false,
        }
    }

    /// Adds or removes WRITABLE interest; only wanted while a channel is full.
    pub(super) fn watch_writable(&mut self, channel: ChannelIx, writable: bool) {
        let Some(worker) = self.channels[channel].as_ref() else {
            return;
        };
        // Watching a queued worker's takes needs room events too.
        let interest = if writable || worker.watching_takes {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        let raw = worker.channel.as_raw_fd();
        let _ =
            self.poll
                .registry()
                .reregister(&mut SourceFd(&raw), channel_token(channel), interest);
    }

    pub(super) fn unblock(&mut self, channel: ChannelIx) {
        let Some(worker) = self.channels.get_mut(channel).and_then(Option::as_mut) else {
            return;
        };
        // Room on a channel is capacity: refused connections may go there now.
        self.capacity_epoch += 1;
        if let Protocol::Node(_) = worker.protocol {
            worker.blocked = false;
            let flushed = worker.flush();
            return self.after_node_send(channel, flushed);
        }
        if worker.blocked {
            worker.blocked = false;
            self.watch_writable(channel, false);
            self.send_pending_drain(channel);
        }
        // Room made by a worker of queued hand-offs taking what it had.
        self.catch_up(channel, 0);
        if worker_watched(&self.channels, channel) {
            self.taken_if_emptied(channel);
        }
    }

    /// Removes a worker whose channel is gone, or whose process exited, and
    /// puts every connection it had not acknowledged back at the front of
    /// the queue, oldest first.
    pub(super) fn retire(&mut self, channel: ChannelIx, why: Retired) {
        self.app_primary_worker_event(channel, "disconnect");
        let requeued = self.requeue_in_flight(channel);
        let Some(worker) = self.channels[channel].take() else {
            return;
        };
        let raw = worker.channel.as_raw_fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
        if self.active.get(worker.slot) == Some(&Some(channel)) {
            self.active[worker.slot] = None;
        }
        self.roster_changed = true;
        self.update_rotations(channel, SlotRotation::release);
        if let Some(closed) = worker.closed {
            // Whatever it still had open ended with its channel.
            self.counters.open_connections[worker.slot].fetch_sub(worker.acked - closed, Relaxed);
        }
        self.counters
            .requeued_worker_gone
            .fetch_add(requeued as u64, Relaxed);
        if requeued > 0 {
            info!(
                slot = worker.slot.get(),
                pid = worker.pid,
                requeued,
                event = "requeued",
                "worker left unacknowledged connections; handing them to other workers"
            );
        }
        if why == Retired::ChannelClosed {
            let _ = self.events.send(Event::ChannelClosed {
                worker: worker.worker,
            });
        }
    }

    /// Takes back every connection sent to worker `channel` and not yet
    /// acknowledged, to the front of their queues, oldest first.
    pub(super) fn requeue_in_flight(&mut self, channel: ChannelIx) -> usize {
        // Queued hand-offs first: they were sent after what waits here.
        let taken_back = self.take_back(channel);
        let Some(worker) = self.channels[channel].as_mut() else {
            return taken_back;
        };
        let requeued = worker.in_flight.len();
        for entry in worker.in_flight.drain(..).rev() {
            self.queue.push_front(entry.conn.listener(), entry.conn);
        }
        self.counters.in_flight.fetch_sub(requeued as u64, Relaxed);
        requeued + taken_back
    }
}
