//! Per-slot sockets: one SO_REUSEPORT socket per worker slot and listener,
//! inherited by the slot's worker as fd 3, 4, …, and who the kernel deals
//! new connections to.
//!
//! Owns, for `reuseport` mode and for kernel rotation of workers that take
//! an inherited socket (`--mode round-robin --rotation kernel`), the groups
//! herd binds (one per listener), the rotation program attached to each,
//! and which slots are dealt to:
//! - a slot is dealt to while a worker holding its socket is ready and not
//!   draining ([`SlotGroups::serve`], [`SlotGroups::drain`]) and it is not
//!   stalled (`stall`);
//! - the program deals over those slots strictly in turn (kernel rotation)
//!   or by the connection's hash (`reuseport`), and counts per slot;
//! - herd keeps a copy of every slot socket, so what waits on a slot whose
//!   worker died, or stalled, is not lost: herd takes the slot out of the
//!   deal and makes the kernel move its queue to the slots dealt to
//!   (`herd_protocol::listen_queue::requeue_elsewhere`; Linux 5.14). Where
//!   the kernel cannot move it, it waits for the slot's next worker, which
//!   gets the same socket back.
//!
//! Without the program (no CAP_BPF) `reuseport` still works, by the kernel's
//! own hash over every slot socket, ready or not, with nothing counted or
//! moved; kernel rotation is then not offered (`primary` falls back).
//!
//! herd's first bind (plain, without SO_REUSEPORT) proves the port is free
//! and resolves port 0; it is closed before the group is bound, so no
//! stranger's SO_REUSEPORT socket can have joined.
//!
//! # Layout
//! - this file: the groups, their generations, who is dealt to, probes.
//! - `watch`: the 100 ms watch of the queues and the deals, `stall`'s
//!   verdicts carried out, the counters.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::Instant;

use herd_protocol::bpf::{Dealing, Prober, RotationProgram};
use tracing::{debug, info, warn};

mod handover;
mod watch;

pub use handover::CarriedGroups;
pub use watch::{count, Watched};

use crate::ids::{SlotIx, Table, WorkerId};
use crate::listener::{self, ListenError};
use crate::rate_limit::Occurrences;
use crate::stall::Watch;

/// Every slot's sockets, per listener.
#[derive(Debug)]
pub struct SlotGroups {
    addrs: Vec<SocketAddr>,
    backlog: u32,
    dealing: Dealing,
    slots: Table<SlotIx, Slot>,
    /// Per listener, the program attached to its group (`None`: the
    /// kernel's own hash; nothing is counted or moved).
    programs: Vec<Option<RotationProgram>>,
    /// The slots dealt to, as last given to the programs, and the
    /// generation of each one's sockets (a reload changes those alone).
    dealt_to: Vec<SlotIx>,
    dealt_generations: Vec<u64>,
    /// The next generation's number.
    next_generation: u64,
    /// Per listener, per slot: what the program had counted at the last read.
    counted: Vec<Vec<u64>>,
    /// Connections moved off a slot's socket since the last watch.
    moved: u64,
    /// Failures to read a queue or move it, logged at the 1st, 2nd, 4th, … time.
    failures: Occurrences,
}

#[derive(Debug)]
struct Slot {
    /// Oldest first. A worker started while another of the slot is alive
    /// (a reload's replacement) gets sockets of its own, so nothing reaches
    /// it before it is ready and a probe of its socket proves it, not the
    /// worker it replaces; a worker started in an empty slot (a restart)
    /// takes over the last one, with what waits there.
    generations: Vec<Generation>,
    watch: Watch,
    /// Since when its worker has taken nothing it was dealt, through every
    /// skip and return: one stalled for `hang_timeout` is hung.
    stalled_since: Option<Instant>,
}

#[derive(Debug)]
struct Generation {
    /// Unique among the slot groups' generations, so a change of sockets
    /// is seen even where the slots dealt to stay the same.
    id: u64,
    /// One per listener, in listener order.
    sockets: Vec<TcpListener>,
    /// Workers started with these sockets and not gone, with whether each
    /// is ready and not draining.
    holders: Vec<(WorkerId, bool)>,
}

impl Slot {
    /// The sockets dealt to: the newest generation a ready worker holds.
    fn serving(&self) -> Option<&Generation> {
        self.generations
            .iter()
            .rev()
            .find(|g| g.holders.iter().any(|(_, serving)| *serving))
    }

    /// The sockets to watch and to empty: those dealt to, else the newest.
    fn current(&self) -> &Generation {
        self.serving()
            .or(self.generations.last())
            .expect("a slot has a generation")
    }

