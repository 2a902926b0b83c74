//! Socket activation: the listening sockets workers inherit in the
//! OS-scheduled modes (`shared`, `reuseport`), and how they find them.
//!
//! Owns which listening fds each worker slot gets and the environment that
//! describes them, after systemd's convention (`sd_listen_fds(3)`): the
//! sockets are fds 3, 4, … in `listen` order, `LISTEN_FDS` counts them,
//! `LISTEN_FDNAMES` names them (`listen0:listen1:…`), and `LISTEN_PID` is the
//! worker's own pid, so a program that checks it (as `sd_listen_fds` does)
//! knows the fds are meant for it and not for a parent.
//!
//! `LISTEN_PID` is the one value herd cannot put in the environment itself:
//! the pid exists only after `fork`, and `std::process::Command` builds the
//! environment before it. So in these modes a worker is started through
//! herd's own binary ([`EXEC_WORKER_ARG`]), which sets `LISTEN_PID` to its own
//! pid and `exec`s the real program: same pid, same fds, same process group.
//!
//! The sockets are blocking, as systemd passes them, and herd makes them so
//! exactly once, when it binds them, and never touches their flags again. A
//! socket's O_NONBLOCK lives in its open file description, which herd and
//! every worker holding the socket share: a worker that wants it
//! non-blocking (asyncio, libuv, tokio, … all do) sets it for everyone, and
//! herd making it blocking again for the next worker would make it blocking
//! under the workers already accepting from it. Their event loop's last
//! `accept` (the one that should say EAGAIN) then blocks, with the request it
//! has just accepted unanswered until another connection comes.
//!
//! - `shared`: the sockets herd bound are given to every worker; one accept
//!   queue per listener, and whichever worker calls `accept` first wins.
//! - `reuseport`, and kernel rotation of such workers (`--mode round-robin
//!   --rotation kernel`): one `SO_REUSEPORT` socket per slot and listener,
//!   held by herd until the slot is removed, and dealt to by the kernel
//!   (`slot_sockets::SlotGroups`).

use std::ffi::OsString;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;

use herd_protocol::bpf::{Dealing, RotationProgram};
use tracing::warn;

use crate::config::{Readiness, Settings, WorkerProtocol};
use crate::dispatch::Mode;

use crate::ids::{SlotIx, WorkerId};
use crate::listener::{self, BoundListener, ListenError};
use crate::slot_sockets::{SlotGroups, Watched};
use herd_protocol::env::LISTEN_PID_ENV;

/// argv\[1\] that makes `herd` the worker-start shim (see the module docs).
pub const EXEC_WORKER_ARG: &str = "__exec-worker";
/// The listening sockets workers inherit, per mode.
#[derive(Debug)]
pub enum WorkerSockets {
    /// herd accepts and hands connections over: workers inherit no socket.
    HandOff,
    /// Every worker inherits these, one per listener.
    Shared(Vec<TcpListener>),
    /// Each slot its own socket per listener, dealt to by the kernel.
    PerSlot(SlotGroups),
}

/// Which sockets the workers take, as the mode and rotation decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketPlan {
    HandOff,
    Shared,
    PerSlot(Dealing),
}

impl SocketPlan {
    /// What `settings` ask for. Node workers are sent their sockets over
    /// the cluster channel, so for them it is always the hand-off loop's.
    pub fn of(settings: &Settings) -> SocketPlan {
        if settings.protocol == WorkerProtocol::NodeCluster {
            return SocketPlan::HandOff;
        }
        match settings.mode {
            Mode::Shared => SocketPlan::Shared,
            Mode::ReusePort => SocketPlan::PerSlot(Dealing::Hash),
            _ if settings.handoff.kernel_rotation => SocketPlan::PerSlot(Dealing::Turns),
            _ => SocketPlan::HandOff,
        }
    }

