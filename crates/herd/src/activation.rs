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
//! - `reuseport`: one `SO_REUSEPORT` socket per slot and listener, bound when
//!   the slot is created and held by herd until the slot is removed. A
//!   restarted worker gets its slot's socket back, so connections waiting in
//!   that accept queue across the restart are served, not reset. Each
//!   listener's group has the rotation program attached with no rotation
//!   (the kernel's hash still picks), loaded to migrate: a slot removed by
//!   scaling down hands what is queued on its socket to the others instead
//!   of the kernel resetting it (needs CAP_BPF and Linux 5.14; without, the
//!   reset stays unless `net.ipv4.tcp_migrate_req = 1`). herd's first
//!   bind (plain, without SO_REUSEPORT) proves the port is free and resolves
//!   port 0; it is closed before the group is bound, so no stranger's
//!   SO_REUSEPORT socket can have joined.

use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;

use herd_protocol::bpf::RotationProgram;
use tracing::info;

use crate::dispatch::Mode;
use crate::ids::{SlotIx, Table};
use crate::listener::{self, BoundListener, ListenError};
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
    /// Per slot, that slot's SO_REUSEPORT socket for each listener.
    ReusePort {
        addrs: Vec<SocketAddr>,
        backlog: u32,
        slots: Table<SlotIx, Vec<TcpListener>>,
        /// Per listener, the program attached to its group so that closing
        /// a slot's socket migrates its queue (`None`: not possible here).
        migration: Vec<Option<RotationProgram>>,
    },
}

impl WorkerSockets {
    /// Splits the bound listeners between the hand-off loop (returned) and
    /// the workers (kept here), according to `mode`. For `reuseport` this
    /// binds the group for the first `workers` slots.
    pub fn new(
        mode: Mode,
        listeners: Vec<BoundListener>,
        backlog: u32,
        workers: usize,
    ) -> Result<(WorkerSockets, Vec<BoundListener>), ListenError> {
        match mode {
            _ if mode.hands_off() => Ok((WorkerSockets::HandOff, listeners)),
            Mode::Shared => {
                let sockets: Vec<TcpListener> = listeners.into_iter().map(|l| l.socket).collect();
                for socket in &sockets {
                    make_blocking(socket)?;
                }
                Ok((WorkerSockets::Shared(sockets), Vec::new()))
            }
            _ => {
                let addrs = listeners.iter().map(|l| l.local).collect();
                // Close the probes: a plain socket on the port keeps the group out.
                drop(listeners);
                let mut sockets = WorkerSockets::ReusePort {
                    addrs,
                    backlog,
                    slots: Table::new(),
                    migration: Vec::new(),
                };
                sockets.bind_slots(workers)?;
                Ok((sockets, Vec::new()))
            }
        }
    }

    /// The listening fds the worker in `slot` inherits, in listener order
    /// (empty when herd hands connections over). They were made blocking
    /// when bound, as systemd passes them, and are passed as they are now:
    /// a worker that wants them non-blocking sets that itself, and other
    /// workers may be accepting from them with that flag (module docs).
    pub fn for_slot(&mut self, slot: SlotIx) -> Result<Vec<RawFd>, ListenError> {
        self.bind_slots(slot.get() + 1)?;
        let sockets = match self {
            WorkerSockets::HandOff => return Ok(Vec::new()),
            WorkerSockets::Shared(sockets) => &sockets[..],
            WorkerSockets::ReusePort { slots, .. } => &slots[slot][..],
        };
        Ok(sockets.iter().map(AsRawFd::as_raw_fd).collect())
    }

    /// The slots from `count` on are gone: close their sockets (`reuseport`;
    /// what is still queued on them moves to the other slots' sockets where
    /// the group migrates, see the module docs, else the kernel resets it).
    pub fn remove_slots_from(&mut self, count: usize) {
        if let WorkerSockets::ReusePort { slots, .. } = self {
            slots.truncate(count);
        }
    }

    /// Binds the `reuseport` sockets of slots not yet bound, up to `count`.
    fn bind_slots(&mut self, count: usize) -> Result<(), ListenError> {
        if let WorkerSockets::ReusePort {
            addrs,
            backlog,
            slots,
            migration,
        } = self
        {
            while slots.len() < count {
                let group: Vec<TcpListener> = addrs
                    .iter()
                    .map(|&addr| {
                        let socket = listener::bind_reuseport(addr, *backlog)?;
                        make_blocking(&socket)?;
                        Ok(socket)
                    })
                    .collect::<Result<_, ListenError>>()?;
                if slots.is_empty() {
                    *migration = group.iter().map(migrate_queues_of).collect();
                }
                slots.push(group);
            }
        }
        Ok(())
    }
}

/// Attaches the rotation program, with no rotation, to `first`'s group, so
/// that a socket of it that closes migrates its queue; `None` where the
/// kernel cannot (no CAP_BPF, Linux before 5.14), said once per listener.
fn migrate_queues_of(first: &TcpListener) -> Option<RotationProgram> {
    use std::os::fd::AsFd;
    let addr = first.local_addr().ok()?;
    let attached = RotationProgram::load().and_then(|program| {
        program.attach(first.as_fd())?;
        Ok(program)
    });
    match attached {
        Ok(program) if program.migrates() => Some(program),
        Ok(_) => {
            info!(%addr, event = "no_queue_migration", "scaling down resets the connections queued on a removed slot's socket (Linux before 5.14 cannot migrate them; net.ipv4.tcp_migrate_req = 1 does)");
            None
        }
        Err(e) => {
            info!(%addr, event = "no_queue_migration", "scaling down resets the connections queued on a removed slot's socket ({e}; net.ipv4.tcp_migrate_req = 1 migrates them)");
            None
        }
    }
}

