//! Kernel rotation: round-robin for Node workers without a hand-off per
//! connection.
//!
//! Owns, for one listener, the SO_REUSEPORT group that replaces the hand-off:
//! one listening socket per worker slot, bound on the listener's address and
//! sent to the slot's worker as its server (Node's own `shared` path), and
//! the eBPF program ([`RotationProgram`]) that deals new connections over the
//! sockets whose workers take turns, strictly in order. The primary's own
//! socket stays in the group: the kernel falls back to it, and so to the
//! hand-off, whenever nobody takes turns.
//!
//! Nothing is lost when a worker goes: the primary keeps a copy of every
//! slot socket, so a dead worker's accept queue outlives it. A slot socket
//! whose worker is gone (or draining) leaves the rotation and herd accepts
//! what is queued on it and hands it to the other workers, until the slot's
//! next worker takes the socket over.
//!
//! Why: under Node, a connection handed over the cluster channel costs the
//! worker ~110 µs of JavaScript (read the JSON line, wrap the fd, write two
//! answers). Accepting from its own socket costs it nothing of that.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use nix::sys::socket::{getsockopt, sockopt};

use herd_protocol::bpf::{Dealing, RotationError, RotationProgram, MAX_ROTATION};

use crate::config::MAX_WORKERS;
use crate::ids::{ChannelIx, SlotIx, Table};
use crate::listener::{self, ListenError};

// Every slot of the largest pool must fit in one rotation.
const _: () = assert!(MAX_WORKERS <= MAX_ROTATION);

/// One listener's rotation.
#[derive(Debug)]
pub struct SlotRotation {
    program: RotationProgram,
    local: SocketAddr,
    v6_only: bool,
    backlog: u32,
    /// By slot; bound when the slot's worker first listens.
    slots: Table<SlotIx, Option<SlotSocket>>,
    /// Per slot, what the kernel had dealt at the last [`Self::take_dealt`].
    dealt_before: Vec<u64>,
    /// The slots taking turns now, in rotation order.
    turns: Vec<SlotIx>,
}

/// A rotation program's fds as the document carries them
/// ([`herd_protocol::bpf::CarriedProgram`]).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct ProgramFds {
    pub program: std::os::fd::RawFd,
    pub sockets: std::os::fd::RawFd,
    pub config: std::os::fd::RawFd,
    pub tally: std::os::fd::RawFd,
    pub probes: std::os::fd::RawFd,
    pub probe_sockets: std::os::fd::RawFd,
    pub in_rotation: usize,
    pub migrates: bool,
}

impl From<herd_protocol::bpf::CarriedProgram> for ProgramFds {
    fn from(p: herd_protocol::bpf::CarriedProgram) -> ProgramFds {
        ProgramFds {
            program: p.program,
            sockets: p.sockets,
            config: p.config,
            tally: p.tally,
            probes: p.probes,
            probe_sockets: p.probe_sockets,
            in_rotation: p.in_rotation,
            migrates: p.migrates,
        }
    }
}

impl From<ProgramFds> for herd_protocol::bpf::CarriedProgram {
    fn from(p: ProgramFds) -> herd_protocol::bpf::CarriedProgram {
        herd_protocol::bpf::CarriedProgram {
            program: p.program,
            sockets: p.sockets,
            config: p.config,
            tally: p.tally,
            probes: p.probes,
            probe_sockets: p.probe_sockets,
            in_rotation: p.in_rotation,
            migrates: p.migrates,
        }
    }
}

impl ProgramFds {
    pub fn fds(&self) -> [std::os::fd::RawFd; 6] {
        herd_protocol::bpf::CarriedProgram::from(*self).fds()
    }
}

/// A rotation as `herd upgrade` carries it: by slot, its socket and who
/// holds it (worker id, takes turns).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct CarriedRotation {
    pub slots: Vec<Option<CarriedSlotSocket>>,
    /// The program, still attached to the group, and its maps.
    pub program: Option<ProgramFds>,
    pub v6_only: bool,
    pub backlog: u32,
    pub dealt_before: Vec<u64>,
    pub turns: Vec<usize>,
}

