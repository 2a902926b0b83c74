//! The hand-off loop across `herd upgrade`: frozen, described, and rebuilt
//! in the new herd from the description.
//!
//! Freezing ([`Command::Freeze`]) describes every listener, worker channel
//! and connection the loop holds ([`CarriedLoop`]: fd numbers and what the
//! loop knows of each) and then stops the loop turning: nothing is
//! accepted, read or sent until [`Command::Thaw`], so the description stays
//! true until the exec replaces the process (the fds stay open through
//! it). Meanwhile new connections wait in the kernel's accept queues and
//! what workers send waits on their channels; the new herd's loop, built
//! by [`spawn_carried`], reads them. A Node listener's kernel rotation is
//! carried as its slot sockets, their holders and its program with its
//! maps, which stays attached and deals on through the exec. A loop that cannot be
//! described (a worker not serving, a Node channel with lines not yet
//! written) is not frozen, and the upgrade is refused.

use std::net::SocketAddr;
use std::os::fd::RawFd;

use serde::{Deserialize, Serialize};

use super::from_threads::ThreadsSeen;
use super::roster::SharedWorker;
use super::threads::ListenerCopy;
use super::*;
use crate::node_ipc::CarriedNodeChannel;
use crate::rotation::CarriedRotation;
use herd_protocol::page::Page;
use std::sync::atomic::AtomicU64;

/// Everything the loop holds, by fd number, as the new herd takes it over.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CarriedLoop {
    /// By listener index; `None`: a released index.
    pub listeners: Vec<Option<CarriedListener>>,
    pub channels: Vec<CarriedChannel>,
    /// Accepted connections no worker has yet, lane by lane.
    pub queue: Vec<CarriedConnection>,
    pub next_connection_id: u64,
    /// `node.primary = "run"`: workers' messages are relayed.
    #[serde(default)]
    pub app_primary_runs: bool,
    /// The running app primary's channel: (pid, fd, a partial line).
    #[serde(default)]
    pub app_primary: Option<(u32, RawFd, Vec<u8>)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CarriedListener {
    pub fd: RawFd,
    /// Bound for a Node app's `listen` (its key), not configured.
    pub node_key: Option<String>,
    /// Its kernel rotation's slot sockets (Node workers, `rotation = "kernel"`).
    #[serde(default)]
    pub rotation: Option<CarriedRotation>,
    /// The other hand-off threads' copies of it: (thread, fd).
    #[serde(default)]
    pub copies: Vec<(usize, RawFd)>,
}

/// A serving worker's channel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CarriedChannel {
    pub slot: usize,
    pub worker: u64,
    pub pid: u32,
    pub fd: RawFd,
    pub hang_timeout_ms: Option<u64>,
    pub recycle_after: Option<u64>,
    pub sent: u64,
    /// Of those, refused (NACK, RETURN).
    #[serde(default)]
    pub refused: u64,
    pub acked: u64,
    pub closed: Option<u64>,
    /// Sent and not yet acknowledged, oldest first.
    pub in_flight: Vec<CarriedConnection>,
    /// A Node worker's channel state; `None`: herd's protocol.
    pub node: Option<CarriedNodeChannel>,
    /// Its counter page, if it counts in one.
    #[serde(default)]
    pub page: Option<CarriedPage>,
    /// herd's copy of the worker's end of the channel (queued hand-offs).
    #[serde(default)]
    pub worker_end: Option<RawFd>,
    /// Queued hand-offs not yet taken off the channel, oldest first; their
    /// fds are in the channel's queue, not herd's.
    #[serde(default)]
    pub queued: Vec<CarriedQueued>,
    /// What every hand-off thread sent it, if it counts per thread.
    #[serde(default)]
    pub threads: Option<CarriedThreads>,
}

/// Per hand-off thread (thread 0's first): sent, taken back by thread 0,
/// and counted taken (thread 0's own are in [`CarriedPage`] and `queued`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CarriedThreads {
    pub sent: Vec<u64>,
    pub taken_back: Vec<u64>,
    pub received: Vec<u64>,
    pub refused: u64,
}

/// A worker's counter page and how much of it herd had counted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CarriedPage {
    pub fd: RawFd,
    pub received: u64,
    pub closed: u64,
    pub accepted: Vec<u64>,
}

