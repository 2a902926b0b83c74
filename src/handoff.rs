//! The hand-off loop: accept → choose a worker → send the fd → wait for the ack.
//!
//! Owns the listening sockets, the primary's end of every worker channel and
//! every connection between `accept` and the worker's acknowledgement. It runs
//! on one dedicated thread with a plain mio event loop: no async runtime, no
//! lock and no allocation per connection (queues are preallocated and the
//! message is encoded on the stack). The supervisor talks to it through
//! [`Controller`] (commands in, woken by a mio `Waker`) and hears back through
//! an [`Event`] channel; neither is used per connection.
//!
//! A connection stays owned here until its worker acknowledges it, so a
//! worker that dies with connections still queued on its channel costs no
//! client anything: they go back to the front of the queue and on to another
//! worker.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use nix::libc;
use tracing::{debug, error, info, warn};

use crate::config::{HandoffSettings, MAX_WORKERS};
use crate::dispatch::{Dispatcher, Mode};
use crate::fdpass;
use crate::listener::BoundListener;
use crate::protocol::{Handoff, WorkerMessage, HANDOFF_LEN, MAX_MESSAGE_LEN};

const WAKER: Token = Token(usize::MAX);
/// Listener `i` has token `i`; worker slot `s` has token `WORKER_TOKEN_BASE + s`.
const WORKER_TOKEN_BASE: usize = 1 << 16;

/// First pause after accept fails for lack of fds/memory; doubles up to the max.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Long enough not to spin, short enough that clients barely notice.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What the supervisor asks of the hand-off loop.
#[derive(Debug)]
pub enum Command {
    /// A new worker process for `slot`; replaces whatever held the slot.
    AddWorker {
        slot: usize,
        /// Unique per spawned process, so events can't be confused across restarts.
        uid: u64,
        pid: u32,
        channel: OwnedFd,
    },
    /// Close the listeners and end the loop.
    Shutdown,
}

/// What the hand-off loop tells the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The worker said READY; it now gets connections.
    WorkerReady { slot: usize, uid: u64, pid: u32 },
    /// The worker's channel closed (it exited or closed it); `requeued`
    /// connections it had not acknowledged went back to the queue.
    ChannelClosed {
        slot: usize,
        uid: u64,
        requeued: usize,
    },
}

/// Lock-free counters the loop updates and anyone may read.
#[derive(Debug)]
pub struct Counters {
    /// Connections accepted, per listener index.
    pub accepted: Box<[AtomicU64]>,
    /// Connections a worker acknowledged, per slot.
    pub handed_off: Box<[AtomicU64]>,
    /// Connections taken back from a worker that died or refused them.
    pub requeued: AtomicU64,
    /// Connections closed because the wait queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Connections closed because no worker took them within `queue_timeout`.
    pub dropped_queue_timeout: AtomicU64,
    /// accept(2) failures other than "nothing to accept".
    pub accept_errors: AtomicU64,
}

impl Counters {
    pub fn new(listeners: usize) -> Self {
        let zeros = |n: usize| (0..n).map(|_| AtomicU64::new(0)).collect();
        Counters {
            accepted: zeros(listeners),
            handed_off: zeros(MAX_WORKERS),
            requeued: AtomicU64::new(0),
            dropped_queue_full: AtomicU64::new(0),
            dropped_queue_timeout: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
        }
    }
}

/// The supervisor's handle on the loop.
#[derive(Debug, Clone)]
pub struct Controller {
    commands: mpsc::Sender<Command>,
    waker: Arc<Waker>,
}

impl Controller {
    /// Queues a command and wakes the loop. Fails only once the loop has ended.
    pub fn send(&self, command: Command) -> io::Result<()> {
        self.commands
            .send(command)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "hand-off loop has stopped"))?;
        self.waker.wake()
    }
}

/// Starts the loop on its own thread.
pub fn spawn(
    listeners: Vec<BoundListener>,
    mode: Mode,
    limits: HandoffSettings,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    counters: Arc<Counters>,
) -> io::Result<(Controller, JoinHandle<()>)> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (commands_tx, commands) = mpsc::channel();
    let mut listening = Vec::with_capacity(listeners.len());
    for bound in listeners {
        let mut socket = mio::net::TcpListener::from_std(bound.socket);
        poll.registry()
            .register(&mut socket, Token(bound.index as usize), Interest::READABLE)?;
        listening.push(Listening {
            socket,
            local: bound.local,
            wildcard: bound.local.ip().is_unspecified(),
        });
    }
    let handoff_loop = HandoffLoop {
        poll,
        listeners: listening,
        workers: Vec::new(),
        dispatcher: Dispatcher::new(mode),
        queue: VecDeque::with_capacity(limits.queue_limit),
        limits,
        commands,
        events,
        counters,
        next_connection_id: 0,
        accept_paused_until: None,
        accept_backoff: ACCEPT_BACKOFF_MIN,
        shutting_down: false,
    };
    let thread = std::thread::Builder::new()
        .name("herd-handoff".into())
        .spawn(move || handoff_loop.run())?;
    Ok((
        Controller {
            commands: commands_tx,
            waker,
        },
        thread,
    ))
}

