//! From `accept` to a worker: accepting (and backing off, and shedding
//! with the reserve fd when out of fds), the wait queue, refusals parked,
//! and choosing and sending to a worker.

use super::*;

/// How a connection has been refused, so that one every worker refuses
/// waits (parks) instead of bouncing between them.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Refusals {
    /// The capacity epoch of the refusals counted in `count`.
    pub(super) epoch: u64,
    /// Refusals since the epoch last changed.
    pub(super) count: u32,
    /// Times it was parked; sets the next wait.
    pub(super) rounds: u32,
    /// Parked: not offered again before then, unless the epoch changes.
    pub(super) retry_at: Option<Instant>,
}

impl Refusals {
    /// Counts one more refusal; once as many workers as there are have
    /// refused it with nothing changed since, it parks.
    pub(super) fn refused(&mut self, epoch: u64, serving: usize, now: Instant) {
        if self.epoch != epoch {
            self.epoch = epoch;
            self.count = 0;
        }
        self.count += 1;
        if self.count as usize >= serving.max(1) {
            let wait = REFUSED_RETRY_MIN.saturating_mul(1 << self.rounds.min(16));
            self.retry_at = Some(now + wait.min(REFUSED_RETRY_MAX));
            self.rounds = self.rounds.saturating_add(1);
            self.count = 0;
        }
    }

    /// Parked at `now`: its wait has not run out and no worker changed.
    pub(super) fn parked(&self, epoch: u64, now: Instant) -> bool {
        self.epoch == epoch && self.retry_at.is_some_and(|at| at > now)
    }
}

/// A spare file descriptor ([`HandoffLoop::shed`] gives it up for a moment).
pub(super) fn reserve_fd() -> Option<OwnedFd> {
    std::fs::File::open("/dev/null").ok().map(OwnedFd::from)
}

impl HandoffLoop {
    /// Accepts until the listener says EAGAIN (edge-triggered: we get no
    /// second wake-up for connections we leave in the kernel queue). With
    /// `slot`, from that slot's socket in the listener's kernel rotation
    /// (one whose worker is gone); its connections count as the listener's.
    pub(super) fn accept_all(&mut self, listener: ListenerIx, slot: Option<SlotIx>) {
        while self.accept_paused_until.is_none() {
            let Some(listening) = self.listeners.get(listener).and_then(Option::as_ref) else {
                return;
            };
            let socket = match slot {
                None => &listening.socket,
                Some(slot) => match listening.rotation.as_ref().and_then(|r| r.accepting(slot)) {
                    Some(socket) => socket,
                    None => return,
                },
            };
            match socket.accept() {
                Ok((stream, peer)) => {
                    self.accept_backoff = ACCEPT_BACKOFF_MIN;
                    self.fd_short_since = None;
                    // For a wildcard listener this is 0.0.0.0/[::] and the
                    // port: a worker that takes queued hand-offs asks the
                    // socket itself, and for the others `send_connection`
                    // does (no `getsockname` per connection otherwise).
                    let local = listening.local;
                    let connection_id = self.fresh_id();
                    self.counters.accepted[listener].fetch_add(1, Relaxed);
                    // Each thread alone writes its own: no locked add.
                    bump(&self.counters.thread_accepted[0], 1);
                    if slot.is_some() {
                        self.counters.requeued_slot_queue.fetch_add(1, Relaxed);
                    }
                    self.take_new(Accepted {
                        stream,
                        handoff: Handoff {
                            connection_id,
                            listener: u16::from(listener),
                            peer,
                            local,
                        },
                        accepted_at: Instant::now(),
                        refused_by: None,
                        refusals: Refusals::default(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Queue drained without a resource error: any fd shortage is over.
                    self.accept_backoff = ACCEPT_BACKOFF_MIN;
                    self.fd_short_since = None;
                    // What this accept run gave workers of queued hand-offs goes now.
                    self.flush_unsent();
                    return;
                }
                Err(e) => {
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                        let now = Instant::now();
                        let since = *self.fd_short_since.get_or_insert(now);
                        if now.duration_since(since) >= self.limits.queue_timeout {
                            self.shed(listener, slot);
                        }
                    }
                    self.on_accept_error(listener, e);
                }
            }
        }
    }

    /// herd has been out of fds for `queue_timeout`: the connections in the
    /// kernel's queue would wait for good. Each is accepted with the
    /// reserve fd, closed at once (the client gets an answer, a closed
    /// connection, rather than a hang), and the reserve taken again.
    pub(super) fn shed(&mut self, listener: ListenerIx, slot: Option<SlotIx>) {
        for _ in 0..SHED_BATCH {
            drop(self.reserve_fd.take());
            let Some(listening) = self.listeners.get(listener).and_then(Option::as_ref) else {
                break;
            };
            let socket = match slot {
                None => Some(&listening.socket),
                Some(slot) => listening.rotation.as_ref().and_then(|r| r.accepting(slot)),
            };
            let Some(Ok((stream, _))) = socket.map(|s| s.accept()) else {
                break;
            };
            drop(stream);
            let total = self.counters.dropped_fd_limit.fetch_add(1, Relaxed) + 1;
            if total.is_power_of_two() {
                warn!(
                    listener = listener.get(),
                    total,
                    event = "out_of_fds",
                    "out of file descriptors for {:?} (queue_timeout): closed a connection waiting in the kernel queue",
                    self.limits.queue_timeout
                );
            }
            self.reserve_fd = reserve_fd();
            if self.reserve_fd.is_none() {
                break;
            }
        }
        if self.reserve_fd.is_none() {
            self.reserve_fd = reserve_fd();
        }
    }

    pub(super) fn on_accept_error(&mut self, listener: ListenerIx, e: io::Error) {
        self.counters.accept_errors[accept_error_kind(&e)].fetch_add(1, Relaxed);
        match e.raw_os_error() {
            // The client gave up before we accepted, or a signal: try the next one.
            Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO) => {}
            // Out of fds or memory: the connection stays in the kernel queue.
            // Pause (never spin), log once per episode, and retry after the pause.
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                if self.accept_backoff == ACCEPT_BACKOFF_MIN {
                    warn!(
                        listener = listener.get(),
                        event = "accept_paused",
                        "accept failed: {e}; pausing accepts (connections wait in the kernel queue)"
                    );
                }
                self.pause_accepting();
            }
            _ => {
                error!(
                    listener = listener.get(),
                    event = "accept_failed",
                    "accept failed: {e}"
                );
                self.pause_accepting();
            }
        }
    }

