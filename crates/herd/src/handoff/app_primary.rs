//! The app's own primary (`node.primary = "run"`) as the hand-off loop
//! sees it: its channel beside the workers', and the relay between them.
//!
//! The loop owns every worker channel, so it is where a worker's
//! `process.send()` becomes a `message` for the primary, and a primary's
//! `worker.send(msg, socket)` a line (and fd) on that worker's channel;
//! the workers' lives (started, online, listening, channel closed, exited)
//! are told to the primary from here too. Both directions are bounded:
//! [`node_primary::channel::MAX_OUTBOX`] towards the primary,
//! [`node_ipc::MAX_RELAY_QUEUE`] per worker; past them a message is dropped
//! and counted (`node_relay_dropped`, at the 1st, 2nd, 4th, ...).

use super::*;

use crate::node_primary::channel::{PrimaryChannel, ReadEnd as PrimaryRead, Received};
use crate::node_primary::{self, Request, Target};

/// The primary's channel's token (below the waker's).
pub(super) const APP_PRIMARY: Token = Token(usize::MAX - 1);

/// The relay's state; inert until [`Command::AppPrimaryRuns`].
#[derive(Debug, Default)]
pub(super) struct AppPrimaryLink {
    /// `node.primary = "run"`: workers' own messages are relayed, and a
    /// worker is ready once `online` (under the app's primary, workers
    /// such as `@socket.io/sticky`'s never listen).
    pub(super) runs: bool,
    /// The running primary's channel; `None` between its exit and restart.
    channel: Option<PrimaryChannel>,
    /// It had more to read than one turn's budget.
    pub(super) more: bool,
    /// Messages for the primary dropped: its outbox was full, or it was not running.
    to_primary_dropped: Occurrences,
    /// Messages from it dropped: the worker's queue was full, or no such worker.
    to_workers_dropped: Occurrences,
    unsupported: Occurrences,
}

impl HandoffLoop {
    /// A new (or restarted) primary: its channel replaces the last, and it
    /// hears of every worker that is running.
    pub(super) fn set_app_primary(&mut self, pid: u32, fd: OwnedFd) {
        self.drop_app_primary();
        let raw = fd.as_raw_fd();
        let registered =
            self.poll
                .registry()
                .register(&mut SourceFd(&raw), APP_PRIMARY, Interest::READABLE);
        if let Err(e) = registered {
            error!(
                event = "channel_watch_failed",
                "cannot watch the app primary's channel: {e}"
            );
            return;
        }
        self.app_primary.channel = Some(PrimaryChannel::new(pid, fd));
        for channel in self.channels.ids() {
            let Some(worker) = self.channels[channel].as_ref() else {
                continue;
            };
            let id = worker.slot.get() as u64 + 1;
            let mut lines = vec![node_primary::fork(id, worker.pid)];
            // Past starting, it was ready: online (a draining one too).
            if worker.role != Role::Starting {
                lines.push(node_primary::worker_event("online", id, worker.pid));
            }
            if matches!(&worker.protocol, Protocol::Node(node) if node.listening()) {
                lines.push(node_primary::worker_event("listening", id, worker.pid));
            }
            for line in lines {
                self.tell_app_primary(line);
            }
        }
        self.read_app_primary();
    }

    /// The primary's channel carried over `herd upgrade`: it knows of the
    /// workers already, so nothing is said to it; what it sent meanwhile
    /// is read now.
    pub(super) fn restore_app_primary(
        &mut self,
        pid: u32,
        fd: OwnedFd,
        inbox: Vec<u8>,
    ) -> io::Result<()> {
        self.app_primary.runs = true;
        let raw = fd.as_raw_fd();
        self.poll
            .registry()
            .register(&mut SourceFd(&raw), APP_PRIMARY, Interest::READABLE)?;
        self.app_primary.channel = Some(PrimaryChannel::restored(pid, fd, inbox));
        self.read_app_primary();
        Ok(())
    }

    /// What `herd upgrade` carries of the link: whether it relays, and the
    /// running primary's channel (pid, fd, a partial line).
    pub(super) fn carried_app_primary(
        &self,
    ) -> Result<Option<(u32, std::os::fd::RawFd, Vec<u8>)>, String> {
        match &self.app_primary.channel {
            None => Ok(None),
            Some(channel) => channel.carried().map(Some).ok_or_else(|| {
                "the app's primary has messages not yet written to it; try again".into()
            }),
        }
    }

    fn drop_app_primary(&mut self) {
        if let Some(old) = self.app_primary.channel.take() {
            let raw = old.fd().as_raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
        }
        self.app_primary.more = false;
    }

