//! What the interposed calls do once herd's environment is found: the
//! library's state ([`State`], set once at load) and one function per call.
//!
//! # The captured socket
//! A `bind()` to a served address ([`served::captured_by`]) is not made.
//! Instead the program's socket fd is made another fd for herd's end of
//! the worker's channel (hand-off modes) or for the listening socket herd
//! passed (the OS-scheduled modes, `LISTEN_FDS`), with the program's own
//! blocking and close-on-exec flags. So `poll`, `epoll` and `select` need
//! no help: the channel is readable exactly when a hand-off waits. A
//! prefork child that inherits the fd reads the same channel, and each
//! `recvmsg` takes one whole message, so each `accept` takes the next
//! hand-off.
//!
//! - `listen()` on it succeeds without a system call (the socket is herd's,
//!   already listening with herd's backlog); the first says READY.
//! - `accept`/`accept4` receive a HANDOFF, ACK it, and return its fd with
//!   `SOCK_NONBLOCK`/`SOCK_CLOEXEC` as asked and the client's address;
//!   `EAGAIN` when none waits on a non-blocking socket. In the OS modes
//!   they accept for real and report ACCEPTED.
//! - `close()` of an accepted connection reports CLOSED (least-conn counts
//!   open connections); the channel and inherited sockets are never closed.
//! - `getsockname` answers the address the program asked for;
//!   `setsockopt`, `shutdown` and `getsockopt`'s type questions answer as a
//!   TCP listener would.
//!
//! # Stopping
//! herd's DRAIN arrives on the channel like a hand-off (in the OS modes,
//! where the program never reads the channel, a thread started at the
//! first `listen` reads it). From then on no connection is taken: none
//! comes over the channel, and `accept` on an inherited socket fails with
//! `EAGAIN` (after a 10 ms pause, so a level-triggered loop does not spin)
//! or, blocking, never returns. Without a `stop_signal` (the program has
//! no graceful stop herd knows of, as `http.server`), the process herd
//! started sends itself SIGTERM once nothing is open, so it exits with
//! nothing in progress. A prefork child never does (its parent would
//! respawn it): such servers name their graceful signal in `stop_signal`,
//! which herd sends.

use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::OnceLock;

use herd_protocol::fdpass;
use herd_protocol::wire::{
    PrimaryMessage, ReadyFlags, WorkerMessage, MAX_MESSAGE_LEN, WORKER_MESSAGE_MAX_LEN,
};
use libc::{c_int, c_void, sockaddr, socklen_t};

use crate::served;
use crate::sys::{self, FdTable};

/// What the library found at load; unset means inert (not under herd).
pub struct State {
    /// The worker's channel, as herd passed it (`HERD_CHANNEL_FD`).
    pub channel: RawFd,
    /// The served addresses, in `listen` order.
    pub served: Vec<SocketAddr>,
    /// OS-scheduled modes: the listening socket per served address.
    pub inherited: Option<Vec<RawFd>>,
    /// Per fd: a captured socket's [`Capture`], encoded.
    pub captured: FdTable,
    /// Per fd: an accepted connection's id + 1 (wiped in a forked child).
    pub connections: FdTable,
    /// The process herd started (forked children have other pids).
    pub started: i32,
    /// Once drained with nothing open, SIGTERM to the program
    /// (`HERD_PRELOAD_STOP=self`: it has no `stop_signal` herd sends).
    pub stops_itself: bool,
}

pub static STATE: OnceLock<State> = OnceLock::new();

/// Connections this process accepted and has not closed.
pub static OPEN: AtomicUsize = AtomicUsize::new(0);
/// herd said DRAIN.
static DRAINING: AtomicBool = AtomicBool::new(false);
/// SIGTERM sent to ourselves already.
static STOPPING: AtomicBool = AtomicBool::new(false);
/// READY said already (once per worker: a forked child inherits it).
static READY: AtomicBool = AtomicBool::new(false);
/// The channel and inherited sockets made close-on-exec already.
static SEALED: AtomicBool = AtomicBool::new(false);
/// OS modes: this process's numbering of what it accepted, for ACCEPTED.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A captured socket: which listener, and what to answer `getsockname`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capture {
    pub listener: u16,
    pub asked: SocketAddr,
}

