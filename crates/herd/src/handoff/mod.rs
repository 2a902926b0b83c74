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
//!
//! # Layout
//! - this module: the events, the loop itself, its timers.
//! - `commands`: the supervisor's commands and [`Controller`], carried out.
//! - `channel`: one worker's channel (role, in flight, acknowledged, bad
//!   messages) and its protocol, herd's or Node's, one method per act.
//! - `workers`: workers added, made serving, drained, found hung, retired.
//! - `accepting`: accept, the wait queue, parked refusals, sending to a worker.
//! - `messages`: reading what workers send, herd's protocol and Node's.
//! - `listeners`: the listener table, on demand for Node apps, kernel rotations.
//! - `app_primary`: a Node app's own primary (`node.primary = "run"`), and
//!   the relay between it and the workers.
//! - `queued`, `taking_back`: counter pages and queued hand-offs; what is
//!   taken back off a worker's channel, and what it returns.
//! - `handover`: the loop across `herd upgrade`.
//! - `threads`, `roster`, `from_threads`: the other hand-off threads
//!   (`handoff_threads`), what thread 0 shares with them, and thread 0's
//!   side of them. This loop is thread 0: it alone reads the channels.
//!
//! What the loop counts lives in [`crate::counters`], below this module
//! and [`crate::metrics`] both.

mod accepting;
mod app_primary;
mod channel;
mod commands;
mod from_threads;
mod handover;
mod listeners;
mod messages;
mod queued;
mod roster;
mod taking_back;
mod threads;
mod workers;

use crate::counters::{accept_error_kind, bump, Counters};
use accepting::{reserve_fd, Refusals};
use channel::{
    take_in_flight, BadMessage, Message, Protocol, ProtocolErrors, ReadEnd, WorkerChannel,
};
pub use commands::{Command, Controller, TALLY_WAIT};
pub use handover::{spawn_carried, CarriedLoop};
use queued::{worker_watched, PageSeen, Queued, PAGE_TALLY_INTERVAL};
pub(crate) use threads::FORWARD_LIMIT;
use workers::Retired;

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use nix::libc;
use tracing::{debug, error, info, warn};

use crate::config::MAX_LISTENERS;
use crate::config::{HandoffSettings, MAX_WORKERS};
use crate::dispatch::{Dispatcher, Mode};
use crate::ids::{ChannelIx, ListenerIx, SlotIx, Table, WorkerId};
use crate::lifecycle::Role;
use crate::listener::{self, BindOptions, BoundListener};
use crate::node_ipc::{self, NodeChannel, SentHandle};
use crate::rate_limit::Occurrences;
use crate::rotation::SlotRotation;
use crate::wait_queue::WaitQueue;
use herd_protocol::bpf::MAX_ROTATION;
use herd_protocol::fdpass;
use herd_protocol::wire::{
    Handoff, PrimaryMessage, ReadyFlags, WorkerMessage, HANDOFF_LEN, MAX_MESSAGE_LEN,
};

const WAKER: Token = Token(usize::MAX);
/// Listener `i` has token `i`; worker channel `c` has token `WORKER_TOKEN_BASE + c`;
/// the slot socket of slot `s` in listener `i`'s kernel rotation (while herd
/// accepts from it) has token `SLOT_TOKEN_BASE + i * MAX_ROTATION + s`
/// (see [`Polled::of`]).
const WORKER_TOKEN_BASE: usize = 1 << 16;
const SLOT_TOKEN_BASE: usize = 1 << 24;
/// How often the kernel rotations' per-slot counts are read into [`Counters`].
const TALLY_INTERVAL: Duration = Duration::from_millis(500);
/// Messages read from one herd-protocol channel per turn of the loop. A
/// worker that sends more gets another turn after every other ready fd
/// had one, so a flood from one worker cannot starve the others (nor grow
/// anything: each message is handled as it is read).
const READ_BUDGET_MESSAGES: usize = 256;
/// Connections shed at most per accept attempt while herd is out of fds
/// (the next attempt, after the accept backoff, sheds more).
const SHED_BATCH: usize = 64;
/// Refused connections wait at least this long before they are offered
/// again (unless a worker's state changes first), doubling per round of
/// refusals up to [`REFUSED_RETRY_MAX`]: no bouncing between workers that
/// all refuse.
const REFUSED_RETRY_MIN: Duration = Duration::from_millis(10);
const REFUSED_RETRY_MAX: Duration = Duration::from_secs(1);
/// How often workers are checked for a hand-off older than their
/// `hang_timeout`: a hung worker is found within that plus this. A pass
/// looks at the oldest hand-off of each worker, so it costs O(workers).
const HANG_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// First pause after accept fails for lack of fds/memory; doubles up to the max.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Long enough not to spin, short enough that clients barely notice.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What the hand-off loop observed, for the supervisor to decide on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The worker said READY (Node: `listening`).
    Ready { worker: WorkerId },
    /// [`Command::Serve`] took effect: the worker gets connections now.
    Serving { worker: WorkerId },
    /// The worker's channel reached EOF; what it had not acknowledged went
    /// back to the queue.
    ChannelClosed { worker: WorkerId },
    /// The worker was sent its `recycle_after` connections and gets no more.
    RecycleDue { worker: WorkerId },
    /// The worker's oldest unacknowledged hand-off is older than its
    /// `hang_timeout`: it gets nothing more, and what it had not
    /// acknowledged went to other workers.
    Hung { worker: WorkerId },
}

