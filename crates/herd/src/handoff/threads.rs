//! herd's hand-off threads past the first (`handoff_threads`): each
//! accepts on its own SO_REUSEPORT copy of every listener, chooses a
//! worker by the mode and sends it the connection, as thread 0 does, but
//! owns nothing else.
//!
//! The kernel spreads new connections over a listener's copies by a hash
//! of the 4-tuple, so each thread accepts its share with no lock and no
//! shared wake-up. A thread sends only to workers that count receipts per
//! thread ([`ReadyFlags::THREADS`]) through their [`SharedWorker`]; its
//! connection ids carry its number in their top byte, so the worker's page
//! says which of *its* hand-offs were taken. Everything it cannot send (no
//! such worker can take it, the policy chose a thread-0-only worker, the
//! channel is full, the gate is closed) it forwards to thread 0, which
//! queues, parks, expires and dispatches as it does its own, over a
//! bounded channel: when that is full the thread holds what it has, accepts
//! nothing more until it got rid of it, and the kernel's queue holds the
//! rest. Thread 0 watches what the threads sent (stalls, takes, dead
//! workers) from the pages and takes back what is queued when it must.
//!
//! [`ReadyFlags::THREADS`]: herd_protocol::wire::ReadyFlags::THREADS

use super::roster::{Roster, RosterBoard, SharedWorker, SlotView};
use super::*;
use herd_protocol::wire::{encode_batch, MAX_BATCH, MAX_BATCH_LEN, THREAD_SHIFT};
use std::sync::atomic::AtomicBool;

/// Connections the threads may have forwarded to thread 0 and thread 0
/// not yet taken (each holds an fd); past it a thread stops accepting
/// until there is room. Thread 0 takes them every turn it is woken.
pub(crate) const FORWARD_LIMIT: usize = 256;
/// How often a thread holding what it could not forward tries again.
const FORWARD_RETRY: Duration = Duration::from_millis(5);
const THREAD_WAKER: Token = Token(usize::MAX);
/// Connections accepted from one copy per turn: under a flood that never
/// lets the queue run dry, the thread still turns (sends its batches,
/// sees a new roster, sees that it is told to stop) between runs.
const ACCEPT_BUDGET: usize = 256;

/// A listener's copy in one thread's group share.
pub(super) struct ListenerCopy {
    pub(super) listener: ListenerIx,
    pub(super) socket: mio::net::TcpListener,
    pub(super) local: SocketAddr,
}

/// What a stopped thread hands back to thread 0.
pub(super) struct Parked {
    pub(super) copies: Vec<ListenerCopy>,
    /// Accepted and not yet sent or forwarded: thread 0's to serve.
    pub(super) held: Vec<Accepted>,
}

/// Thread 0's handle on the other threads.
pub(super) struct OtherThreads {
    /// Threads in all, thread 0 included.
    pub(super) count: usize,
    running: Vec<Running>,
    pub(super) board: Arc<RosterBoard>,
    forwarded_tx: mpsc::SyncSender<Accepted>,
    pub(super) forwarded: mpsc::Receiver<Accepted>,
    mode: Mode,
    counters: Arc<Counters>,
    home: Arc<Waker>,
    measure_latency: bool,
}

struct Running {
    thread: JoinHandle<Parked>,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
}

impl OtherThreads {
    pub(super) fn new(
        count: usize,
        mode: Mode,
        counters: Arc<Counters>,
        home: Arc<Waker>,
        measure_latency: bool,
    ) -> OtherThreads {
        let (forwarded_tx, forwarded) = mpsc::sync_channel(FORWARD_LIMIT);
        OtherThreads {
            count,
            running: Vec::new(),
            board: Arc::default(),
            forwarded_tx,
            forwarded,
            mode,
            counters,
            home,
            measure_latency,
        }
    }