/// Clears O_NONBLOCK on a socket no worker holds yet: the one time herd
/// sets a worker socket's flags (see the module docs for why only then).
fn make_blocking(socket: &TcpListener) -> Result<(), ListenError> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let fail = |source: nix::Error| ListenError {
        addr: socket
            .local_addr()
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
        reason: format!("cannot make the socket blocking: {}", source.desc()),
        source,
    };
    let flags = OFlag::from_bits_truncate(fcntl(socket, FcntlArg::F_GETFL).map_err(fail)?);
    fcntl(socket, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK)).map_err(fail)?;
    Ok(())
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

    fn nonblocking(socket: &TcpListener) -> bool {
        let flags = nix::fcntl::fcntl(socket.as_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap();
        flags & nix::libc::O_NONBLOCK != 0
    }

    /// Every socket a worker in `slot` would inherit.
    fn sockets_of(sockets: &WorkerSockets, slot: usize) -> Vec<&TcpListener> {
        match sockets {
            WorkerSockets::HandOff => Vec::new(),
            WorkerSockets::Shared(all) => all.iter().collect(),
            WorkerSockets::ReusePort { slots, .. } => slots[SlotIx(slot)].iter().collect(),
        }
    }

    #[test]
    fn a_worker_start_never_changes_the_flags_of_a_socket_in_use() {
        for mode in [Mode::Shared, Mode::ReusePort] {
            let (mut sockets, _) = WorkerSockets::new(mode, bound("127.0.0.1:0"), 16, 1).unwrap();
            sockets.for_slot(SlotIx(0)).unwrap();
            // Bound blocking, as systemd passes them.
            assert!(!nonblocking(sockets_of(&sockets, 0)[0]), "{mode:?}");
            // The first worker's event loop makes it non-blocking, for
            // every holder of the socket.
            herd_protocol::fdpass::set_nonblocking(sockets_of(&sockets, 0)[0].as_fd(), true)
                .unwrap();
            // Its slot restarts (reuseport) or another worker starts (shared):
            // the live worker's socket keeps its flag.
            sockets.for_slot(SlotIx(0)).unwrap();
            sockets.for_slot(SlotIx(1)).unwrap();
            assert!(nonblocking(sockets_of(&sockets, 0)[0]), "{mode:?}");
            // A slot bound later starts blocking, whatever the others do.
            if mode == Mode::ReusePort {
                assert!(!nonblocking(sockets_of(&sockets, 1)[0]));
            }
        }
    }

    fn bound(addr: &str) -> Vec<BoundListener> {
        listener::bind_all(&[addr.parse().unwrap()], 16, listener::BindOptions::PLAIN).unwrap()
    }

    #[test]
    fn hand_off_modes_keep_the_listeners_for_herd() {
        let (mut sockets, herd_side) =
            WorkerSockets::new(Mode::RoundRobin, bound("127.0.0.1:0"), 16, 2).unwrap();
        assert_eq!(herd_side.len(), 1);
        assert!(sockets.for_slot(SlotIx(0)).unwrap().is_empty());
    }

    #[test]
    fn shared_gives_every_slot_the_same_blocking_sockets() {
        let (mut sockets, herd_side) =
            WorkerSockets::new(Mode::Shared, bound("127.0.0.1:0"), 16, 2).unwrap();
        assert!(herd_side.is_empty());
        let first = sockets.for_slot(SlotIx(0)).unwrap();
        assert_eq!(first, sockets.for_slot(SlotIx(5)).unwrap());
        let WorkerSockets::Shared(all) = &sockets else {
            unreachable!()
        };
        let flags = nix::fcntl::fcntl(all[0].as_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert_eq!(flags & nix::libc::O_NONBLOCK, 0);
    }

    #[test]
    fn reuseport_binds_one_socket_per_slot_on_one_port_and_keeps_it() {
        let (mut sockets, _) =
            WorkerSockets::new(Mode::ReusePort, bound("127.0.0.1:0"), 16, 2).unwrap();
        let slot0 = sockets.for_slot(SlotIx(0)).unwrap();
        let slot1 = sockets.for_slot(SlotIx(1)).unwrap();
        assert_ne!(slot0, slot1);
        // Asking again (a restart) gives the same socket.
        assert_eq!(sockets.for_slot(SlotIx(0)).unwrap(), slot0);
        // A new slot is bound on demand, on the same port.
        let slot3 = sockets.for_slot(SlotIx(3)).unwrap();
        let WorkerSockets::ReusePort { slots, addrs, .. } = &sockets else {
            unreachable!()
        };
        assert_eq!(slots.len(), 4);
        assert_eq!(slots[SlotIx(3)][0].as_raw_fd(), slot3[0]);
        for group in slots {
            assert_eq!(group[0].local_addr().unwrap(), addrs[0]);
        }
        sockets.remove_slots_from(1);
        let WorkerSockets::ReusePort { slots, .. } = &sockets else {
            unreachable!()
        };
        assert_eq!(slots.len(), 1);
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
}
