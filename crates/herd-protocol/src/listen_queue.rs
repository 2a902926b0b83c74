//! A listening socket's accept queue, as the kernel counts it, and how to
//! empty it into the other sockets of its SO_REUSEPORT group.
//!
//! Owns two system calls on a listening TCP socket that any holder of it
//! may make, whoever else holds it too:
//! - [`depth`]: `getsockopt(TCP_INFO)`, which for a socket in LISTEN state
//!   reports the connections waiting in its accept queue (`tcpi_unacked`)
//!   and the queue's bound (`tcpi_sacked`).
//! - [`requeue_elsewhere`]: `shutdown` then `listen` again. Shutting a
//!   listener down makes the kernel (Linux 5.14, with a migrating
//!   SK_REUSEPORT program attached, or `net.ipv4.tcp_migrate_req = 1`)
//!   move every connection queued on it to another socket of its group;
//!   listening again puts the same socket, still held by whoever held it,
//!   back in the group (the kernel's `reuseport_resurrect`). Without
//!   migration the kernel resets those connections instead, so callers
//!   check first.
//!
//! Why herd needs it: the worker that holds a slot's socket may be stalled,
//! its queue growing while the other workers idle. herd cannot take the fd
//! from it, but it holds a copy of the same socket, and both calls act on
//! the socket, not on the fd.

#![allow(unsafe_code)]

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::libc;

/// `TCP_LISTEN` in `<netinet/tcp.h>`'s state numbering (libc lacks it).
const TCP_LISTEN: u8 = 10;

/// A listening socket's accept queue right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueDepth {
    /// Connections established and waiting for `accept`.
    pub waiting: u32,
    /// The most it holds (the `listen` backlog, as the kernel capped it).
    pub bound: u32,
}

/// How many connections wait in `listener`'s accept queue.
pub fn depth(listener: BorrowedFd<'_>) -> io::Result<QueueDepth> {
    // SAFETY: an all-zero tcp_info is a valid value of the plain C struct.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, a live
    // local of that size, and stores the length it wrote in `len`.
    let rc = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if info.tcpi_state != TCP_LISTEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the socket is not listening",
        ));
    }
    Ok(QueueDepth {
        waiting: info.tcpi_unacked,
        bound: info.tcpi_sacked,
    })
}

/// Makes a socket that stopped listening (someone holding it shut it
/// down) listen again with `backlog`: back in its group, same socket.
pub fn listen_again(listener: BorrowedFd<'_>, backlog: u32) -> io::Result<()> {
    use nix::sys::socket::{listen, Backlog};
    let backlog = Backlog::new(backlog.min(i32::MAX as u32) as i32).unwrap_or(Backlog::MAXCONN);
    listen(&listener, backlog)?;
    Ok(())
}

/// Moves what waits on `listener` to the other sockets of its group, and
/// makes it listen again with `backlog`. Only where the group migrates
/// (see the module docs): elsewhere the kernel resets those connections.
pub fn requeue_elsewhere(listener: BorrowedFd<'_>, backlog: u32) -> io::Result<()> {
    use nix::sys::socket::{shutdown, Shutdown};
    shutdown(listener.as_raw_fd(), Shutdown::Both)?;
    listen_again(listener, backlog)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    #[test]
    fn the_depth_counts_what_waits_for_accept() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let empty = depth(listener.as_fd()).unwrap();
        assert_eq!(empty.waiting, 0);
        assert!(empty.bound > 0);
        let _clients: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
        // The handshake completes in the kernel before connect returns.
        assert_eq!(depth(listener.as_fd()).unwrap().waiting, 3);
        listener.accept().unwrap();
        assert_eq!(depth(listener.as_fd()).unwrap().waiting, 2);
    }

    #[test]
    fn a_socket_that_is_not_listening_has_no_queue() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert!(depth(client.as_fd()).is_err());
    }
}