    /// Starts thread `1 + k` with `copies[k]`, for every share given.
    pub(super) fn start(&mut self, shares: Vec<Vec<ListenerCopy>>) -> io::Result<()> {
        for copies in shares {
            let index = self.running.len() + 1;
            let poll = Poll::new()?;
            let waker = Arc::new(Waker::new(poll.registry(), THREAD_WAKER)?);
            let stop = Arc::new(AtomicBool::new(false));
            let mut state = ThreadLoop {
                readable: vec![true; copies.len()],
                wake_home: false,
                index,
                threads: self.count,
                poll,
                copies,
                board: self.board.clone(),
                roster: Arc::default(),
                roster_version: u64::MAX,
                dispatcher: Dispatcher::new(self.mode),
                next_id: 0,
                counters: self.counters.clone(),
                forward: self.forwarded_tx.clone(),
                home: self.home.clone(),
                held: Vec::new(),
                batches: Vec::new(),
                due: Vec::new(),
                full: Vec::new(),
                stop: stop.clone(),
                paused_until: None,
                backoff: ACCEPT_BACKOFF_MIN,
                measure_latency: self.measure_latency,
            };
            for (at, copy) in state.copies.iter_mut().enumerate() {
                state
                    .poll
                    .registry()
                    .register(&mut copy.socket, Token(at), Interest::READABLE)?;
            }
            let thread = std::thread::Builder::new()
                .name(format!("herd-handoff-{index}"))
                .spawn(move || state.run())?;
            self.running.push(Running {
                thread,
                waker,
                stop,
            });
        }
        Ok(())
    }

    /// Wakes every thread (a new roster is out: they let go of the old one).
    pub(super) fn wake_all(&self) {
        for running in &self.running {
            let _ = running.waker.wake();
        }
    }

    /// Stops every thread and returns what each held, thread by thread. A
    /// thread stops within a turn: it never blocks but in its poll.
    pub(super) fn stop_all(&mut self) -> Vec<Parked> {
        for running in &self.running {
            running.stop.store(true, Relaxed);
            let _ = running.waker.wake();
        }
        self.running
            .drain(..)
            .map(|running| {
                running.thread.join().unwrap_or_else(|_| {
                    error!(
                        event = "handoff_thread_failed",
                        "a hand-off thread panicked"
                    );
                    Parked {
                        copies: Vec::new(),
                        held: Vec::new(),
                    }
                })
            })
            .collect()
    }
}

/// One hand-off thread past the first, in its own thread.
struct ThreadLoop {
    /// Its number, 1 and up: the top byte of its connection ids.
    index: usize,
    /// Threads in all.
    threads: usize,
    poll: Poll,
    /// Copy `i` has token `i`.
    copies: Vec<ListenerCopy>,
    /// Per copy, woken and not yet accepted from until EAGAIN.
    readable: Vec<bool>,
    /// Something was forwarded this turn: thread 0 is woken once for it.
    wake_home: bool,
    board: Arc<RosterBoard>,
    roster: Arc<Roster>,
    roster_version: u64,
    dispatcher: Dispatcher,
    next_id: u64,
    counters: Arc<Counters>,
    forward: mpsc::SyncSender<Accepted>,
    /// Thread 0's waker: forwarded connections wait for it.
    home: Arc<Waker>,
    /// Could not be forwarded (thread 0's inbox full): sent first, and
    /// nothing is accepted while any is left.
    held: Vec<Accepted>,
    /// Per roster slot, what this turn gave its worker.
    batches: Vec<Vec<Accepted>>,
    /// Slots with a batch to send.
    due: Vec<usize>,
    /// Per roster slot, its channel was full this turn.
    full: Vec<bool>,
    stop: Arc<AtomicBool>,
    paused_until: Option<Instant>,
    backoff: Duration,
    measure_latency: bool,
}

