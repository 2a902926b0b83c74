//! Strict rotation in the kernel: an SK_REUSEPORT eBPF program that deals
//! new connections over a SO_REUSEPORT group's sockets in turn.
//!
//! Owns the `bpf(2)` calls (load the program, create and fill its maps) and
//! attaching the program to a group. The caller decides which sockets take
//! turns ([`RotationProgram::set_rotation`]); the kernel then puts each new
//! connection in the accept queue of the next socket in that list, and counts
//! it for the socket's slot ([`RotationProgram::dealt`]).
//!
//! Why: a worker that accepts from its own socket pays nothing per
//! connection beyond `accept`, where a worker handed each connection over a
//! channel pays for reading that message (for Node.js workers, its JSON IPC
//! costs more than the request). The program keeps the rotation strict,
//! unlike SO_REUSEPORT's own hash of the 4-tuple.
//!
//! It lives in this crate, beside fd passing, because it is the other place
//! herd hands file descriptors to someone else, here the kernel's socket
//! array, and because it needs raw system calls.
//!
//! # Layout
//! - this file: the maps, loading and attaching, [`RotationProgram`].
//! - `program`: the program, written with labels; its bytes are pinned.
//! - `asm`: the assembler: registers, instructions, labels resolved to
//!   jump offsets.

#![allow(unsafe_code)]

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use nix::libc;

use asm::Insn;

mod asm;
mod program;

/// `bpf(2)` commands, map and program types, from `<linux/bpf.h>`.
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_REUSEPORT_SOCKARRAY: u32 = 20;
const BPF_PROG_TYPE_SK_REUSEPORT: u32 = 21;
const BPF_SK_REUSEPORT_SELECT: u32 = 39;
const BPF_SK_REUSEPORT_SELECT_OR_MIGRATE: u32 = 40;
/// `<asm-generic/socket.h>`; libc does not export it for glibc targets.
const SO_ATTACH_REUSEPORT_EBPF: libc::c_int = 52;

/// Sockets one rotation can hold: one per worker slot (herd's
/// `MAX_WORKERS` is checked against it at compile time).
pub const MAX_ROTATION: usize = 1024;

/// Readiness probes steered at once, at most (`probes` map entries); one
/// more is refused (E2BIG) and tried again by the caller.
pub const MAX_PROBES: u32 = 64;

/// The `config` map's one value, written by herd: how many sockets take
/// turns, whose slot each is (to count per slot), then whether they are
/// dealt by hash ([`Dealing`]).
const CONFIG_LEN: usize = CONFIG_HASHED + 4;
/// Where in the `config` value the dealing is: after `live` and `slot_of`.
const CONFIG_HASHED: usize = 4 + 4 * MAX_ROTATION;
/// The `tally` map's one value, written by the program: the turn counter,
/// then connections dealt per slot.
const TALLY_LEN: usize = 8 + 8 * MAX_ROTATION;

/// How the program deals new connections over the sockets it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dealing {
    /// Strictly in turn (round-robin).
    Turns,
    /// By the connection's 4-tuple hash, as SO_REUSEPORT itself does, but
    /// only over the sockets given (and counted per slot).
    Hash,
}

