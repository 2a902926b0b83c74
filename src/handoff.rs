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
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use nix::libc;
use tracing::{debug, error, info, warn};

use crate::config::{HandoffSettings, MAX_WORKERS};
use crate::dispatch::{Dispatcher, Mode};
use crate::fdpass;
use crate::fdpass::rotation_bpf::MAX_ROTATION;
use crate::lifecycle::{Role, WorkerId};
use crate::listener::{self, BoundListener};
use crate::node_ipc::{self, NodeChannel, SentHandle};
use crate::protocol::{Handoff, PrimaryMessage, WorkerMessage, HANDOFF_LEN, MAX_MESSAGE_LEN};
use crate::rate_limit::Occurrences;
use crate::rotation::SlotRotation;
use crate::wait_queue::WaitQueue;

const WAKER: Token = Token(usize::MAX);
/// Listener `i` has token `i`; worker channel `c` has token `WORKER_TOKEN_BASE + c`;
/// the slot socket of slot `s` in listener `i`'s kernel rotation (while herd
/// accepts from it) has token `SLOT_TOKEN_BASE + i * MAX_ROTATION + s`.
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
/// Listeners herd may hold: configured, plus those Node apps ask for.
pub const MAX_LISTENERS: usize = 256;

/// First pause after accept fails for lack of fds/memory; doubles up to the max.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Long enough not to spin, short enough that clients barely notice.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What the supervisor tells the hand-off loop. The supervisor decides
/// every worker's [`Role`]; the loop routes connections by it and never
/// changes it on its own.
#[derive(Debug)]
pub enum Command {
    /// A new worker, starting: it gets nothing until [`Command::Serve`].
    AddWorker { worker: NewWorker, channel: OwnedFd },
    /// The worker holds its slot now and gets the slot's connections.
    Serve { worker: WorkerId },
    /// The worker gets nothing more and is sent DRAIN (Node: `disconnect`).
    Drain { worker: WorkerId },
    /// The worker's process has exited: what it had not acknowledged goes to
    /// other workers now, even if a helper still holds its channel open.
    Forget { worker: WorkerId },
    /// Only slots below `count` remain (their workers were drained first).
    SetSlots { count: usize },
    /// A reload's `[handoff]` limits, from now on (`kernel_rotation` excepted).
    SetLimits(HandoffSettings),
    /// Close the listeners and hand off what is queued where possible. The
    /// loop keeps collecting ACKs until [`Command::Exit`].
    StopAccepting,
    /// End the loop now.
    Exit,
}

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

/// Lock-free counters the loop updates and anyone may read.
#[derive(Debug)]
pub struct Counters {
    /// Every listener's address, by index: the configured ones, then those
    /// bound for what Node apps asked (`None`: released, the index free for
    /// the next). Written only when one is added or released.
    listeners: Mutex<Vec<Option<SocketAddr>>>,
    /// Connections accepted, per listener index (room for [`MAX_LISTENERS`]).
    pub accepted: Box<[AtomicU64]>,
    /// Connections a worker acknowledged, per slot.
    pub handed_off: Box<[AtomicU64]>,
    /// Connections taken back from a worker that died before acknowledging them.
    pub requeued_worker_gone: AtomicU64,
    /// Connections a worker refused (NACK), handed to another.
    pub requeued_refused: AtomicU64,
    /// Connections herd accepted from the kernel-rotation socket of a slot
    /// whose worker died or was stopped, and handed to another.
    pub requeued_slot_queue: AtomicU64,
    /// Connections taken back from a worker found hung, handed to another.
    pub requeued_hung: AtomicU64,
    /// Connections sent to a worker and not yet acknowledged, right now.
    pub in_flight: AtomicU64,
    /// Per slot, connections its workers acknowledged and have not reported
    /// CLOSED; only meaningful where `reports_closed` is set.
    pub open_connections: Box<[AtomicU64]>,
    /// Per slot, whether its worker reports CLOSED (it sent at least one).
    pub reports_closed: Box<[std::sync::atomic::AtomicBool]>,
    /// Connections closed because the wait queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Connections closed because no worker took them within `queue_timeout`.
    pub dropped_queue_timeout: AtomicU64,
    /// Connections closed unserved because herd was out of file descriptors
    /// for `queue_timeout` (accepted with the reserve fd and closed).
    pub dropped_fd_limit: AtomicU64,
    /// accept(2) failures other than "nothing to accept", by [`ACCEPT_ERROR_KINDS`].
    pub accept_errors: [AtomicU64; ACCEPT_ERROR_KINDS.len()],
    /// Accept-to-ACK time of each connection (recorded only when metrics are served).
    pub latency: LatencyHistogram,
    /// Connections the kernel dealt to a worker's own socket (kernel rotation),
    /// also counted in `accepted` and `handed_off`.
    pub kernel_dealt: AtomicU64,
}

/// Upper bounds of the hand-off latency buckets in nanoseconds: 5 µs to 100 ms.
pub const LATENCY_BOUNDS_NANOS: [u64; 14] = [
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
];

/// A fixed-bucket histogram written by the hand-off thread alone. With one
/// writer, a plain load and store replace locked read-modify-writes, so a
/// recording costs a few ordinary memory operations. A concurrent reader may
/// see a count one observation behind its buckets; a scrape tolerates that.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Per bucket (not cumulative); the last one is above every bound.
    buckets: [AtomicU64; LATENCY_BOUNDS_NANOS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

/// What a reader sees of a [`LatencyHistogram`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencySnapshot {
    /// Per bucket, not cumulative, aligned with [`LATENCY_BOUNDS_NANOS`] plus +Inf.
    pub buckets: Vec<u64>,
    pub sum_nanos: u64,
    pub count: u64,
}

impl LatencyHistogram {
    /// Records one observation. Only the hand-off thread may call this.
    pub fn record(&self, nanos: u64) {
        let bucket = LATENCY_BOUNDS_NANOS
            .iter()
            .position(|&bound| nanos <= bound)
            .unwrap_or(LATENCY_BOUNDS_NANOS.len());
        bump(&self.buckets[bucket], 1);
        bump(&self.sum_nanos, nanos);
        bump(&self.count, 1);
    }

    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            buckets: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            sum_nanos: self.sum_nanos.load(Relaxed),
            count: self.count.load(Relaxed),
        }
    }
}

/// Adds to a counter that only the calling thread writes.
fn bump(counter: &AtomicU64, by: u64) {
    counter.store(counter.load(Relaxed).wrapping_add(by), Relaxed);
}

/// The `kind` label of accept errors, in the order of `Counters::accept_errors`.
pub const ACCEPT_ERROR_KINDS: [&str; 6] = [
    "EMFILE",
    "ENFILE",
    "ENOBUFS",
    "ENOMEM",
    "ECONNABORTED",
    "other",
];