    /// A line for the primary, or a counted drop.
    fn tell_app_primary(&mut self, line: Vec<u8>) {
        let sent = match self.app_primary.channel.as_mut() {
            Some(channel) => channel.send(line),
            None => Ok(false),
        };
        self.after_app_primary_send(sent);
    }

    /// Watches for room, counts a drop, or gives up on a failed channel.
    fn after_app_primary_send(&mut self, sent: io::Result<bool>) {
        let link = &mut self.app_primary;
        match sent {
            Ok(true) => self.watch_app_primary(),
            Ok(false) => {
                if let Some(total) = link.to_primary_dropped.record() {
                    warn!(
                        total,
                        direction = "to_primary",
                        event = "node_relay_dropped",
                        "dropped a message for the app's primary: it is not running, or has {} bytes unread",
                        node_primary::channel::MAX_OUTBOX
                    );
                }
            }
            // Its exit is reaped by the supervisor, which starts it again.
            Err(e) => {
                debug!("the app primary's channel failed on send: {e}");
                self.drop_app_primary();
            }
        }
    }

    fn watch_app_primary(&mut self) {
        let Some(channel) = self.app_primary.channel.as_ref() else {
            return;
        };
        let interest = if channel.wants_write() {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        let raw = channel.fd().as_raw_fd();
        let _ = self
            .poll
            .registry()
            .reregister(&mut SourceFd(&raw), APP_PRIMARY, interest);
    }

    /// The primary's channel has room, or something to read.
    pub(super) fn on_app_primary(&mut self, writable: bool, readable: bool) {
        if writable {
            let flushed = self.app_primary.channel.as_mut().map(PrimaryChannel::flush);
            if let Some(Err(e)) = flushed {
                debug!("the app primary's channel failed on send: {e}");
                return self.drop_app_primary();
            }
            self.watch_app_primary();
        }
        if readable {
            self.read_app_primary();
        }
    }

    /// Reads a turn's budget from the primary and carries out each request.
    pub(super) fn read_app_primary(&mut self) {
        self.app_primary.more = false;
        let Some(channel) = self.app_primary.channel.as_mut() else {
            return;
        };
        let mut received = Vec::new();
        let end = channel.read(&mut received);
        for one in received {
            self.on_app_primary_request(one);
        }
        match end {
            PrimaryRead::Drained => {}
            PrimaryRead::More => self.app_primary.more = true,
            PrimaryRead::Closed => self.drop_app_primary(),
            PrimaryRead::Broken => {
                // Still running (its channel is open): herd's channel to it
                // is gone, so it is stopped, reaped and started again.
                let pid = self.app_primary.channel.as_ref().map(|c| c.pid);
                warn!(
                    pid,
                    event = "node_primary_broken",
                    "the app's primary sent a line longer than {} bytes: closing its channel and stopping it (it is started again)",
                    node_primary::channel::MAX_LINE
                );
                if let Some(pid) = pid {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                self.drop_app_primary();
            }
        }
    }

    fn on_app_primary_request(&mut self, received: Received) {
        let Received { request, handle } = received;
        match request {
            Request::Send {
                to,
                line,
                handle: carries,
            } => {
                if carries {
                    // herd holds the fd now (or it never came: Node sends again).
                    let answer = if handle.is_some() {
                        node_primary::HANDLE_ACK
                    } else {
                        node_primary::HANDLE_NACK
                    };
                    let answered = self
                        .app_primary
                        .channel
                        .as_mut()
                        .map(|c| c.answer_handle(answer));
                    if let Some(Err(e)) = answered {
                        debug!("the app primary's channel failed on send: {e}");
                    }
                    self.watch_app_primary();
                    if handle.is_none() {
                        return;
                    }
                }
                self.relay_to_worker(to, line, handle);
            }
            Request::Kill { to, signal } => {
                if let Some(worker) = self.worker_of(to).and_then(|c| self.channels[c].as_ref()) {
                    let signal = signal.parse().unwrap_or(nix::sys::signal::Signal::SIGTERM);
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(worker.pid as i32),
                        signal,
                    );
                }
            }
            Request::Disconnect { to } => {
                if let Some(channel) = self.worker_of(to) {
                    self.drain_for_primary(channel);
                }
            }
            Request::Unsupported { what } => {
                if let Some(total) = self.app_primary.unsupported.record() {
                    warn!(
                        total,
                        what,
                        event = "node_primary_unsupported",
                        "the app's primary used what herd does not do: {what} (README: Node cluster apps)"
                    );
                }
            }
            Request::HandleAnswer | Request::Other => {}
        }
    }

    /// Node's `disconnect` to a worker the primary let go; its exit is
    /// reaped and its slot refilled as after any exit.
    fn drain_for_primary(&mut self, channel: ChannelIx) {
        let Some(worker) = self.channels[channel].as_mut() else {
            return;
        };
        let fd = worker.channel.as_fd();
        let Protocol::Node(node) = &mut worker.protocol else {
            return;
        };
        let seq = node.next_seq();
        let sent = node.send_line(fd, node_ipc::disconnect(seq));
        self.after_node_send(channel, sent);
    }

    /// The worker a request is for: the process it names, if herd runs it
    /// in that slot; without a pid, the slot's serving one, else one
    /// starting there.
    fn worker_of(&self, to: Target) -> Option<ChannelIx> {
        let slot = SlotIx(usize::try_from(to.id).ok()?.checked_sub(1)?);
        if let Some(pid) = to.pid {
            return self
                .channels
                .position(|c| c.as_ref().is_some_and(|c| c.slot == slot && c.pid == pid));
        }
        if let Some(&Some(channel)) = self.active.get(slot) {
            return Some(channel);
        }
        self.channels.position(|c| {
            c.as_ref()
                .is_some_and(|c| c.slot == slot && c.role == Role::Starting)
        })
    }

    fn relay_to_worker(&mut self, to: Target, line: Vec<u8>, handle: Option<OwnedFd>) {
        let target = self.worker_of(to);
        let id = to.id;
        let relayed = target.and_then(|channel| {
            let worker = self.channels[channel].as_mut()?;
            let fd = worker.channel.as_fd();
            let Protocol::Node(node) = &mut worker.protocol else {
                return None;
            };
            Some((channel, node.send_relayed(fd, line, handle)))
        });
        match relayed {
            Some((channel, Ok(()))) => self.after_node_send(channel, Ok(())),
            Some((channel, Err(node_ipc::RelayError::Io(e)))) => {
                self.after_node_send(channel, Err(e))
            }
            Some((_, Err(node_ipc::RelayError::Full))) | None => {
                if let Some(total) = self.app_primary.to_workers_dropped.record() {
                    warn!(
                        total,
                        id,
                        direction = "to_worker",
                        event = "node_relay_dropped",
                        "dropped a message from the app's primary for worker {id}: no such worker, or it has {} bytes unread",
                        node_ipc::MAX_RELAY_QUEUE
                    );
                }
            }
        }
    }

    /// The worker on `channel` sent a message of its own with a handle
    /// (its `NODE_HANDLE` `line`, answered already): relayed with the fd.
    pub(super) fn app_primary_handle(
        &mut self,
        channel: ChannelIx,
        line: &[u8],
        handle: Option<OwnedFd>,
    ) {
        let Some(worker) = self.channels[channel].as_ref() else {
            return;
        };
        let id = worker.slot.get() as u64 + 1;
        let Some(message) = node_primary::handle_message(id, worker.pid, line) else {
            return;
        };
        let sent = match self.app_primary.channel.as_mut() {
            Some(primary) => primary.send_with(message, handle),
            None => Ok(false),
        };
        self.after_app_primary_send(sent);
    }

    /// A worker joined: its own messages are relayed, and the primary hears of it.
    pub(super) fn app_primary_worker_added(&mut self, channel: ChannelIx) {
        if !self.app_primary.runs {
            return;
        }
        let Some(worker) = self.channels[channel].as_mut() else {
            return;
        };
        if let Protocol::Node(node) = &mut worker.protocol {
            node.relay_app_messages();
        }
        let line = node_primary::fork(worker.slot.get() as u64 + 1, worker.pid);
        self.tell_app_primary(line);
    }

    /// `online`, `listening` or `disconnect` of the worker on `channel`.
    pub(super) fn app_primary_worker_event(&mut self, channel: ChannelIx, event: &str) {
        if !self.app_primary.runs {
            return;
        }
        if let Some(worker) = self.channels[channel].as_ref() {
            let line = node_primary::worker_event(event, worker.slot.get() as u64 + 1, worker.pid);
            self.tell_app_primary(line);
        }
    }

    /// The worker on `channel` sent a message of its own.
    pub(super) fn app_primary_message(&mut self, channel: ChannelIx, raw: &[u8]) {
        if let Some(worker) = self.channels[channel].as_ref() {
            let line = node_primary::message(worker.slot.get() as u64 + 1, worker.pid, raw);
            self.tell_app_primary(line);
        }
    }

    /// The worker in `slot` (process `pid`) exited, as `status` says.
    pub(super) fn app_primary_exit(
        &mut self,
        slot: SlotIx,
        pid: u32,
        code: Option<i32>,
        signal: Option<i32>,
    ) {
        if !self.app_primary.runs {
            return;
        }
        let name = signal.and_then(|n| nix::sys::signal::Signal::try_from(n).ok());
        let line = node_primary::exit(slot.get() as u64 + 1, pid, code, name.map(|s| s.as_str()));
        self.tell_app_primary(line);
    }
}