    /// The plan the kernel allows: kernel rotation needs the rotation
    /// program (CAP_BPF). Without it, says why and falls back: to hand-offs
    /// for workers that speak herd's channel (`ready = "herd"`), to the
    /// kernel's hash over per-slot sockets (`reuseport`) for the others.
    /// Refused where `ready` probes the worker's socket: the probe is
    /// steered by the program, so without it nothing could be ready.
    pub fn available(self, ready: &Readiness) -> Result<SocketPlan, String> {
        let needs_program = self == SocketPlan::PerSlot(Dealing::Turns)
            || (ready.probes() && matches!(self, SocketPlan::PerSlot(_)));
        if !needs_program {
            return Ok(self);
        }
        let Err(e) = RotationProgram::load() else {
            return Ok(self);
        };
        if ready.probes() {
            return Err(format!(
                "`ready` = {:?} steers its probe to the starting worker's socket with herd's eBPF program, which the kernel refused here: {e}",
                ready.name()
            ));
        }
        let (fallback, instead) = match ready {
            Readiness::Herd => (SocketPlan::HandOff, "hand-offs over herd's channel"),
            _ => (
                SocketPlan::PerSlot(Dealing::Hash),
                "reuseport: the kernel's hash over one socket per slot",
            ),
        };
        warn!(
            event = "kernel_rotation_unavailable",
            "round-robin falls back to {instead}: {e}"
        );
        Ok(fallback)
    }

    /// Workers inherit listening sockets (and start through the shim).
    pub fn workers_take_sockets(self) -> bool {
        self != SocketPlan::HandOff
    }
}

impl WorkerSockets {
    /// Splits the bound listeners between the hand-off loop (returned) and
    /// the workers (kept here), according to `plan`. Per slot, this binds
    /// the groups for the first `workers` slots.
    pub fn new(
        plan: SocketPlan,
        listeners: Vec<BoundListener>,
        backlog: u32,
        workers: usize,
    ) -> Result<(WorkerSockets, Vec<BoundListener>), ListenError> {
        match plan {
            SocketPlan::HandOff => Ok((WorkerSockets::HandOff, listeners)),
            SocketPlan::Shared => {
                let sockets: Vec<TcpListener> = listeners.into_iter().map(|l| l.socket).collect();
                for socket in &sockets {
                    listener::make_blocking(socket)?;
                }
                Ok((WorkerSockets::Shared(sockets), Vec::new()))
            }
            SocketPlan::PerSlot(dealing) => {
                let addrs = listeners.iter().map(|l| l.local).collect();
                // Close the probes: a plain socket on the port keeps the group out.
                drop(listeners);
                let groups = SlotGroups::bind(addrs, backlog, dealing, workers)?;
                Ok((WorkerSockets::PerSlot(groups), Vec::new()))
            }
        }
    }

    /// The listening fds worker `worker` of `slot` inherits, in listener order
    /// (empty when herd hands connections over). They were made blocking
    /// when bound, as systemd passes them, and are passed as they are now:
    /// a worker that wants them non-blocking sets that itself, and other
    /// workers may be accepting from them with that flag (module docs).
    pub fn for_slot(&mut self, slot: SlotIx, worker: WorkerId) -> Result<Vec<RawFd>, ListenError> {
        match self {
            WorkerSockets::HandOff => Ok(Vec::new()),
            WorkerSockets::Shared(sockets) => Ok(sockets.iter().map(AsRawFd::as_raw_fd).collect()),
            WorkerSockets::PerSlot(groups) => groups.for_slot(slot, worker),
        }
    }

    /// The per-slot groups, where workers have them.
    pub fn per_slot(&mut self) -> Option<&mut SlotGroups> {
        match self {
            WorkerSockets::PerSlot(groups) => Some(groups),
            _ => None,
        }
    }

    /// Worker `worker` of `slot` is ready (per-slot sockets: dealt to).
    pub fn serve(&mut self, slot: SlotIx, worker: WorkerId) {
        if let Some(groups) = self.per_slot() {
            groups.serve(slot, worker);
        }
    }

    /// Worker `worker` drains (per-slot sockets: no more turns).
    pub fn drain(&mut self, worker: WorkerId) {
        if let Some(groups) = self.per_slot() {
            groups.drain(worker);
        }
    }

    /// Worker `worker`'s processes are gone.
    pub fn gone(&mut self, worker: WorkerId) {
        if let Some(groups) = self.per_slot() {
            groups.gone(worker);
        }
    }