fn accept_error_kind(error: &io::Error) -> usize {
    match error.raw_os_error() {
        Some(libc::EMFILE) => 0,
        Some(libc::ENFILE) => 1,
        Some(libc::ENOBUFS) => 2,
        Some(libc::ENOMEM) => 3,
        Some(libc::ECONNABORTED) => 4,
        _ => 5,
    }
}

impl Counters {
    pub fn new(listeners: &[SocketAddr]) -> Self {
        let zeros = |n: usize| (0..n).map(|_| AtomicU64::new(0)).collect();
        Counters {
            listeners: Mutex::new(listeners.iter().copied().map(Some).collect()),
            accepted: zeros(MAX_LISTENERS),
            handed_off: zeros(MAX_WORKERS),
            requeued_worker_gone: AtomicU64::new(0),
            requeued_refused: AtomicU64::new(0),
            requeued_slot_queue: AtomicU64::new(0),
            requeued_hung: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            open_connections: zeros(MAX_WORKERS),
            reports_closed: (0..MAX_WORKERS).map(|_| Default::default()).collect(),
            dropped_queue_full: AtomicU64::new(0),
            dropped_queue_timeout: AtomicU64::new(0),
            dropped_fd_limit: AtomicU64::new(0),
            accept_errors: Default::default(),
            latency: LatencyHistogram::default(),
            kernel_dealt: AtomicU64::new(0),
        }
    }

    /// Every listener's address, in index order (released ones left out).
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flatten()
            .copied()
            .collect()
    }

    /// How many listener indices have been used (released ones included):
    /// `accepted[..listener_indices()]` holds every count there is.
    pub fn listener_indices(&self) -> usize {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    fn set_listener(&self, index: usize, addr: Option<SocketAddr>) {
        let mut listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        if listeners.len() <= index {
            listeners.resize(index + 1, None);
        }
        listeners[index] = addr;
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
    measure_latency: bool,
    backlog: u32,
) -> io::Result<(Controller, JoinHandle<()>)> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (commands_tx, commands) = mpsc::channel();
    // No listener configured: Node apps say what to listen on.
    let listen_on_demand = listeners.is_empty();
    let mut handoff_loop = HandoffLoop {
        poll,
        listeners: Vec::with_capacity(listeners.len()),
        listen_on_demand,
        backlog,
        channels: Vec::new(),
        active: Vec::new(),
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
        reserve_fd: reserve_fd(),
        fd_short_since: None,
        capacity_epoch: 0,
    };
    for bound in listeners {
        handoff_loop
            .add_listener(bound.socket, None)
            .map_err(io::Error::other)?;
    }
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
    refused_by: Option<usize>,
    refusals: Refusals,
}

/// How a connection has been refused, so that one every worker refuses
/// waits (parks) instead of bouncing between them.
#[derive(Debug, Clone, Copy, Default)]
struct Refusals {
    /// The capacity epoch of the refusals counted in `count`.
    epoch: u64,
    /// Refusals since the epoch last changed.
    count: u32,
    /// Times it was parked; sets the next wait.
    rounds: u32,
    /// Parked: not offered again before then, unless the epoch changes.
    retry_at: Option<Instant>,
}

