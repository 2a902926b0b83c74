//! The `sd_notify(3)` client: herd's own datagrams to the service manager.
//!
//! Owns the socket herd speaks to `$NOTIFY_SOCKET` on (a path, or `@name`
//! for an abstract address, as systemd sets it). Every send is
//! non-blocking: herd's main loop must never wait on systemd, so a full or
//! absent socket loses that one message, and the failure is logged at the
//! 1st, 2nd, 4th, ... time rather than on every attempt.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tracing::warn;

use crate::rate_limit::Occurrences;

/// Where `sd_notify` clients send what they say.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// A datagram longer than this is not sent whole: systemd reads at most a
/// page-ish buffer per message, and a `STATUS=` line is for humans.
pub const MAX_MESSAGE: usize = 4096;

/// Why `$NOTIFY_SOCKET` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET={0:?} is neither a path nor an abstract @name")]
    Unsupported(String),
    #[error("NOTIFY_SOCKET={target:?}: {source}")]
    Socket {
        target: String,
        #[source]
        source: io::Error,
    },
}

/// herd's end of `$NOTIFY_SOCKET`; cheap to clone (a reload's outcome is
/// told from the task that waits for it).
#[derive(Debug, Clone)]
pub struct Notifier {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    socket: UnixDatagram,
    addr: SocketAddr,
    target: String,
    failures: Mutex<Occurrences>,
    /// `STOPPING=1` was sent: a reload's late `READY=1` must not follow.
    stopping: AtomicBool,
}

impl Notifier {
    /// herd's own `$NOTIFY_SOCKET`, if systemd (or a test) set one. It is
    /// left in herd's environment: process.rs never passes it to workers.
    pub fn from_env() -> Result<Option<Notifier>, NotifyError> {
        match std::env::var(NOTIFY_SOCKET_ENV) {
            Ok(target) if !target.is_empty() => Notifier::to(&target).map(Some),
            _ => Ok(None),
        }
    }

    /// A client for `target`: `/path` or `@abstract`.
    pub fn to(target: &str) -> Result<Notifier, NotifyError> {
        let failed = |source| NotifyError::Socket {
            target: target.to_string(),
            source,
        };
        let addr = if let Some(name) = target.strip_prefix('@') {
            SocketAddr::from_abstract_name(name.as_bytes()).map_err(failed)?
        } else if target.starts_with('/') {
            SocketAddr::from_pathname(target).map_err(failed)?
        } else {
            return Err(NotifyError::Unsupported(target.to_string()));
        };
        // std opens it SOCK_CLOEXEC: no worker inherits herd's end.
        let socket = UnixDatagram::unbound().map_err(failed)?;
        socket.set_nonblocking(true).map_err(failed)?;
        Ok(Notifier {
            inner: Arc::new(Inner {
                socket,
                addr,
                target: target.to_string(),
                failures: Mutex::new(Occurrences::default()),
                stopping: AtomicBool::new(false),
            }),
        })
    }

    /// Sends `STOPPING=1` (with `status`); from then on [`Notifier::ready`] is dropped.
    pub fn stopping(&self, status: &str) {
        self.inner.stopping.store(true, Ordering::Relaxed);
        self.send(&format!("STOPPING=1\nSTATUS={status}"));
    }

    /// Sends `READY=1` with `status`, unless herd is stopping.
    pub fn ready(&self, status: &str) {
        if !self.inner.stopping.load(Ordering::Relaxed) {
            self.send(&format!("READY=1\nSTATUS={status}"));
        }
    }

    /// Sends `message` (newline-separated `KEY=VALUE` lines) now or never.
    pub fn send(&self, message: &str) {
        let bytes = &message.as_bytes()[..message.len().min(MAX_MESSAGE)];
        let inner = &self.inner;
        if let Err(e) = inner.socket.send_to_addr(bytes, &inner.addr) {
            let total = inner.failures.lock().map(|mut f| f.record()).ok().flatten();
            if let Some(total) = total {
                warn!(
                    total,
                    target = %inner.target,
                    event = "systemd_notify_failed",
                    "cannot notify systemd on {} ({e}); the message is lost",
                    inner.target
                );
            }
        }
    }
}

/// `MONOTONIC_USEC=`'s value: CLOCK_MONOTONIC in microseconds, which
/// systemd compares with its own to order a reload's messages.
pub fn monotonic_usec() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(now) => now.tv_sec() as u64 * 1_000_000 + now.tv_nsec() as u64 / 1_000,
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_socket_hears_every_message() {
        let dir = std::env::temp_dir().join(format!("herd-sdnotify-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::to(path.to_str().unwrap()).unwrap();
        notifier.send("READY=1\nSTATUS=up");
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=up");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_abstract_socket_is_reached_by_its_at_name() {
        let name = format!("herd-sdnotify-test-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        Notifier::to(&format!("@{name}"))
            .unwrap()
            .send("WATCHDOG=1");
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }

    #[test]
    fn an_absent_socket_loses_the_message_without_blocking() {
        let notifier = Notifier::to("/nonexistent/herd-notify.sock").unwrap();
        for _ in 0..100 {
            notifier.send("STATUS=nobody listens");
        }
        assert_eq!(notifier.inner.failures.lock().unwrap().total(), 100);
    }

    #[test]
    fn neither_path_nor_abstract_is_refused() {
        assert!(matches!(
            Notifier::to("vsock:2:1234"),
            Err(NotifyError::Unsupported(_))
        ));
    }

    #[test]
    fn monotonic_usec_moves_forward() {
        let first = monotonic_usec();
        assert!(first > 0);
        assert!(monotonic_usec() >= first);
    }
}