impl Capture {
    /// Packs into a table value (never 0): bits 0..16 listener + 1, 16..24
    /// how `asked` relates to the served address, 32..64 an IPv4 address.
    fn encode(self, served: SocketAddr) -> u64 {
        let listener = u64::from(self.listener) + 1;
        let (kind, ip) = match self.asked {
            a if a.ip() == served.ip() => (0, 0),
            SocketAddr::V4(a) if a.ip().is_unspecified() => (1, 0),
            SocketAddr::V6(a) if a.ip().is_unspecified() => (2, 0),
            SocketAddr::V4(a) => (3, u64::from(u32::from(*a.ip()))),
            // A specific IPv6 address under a served wildcard: answered as the served one.
            SocketAddr::V6(_) => (0, 0),
        };
        listener | (kind << 16) | (ip << 32)
    }

    fn decode(value: u64, served: &[SocketAddr]) -> Option<Capture> {
        let listener = u16::try_from((value & 0xffff).checked_sub(1)?).ok()?;
        let served = *served.get(usize::from(listener))?;
        let port = served.port();
        let asked = match (value >> 16) & 0xff {
            1 => SocketAddr::from(([0, 0, 0, 0], port)),
            2 => SocketAddr::from(([0u16; 8], port)),
            3 => SocketAddr::from((std::net::Ipv4Addr::from((value >> 32) as u32), port)),
            _ => served,
        };
        Some(Capture { listener, asked })
    }
}

fn active() -> Option<&'static State> {
    STATE.get()
}

fn tell(state: &State, message: WorkerMessage) {
    let mut buf = [0u8; WORKER_MESSAGE_MAX_LEN];
    sys::send(state.channel, message.encode(&mut buf));
}

impl State {
    fn capture_of(&self, fd: RawFd) -> Option<Capture> {
        Capture::decode(self.captured.get(fd), &self.served)
    }

    /// Hand-off modes: an fd the program holds for herd's channel, though
    /// not one it captured under that number (a `dup`, or inherited over
    /// `exec`): a Unix SEQPACKET socket that is not listening. `accept` on
    /// such a socket fails anyway, so taking it for the channel breaks
    /// nothing.
    fn is_channel(&self, fd: RawFd) -> bool {
        self.inherited.is_none()
            && sys::int_option(fd, libc::SO_DOMAIN) == Some(libc::AF_UNIX)
            && sys::int_option(fd, libc::SO_TYPE) == Some(libc::SOCK_SEQPACKET)
            && sys::int_option(fd, libc::SO_ACCEPTCONN) == Some(0)
    }

    /// The channel and inherited sockets stay out of whatever the program
    /// `exec`s from now on. Not done at load, so wrappers (`sh -c 'exec
    /// …'`, `env`) pass them on to the program that binds.
    fn seal(&self) {
        if !SEALED.swap(true, Relaxed) {
            sys::set_cloexec(self.channel);
            self.inherited
                .iter()
                .flatten()
                .for_each(|fd| sys::set_cloexec(*fd));
        }
    }

    fn protected(&self, fd: RawFd) -> bool {
        fd == self.channel || self.inherited.as_ref().is_some_and(|fds| fds.contains(&fd))
    }
}

/// `bind(2)`.
///
/// # Safety
/// As `bind(2)`: `addr` valid for `len` bytes.
pub unsafe fn bind(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let Some(state) = active() else {
        // SAFETY: passed on from the caller.
        return unsafe { sys::bind(fd, addr, len) };
    };
    // SAFETY: the program's own arguments, as bind(2) takes them.
    let asked = unsafe { sys::read_address(addr, len) };
    let stream = sys::int_option(fd, libc::SO_TYPE) == Some(libc::SOCK_STREAM);
    let Some(asked) = asked.filter(|_| stream) else {
        // SAFETY: passed on from the caller.
        return unsafe { sys::bind(fd, addr, len) };
    };
    let Some(listener) = served::captured_by(&state.served, asked) else {
        // SAFETY: passed on from the caller.
        let bound = unsafe { sys::bind(fd, addr, len) };
        if bound == 0 {
            tell(
                state,
                WorkerMessage::Bound {
                    listener: None,
                    address: asked,
                },
            );
        }
        return bound;
    };
    let source = match &state.inherited {
        Some(fds) => fds[listener],
        None => state.channel,
    };
    if let Err(errno) = sys::replace(source, fd) {
        return sys::fail(errno);
    }
    state.seal();
    let listener = listener as u16;
    let capture = Capture { listener, asked };
    state
        .captured
        .set(fd, capture.encode(state.served[usize::from(listener)]));
    tell(
        state,
        WorkerMessage::Bound {
            listener: Some(listener),
            address: asked,
        },
    );
    0
}