impl Refusals {
    /// Counts one more refusal; once as many workers as there are have
    /// refused it with nothing changed since, it parks.
    fn refused(&mut self, epoch: u64, serving: usize, now: Instant) {
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
    fn parked(&self, epoch: u64, now: Instant) -> bool {
        self.epoch == epoch && self.retry_at.is_some_and(|at| at > now)
    }
}

/// A connection sent to a worker, awaiting its ACK.
struct InFlight {
    conn: Accepted,
    sent_at: Instant,
}

struct WorkerChannel {
    slot: usize,
    worker: WorkerId,
    pid: u32,
    channel: OwnedFd,
    /// As the supervisor last said.
    role: Role,
    /// Found hung: gets nothing more, whatever its role, until it is gone.
    hung: bool,
    /// See [`Command::AddWorker`].
    hang_timeout: Option<Duration>,
    /// The last send said the channel is full; cleared when it drains.
    blocked: bool,
    /// DRAIN could not be sent yet because the channel was full.
    drain_pending: bool,
    /// Sent, not yet acknowledged, oldest first. Capacity max_unacked.
    in_flight: VecDeque<InFlight>,
    /// Connections sent to this worker.
    sent: u64,
    /// Connections it acknowledged.
    acked: u64,
    /// Connections it reported CLOSED; `None` until the first report.
    closed: Option<u64>,
    /// Send at most this many, then report RecycleDue (`max_connections_per_worker`).
    recycle_after: Option<u64>,
    /// What it sent that herd could not use, by kind: logged at the 1st,
    /// 2nd, 4th, ... time, so a broken worker cannot flood the log.
    errors: ProtocolErrors,
    /// It had more to read than one turn's budget: it is read again next turn.
    more_to_read: bool,
    /// A Node.js cluster worker: its framing state (`None`: herd's protocol).
    node: Option<NodeChannel>,
}

impl WorkerChannel {
    /// Notes a message herd ignores; logs it at the 1st, 2nd, 4th, ... time.
    fn bad_message(&mut self, kind: BadMessage, what: impl std::fmt::Display) {
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

    /// Connections this worker holds, for least-conn: those in flight, plus
    /// the acknowledged ones not yet reported closed (if it reports CLOSED).
    fn load(&self) -> u64 {
        let open = self
            .closed
            .map_or(0, |closed| self.acked.saturating_sub(closed));
        self.in_flight.len() as u64 + open
    }

    /// Can the worker be sent a connection from `listener` now?
    fn can_take(&self, listener: u16, now: Instant, limits: &HandoffSettings) -> bool {
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
enum BadMessage {
    Malformed,
    StrayFd,
    UnknownId,
}

/// The kinds of bad message a worker can send, each counted on its own.
#[derive(Debug, Default)]
struct ProtocolErrors {
    /// Too long, truncated, or not a message of the protocol.
    malformed: Occurrences,
    /// A file descriptor attached (herd never asks a worker for one).
    stray_fds: Occurrences,
    /// An ACK, NACK or CLOSED for a connection herd has not got in flight
    /// to it (never sent, already answered, or taken back).
    unknown_ids: Occurrences,
}

/// The token of a kernel rotation's slot socket while herd accepts from it.
fn slot_token(listener: usize, slot: usize) -> Token {
    Token(SLOT_TOKEN_BASE + listener * MAX_ROTATION + slot)
}

fn channel_token(index: usize) -> Token {
    Token(WORKER_TOKEN_BASE + index)
}

struct HandoffLoop {
    poll: Poll,
    /// By index, which is also the listener's token; `None`: released (a
    /// Node app closed that server everywhere), free for the next.
    listeners: Vec<Option<Listening>>,
    /// None was configured: bind what Node workers ask for (and hand the
    /// first configured one out otherwise).
    listen_on_demand: bool,
    /// Accept queue length for listeners bound on demand.
    backlog: u32,
    /// Every worker channel, by index (its token is `WORKER_TOKEN_BASE + index`).
    channels: Vec<Option<WorkerChannel>>,
    /// Per slot, the index of the channel whose worker gets the slot's connections.
    active: Vec<Option<usize>>,
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
    more_to_read: Vec<usize>,
    /// A spare fd, given up to accept and close a connection when herd is
    /// out of fds for longer than `queue_timeout`.
    reserve_fd: Option<OwnedFd>,
    /// Since when accepting has failed for lack of fds.
    fd_short_since: Option<Instant>,
    /// Bumped whenever a worker may have become able to take a connection
    /// it could not before (it became serving, acknowledged, unblocked, was
    /// added): refused connections are offered again then.
    capacity_epoch: u64,
}

impl HandoffLoop {
    fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        while !self.shutting_down {
            let timeout = if self.more_to_read.is_empty() {
                self.next_deadline()
                    .map(|at| at.saturating_duration_since(Instant::now()))
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    error!("hand-off loop cannot poll: {e}");
                    break;
                }
            }
            for event in events.iter() {
                match event.token() {
                    WAKER => self.run_commands(),
                    Token(index) if index < WORKER_TOKEN_BASE => self.accept_all(index, None),
                    Token(token) if token >= SLOT_TOKEN_BASE => {
                        let token = token - SLOT_TOKEN_BASE;
                        self.accept_all(token / MAX_ROTATION, Some(token % MAX_ROTATION));
                    }
                    Token(token) => {
                        let index = token - WORKER_TOKEN_BASE;
                        if event.is_writable() {
                            self.unblock(index);
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.read_worker(index);
                        }
                    }
                }
            }
            // Another turn for workers that sent more than one turn's
            // worth, now that every other ready fd has had its turn.
            for index in std::mem::take(&mut self.more_to_read) {
                self.read_worker(index);
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
            unpark,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn on_timers(&mut self, now: Instant) {
        if self.accept_paused_until.is_some_and(|until| until <= now) {
            self.accept_paused_until = None;
            for index in 0..self.listeners.len() {
                self.accept_all(index, None);
                let slots = self
                    .listener(index)
                    .and_then(|l| l.rotation.as_ref())
                    .map(SlotRotation::herd_accepting)
                    .unwrap_or_default();
                for slot in slots {
                    self.accept_all(index, Some(slot));
                }
            }
        }
        if self.tally_due.is_some_and(|due| due <= now) {
            self.tally_due = Some(now + TALLY_INTERVAL);
            self.tally_kernel_rotations();
        }
        if self.hang_check_due.is_some_and(|due| due <= now) {
            self.hang_check_due = Some(now + HANG_CHECK_INTERVAL);
            self.find_hung(now);
        }
        let expired = self
            .queue
            .expire(now, self.limits.queue_timeout, |conn| conn.accepted_at);
        for _ in 0..expired {
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
                Command::AddWorker { worker, channel } => self.add_worker(worker, channel),
                Command::Serve { worker } => {
                    if let Some(index) = self.find(worker) {
                        self.serve(index);
                    }
                }
                Command::Drain { worker } => {
                    if let Some(index) = self.find(worker) {
                        self.drain(index);
                    }
                }
                Command::Forget { worker } => {
                    if let Some(index) = self.find(worker) {
                        self.retire(index, Retired::ProcessExited);
                    }
                }
                Command::SetSlots { count } => self.active.truncate(count.min(MAX_WORKERS)),
                Command::SetLimits(limits) => self.set_limits(limits),
                Command::StopAccepting => {
                    self.stopped_accepting = true;
                    // Last count of what the kernel dealt, for the closing tally.
                    self.tally_kernel_rotations();
                    self.tally_due = None;
                    self.listeners.clear();
                    self.flush_queue();
                }
                Command::Exit => self.shutting_down = true,
            }
        }
    }

    /// New `[handoff]` limits (a reload); they apply to what is dispatched
    /// and expired from now on. `kernel_rotation` stays: it was fixed when
    /// the listeners were bound, and may have been turned off since because
    /// the kernel refused the program.
    fn set_limits(&mut self, limits: HandoffSettings) {
        self.limits = HandoffSettings {
            kernel_rotation: self.limits.kernel_rotation,
            ..limits
        };
    }

    fn find(&self, worker: WorkerId) -> Option<usize> {
        self.channels
            .iter()
            .position(|c| c.as_ref().is_some_and(|c| c.worker == worker))
    }

    fn add_worker(&mut self, added: NewWorker, channel: OwnedFd) {
        let NewWorker {
            slot,
            worker,
            pid,
            node,
            recycle_after,
            hang_timeout,
        } = added;
        if slot >= MAX_WORKERS {
            error!(slot, "worker slot out of range; closing its channel");
            return;
        }
        if self.active.len() <= slot {
            self.active.resize(slot + 1, None);
        }
        let index = match self.channels.iter().position(Option::is_none) {
            Some(free) => free,
            None => {
                self.channels.push(None);
                self.channels.len() - 1
            }
        };
        let raw = channel.as_raw_fd();
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&raw),
            channel_token(index),
            Interest::READABLE,
        ) {
            error!(slot, "cannot watch worker channel: {e}");
            return;
        }
        if hang_timeout.is_some() {
            self.hang_check_due
                .get_or_insert(Instant::now() + HANG_CHECK_INTERVAL);
        }
        self.channels[index] = Some(WorkerChannel {
            slot,
            worker,
            pid,
            channel,
            role: Role::Starting,
            hung: false,
            hang_timeout,
            blocked: false,
            drain_pending: false,
            in_flight: VecDeque::with_capacity(self.limits.max_unacked),
            sent: 0,
            acked: 0,
            closed: None,
            recycle_after,
            errors: ProtocolErrors::default(),
            more_to_read: false,
            node: node.then(NodeChannel::default),
        });
        // READY may already be waiting on the channel.
        self.read_worker(index);
    }

    /// The worker said READY: the supervisor decides what follows.
    fn report_ready(&mut self, index: usize) {
        if let Some(worker) = self.channels[index].as_ref() {
            let _ = self.events.send(Event::Ready {
                worker: worker.worker,
            });
        }
    }

    /// The supervisor made the worker its slot's: it gets the slot's
    /// connections from now on. A worker told to drain stays drained.
    fn serve(&mut self, index: usize) {
        let Some(worker) = self.channels[index].as_mut() else {
            return;
        };
        if worker.role != Role::Starting {
            return;
        }
        worker.role = Role::Serving;
        self.capacity_epoch += 1;
        let (slot, id) = (worker.slot, worker.worker);
        if self.active.len() <= slot {
            self.active.resize(slot + 1, None);
        }
        self.active[slot] = Some(index);
        let _ = self.events.send(Event::Serving { worker: id });
    }

    /// Every `hang_timeout` worker whose oldest unacknowledged hand-off is
    /// older than that is hung: it gets nothing more, its unacknowledged
    /// connections go back to the front of the queue, and the supervisor
    /// is told (it kills and replaces it). A late ACK from it is ignored.
    fn find_hung(&mut self, now: Instant) {
        for index in 0..self.channels.len() {
            let Some(worker) = self.channels[index].as_mut() else {
                continue;
            };
            let Some(limit) = worker.hang_timeout else {
                continue;
            };
            let stale = worker
                .in_flight
                .front()
                .is_some_and(|oldest| now.duration_since(oldest.sent_at) >= limit);
            if worker.hung || !stale {
                continue;
            }
            worker.hung = true;
            if self.active.get(worker.slot) == Some(&Some(index)) {
                self.active[worker.slot] = None;
            }
            let requeued = self.requeue_in_flight(index);
            self.counters
                .requeued_hung
                .fetch_add(requeued as u64, Relaxed);
            let worker = self.channels[index].as_ref().expect("looked up above");
            warn!(
                slot = worker.slot,
                pid = worker.pid,
                requeued,
                "worker acknowledged nothing for {limit:?} (hang_timeout): it is hung; handing its connections to other workers"
            );
            let _ = self.events.send(Event::Hung {
                worker: worker.worker,
            });
        }
    }

    /// Stops giving a worker connections and sends it DRAIN (now, or as
    /// soon as its channel has room).
    fn drain(&mut self, index: usize) {
        let Some(worker) = self.channels[index].as_mut() else {
            return;
        };
        if worker.role == Role::Draining {
            return;
        }
        worker.role = Role::Draining;
        worker.drain_pending = true;
        if self.active.get(worker.slot) == Some(&Some(index)) {
            self.active[worker.slot] = None;
        }
        // Its slot socket leaves the kernel's rotation before it is told to
        // stop: what is queued there by then, herd accepts and hands on.
        self.update_rotations(index, SlotRotation::stop_turns);
        self.send_pending_drain(index);
    }

    fn send_pending_drain(&mut self, index: usize) {
        let Some(worker) = self.channels[index].as_mut() else {
            return;
        };
        if !worker.drain_pending {
            return;
        }
        if let Some(node) = worker.node.as_mut() {
            // Node's primary says `disconnect`: the worker closes its servers,
            // then its end of the channel, and exits once idle.
            worker.drain_pending = false;
            let seq = node.next_seq();
            let sent = node.send_line(worker.channel.as_fd(), node_ipc::disconnect(seq));
            return self.after_node_send(index, sent);
        }
        match fdpass::send(
            worker.channel.as_fd(),
            &PrimaryMessage::encode_drain(),
            true,
        ) {
            Ok(()) => worker.drain_pending = false,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                worker.blocked = true;
                self.watch_writable(index, true);
            }
            // The worker is gone; its channel's EOF will retire it.
            Err(_) => worker.drain_pending = false,
        }
    }