/// Starts the loop on its own thread.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    listeners: Vec<BoundListener>,
    mode: Mode,
    limits: HandoffSettings,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    counters: Arc<Counters>,
    measure_latency: bool,
    backlog: u32,
    threads: usize,
) -> io::Result<(Controller, JoinHandle<()>)> {
    // No listener configured: Node apps say what to listen on.
    let listen_on_demand = listeners.is_empty();
    let (mut handoff_loop, controller) = HandoffLoop::new(
        mode,
        limits,
        events,
        counters,
        measure_latency,
        backlog,
        listen_on_demand,
    )?;
    for bound in listeners {
        handoff_loop
            .add_listener(bound.socket, None)
            .map_err(io::Error::other)?;
    }
    handoff_loop.start_threads(threads, None)?;
    handoff_loop.start(controller)
}

struct Listening {
    socket: mio::net::TcpListener,
    local: SocketAddr,
    /// Bound for Node workers that asked for it with this key (see
    /// [`node_ipc::QueryServer::key`]); `None` for a configured listener.
    node_key: Option<String>,
    /// Round-robin dealt by the kernel over per-slot sockets (Node workers).
    rotation: Option<SlotRotation>,
}

/// A connection between accept and a worker's acknowledgement.
struct Accepted {
    stream: mio::net::TcpStream,
    handoff: Handoff,
    accepted_at: Instant,
    /// The slot that refused this connection with NACK; it is not offered
    /// the connection again, so a refusal can't bounce back and forth.
    refused_by: Option<SlotIx>,
    refusals: Refusals,
}

impl Accepted {
    /// The listener it came in on: its line in the wait queue.
    fn listener(&self) -> ListenerIx {
        ListenerIx::from(self.handoff.listener)
    }
}

/// A connection sent to a worker, awaiting its ACK.
struct InFlight {
    conn: Accepted,
    sent_at: Instant,
}

fn listener_token(listener: ListenerIx) -> Token {
    Token(listener.get())
}

/// The token of a kernel rotation's slot socket while herd accepts from it.
fn slot_token(listener: ListenerIx, slot: SlotIx) -> Token {
    Token(SLOT_TOKEN_BASE + listener.get() * MAX_ROTATION + slot.get())
}

fn channel_token(channel: ChannelIx) -> Token {
    Token(WORKER_TOKEN_BASE + channel.get())
}

/// What a poll event is about: its token read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Polled {
    Waker,
    Listener(ListenerIx),
    /// The socket of `slot` in the listener's kernel rotation.
    SlotSocket(ListenerIx, SlotIx),
    Channel(ChannelIx),
    AppPrimary,
}

impl Polled {
    /// The inverse of [`listener_token`], [`slot_token`] and [`channel_token`].
    fn of(token: Token) -> Polled {
        match token {
            WAKER => Polled::Waker,
            app_primary::APP_PRIMARY => Polled::AppPrimary,
            Token(listener) if listener < WORKER_TOKEN_BASE => {
                Polled::Listener(ListenerIx::at(listener))
            }
            Token(token) if token >= SLOT_TOKEN_BASE => {
                let token = token - SLOT_TOKEN_BASE;
                Polled::SlotSocket(
                    ListenerIx::at(token / MAX_ROTATION),
                    SlotIx(token % MAX_ROTATION),
                )
            }
            Token(token) => Polled::Channel(ChannelIx(token - WORKER_TOKEN_BASE)),
        }
    }
}