    /// Samples the per-slot queues; what the kernel dealt since last time.
    pub fn watch(
        &mut self,
        now: std::time::Instant,
        hang_timeout: Option<std::time::Duration>,
    ) -> Watched {
        self.per_slot()
            .map_or_else(Watched::default, |groups| groups.watch(now, hang_timeout))
    }

    /// The slots from `count` on are gone: close their sockets (per slot;
    /// what is still queued on them moves to the other slots' sockets where
    /// the group migrates, else the kernel resets it).
    pub fn remove_slots_from(&mut self, count: usize) {
        if let Some(groups) = self.per_slot() {
            groups.remove_slots_from(count);
        }
    }
}

/// The shim: `herd __exec-worker PROGRAM ARGS…` sets `LISTEN_PID` to this
/// process's pid and becomes PROGRAM. Returns only if exec failed.
pub fn exec_worker(mut args: impl Iterator<Item = OsString>) -> std::io::Error {
    let Some(program) = args.next() else {
        return std::io::Error::other("usage: herd __exec-worker PROGRAM [ARGS...]");
    };
    std::process::Command::new(&program)
        .args(args)
        .env(LISTEN_PID_ENV, std::process::id().to_string())
        .exec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    const PER_SLOT: SocketPlan = SocketPlan::PerSlot(Dealing::Hash);

    fn nonblocking(socket: &TcpListener) -> bool {
        let flags = nix::fcntl::fcntl(socket.as_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap();
        flags & nix::libc::O_NONBLOCK != 0
    }

    /// The first socket a worker in `slot` would inherit.
    fn socket_of(sockets: &WorkerSockets, slot: usize) -> &TcpListener {
        match sockets {
            WorkerSockets::HandOff => unreachable!("no sockets"),
            WorkerSockets::Shared(all) => &all[0],
            WorkerSockets::PerSlot(groups) => groups.socket(SlotIx(slot), 0),
        }
    }

    #[test]
    fn a_worker_start_never_changes_the_flags_of_a_socket_in_use() {
        for plan in [SocketPlan::Shared, PER_SLOT] {
            let (mut sockets, _) = WorkerSockets::new(plan, bound("127.0.0.1:0"), 16, 1).unwrap();
            sockets.for_slot(SlotIx(0), WorkerId(0)).unwrap();
            // Bound blocking, as systemd passes them.
            assert!(!nonblocking(socket_of(&sockets, 0)), "{plan:?}");
            // The first worker's event loop makes it non-blocking, for
            // every holder of the socket.
            herd_protocol::fdpass::set_nonblocking(socket_of(&sockets, 0).as_fd(), true).unwrap();
            // Its slot restarts (per slot) or another worker starts (shared):
            // the live worker's socket keeps its flag.
            sockets.gone(WorkerId(0));
            sockets.for_slot(SlotIx(0), WorkerId(2)).unwrap();
            sockets.for_slot(SlotIx(1), WorkerId(3)).unwrap();
            assert!(nonblocking(socket_of(&sockets, 0)), "{plan:?}");
            // A slot bound later starts blocking, whatever the others do.
            if plan == PER_SLOT {
                assert!(!nonblocking(socket_of(&sockets, 1)));
            }
        }
    }

    fn bound(addr: &str) -> Vec<BoundListener> {
        listener::bind_all(&[addr.parse().unwrap()], 16, listener::BindOptions::PLAIN).unwrap()
    }

    #[test]
    fn hand_off_modes_keep_the_listeners_for_herd() {
        let (mut sockets, herd_side) =
            WorkerSockets::new(SocketPlan::HandOff, bound("127.0.0.1:0"), 16, 2).unwrap();
        assert_eq!(herd_side.len(), 1);
        assert!(sockets.for_slot(SlotIx(0), WorkerId(0)).unwrap().is_empty());
    }

    #[test]
    fn shared_gives_every_slot_the_same_blocking_sockets() {
        let (mut sockets, herd_side) =
            WorkerSockets::new(SocketPlan::Shared, bound("127.0.0.1:0"), 16, 2).unwrap();
        assert!(herd_side.is_empty());
        let first = sockets.for_slot(SlotIx(0), WorkerId(0)).unwrap();
        assert_eq!(first, sockets.for_slot(SlotIx(5), WorkerId(1)).unwrap());
        assert!(!nonblocking(socket_of(&sockets, 0)));
    }
}
