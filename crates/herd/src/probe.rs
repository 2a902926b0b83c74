//! Readiness by probe: `ready = "tcp"` and `ready = "http:/path"`.
//!
//! Owns the attempts that tell a starting worker ready: herd connects to
//! the worker's *own* socket and waits to see it accepted (`tcp`: the
//! server-side socket gets a file, read through `sock_diag`, exactly for
//! that one connection) or answered 2xx (`http`). Every worker of the slot
//! group listens on one address, so the connection is steered there by the
//! rotation program: herd binds the probe's source port first and puts it
//! in the program's `probes` map (`herd_protocol::bpf::Prober`), and the
//! program gives that connection to the slot's probe socket, outside the
//! turns, uncounted. A reload's replacement has sockets of its own
//! (`slot_sockets`), so the probe proves it, not the worker it replaces.
//!
//! Bounds: one attempt at a time per starting worker, each at most
//! [`ATTEMPT_TIMEOUT`], the next [`PROBE_INTERVAL`] later; an HTTP answer is
//! read up to [`MAX_STATUS_LINE`] bytes. The probe ends when the worker is
//! ready, or with the worker (its task is aborted when the process record
//! goes); `ready_timeout` kills a worker no probe found ready. Failures are
//! logged at the 1st, 2nd, 4th, ... attempt (`probe_failed`).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use herd_protocol::bpf::Prober;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::info;

use crate::config::Readiness;
use crate::ids::{SlotIx, WorkerId};
use crate::notify::{Message, Note};
use crate::rate_limit::Occurrences;

/// Between attempts.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// One attempt: connect, then be accepted (or answered) within this.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// An HTTP probe reads at most this much of the answer for its status line.
pub const MAX_STATUS_LINE: usize = 1024;
/// How often `tcp` asks the kernel whether the probe was accepted.
const ACCEPT_POLL: Duration = Duration::from_millis(10);

/// A probe running for one starting worker; dropped, it stops.
#[derive(Debug)]
pub struct Probing(JoinHandle<()>);

impl Drop for Probing {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What one worker's probe needs.
#[derive(Debug, Clone)]
pub struct Target {
    pub worker: WorkerId,
    pub slot: SlotIx,
    /// The listener's address, as bound (an unspecified IP is probed on loopback).
    pub addr: SocketAddr,
    pub prober: Prober,
}

/// Starts probing `target` by `ready`'s way; its READY goes to `notes`, as
/// a `READY=1` on a notify socket would.
pub fn spawn(ready: &Readiness, target: Target, notes: mpsc::Sender<Note>) -> Option<Probing> {
    let http_path = match ready {
        Readiness::Tcp => None,
        Readiness::Http(path) => Some(path.as_str().to_string()),
        _ => return None,
    };
    Some(Probing(tokio::spawn(async move {
        let mut failures = Occurrences::default();
        loop {
            match attempt(&target, http_path.as_deref()).await {
                Ok(()) => {
                    let ready = Note {
                        worker: target.worker,
                        message: Message::Ready,
                    };
                    let _ = notes.send(ready).await;
                    return;
                }
                Err(why) => {
                    if let Some(total) = failures.record() {
                        info!(
                            slot = target.slot.get(),
                            total,
                            event = "probe_failed",
                            "readiness probe of slot {}: {why}",
                            target.slot
                        );
                    }
                }
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    })))
}

/// One probe: connect from a steered port, then wait to be accepted
/// (`http_path` `None`) or answered 2xx.
async fn attempt(target: &Target, http_path: Option<&str>) -> Result<(), String> {
    let addr = probed_addr(target.addr);
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("cannot open a socket: {e}"))?;
    socket
        .bind(SocketAddr::new(addr.ip(), 0))
        .map_err(|e| format!("cannot bind a source port: {e}"))?;
    let from = socket.local_addr().map_err(|e| e.to_string())?;
    target
        .prober
        .steer(from.port(), target.slot.get())
        .map_err(|e| format!("cannot steer the probe: {e}"))?;
    let connected = tokio::time::timeout(ATTEMPT_TIMEOUT, socket.connect(addr)).await;
    // The handshake is done (or given up): the port need not be steered.
    let _ = target.prober.unsteer(from.port());
    let stream = match connected {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(format!("connect to {addr}: {e}")),
        Err(_) => {
            return Err(format!(
                "connect to {addr}: no answer in {ATTEMPT_TIMEOUT:?}"
            ))
        }
    };
    let answered = async {
        match http_path {
            // The stream stays open while the kernel is asked.
            None => accepted(addr, from, &stream).await,
            Some(path) => answered_2xx(stream, addr, path).await,
        }
    };
    match tokio::time::timeout(ATTEMPT_TIMEOUT, answered).await {
        Ok(result) => result,
        Err(_) => Err(match http_path {
            None => format!("connected, not accepted within {ATTEMPT_TIMEOUT:?}"),
            Some(path) => format!("GET {path}: no answer within {ATTEMPT_TIMEOUT:?}"),
        }),
    }
}

/// The address a probe connects to: the listener's, on loopback when it
/// listens on every address.
fn probed_addr(listener: SocketAddr) -> SocketAddr {
    let ip = match listener.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listener.port())
}

/// Waits until the server side of `local` <- `peer` has been accepted.
async fn accepted(local: SocketAddr, peer: SocketAddr, _open: &TcpStream) -> Result<(), String> {
    loop {
        match sock_diag::accepted(local, peer) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => return Err(format!("cannot ask the kernel about the probe: {e}")),
        }
        tokio::time::sleep(ACCEPT_POLL).await;
    }
}