    /// Accepts until the listener says EAGAIN (edge-triggered: we get no
    /// second wake-up for connections we leave in the kernel queue). With
    /// `slot`, from that slot's socket in the listener's kernel rotation
    /// (one whose worker is gone); its connections count as the listener's.
    fn accept_all(&mut self, index: usize, slot: Option<usize>) {
        while self.accept_paused_until.is_none() {
            let Some(listener) = self.listeners.get(index).and_then(Option::as_ref) else {
                return;
            };
            let socket = match slot {
                None => &listener.socket,
                Some(slot) => match listener.rotation.as_ref().and_then(|r| r.accepting(slot)) {
                    Some(socket) => socket,
                    None => return,
                },
            };
            match socket.accept() {
                Ok((stream, peer)) => {
                    self.accept_backoff = ACCEPT_BACKOFF_MIN;
                    self.fd_short_since = None;
                    let local = if listener.wildcard {
                        stream.local_addr().unwrap_or(listener.local)
                    } else {
                        listener.local
                    };
                    self.next_connection_id += 1;
                    self.counters.accepted[index].fetch_add(1, Relaxed);
                    if slot.is_some() {
                        self.counters.requeued_slot_queue.fetch_add(1, Relaxed);
                    }
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
                        refusals: Refusals::default(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Queue drained without a resource error: any fd shortage is over.
                    self.accept_backoff = ACCEPT_BACKOFF_MIN;
                    self.fd_short_since = None;
                    return;
                }
                Err(e) => {
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                        let now = Instant::now();
                        let since = *self.fd_short_since.get_or_insert(now);
                        if now.duration_since(since) >= self.limits.queue_timeout {
                            self.shed(index, slot);
                        }
                    }
                    self.on_accept_error(index, e);
                }
            }
        }
    }