    fn holding(&self, worker: WorkerId) -> Option<usize> {
        self.generations
            .iter()
            .position(|g| g.holders.iter().any(|(id, _)| *id == worker))
    }
}

impl SlotGroups {
    /// Binds the groups for `workers` slots on `addrs` (already proved
    /// free and closed again) and attaches the program, which must load
    /// for [`Dealing::Turns`].
    pub fn bind(
        addrs: Vec<SocketAddr>,
        backlog: u32,
        dealing: Dealing,
        workers: usize,
    ) -> Result<SlotGroups, ListenError> {
        let mut groups = SlotGroups {
            counted: vec![Vec::new(); addrs.len()],
            addrs,
            backlog,
            dealing,
            slots: Table::new(),
            programs: Vec::new(),
            dealt_to: Vec::new(),
            dealt_generations: Vec::new(),
            next_generation: 0,
            moved: 0,
            failures: Occurrences::default(),
        };
        groups.bind_slots(workers.max(1))?;
        Ok(groups)
    }

    /// Whether the kernel can move a slot's queue to the others (the
    /// program is attached, loaded to migrate, on every listener).
    pub fn moves_queues(&self) -> bool {
        !self.programs.is_empty()
            && self
                .programs
                .iter()
                .all(|p| p.as_ref().is_some_and(RotationProgram::migrates))
    }

    /// The fds worker `worker` of `slot` inherits, in listener order: the
    /// slot's last sockets, or new ones if a live worker holds those (see
    /// [`Slot`]); bound now if the slot is new.
    pub fn for_slot(&mut self, slot: SlotIx, worker: WorkerId) -> Result<Vec<RawFd>, ListenError> {
        self.bind_slots(slot.get() + 1)?;
        let held = self.slots[slot]
            .generations
            .last()
            .is_some_and(|g| !g.holders.is_empty());
        if held {
            let generation = self.new_generation()?;
            self.slots[slot].generations.push(generation);
        }
        let generation = self.slots[slot]
            .generations
            .last_mut()
            .expect("a slot has a generation");
        generation.holders.push((worker, false));
        Ok(generation.sockets.iter().map(AsRawFd::as_raw_fd).collect())
    }

    /// Where a readiness probe of worker `worker` goes: its first socket
    /// made the target of the probes the [`Prober`] steers to `slot`.
    /// `None` without the program on the first listener.
    pub fn offer_probe(&self, slot: SlotIx, worker: WorkerId) -> Option<(Prober, SocketAddr)> {
        let program = self.programs.first()?.as_ref()?;
        let entry = self.slots.get(slot)?;
        let generation = &entry.generations[entry.holding(worker)?];
        let socket = generation.sockets.first()?;
        // Whatever an earlier worker of the slot left there goes first: a
        // socket sits in one place of one socket array at a time.
        let _ = program.withdraw_probe(slot.get());
        if let Err(e) = program.offer_probe(slot.get(), socket.as_fd()) {
            warn!(
                slot = slot.get(),
                event = "probe_unavailable",
                "cannot steer readiness probes to slot {slot}'s socket: {e}"
            );
            return None;
        }
        Some((program.prober(), self.addrs[0]))
    }

    /// Worker `worker` of `slot` is ready: its slot is dealt to.
    pub fn serve(&mut self, slot: SlotIx, worker: WorkerId) {
        let Some(at) = self.slots.get(slot).and_then(|entry| entry.holding(worker)) else {
            return;
        };
        if let Some(Some(program)) = self.programs.first() {
            // A socket sits in one socket array at a time: out of the probes'.
            let _ = program.withdraw_probe(slot.get());
        }
        for (id, serving) in &mut self.slots[slot].generations[at].holders {
            *serving |= *id == worker;
        }
        self.apply();
    }

    /// Worker `worker` drains: it takes no more turns.
    pub fn drain(&mut self, worker: WorkerId) {
        for generation in self.slots.iter_mut().flat_map(|e| e.generations.iter_mut()) {
            for (id, serving) in &mut generation.holders {
                if *id == worker {
                    *serving = false;
                }
            }
        }
        self.apply();
    }

