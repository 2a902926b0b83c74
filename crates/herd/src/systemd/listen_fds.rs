//! Socket activation of herd itself (`sd_listen_fds(3)`).
//!
//! Owns taking the listening sockets systemd (a `herd.socket` unit, or
//! `systemd-socket-activate`) passed herd as fds 3, 4, … when
//! `LISTEN_PID` is herd's pid. `listen` in the config stays the source of
//! truth: each inherited socket is matched to a `listen` entry by the
//! address it is bound to (`getsockname`), and a socket on an address
//! `listen` does not list, or a `listen` entry no socket stands for, stops
//! herd with an error naming `listen`. The point of inheriting is that the
//! socket unit keeps the socket and its accept queue across a restart of
//! herd, so connections wait rather than being refused.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd, RawFd};

use herd_protocol::env::{LISTEN_FDNAMES_ENV, LISTEN_FDS_ENV, LISTEN_PID_ENV};
use herd_protocol::fdpass::{self, FIRST_INHERITED_FD};
use nix::sys::socket::{self, sockopt, SockType, SockaddrLike, SockaddrStorage};

use crate::ids::ListenerIx;
use crate::listener::BoundListener;

/// Why the inherited sockets cannot be herd's listeners.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("{LISTEN_FDS_ENV}={0:?} is not a count of sockets")]
    BadCount(String),
    #[error("fd {fd} passed in {LISTEN_FDS_ENV} is unusable: {reason}")]
    Unusable { fd: RawFd, reason: String },
    #[error(
        "`listen` lists {addr}, but no socket systemd passed is bound to it (passed: {passed})"
    )]
    Missing { addr: SocketAddr, passed: String },
    #[error("`listen` does not list {addr}, which systemd passed as fd {fd} ({name}); list it, or remove it from the socket unit")]
    Extra {
        addr: SocketAddr,
        fd: RawFd,
        name: String,
    },
    #[error("{0}")]
    Mode(String),
}

/// One socket systemd passed herd.
#[derive(Debug)]
pub struct Inherited {
    pub fd: RawFd,
    /// Its name in `LISTEN_FDNAMES` (the socket unit's `FileDescriptorName=`).
    pub name: String,
    pub local: SocketAddr,
    /// An IPv6 socket that takes IPv4 clients too (systemd's default
    /// `BindIPv6Only=both` for `ListenStream=PORT`).
    pub dual_stack: bool,
    pub socket: TcpListener,
}