/// A queued hand-off: a [`CarriedConnection`] whose fd the channel holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CarriedQueued {
    pub id: u64,
    pub listener: u16,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub age_ms: u64,
    pub sent_ms: u64,
    pub refused_by: Option<usize>,
}

/// A connection between accept and its worker's acknowledgement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CarriedConnection {
    pub fd: RawFd,
    pub id: u64,
    pub listener: u16,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// How long ago it was accepted (its `queue_timeout` goes on from there).
    pub age_ms: u64,
    /// How long ago it was sent (in flight only): its `ack_timeout` and
    /// `hang_timeout` go on from there.
    pub sent_ms: Option<u64>,
    pub refused_by: Option<usize>,
}

impl CarriedLoop {
    /// Every fd the description names, for the exec to keep open.
    pub fn fds(&self) -> Vec<RawFd> {
        let listeners = self.listeners.iter().flatten().flat_map(|l| {
            let rotation = l.rotation.iter().flat_map(CarriedRotation::fds);
            let copies = l.copies.iter().map(|&(_, fd)| fd);
            std::iter::once(l.fd).chain(rotation).chain(copies)
        });
        let channels = self.channels.iter().flat_map(|c| {
            let own = [Some(c.fd), c.page.as_ref().map(|p| p.fd), c.worker_end];
            own.into_iter()
                .flatten()
                .chain(c.in_flight.iter().map(|conn| conn.fd))
        });
        let queued = self.queue.iter().map(|conn| conn.fd);
        let primary = self.app_primary.iter().map(|(_, fd, _)| *fd);
        listeners
            .chain(channels)
            .chain(queued)
            .chain(primary)
            .collect()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn ago(now: Instant, ms: u64) -> Instant {
    now.checked_sub(Duration::from_millis(ms)).unwrap_or(now)
}

fn carried_connection(
    conn: &Accepted,
    now: Instant,
    sent_at: Option<Instant>,
) -> CarriedConnection {
    CarriedConnection {
        fd: conn.stream.as_raw_fd(),
        id: conn.handoff.connection_id,
        listener: conn.handoff.listener,
        peer: conn.handoff.peer,
        local: conn.handoff.local,
        age_ms: millis(now.saturating_duration_since(conn.accepted_at)),
        sent_ms: sent_at.map(|at| millis(now.saturating_duration_since(at))),
        refused_by: conn.refused_by.map(SlotIx::get),
    }
}

/// Takes the fd back and makes the connection again (see
/// [`herd_protocol::fdpass::adopt_inherited_fd`]).
fn connection_of(carried: &CarriedConnection, now: Instant) -> io::Result<Accepted> {
    let fd = fdpass::adopt_inherited_fd(carried.fd)?;
    let stream = std::net::TcpStream::from(fd);
    stream.set_nonblocking(true)?;
    Ok(Accepted {
        stream: mio::net::TcpStream::from_std(stream),
        handoff: Handoff {
            connection_id: carried.id,
            listener: carried.listener,
            peer: carried.peer,
            local: carried.local,
        },
        accepted_at: ago(now, carried.age_ms),
        refused_by: carried.refused_by.map(SlotIx),
        refusals: Refusals::default(),
    })
}

impl HandoffLoop {
    /// Describes the loop and freezes it until [`Command::Thaw`] (module
    /// docs); a loop that cannot be described is not frozen.
    pub(super) fn freeze(&mut self, reply: mpsc::SyncSender<Result<CarriedLoop, String>>) {
        // The other threads stop first: what they held joins the queue,
        // and their copies are described with the listeners.
        let shares = self.stop_threads();
        let carried = self.carried(&shares);
        let described = carried.is_ok();
        let _ = reply.send(carried);
        if !described {
            return self.restart_threads(shares);
        }
        let mut held = Vec::new();
        loop {
            match self.commands.recv() {
                Ok(Command::Thaw) => break,
                Ok(Command::Ping(reply)) => {
                    let _ = reply.send(());
                }
                Ok(Command::Exit) | Err(_) => {
                    self.shutting_down = true;
                    break;
                }
                Ok(other) => held.push(other),
            }
        }
        if !self.shutting_down {
            self.restart_threads(shares);
        }
        for command in held {
            self.run_command(command);
        }
    }

    fn carried(&self, shares: &[Vec<ListenerCopy>]) -> Result<CarriedLoop, String> {
        let mut listeners = Vec::with_capacity(self.listeners.len());
        for (listener, listening) in self.listeners.enumerate() {
            let worker_of = |channel: ChannelIx| {
                self.channels
                    .get(channel)
                    .and_then(Option::as_ref)
                    .map(|c| c.worker.0)
            };
            listeners.push(listening.as_ref().map(|l| CarriedListener {
                fd: l.socket.as_raw_fd(),
                node_key: l.node_key.clone(),
                rotation: l.rotation.as_ref().map(|r| r.carried(worker_of)),
                copies: carried_copies(shares, listener),
            }));
        }
        let now = Instant::now();
        let mut channels = Vec::new();
        for worker in self.channels.iter().flatten() {
            channels.push(carried_channel(worker, now)?);
        }
        let queue = self
            .queue
            .iter()
            .map(|conn| carried_connection(conn, now, None))
            .collect();
        Ok(CarriedLoop {
            listeners,
            channels,
            queue,
            next_connection_id: self.next_connection_id,
            app_primary_runs: self.app_primary.runs,
            app_primary: self.carried_app_primary()?,
        })
    }

    /// Rebuilds what `carried` describes: listeners at their indices,
    /// channels serving their slots with what they had in flight, the queue.
    fn restore(&mut self, carried: CarriedLoop) -> io::Result<()> {
        let now = Instant::now();
        self.next_connection_id = carried.next_connection_id;
        let mut rotations = Vec::new();
        for (index, listener) in carried.listeners.into_iter().enumerate() {
            let ix = ListenerIx::at(index);
            self.listeners.reach(ix, || None);
            if let Some(listener) = listener {
                for &(thread, fd) in &listener.copies {
                    let copy = copy_of(ix, fd)?;
                    let share = thread.saturating_sub(1);
                    if self.carried_shares.len() <= share {
                        self.carried_shares.resize_with(share + 1, Vec::new);
                    }
                    self.carried_shares[share].push(copy);
                }
                let socket = std::net::TcpListener::from(fdpass::adopt_inherited_fd(listener.fd)?);
                socket.set_nonblocking(true)?;
                // Its rotation goes back once the channels it names are.
                self.put_listener(ix, socket, listener.node_key, None)?;
                rotations.extend(listener.rotation.map(|rotation| (ix, rotation)));
            }
        }
        let mut restored = Vec::new();
        for channel in carried.channels {
            restored.push(self.restore_channel(channel, now)?);
        }
        for (listener, rotation) in rotations {
            self.restore_rotation(listener, rotation)?;
        }
        self.app_primary.runs = carried.app_primary_runs;
        if let Some((pid, fd, inbox)) = carried.app_primary {
            self.restore_app_primary(pid, fdpass::adopt_inherited_fd(fd)?, inbox)?;
        }
        for conn in &carried.queue {
            let conn = connection_of(conn, now)?;
            self.queue.push_back(conn.listener(), conn);
        }
        // What the workers sent while herd re-executed.
        for channel in restored {
            self.read_worker(channel);
        }
        self.flush_queue();
        Ok(())
    }

    /// A listener's kernel rotation as it was: its slot sockets held by the
    /// same workers (now on new channels), dealt to again.
    fn restore_rotation(
        &mut self,
        listener: ListenerIx,
        carried: CarriedRotation,
    ) -> io::Result<()> {
        let channels: std::collections::BTreeMap<u64, ChannelIx> = self
            .channels
            .enumerate()
            .filter_map(|(ix, c)| Some((c.as_ref()?.worker.0, ix)))
            .collect();
        let Some(listening) = self.listeners.get_mut(listener).and_then(Option::as_mut) else {
            return Ok(());
        };
        let rotation = SlotRotation::restored(listening.local, carried, |worker| {
            channels.get(&worker).copied()
        })?;
        let rotation = listening.rotation.insert(rotation);
        super::listeners::apply_rotation(self.poll.registry(), rotation, listener);
        if self.tally_due.is_none() {
            self.tally_due = Some(Instant::now() + TALLY_INTERVAL);
        }
        Ok(())
    }

    fn restore_channel(&mut self, carried: CarriedChannel, now: Instant) -> io::Result<ChannelIx> {
        let fd = fdpass::adopt_inherited_fd(carried.fd)?;
        let slot = SlotIx(carried.slot);
        let added = NewWorker {
            slot,
            worker: WorkerId(carried.worker),
            pid: carried.pid,
            node: carried.node.is_some(),
            recycle_after: carried.recycle_after,
            hang_timeout: carried.hang_timeout_ms.map(Duration::from_millis),
            link: None,
        };
        let channel = self
            .insert_channel(added, fd)
            .ok_or_else(|| io::Error::other(format!("slot {slot}: cannot watch its channel")))?;
        let mut in_flight = VecDeque::with_capacity(carried.in_flight.len());
        for conn in &carried.in_flight {
            let sent_at = ago(now, conn.sent_ms.unwrap_or(0));
            in_flight.push_back(InFlight {
                conn: connection_of(conn, now)?,
                sent_at,
            });
        }
        self.counters
            .in_flight
            .fetch_add(in_flight.len() as u64, Relaxed);
        let worker = self.channels[channel].as_mut().expect("inserted just now");
        worker.role = Role::Serving;
        worker.sent = carried.sent;
        worker.refused = carried.refused;
        worker.acked = carried.acked;
        worker.closed = carried.closed;
        worker.in_flight = in_flight;
        if let Some(page) = carried.page {
            let mapped =
                Page::map(fdpass::adopt_inherited_fd(page.fd)?, false).map_err(io::Error::other)?;
            worker.page = Some(PageSeen {
                page: Arc::new(mapped),
                received: page.received,
                closed: page.closed,
                accepted: page.accepted,
            });
            self.page_tally_due.get_or_insert(now + PAGE_TALLY_INTERVAL);
        }
        if let Some(end) = carried.worker_end {
            worker.worker_end = Some(fdpass::adopt_inherited_fd(end)?);
        }
        for queued in carried.queued {
            worker.queued.push_back(Queued {
                handoff: Handoff {
                    connection_id: queued.id,
                    listener: queued.listener,
                    peer: queued.peer,
                    local: queued.local,
                },
                accepted_at: ago(now, queued.age_ms),
                sent_at: ago(now, queued.sent_ms),
                refused_by: queued.refused_by.map(SlotIx),
                refusals: Refusals::default(),
            });
        }
        if !worker.queued.is_empty() {
            self.counters
                .in_flight
                .fetch_add(worker.queued.len() as u64, Relaxed);
            worker.queued_listed = true;
            self.queued_channels.push(channel);
        }
        if let Some(node) = carried.node {
            worker.protocol = Protocol::Node(NodeChannel::from_carried(node));
        }
        if let (Some(threads), Some(seen)) = (carried.threads, worker.page.as_ref()) {
            worker.threads = Some(threads_of(&threads, worker, seen.page.clone()));
        }
        self.active[slot] = Some(channel);
        Ok(channel)
    }
}

fn carried_channel(worker: &WorkerChannel, now: Instant) -> Result<CarriedChannel, String> {
    if worker.role != Role::Serving || worker.hung || worker.drain_pending {
        return Err(format!(
            "the worker in slot {} (pid {}) is not serving",
            worker.slot, worker.pid
        ));
    }
    let node = match &worker.protocol {
        Protocol::Herd => None,
        Protocol::Node(node) => Some(
            node.carried()
                .map_err(|e| format!("the worker in slot {}: {e}", worker.slot))?,
        ),
    };
    Ok(CarriedChannel {
        slot: worker.slot.get(),
        worker: worker.worker.0,
        pid: worker.pid,
        fd: worker.channel.as_raw_fd(),
        hang_timeout_ms: worker.hang_timeout.map(millis),
        recycle_after: worker.recycle_after,
        sent: worker.sent,
        refused: worker.refused,
        acked: worker.acked,
        closed: worker.closed,
        in_flight: worker
            .in_flight
            .iter()
            .map(|entry| carried_connection(&entry.conn, now, Some(entry.sent_at)))
            .collect(),
        node,
        page: worker.page.as_ref().map(|seen| CarriedPage {
            fd: seen.page.fd().as_raw_fd(),
            received: seen.received,
            closed: seen.closed,
            accepted: seen.accepted.clone(),
        }),
        worker_end: worker.worker_end.as_ref().map(AsRawFd::as_raw_fd),
        threads: worker.threads.as_ref().map(|seen| {
            let counts =
                |counters: &[AtomicU64]| counters.iter().map(|c| c.load(Relaxed)).collect();
            CarriedThreads {
                sent: counts(&seen.shared.sent),
                taken_back: counts(&seen.shared.taken_back),
                received: seen.received.to_vec(),
                refused: seen.shared.refused.load(Relaxed),
            }
        }),
        queued: worker
            .queued
            .iter()
            .map(|entry| CarriedQueued {
                id: entry.handoff.connection_id,
                listener: entry.handoff.listener,
                peer: entry.handoff.peer,
                local: entry.handoff.local,
                age_ms: millis(now.saturating_duration_since(entry.accepted_at)),
                sent_ms: millis(now.saturating_duration_since(entry.sent_at)),
                refused_by: entry.refused_by.map(SlotIx::get),
            })
            .collect(),
    })
}

/// [`spawn`], for the new herd after `herd upgrade`: the loop starts with
/// what the old one carried instead of fresh listeners.
#[allow(clippy::too_many_arguments)]
pub fn spawn_carried(
    carried: CarriedLoop,
    mode: Mode,
    limits: HandoffSettings,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    counters: Arc<Counters>,
    measure_latency: bool,
    backlog: u32,
    threads: usize,
) -> io::Result<(Controller, JoinHandle<()>)> {
    let (mut handoff_loop, controller) = HandoffLoop::new(
        mode,
        limits,
        events,
        counters,
        measure_latency,
        backlog,
        false,
    )?;
    handoff_loop.restore(carried)?;
    // Configured listeners came back: nothing is bound on demand unless
    // none was configured, as before the upgrade.
    handoff_loop.listen_on_demand = handoff_loop
        .listeners
        .iter()
        .flatten()
        .all(|l| l.node_key.is_some());
    // The other threads take up the copies they had (`handoff_threads`
    // is a restart's to change, so there is one share per thread); from
    // a herd that ran one thread, new copies are bound.
    let shares = std::mem::take(&mut handoff_loop.carried_shares);
    let shares = (!shares.is_empty()).then_some(shares);
    handoff_loop.start_threads(threads, shares)?;
    handoff_loop.reopen_rested();
    handoff_loop.start(controller)
}

/// The other threads' copies of `listener`, by thread.
fn carried_copies(shares: &[Vec<ListenerCopy>], listener: ListenerIx) -> Vec<(usize, RawFd)> {
    let mut copies = Vec::new();
    for (share, copy) in shares.iter().enumerate() {
        for copy in copy.iter().filter(|c| c.listener == listener) {
            copies.push((share + 1, copy.socket.as_raw_fd()));
        }
    }
    copies
}

fn copy_of(listener: ListenerIx, fd: RawFd) -> io::Result<ListenerCopy> {
    let socket = std::net::TcpListener::from(fdpass::adopt_inherited_fd(fd)?);
    socket.set_nonblocking(true)?;
    Ok(ListenerCopy {
        listener,
        local: socket.local_addr()?,
        socket: mio::net::TcpListener::from_std(socket),
    })
}

/// A worker's shared side as the old herd left it.
fn threads_of(carried: &CarriedThreads, worker: &WorkerChannel, page: Arc<Page>) -> ThreadsSeen {
    let shared = SharedWorker::new(worker.channel.clone(), page, worker.recycle_after);
    store_all(&shared.sent, &carried.sent);
    store_all(&shared.taken_back, &carried.taken_back);
    shared.refused.store(carried.refused, Relaxed);
    let mut seen = ThreadsSeen::new(Arc::new(shared));
    for (t, &sent) in carried.sent.iter().enumerate().take(seen.sent.len()) {
        seen.sent[t] = sent;
    }
    for (t, &received) in carried
        .received
        .iter()
        .enumerate()
        .take(seen.received.len())
    {
        seen.received[t] = received;
    }
    seen
}

fn store_all(counters: &[AtomicU64], values: &[u64]) {
    for (counter, &value) in counters.iter().zip(values) {
        counter.store(value, Relaxed);
    }
}
