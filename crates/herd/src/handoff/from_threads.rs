//! Thread 0's side of the other hand-off threads ([`super::threads`]):
//! starting them with their listener copies, publishing the roster and
//! each worker's gate, taking what they forward, counting what they sent
//! as the worker's page says it was taken, and stopping them (for a stop
//! or `herd upgrade`, whose handover carries their copies and counts).

use super::roster::{Roster, SharedWorker, SlotView};
use super::threads::{ListenerCopy, OtherThreads, Parked};
use super::*;
use herd_protocol::page::MAX_HANDOFF_THREADS;

/// What thread 0 has counted of the other threads' hand-offs to one
/// worker (thread 0's own are its [`Queued`](super::queued::Queued) records).
pub(super) struct ThreadsSeen {
    pub(super) shared: Arc<SharedWorker>,
    /// Per thread, its sends folded into the worker's `sent`.
    pub(super) sent: [u64; MAX_HANDOFF_THREADS],
    /// Per thread, its hand-offs counted taken.
    pub(super) received: [u64; MAX_HANDOFF_THREADS],
    /// Since when something the other threads sent waits untaken with no
    /// take seen: what stall and hang checks go by.
    pub(super) waiting_since: Option<Instant>,
}

impl ThreadsSeen {
    pub(super) fn new(shared: Arc<SharedWorker>) -> ThreadsSeen {
        ThreadsSeen {
            shared,
            sent: [0; MAX_HANDOFF_THREADS],
            received: [0; MAX_HANDOFF_THREADS],
            waiting_since: None,
        }
    }

    /// The other threads' hand-offs not yet counted taken or taken back.
    pub(super) fn outstanding(&self) -> u64 {
        (1..MAX_HANDOFF_THREADS)
            .map(|t| {
                let sent = self.shared.sent[t].load(Relaxed);
                let back = self.shared.taken_back[t].load(Relaxed);
                sent.saturating_sub(back + self.received[t])
            })
            .sum()
    }

    /// Folds what the other threads sent since the last look (returns how
    /// many) and what the page says was taken of it (returns how many).
    fn catch_up(&mut self, now: Instant) -> (u64, u64) {
        let (mut sent, mut taken) = (0, 0);
        for t in 1..MAX_HANDOFF_THREADS {
            let sent_now = self.shared.sent[t].load(Relaxed);
            sent += sent_now.saturating_sub(self.sent[t]);
            self.sent[t] = self.sent[t].max(sent_now);
            // No more taken than it was sent and not taken back.
            let limit = sent_now.saturating_sub(self.shared.taken_back[t].load(Relaxed));
            let received_now = self.shared.page.received_from(t).min(limit);
            taken += received_now.saturating_sub(self.received[t]);
            self.received[t] = self.received[t].max(received_now);
        }
        self.waiting_since = match self.outstanding() {
            0 => None,
            _ if taken > 0 => Some(now),
            _ => Some(self.waiting_since.unwrap_or(now)),
        };
        (sent, taken)
    }

    /// Counts everything outstanding as taken (the kernel says the channel
    /// is empty, or thread 0 took back the rest); returns how many.
    pub(super) fn all_taken(&mut self) -> u64 {
        let mut taken = 0;
        for t in 1..MAX_HANDOFF_THREADS {
            let sent = self.shared.sent[t].load(Relaxed);
            let left = sent.saturating_sub(self.shared.taken_back[t].load(Relaxed));
            taken += left.saturating_sub(self.received[t]);
            self.received[t] = self.received[t].max(left);
        }
        self.waiting_since = None;
        taken
    }
}

impl HandoffLoop {
    /// Starts the other threads (`threads` in all), each with a copy of
    /// every listener that can have one; `shares` are copies carried over
    /// `herd upgrade`, by thread, used instead of binding new ones.
    pub(super) fn start_threads(
        &mut self,
        threads: usize,
        shares: Option<Vec<Vec<ListenerCopy>>>,
    ) -> io::Result<()> {
        if threads < 2 {
            return Ok(());
        }
        let mut others = OtherThreads::new(
            threads,
            self.dispatcher.mode(),
            self.counters.clone(),
            self.waker.clone(),
            self.measure_latency,
        );
        let shares = match shares {
            Some(carried) => carried,
            None => (1..threads)
                .map(|thread| self.bind_copies(thread == 1))
                .collect::<io::Result<_>>()?,
        };
        others.start(shares)?;
        self.counters.handoff_threads.store(threads as u64, Relaxed);
        // What the others send is watched for stalls on this tick.
        self.hang_check_due
            .get_or_insert(Instant::now() + HANG_CHECK_INTERVAL);
        self.others = Some(others);
        self.roster_changed = true;
        Ok(())
    }

