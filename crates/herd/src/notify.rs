//! systemd's readiness protocol (`sd_notify(3)`) for workers that follow
//! it (`ready = "notify"`, e.g. gunicorn): each worker gets a socket of its
//! own, named to it as `NOTIFY_SOCKET`, and herd reads what it says there.
//!
//! The socket is an abstract `AF_UNIX` datagram socket (`@herd-notify-…`):
//! no file to clean up or to give the workers' user access to. Anyone in
//! herd's network namespace could send to it, so every datagram carries
//! its sender's credentials (`SO_PASSCRED`) and only those from the
//! worker's main process count; the rest are dropped and logged, rate
//! limited ([`Occurrences`]). A datagram is at most [`MAX_DATAGRAM`] bytes;
//! a longer one is dropped as a whole.
//!
//! With `hang_timeout` on, the worker is told `WATCHDOG_USEC`; once it
//! has sent `WATCHDOG=1`, going silent for longer makes it hung ([`Heard`]).
//!
//! One small task per worker reads its socket and forwards what it parsed
//! ([`Note`]) to the supervisor through a bounded channel, so a worker
//! that floods its socket only fills its own socket buffer. The task ends
//! when the supervisor drops its [`Listening`] (the worker ended).

use std::io::{self, IoSliceMut};
use std::os::fd::AsFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags};
use tokio::io::Interest;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{error, warn};

use crate::config::{Readiness, Settings};
use crate::ids::WorkerId;
use crate::rate_limit::Occurrences;

/// The longest datagram read; systemd's own limit for a notification
/// without fds is about this, and what herd reads needs far less.
pub const MAX_DATAGRAM: usize = 4096;

/// The longest `STATUS=` text kept for `herd status`; more is cut.
pub const MAX_STATUS: usize = 200;

/// Notes parsed and not yet handled, per worker, before its reader waits.
const NOTES_QUEUED: usize = 16;

/// One thing a worker said that herd acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `READY=1`: started up; it may get connections.
    Ready,
    /// `STOPPING=1`: it has begun to shut down.
    Stopping,
    /// `STATUS=...`: free text for `herd status`, at most [`MAX_STATUS`] bytes.
    Status(String),
    /// `WATCHDOG=1`: it is alive.
    Watchdog,
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("not UTF-8 text")]
    NotText,
    #[error("line {0} is not VARIABLE=VALUE")]
    NotAssignment(usize),
    #[error("longer than {MAX_DATAGRAM} bytes")]
    TooLong,
    #[error("sent by pid {sender}, not the worker's main process {main}")]
    NotTheWorker { sender: i32, main: u32 },
    #[error("sent without credentials")]
    NoCredentials,
}

/// What a worker's notification socket said, for the supervisor.
#[derive(Debug)]
pub struct Note {
    pub worker: WorkerId,
    pub message: Message,
}