struct Listening {
    socket: mio::net::TcpListener,
    local: SocketAddr,
    /// Bound to 0.0.0.0/[::]: the local address must be asked per connection.
    wildcard: bool,
}

/// A connection between accept and a worker's acknowledgement.
struct Accepted {
    stream: mio::net::TcpStream,
    handoff: Handoff,
    accepted_at: Instant,
    /// The slot that refused this connection with NACK; it is not offered
    /// the connection again, so a refusal can't bounce back and forth.
    refused_by: Option<usize>,
}

/// A connection sent to a worker, awaiting its ACK.
struct InFlight {
    conn: Accepted,
    sent_at: Instant,
}

struct WorkerChannel {
    uid: u64,
    pid: u32,
    channel: OwnedFd,
    /// Set by the worker's READY; only ready workers get connections.
    ready: bool,
    /// The last send said the channel is full; cleared when it drains.
    blocked: bool,
    /// Sent, not yet acknowledged, oldest first. Capacity max_unacked.
    in_flight: VecDeque<InFlight>,
    /// Malformed messages already logged, so a broken worker can't flood the log.
    protocol_errors: u32,
}

impl WorkerChannel {
    fn can_take(&self, now: Instant, limits: &HandoffSettings) -> bool {
        self.ready
            && !self.blocked
            && self.in_flight.len() < limits.max_unacked
            && self
                .in_flight
                .front()
                .is_none_or(|oldest| now.duration_since(oldest.sent_at) < limits.ack_timeout)
    }

    fn token(slot: usize) -> Token {
        Token(WORKER_TOKEN_BASE + slot)
    }
}

struct HandoffLoop {
    poll: Poll,
    listeners: Vec<Listening>,
    /// Indexed by slot; `None` while a slot has no live channel.
    workers: Vec<Option<WorkerChannel>>,
    dispatcher: Dispatcher,
    /// Accepted connections no worker could take yet, oldest first.
    queue: VecDeque<Accepted>,
    limits: HandoffSettings,
    commands: mpsc::Receiver<Command>,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    counters: Arc<Counters>,
    next_connection_id: u64,
    /// Set after accept failed for lack of resources; accepting resumes then.
    accept_paused_until: Option<Instant>,
    accept_backoff: Duration,
    shutting_down: bool,
}

