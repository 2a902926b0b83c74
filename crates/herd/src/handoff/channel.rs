//! One worker's channel as the hand-off loop holds it: its role, what is
//! in flight to it, what it acknowledged and closed, what it may take next,
//! and the bad messages it sent (counted and rate-limited).

use super::*;

pub(super) struct WorkerChannel {
    pub(super) slot: usize,
    pub(super) worker: WorkerId,
    pub(super) pid: u32,
    pub(super) channel: OwnedFd,
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
    /// A Node.js cluster worker: its framing state (`None`: herd's protocol).
    pub(super) node: Option<NodeChannel>,
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
                slot = self.slot,
                pid = self.pid,
                total,
                "ignoring what the worker sent: {what}"
            );
        }
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

    /// Connections this worker holds, for least-conn: those in flight, plus
    /// the acknowledged ones not yet reported closed (if it reports CLOSED).
    pub(super) fn load(&self) -> u64 {
        let open = self
            .closed
            .map_or(0, |closed| self.acked.saturating_sub(closed));
        self.in_flight.len() as u64 + open
    }

    /// Can the worker be sent a connection from `listener` now?
    pub(super) fn can_take(&self, listener: u16, now: Instant, limits: &HandoffSettings) -> bool {
        self.role == Role::Serving
            && !self.hung
            && !self.blocked
            && self.recycle_after.is_none_or(|limit| self.sent < limit)
            && self.node.as_ref().is_none_or(|node| node.serves(listener))
            && self.in_flight.len() < limits.max_unacked
            && self
                .in_flight
                .front()
                .is_none_or(|oldest| now.duration_since(oldest.sent_at) < limits.ack_timeout)
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