#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error("cannot create a BPF map: {0} (needs CAP_BPF, or root)")]
    CreateMap(#[source] io::Error),
    #[error("the kernel refused the rotation program: {error}{}", verifier_note(.log))]
    LoadProgram {
        #[source]
        error: io::Error,
        log: String,
    },
    #[error("cannot attach the rotation program to the listening socket: {0}")]
    Attach(#[source] io::Error),
    #[error("cannot update the rotation's sockets: {0}")]
    Update(#[source] io::Error),
}

impl RotationError {
    /// Whether the kernel refused for want of privilege (no CAP_BPF, nor
    /// CAP_SYS_ADMIN): EPERM from creating a map or loading the program.
    /// A verifier's rejection, an old kernel or a failed attach is not.
    pub fn lacks_privilege(&self) -> bool {
        let error = match self {
            RotationError::CreateMap(error) | RotationError::LoadProgram { error, .. } => error,
            RotationError::Attach(_) | RotationError::Update(_) => return false,
        };
        error.raw_os_error() == Some(libc::EPERM)
    }
}

fn verifier_note(log: &str) -> String {
    let log = log.trim();
    if log.is_empty() {
        " (needs CAP_BPF, or root, and Linux 5.12 or later)".into()
    } else {
        format!("; verifier said: {}", log.lines().last().unwrap_or(log))
    }
}

/// A [`RotationProgram`] by fd number, as `herd upgrade` carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CarriedProgram {
    pub program: RawFd,
    pub sockets: RawFd,
    pub config: RawFd,
    pub tally: RawFd,
    pub probes: RawFd,
    pub probe_sockets: RawFd,
    pub in_rotation: usize,
    pub migrates: bool,
}

impl CarriedProgram {
    pub fn fds(&self) -> [RawFd; 6] {
        [
            self.program,
            self.sockets,
            self.config,
            self.tally,
            self.probes,
            self.probe_sockets,
        ]
    }
}

/// A loaded rotation program with its maps; dropped, everything is freed
/// (a group it is attached to keeps the program until its last socket closes).
#[derive(Debug)]
pub struct RotationProgram {
    program: OwnedFd,
    /// REUSEPORT_SOCKARRAY: position in the rotation -> socket.
    sockets: OwnedFd,
    config: OwnedFd,
    tally: OwnedFd,
    /// HASH: a probe's source port (as the wire has it) -> its slot.
    probes: Arc<OwnedFd>,
    /// REUSEPORT_SOCKARRAY: slot -> the socket its probes go to.
    probe_sockets: OwnedFd,
    /// Sockets in `sockets` now, to delete the stale ones on the next change.
    in_rotation: usize,
    /// Loaded to migrate: a socket of the group that closes hands the
    /// connections queued on it to the others (Linux 5.14 and later).
    migrates: bool,
}

impl RotationProgram {
    pub fn load() -> Result<Self, RotationError> {
        let sockets = create_map(BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, MAX_ROTATION as u32)
            .map_err(RotationError::CreateMap)?;
        let config = create_map(BPF_MAP_TYPE_ARRAY, 4, CONFIG_LEN as u32, 1)
            .map_err(RotationError::CreateMap)?;
        let tally = create_map(BPF_MAP_TYPE_ARRAY, 4, TALLY_LEN as u32, 1)
            .map_err(RotationError::CreateMap)?;
        let probes =
            create_map(BPF_MAP_TYPE_HASH, 4, 4, MAX_PROBES).map_err(RotationError::CreateMap)?;
        let probe_sockets = create_map(BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, MAX_ROTATION as u32)
            .map_err(RotationError::CreateMap)?;
        let maps = program::Maps {
            sockets: sockets.as_raw_fd(),
            config: config.as_raw_fd(),
            tally: tally.as_raw_fd(),
            probes: probes.as_raw_fd(),
            probe_sockets: probe_sockets.as_raw_fd(),
        };
        let migrating = program::rotation(&maps, true);
        let (program, migrates) = match load_program(&migrating, BPF_SK_REUSEPORT_SELECT_OR_MIGRATE)
        {
            Ok(program) => (program, true),
            // Before Linux 5.14: the program without migration.
            Err(RotationError::LoadProgram { error, .. })
                if error.raw_os_error() == Some(libc::EINVAL) =>
            {
                let plain = program::rotation(&maps, false);
                (load_program(&plain, BPF_SK_REUSEPORT_SELECT)?, false)
            }
            Err(e) => return Err(e),
        };
        Ok(RotationProgram {
            program,
            sockets,
            config,
            tally,
            probes: Arc::new(probes),
            probe_sockets,
            in_rotation: 0,
            migrates,
        })
    }

    /// The fds of the program and its maps, and what it deals to now, for
    /// `herd upgrade` to carry: the new herd goes on with this very
    /// program, still attached, its counts and its socket arrays as they
    /// are (a fresh one could not take the sockets while this one holds them).
    pub fn carried(&self) -> CarriedProgram {
        CarriedProgram {
            program: self.program.as_raw_fd(),
            sockets: self.sockets.as_raw_fd(),
            config: self.config.as_raw_fd(),
            tally: self.tally.as_raw_fd(),
            probes: self.probes.as_raw_fd(),
            probe_sockets: self.probe_sockets.as_raw_fd(),
            in_rotation: self.in_rotation,
            migrates: self.migrates,
        }
    }

    /// The program [`RotationProgram::carried`] described, its fds taken
    /// back (see [`crate::fdpass::adopt_inherited_fd`]).
    pub fn adopt(carried: CarriedProgram) -> io::Result<RotationProgram> {
        let take = crate::fdpass::adopt_inherited_fd;
        Ok(RotationProgram {
            program: take(carried.program)?,
            sockets: take(carried.sockets)?,
            config: take(carried.config)?,
            tally: take(carried.tally)?,
            probes: Arc::new(take(carried.probes)?),
            probe_sockets: take(carried.probe_sockets)?,
            in_rotation: carried.in_rotation,
            migrates: carried.migrates,
        })
    }

    /// Makes `socket` (listening in the group, and not among those dealt
    /// to) where the probes steered to `slot` go ([`Prober::steer`]).
    pub fn offer_probe(&self, slot: usize, socket: BorrowedFd<'_>) -> Result<(), RotationError> {
        let value = socket.as_raw_fd() as u64;
        update_at(&self.probe_sockets, slot as u32, &value.to_ne_bytes())
            .map_err(RotationError::Update)
    }

    /// `slot`'s probe socket leaves the probe map (before it can be dealt
    /// to: a socket sits in one socket array at a time).
    pub fn withdraw_probe(&self, slot: usize) -> Result<(), RotationError> {
        delete(&self.probe_sockets, slot as u32).map_err(RotationError::Update)
    }

    /// A handle that steers probes, for another thread.
    pub fn prober(&self) -> Prober {
        Prober {
            probes: self.probes.clone(),
        }
    }

    /// Whether a socket of the group that closes hands what is queued on
    /// it to the others (else the kernel resets it, unless
    /// `net.ipv4.tcp_migrate_req` is set).
    pub fn migrates(&self) -> bool {
        self.migrates
    }

    /// Makes the program choose for `member`'s SO_REUSEPORT group (which
    /// `member` must already be listening in).
    pub fn attach(&self, member: BorrowedFd<'_>) -> Result<(), RotationError> {
        let program = self.program.as_raw_fd();
        // SAFETY: setsockopt reads an int from a pointer to a live local of that size.
        let rc = unsafe {
            libc::setsockopt(
                member.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_ATTACH_REUSEPORT_EBPF,
                (&program as *const RawFd).cast(),
                size_of::<RawFd>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(RotationError::Attach(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Sets the sockets dealt to, each with the slot to count its
    /// connections for, and how ([`Dealing`]); they must be listening in
    /// the attached group. With none, the kernel picks by its own hash
    /// among every socket of the group. A connection that arrives during
    /// the change may go to any member of the group, never nowhere.
    pub fn set_rotation(
        &mut self,
        members: &[(usize, BorrowedFd<'_>)],
        dealing: Dealing,
    ) -> Result<(), RotationError> {
        let members = &members[..members.len().min(MAX_ROTATION)];
        let mut config = vec![0u8; CONFIG_LEN];
        config[..4].copy_from_slice(&0u32.to_ne_bytes());
        // Shrink the turn to none first: a socket may sit at one position
        // of the array only, so positions are emptied before being refilled.
        update(&self.config, &config).map_err(RotationError::Update)?;
        for position in 0..self.in_rotation {
            delete(&self.sockets, position as u32).map_err(RotationError::Update)?;
        }
        self.in_rotation = 0;
        for (position, (slot, socket)) in members.iter().enumerate() {
            let value = socket.as_raw_fd() as u64;
            update_at(&self.sockets, position as u32, &value.to_ne_bytes())
                .map_err(RotationError::Update)?;
            self.in_rotation = position + 1;
            let at = 4 + 4 * position;
            config[at..at + 4].copy_from_slice(&(*slot as u32).to_ne_bytes());
        }
        let hashed = u32::from(dealing == Dealing::Hash);
        config[CONFIG_HASHED..].copy_from_slice(&hashed.to_ne_bytes());
        config[..4].copy_from_slice(&(members.len() as u32).to_ne_bytes());
        update(&self.config, &config).map_err(RotationError::Update)
    }

    /// Connections the kernel has dealt to each slot since the program was
    /// loaded, indexed by slot.
    pub fn dealt(&self) -> io::Result<Vec<u64>> {
        let mut tally = vec![0u8; TALLY_LEN];
        lookup(&self.tally, &mut tally)?;
        Ok(tally[8..]
            .chunks_exact(8)
            .map(|count| u64::from_ne_bytes(count.try_into().expect("8 bytes")))
            .collect())
    }
}

/// Steers readiness probes: a connection from a reserved source port goes
/// to one slot's probe socket ([`RotationProgram::offer_probe`]).
#[derive(Debug, Clone)]
pub struct Prober {
    probes: Arc<OwnedFd>,
}

impl Prober {
    /// Connections from local port `port` go to `slot`'s probe socket,
    /// until [`Prober::unsteer`]. Fails (E2BIG) past [`MAX_PROBES`] at once.
    pub fn steer(&self, port: u16, slot: usize) -> io::Result<()> {
        let key = probe_key(port);
        let value = (slot as u32).to_ne_bytes();
        let mut attr = element_attr(&self.probes, &key, value.as_ptr() as u64);
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
    }

    pub fn unsteer(&self, port: u16) -> io::Result<()> {
        delete(&self.probes, probe_key(port))
    }
}

/// The `probes` key of a source port: the two bytes of the TCP header, as
/// the program loads them (a native u16 of network-order bytes).
fn probe_key(port: u16) -> u32 {
    u32::from(u16::from_ne_bytes(port.to_be_bytes()))
}

/// `union bpf_attr`, large enough for every command used here; zeroed, as
/// the kernel requires of the fields a command does not use.
#[repr(C, align(8))]
struct BpfAttr([u8; 128]);

impl BpfAttr {
    fn new() -> Self {
        BpfAttr([0; 128])
    }
    fn put_u32(&mut self, at: usize, value: u32) -> &mut Self {
        self.0[at..at + 4].copy_from_slice(&value.to_ne_bytes());
        self
    }
    fn put_u64(&mut self, at: usize, value: u64) -> &mut Self {
        self.0[at..at + 8].copy_from_slice(&value.to_ne_bytes());
        self
    }
}

fn bpf(command: libc::c_long, attr: &mut BpfAttr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-initialised bpf_attr of the size passed, and
    // every pointer placed in it refers to memory the caller keeps alive
    // (and large enough) for the duration of this call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr.0.as_mut_ptr(),
            size_of::<BpfAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn bpf_fd(command: libc::c_long, attr: &mut BpfAttr) -> io::Result<OwnedFd> {
    let fd = bpf(command, attr)? as RawFd;
    // SAFETY: the kernel just returned this fd to us, close-on-exec, and
    // nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn create_map(kind: u32, key_size: u32, value_size: u32, entries: u32) -> io::Result<OwnedFd> {
    let mut attr = BpfAttr::new();
    attr.put_u32(0, kind)
        .put_u32(4, key_size)
        .put_u32(8, value_size)
        .put_u32(12, entries);
    bpf_fd(BPF_MAP_CREATE, &mut attr)
}

fn load_program(code: &[Insn], attach_type: u32) -> Result<OwnedFd, RotationError> {
    let license = c"MIT";
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = BpfAttr::new();
    attr.put_u32(0, BPF_PROG_TYPE_SK_REUSEPORT)
        .put_u32(4, code.len() as u32)
        .put_u64(8, code.as_ptr() as u64)
        .put_u64(16, license.as_ptr() as u64)
        .put_u32(24, 1)
        .put_u32(28, log.len() as u32)
        .put_u64(32, log.as_mut_ptr() as u64)
        .put_u32(68, attach_type);
    bpf_fd(BPF_PROG_LOAD, &mut attr).map_err(|error| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        RotationError::LoadProgram {
            error,
            log: String::from_utf8_lossy(&log[..end]).into_owned(),
        }
    })
}

fn element_attr(map: &OwnedFd, key: &u32, value: u64) -> BpfAttr {
    let mut attr = BpfAttr::new();
    attr.put_u32(0, map.as_raw_fd() as u32)
        .put_u64(8, key as *const u32 as u64)
        .put_u64(16, value);
    attr
}

fn update(map: &OwnedFd, value: &[u8]) -> io::Result<()> {
    update_at(map, 0, value)
}

fn update_at(map: &OwnedFd, key: u32, value: &[u8]) -> io::Result<()> {
    let mut attr = element_attr(map, &key, value.as_ptr() as u64);
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

fn delete(map: &OwnedFd, key: u32) -> io::Result<()> {
    let mut attr = element_attr(map, &key, 0);
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other.map(drop),
    }
}

fn lookup(map: &OwnedFd, value: &mut [u8]) -> io::Result<()> {
    let key = 0u32;
    let mut attr = element_attr(map, &key, value.as_mut_ptr() as u64);
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).map(drop)
}

/// Whether a test that needs the kernel to run the rotation can run here:
/// false, after saying `skipped {test}`, where the kernel refuses the
/// program for want of CAP_BPF, except in CI (`CI` set, as .ci/run sets
/// it), where that fails the test; any other refusal fails it everywhere,
/// since herd would fall back to hand-offs unseen. For tests, of this
/// workspace and of programs built on it.
#[doc(hidden)]
pub fn testable_here(test: &str) -> bool {
    match RotationProgram::load() {
        Ok(_) => true,
        Err(e) if !e.lacks_privilege() => panic!("{test}: the kernel refused the rotation: {e}"),
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{test} needs CAP_BPF ({e}), and CI is set, so it fails rather than skips"
            );
            eprintln!("skipped {test}: needs CAP_BPF ({e})");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    /// A listening `SO_REUSEPORT` socket on `addr`, non-blocking.
    fn bind_reuseport(addr: std::net::SocketAddr) -> TcpListener {
        use nix::sys::socket::{
            bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
            SockaddrStorage,
        };
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .unwrap();
        setsockopt(&fd, sockopt::ReusePort, &true).unwrap();
        bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).unwrap();
        listen(&fd, Backlog::new(64).unwrap()).unwrap();
        TcpListener::from(fd)
    }

    /// Waits (up to 5 s) for one connection on one of `listeners`, accepts
    /// it and says which.
    fn landed(listeners: &[TcpListener]) -> usize {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let counts: Vec<usize> = listeners
                .iter()
                .map(|l| std::iter::from_fn(|| l.accept().ok()).count())
                .collect();
            match counts.iter().sum::<usize>() {
                0 => assert!(
                    std::time::Instant::now() < deadline,
                    "no connection arrived"
                ),
                1 => return counts.iter().position(|&n| n == 1).expect("one"),
                _ => panic!("more than one connection: {counts:?}"),
            }
            std::thread::yield_now();
        }
    }

    /// A program loaded to migrate, attached to a group of two sockets
    /// (the first attached to), and their address.
    fn migrating_pair() -> (
        RotationProgram,
        TcpListener,
        TcpListener,
        std::net::SocketAddr,
    ) {
        let rotation = RotationProgram::load().unwrap_or_else(|e| panic!("{e}"));
        assert!(rotation.migrates(), "Linux 5.14 or later migrates");
        let first = bind_reuseport("127.0.0.1:0".parse().unwrap());
        let addr = first.local_addr().unwrap();
        let second = bind_reuseport(addr);
        rotation.attach(first.as_fd()).unwrap();
        (rotation, first, second, addr)
    }

    #[test]
    fn without_cap_bpf_the_error_says_so() {
        let eperm = || io::Error::from_raw_os_error(libc::EPERM);
        assert!(RotationError::CreateMap(eperm()).lacks_privilege());
        let refused = RotationError::LoadProgram {
            error: eperm(),
            log: String::new(),
        };
        assert!(refused.lacks_privilege());
        assert!(refused.to_string().contains("needs CAP_BPF"), "{refused}");
        let rejected = RotationError::LoadProgram {
            error: io::Error::from_raw_os_error(libc::EACCES),
            log: "R1 invalid mem access 'scalar'\n".into(),
        };
        assert!(!rejected.lacks_privilege());
        assert!(!RotationError::Attach(eperm()).lacks_privilege());
    }

    /// A socket of the group closes with connections queued on it: they
    /// move to the socket left, none is reset.
    #[test]
    fn connections_queued_on_a_closed_socket_move_to_the_others() {
        let test = "connections_queued_on_a_closed_socket_move_to_the_others";
        if !testable_here(test) {
            return;
        }
        let (mut rotation, kept, closing, addr) = migrating_pair();
        rotation
            .set_rotation(&[(0, kept.as_fd()), (1, closing.as_fd())], Dealing::Turns)
            .unwrap();
        // Strict turns: every other one waits on `closing`.
        let clients: Vec<TcpStream> = (0..10).map(|_| TcpStream::connect(addr).unwrap()).collect();
        rotation
            .set_rotation(&[(0, kept.as_fd())], Dealing::Turns)
            .unwrap();
        drop(closing);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut accepted = 0;
        while accepted < clients.len() {
            assert!(
                std::time::Instant::now() < deadline,
                "only {accepted} of {} reached the socket left",
                clients.len()
            );
            accepted += std::iter::from_fn(|| kept.accept().ok()).count();
            std::thread::yield_now();
        }
        assert_eq!(accepted, clients.len());
    }

    #[test]
    fn the_kernel_deals_connections_in_strict_turns_and_counts_them_per_slot() {
        let test = "the_kernel_deals_connections_in_strict_turns_and_counts_them_per_slot";
        if !testable_here(test) {
            return;
        }
        let mut rotation = RotationProgram::load().unwrap_or_else(|e| panic!("{e}"));
        let first = bind_reuseport("127.0.0.1:0".parse().unwrap());
        let addr = first.local_addr().unwrap();
        let mut group = vec![first];
        for _ in 0..2 {
            group.push(bind_reuseport(addr));
        }
        rotation.attach(group[0].as_fd()).unwrap();
        // Slots 5 and 7 take turns; group[0] is out of the rotation.
        rotation
            .set_rotation(
                &[(5, group[1].as_fd()), (7, group[2].as_fd())],
                Dealing::Turns,
            )
            .unwrap();
        let mut order = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..10 {
            clients.push(TcpStream::connect(addr).unwrap());
            order.push(landed(&group));
        }
        assert!(order.windows(2).all(|w| w[0] != w[1]), "{order:?}");
        assert!(order.iter().all(|&at| at == 1 || at == 2), "{order:?}");
        let dealt = rotation.dealt().unwrap();
        assert_eq!((dealt[5], dealt[7]), (5, 5));
        // An empty rotation leaves the choice to the kernel's hash: still served.
        rotation.set_rotation(&[], Dealing::Turns).unwrap();
        clients.push(TcpStream::connect(addr).unwrap());
        landed(&group);
        assert_eq!(rotation.dealt().unwrap().iter().sum::<u64>(), 10);
    }

    /// By hash: only the sockets given are dealt to, each counted for its
    /// slot, and one 4-tuple keeps going to the same socket.
    #[test]
    fn hashed_dealing_keeps_to_the_sockets_given_and_counts_them() {
        let test = "hashed_dealing_keeps_to_the_sockets_given_and_counts_them";
        if !testable_here(test) {
            return;
        }
        let mut rotation = RotationProgram::load().unwrap_or_else(|e| panic!("{e}"));
        let first = bind_reuseport("127.0.0.1:0".parse().unwrap());
        let addr = first.local_addr().unwrap();
        let group = [first, bind_reuseport(addr), bind_reuseport(addr)];
        rotation.attach(group[0].as_fd()).unwrap();
        rotation
            .set_rotation(
                &[(3, group[1].as_fd()), (4, group[2].as_fd())],
                Dealing::Hash,
            )
            .unwrap();
        let mut clients = Vec::new();
        let mut landed_at = [0; 3];
        for _ in 0..40 {
            clients.push(TcpStream::connect(addr).unwrap());
            landed_at[landed(&group)] += 1;
        }
        assert_eq!(landed_at[0], 0, "group[0] is not dealt to: {landed_at:?}");
        let dealt = rotation.dealt().unwrap();
        assert_eq!((dealt[3], dealt[4]), (landed_at[1], landed_at[2]));
        assert!(
            dealt[3] > 0 && dealt[4] > 0,
            "40 hashes all alike: {dealt:?}"
        );
    }

    /// A stalled worker's socket: taken out of the turns and shut down,
    /// what waited on it moves to the socket left; listening again, it is
    /// back in the group, still the same socket, and takes turns again.
    #[test]
    fn a_shut_down_socket_hands_its_queue_on_and_listens_again() {
        let test = "a_shut_down_socket_hands_its_queue_on_and_listens_again";
        if !testable_here(test) {
            return;
        }
        let (mut rotation, kept, stalled, addr) = migrating_pair();
        let both = [(0, kept.as_fd()), (1, stalled.as_fd())];
        rotation.set_rotation(&both, Dealing::Turns).unwrap();
        let mut clients: Vec<TcpStream> =
            (0..10).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let waiting = crate::listen_queue::depth(stalled.as_fd()).unwrap().waiting;
        assert_eq!(waiting, 5);
        rotation
            .set_rotation(&[(0, kept.as_fd())], Dealing::Turns)
            .unwrap();
        crate::listen_queue::requeue_elsewhere(stalled.as_fd(), 64).unwrap();
        assert_eq!(
            crate::listen_queue::depth(stalled.as_fd()).unwrap().waiting,
            0
        );
        assert_eq!(
            crate::listen_queue::depth(kept.as_fd()).unwrap().waiting,
            10
        );
        let accepted = std::iter::from_fn(|| kept.accept().ok()).count();
        assert_eq!(accepted, 10, "every one reached the socket left");
        let dealt = rotation.dealt().unwrap();
        assert_eq!(
            (dealt[0], dealt[1]),
            (5, 5),
            "moved ones are not counted again"
        );
        // Back in the group: dealt to again once it takes turns.
        rotation.set_rotation(&both, Dealing::Turns).unwrap();
        let mut order = Vec::new();
        for _ in 0..4 {
            clients.push(TcpStream::connect(addr).unwrap());
            order.push(landed(&[
                kept.try_clone().unwrap(),
                stalled.try_clone().unwrap(),
            ]));
        }
        assert!(order.contains(&1), "the socket listens again: {order:?}");
    }

    /// A connection from a port steered to a slot lands on that slot's
    /// probe socket, outside the turns; any other takes its turn.
    #[test]
    fn a_probe_from_a_steered_port_reaches_its_slots_socket_alone() {
        let test = "a_probe_from_a_steered_port_reaches_its_slots_socket_alone";
        if !testable_here(test) {
            return;
        }
        let mut rotation = RotationProgram::load().unwrap_or_else(|e| panic!("{e}"));
        let dealt = bind_reuseport("127.0.0.1:0".parse().unwrap());
        let addr = dealt.local_addr().unwrap();
        let starting = bind_reuseport(addr);
        rotation.attach(dealt.as_fd()).unwrap();
        rotation
            .set_rotation(&[(0, dealt.as_fd())], Dealing::Turns)
            .unwrap();
        rotation.offer_probe(1, starting.as_fd()).unwrap();
        let prober = rotation.prober();
        let group = [dealt.try_clone().unwrap(), starting.try_clone().unwrap()];
        let probe = |steer: bool| {
            let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = socket.local_addr().unwrap().port();
            drop(socket);
            if steer {
                prober.steer(port, 1).unwrap();
            }
            let client = nix::sys::socket::socket(
                nix::sys::socket::AddressFamily::Inet,
                nix::sys::socket::SockType::Stream,
                nix::sys::socket::SockFlag::SOCK_CLOEXEC,
                None,
            )
            .unwrap();
            let from = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            nix::sys::socket::bind(
                client.as_raw_fd(),
                &nix::sys::socket::SockaddrStorage::from(from),
            )
            .unwrap();
            nix::sys::socket::connect(
                client.as_raw_fd(),
                &nix::sys::socket::SockaddrStorage::from(addr),
            )
            .unwrap();
            let at = landed(&group);
            prober.unsteer(port).unwrap();
            (client, at)
        };
        let (_a, at) = probe(true);
        assert_eq!(at, 1, "the steered probe reaches the starting socket");
        let (_b, at) = probe(false);
        assert_eq!(at, 0, "an unsteered connection takes its turn");
        assert_eq!(rotation.dealt().unwrap()[0], 1, "the probe is not counted");
        rotation.withdraw_probe(1).unwrap();
    }
}