/// Sends `GET path` and reads the status line: Ok on 2xx.
async fn answered_2xx(mut stream: TcpStream, addr: SocketAddr, path: &str) -> Result<(), String> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: herd-probe\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("GET {path}: {e}"))?;
    let mut answer = Vec::with_capacity(128);
    let mut buf = [0u8; 256];
    while !answer.contains(&b'\n') && answer.len() < MAX_STATUS_LINE {
        let read = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        if read == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..read]);
    }
    match status_of(&answer) {
        Some(status) if (200..300).contains(&status) => Ok(()),
        Some(status) => Err(format!("GET {path} answered {status}")),
        None => Err(format!("GET {path}: no HTTP status line in the answer")),
    }
}

/// The status code of an HTTP/1.x status line at the start of `answer`.
fn status_of(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_ascii_whitespace();
    if !words.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = words.next()?;
    (code.len() == 3).then(|| code.parse().ok()).flatten()
}

/// The one `sock_diag(7)` question herd asks: has the server side of a
/// connection been accepted? A connection waiting in the accept queue is
/// a socket without a file (inode 0); `accept` gives it one.
mod sock_diag {
    use super::*;
    use nix::sys::socket::{
        recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
        SockType,
    };

    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    const NLMSG_ERROR: u16 = 2;
    /// nlmsghdr, inet_diag_req_v2's head, inet_diag_sockid.
    const REQUEST_LEN: usize = 16 + 8 + 48;
    /// Where inet_diag_msg's `idiag_inode` and its socket's remote port
    /// (`id.idiag_dport`) are in an answer.
    const INODE_AT: usize = 16 + 68;
    const DPORT_AT: usize = 16 + 4 + 2;