/// `listen(2)`.
pub fn listen(fd: c_int, backlog: c_int) -> c_int {
    let Some(state) = active().filter(|state| state.capture_of(fd).is_some()) else {
        return sys::listen(fd, backlog);
    };
    if !READY.swap(true, Relaxed) {
        if state.inherited.is_some() {
            watch_channel(state);
        }
        tell(state, WorkerMessage::Ready(ReadyFlags::REPORTS_CLOSED));
    }
    0
}

/// The OS modes: the program accepts from the inherited socket and never
/// reads the channel, so a thread does, for DRAIN. (Without the thread,
/// DRAIN goes unread: herd stops the worker at `shutdown_timeout`.)
fn watch_channel(state: &'static State) {
    let watch = move || {
        // SAFETY: the channel is never closed (`close` protects it).
        let channel = unsafe { BorrowedFd::borrow_raw(state.channel) };
        let mut buf = [0u8; MAX_MESSAGE_LEN];
        loop {
            let mut ready = libc::pollfd {
                fd: state.channel,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd on the stack.
            unsafe { libc::poll(&mut ready, 1, -1) };
            match fdpass::recv_message(channel, &mut buf, true, true) {
                Ok(Some(received)) => {
                    if PrimaryMessage::decode(&buf[..received.len]) == Ok(PrimaryMessage::Drain) {
                        drained(state);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) => {}
                // herd is gone, or the channel broke: nothing more will come.
                Ok(None) | Err(_) => return,
            }
        }
    };
    let _ = std::thread::Builder::new()
        .name("herd-preload".into())
        .spawn(watch);
}

fn drained(state: &State) {
    DRAINING.store(true, Relaxed);
    stop_if_drained(state);
}

/// An `accept` on an inherited socket once drained: nothing more is taken.
fn refuse_while_draining(fd: RawFd) -> c_int {
    if !sys::is_nonblocking(fd) {
        // A blocking accept would have waited; it waits until the program stops.
        loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(10));
    sys::fail(libc::EAGAIN)
}

/// `accept4(2)` (and `accept`, with no flags).
///
/// # Safety
/// As `accept4(2)`: `addr` null or valid for `*len` bytes.
pub unsafe fn accept4(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t, flags: c_int) -> c_int {
    let Some(state) = active() else {
        // SAFETY: passed on from the caller.
        return unsafe { sys::accept4(fd, addr, len, flags) };
    };
    let capture = state.capture_of(fd);
    if state.inherited.is_some() {
        if capture.is_some() && DRAINING.load(Relaxed) {
            return refuse_while_draining(fd);
        }
        // SAFETY: passed on from the caller.
        let accepted = unsafe { sys::accept4(fd, addr, len, flags) };
        if let (Some(capture), true) = (capture, accepted >= 0) {
            let id = NEXT_ID.fetch_add(1, Relaxed);
            track(state, accepted, id);
            tell(
                state,
                WorkerMessage::Accepted {
                    listener: capture.listener,
                    id,
                },
            );
        }
        return accepted;
    }
    if capture.is_none() {
        // SAFETY: passed on from the caller.
        let accepted = unsafe { sys::accept4(fd, addr, len, flags) };
        if accepted >= 0 || sys::errno() != libc::EINVAL || !state.is_channel(fd) {
            return accepted;
        }
    }
    // SAFETY: passed on from the caller.
    unsafe { take_handoff(state, fd, addr, len, flags) }
}

/// Receives the next hand-off on the channel `fd`: the connection's fd,
/// acknowledged; DRAIN and anything not a hand-off are consumed on the way.
///
/// # Safety
/// As [`accept4`].
unsafe fn take_handoff(
    state: &State,
    fd: RawFd,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    let mut buf = [0u8; MAX_MESSAGE_LEN];
    // SAFETY: `fd` is open (the program passed it and it is the channel)
    // for the length of this call.
    let channel = unsafe { BorrowedFd::borrow_raw(fd) };
    loop {
        // Blocking as the program made the socket: the recvmsg waits, or
        // fails with EAGAIN, as its accept would.
        let received =
            match fdpass::recv_message(channel, &mut buf, false, flags & libc::SOCK_CLOEXEC != 0) {
                Ok(Some(received)) => received,
                // herd closed the channel: it is stopping, and so will the worker.
                Ok(None) => return sys::fail(libc::EINVAL),
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => continue,
                Err(e) => return sys::fail(e.raw_os_error().unwrap_or(libc::EIO)),
            };
        match (PrimaryMessage::decode(&buf[..received.len]), received.fd) {
            (Ok(PrimaryMessage::Handoff(handoff)), Some(connection)) => {
                let connection = std::os::fd::IntoRawFd::into_raw_fd(connection);
                sys::set_nonblocking(connection, flags & libc::SOCK_NONBLOCK != 0);
                track(state, connection, handoff.connection_id);
                tell(state, WorkerMessage::Ack(handoff.connection_id));
                // SAFETY: passed on from the caller.
                unsafe { sys::write_address(handoff.peer, addr, len) };
                return connection;
            }
            (Ok(PrimaryMessage::Drain), _) => drained(state),
            // Not a hand-off (its fd, if any, is closed as it drops).
            _ => {}
        }
    }
}

fn track(state: &State, connection: RawFd, id: u64) {
    // An fd past the table cannot be told CLOSED: counted open until the
    // worker goes (documented among the limits).
    if state.connections.set(connection, id + 1) {
        OPEN.fetch_add(1, Relaxed);
    }
}

fn stop_if_drained(state: &State) {
    if state.stops_itself
        && DRAINING.load(Relaxed)
        && OPEN.load(Relaxed) == 0
        && sys::pid() == state.started
        && !STOPPING.swap(true, Relaxed)
    {
        sys::terminate_self();
    }
}

/// `close(2)`.
pub fn close(fd: c_int) -> c_int {
    let Some(state) = active() else {
        return sys::close(fd);
    };
    if state.protected(fd) {
        // A program that closes every fd it did not open (daemons do)
        // must not cut the worker off from herd.
        return 0;
    }
    // Taken before the close: once closed, another thread may get the
    // same number for a new connection.
    let id = state.connections.take(fd);
    state.captured.take(fd);
    let closed = sys::close(fd);
    if id != 0 {
        let _ = OPEN.fetch_update(Relaxed, Relaxed, |open| open.checked_sub(1));
        tell(state, WorkerMessage::Closed(id - 1));
        stop_if_drained(state);
    }
    closed
}

/// `dup2(2)` and `dup3(2)` (`flags` -1: dup2, which allows `from == to`):
/// `to` is closed first, so what the tables said of it no longer holds.
pub fn dup3(from: c_int, to: c_int, flags: c_int) -> c_int {
    let Some(state) = active().filter(|_| from != to) else {
        if flags < 0 {
            // dup2(fd, fd): the fd itself, if it is open.
            return if sys::is_open(from) {
                from
            } else {
                sys::fail(libc::EBADF)
            };
        }
        return sys::dup3(from, to, flags);
    };
    if state.protected(to) {
        // Over the channel or a passed socket: refused, as a full fd
        // table would, rather than cut the worker off.
        return sys::fail(libc::EBUSY);
    }
    let id = state.connections.take(to);
    state.captured.take(to);
    let duplicated = sys::dup3(from, to, flags.max(0));
    if id != 0 {
        let _ = OPEN.fetch_update(Relaxed, Relaxed, |open| open.checked_sub(1));
        tell(state, WorkerMessage::Closed(id - 1));
        stop_if_drained(state);
    }
    // The copy of a captured socket is captured too.
    let capture = state.captured.get(from);
    if duplicated >= 0 && capture != 0 {
        state.captured.set(to, capture);
    }
    duplicated
}

/// `close_range(2)`: closes the range but the channel and the passed
/// sockets, reporting CLOSED for the connections in it, as `close` does
/// one by one. (`CLOSE_RANGE_CLOEXEC` only marks fds: passed through.)
pub fn close_range(first: libc::c_uint, last: libc::c_uint, flags: c_int) -> c_int {
    let Some(state) = active().filter(|_| flags & libc::CLOSE_RANGE_CLOEXEC as c_int == 0) else {
        return sys::close_range(first, last, flags);
    };
    let mut keep: Vec<libc::c_uint> = std::iter::once(state.channel)
        .chain(state.inherited.iter().flatten().copied())
        .filter_map(|fd| libc::c_uint::try_from(fd).ok())
        .filter(|fd| (first..=last).contains(fd))
        .collect();
    keep.sort_unstable();
    // The connections in the range, taken before they close.
    let tracked = (first as usize
        ..=(last as usize).min(state.connections.covers().saturating_sub(1)))
        .filter_map(|fd| {
            let fd = RawFd::try_from(fd).ok()?;
            state.captured.take(fd);
            Some(state.connections.take(fd)).filter(|id| *id != 0)
        })
        .collect::<Vec<u64>>();
    // The range in pieces around what is kept.
    let mut from = Some(first);
    let mut result = 0;
    for kept in keep {
        if let Some(start) = from.filter(|start| kept > *start) {
            result |= sys::close_range(start, kept - 1, flags);
        }
        from = kept.checked_add(1);
    }
    if let Some(start) = from.filter(|start| *start <= last) {
        result |= sys::close_range(start, last, flags);
    }
    for id in tracked {
        let _ = OPEN.fetch_update(Relaxed, Relaxed, |open| open.checked_sub(1));
        tell(state, WorkerMessage::Closed(id - 1));
    }
    stop_if_drained(state);
    result
}

/// `getsockname(2)`.
///
/// # Safety
/// As `getsockname(2)`.
pub unsafe fn getsockname(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    match active().and_then(|state| state.capture_of(fd)) {
        // SAFETY: passed on from the caller.
        Some(capture) => unsafe {
            sys::write_address(capture.asked, addr, len);
            0
        },
        // SAFETY: passed on from the caller.
        None => unsafe { sys::getsockname(fd, addr, len) },
    }
}

/// A captured socket in the hand-off modes is herd's channel, not a TCP
/// socket: options meant for a TCP listener are taken and ignored.
fn is_captured_channel(fd: c_int) -> Option<Capture> {
    active()
        .filter(|state| state.inherited.is_none())
        .and_then(|state| state.capture_of(fd))
}

/// `setsockopt(2)`.
///
/// # Safety
/// As `setsockopt(2)`.
pub unsafe fn setsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    value: *const c_void,
    len: socklen_t,
) -> c_int {
    if is_captured_channel(fd).is_some() {
        return 0;
    }
    // SAFETY: passed on from the caller.
    unsafe { sys::setsockopt(fd, level, name, value, len) }
}

/// `getsockopt(2)`: a captured channel says it is a listening TCP socket
/// of the family the program asked for; other questions read 0.
///
/// # Safety
/// As `getsockopt(2)`.
pub unsafe fn getsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    value: *mut c_void,
    len: *mut socklen_t,
) -> c_int {
    let Some(capture) = is_captured_channel(fd) else {
        // SAFETY: passed on from the caller.
        return unsafe { sys::getsockopt(fd, level, name, value, len) };
    };
    let family = if capture.asked.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let answer: c_int = match (level, name) {
        (libc::SOL_SOCKET, libc::SO_TYPE) => libc::SOCK_STREAM,
        (libc::SOL_SOCKET, libc::SO_DOMAIN) => family,
        (libc::SOL_SOCKET, libc::SO_PROTOCOL) => libc::IPPROTO_TCP,
        (libc::SOL_SOCKET, libc::SO_ACCEPTCONN) => c_int::from(READY.load(Relaxed)),
        // SAFETY: passed on from the caller.
        (libc::SOL_SOCKET, _) => return unsafe { sys::getsockopt(fd, level, name, value, len) },
        _ => 0,
    };
    if value.is_null() || len.is_null() {
        return sys::fail(libc::EFAULT);
    }
    // SAFETY: the caller's buffer, of `*len` bytes; at most that is written.
    unsafe {
        let room = (*len as usize).min(std::mem::size_of::<c_int>());
        std::ptr::copy_nonoverlapping(
            (&answer as *const c_int).cast::<u8>(),
            value.cast::<u8>(),
            room,
        );
        *len = room as socklen_t;
    }
    0
}