    /// Worker `worker`'s processes are gone (or never started). Sockets no
    /// worker holds any more leave the deal; the slot's last ones stay for
    /// its next worker, with what waits there moved on to the slots dealt
    /// to; older ones close, and the kernel moves what waits there.
    pub fn gone(&mut self, worker: WorkerId) {
        let Some((slot, at)) = self
            .slots
            .ids()
            .find_map(|slot| Some((slot, self.slots[slot].holding(worker)?)))
        else {
            return;
        };
        let entry = &mut self.slots[slot];
        let holders = &mut entry.generations[at].holders;
        let was_serving = holders.iter().any(|&(id, serving)| id == worker && serving);
        holders.retain(|(id, _)| *id != worker);
        let emptied = holders.is_empty();
        let alone = entry.generations.len() == 1;
        if emptied && entry.generations.iter().all(|g| g.holders.is_empty()) {
            // Its next worker starts with nothing held against it.
            entry.watch = Watch::FRESH;
        }
        if !was_serving {
            // It may have been the one probed: its socket leaves the probes.
            if let Some(Some(program)) = self.programs.first() {
                let _ = program.withdraw_probe(slot.get());
            }
        }
        self.apply();
        match (emptied, alone) {
            // The slot's only sockets stay for its next worker, emptied.
            (true, true) => self.requeue(slot, at, "its worker is gone"),
            // Another generation lives on (a reload's old worker, or the
            // replacement of this one): these close, and the group
            // migrates what waited there.
            (true, false) => drop(self.slots[slot].generations.remove(at)),
            (false, _) => {}
        }
    }

    /// The slots from `count` on are gone: their sockets close, and where
    /// the group migrates, what is queued on them moves to the others.
    pub fn remove_slots_from(&mut self, count: usize) {
        self.slots.truncate(count);
        self.apply();
    }