struct HandoffLoop {
    poll: Poll,
    /// Every listener (its token is [`listener_token`]); `None`: released
    /// (a Node app closed that server everywhere), free for the next.
    listeners: Table<ListenerIx, Option<Listening>>,
    /// None was configured: bind what Node workers ask for (and hand the
    /// first configured one out otherwise).
    listen_on_demand: bool,
    /// Accept queue length for listeners bound on demand.
    backlog: u32,
    /// Every worker channel (its token is [`channel_token`]); `None`: free
    /// for the next.
    channels: Table<ChannelIx, Option<WorkerChannel>>,
    /// Per slot, the channel whose worker gets the slot's connections.
    active: Table<SlotIx, Option<ChannelIx>>,
    dispatcher: Dispatcher,
    /// Accepted connections no worker could take yet, oldest first.
    queue: WaitQueue<Accepted>,
    limits: HandoffSettings,
    commands: mpsc::Receiver<Command>,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    counters: Arc<Counters>,
    /// Record accept-to-ACK times (only when metrics are served).
    measure_latency: bool,
    next_connection_id: u64,
    /// Set after accept failed for lack of resources; accepting resumes then.
    accept_paused_until: Option<Instant>,
    accept_backoff: Duration,
    shutting_down: bool,
    /// Told to stop accepting: nothing new is bound either.
    stopped_accepting: bool,
    /// When the kernel rotations' counts are read next (`None`: no rotation).
    tally_due: Option<Instant>,
    /// When workers are next checked for a hang (`None`: no worker has a
    /// `hang_timeout`).
    hang_check_due: Option<Instant>,
    /// Channels that had more to read than one turn's budget.
    more_to_read: Vec<ChannelIx>,
    /// The messages of one channel's read turn, reused from turn to turn.
    scratch: Vec<Message>,
    /// A spare fd, given up to accept and close a connection when herd is
    /// out of fds for longer than `queue_timeout`.
    reserve_fd: Option<OwnedFd>,
    /// Since when accepting has failed for lack of fds.
    fd_short_since: Option<Instant>,
    /// Bumped whenever a worker may have become able to take a connection
    /// it could not before (it became serving, acknowledged, unblocked, was
    /// added): refused connections are offered again then.
    capacity_epoch: u64,
    /// A Node app's own primary, when it runs (`node.primary = "run"`).
    app_primary: app_primary::AppPrimaryLink,
    /// When counter pages are read next (`None`: no worker counts in one).
    page_tally_due: Option<Instant>,
    /// Workers with queued hand-offs not yet taken: their pages are read
    /// every turn, before anything is dispatched.
    queued_channels: Vec<ChannelIx>,
    /// Workers given connections this turn, sent at the end of it.
    unsent_channels: Vec<ChannelIx>,
    /// Workers whose takes herd watches while connections wait (see
    /// [`HandoffLoop::watch_takes`]).
    takes_watched: Vec<ChannelIx>,
    /// An empty batch with room for a full one, swapped with a worker's
    /// as it is sent.
    spare_batch: Vec<Accepted>,
    /// Wakes this loop: commands, and what the other threads forward.
    waker: Arc<Waker>,
    /// The other hand-off threads, if `handoff_threads` > 1.
    others: Option<threads::OtherThreads>,
    /// A slot changed hands this turn: the other threads get a new roster.
    roster_changed: bool,
    /// The other threads' listener copies carried over `herd upgrade`,
    /// until they start.
    carried_shares: Vec<Vec<threads::ListenerCopy>>,
}