    /// One more socket in each listener's SO_REUSEPORT group. A listener
    /// not in one (passed by systemd without `ReusePort=yes`), or bound for
    /// a Node app, is thread 0's alone (said once, with `first`).
    fn bind_copies(&self, first: bool) -> io::Result<Vec<ListenerCopy>> {
        use nix::sys::socket::{getsockopt, sockopt};
        let mut copies = Vec::new();
        for (listener, listening) in self.listeners.enumerate() {
            let Some(listening) = listening.as_ref().filter(|l| l.node_key.is_none()) else {
                continue;
            };
            if !getsockopt(&listening.socket, sockopt::ReusePort).unwrap_or(false) {
                if !first {
                    continue;
                }
                warn!(
                    listener = listener.get(),
                    event = "listener_not_shared",
                    "listener {} is not in a SO_REUSEPORT group (passed without it?): hand-off thread 0 alone accepts on it",
                    listening.local
                );
                continue;
            }
            let v6_only = listening.local.is_ipv6()
                && getsockopt(&listening.socket, sockopt::Ipv6V6Only).unwrap_or(true);
            let socket = listener::bind_group_member(listening.local, self.backlog, v6_only)
                .map_err(io::Error::other)?;
            socket.set_nonblocking(true)?;
            copies.push(ListenerCopy {
                listener,
                socket: mio::net::TcpListener::from_std(socket),
                local: listening.local,
            });
        }
        Ok(copies)
    }

    /// Stops the other threads; what they held goes to the front of the
    /// queue (with thread 0's ids), and their copies are returned.
    pub(super) fn stop_threads(&mut self) -> Vec<Vec<ListenerCopy>> {
        let Some(others) = self.others.as_mut() else {
            return Vec::new();
        };
        let parked = others.stop_all();
        self.take_forwarded();
        let mut shares = Vec::with_capacity(parked.len());
        for Parked { copies, held } in parked {
            for conn in held {
                self.take_forwarded_one(conn);
            }
            shares.push(copies);
        }
        shares
    }

    /// Starts the threads again with the copies they gave back (a thaw).
    pub(super) fn restart_threads(&mut self, shares: Vec<Vec<ListenerCopy>>) {
        let Some(others) = self.others.as_mut() else {
            return;
        };
        if let Err(e) = others.start(shares) {
            error!(
                event = "handoff_thread_failed",
                "cannot start the hand-off threads again: {e}; thread 0 accepts alone"
            );
        }
        self.roster_changed = true;
    }

    /// Takes what the other threads forwarded.
    pub(super) fn take_forwarded(&mut self) {
        // Bounded by the channel's size: what comes meanwhile waits a turn.
        for _ in 0..threads::FORWARD_LIMIT {
            let next = self
                .others
                .as_ref()
                .and_then(|o| o.forwarded.try_recv().ok());
            let Some(conn) = next else {
                return;
            };
            self.take_forwarded_one(conn);
        }
    }

    fn take_forwarded_one(&mut self, mut conn: Accepted) {
        conn.handoff.connection_id = self.fresh_id();
        self.take_new(conn);
    }

    /// A connection id of thread 0's.
    pub(super) fn fresh_id(&mut self) -> u64 {
        self.next_connection_id += 1;
        self.next_connection_id
    }

    /// Publishes who serves which slot, if that changed this turn.
    pub(super) fn publish_roster(&mut self) {
        if !std::mem::take(&mut self.roster_changed) {
            return;
        }
        let Some(others) = self.others.as_ref() else {
            return;
        };
        let slots = self
            .active
            .iter()
            .map(|channel| {
                let worker = channel.and_then(|c| self.channels[c].as_ref());
                match worker {
                    None => SlotView::Empty,
                    Some(worker) => match &worker.threads {
                        Some(seen) => SlotView::Shared(seen.shared.clone()),
                        None => SlotView::Home,
                    },
                }
            })
            .collect();
        others.board.publish(Roster {
            slots,
            max_unacked: self.limits.max_unacked,
        });
        others.wake_all();
    }

    /// A worker that said THREADS gets its shared side, if other threads run.
    pub(super) fn share_worker(&mut self, channel: ChannelIx) {
        if self.others.is_none() {
            return;
        }
        let Some(worker) = self.channels[channel].as_mut() else {
            return;
        };
        let Some(seen) = worker.page.as_ref() else {
            return;
        };
        let shared = SharedWorker::new(
            worker.channel.clone(),
            seen.page.clone(),
            worker.recycle_after,
        );
        worker.threads = Some(ThreadsSeen::new(Arc::new(shared)));
        self.update_gate(channel);
        self.roster_changed = true;
    }