    /// herd has been out of fds for `queue_timeout`: the connections in the
    /// kernel's queue would wait for good. Each is accepted with the
    /// reserve fd, closed at once (the client gets an answer, a closed
    /// connection, rather than a hang), and the reserve taken again.
    fn shed(&mut self, index: usize, slot: Option<usize>) {
        for _ in 0..SHED_BATCH {
            drop(self.reserve_fd.take());
            let Some(listener) = self.listeners.get(index).and_then(Option::as_ref) else {
                break;
            };
            let socket = match slot {
                None => Some(&listener.socket),
                Some(slot) => listener.rotation.as_ref().and_then(|r| r.accepting(slot)),
            };
            let Some(Ok((stream, _))) = socket.map(|s| s.accept()) else {
                break;
            };
            drop(stream);
            let total = self.counters.dropped_fd_limit.fetch_add(1, Relaxed) + 1;
            if total.is_power_of_two() {
                warn!(
                    listener = index,
                    total,
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

    fn on_accept_error(&mut self, index: usize, e: io::Error) {
        self.counters.accept_errors[accept_error_kind(&e)].fetch_add(1, Relaxed);
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

    /// A new connection: straight to a worker when nothing from its
    /// listener waits before it.
    fn take_new(&mut self, conn: Accepted) {
        let lane = usize::from(conn.handoff.listener);
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
                    "no worker can take connections and the queue is full: closed a new connection"
                );
            }
        } else {
            self.queue.push_back(lane, conn);
        }
    }

    /// Dispatches what waits, each listener's line in order until its front
    /// finds no worker; a stuck line does not hold up the others.
    fn flush_queue(&mut self) {
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
            let channels = &self.channels;
            let active = &self.active;
            let limits = &self.limits;
            let slot = self
                .dispatcher
                .choose(conn.handoff.peer.ip(), active.len(), |s| {
                    if conn.refused_by == Some(s) {
                        return None;
                    }
                    let worker = active[s].and_then(|i| channels[i].as_ref())?;
                    worker
                        .can_take(conn.handoff.listener, now, limits)
                        .then(|| worker.load())
                });
            let Some(slot) = slot else {
                return Err(conn);
            };
            let index = self.active[slot].expect("chosen slot is live");
            let worker = self.channels[index].as_mut().expect("chosen slot is live");
            let sent = match worker.node.as_mut() {
                None => fdpass::send_with_fd(
                    worker.channel.as_fd(),
                    conn.handoff.encode(&mut message),
                    conn.stream.as_fd(),
                ),
                Some(node) => node.send_connection(
                    worker.channel.as_fd(),
                    conn.handoff.connection_id,
                    conn.handoff.listener,
                    conn.stream.as_fd(),
                ),
            };
            match sent {
                Ok(()) => {
                    worker.in_flight.push_back(InFlight { conn, sent_at: now });
                    worker.sent += 1;
                    self.counters.in_flight.fetch_add(1, Relaxed);
                    if worker.recycle_after == Some(worker.sent) {
                        let _ = self.events.send(Event::RecycleDue {
                            worker: worker.worker,
                        });
                    }
                    if worker.node.as_ref().is_some_and(NodeChannel::wants_write) {
                        self.watch_writable(index, true);
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
                    self.watch_writable(index, true);
                }
                Err(e) => {
                    debug!(slot, "worker channel failed on send: {e}");
                    self.retire(index, Retired::ChannelClosed);
                }
            }
        }
    }

    /// Adds or removes WRITABLE interest; only wanted while a channel is full.
    fn watch_writable(&mut self, index: usize, writable: bool) {
        let Some(worker) = self.channels[index].as_ref() else {
            return;
        };
        let interest = if writable {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        let raw = worker.channel.as_raw_fd();
        let _ =
            self.poll
                .registry()
                .reregister(&mut SourceFd(&raw), channel_token(index), interest);
    }

    fn unblock(&mut self, index: usize) {
        let Some(worker) = self.channels.get_mut(index).and_then(Option::as_mut) else {
            return;
        };
        // Room on a channel is capacity: refused connections may go there now.
        self.capacity_epoch += 1;
        if let Some(node) = worker.node.as_mut() {
            worker.blocked = false;
            let flushed = node.flush(worker.channel.as_fd());
            return self.after_node_send(index, flushed);
        }
        if worker.blocked {
            worker.blocked = false;
            self.watch_writable(index, false);
            self.send_pending_drain(index);
        }
    }

    /// Reads what waits on a worker's channel, a turn's budget at most
    /// (the rest on the next turn); retires the worker if the channel closed.
    fn read_worker(&mut self, index: usize) {
        let Some(worker) = self.channels.get_mut(index).and_then(Option::as_mut) else {
            return;
        };
        worker.more_to_read = false;
        if worker.node.is_some() {
            return self.read_node_worker(index);
        }
        let mut buf = [0u8; MAX_MESSAGE_LEN];
        for _ in 0..READ_BUDGET_MESSAGES {
            let Some(worker) = self.channels.get_mut(index).and_then(Option::as_mut) else {
                return;
            };
            match fdpass::recv_with_fd(worker.channel.as_fd(), &mut buf, true) {
                Ok(Some(received)) => {
                    if received.fd.is_some() {
                        // Closed when `received` is dropped.
                        worker.bad_message(
                            BadMessage::StrayFd,
                            "a file descriptor (herd never asks a worker for one); closed it",
                        );
                    }
                    match WorkerMessage::decode(&buf[..received.len]) {
                        Ok(message) => self.on_message(index, message),
                        Err(e) => worker.bad_message(
                            BadMessage::Malformed,
                            format!("a malformed message: {e}"),
                        ),
                    }
                }
                Ok(None) => return self.retire(index, Retired::ChannelClosed),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    worker.bad_message(BadMessage::Malformed, format!("a malformed message: {e}"));
                }
                Err(e) => {
                    debug!(slot = worker.slot, "worker channel failed on receive: {e}");
                    return self.retire(index, Retired::ChannelClosed);
                }
            }
        }
        self.read_again(index);
    }

    /// The channel may hold more than this turn read: with edge-triggered
    /// polling no new wake-up comes for it, so it is read again next turn.
    fn read_again(&mut self, index: usize) {
        if let Some(worker) = self.channels.get_mut(index).and_then(Option::as_mut) {
            if !worker.more_to_read {
                worker.more_to_read = true;
                self.more_to_read.push(index);
            }
        }
    }

    fn on_message(&mut self, index: usize, message: WorkerMessage) {
        let Some(worker) = self.channels[index].as_mut() else {
            return;
        };
        match message {
            WorkerMessage::Ack(id) => {
                let Some(entry) = take_in_flight(&mut worker.in_flight, id) else {
                    return worker.bad_message(
                        BadMessage::UnknownId,
                        format!("an ACK for connection {id}, which it has not got in flight"),
                    );
                };
                self.capacity_epoch += 1;
                if self.measure_latency {
                    let nanos = entry.conn.accepted_at.elapsed().as_nanos() as u64;
                    self.counters.latency.record(nanos);
                }
                // Dropping the entry closes the primary's copy of the fd.
                drop(entry);
                self.counters.in_flight.fetch_sub(1, Relaxed);
                self.counters.handed_off[worker.slot].fetch_add(1, Relaxed);
                worker.acked += 1;
                if worker.closed.is_some() {
                    self.counters.open_connections[worker.slot].fetch_add(1, Relaxed);
                }
                if worker.blocked {
                    worker.blocked = false;
                    self.send_pending_drain(index);
                }
            }
            WorkerMessage::Nack(id) => {
                let Some(mut entry) = take_in_flight(&mut worker.in_flight, id) else {
                    return worker.bad_message(
                        BadMessage::UnknownId,
                        format!("a NACK for connection {id}, which it has not got in flight"),
                    );
                };
                self.counters.requeued_refused.fetch_add(1, Relaxed);
                self.counters.in_flight.fetch_sub(1, Relaxed);
                entry.conn.refused_by = Some(worker.slot);
                let serving = self.active.iter().flatten().count();
                entry
                    .conn
                    .refusals
                    .refused(self.capacity_epoch, serving, Instant::now());
                self.queue
                    .push_front(usize::from(entry.conn.handoff.listener), entry.conn);
            }
            WorkerMessage::Ready { reports_closed } => {
                if reports_closed && worker.closed.is_none() {
                    worker.closed = Some(0);
                    self.counters.reports_closed[worker.slot].store(true, Relaxed);
                }
                self.report_ready(index)
            }
            WorkerMessage::Accepted { listener, .. } => {
                // OS-scheduled modes: the worker accepted by itself; count
                // it as herd counts its own hand-offs.
                if let Some(accepted) = self.counters.accepted.get(usize::from(listener)) {
                    accepted.fetch_add(1, Relaxed);
                }
                self.counters.handed_off[worker.slot].fetch_add(1, Relaxed);
                worker.sent += 1;
                worker.acked += 1;
                if worker.closed.is_some() {
                    self.counters.open_connections[worker.slot].fetch_add(1, Relaxed);
                }
                if worker.recycle_after == Some(worker.sent) {
                    let _ = self.events.send(Event::RecycleDue {
                        worker: worker.worker,
                    });
                }
            }
            WorkerMessage::Closed(id) => {
                let slot = worker.slot;
                let open = &self.counters.open_connections[slot];
                if worker.closed.is_none() {
                    // The first report: from now on this worker's count is
                    // tracked, and all it acknowledged so far counts as open.
                    worker.closed = Some(0);
                    self.counters.reports_closed[slot].store(true, Relaxed);
                    open.fetch_add(worker.acked, Relaxed);
                }
                let closed = worker.closed.as_mut().expect("set above");
                if *closed < worker.acked {
                    *closed += 1;
                    open.fetch_sub(1, Relaxed);
                } else {
                    // Never more closed than acknowledged: the count cannot
                    // wrap, so least-conn cannot be fooled into starving it.
                    worker.bad_message(
                        BadMessage::UnknownId,
                        format!(
                            "a CLOSED for connection {id}, beyond every connection it acknowledged"
                        ),
                    );
                }
            }
        }
    }

    /// Reads and acts on what a Node cluster worker sent, a turn's budget
    /// at most (see [`node_ipc::NodeChannel::read`]).
    fn read_node_worker(&mut self, index: usize) {
        let mut messages = Vec::new();
        let read = {
            let Some(worker) = self.channels[index].as_mut() else {
                return;
            };
            let node = worker.node.as_mut().expect("a Node worker");
            node.read(worker.channel.as_fd(), &mut messages)
        };
        for message in messages {
            self.on_node_message(index, message);
        }
        match read {
            Ok(node_ipc::Read::Drained) => {}
            Ok(node_ipc::Read::More) => self.read_again(index),
            Ok(node_ipc::Read::Closed) => self.retire(index, Retired::ChannelClosed),
            Err(e) => {
                debug!("Node worker channel failed: {e}");
                self.retire(index, Retired::ChannelClosed);
            }
        }
    }

    fn on_node_message(&mut self, index: usize, message: node_ipc::Incoming) {
        use node_ipc::Incoming;
        let Some(worker) = self.channels[index].as_mut() else {
            return;
        };
        let node = worker.node.as_mut().expect("a Node worker");
        let channel = worker.channel.as_fd();
        let sent = match message {
            Incoming::QueryServer(query) => return self.answer_query(index, query),
            Incoming::Listening => {
                self.report_ready(index);
                Ok(())
            }
            Incoming::Accepted { ack, accepted } => {
                let message = if accepted {
                    WorkerMessage::Ack(ack)
                } else {
                    WorkerMessage::Nack(ack)
                };
                self.on_message(index, message);
                Ok(())
            }
            Incoming::HandleAck => {
                node.handle_answered();
                Ok(())
            }
            Incoming::HandleNack => {
                // The handle never arrived: that connection goes elsewhere.
                if let Some(SentHandle::Connection(id)) = node.handle_answered() {
                    self.on_message(index, WorkerMessage::Nack(id));
                }
                Ok(())
            }
            Incoming::Handle => node.send_line(channel, node_ipc::handle_ack()),
            Incoming::ExitedAfterDisconnect { seq: theirs } => {
                let seq = node.next_seq();
                node.send_line(channel, node_ipc::ack(theirs, seq))
            }
            Incoming::Close { key } => {
                if let Some(listener) = node.remove_server(&key) {
                    self.update_rotation(usize::from(listener), index, SlotRotation::release);
                    self.release_if_unused(usize::from(listener));
                }
                return;
            }
            Incoming::Online | Incoming::Other => Ok(()),
        };
        self.after_node_send(index, sent);
    }

    /// `shared` mode (Node workers): the workers accept from herd's sockets.
    fn workers_accept(&self) -> bool {
        !self.dispatcher.mode().hands_off()
    }

    fn listener(&self, index: usize) -> Option<&Listening> {
        self.listeners.get(index).and_then(Option::as_ref)
    }

    fn listener_mut(&mut self, index: usize) -> Option<&mut Listening> {
        self.listeners.get_mut(index).and_then(Option::as_mut)
    }

    /// Registers a bound listener (for accepting, in the hand-off modes)
    /// at the first free index; returns it.
    fn add_listener(
        &mut self,
        socket: std::net::TcpListener,
        node_key: Option<String>,
    ) -> Result<usize, AddListenerError> {
        let index = match self.listeners.iter().position(Option::is_none) {
            Some(free) => free,
            None if self.listeners.len() < MAX_LISTENERS => {
                self.listeners.push(None);
                self.listeners.len() - 1
            }
            None => return Err(AddListenerError::TableFull),
        };
        let local = socket.local_addr()?;
        let rotation = self.start_rotation(&socket, local);
        let mut socket = mio::net::TcpListener::from_std(socket);
        // In `shared` mode the workers accept; herd only keeps the socket.
        if !self.workers_accept() {
            self.poll
                .registry()
                .register(&mut socket, Token(index), Interest::READABLE)?;
        }
        self.listeners[index] = Some(Listening {
            socket,
            local,
            wildcard: local.ip().is_unspecified(),
            node_key,
            rotation,
        });
        self.counters.set_listener(index, Some(local));
        Ok(index)
    }

    /// Closes a listener bound for Node apps once no worker listens on it
    /// any more, as Node's primary closes a server then; what still waits
    /// for it is closed (no worker will ever take it). Configured
    /// listeners stay for herd's lifetime. A worker that exits keeps its
    /// servers: its replacement asks for the same ones, and a port that
    /// closed between the two would refuse clients.
    fn release_if_unused(&mut self, index: usize) {
        let Some(listening) = self.listener(index) else {
            return;
        };
        let served = self.channels.iter().flatten().any(|w| {
            w.node
                .as_ref()
                .is_some_and(|node| node.serves(index as u16))
        });
        if listening.node_key.is_none() || served {
            return;
        }
        let mut listening = self.listeners[index].take().expect("looked up above");
        let _ = self.poll.registry().deregister(&mut listening.socket);
        self.counters.set_listener(index, None);
        let closed = self.queue.clear_lane(index);
        self.counters
            .dropped_queue_timeout
            .fetch_add(closed as u64, Relaxed);
        info!(
            listener = index,
            closed, "released {} (no Node worker listens on it any more)", listening.local
        );
    }

    /// The kernel rotation for a new listener, if round-robin is to be
    /// dealt by the kernel. Where the kernel refuses (no CAP_BPF, an old
    /// kernel, a socket without SO_REUSEPORT), says why once and hands off.
    fn start_rotation(
        &mut self,
        socket: &std::net::TcpListener,
        local: SocketAddr,
    ) -> Option<SlotRotation> {
        if !self.limits.kernel_rotation {
            return None;
        }
        match SlotRotation::start(socket.as_fd(), self.backlog) {
            Ok(rotation) => {
                self.tally_due
                    .get_or_insert(Instant::now() + TALLY_INTERVAL);
                Some(rotation)
            }
            Err(e) => {
                warn!(
                    "round-robin on {local} falls back to hand-offs over the cluster channel: {e}"
                );
                self.limits.kernel_rotation = false;
                None
            }
        }
    }

    /// Applies `change` for worker `index` to every listener's rotation.
    /// (Index, not iterator: `update_rotation` borrows the loop mutably.)
    fn update_rotations(&mut self, index: usize, change: fn(&mut SlotRotation, usize)) {
        for listener in 0..self.listeners.len() {
            self.update_rotation(listener, index, change);
        }
    }

    /// Applies `change` for worker `index` to `listener`'s rotation (if it
    /// has one and the worker holds a socket of it) and brings the kernel in line.
    fn update_rotation(
        &mut self,
        listener: usize,
        index: usize,
        change: fn(&mut SlotRotation, usize),
    ) {
        let Some(rotation) = self
            .listeners
            .get_mut(listener)
            .and_then(Option::as_mut)
            .and_then(|l| l.rotation.as_mut())
        else {
            return;
        };
        if !rotation.holds(index) {
            return;
        }
        change(rotation, index);
        let applied = rotation.apply(self.poll.registry(), |slot| slot_token(listener, slot));
        if let Err(e) = applied {
            error!(listener, "cannot update the kernel rotation: {e}");
        }
    }

    /// Reads what the kernel dealt per slot into the counters, as if herd
    /// had handed those connections off itself.
    fn tally_kernel_rotations(&mut self) {
        for listener in 0..self.listeners.len() {
            let Some(rotation) = self
                .listener_mut(listener)
                .and_then(|l| l.rotation.as_mut())
            else {
                continue;
            };
            let dealt = match rotation.take_dealt() {
                Ok(dealt) => dealt,
                Err(e) => {
                    debug!(listener, "cannot read the kernel rotation's counts: {e}");
                    continue;
                }
            };
            for (slot, count) in dealt {
                self.counters.accepted[listener].fetch_add(count, Relaxed);
                self.counters.kernel_dealt.fetch_add(count, Relaxed);
                if let Some(handed_off) = self.counters.handed_off.get(slot) {
                    handed_off.fetch_add(count, Relaxed);
                }
                let Some(worker) = self
                    .active
                    .get(slot)
                    .copied()
                    .flatten()
                    .and_then(|index| self.channels[index].as_mut())
                else {
                    continue;
                };
                let before = worker.sent;
                worker.sent += count;
                worker.acked += count;
                if let Some(limit) = worker.recycle_after {
                    if before < limit && worker.sent >= limit {
                        let _ = self.events.send(Event::RecycleDue {
                            worker: worker.worker,
                        });
                    }
                }
            }
        }
    }

    /// Answers a Node worker's `listen` (its `queryServer`): with the
    /// listener that serves it (its address as `sockname`; in `shared` mode
    /// the socket itself), or with the errno of why there is none.
    fn answer_query(&mut self, index: usize, query: node_ipc::QueryServer) {
        let listener = self.listener_for(&query);
        if let Ok(listener) = listener {
            if self
                .listener(listener)
                .is_some_and(|l| l.rotation.is_some())
                && self.answer_with_slot_socket(index, listener, &query)
            {
                return;
            }
        }
        let shared = self.workers_accept();
        let Some(worker) = self.channels[index].as_mut() else {
            return;
        };
        let node = worker.node.as_mut().expect("a Node worker");
        let channel = worker.channel.as_fd();
        let seq = node.next_seq();
        let sent = match listener {
            Err((errno, why)) => {
                warn!(
                    slot = worker.slot,
                    pid = worker.pid,
                    key = %query.key,
                    "refused a Node worker's listen ({}): {why}",
                    errno.desc()
                );
                let errno = Some(node_ipc::uv_errno(errno));
                node.send_line(channel, node_ipc::query_reply(&query, None, errno, seq))
            }
            Ok(listener) if shared => {
                let Some(listening) = self.listeners[listener].as_ref() else {
                    return;
                };
                node.add_server(listener as u16, query.key.clone());
                let line = node_ipc::query_reply_with_server(&query, seq);
                node.send_server(channel, line, listening.socket.as_fd())
            }
            Ok(listener) => {
                // Node checks that the port it asked for is the one bound
                // (else EADDRINUSE): when herd serves `listen(3000)` on a
                // configured listener with another port, `sockname` (and so
                // `server.address()`) keeps the asked-for port.
                let Some(local) = self.listeners[listener].as_ref().map(|l| l.local) else {
                    return;
                };
                let sockname = match query.port {
                    Some(asked) if asked != 0 => SocketAddr::new(local.ip(), asked),
                    _ => local,
                };
                node.add_server(listener as u16, query.key.clone());
                let line = node_ipc::query_reply(&query, Some(sockname), None, seq);
                node.send_line(channel, line)
            }
        };
        self.after_node_send(index, sent);
    }

    /// Kernel rotation: answers a Node worker's `listen` on `listener` with
    /// its slot's socket, as Node's primary answers in `shared` mode, and
    /// puts the slot in the rotation. False if the worker must be served by
    /// hand-offs instead: the app asked for another port than the
    /// listener's (Node checks the socket's real port), or the slot socket
    /// could not be bound.
    fn answer_with_slot_socket(
        &mut self,
        index: usize,
        listener: usize,
        query: &node_ipc::QueryServer,
    ) -> bool {
        let Some(worker) = self.channels[index].as_mut() else {
            return true;
        };
        let Some(Listening {
            local, rotation, ..
        }) = self.listeners[listener].as_mut()
        else {
            return false;
        };
        let Some(rotation) = rotation.as_mut() else {
            return false;
        };
        if query
            .port
            .is_some_and(|asked| asked != 0 && asked != local.port())
        {
            return false;
        }
        let socket = match rotation.hold(worker.slot, index) {
            Ok(socket) => socket,
            Err(e) => {
                warn!(
                    slot = worker.slot,
                    "hand-offs instead of kernel rotation for this worker: {e}"
                );
                return false;
            }
        };
        let node = worker.node.as_mut().expect("a Node worker");
        node.add_server(listener as u16, query.key.clone());
        let seq = node.next_seq();
        let line = node_ipc::query_reply_with_server(query, seq);
        let sent = node.send_server(worker.channel.as_fd(), line, socket);
        let applied = rotation.apply(self.poll.registry(), |slot| slot_token(listener, slot));
        if let Err(e) = applied {
            error!(listener, "cannot update the kernel rotation: {e}");
        }
        self.after_node_send(index, sent);
        true
    }

    /// The listener for a Node worker's `listen`. With listeners configured,
    /// the one on the port the app asked for, else the first. Without, the
    /// one bound for this key before (so `listen(0)` picks a port once and
    /// every worker shares it), or one bound now, as Node's primary binds:
    /// no address means `[::]`, dual-stack, falling back to `0.0.0.0`.
    fn listener_for(
        &mut self,
        query: &node_ipc::QueryServer,
    ) -> Result<usize, (nix::Error, String)> {
        use nix::Error as Errno;
        if self.stopped_accepting {
            return Err((Errno::ESHUTDOWN, "herd is stopping".into()));
        }
        let Some(port) = query.port else {
            return Err((
                Errno::EAFNOSUPPORT,
                "herd serves TCP ports only (not Unix socket paths or UDP)".into(),
            ));
        };
        if query.fd.is_some() {
            return Err((
                Errno::EINVAL,
                "listen({fd}) names a socket of the worker's, which herd cannot share".into(),
            ));
        }
        if !self.listen_on_demand {
            let by_port = self
                .listeners
                .iter()
                .position(|l| l.as_ref().is_some_and(|l| l.local.port() == port));
            let shared = self.workers_accept();
            return match by_port {
                Some(index) => Ok(index),
                // Node checks the real socket's port in `shared` mode.
                None if shared && port != 0 => Err((
                    Errno::EADDRINUSE,
                    format!(
                        "in shared mode a Node app must listen on the port herd listens on, or 0 (it asked for {port}); or leave `listen` out and herd binds what the app asks"
                    ),
                )),
                None if self.listener(0).is_none() => {
                    Err((Errno::ESHUTDOWN, "herd is stopping".into()))
                }
                None => Ok(0),
            };
        }
        if let Some(index) = self.listeners.iter().position(|l| {
            l.as_ref()
                .is_some_and(|l| l.node_key.as_deref() == Some(query.key.as_str()))
        }) {
            return Ok(index);
        }
        if self.listeners.len() >= MAX_LISTENERS && self.listeners.iter().all(Option::is_some) {
            // Not EMFILE: herd has fds; its listener table is what is full.
            return Err((
                Errno::ENOBUFS,
                format!(
                    "herd holds at most {MAX_LISTENERS} listeners (MAX_LISTENERS), and as many servers are open; close one, or listen on a shared port"
                ),
            ));
        }
        let failed = |e: listener::ListenError| (e.source, e.to_string());
        // A kernel rotation needs a SO_REUSEPORT group to deal over.
        let reuse_port = self.limits.kernel_rotation;
        let socket = match &query.address {
            None => {
                let any6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
                listener::bind_dual_stack(any6, self.backlog, query.ipv6_only, reuse_port).or_else(
                    |e| match e.source {
                        Errno::EAFNOSUPPORT | Errno::EADDRNOTAVAIL => {
                            let any4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port));
                            listener::bind_dual_stack(any4, self.backlog, true, reuse_port)
                        }
                        _ => Err(e),
                    },
                )
            }
            Some(text) => match text.parse::<std::net::IpAddr>() {
                Ok(ip) => listener::bind_dual_stack(
                    SocketAddr::new(ip, port),
                    self.backlog,
                    query.ipv6_only,
                    reuse_port,
                ),
                Err(_) => {
                    return Err((Errno::EINVAL, format!("{text:?} is not an IP address")));
                }
            },
        }
        .map_err(failed)?;
        let index = self
            .add_listener(socket, Some(query.key.clone()))
            .map_err(|e| match e {
                AddListenerError::TableFull => (Errno::ENOBUFS, e.to_string()),
                AddListenerError::Io(io) => (
                    io.raw_os_error().map_or(Errno::EIO, Errno::from_raw),
                    io.to_string(),
                ),
            })?;
        let local = self.listener(index).expect("just added").local;
        info!(
            listener = index,
            "listening on {local} (asked for by a Node worker: {})", query.key
        );
        Ok(index)
    }