impl CarriedRotation {
    /// Every fd it names.
    pub fn fds(&self) -> Vec<std::os::fd::RawFd> {
        let slots = self.slots.iter().flatten().map(|slot| slot.fd);
        let program = self.program.iter().flat_map(|p| p.fds());
        slots.chain(program).collect()
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CarriedSlotSocket {
    pub fd: std::os::fd::RawFd,
    pub holders: Vec<(u64, bool)>,
}

#[derive(Debug)]
struct SlotSocket {
    socket: mio::net::TcpListener,
    /// The workers (by hand-off channel) sent this socket that have not
    /// closed it, with whether each takes turns (is not draining).
    holders: Vec<(ChannelIx, bool)>,
    /// herd accepts from it (it is registered with the poll).
    herd_accepts: bool,
}

impl SlotRotation {
    /// Loads the program and attaches it to `main`'s group: `main` must be
    /// listening with SO_REUSEPORT.
    pub fn start(main: BorrowedFd<'_>, backlog: u32) -> Result<Self, RotationError> {
        let program = RotationProgram::load()?;
        program.attach(main)?;
        let local =
            nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(main.as_raw_fd())
                .ok()
                .and_then(|addr| {
                    addr.as_sockaddr_in()
                        .map(|v4| SocketAddr::from((v4.ip(), v4.port())))
                        .or_else(|| {
                            addr.as_sockaddr_in6()
                                .map(|v6| SocketAddr::from((v6.ip(), v6.port())))
                        })
                })
                .ok_or_else(|| {
                    RotationError::Attach(io::Error::other("the socket has no address"))
                })?;
        let v6_only = local.is_ipv6() && getsockopt(&main, sockopt::Ipv6V6Only).unwrap_or(true);
        Ok(SlotRotation {
            program,
            local,
            v6_only,
            backlog,
            slots: Table::new(),
            dealt_before: vec![0; MAX_ROTATION],
            turns: Vec::new(),
        })
    }

    /// The socket for `slot`'s workers, bound now if it is the first time,
    /// to be sent to the worker on channel `holder`, which from now on takes turns.
    pub fn hold(&mut self, slot: SlotIx, holder: ChannelIx) -> Result<BorrowedFd<'_>, ListenError> {
        if slot.get() >= MAX_ROTATION {
            return Err(ListenError {
                addr: self.local,
                reason: format!("slot {slot} is beyond the rotation's {MAX_ROTATION}"),
                source: nix::Error::EINVAL,
            });
        }
        self.slots.reach(slot, || None);
        if self.slots[slot].is_none() {
            let socket = listener::bind_group_member(self.local, self.backlog, self.v6_only)?;
            self.slots[slot] = Some(SlotSocket {
                socket: mio::net::TcpListener::from_std(socket),
                holders: Vec::new(),
                herd_accepts: false,
            });
        }
        let entry = self.slots[slot].as_mut().expect("bound above");
        entry.holders.retain(|(channel, _)| *channel != holder);
        entry.holders.push((holder, true));
        Ok(entry.socket.as_fd())
    }

    /// The worker on channel `holder` closed the socket, or is gone.
    pub fn release(&mut self, holder: ChannelIx) {
        for entry in self.slots.iter_mut().flatten() {
            entry.holders.retain(|(channel, _)| *channel != holder);
        }
    }

    /// The worker on channel `holder` drains: it keeps accepting what it
    /// can, but takes no turns.
    pub fn stop_turns(&mut self, holder: ChannelIx) {
        for entry in self.slots.iter_mut().flatten() {
            for (channel, takes_turns) in &mut entry.holders {
                if *channel == holder {
                    *takes_turns = false;
                }
            }
        }
    }

    /// Does the worker on channel `holder` hold a socket of this rotation?
    pub fn holds(&self, holder: ChannelIx) -> bool {
        self.slots
            .iter()
            .flatten()
            .any(|entry| entry.holders.iter().any(|(channel, _)| *channel == holder))
    }

    /// Brings the kernel's rotation and herd's own accepting in line with
    /// the holders: a slot takes turns while a holder of its socket does;
    /// herd accepts from every other slot socket (registered with `token_of`).
    pub fn apply(
        &mut self,
        registry: &Registry,
        token_of: impl Fn(SlotIx) -> Token,
    ) -> Result<(), RotationError> {
        let turns: Vec<SlotIx> = self
            .slots
            .enumerate()
            .filter_map(|(slot, entry)| {
                let entry = entry.as_ref()?;
                entry
                    .holders
                    .iter()
                    .any(|(_, takes_turns)| *takes_turns)
                    .then_some(slot)
            })
            .collect();
        for slot in self.slots.ids() {
            let Some(entry) = self.slots[slot].as_mut() else {
                continue;
            };
            let herd_accepts = !turns.contains(&slot);
            if herd_accepts == entry.herd_accepts {
                continue;
            }
            let raw = entry.socket.as_raw_fd();
            let mut source = SourceFd(&raw);
            // Registering an edge-triggered socket that already has connections
            // queued reports it readable at once: nothing waits for the next one.
            let changed = if herd_accepts {
                registry.register(&mut source, token_of(slot), Interest::READABLE)
            } else {
                registry.deregister(&mut source)
            };
            changed.map_err(RotationError::Update)?;
            entry.herd_accepts = herd_accepts;
        }
        if turns != self.turns {
            // The program deals by position: the slot's number.
            let members: Vec<(usize, BorrowedFd<'_>)> = turns
                .iter()
                .map(|&slot| {
                    let entry = self.slots[slot].as_ref().expect("slot taking turns");
                    (slot.get(), entry.socket.as_fd())
                })
                .collect();
            self.program.set_rotation(&members, Dealing::Turns)?;
            self.turns = turns;
        }
        Ok(())
    }

    /// The slots whose sockets herd accepts from.
    pub fn herd_accepting(&self) -> Vec<SlotIx> {
        self.slots
            .ids()
            .filter(|&slot| self.accepting(slot).is_some())
            .collect()
    }

    /// The slot socket herd accepts from for `slot`, if herd accepts from it.
    pub fn accepting(&self, slot: SlotIx) -> Option<&mio::net::TcpListener> {
        let entry = self.slots.get(slot)?.as_ref()?;
        entry.herd_accepts.then_some(&entry.socket)
    }

    /// What `herd upgrade` carries: each slot socket's fd and its holders,
    /// by worker (`worker_of` names the worker on a channel).
    pub fn carried(&self, worker_of: impl Fn(ChannelIx) -> Option<u64>) -> CarriedRotation {
        let slots = self
            .slots
            .iter()
            .map(|entry| {
                let entry = entry.as_ref()?;
                let holders = entry
                    .holders
                    .iter()
                    .filter_map(|&(channel, turns)| Some((worker_of(channel)?, turns)))
                    .collect();
                Some(CarriedSlotSocket {
                    fd: entry.socket.as_raw_fd(),
                    holders,
                })
            })
            .collect();
        CarriedRotation {
            slots,
            program: Some(self.program.carried().into()),
            v6_only: self.v6_only,
            backlog: self.backlog,
            dealt_before: self.dealt_before.clone(),
            turns: self.turns.iter().map(|s| s.get()).collect(),
        }
    }

    /// The rotation [`SlotRotation::carried`] described, for the listener
    /// at `local`: the same program (still attached) and socket arrays, the
    /// slot sockets held by the workers' new channels (`channel_of`).
    pub fn restored(
        local: SocketAddr,
        carried: CarriedRotation,
        channel_of: impl Fn(u64) -> Option<ChannelIx>,
    ) -> io::Result<SlotRotation> {
        let program = carried
            .program
            .ok_or_else(|| io::Error::other("a carried rotation has no program"))?;
        let mut rotation = SlotRotation {
            program: RotationProgram::adopt(program.into())?,
            local,
            v6_only: carried.v6_only,
            backlog: carried.backlog,
            slots: Table::new(),
            dealt_before: carried.dealt_before.clone(),
            turns: carried.turns.iter().map(|&s| SlotIx(s)).collect(),
        };
        rotation.dealt_before.resize(MAX_ROTATION, 0);
        rotation.adopt(carried, channel_of)?;
        Ok(rotation)
    }

    /// The carried slot sockets back in this rotation (see
    /// [`SlotRotation::restored`]), held by the workers' new channels
    /// (`channel_of`); [`SlotRotation::apply`] then has herd accept from
    /// the slots no worker takes turns on.
    fn adopt(
        &mut self,
        carried: CarriedRotation,
        channel_of: impl Fn(u64) -> Option<ChannelIx>,
    ) -> io::Result<()> {
        for (slot, entry) in carried.slots.into_iter().enumerate() {
            let Some(entry) = entry else { continue };
            let socket =
                std::net::TcpListener::from(herd_protocol::fdpass::adopt_inherited_fd(entry.fd)?);
            socket.set_nonblocking(true)?;
            let slot = SlotIx(slot);
            self.slots.reach(slot, || None);
            self.slots[slot] = Some(SlotSocket {
                socket: mio::net::TcpListener::from_std(socket),
                holders: entry
                    .holders
                    .into_iter()
                    .filter_map(|(worker, turns)| Some((channel_of(worker)?, turns)))
                    .collect(),
                herd_accepts: false,
            });
        }
        Ok(())
    }

    /// Connections the kernel dealt per slot since the last call: `(slot, count)`.
    pub fn take_dealt(&mut self) -> io::Result<Vec<(SlotIx, u64)>> {
        let dealt = self.program.dealt()?;
        let mut news = Vec::new();
        for (slot, (&now, before)) in dealt.iter().zip(&mut self.dealt_before).enumerate() {
            if now > *before {
                news.push((SlotIx(slot), now - *before));
                *before = now;
            }
        }
        Ok(news)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    fn token_of(slot: SlotIx) -> Token {
        Token(100 + slot.get())
    }

    /// Waits (up to 5 s) for a poll event; returns the tokens reported.
    fn readable(poll: &mut mio::Poll) -> Vec<Token> {
        let mut events = mio::Events::with_capacity(16);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            poll.poll(&mut events, Some(Duration::from_millis(50)))
                .unwrap();
            let tokens: Vec<Token> = events.iter().map(|e| e.token()).collect();
            if !tokens.is_empty() {
                return tokens;
            }
        }
        panic!("nothing became readable");
    }

    #[test]
    fn slots_take_turns_while_a_worker_holds_them_and_herd_takes_over_the_rest() {
        let group = listener::BindOptions {
            reuse_port: true,
            v6_only: true,
        };
        let main = listener::bind_with("127.0.0.1:0".parse().unwrap(), 16, group).unwrap();
        let addr = main.local_addr().unwrap();
        let test = "slots_take_turns_while_a_worker_holds_them_and_herd_takes_over_the_rest";
        if !herd_protocol::bpf::testable_here(test) {
            return;
        }
        let mut rotation = SlotRotation::start(main.as_fd(), 16).unwrap_or_else(|e| panic!("{e}"));
        let mut poll = mio::Poll::new().unwrap();
        rotation.hold(SlotIx(0), ChannelIx(10)).unwrap();
        rotation.hold(SlotIx(1), ChannelIx(11)).unwrap();
        rotation.apply(poll.registry(), token_of).unwrap();
        assert_eq!(rotation.turns, [SlotIx(0), SlotIx(1)]);
        assert!(rotation.herd_accepting().is_empty());

        // Worker 11 drains: slot 1 leaves the rotation and herd accepts from it.
        rotation.stop_turns(ChannelIx(11));
        rotation.apply(poll.registry(), token_of).unwrap();
        assert_eq!(rotation.turns, [SlotIx(0)]);
        assert_eq!(rotation.herd_accepting(), [SlotIx(1)]);
        // Its replacement takes the same socket and the slot's turns back.
        rotation.hold(SlotIx(1), ChannelIx(12)).unwrap();
        rotation.release(ChannelIx(11));
        rotation.apply(poll.registry(), token_of).unwrap();
        assert_eq!(rotation.turns, [SlotIx(0), SlotIx(1)]);
        assert!(rotation.herd_accepting().is_empty());

        // Slot 0's worker dies with a connection in its queue: herd is told.
        let before = rotation.take_dealt().unwrap();
        let _client = TcpStream::connect(addr).unwrap();
        let _client2 = TcpStream::connect(addr).unwrap();
        rotation.release(ChannelIx(10));
        assert!(!rotation.holds(ChannelIx(10)));
        rotation.apply(poll.registry(), token_of).unwrap();
        assert_eq!(rotation.turns, [SlotIx(1)]);
        assert_eq!(readable(&mut poll), [token_of(SlotIx(0))]);
        let queued = rotation.accepting(SlotIx(0)).expect("herd accepts slot 0");
        assert!(
            queued.accept().is_ok(),
            "the connection dealt to slot 0 waits there"
        );
        let mut dealt: Vec<(SlotIx, u64)> = before;
        dealt.extend(rotation.take_dealt().unwrap());
        assert_eq!(dealt, [(SlotIx(0), 1), (SlotIx(1), 1)]);
    }
}