/// The sockets passed to this process, if `LISTEN_PID` is its pid; `None`
/// when herd was not socket-activated (it then binds `listen` itself).
pub fn inherited() -> Result<Option<Vec<Inherited>>, ActivationError> {
    let ours =
        std::env::var(LISTEN_PID_ENV).is_ok_and(|pid| pid.trim() == std::process::id().to_string());
    if !ours {
        return Ok(None);
    }
    let count = std::env::var(LISTEN_FDS_ENV).unwrap_or_default();
    let count: usize = count
        .trim()
        .parse()
        .map_err(|_| ActivationError::BadCount(count.clone()))?;
    let names = std::env::var(LISTEN_FDNAMES_ENV).unwrap_or_default();
    let mut names = names.split(':').map(str::to_string);
    (0..count)
        .map(|i| {
            let fd = FIRST_INHERITED_FD + i as RawFd;
            let name = names.next().filter(|n| !n.is_empty());
            adopt(fd, name.unwrap_or_else(|| "unnamed".into()))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Takes fd `fd`, which must be a listening TCP socket, as herd's own
/// listeners are: close-on-exec and non-blocking.
fn adopt(fd: RawFd, name: String) -> Result<Inherited, ActivationError> {
    let unusable = |reason: String| ActivationError::Unusable { fd, reason };
    let owned: OwnedFd = fdpass::adopt_inherited_fd(fd).map_err(|e| unusable(e.to_string()))?;
    let errno = |e: nix::Error| unusable(e.desc().to_lowercase());
    if socket::getsockopt(&owned, sockopt::SockType).map_err(errno)? != SockType::Stream {
        return Err(unusable("not a stream socket".into()));
    }
    if !socket::getsockopt(&owned, sockopt::AcceptConn).map_err(errno)? {
        return Err(unusable("not listening".into()));
    }
    let addr: SockaddrStorage =
        socket::getsockname(std::os::fd::AsRawFd::as_raw_fd(&owned)).map_err(errno)?;
    let local = if let Some(v4) = addr.as_sockaddr_in() {
        SocketAddr::from(*v4)
    } else if let Some(v6) = addr.as_sockaddr_in6() {
        SocketAddr::from(*v6)
    } else {
        return Err(unusable(format!(
            "not a TCP socket (address family {:?})",
            addr.family()
        )));
    };
    let dual_stack =
        local.is_ipv6() && !socket::getsockopt(&owned, sockopt::Ipv6V6Only).map_err(errno)?;
    fdpass::set_nonblocking(owned.as_fd(), true).map_err(|e| unusable(e.to_string()))?;
    Ok(Inherited {
        fd,
        name,
        local,
        dual_stack,
        socket: TcpListener::from(owned),
    })
}

/// Whether `socket` stands for the configured `wanted`: the same address,
/// or for a wildcard `0.0.0.0:P`, a dual-stack `[::]:P` (what
/// `ListenStream=P` binds), which takes the same IPv4 clients and more.
fn stands_for(socket: &Inherited, wanted: SocketAddr) -> bool {
    if socket.local == wanted {
        return true;
    }
    let any_v4 = wanted.is_ipv4() && wanted.ip().is_unspecified();
    any_v4
        && socket.dual_stack
        && socket.local.ip().is_unspecified()
        && socket.local.port() == wanted.port()
}

/// Puts the inherited sockets in `listen` order (each with its fd and
/// name, for the log), refusing a `listen`
/// entry without a socket and a socket without a `listen` entry.
pub fn match_listen(
    listen: &[SocketAddr],
    mut inherited: Vec<Inherited>,
) -> Result<Vec<(BoundListener, RawFd, String)>, ActivationError> {
    // Said whole in an error: which sockets there were, before matching.
    let list = inherited_list(&inherited);
    let passed = || match list.is_empty() {
        true => "none".to_string(),
        false => list.join(", "),
    };
    let mut bound = Vec::with_capacity(listen.len());
    for (index, &addr) in listen.iter().enumerate() {
        let Some(at) = inherited.iter().position(|s| stands_for(s, addr)) else {
            return Err(ActivationError::Missing {
                addr,
                passed: passed(),
            });
        };
        let socket = inherited.remove(at);
        let listener = BoundListener {
            index: ListenerIx::at(index),
            requested: addr,
            local: socket.local,
            socket: socket.socket,
        };
        bound.push((listener, socket.fd, socket.name));
    }
    if let Some(extra) = inherited.into_iter().next() {
        return Err(ActivationError::Extra {
            addr: extra.local,
            fd: extra.fd,
            name: extra.name,
        });
    }
    Ok(bound)
}

fn inherited_list(inherited: &[Inherited]) -> Vec<String> {
    inherited
        .iter()
        .map(|s| format!("{} as fd {} ({})", s.local, s.fd, s.name))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn inherited(addr: &str) -> Inherited {
        let socket = std::net::TcpListener::bind(addr).unwrap();
        Inherited {
            fd: socket.as_raw_fd(),
            name: "herd.socket".into(),
            local: socket.local_addr().unwrap(),
            dual_stack: false,
            socket,
        }
    }

    #[test]
    fn sockets_are_put_in_listen_order() {
        let (a, b) = (inherited("127.0.0.1:0"), inherited("127.0.0.1:0"));
        let (a_addr, b_addr) = (a.local, b.local);
        let bound = match_listen(&[b_addr, a_addr], vec![a, b]).unwrap();
        assert_eq!(bound[0].0.local, b_addr);
        assert_eq!(bound[0].0.index, ListenerIx(0));
        assert_eq!(bound[1].0.local, a_addr);
    }

    #[test]
    fn a_missing_or_extra_socket_is_refused_by_name() {
        let a = inherited("127.0.0.1:0");
        let elsewhere: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let error = match_listen(&[elsewhere], vec![a]).unwrap_err().to_string();
        assert!(
            error.starts_with("`listen` lists 127.0.0.1:1, but no socket"),
            "{error}"
        );
        let b = inherited("127.0.0.1:0");
        let error = match_listen(&[], vec![b]).unwrap_err().to_string();
        assert!(
            error.starts_with("`listen` does not list 127.0.0.1:"),
            "{error}"
        );
    }

    #[test]
    fn a_dual_stack_wildcard_stands_for_ipv4_any() {
        let Ok(socket) = std::net::TcpListener::bind("[::]:0") else {
            return; // no IPv6 here
        };
        let port = socket.local_addr().unwrap().port();
        let dual = Inherited {
            fd: socket.as_raw_fd(),
            name: "x".into(),
            local: socket.local_addr().unwrap(),
            dual_stack: true,
            socket,
        };
        assert!(stands_for(&dual, SocketAddr::from(([0, 0, 0, 0], port))));
        assert!(!stands_for(&dual, SocketAddr::from(([127, 0, 0, 1], port))));
    }
}