    /// Watches for room while a Node worker's outbox is not empty; retires
    /// the worker if its channel failed.
    fn after_node_send(&mut self, index: usize, sent: io::Result<()>) {
        match sent {
            Ok(()) => {
                // A worker skipped for a full channel waits for room too.
                let wants_write = self.channels[index].as_ref().is_some_and(|w| {
                    w.blocked || w.node.as_ref().is_some_and(NodeChannel::wants_write)
                });
                self.watch_writable(index, wants_write);
            }
            Err(e) => {
                debug!("Node worker channel failed on send: {e}");
                self.retire(index, Retired::ChannelClosed);
            }
        }
    }

    /// Removes a worker whose channel is gone, or whose process exited, and
    /// puts every connection it had not acknowledged back at the front of
    /// the queue, oldest first.
    fn retire(&mut self, index: usize, why: Retired) {
        let requeued = self.requeue_in_flight(index);
        let Some(worker) = self.channels[index].take() else {
            return;
        };
        let raw = worker.channel.as_raw_fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
        if self.active.get(worker.slot) == Some(&Some(index)) {
            self.active[worker.slot] = None;
        }
        self.update_rotations(index, SlotRotation::release);
        if let Some(closed) = worker.closed {
            // Whatever it still had open ended with its channel.
            self.counters.open_connections[worker.slot].fetch_sub(worker.acked - closed, Relaxed);
        }
        self.counters
            .requeued_worker_gone
            .fetch_add(requeued as u64, Relaxed);
        if requeued > 0 {
            info!(
                slot = worker.slot,
                pid = worker.pid,
                requeued,
                "worker left unacknowledged connections; handing them to other workers"
            );
        }
        if why == Retired::ChannelClosed {
            let _ = self.events.send(Event::ChannelClosed {
                worker: worker.worker,
            });
        }
    }

