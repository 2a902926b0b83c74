//! One worker's channel as the hand-off loop holds it: its role, what is
//! in flight to it, what it acknowledged and closed, what it may take next,
//! and the bad messages it sent (counted and rate-limited).
//!
//! The channel speaks one of two protocols ([`Protocol`]): herd's own
//! (docs/protocol.md) or Node.js cluster IPC. Each act on it is one method
//! ([`WorkerChannel::send_connection`], [`WorkerChannel::send_drain`],
//! [`WorkerChannel::read_messages`], [`WorkerChannel::flush`]) that matches
//! on the protocol, so the loop above never asks which one it has.

use super::*;
use herd_protocol::page::MAX_HANDOFF_THREADS;

pub(super) struct WorkerChannel {
    pub(super) slot: SlotIx,
    pub(super) worker: WorkerId,
    pub(super) pid: u32,
    /// herd's end; the other hand-off threads send on it too.
    pub(super) channel: Arc<OwnedFd>,
    /// As the supervisor last said.
    pub(super) role: Role,
    /// Found hung: gets nothing more, whatever its role, until it is gone.
    pub(super) hung: bool,
    /// See [`Command::AddWorker`].
    pub(super) hang_timeout: Option<Duration>,
    /// The last send said the channel is full; cleared when it drains.
    pub(super) blocked: bool,
    /// DRAIN could not be sent yet because the channel was full.
    pub(super) drain_pending: bool,
    /// Sent, not yet acknowledged, oldest first. Capacity max_unacked.
    pub(super) in_flight: VecDeque<InFlight>,
    /// Connections sent to this worker.
    pub(super) sent: u64,
    /// Of those, how many it refused (NACK, RETURN).
    pub(super) refused: u64,
    /// Connections it acknowledged.
    pub(super) acked: u64,
    /// Connections it reported CLOSED; `None` until the first report.
    pub(super) closed: Option<u64>,
    /// Send at most this many, then report RecycleDue (`max_connections_per_worker`).
    pub(super) recycle_after: Option<u64>,
    /// What it sent that herd could not use, by kind: logged at the 1st,
    /// 2nd, 4th, ... time, so a broken worker cannot flood the log.
    pub(super) errors: ProtocolErrors,
    /// It had more to read than one turn's budget: it is read again next turn.
    pub(super) more_to_read: bool,
    /// The protocol the worker speaks, with that protocol's own state.
    pub(super) protocol: Protocol,
    /// Its counter page and herd's copy of its end, until READY says
    /// which it uses (`queued`).
    pub(super) link: Option<crate::process::WorkerLink>,
    /// Its counter page, if READY said it counts there.
    pub(super) page: Option<PageSeen>,
    /// herd's copy of the worker's end of the channel, if it takes queued
    /// hand-offs: what is queued there is taken back from it.
    pub(super) worker_end: Option<OwnedFd>,
    /// Queued hand-offs sent and not yet taken off the channel, oldest first.
    pub(super) queued: VecDeque<Queued>,
    /// Given to it this turn, sent together at the end of the turn
    /// (at most [`herd_protocol::wire::MAX_BATCH`]).
    pub(super) unsent: Vec<Accepted>,
    /// herd watches its channel for room, which each message it takes off
    /// makes: the one sign a worker that sends no ACK gives that it took
    /// one (see [`HandoffLoop::watch_takes`]).
    pub(super) watching_takes: bool,
    /// When herd last took back what sat queued to it for `ack_timeout`:
    /// it gets nothing for another `ack_timeout` (see
    /// [`HandoffLoop::reclaim_stalled`]).
    pub(super) reclaimed_at: Option<Instant>,
    /// What the other hand-off threads send it and thread 0 counted of
    /// that, if it counts per thread and they run.
    pub(super) threads: Option<super::from_threads::ThreadsSeen>,
    /// It is on the loop's list of channels caught up with every turn.
    pub(super) queued_listed: bool,
}

/// The protocol on a worker's channel.
pub(super) enum Protocol {
    /// herd protocol v1: one SEQPACKET message per send, fds in SCM_RIGHTS.
    Herd,
    /// Node.js cluster IPC: JSON lines, an outbox for what did not fit, and
    /// the servers (listeners) the worker asked for.
    Node(NodeChannel),
}

/// One message a worker sent, in its protocol.
pub(super) enum Message {
    Herd(WorkerMessage),
    Node(node_ipc::NodeMessage),
    /// RETURN with the connection's fd (queued hand-offs).
    Returned(Handoff, OwnedFd),
}

/// How a turn of reading a channel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReadEnd {
    /// Nothing more to read now.
    Drained,
    /// The turn's budget ran out with more waiting.
    More,
    /// The worker closed its end (or the channel failed).
    Closed,
}

impl WorkerChannel {
    /// Notes a message herd ignores; logs it at the 1st, 2nd, 4th, ... time.
    pub(super) fn bad_message(&mut self, kind: BadMessage, what: impl std::fmt::Display) {
        let seen = match kind {
            BadMessage::Malformed => &mut self.errors.malformed,
            BadMessage::StrayFd => &mut self.errors.stray_fds,
            BadMessage::UnknownId => &mut self.errors.unknown_ids,
        };
        if let Some(total) = seen.record() {
            warn!(
                slot = self.slot.get(),
                pid = self.pid,
                total,
                kind = ?kind,
                event = "bad_message",
                "ignoring what the worker sent: {what}"
            );
        }
    }

