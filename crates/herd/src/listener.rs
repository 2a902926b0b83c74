//! Listening sockets.
//!
//! Owns binding the configured addresses, before any worker starts, so that a
//! busy port or an address this host does not have stops herd with a clear
//! message instead of a half-started fleet.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;

use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage,
};

use crate::config::MAX_LISTENERS;
use crate::ids::ListenerIx;

// Every listener's index fits in a HANDOFF message (a u16).
const _: () = assert!(MAX_LISTENERS <= u16::MAX as usize + 1);

/// A bound, listening, non-blocking socket.
#[derive(Debug)]
pub struct BoundListener {
    /// Position in the configured list; workers see it in each hand-off.
    pub index: ListenerIx,
    /// The address as configured (port may be 0).
    pub requested: SocketAddr,
    /// The address actually bound (port 0 resolved).
    pub local: SocketAddr,
    pub socket: TcpListener,
}

/// How a listening socket is bound, besides its address and backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindOptions {
    /// SO_REUSEPORT: the socket starts a group on its address that herd's
    /// own sockets can join (kernel rotation), on an address proven free
    /// first (see `start_group`).
    pub reuse_port: bool,
    /// IPV6_V6ONLY, for an IPv6 address: `true` lets `[::]:80` and
    /// `0.0.0.0:80` be listed side by side, as nginx does; `false` takes
    /// IPv4 clients too, as Node binds `[::]` when an app listens on no
    /// particular address (one socket for both families).
    pub v6_only: bool,
}

impl BindOptions {
    /// How herd binds a configured address: no group, IPv6 addresses IPv6 only.
    pub const PLAIN: BindOptions = BindOptions {
        reuse_port: false,
        v6_only: true,
    };
}

/// Why a listener could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {reason}")]
pub struct ListenError {
    pub addr: SocketAddr,
    pub reason: String,
    #[source]
    pub source: nix::Error,
}

/// Binds every address in order, each with `options` (see [`bind_with`]);
/// the first failure aborts (and closes the sockets already bound).
pub fn bind_all(
    addrs: &[SocketAddr],
    backlog: u32,
    options: BindOptions,
) -> Result<Vec<BoundListener>, ListenError> {
    addrs
        .iter()
        .enumerate()
        .map(|(index, &addr)| {
            let socket = bind_with(addr, backlog, options)?;
            let local = socket.local_addr().map_err(|e| ListenError {
                addr,
                reason: e.to_string(),
                source: nix::Error::last(),
            })?;
            Ok(BoundListener {
                index: ListenerIx::at(index),
                requested: addr,
                local,
                socket,
            })
        })
        .collect()
}

/// Like [`bind`], with `options`: an IPv6 socket also takes IPv4
/// connections unless `v6_only`; with `reuse_port` the socket starts a
/// SO_REUSEPORT group (see [`bind_group_member`]).
pub fn bind_with(
    addr: SocketAddr,
    backlog: u32,
    options: BindOptions,
) -> Result<TcpListener, ListenError> {
    if options.reuse_port {
        start_group(addr, backlog, options.v6_only)
    } else {
        open(addr, backlog, options)
    }
}

/// Starts a SO_REUSEPORT group on `addr` that no one else is in. A socket
/// with SO_REUSEPORT may join any group of the same user on its address,
/// so binding one straight away would put herd into another program's
/// group (a second herd on the port of a first would take its traffic, and
/// its eBPF program the first's place). A plain bind first proves the
/// address free, and resolves port 0; it is closed and the group bound on
/// the same address at once (the gap is a few system calls, and a
/// stranger that took the port in it makes the group's bind fail, plainly).
fn start_group(addr: SocketAddr, backlog: u32, v6_only: bool) -> Result<TcpListener, ListenError> {
    let probe = open(
        addr,
        backlog,
        BindOptions {
            reuse_port: false,
            v6_only,
        },
    )?;
    let free = probe.local_addr().map_err(|e| ListenError {
        addr,
        reason: e.to_string(),
        source: nix::Error::last(),
    })?;
    drop(probe);
    bind_group_member(free, backlog, v6_only)
}

/// One more socket in the SO_REUSEPORT group on `addr`, which must have
/// been bound with the same `v6_only` (the kernel groups only alike sockets).
pub fn bind_group_member(
    addr: SocketAddr,
    backlog: u32,
    v6_only: bool,
) -> Result<TcpListener, ListenError> {
    let options = BindOptions {
        reuse_port: true,
        v6_only,
    };
    open(addr, backlog, options)
}

/// Like [`bind`], plus SO_REUSEPORT: one more socket in `addr`'s group, with
/// its own accept queue; the kernel spreads new connections over the group.
/// Only sockets of the same user can join, and only if every member set it.
pub fn bind_reuseport(addr: SocketAddr, backlog: u32) -> Result<TcpListener, ListenError> {
    bind_group_member(addr, backlog, BindOptions::PLAIN.v6_only)
}