    /// Whether the socket whose local address is `local` and remote `peer`
    /// has been accepted; false while it waits (or is not there yet).
    pub fn accepted(local: SocketAddr, peer: SocketAddr) -> io::Result<bool> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )?;
        sendto(
            fd.as_raw_fd(),
            &request(local, peer),
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )?;
        let mut answer = [0u8; 512];
        let len = recv(fd.as_raw_fd(), &mut answer, MsgFlags::empty())?;
        inode_of(&answer[..len], peer.port()).map(|inode| inode != 0)
    }

    /// An exact lookup (no dump) of one TCP socket by its four-tuple.
    pub(super) fn request(local: SocketAddr, peer: SocketAddr) -> [u8; REQUEST_LEN] {
        let mut req = [0u8; REQUEST_LEN];
        req[0..4].copy_from_slice(&(REQUEST_LEN as u32).to_ne_bytes());
        req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        req[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        let family = if local.is_ipv4() {
            nix::libc::AF_INET
        } else {
            nix::libc::AF_INET6
        };
        req[16] = family as u8;
        req[17] = nix::libc::IPPROTO_TCP as u8;
        req[20..24].copy_from_slice(&u32::MAX.to_ne_bytes()); // every state
        let id = &mut req[24..];
        id[0..2].copy_from_slice(&local.port().to_be_bytes());
        id[2..4].copy_from_slice(&peer.port().to_be_bytes());
        put_ip(&mut id[4..20], local.ip());
        put_ip(&mut id[20..36], peer.ip());
        // No cookie: INET_DIAG_NOCOOKIE.
        id[40..48].fill(0xff);
        req
    }

    fn put_ip(into: &mut [u8], ip: IpAddr) {
        match ip {
            IpAddr::V4(ip) => into[..4].copy_from_slice(&ip.octets()),
            IpAddr::V6(ip) => into.copy_from_slice(&ip.octets()),
        }
    }

    /// The inode in an answer; 0 when the kernel found no such socket. A
    /// lookup that finds no connection finds the listener: its remote port
    /// (0) is not `peer_port`, so that is none too.
    pub(super) fn inode_of(answer: &[u8], peer_port: u16) -> io::Result<u32> {
        let short = || io::Error::new(io::ErrorKind::InvalidData, "a short sock_diag answer");
        let kind = u16::from_ne_bytes(answer.get(4..6).ok_or_else(short)?.try_into().unwrap());
        if kind == NLMSG_ERROR {
            let errno =
                i32::from_ne_bytes(answer.get(16..20).ok_or_else(short)?.try_into().unwrap());
            return match -errno {
                nix::libc::ENOENT => Ok(0),
                errno => Err(io::Error::from_raw_os_error(errno)),
            };
        }
        let inode = answer.get(INODE_AT..INODE_AT + 4).ok_or_else(short)?;
        let remote_port = u16::from_be_bytes(answer[DPORT_AT..DPORT_AT + 2].try_into().unwrap());
        if remote_port != peer_port {
            return Ok(0);
        }
        Ok(u32::from_ne_bytes(inode.try_into().unwrap()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn a_status_line_is_read_strictly() {
        assert_eq!(status_of(b"HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(
            status_of(b"HTTP/1.0 503 Busy\r\nRetry-After: 1\r\n"),
            Some(503)
        );
        assert_eq!(status_of(b"HTTP/1.1 200"), Some(200));
        assert_eq!(status_of(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_of(b"HTTP/1.1 2000 OK\r\n"), None);
        assert_eq!(status_of(b"HTTP/1.1 abc OK\r\n"), None);
        assert_eq!(status_of(b""), None);
    }

    #[test]
    fn an_unspecified_listener_is_probed_on_loopback() {
        assert_eq!(
            probed_addr("0.0.0.0:80".parse().unwrap()),
            "127.0.0.1:80".parse().unwrap()
        );
        assert_eq!(
            probed_addr("[::]:80".parse().unwrap()),
            "[::1]:80".parse().unwrap()
        );
        assert_eq!(
            probed_addr("10.1.2.3:80".parse().unwrap()),
            "10.1.2.3:80".parse().unwrap()
        );
    }

    /// The kernel says a queued connection is not accepted, and is once
    /// `accept` took it; a connection that is not there reads as not.
    #[test]
    fn sock_diag_tells_a_queued_connection_from_an_accepted_one() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = TcpListener::bind(bind) else {
                continue; // no IPv6 here
            };
            let local = listener.local_addr().unwrap();
            let client = std::net::TcpStream::connect(local).unwrap();
            let peer = client.local_addr().unwrap();
            assert!(!sock_diag::accepted(local, peer).unwrap(), "{bind}: queued");
            let (_server, _) = listener.accept().unwrap();
            assert!(
                sock_diag::accepted(local, peer).unwrap(),
                "{bind}: accepted"
            );
            let elsewhere = SocketAddr::new(peer.ip(), 1);
            assert!(!sock_diag::accepted(local, elsewhere).unwrap());
        }
    }

    #[test]
    fn a_short_or_failed_answer_is_an_error_or_absent() {
        assert!(sock_diag::inode_of(&[0; 8], 1).is_err());
        let mut enoent = [0u8; 20];
        enoent[4..6].copy_from_slice(&2u16.to_ne_bytes());
        enoent[16..20].copy_from_slice(&(-nix::libc::ENOENT).to_ne_bytes());
        assert_eq!(sock_diag::inode_of(&enoent, 1).unwrap(), 0);
        enoent[16..20].copy_from_slice(&(-nix::libc::EPERM).to_ne_bytes());
        assert!(sock_diag::inode_of(&enoent, 1).is_err());
    }
}