    /// Sends one connection: a HANDOFF message with the fd (herd), or a
    /// `NODE_HANDLE` line with it (Node, queued if the channel is full).
    pub(super) fn send_connection(
        &mut self,
        handoff: &Handoff,
        stream: BorrowedFd<'_>,
    ) -> io::Result<()> {
        match &mut self.protocol {
            Protocol::Herd => {
                let mut message = [0u8; HANDOFF_LEN];
                fdpass::send_with_fd(self.channel.as_fd(), handoff.encode(&mut message), stream)
            }
            Protocol::Node(node) => node.send_connection(
                self.channel.as_fd(),
                handoff.connection_id,
                ListenerIx::from(handoff.listener),
                stream,
            ),
        }
    }

    /// Asks the worker to stop taking connections: DRAIN (herd), or Node's
    /// `disconnect` (the worker closes its servers, then its end of the
    /// channel, and exits once idle).
    pub(super) fn send_drain(&mut self) -> io::Result<()> {
        match &mut self.protocol {
            Protocol::Herd => {
                fdpass::send(self.channel.as_fd(), &PrimaryMessage::encode_drain(), true)
            }
            Protocol::Node(node) => {
                let seq = node.next_seq();
                node.send_line(self.channel.as_fd(), node_ipc::disconnect(seq))
            }
        }
    }

    /// Reads what waits on the channel, one turn's budget at most, into
    /// `out`. What herd cannot use is counted and logged here, not returned.
    pub(super) fn read_messages(&mut self, out: &mut Vec<Message>) -> ReadEnd {
        match &mut self.protocol {
            Protocol::Node(node) => {
                let mut messages = Vec::new();
                let read = node.read(self.channel.as_fd(), &mut messages);
                out.extend(messages.into_iter().map(Message::Node));
                match read {
                    Ok(node_ipc::Read::Drained) => ReadEnd::Drained,
                    Ok(node_ipc::Read::More) => ReadEnd::More,
                    Ok(node_ipc::Read::Closed) => ReadEnd::Closed,
                    Err(e) => {
                        debug!(slot = self.slot.get(), "Node worker channel failed: {e}");
                        ReadEnd::Closed
                    }
                }
            }
            Protocol::Herd => self.read_herd_messages(out),
        }
    }