impl HandoffLoop {
    fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        while !self.shutting_down {
            let timeout = self
                .next_deadline()
                .map(|at| at.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    error!("hand-off loop cannot poll: {e}");
                    break;
                }
            }
            for event in events.iter() {
                match event.token() {
                    WAKER => self.run_commands(),
                    Token(index) if index < WORKER_TOKEN_BASE => self.accept_all(index),
                    Token(token) => {
                        let slot = token - WORKER_TOKEN_BASE;
                        if event.is_writable() {
                            self.unblock(slot);
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.read_worker(slot);
                        }
                    }
                }
            }
            self.on_timers(Instant::now());
            if !self.queue.is_empty() {
                self.flush_queue();
            }
        }
        debug!("hand-off loop stopped");
    }

    fn next_deadline(&self) -> Option<Instant> {
        let queue_expiry = self
            .queue
            .front()
            .map(|conn| conn.accepted_at + self.limits.queue_timeout);
        [queue_expiry, self.accept_paused_until]
            .into_iter()
            .flatten()
            .min()
    }

    fn on_timers(&mut self, now: Instant) {
        if self.accept_paused_until.is_some_and(|until| until <= now) {
            self.accept_paused_until = None;
            for index in 0..self.listeners.len() {
                self.accept_all(index);
            }
        }
        while let Some(conn) = self.queue.front() {
            if now.duration_since(conn.accepted_at) < self.limits.queue_timeout {
                break;
            }
            self.queue.pop_front();
            let total = self.counters.dropped_queue_timeout.fetch_add(1, Relaxed) + 1;
            if total.is_power_of_two() {
                warn!(
                    total,
                    "closed a connection that waited {:?} with no worker able to take it",
                    self.limits.queue_timeout
                );
            }
        }
    }

    fn run_commands(&mut self) {
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::AddWorker {
                    slot,
                    uid,
                    pid,
                    channel,
                } => self.add_worker(slot, uid, pid, channel),
                Command::Shutdown => {
                    self.shutting_down = true;
                    self.listeners.clear();
                }
            }
        }
    }

    fn add_worker(&mut self, slot: usize, uid: u64, pid: u32, channel: OwnedFd) {
        if slot >= MAX_WORKERS {
            error!(slot, "worker slot out of range; closing its channel");
            return;
        }
        if self.workers.len() <= slot {
            self.workers.resize_with(slot + 1, || None);
        }
        if self.workers[slot].is_some() {
            // The old process is gone (the supervisor only refills a slot after
            // its exit); collect any acks it left before taking back the rest.
            self.read_worker(slot);
            if self.workers[slot].is_some() {
                self.retire(slot);
            }
        }
        let raw = channel.as_raw_fd();
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&raw),
            WorkerChannel::token(slot),
            Interest::READABLE,
        ) {
            error!(slot, "cannot watch worker channel: {e}");
            return;
        }
        self.workers[slot] = Some(WorkerChannel {
            uid,
            pid,
            channel,
            ready: false,
            blocked: false,
            in_flight: VecDeque::with_capacity(self.limits.max_unacked),
            protocol_errors: 0,
        });
        // READY may already be waiting on the channel.
        self.read_worker(slot);
    }

    /// Accepts until the listener says EAGAIN (edge-triggered: we get no
    /// second wake-up for connections we leave in the kernel queue).
    fn accept_all(&mut self, index: usize) {
        while self.accept_paused_until.is_none() {
            let Some(listener) = self.listeners.get(index) else {
                return;
            };
            match listener.socket.accept() {
                Ok((stream, peer)) => {
                    self.accept_backoff = ACCEPT_BACKOFF_MIN;
                    let local = if listener.wildcard {
                        stream.local_addr().unwrap_or(listener.local)
                    } else {
                        listener.local
                    };
                    self.next_connection_id += 1;
                    self.counters.accepted[index].fetch_add(1, Relaxed);
                    self.take_new(Accepted {
                        stream,
                        handoff: Handoff {
                            connection_id: self.next_connection_id,
                            listener: index as u16,
                            peer,
                            local,
                        },
                        accepted_at: Instant::now(),
                        refused_by: None,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Queue drained without a resource error: any fd shortage is over.
                    self.accept_backoff = ACCEPT_BACKOFF_MIN;
                    return;
                }
                Err(e) => self.on_accept_error(index, e),
            }
        }
    }

    fn on_accept_error(&mut self, index: usize, e: io::Error) {
        self.counters.accept_errors.fetch_add(1, Relaxed);
        match e.raw_os_error() {
            // The client gave up before we accepted, or a signal: try the next one.
            Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO) => {}
            // Out of fds or memory: the connection stays in the kernel queue.
            // Pause (never spin), log once per episode, and retry after the pause.
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                if self.accept_backoff == ACCEPT_BACKOFF_MIN {
                    warn!(
                        listener = index,
                        "accept failed: {e}; pausing accepts (connections wait in the kernel queue)"
                    );
                }
                self.pause_accepting();
            }
            _ => {
                error!(listener = index, "accept failed: {e}");
                self.pause_accepting();
            }
        }
    }

    fn pause_accepting(&mut self) {
        self.accept_paused_until = Some(Instant::now() + self.accept_backoff);
        self.accept_backoff = (self.accept_backoff * 2).min(ACCEPT_BACKOFF_MAX);
    }

    /// A new connection: straight to a worker when nothing waits before it.
    fn take_new(&mut self, conn: Accepted) {
        let conn = if self.queue.is_empty() {
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
                    "no worker can take connections and the queue is full: closed a new connection"
                );
            }
        } else {
            self.queue.push_back(conn);
        }
    }

    fn flush_queue(&mut self) {
        while let Some(conn) = self.queue.pop_front() {
            if let Err(conn) = self.try_dispatch(conn) {
                self.queue.push_front(conn);
                return;
            }
        }
    }

    /// Sends `conn` to the worker the policy picks; tries the next pick if a
    /// channel turns out full or dead. Gives the connection back when no
    /// worker can take it now.
    // The Err variant hands the 128-byte connection back by value: a move,
    // where boxing it would cost an allocation per connection.
    #[allow(clippy::result_large_err)]
    fn try_dispatch(&mut self, conn: Accepted) -> Result<(), Accepted> {
        let now = Instant::now();
        let mut message = [0u8; HANDOFF_LEN];
        loop {
            let workers = &self.workers;
            let limits = &self.limits;
            let slot = self
                .dispatcher
                .choose(conn.handoff.peer.ip(), workers.len(), |s| {
                    conn.refused_by != Some(s)
                        && workers[s].as_ref().is_some_and(|w| w.can_take(now, limits))
                });
            let Some(slot) = slot else {
                return Err(conn);
            };
            let worker = self.workers[slot].as_mut().expect("chosen slot is live");
            let sent = fdpass::send_with_fd(
                worker.channel.as_fd(),
                conn.handoff.encode(&mut message),
                conn.stream.as_fd(),
            );
            match sent {
                Ok(()) => {
                    worker.in_flight.push_back(InFlight { conn, sent_at: now });
                    return Ok(());
                }
                // Full channel, or too many fds in flight for this user:
                // skip the worker until it drains or acknowledges.
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.raw_os_error() == Some(libc::ETOOMANYREFS) =>
                {
                    worker.blocked = true;
                    let raw = worker.channel.as_raw_fd();
                    let _ = self.poll.registry().reregister(
                        &mut SourceFd(&raw),
                        WorkerChannel::token(slot),
                        Interest::READABLE | Interest::WRITABLE,
                    );
                }
                Err(e) => {
                    debug!(slot, "worker channel failed on send: {e}");
                    self.retire(slot);
                }
            }
        }
    }

    fn unblock(&mut self, slot: usize) {
        let Some(worker) = self.workers.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if worker.blocked {
            worker.blocked = false;
            let raw = worker.channel.as_raw_fd();
            let _ = self.poll.registry().reregister(
                &mut SourceFd(&raw),
                WorkerChannel::token(slot),
                Interest::READABLE,
            );
        }
    }

    /// Reads every message waiting on a worker's channel; retires the worker
    /// if the channel has closed.
    fn read_worker(&mut self, slot: usize) {
        let mut buf = [0u8; MAX_MESSAGE_LEN];
        loop {
            let Some(worker) = self.workers.get_mut(slot).and_then(Option::as_mut) else {
                return;
            };
            match fdpass::recv_with_fd(worker.channel.as_fd(), &mut buf, true) {
                // A worker has no business sending fds: the one it sent is closed on drop.
                Ok(Some(received)) => match WorkerMessage::decode(&buf[..received.len]) {
                    Ok(message) => self.on_message(slot, message),
                    Err(e) => {
                        worker.protocol_errors += 1;
                        if worker.protocol_errors.is_power_of_two() {
                            warn!(
                                slot,
                                pid = worker.pid,
                                "ignoring malformed message from worker: {e}"
                            );
                        }
                    }
                },
                Ok(None) => return self.retire(slot),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    warn!(
                        slot,
                        pid = worker.pid,
                        "ignoring malformed message from worker: {e}"
                    );
                }
                Err(e) => {
                    debug!(slot, "worker channel failed on receive: {e}");
                    return self.retire(slot);
                }
            }
        }
    }

    fn on_message(&mut self, slot: usize, message: WorkerMessage) {
        let Some(worker) = self.workers[slot].as_mut() else {
            return;
        };
        match message {
            WorkerMessage::Ack(id) => {
                if take_in_flight(&mut worker.in_flight, id).is_some() {
                    // Dropping the entry closes the primary's copy of the fd.
                    self.counters.handed_off[slot].fetch_add(1, Relaxed);
                    worker.blocked = false;
                }
            }
            WorkerMessage::Nack(id) => {
                if let Some(mut entry) = take_in_flight(&mut worker.in_flight, id) {
                    self.counters.requeued.fetch_add(1, Relaxed);
                    entry.conn.refused_by = Some(slot);
                    self.queue.push_front(entry.conn);
                }
            }
            WorkerMessage::Ready => {
                if !worker.ready {
                    worker.ready = true;
                    let _ = self.events.send(Event::WorkerReady {
                        slot,
                        uid: worker.uid,
                        pid: worker.pid,
                    });
                }
            }
            WorkerMessage::Closed(_) => {}
        }
    }

    /// Removes a worker whose channel is gone and puts every connection it
    /// had not acknowledged back at the front of the queue, oldest first.
    fn retire(&mut self, slot: usize) {
        let Some(worker) = self.workers[slot].take() else {
            return;
        };
        let raw = worker.channel.as_raw_fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
        let requeued = worker.in_flight.len();
        for entry in worker.in_flight.into_iter().rev() {
            self.queue.push_front(entry.conn);
        }
        self.counters.requeued.fetch_add(requeued as u64, Relaxed);
        if requeued > 0 {
            info!(
                slot,
                pid = worker.pid,
                requeued,
                "worker left unacknowledged connections; handing them to other workers"
            );
        }
        let _ = self.events.send(Event::ChannelClosed {
            slot,
            uid: worker.uid,
            requeued,
        });
    }
}

/// Removes the in-flight entry for `id`: the front in the common case, since
/// a worker acknowledges in the order it received.
fn take_in_flight(in_flight: &mut VecDeque<InFlight>, id: u64) -> Option<InFlight> {
    if in_flight.front()?.conn.handoff.connection_id == id {
        return in_flight.pop_front();
    }
    let position = in_flight
        .iter()
        .position(|entry| entry.conn.handoff.connection_id == id)?;
    in_flight.remove(position)
}