impl ThreadLoop {
    fn run(mut self) -> Parked {
        let mut events = Events::with_capacity(256);
        while !self.stop.load(Relaxed) {
            let more = self.readable.iter().any(|&r| r) && self.held.is_empty();
            let timeout = match (self.held.is_empty(), self.paused_until) {
                (true, None) if more => Some(Duration::ZERO),
                (false, _) => Some(FORWARD_RETRY),
                (true, Some(until)) => Some(until.saturating_duration_since(Instant::now())),
                (true, None) => None,
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    error!(
                        thread = self.index,
                        event = "poll_failed",
                        "hand-off thread cannot poll: {e}"
                    );
                    break;
                }
            }
            if self.stop.load(Relaxed) {
                break;
            }
            self.refresh_roster();
            self.forward_held();
            if self
                .paused_until
                .is_some_and(|until| until <= Instant::now())
            {
                self.paused_until = None;
            }
            for event in events.iter() {
                let Token(at) = event.token();
                if at < self.copies.len() {
                    self.readable[at] = true;
                }
            }
            // Copies stay marked until accepted from to EAGAIN (after a
            // pause, or with something held, they wait their turn).
            for at in 0..self.copies.len() {
                if self.readable[at] && self.paused_until.is_none() && self.held.is_empty() {
                    self.readable[at] = false;
                    self.accept_all(at);
                }
            }
            self.send_due();
        }
        self.send_due();
        Parked {
            copies: std::mem::take(&mut self.copies),
            held: std::mem::take(&mut self.held),
        }
    }

    fn refresh_roster(&mut self) {
        if self.board.version() == self.roster_version {
            return;
        }
        let (roster, version) = self.board.current();
        self.roster = roster;
        self.roster_version = version;
        let slots = self.roster.slots.len();
        self.batches.resize_with(slots, Vec::new);
        self.full.resize(slots, false);
    }

    /// Accepts from copy `at` until EAGAIN (edge-triggered), each to a
    /// worker's batch or to thread 0; past [`ACCEPT_BUDGET`] the copy stays
    /// marked, for the next turn.
    fn accept_all(&mut self, at: usize) {
        for _ in 0..ACCEPT_BUDGET {
            if self.paused_until.is_some() || !self.held.is_empty() {
                // Woken meanwhile or not: it is tried again once it may.
                self.readable[at] = true;
                return;
            }
            let copy = &self.copies[at];
            match copy.socket.accept() {
                Ok((stream, peer)) => {
                    self.backoff = ACCEPT_BACKOFF_MIN;
                    self.next_id += 1;
                    let listener = copy.listener;
                    self.counters.accepted[listener].fetch_add(1, Relaxed);
                    // Each thread alone writes its own: no locked add.
                    bump(&self.counters.thread_accepted[self.index], 1);
                    let conn = Accepted {
                        stream,
                        handoff: Handoff {
                            connection_id: ((self.index as u64) << THREAD_SHIFT) | self.next_id,
                            listener: u16::from(listener),
                            peer,
                            local: copy.local,
                        },
                        accepted_at: Instant::now(),
                        refused_by: None,
                        refusals: Refusals::default(),
                    };
                    self.route(conn);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => self.on_accept_error(copy.listener, e),
            }
        }
        self.readable[at] = true;
    }

    fn on_accept_error(&mut self, listener: ListenerIx, e: io::Error) {
        self.counters.accept_errors[accept_error_kind(&e)].fetch_add(1, Relaxed);
        if matches!(
            e.raw_os_error(),
            Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO)
        ) {
            return;
        }
        // Out of fds or memory (or worse): what waits stays in the kernel's
        // queue; thread 0 sheds it if this lasts. Logged once per episode.
        if self.backoff == ACCEPT_BACKOFF_MIN {
            warn!(
                listener = listener.get(),
                thread = self.index,
                event = "accept_paused",
                "accept failed: {e}; pausing this hand-off thread's accepts (connections wait in the kernel queue)"
            );
        }
        self.paused_until = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(ACCEPT_BACKOFF_MAX);
    }

    /// The policy's pick among the workers this thread may send to; to
    /// thread 0 when there is none, or the pick is one only thread 0
    /// sends to (sticky keeps its choice: the same client, the same worker).
    fn route(&mut self, conn: Accepted) {
        let roster = &self.roster;
        let (batches, full, threads) = (&self.batches, &self.full, self.threads);
        let sticky = self.dispatcher.mode() == Mode::Sticky;
        let choice =
            self.dispatcher.choose(
                conn.handoff.peer.ip(),
                roster.slots.len(),
                |s| match &roster.slots[s] {
                    SlotView::Shared(worker) => {
                        let waiting = batches[s].len() as u64;
                        let room =
                            worker.outstanding(threads) + waiting < roster.max_unacked as u64;
                        (worker.is_open() && !full[s] && room && !worker.recycle_reached(threads))
                            .then(|| worker.load(threads) + waiting)
                    }
                    SlotView::Home if sticky => Some(0),
                    SlotView::Home | SlotView::Empty => None,
                },
            );
        match choice {
            Some(slot) if matches!(roster.slots[slot], SlotView::Shared(_)) => {
                if self.batches[slot].is_empty() {
                    self.due.push(slot);
                }
                self.batches[slot].push(conn);
                if self.batches[slot].len() >= MAX_BATCH {
                    self.send_batch(slot);
                }
            }
            _ => self.forward_one(conn),
        }
    }

    fn send_due(&mut self) {
        while let Some(slot) = self.due.pop() {
            self.send_batch(slot);
        }
        self.full.iter_mut().for_each(|full| *full = false);
        if std::mem::take(&mut self.wake_home) {
            let _ = self.home.wake();
        }
    }

    /// Sends slot `slot`'s batch in one message, holding the worker's
    /// gate; what cannot go goes to thread 0.
    fn send_batch(&mut self, slot: usize) {
        let mut batch = std::mem::take(&mut self.batches[slot]);
        if batch.is_empty() {
            return;
        }
        let SlotView::Shared(worker) = &self.roster.slots[slot] else {
            return self.forward_all(batch);
        };
        let worker: Arc<SharedWorker> = worker.clone();
        let mut buf = [0u8; MAX_BATCH_LEN];
        let bytes = encode_batch(batch.iter().map(|conn| &conn.handoff), &mut buf);
        let mut fds = [0; MAX_BATCH];
        for (fd, conn) in fds.iter_mut().zip(&batch) {
            *fd = conn.stream.as_raw_fd();
        }
        let count = batch.len() as u64;
        let index = self.index;
        let in_flight = &self.counters.in_flight;
        let sent = worker.send_if_open(|| {
            let sent = fdpass::send_with_fds(worker.channel.as_fd(), bytes, &fds[..batch.len()]);
            if sent.is_ok() {
                // Counted before the gate opens again: thread 0, once it
                // holds it, sees every send that went (and takes back
                // nothing it has not counted in flight).
                bump(&worker.sent[index], count);
                in_flight.fetch_add(count, Relaxed);
            }
            sent
        });
        match sent {
            Some(Ok(())) => {
                if self.measure_latency {
                    let now = Instant::now();
                    for conn in &batch {
                        let nanos = now.duration_since(conn.accepted_at).as_nanos() as u64;
                        self.counters.latency.record(nanos);
                    }
                }
                // Dropping them closes this thread's copies; the channel holds one each.
                batch.clear();
                self.batches[slot] = batch;
            }
            Some(Err(e))
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.raw_os_error() == Some(libc::ETOOMANYREFS) =>
            {
                self.full[slot] = true;
                self.forward_all(batch);
            }
            // A closed gate, or a channel that failed: thread 0 sees to
            // the worker and to these.
            Some(Err(_)) | None => self.forward_all(batch),
        }
    }

    fn forward_all(&mut self, batch: Vec<Accepted>) {
        for conn in batch {
            self.forward_one(conn);
        }
    }

    /// Forwards `conn` to thread 0, or holds it when thread 0's inbox is full.
    fn forward_one(&mut self, conn: Accepted) {
        bump(&self.counters.thread_forwarded[self.index], 1);
        if !self.held.is_empty() {
            return self.held.push(conn);
        }
        match self.forward.try_send(conn) {
            Ok(()) => self.wake_home = true,
            Err(mpsc::TrySendError::Full(conn)) => self.held.push(conn),
            // Thread 0 is gone: herd is stopping, and so is this thread.
            Err(mpsc::TrySendError::Disconnected(_)) => {}
        }
    }

    fn forward_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let held = std::mem::take(&mut self.held);
        let mut forwarded = false;
        let mut rest = held.into_iter();
        for conn in rest.by_ref() {
            match self.forward.try_send(conn) {
                Ok(()) => forwarded = true,
                Err(mpsc::TrySendError::Full(conn)) => {
                    self.held.push(conn);
                    break;
                }
                Err(mpsc::TrySendError::Disconnected(_)) => {}
            }
        }
        self.held.extend(rest);
        self.wake_home |= forwarded;
    }
}