/// `shutdown(2)`: never on a captured socket, which is herd's channel or a
/// listener other workers share.
pub fn shutdown(fd: c_int, how: c_int) -> c_int {
    if active().is_some_and(|state| state.capture_of(fd).is_some()) {
        return 0;
    }
    sys::shutdown(fd, how)
}

/// After `fork`, in the child: its connections are its own from now on.
pub extern "C" fn forked_child() {
    OPEN.store(0, Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capture_round_trips_through_its_table_value() {
        let served: Vec<SocketAddr> = ["127.0.0.1:3000", "0.0.0.0:4000", "[::1]:5000"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        for (listener, asked) in [
            (0, "127.0.0.1:3000"),
            (0, "0.0.0.0:3000"),
            (0, "[::]:3000"),
            (1, "127.0.0.5:4000"),
            (1, "0.0.0.0:4000"),
            (2, "[::1]:5000"),
            (2, "[::]:5000"),
        ] {
            let capture = Capture {
                listener,
                asked: asked.parse().unwrap(),
            };
            let value = capture.encode(served[usize::from(listener)]);
            assert_ne!(value, 0);
            assert_eq!(Capture::decode(value, &served), Some(capture), "{asked}");
        }
        assert_eq!(Capture::decode(0, &served), None);
        assert_eq!(Capture::decode(9, &served), None, "no listener 8");
    }
}