    /// Opens worker `channel`'s gate while thread 0 would send to it too
    /// (serving, not hung, not resting after a reclaim), else closes it.
    pub(super) fn update_gate(&mut self, channel: ChannelIx) {
        let now = Instant::now();
        let ack_timeout = self.limits.ack_timeout;
        let Some(worker) = self.channels.get(channel).and_then(Option::as_ref) else {
            return;
        };
        let Some(seen) = worker.threads.as_ref() else {
            return;
        };
        let open = worker.role == Role::Serving
            && !worker.hung
            && !worker.drain_pending
            && worker
                .reclaimed_at
                .is_none_or(|at| now.duration_since(at) >= ack_timeout);
        if open != seen.shared.is_open() {
            seen.shared.set_open(open);
        }
    }

    /// Closes worker `channel`'s gate: when this returns no other thread
    /// sends to it, until it is opened again.
    pub(super) fn close_gate(&mut self, channel: ChannelIx) {
        if let Some(seen) = self.channels[channel]
            .as_ref()
            .and_then(|w| w.threads.as_ref())
        {
            seen.shared.set_open(false);
        }
    }

    /// Folds what the other threads sent worker `channel` and what it took
    /// of that (from [`HandoffLoop::catch_up`]); returns how many it took.
    pub(super) fn catch_up_threads(&mut self, channel: ChannelIx, now: Instant) -> u64 {
        let Some(worker) = self.channels.get_mut(channel).and_then(Option::as_mut) else {
            return 0;
        };
        let Some(seen) = worker.threads.as_mut() else {
            return 0;
        };
        let (sent, taken) = seen.catch_up(now);
        let waiting = seen.outstanding() > 0;
        if worker.count_sent(sent) {
            let _ = self.events.send(Event::RecycleDue {
                worker: worker.worker,
            });
        }
        if taken > 0 {
            worker.count_acknowledged(taken, &self.counters);
            self.counters.in_flight.fetch_sub(taken, Relaxed);
            self.capacity_epoch += 1;
        }
        if waiting && !worker.queued_listed {
            // Caught up every turn while the other threads' wait.
            worker.queued_listed = true;
            self.queued_channels.push(channel);
        }
        taken
    }

    /// Gates whose worker's rest ran out open again (the hang-check tick).
    pub(super) fn reopen_rested(&mut self) {
        if self.others.is_none() {
            return;
        }
        for channel in self.channels.ids() {
            self.update_gate(channel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_protocol::page::Page;

    /// A worker's shared side, and the worker's writable view of its page.
    fn shared() -> (ThreadsSeen, Page) {
        let (herds, _workers) = std::os::unix::net::UnixStream::pair().unwrap();
        let page = Page::create().unwrap();
        let workers_page = Page::map(page.fd().try_clone_to_owned().unwrap(), true).unwrap();
        let shared = SharedWorker::new(Arc::new(OwnedFd::from(herds)), Arc::new(page), None);
        (ThreadsSeen::new(Arc::new(shared)), workers_page)
    }

    #[test]
    fn takes_count_per_thread_and_never_beyond_what_that_thread_sent() {
        let (mut seen, page) = shared();
        let now = Instant::now();
        seen.shared.sent[1].store(5, Relaxed);
        seen.shared.sent[2].store(3, Relaxed);
        // Thread 2's page counter runs ahead of its sends (a lying worker,
        // or a send counted after its take): clamped, the rest later.
        page.add_received_from(1, 2);
        page.add_received_from(2, 4);
        assert_eq!(seen.catch_up(now), (8, 5));
        assert_eq!(seen.outstanding(), 3);
        assert_eq!(seen.waiting_since, Some(now), "a take restarts the wait");
        // Nothing new: the same counts, the wait goes on from then.
        let later = now + Duration::from_secs(1);
        assert_eq!(seen.catch_up(later), (0, 0));
        assert_eq!(seen.waiting_since, Some(now));
        // Thread 2 sends one more: its early take now counts.
        seen.shared.sent[2].store(4, Relaxed);
        assert_eq!(seen.catch_up(later), (1, 1));
        assert_eq!(seen.waiting_since, Some(later));
        // Thread 0's counter is not the others' business.
        page.add_received(10);
        assert_eq!(seen.catch_up(later), (0, 0));
        assert_eq!(seen.outstanding(), 3);
    }

    #[test]
    fn taken_back_is_neither_outstanding_nor_taken_and_the_rest_can_be_counted_at_once() {
        let (mut seen, page) = shared();
        let now = Instant::now();
        seen.shared.sent[1].store(6, Relaxed);
        seen.shared.taken_back[1].store(2, Relaxed);
        page.add_received_from(1, 1);
        assert_eq!(seen.catch_up(now), (6, 1));
        assert_eq!(seen.outstanding(), 3);
        // The kernel says the channel is empty: the 3 were taken.
        assert_eq!(seen.all_taken(), 3);
        assert_eq!((seen.outstanding(), seen.waiting_since), (0, None));
        // The page's own count, when it comes, adds nothing.
        page.add_received_from(1, 3);
        assert_eq!(seen.catch_up(now), (0, 0));
        assert_eq!(seen.waiting_since, None, "nothing waits");
    }
}