    pub(super) fn pause_accepting(&mut self) {
        self.accept_paused_until = Some(Instant::now() + self.accept_backoff);
        self.accept_backoff = (self.accept_backoff * 2).min(ACCEPT_BACKOFF_MAX);
    }

    /// A new connection: straight to a worker when nothing from its
    /// listener waits before it.
    pub(super) fn take_new(&mut self, conn: Accepted) {
        let lane = conn.listener();
        let conn = if self.queue.lane_is_empty(lane) {
            match self.try_dispatch(conn) {
                Ok(()) => return,
                Err(conn) => conn,
            }
        } else {
            conn
        };
        if self.queue.len() >= self.limits.queue_limit {
            drop(conn);
            let total = self.counters.dropped_queue_full.fetch_add(1, Relaxed) + 1;
            if total.is_power_of_two() {
                warn!(
                    total,
                    queue_limit = self.limits.queue_limit,
                    event = "queue_full",
                    "no worker can take connections and the queue is full: closed a new connection"
                );
            }
        } else {
            self.queue.push_back(lane, conn);
        }
    }

    /// Dispatches what waits, each listener's line in order until its front
    /// finds no worker; a stuck line does not hold up the others.
    pub(super) fn flush_queue(&mut self) {
        let now = Instant::now();
        for lane in self.queue.busy_lanes() {
            while let Some(conn) = self.queue.pop_front(lane) {
                // A connection every worker refused waits its turn (and
                // so does its line: first in, first out).
                if conn.refusals.parked(self.capacity_epoch, now) {
                    self.queue.push_front(lane, conn);
                    break;
                }
                if let Err(conn) = self.try_dispatch(conn) {
                    self.queue.push_front(lane, conn);
                    break;
                }
            }
        }
        self.flush_unsent();
    }

    /// Sends `conn` to the worker the policy picks; tries the next pick if a
    /// channel turns out full or dead. Gives the connection back when no
    /// worker can take it now.
    // The Err variant hands the 128-byte connection back by value: a move,
    // where boxing it would cost an allocation per connection.
    #[allow(clippy::result_large_err)]
    pub(super) fn try_dispatch(&mut self, mut conn: Accepted) -> Result<(), Accepted> {
        let now = Instant::now();
        loop {
            let channels = &self.channels;
            let active = &self.active;
            let limits = &self.limits;
            let listener = conn.listener();
            let slot = self
                .dispatcher
                .choose(conn.handoff.peer.ip(), active.len(), |s| {
                    let s = SlotIx(s);
                    if conn.refused_by == Some(s) {
                        return None;
                    }
                    let worker = active[s].and_then(|c| channels[c].as_ref())?;
                    worker
                        .can_take(listener, now, limits)
                        .then(|| worker.load())
                });
            let Some(slot) = slot.map(SlotIx) else {
                return Err(conn);
            };
            let channel = self.active[slot].expect("chosen slot is live");
            let worker = self.channels[channel]
                .as_mut()
                .expect("chosen slot is live");
            if worker.takes_queued() {
                self.give_queued(channel, conn);
                return Ok(());
            }
            if conn.handoff.local.ip().is_unspecified() {
                // A wildcard listener: protocol 1 names the connection's own
                // address (a queued worker asks its socket when it wants it).
                if let Ok(local) = conn.stream.local_addr() {
                    conn.handoff.local = local;
                }
            }
            let sent = worker.send_connection(&conn.handoff, conn.stream.as_fd());
            match sent {
                Ok(()) => {
                    worker.in_flight.push_back(InFlight { conn, sent_at: now });
                    self.counters.in_flight.fetch_add(1, Relaxed);
                    if worker.count_sent(1) {
                        let _ = self.events.send(Event::RecycleDue {
                            worker: worker.worker,
                        });
                    }
                    if worker.wants_write() {
                        self.watch_writable(channel, true);
                    }
                    return Ok(());
                }
                // Full channel, or too many fds in flight for this user:
                // skip the worker until it drains or acknowledges.
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.raw_os_error() == Some(libc::ETOOMANYREFS) =>
                {
                    worker.blocked = true;
                    self.watch_writable(channel, true);
                }
                Err(e) => {
                    debug!(slot = slot.get(), "worker channel failed on send: {e}");
                    self.retire(channel, Retired::ChannelClosed);
                }
            }
        }
    }
}