    /// Gives the programs the slots dealt to now, where that changed.
    fn apply(&mut self) {
        let dealt_to: Vec<SlotIx> = self
            .slots
            .enumerate()
            .filter(|(_, entry)| !entry.watch.is_skipped() && entry.serving().is_some())
            .map(|(slot, _)| slot)
            .collect();
        for slot in self.slots.ids().collect::<Vec<_>>() {
            // A slot that leaves the deal is watched afresh when it returns.
            let entry = &mut self.slots[slot];
            if !dealt_to.contains(&slot) && !entry.watch.is_skipped() {
                entry.watch = Watch::FRESH;
            }
        }
        let generations: Vec<u64> = (dealt_to.iter())
            .map(|&slot| self.slots[slot].serving().expect("dealt to").id)
            .collect();
        if dealt_to == self.dealt_to && generations == self.dealt_generations {
            return;
        }
        for (at, program) in self.programs.iter_mut().enumerate() {
            let Some(program) = program else { continue };
            let members: Vec<(usize, BorrowedFd<'_>)> = dealt_to
                .iter()
                .map(|&slot| {
                    let serving = self.slots[slot].serving().expect("dealt to");
                    (slot.get(), serving.sockets[at].as_fd())
                })
                .collect();
            if let Err(e) = program.set_rotation(&members, self.dealing) {
                warn!(
                    listener = at,
                    event = "kernel_rotation_update_failed",
                    "cannot update the kernel rotation: {e}"
                );
            }
        }
        debug!(slots = ?dealt_to, "dealing to");
        self.dealt_to = dealt_to;
        self.dealt_generations = generations;
    }

    /// Binds the sockets of slots not yet bound, up to `count`; the first
    /// slot's sockets found the groups and get the programs.
    fn bind_slots(&mut self, count: usize) -> Result<(), ListenError> {
        while self.slots.len() < count {
            let generation = self.new_generation()?;
            if self.slots.is_empty() {
                self.programs = (generation.sockets.iter())
                    .map(|first| attach_program(first, self.dealing))
                    .collect();
            }
            self.slots.push(Slot {
                generations: vec![generation],
                watch: Watch::FRESH,
                stalled_since: None,
            });
        }
        Ok(())
    }

    /// One new member of each listener's group, blocking as systemd passes them.
    fn new_generation(&mut self) -> Result<Generation, ListenError> {
        let sockets = (self.addrs.iter())
            .map(|&addr| {
                let socket = listener::bind_reuseport(addr, self.backlog)?;
                listener::make_blocking(&socket)?;
                Ok(socket)
            })
            .collect::<Result<_, ListenError>>()?;
        self.next_generation += 1;
        Ok(Generation {
            id: self.next_generation,
            sockets,
            holders: Vec::new(),
        })
    }
}

/// Loads the program and attaches it to `first`'s group; `None` where the
/// kernel refuses, said once per listener.
fn attach_program(first: &TcpListener, dealing: Dealing) -> Option<RotationProgram> {
    let addr = first.local_addr().ok()?;
    let attached = RotationProgram::load().and_then(|program| {
        program.attach(first.as_fd())?;
        Ok(program)
    });
    match attached {
        Ok(program) if !program.migrates() => {
            info!(%addr, event = "no_queue_migration", "what waits on a removed, dead or stalled slot's socket is not moved to the others (Linux before 5.14 cannot; net.ipv4.tcp_migrate_req = 1 moves it on close)");
            Some(program)
        }
        Ok(program) => Some(program),
        Err(e) => {
            let what = match dealing {
                Dealing::Turns => "kernel rotation",
                Dealing::Hash => "the kernel's own hash over every slot socket deals, uncounted, and scaling down resets what is queued on a removed slot's socket (net.ipv4.tcp_migrate_req = 1 migrates it)",
            };
            info!(%addr, event = "no_queue_migration", "no rotation program on {addr} ({e}): {what}");
            None
        }
    }
}

#[cfg(test)]
impl SlotGroups {
    /// `slot`'s socket for listener `at`.
    pub(crate) fn socket(&self, slot: SlotIx, at: usize) -> &TcpListener {
        &self.slots[slot].current().sockets[at]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stall;
    use herd_protocol::listen_queue;
    use std::net::TcpStream;
    use std::time::Duration;

    fn groups(dealing: Dealing, workers: usize) -> (SlotGroups, SocketAddr) {
        let probe = listener::bind_all(
            &["127.0.0.1:0".parse().unwrap()],
            16,
            listener::BindOptions::PLAIN,
        )
        .unwrap();
        let addr = probe[0].local;
        drop(probe);
        (
            SlotGroups::bind(vec![addr], 64, dealing, workers).unwrap(),
            addr,
        )
    }

    /// `count` clients connected to `addr` (the kernel completes each
    /// handshake before `connect` returns).
    fn clients(addr: SocketAddr, count: usize) -> Vec<TcpStream> {
        (0..count)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect()
    }

    /// Worker `worker` starts in `slot` and is ready.
    fn start(groups: &mut SlotGroups, slot: usize, worker: u64) -> Vec<RawFd> {
        let fds = groups.for_slot(SlotIx(slot), WorkerId(worker)).unwrap();
        groups.serve(SlotIx(slot), WorkerId(worker));
        fds
    }

    fn waiting(groups: &SlotGroups, slot: usize) -> u32 {
        listen_queue::depth(groups.socket(SlotIx(slot), 0).as_fd())
            .unwrap()
            .waiting
    }

    #[test]
    fn one_socket_per_slot_on_one_port_kept_across_restarts() {
        let (mut groups, addr) = groups(Dealing::Hash, 2);
        let slot0 = start(&mut groups, 0, 1);
        let slot1 = start(&mut groups, 1, 2);
        assert_ne!(slot0, slot1);
        // A restart (its worker gone) gets the same socket.
        groups.gone(WorkerId(1));
        assert_eq!(start(&mut groups, 0, 3), slot0);
        // A new slot is bound on demand, on the same port.
        let slot3 = start(&mut groups, 3, 4);
        assert_eq!(groups.socket(SlotIx(3), 0).as_raw_fd(), slot3[0]);
        for slot in 0..4 {
            assert_eq!(groups.socket(SlotIx(slot), 0).local_addr().unwrap(), addr);
        }
        groups.remove_slots_from(1);
        assert_eq!(groups.slots.len(), 1);
    }

    #[test]
    fn the_plain_probe_keeps_herd_out_of_a_strangers_reuseport_group() {
        // Another server of the same user, with SO_REUSEPORT: binding our own
        // SO_REUSEPORT socket would silently join its group. herd's first
        // bind is plain, so it fails as a busy port instead.
        let stranger = listener::bind_reuseport("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = stranger.local_addr().unwrap();
        assert!(
            listener::bind_reuseport(addr, 16).is_ok(),
            "the risk is real"
        );
        let error = listener::bind_all(&[addr], 16, listener::BindOptions::PLAIN).unwrap_err();
        assert!(
            error.to_string().contains("address already in use"),
            "{error}"
        );
    }

    /// Kernel rotation: only ready slots are dealt to, in turn, and counted.
    #[test]
    fn ready_slots_take_turns_and_are_counted() {
        let test = "ready_slots_take_turns_and_are_counted";
        if !herd_protocol::bpf::testable_here(test) {
            return;
        }
        let (mut groups, addr) = groups(Dealing::Turns, 3);
        start(&mut groups, 0, 10);
        start(&mut groups, 2, 12);
        // Slot 1's worker has started, and is not ready.
        groups.for_slot(SlotIx(1), WorkerId(11)).unwrap();
        let _clients = clients(addr, 6);
        assert_eq!(
            (
                waiting(&groups, 0),
                waiting(&groups, 1),
                waiting(&groups, 2)
            ),
            (3, 0, 3)
        );
        let mut dealt = groups.watch(Instant::now(), None).dealt;
        dealt.sort_by_key(|d| d.slot);
        let counts: Vec<(usize, u64)> = dealt.iter().map(|d| (d.slot.get(), d.count)).collect();
        assert_eq!(counts, [(0, 3), (2, 3)]);
        // Slot 2's worker drains: slot 0 alone takes the next ones.
        groups.drain(WorkerId(12));
        let _more = clients(addr, 2);
        assert_eq!((waiting(&groups, 0), waiting(&groups, 2)), (5, 3));
    }

    /// A worker that dies with connections queued on its slot: they move
    /// to the slot still dealt to.
    #[test]
    fn a_dead_workers_queue_moves_to_the_slots_dealt_to() {
        let test = "a_dead_workers_queue_moves_to_the_slots_dealt_to";
        if !herd_protocol::bpf::testable_here(test) {
            return;
        }
        let (mut groups, addr) = groups(Dealing::Turns, 2);
        start(&mut groups, 0, 1);
        let before = start(&mut groups, 1, 2);
        let _clients = clients(addr, 4);
        assert_eq!(waiting(&groups, 1), 2);
        groups.gone(WorkerId(2));
        assert_eq!((waiting(&groups, 0), waiting(&groups, 1)), (4, 0));
        // Its next worker gets the same socket, listening, and its turns back.
        assert_eq!(start(&mut groups, 1, 3), before);
        let _next = clients(addr, 2);
        assert_eq!(waiting(&groups, 1), 1);
    }

    /// A stalled slot: its queue waits, unshrinking, while slot 0 idles;
    /// after `STALL_SAMPLES` samples it is skipped, its queue moved to slot 0,
    /// and after its probation it is dealt to again.
    #[test]
    fn a_stalled_slot_loses_its_turns_and_its_queue_until_its_probation_ends() {
        let test = "a_stalled_slot_loses_its_turns_and_its_queue_until_its_probation_ends";
        if !herd_protocol::bpf::testable_here(test) {
            return;
        }
        let (mut groups, addr) = groups(Dealing::Turns, 2);
        start(&mut groups, 0, 1);
        start(&mut groups, 1, 2);
        let mut clients: Vec<TcpStream> = Vec::new();
        let start = Instant::now();
        // Bound blocking, as workers get them; the test accepts without waiting.
        groups.socket(SlotIx(0), 0).set_nonblocking(true).unwrap();
        for sample in 0..stall::STALL_SAMPLES {
            // Slot 0's worker keeps up; slot 1's takes nothing.
            clients.extend((0..2).map(|_| TcpStream::connect(addr).unwrap()));
            while groups.socket(SlotIx(0), 0).accept().is_ok() {}
            assert!(groups.dealt_to.contains(&SlotIx(1)), "sample {sample}");
            groups.watch(start + stall::WATCH_INTERVAL * sample, None);
        }
        assert_eq!(groups.dealt_to, [SlotIx(0)], "slot 1 is skipped");
        assert_eq!(waiting(&groups, 1), 0, "its queue moved on");
        assert_eq!(waiting(&groups, 0), stall::STALL_SAMPLES);
        // New ones all go to slot 0 now.
        clients.push(TcpStream::connect(addr).unwrap());
        assert_eq!(waiting(&groups, 1), 0);
        // Its probation over, slot 1 takes turns again.
        groups.watch(start + Duration::from_secs(60), None);
        assert_eq!(groups.dealt_to, [SlotIx(0), SlotIx(1)]);
    }

    /// A reload: the replacement gets sockets of its own, dealt to once it
    /// is ready; when the old worker is gone its sockets close and what
    /// waited there moves to the others, none reset.
    #[test]
    fn a_replacement_gets_its_own_socket_and_the_old_ones_queue_moves_on() {
        let test = "a_replacement_gets_its_own_socket_and_the_old_ones_queue_moves_on";
        if !herd_protocol::bpf::testable_here(test) {
            return;
        }
        let (mut groups, addr) = groups(Dealing::Turns, 2);
        start(&mut groups, 0, 1);
        let old = start(&mut groups, 1, 2);
        let new = groups.for_slot(SlotIx(1), WorkerId(3)).unwrap();
        assert_ne!(old, new, "a replacement's own socket");
        let _clients = clients(addr, 4);
        // Not ready: the old worker keeps the turns.
        assert_eq!(waiting(&groups, 1), 2);
        groups.serve(SlotIx(1), WorkerId(3));
        groups.drain(WorkerId(2));
        assert_eq!(groups.socket(SlotIx(1), 0).as_raw_fd(), new[0]);
        groups.gone(WorkerId(2));
        assert_eq!(groups.slots[SlotIx(1)].generations.len(), 1);
        // The old socket's two moved to the ones dealt to: 4 in all.
        assert_eq!(waiting(&groups, 0) + waiting(&groups, 1), 4);
        // And the turns go on strictly, over the new socket.
        let (zero, one) = (waiting(&groups, 0), waiting(&groups, 1));
        let _more = clients(addr, 4);
        assert_eq!(
            (waiting(&groups, 0), waiting(&groups, 1)),
            (zero + 2, one + 2)
        );
    }

    /// A worker whose start failed holds nothing: the next start reuses
    /// the slot's socket instead of binding more.
    #[test]
    fn a_failed_start_leaves_no_socket_behind() {
        let (mut groups, _) = groups(Dealing::Hash, 1);
        let first = groups.for_slot(SlotIx(0), WorkerId(1)).unwrap();
        groups.gone(WorkerId(1));
        assert_eq!(groups.for_slot(SlotIx(0), WorkerId(2)).unwrap(), first);
        assert_eq!(groups.slots[SlotIx(0)].generations.len(), 1);
    }

    /// A slot whose worker takes nothing through its skips and returns is
    /// hung once `hang_timeout` has passed since its first skip; one that
    /// takes what it is dealt in between is not.
    #[test]
    fn a_slot_stalled_for_hang_timeout_names_its_worker_hung() {
        let test = "a_slot_stalled_for_hang_timeout_names_its_worker_hung";
        if !herd_protocol::bpf::testable_here(test) {
            return;
        }
        let (mut groups, addr) = groups(Dealing::Turns, 2);
        start(&mut groups, 0, 1);
        start(&mut groups, 1, 2);
        groups.socket(SlotIx(0), 0).set_nonblocking(true).unwrap();
        let hang = Some(Duration::from_secs(5));
        let start = Instant::now();
        let mut open = Vec::new();
        let mut at = start;
        for _ in 0..stall::STALL_SAMPLES {
            open.extend(clients(addr, 2));
            while groups.socket(SlotIx(0), 0).accept().is_ok() {}
            assert!(groups.watch(at, hang).hung.is_empty());
            at += stall::WATCH_INTERVAL;
        }
        assert_eq!(groups.dealt_to, [SlotIx(0)], "skipped");
        // Back after its probation (at 6 s, past hang_timeout since its
        // first skip), it takes nothing again: stalled again, so hung.
        at = start + Duration::from_secs(6);
        assert!(groups.watch(at, hang).hung.is_empty());
        assert_eq!(groups.dealt_to, [SlotIx(0), SlotIx(1)]);
        let mut hung = Vec::new();
        for _ in 0..stall::STALL_SAMPLES {
            at += stall::WATCH_INTERVAL;
            open.extend(clients(addr, 2));
            while groups.socket(SlotIx(0), 0).accept().is_ok() {}
            hung.extend(groups.watch(at, hang).hung);
        }
        assert_eq!(hung, [WorkerId(2)], "said once");
    }

    /// A worker shuts its socket down (herd holds the same one): at the
    /// next watch herd makes it listen again and deals to it again.
    #[test]
    fn a_socket_a_worker_shut_down_listens_again_and_takes_its_turns() {
        let test = "a_socket_a_worker_shut_down_listens_again_and_takes_its_turns";
        if !herd_protocol::bpf::testable_here(test) {
            return;
        }
        let (mut groups, addr) = groups(Dealing::Turns, 2);
        start(&mut groups, 0, 1);
        start(&mut groups, 1, 2);
        let fd = groups.socket(SlotIx(1), 0).as_raw_fd();
        nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both).unwrap();
        assert!(listen_queue::depth(groups.socket(SlotIx(1), 0).as_fd()).is_err());
        groups.watch(Instant::now(), None);
        let _open = clients(addr, 4);
        assert_eq!((waiting(&groups, 0), waiting(&groups, 1)), (2, 2));
    }
}