impl HandoffLoop {
    /// A loop with no listener and no worker yet, and its controller.
    fn new(
        mode: Mode,
        limits: HandoffSettings,
        events: tokio::sync::mpsc::UnboundedSender<Event>,
        counters: Arc<Counters>,
        measure_latency: bool,
        backlog: u32,
        listen_on_demand: bool,
    ) -> io::Result<(HandoffLoop, Controller)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (commands_tx, commands) = mpsc::channel();
        let handoff_loop = HandoffLoop {
            poll,
            listeners: Table::new(),
            listen_on_demand,
            backlog,
            channels: Table::new(),
            active: Table::new(),
            dispatcher: Dispatcher::new(mode),
            queue: WaitQueue::default(),
            limits,
            commands,
            events,
            counters,
            measure_latency,
            next_connection_id: 0,
            accept_paused_until: None,
            accept_backoff: ACCEPT_BACKOFF_MIN,
            shutting_down: false,
            stopped_accepting: false,
            tally_due: None,
            hang_check_due: None,
            more_to_read: Vec::new(),
            scratch: Vec::with_capacity(READ_BUDGET_MESSAGES),
            reserve_fd: reserve_fd(),
            fd_short_since: None,
            capacity_epoch: 0,
            app_primary: Default::default(),
            page_tally_due: None,
            queued_channels: Vec::new(),
            unsent_channels: Vec::new(),
            takes_watched: Vec::new(),
            spare_batch: Vec::with_capacity(herd_protocol::wire::MAX_BATCH),
            waker: waker.clone(),
            others: None,
            roster_changed: false,
            carried_shares: Vec::new(),
        };
        let controller = Controller {
            commands: commands_tx,
            waker,
        };
        Ok((handoff_loop, controller))
    }

    /// Runs the loop on a thread of its own.
    fn start(self, controller: Controller) -> io::Result<(Controller, JoinHandle<()>)> {
        let thread = std::thread::Builder::new()
            .name("herd-handoff".into())
            .spawn(move || self.run())?;
        Ok((controller, thread))
    }

    fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        while !self.shutting_down {
            let timeout = if self.more_to_read.is_empty() && !self.app_primary.more {
                self.next_deadline()
                    .map(|at| at.saturating_duration_since(Instant::now()))
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    error!(event = "poll_failed", "hand-off loop cannot poll: {e}");
                    break;
                }
            }
            if !self.queued_channels.is_empty() {
                self.catch_up_queued();
            }
            for event in events.iter() {
                match Polled::of(event.token()) {
                    Polled::Waker => {
                        self.run_commands();
                        self.take_forwarded();
                    }
                    Polled::Listener(listener) => self.accept_all(listener, None),
                    Polled::SlotSocket(listener, slot) => self.accept_all(listener, Some(slot)),
                    Polled::AppPrimary => self.on_app_primary(
                        event.is_writable(),
                        event.is_readable() || event.is_read_closed() || event.is_error(),
                    ),
                    Polled::Channel(channel) => {
                        if event.is_writable() {
                            self.unblock(channel);
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.read_worker(channel);
                        }
                    }
                }
            }
            // Another turn for workers that sent more than one turn's
            // worth, now that every other ready fd has had its turn.
            for channel in std::mem::take(&mut self.more_to_read) {
                self.read_worker(channel);
            }
            if self.app_primary.more {
                self.read_app_primary();
            }
            self.on_timers(Instant::now());
            if !self.queue.is_empty() {
                self.flush_queue();
            }
            self.flush_unsent();
            if !self.takes_watched.is_empty() || !self.queue.is_empty() {
                self.watch_takes();
            }
            self.publish_roster();
        }
        // What the other threads held is dropped with the loop: herd exits.
        drop(self.stop_threads());
        debug!("hand-off loop stopped");
    }

    fn next_deadline(&self) -> Option<Instant> {
        let queue_expiry = self
            .queue
            .oldest(|conn| conn.accepted_at)
            .map(|oldest| oldest + self.limits.queue_timeout);
        let epoch = self.capacity_epoch;
        let unpark = self
            .queue
            .fronts()
            .filter(|conn| conn.refusals.epoch == epoch)
            .filter_map(|conn| conn.refusals.retry_at)
            .min();
        [
            queue_expiry,
            self.accept_paused_until,
            self.tally_due,
            self.hang_check_due,
            self.page_tally_due,
            unpark,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn on_timers(&mut self, now: Instant) {
        if self.accept_paused_until.is_some_and(|until| until <= now) {
            self.accept_paused_until = None;
            for listener in self.listeners.ids() {
                self.accept_all(listener, None);
                let slots = self
                    .listener(listener)
                    .and_then(|l| l.rotation.as_ref())
                    .map(SlotRotation::herd_accepting)
                    .unwrap_or_default();
                for slot in slots {
                    self.accept_all(listener, Some(slot));
                }
            }
        }
        if self.tally_due.is_some_and(|due| due <= now) {
            self.tally_due = Some(now + TALLY_INTERVAL);
            self.tally_kernel_rotations();
        }
        if self.page_tally_due.is_some_and(|due| due <= now) {
            self.page_tally_due = Some(now + PAGE_TALLY_INTERVAL);
            self.tally_pages();
        }
        if self.hang_check_due.is_some_and(|due| due <= now) {
            self.hang_check_due = Some(now + HANG_CHECK_INTERVAL);
            self.find_hung(now);
            self.reclaim_stalled(now);
            self.reopen_rested();
        }
        let expired = self
            .queue
            .expire(now, self.limits.queue_timeout, |conn| conn.accepted_at);
        for _ in 0..expired {
            let total = self.counters.dropped_queue_timeout.fetch_add(1, Relaxed) + 1;
            if total.is_power_of_two() {
                warn!(
                    total,
                    event = "queue_timeout",
                    "closed a connection that waited {:?} with no worker able to take it",
                    self.limits.queue_timeout
                );
            }
        }
    }
}

/// What the loop needs to know of a worker it is given.
#[derive(Debug)]
pub struct NewWorker {
    pub slot: SlotIx,
    pub worker: WorkerId,
    pub pid: u32,
    /// The worker is a Node.js cluster app: its channel is Node's IPC
    /// socket, spoken in [`node_ipc`]'s JSON lines.
    pub node: bool,
    /// Hand this worker at most this many connections, then report
    /// [`Event::RecycleDue`] (the `max_connections_per_worker` limit).
    pub recycle_after: Option<u64>,
    /// A hand-off unacknowledged for this long makes it hung
    /// ([`Event::Hung`]); `None`: never.
    pub hang_timeout: Option<Duration>,
    /// Its counter page and herd's copy of its end of the channel
    /// (herd-protocol workers); kept if its READY says it uses them.
    pub link: Option<crate::process::WorkerLink>,
}