    fn read_herd_messages(&mut self, out: &mut Vec<Message>) -> ReadEnd {
        let mut buf = [0u8; MAX_MESSAGE_LEN];
        for _ in 0..READ_BUDGET_MESSAGES {
            match fdpass::recv_with_fd(self.channel.as_fd(), &mut buf, true) {
                Ok(Some(mut received)) => {
                    if let Ok(WorkerMessage::Return(handoff)) =
                        WorkerMessage::decode(&buf[..received.len])
                    {
                        match received.fd.take() {
                            Some(fd) => out.push(Message::Returned(handoff, fd)),
                            None => self.bad_message(
                                BadMessage::Malformed,
                                "a RETURN without its connection's fd",
                            ),
                        }
                        continue;
                    }
                    if received.fd.is_some() {
                        // Closed when `received` is dropped.
                        self.bad_message(
                            BadMessage::StrayFd,
                            "a file descriptor (herd never asks a worker for one); closed it",
                        );
                    }
                    match WorkerMessage::decode(&buf[..received.len]) {
                        Ok(message) => out.push(Message::Herd(message)),
                        Err(e) => self.bad_message(
                            BadMessage::Malformed,
                            format!("a malformed message: {e}"),
                        ),
                    }
                }
                Ok(None) => return ReadEnd::Closed,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadEnd::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    self.bad_message(BadMessage::Malformed, format!("a malformed message: {e}"));
                }
                Err(e) => {
                    debug!(
                        slot = self.slot.get(),
                        "worker channel failed on receive: {e}"
                    );
                    return ReadEnd::Closed;
                }
            }
        }
        ReadEnd::More
    }

    /// Sends what a full channel kept back (Node's outbox; herd's protocol
    /// keeps nothing back, a full channel only blocks the worker).
    pub(super) fn flush(&mut self) -> io::Result<()> {
        match &mut self.protocol {
            Protocol::Herd => Ok(()),
            Protocol::Node(node) => node.flush(self.channel.as_fd()),
        }
    }

    /// Does the loop need to hear when the channel has room?
    pub(super) fn wants_write(&self) -> bool {
        self.blocked || matches!(&self.protocol, Protocol::Node(node) if node.wants_write())
    }

    /// Does the worker take connections from `listener`? A herd-protocol
    /// worker takes them from every listener; a Node worker from those it
    /// asked to listen on.
    pub(super) fn serves(&self, listener: ListenerIx) -> bool {
        match &self.protocol {
            Protocol::Herd => true,
            Protocol::Node(node) => node.serves(listener),
        }
    }

    /// Is this a Node worker that listens on `listener`?
    pub(super) fn node_serves(&self, listener: ListenerIx) -> bool {
        matches!(&self.protocol, Protocol::Node(node) if node.serves(listener))
    }

    /// Counts `n` more connections sent to (or accepted by) this worker;
    /// true when that reaches its `recycle_after` (`max_connections_per_worker`),
    /// which happens once.
    pub(super) fn count_sent(&mut self, n: u64) -> bool {
        let before = self.sent;
        self.sent += n;
        self.recycle_after
            .is_some_and(|limit| before < limit && self.sent >= limit)
    }

    /// Counts `n` more connections the worker has (acknowledged, taken off
    /// its channel, or accepted by itself): handed off, and open while it
    /// reports CLOSED.
    pub(super) fn count_acknowledged(&mut self, n: u64, counters: &Counters) {
        if n == 0 {
            return;
        }
        counters.handed_off[self.slot].fetch_add(n, Relaxed);
        self.acked += n;
        if self.closed.is_some() {
            counters.open_connections[self.slot].fetch_add(n, Relaxed);
        }
    }

    /// Counts up to `n` connections the worker reported closed, and returns
    /// how many it counted. Never more closed than acknowledged: the count
    /// cannot wrap, so least-conn cannot be fooled into starving it.
    pub(super) fn count_closed(&mut self, n: u64, counters: &Counters) -> u64 {
        let open = &counters.open_connections[self.slot];
        if self.closed.is_none() {
            // The first report: from now on this worker's count is
            // tracked, and all it acknowledged so far counts as open.
            self.closed = Some(0);
            counters.reports_closed[self.slot].store(true, Relaxed);
            open.fetch_add(self.acked, Relaxed);
        }
        let closed = self.closed.as_mut().expect("set above");
        let counted = n.min(self.acked.saturating_sub(*closed));
        *closed += counted;
        open.fetch_sub(counted, Relaxed);
        counted
    }

    /// Connections this worker holds, for least-conn: those in flight, plus
    /// the acknowledged ones not yet reported closed (if it reports CLOSED).
    pub(super) fn load(&self) -> u64 {
        if let Some(shared) = self.threads.as_ref().map(|t| &t.shared) {
            // Every thread's, as every thread counts it.
            return self.unsent.len() as u64 + shared.load(MAX_HANDOFF_THREADS);
        }
        if let Some(seen) = &self.page {
            // Live from the page, not as of the last tally: what it was
            // sent and kept, less what it says it closed (never below 0).
            let kept = self.sent.saturating_sub(self.refused);
            let closed = seen.page.closed().max(seen.closed);
            return self.unsent.len() as u64 + kept.saturating_sub(closed);
        }
        let open = self
            .closed
            .map_or(0, |closed| self.acked.saturating_sub(closed));
        self.outstanding() as u64 + open
    }

    /// Can the worker be sent a connection from `listener` now?
    pub(super) fn can_take(
        &self,
        listener: ListenerIx,
        now: Instant,
        limits: &HandoffSettings,
    ) -> bool {
        self.role == Role::Serving
            && !self.hung
            && !self.blocked
            && self.recycle_after.is_none_or(|limit| self.sent < limit)
            && self.serves(listener)
            && self.outstanding() < limits.max_unacked
            && self
                .reclaimed_at
                .is_none_or(|at| now.duration_since(at) >= limits.ack_timeout)
            && self
                .oldest_sent()
                .is_none_or(|oldest| now.duration_since(oldest) < limits.ack_timeout)
    }
}

/// What was wrong with a message a worker sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BadMessage {
    Malformed,
    StrayFd,
    UnknownId,
}

/// The kinds of bad message a worker can send, each counted on its own.
#[derive(Debug, Default)]
pub(super) struct ProtocolErrors {
    /// Too long, truncated, or not a message of the protocol.
    pub(super) malformed: Occurrences,
    /// A file descriptor attached (herd never asks a worker for one).
    pub(super) stray_fds: Occurrences,
    /// An ACK, NACK or CLOSED for a connection herd has not got in flight
    /// to it (never sent, already answered, or taken back).
    pub(super) unknown_ids: Occurrences,
    /// BOUND reports (the preload library's binds), captured and passed
    /// apart, each logged at the 1st, 2nd, 4th, ... so a program binding in
    /// a loop cannot flood the log, nor hide what was captured.
    pub(super) captured: Occurrences,
    pub(super) passed: Occurrences,
    /// Times what was queued to it was taken back for `ack_timeout`.
    pub(super) stalls: Occurrences,
}

/// Removes the in-flight entry for `id`: the front in the common case, since
/// a worker acknowledges in the order it received.
pub(super) fn take_in_flight(in_flight: &mut VecDeque<InFlight>, id: u64) -> Option<InFlight> {
    if in_flight.front()?.conn.handoff.connection_id == id {
        return in_flight.pop_front();
    }
    let position = in_flight
        .iter()
        .position(|entry| entry.conn.handoff.connection_id == id)?;
    in_flight.remove(position)
}