/// Parses one datagram: newline-separated `VARIABLE=VALUE` lines (a last
/// newline optional). Variables herd does not act on (`MAINPID=`,
/// `ERRNO=`, ...) and values other than `1` for the flags are ignored,
/// as systemd ignores what it does not know.
pub fn parse(datagram: &[u8]) -> Result<Vec<Message>, Refusal> {
    let text = std::str::from_utf8(datagram).map_err(|_| Refusal::NotText)?;
    let mut messages = Vec::new();
    for (index, line) in text.split('\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let (name, value) = line
            .split_once('=')
            .ok_or(Refusal::NotAssignment(index + 1))?;
        messages.extend(match (name, value) {
            ("READY", "1") => Some(Message::Ready),
            ("STOPPING", "1") => Some(Message::Stopping),
            ("WATCHDOG", "1") => Some(Message::Watchdog),
            ("STATUS", text) => Some(Message::Status(cut(text, MAX_STATUS))),
            _ => None,
        });
    }
    Ok(messages)
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn cut(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// A worker's notification socket, bound and not yet read.
#[derive(Debug)]
pub struct NotifySocket {
    /// `NOTIFY_SOCKET` for the worker: `@` and the abstract name.
    pub env: String,
    /// `WATCHDOG_USEC` for the worker (`hang_timeout`), if it is watched.
    pub watchdog: Option<Duration>,
    socket: UnixDatagram,
}

/// What herd keeps of what a worker said on its socket.
#[derive(Debug, Default)]
pub struct Heard {
    /// Its last `STATUS=`, for `herd status`.
    pub status: Option<String>,
    /// `hang_timeout`, as `WATCHDOG_USEC` told it; `None`: not watched.
    watchdog: Option<Duration>,
    /// When it last sent `WATCHDOG=1`. The watch is armed by the first
    /// one, so a server that never pings (gunicorn) is never found hung.
    last_ping: Option<Instant>,
}

impl Heard {
    /// For a worker watched at `watchdog` (its socket's `WATCHDOG_USEC`).
    pub fn new(watchdog: Option<Duration>) -> Heard {
        Heard {
            watchdog,
            ..Heard::default()
        }
    }

    /// What `herd upgrade` carries: the last `STATUS=`, the watchdog, and
    /// how long ago the last `WATCHDOG=1` came (ms).
    pub fn carried(&self, now: Instant) -> (Option<String>, Option<u64>, Option<u64>) {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        (
            self.status.clone(),
            self.watchdog.map(ms),
            self.last_ping
                .map(|at| ms(now.saturating_duration_since(at))),
        )
    }

    /// [`Heard::carried`] back, at `now`.
    pub fn restored(
        now: Instant,
        status: Option<String>,
        watchdog_ms: Option<u64>,
        ping_ms_ago: Option<u64>,
    ) -> Heard {
        Heard {
            status,
            watchdog: watchdog_ms.map(Duration::from_millis),
            last_ping: ping_ms_ago
                .map(|ms| now.checked_sub(Duration::from_millis(ms)).unwrap_or(now)),
        }
    }

    /// It sent `WATCHDOG=1` at `now`.
    pub fn ping(&mut self, now: Instant) {
        self.last_ping = Some(now);
    }

    /// Whether it went silent for longer than its watchdog since its last
    /// `WATCHDOG=1`: true once, then the watch is disarmed.
    pub fn watchdog_expired(&mut self, now: Instant) -> bool {
        let expired = match (self.watchdog, self.last_ping) {
            (Some(timeout), Some(last)) => now.saturating_duration_since(last) > timeout,
            _ => false,
        };
        if expired {
            self.last_ping = None;
        }
        expired
    }
}

/// A worker's socket being read; dropping it stops the reader.
#[derive(Debug)]
pub struct Listening {
    reader: JoinHandle<()>,
    /// The socket's fd while the reader holds it, for `herd upgrade` to
    /// carry (see [`crate::worker_output::Pipe`] for why it is safe to read).
    fd: std::os::fd::RawFd,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Listening {
    /// The socket's fd, while its reader runs.
    pub fn fd(&self) -> Option<std::os::fd::RawFd> {
        self.open
            .load(std::sync::atomic::Ordering::Relaxed)
            .then_some(self.fd)
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl NotifySocket {
    /// Binds a fresh abstract socket for `worker` of this herd.
    pub fn bind(worker: WorkerId, watchdog: Option<Duration>) -> io::Result<NotifySocket> {
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.subsec_nanos());
        let name = format!(
            "herd-notify-{}-{}-{nonce:08x}",
            std::process::id(),
            worker.0
        );
        let socket = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)?;
        setsockopt(&socket, sockopt::PassCred, &true)?;
        socket.set_nonblocking(true)?;
        Ok(NotifySocket {
            env: format!("@{name}"),
            watchdog,
            socket,
        })
    }

    /// The socket a herd before `herd upgrade` bound for a worker, inherited as `fd`.
    pub fn adopt(fd: std::os::fd::RawFd, watchdog: Option<Duration>) -> io::Result<NotifySocket> {
        let socket = UnixDatagram::from(herd_protocol::fdpass::adopt_inherited_fd(fd)?);
        socket.set_nonblocking(true)?;
        Ok(NotifySocket {
            // Told to the worker when it started; not needed again.
            env: String::new(),
            watchdog,
            socket,
        })
    }

    /// A fresh socket for worker `id`, if `settings` wait for `READY=1`;
    /// watched at `hang_timeout` (unless it is off).
    pub fn for_worker(settings: &Settings, id: WorkerId) -> Result<Option<NotifySocket>, String> {
        match settings.ready {
            Readiness::Notify => match NotifySocket::bind(id, settings.hang_timeout) {
                Ok(socket) => Ok(Some(socket)),
                Err(e) => Err(format!("cannot bind its NOTIFY_SOCKET: {e}")),
            },
            _ => Ok(None),
        }
    }

    /// Reads what the worker with main process `pid` says, as [`Note`]s on
    /// `notes`, until the returned [`Listening`] is dropped. If it cannot
    /// be read, the worker is never notified ready and is killed at
    /// `ready_timeout`, as one that never says READY=1.
    pub fn listen(
        self,
        worker: WorkerId,
        pid: u32,
        notes: mpsc::Sender<Note>,
    ) -> Option<Listening> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.socket);
        match tokio::net::UnixDatagram::from_std(self.socket) {
            Ok(socket) => {
                let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
                let closed = open.clone();
                let reader = tokio::spawn(async move {
                    read(socket, worker, pid, notes).await;
                    // The socket closed as `read` returned, with no await between.
                    closed.store(false, std::sync::atomic::Ordering::Relaxed);
                });
                Some(Listening { reader, fd, open })
            }
            Err(e) => {
                error!(
                    pid,
                    event = "notify_unreadable",
                    "cannot read the worker's NOTIFY_SOCKET: {e}"
                );
                None
            }
        }
    }
}

/// The reader task of one worker's socket.
async fn read(
    socket: tokio::net::UnixDatagram,
    worker: WorkerId,
    pid: u32,
    notes: mpsc::Sender<Note>,
) {
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    let mut dropped = Occurrences::default();
    loop {
        let received = socket
            .async_io(Interest::READABLE, || receive(&socket, &mut buffer, pid))
            .await;
        let parsed = match received {
            Ok(Ok(len)) => parse(&buffer[..len]),
            Ok(Err(refusal)) => Err(refusal),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        match parsed {
            Ok(messages) => {
                for message in messages {
                    if notes.send(Note { worker, message }).await.is_err() {
                        return;
                    }
                }
            }
            Err(refusal) => {
                if let Some(total) = dropped.record() {
                    warn!(
                        pid,
                        total,
                        event = "notify_dropped",
                        "dropped a datagram on the worker's NOTIFY_SOCKET: {refusal}"
                    );
                }
            }
        }
    }
}

/// One datagram into `buffer`: its length, or why it does not count.
fn receive(socket: &impl AsFd, buffer: &mut [u8], main: u32) -> io::Result<Result<usize, Refusal>> {
    use std::os::fd::AsRawFd;
    let mut space = nix::cmsg_space!(libc::ucred);
    let mut iov = [IoSliceMut::new(buffer)];
    let message = recvmsg::<()>(
        socket.as_fd().as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let sender = message.cmsgs()?.find_map(|cmsg| match cmsg {
        ControlMessageOwned::ScmCredentials(credentials) => Some(credentials.pid()),
        _ => None,
    });
    if message.flags.contains(MsgFlags::MSG_TRUNC) || message.bytes > MAX_DATAGRAM {
        return Ok(Err(Refusal::TooLong));
    }
    Ok(match sender {
        None => Err(Refusal::NoCredentials),
        Some(sender) if sender as u32 != main => Err(Refusal::NotTheWorker { sender, main }),
        Some(_) => Ok(message.bytes),
    })
}

/// A new note channel: the supervisor's end and the readers'.
pub fn channel() -> (mpsc::Sender<Note>, mpsc::Receiver<Note>) {
    mpsc::channel(NOTES_QUEUED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_variables_herd_acts_on_and_ignores_the_rest() {
        assert_eq!(parse(b"READY=1"), Ok(vec![Message::Ready]));
        assert_eq!(
            parse(b"READY=1\nSTATUS=Serving 4 workers\nMAINPID=42\n"),
            Ok(vec![
                Message::Ready,
                Message::Status("Serving 4 workers".into())
            ])
        );
        assert_eq!(
            parse(b"STOPPING=1\nWATCHDOG=1"),
            Ok(vec![Message::Stopping, Message::Watchdog])
        );
        // Flags other than 1, unknown variables, empty datagrams and lines.
        assert_eq!(parse(b"READY=0\nWATCHDOG=trigger\nX=y"), Ok(vec![]));
        assert_eq!(parse(b""), Ok(vec![]));
        assert_eq!(parse(b"\n\nREADY=1\n\n"), Ok(vec![Message::Ready]));
        assert_eq!(parse(b"STATUS="), Ok(vec![Message::Status(String::new())]));
        assert_eq!(
            parse(b"STATUS=a=b"),
            Ok(vec![Message::Status("a=b".into())])
        );
    }

    #[test]
    fn refuses_what_is_not_text_or_not_assignments() {
        assert_eq!(parse(b"READY=1\n\xff"), Err(Refusal::NotText));
        assert_eq!(parse(b"READY=1\nREADY"), Err(Refusal::NotAssignment(2)));
    }

    #[test]
    fn a_long_status_is_cut_on_a_character_boundary() {
        let long = format!("STATUS={}", "é".repeat(MAX_STATUS));
        let Ok(messages) = parse(long.as_bytes()) else {
            panic!("refused");
        };
        let [Message::Status(text)] = messages.as_slice() else {
            panic!("{messages:?}");
        };
        assert!(text.len() <= MAX_STATUS && text.len() >= MAX_STATUS - 1);
        assert!(text.chars().all(|c| c == 'é'));
    }

    #[test]
    fn the_watchdog_arms_on_the_first_ping_and_fires_once() {
        let start = Instant::now();
        let mut heard = Heard::new(Some(Duration::from_secs(1)));
        // Never pinged: never expired, however long.
        assert!(!heard.watchdog_expired(start + Duration::from_secs(60)));
        heard.ping(start);
        assert!(!heard.watchdog_expired(start + Duration::from_millis(900)));
        heard.ping(start + Duration::from_millis(900));
        assert!(!heard.watchdog_expired(start + Duration::from_millis(1800)));
        assert!(heard.watchdog_expired(start + Duration::from_millis(2000)));
        assert!(!heard.watchdog_expired(start + Duration::from_millis(3000)));
        // Not watched (hang_timeout = "0s"): pings change nothing.
        let mut off = Heard::new(None);
        off.ping(start);
        assert!(!off.watchdog_expired(start + Duration::from_secs(60)));
    }

    #[tokio::test]
    async fn only_the_workers_own_process_is_heard() {
        let socket = NotifySocket::bind(WorkerId(1), None).unwrap();
        let name = socket.env.trim_start_matches('@').to_string();
        let address = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let (tx, mut notes) = channel();
        // Our own pid is the "worker": what we send counts.
        let _listening = socket.listen(WorkerId(1), std::process::id(), tx).unwrap();
        let sender = UnixDatagram::unbound().unwrap();
        sender
            .send_to_addr(b"STATUS=up\nREADY=1", &address)
            .unwrap();
        let note = notes.recv().await.unwrap();
        assert_eq!(note.message, Message::Status("up".into()));
        assert_eq!(notes.recv().await.unwrap().message, Message::Ready);
        // Too long: dropped as a whole.
        let long = vec![b'x'; MAX_DATAGRAM + 1];
        sender.send_to_addr(&long, &address).unwrap();
        sender.send_to_addr(b"STOPPING=1", &address).unwrap();
        assert_eq!(notes.recv().await.unwrap().message, Message::Stopping);
    }

    #[tokio::test]
    async fn another_process_is_not_heard() {
        let socket = NotifySocket::bind(WorkerId(2), None).unwrap();
        let name = socket.env.trim_start_matches('@').to_string();
        let (tx, mut notes) = channel();
        // A pid that is not ours: our datagrams are dropped.
        let _listening = socket.listen(WorkerId(2), 1, tx).expect("read");
        let sender = UnixDatagram::unbound().unwrap();
        let address = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        sender.send_to_addr(b"READY=1", &address).unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(200), notes.recv()).await;
        assert!(waited.is_err(), "heard {waited:?}");
    }
}