    /// Takes back every connection sent to worker `index` and not yet
    /// acknowledged, to the front of their queues, oldest first.
    fn requeue_in_flight(&mut self, index: usize) -> usize {
        let Some(worker) = self.channels[index].as_mut() else {
            return 0;
        };
        let requeued = worker.in_flight.len();
        for entry in worker.in_flight.drain(..).rev() {
            self.queue
                .push_front(usize::from(entry.conn.handoff.listener), entry.conn);
        }
        self.counters.in_flight.fetch_sub(requeued as u64, Relaxed);
        requeued
    }
}

/// A spare file descriptor ([`HandoffLoop::shed`] gives it up for a moment).
fn reserve_fd() -> Option<OwnedFd> {
    std::fs::File::open("/dev/null").ok().map(OwnedFd::from)
}

/// Why a listener could not be added.
#[derive(Debug, thiserror::Error)]
enum AddListenerError {
    #[error("herd holds at most {MAX_LISTENERS} listeners (MAX_LISTENERS)")]
    TableFull,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Why a worker left the hand-off loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retired {
    /// Its channel reached EOF or failed: the supervisor is told.
    ChannelClosed,
    /// The supervisor said its process exited ([`Command::Forget`]).
    ProcessExited,
}

/// What the loop needs to know of a worker it is given.
#[derive(Debug)]
pub struct NewWorker {
    pub slot: usize,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_lands_in_the_right_buckets() {
        let histogram = LatencyHistogram::default();
        for nanos in [1, 5_000, 5_001, 99_000_000, 500_000_000] {
            histogram.record(nanos);
        }
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.count, 5);
        assert_eq!(
            snapshot.sum_nanos,
            1 + 5_000 + 5_001 + 99_000_000 + 500_000_000
        );
        assert_eq!(snapshot.buckets[0], 2, "<= 5 µs");
        assert_eq!(snapshot.buckets[1], 1, "<= 10 µs");
        assert_eq!(snapshot.buckets[13], 1, "<= 100 ms");
        assert_eq!(snapshot.buckets[14], 1, "+Inf");
    }
}