/// Opens one listening socket: SO_REUSEADDR (so a restart of herd is not
/// refused while old connections sit in TIME_WAIT), IPV6_V6ONLY for IPv6
/// addresses unless `v6_only` is off (so `[::]:80` and `0.0.0.0:80` can be
/// listed side by side, as nginx does), close-on-exec and non-blocking.
/// The options are taken as they are: here `reuse_port` only sets
/// SO_REUSEPORT (joining whatever group there is).
fn open(addr: SocketAddr, backlog: u32, options: BindOptions) -> Result<TcpListener, ListenError> {
    let fail = |source: nix::Error| ListenError {
        addr,
        reason: explain(source),
        source,
    };
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket::socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(fail)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(fail)?;
    if options.reuse_port {
        socket::setsockopt(&fd, sockopt::ReusePort, &true).map_err(fail)?;
    }
    if addr.is_ipv6() {
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &options.v6_only).map_err(fail)?;
    }
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(fail)?;
    let backlog = Backlog::new(backlog as i32).map_err(fail)?;
    socket::listen(&fd, backlog).map_err(fail)?;
    Ok(TcpListener::from(fd))
}

fn explain(error: nix::Error) -> String {
    use nix::errno::Errno;
    match error {
        Errno::EADDRINUSE => {
            "address already in use (is another server running on this port?)".into()
        }
        Errno::EADDRNOTAVAIL => "this host has no such address".into(),
        Errno::EACCES => {
            "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)".into()
        }
        Errno::EAFNOSUPPORT => "address family not supported on this host".into(),
        other => other.desc().to_lowercase(),
    }
}

/// Clears O_NONBLOCK on a socket no worker holds yet: the one time herd
/// sets a worker socket's flags (see the module docs for why only then).
pub fn make_blocking(socket: &TcpListener) -> Result<(), ListenError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_is_resolved() {
        let listeners =
            bind_all(&["127.0.0.1:0".parse().unwrap()], 16, BindOptions::PLAIN).unwrap();
        assert_eq!(listeners[0].index, ListenerIx(0));
        assert_ne!(listeners[0].local.port(), 0);
    }

    #[test]
    fn a_busy_port_is_a_clear_error() {
        let first = open("127.0.0.1:0".parse().unwrap(), 16, BindOptions::PLAIN).unwrap();
        let taken = first.local_addr().unwrap();
        let error = open(taken, 16, BindOptions::PLAIN).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("cannot listen on {taken}: address already in use (is another server running on this port?)")
        );
    }

    #[test]
    fn reuseport_sockets_share_a_port_and_refuse_strangers() {
        let first = bind_reuseport("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = first.local_addr().unwrap();
        let second = bind_reuseport(addr, 16).unwrap();
        assert_eq!(second.local_addr().unwrap(), addr);
        // A plain socket cannot slip into the group (nor the group into a plain port).
        assert!(open(addr, 16, BindOptions::PLAIN).is_err());
        let plain = open("127.0.0.1:0".parse().unwrap(), 16, BindOptions::PLAIN).unwrap();
        assert!(bind_reuseport(plain.local_addr().unwrap(), 16).is_err());
    }

    #[test]
    fn a_group_starts_only_on_a_free_address() {
        let group = BindOptions {
            reuse_port: true,
            v6_only: true,
        };
        let first = bind_with("127.0.0.1:0".parse().unwrap(), 16, group).unwrap();
        let addr = first.local_addr().unwrap();
        // Another group on the same address (another herd) is refused...
        let error = bind_with(addr, 16, group).unwrap_err();
        assert_eq!(error.source, nix::Error::EADDRINUSE);
        assert!(bind_all(&[addr], 16, group).is_err());
        // ...while herd's own sockets still join its group.
        assert!(bind_group_member(addr, 16, true).is_ok());
    }

    #[test]
    fn a_dual_stack_socket_takes_ipv4_clients() {
        let dual_stack = BindOptions {
            reuse_port: false,
            v6_only: false,
        };
        let Ok(socket) = bind_with("[::]:0".parse().unwrap(), 16, dual_stack) else {
            return; // no IPv6 on this host: Node falls back to 0.0.0.0 too
        };
        let port = socket.local_addr().unwrap().port();
        std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    }

    #[test]
    fn an_address_this_host_lacks_is_a_clear_error() {
        let error = open("192.0.2.1:0".parse().unwrap(), 16, BindOptions::PLAIN).unwrap_err();
        assert!(
            error.to_string().ends_with("this host has no such address"),
            "{error}"
        );
    }
}
