//! The control socket: how `herd status`, `reload`, `scale` and `stop` reach
//! a running herd.
//!
//! Owns the Unix-domain socket (mode 0600) and its JSON-lines protocol: a
//! client connects, writes one [`ControlRequest`] as a JSON line, and reads one
//! [`Response`] line, preceded by a [`Heartbeat`] line every
//! [`HEARTBEAT_INTERVAL`] while a long request (`reload`, `stop`) is carried
//! out; then the connection closes. Binding refuses a path that belongs to
//! another user, a path that is not a socket, and a socket another herd is
//! still serving; a stale socket left by a dead herd is replaced.
//!
//! Every side is bounded (README, Limits): a request is at most
//! [`MAX_REQUEST_BYTES`] and must arrive within [`REQUEST_TIMEOUT`], herd
//! serves at most [`MAX_CLIENTS`] connections at once, a failing `accept`
//! (out of fds) backs off instead of spinning, and the client gives up
//! after [`CLIENT_TIMEOUT`] of silence, saying what it waited for.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::status::{kebab, StatusReport};

/// The largest request herd reads, newline included. Requests are a few
/// dozen bytes; the bound keeps a client that sends without end (or
/// without a newline) from growing herd. Past it the client is answered
/// `request larger than 64 KiB` and closed.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// How long a client has to send its request once herd accepted it. Past
/// it the client is answered `no request within 5s` and closed, so a
/// client that connects and says nothing holds no fd for good.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long herd waits for a client to take each line it writes (a
/// heartbeat, the answer); a client that stopped reading is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often herd tells a client whose request is still being carried out
/// (a reload, a stop) that it is at it. So the client's timeout bounds
/// herd's silence, not how long a reload may take.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);

/// Control connections herd serves at once (a `reload` or `stop` client
/// stays connected until it is done). Past it further clients wait in the
/// socket's accept queue, costing herd no fd, until one is done.
pub const MAX_CLIENTS: usize = 64;

/// When `accept` fails (EMFILE, ENFILE, ENOMEM...), the control socket
/// pauses this long, doubling up to [`ACCEPT_BACKOFF_MAX`], instead of
/// retrying at once and spinning a core; a success resets it.
pub const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(10);
/// The longest pause between two tries of a failing `accept`: how late a
/// control client may be served once fds are free again.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The client's default bound on each wait: for herd to accept the
/// connection, to read the request, and between the lines of its answer
/// (herd sends a heartbeat every [`HEARTBEAT_INTERVAL`]); `--timeout`.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest answer line the client reads (the status of 1024 workers is
/// about 250 KiB), so a confused server cannot grow it without end.
const MAX_ANSWER_BYTES: u64 = 16 << 20;

/// A command for the running herd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum ControlRequest {
    Status,
    Reload,
    Scale {
        workers: usize,
    },
    Stop,
    /// `herd upgrade`: re-execute herd's binary in place (README, "Upgrading herd").
    Upgrade,
}

impl ControlRequest {
    /// The command's name, as `herd` spells it.
    pub fn name(&self) -> &'static str {
        match self {
            ControlRequest::Status => "status",
            ControlRequest::Reload => "reload",
            ControlRequest::Scale { .. } => "scale",
            ControlRequest::Stop => "stop",
            ControlRequest::Upgrade => "upgrade",
        }
    }
}

/// What herd writes every [`HEARTBEAT_INTERVAL`] while a request is carried
/// out, before its [`Response`]: `{"waiting":"reload"}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The name of the request herd is still carrying out.
    pub waiting: String,
}

/// The answer: `ok`, a human-readable `message`, and for `status` the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusReport>,
}

impl Response {
    pub fn ok(message: impl Into<String>) -> Self {
        Response {
            ok: true,
            message: message.into(),
            status: None,
        }
    }

    pub fn failed(message: impl Into<String>) -> Self {
        Response {
            ok: false,
            message: message.into(),
            status: None,
        }
    }
}

/// A client's request, read and waiting for its answer: the way back is
/// `reply`.
#[derive(Debug)]
pub struct PendingRequest {
    pub request: ControlRequest,
    pub reply: oneshot::Sender<Response>,
}

/// Why the control socket could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: another herd is running there (pid in `herd status`); use another `control` path")]
    InUse { path: PathBuf },
    #[error("control socket {path}: owned by uid {owner}, not by this user (uid {me}); refusing to use it")]
    NotOurs { path: PathBuf, owner: u32, me: u32 },
    #[error("control socket {path}: exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no herd is running with control socket {path} ({reason}); start one with `herd run`, or give --control PATH")]
    NotRunning { path: PathBuf, reason: String },
    #[error("control socket {path}: bad answer from herd: {reason}")]
    BadAnswer { path: PathBuf, reason: String },
    #[error("control socket {path}: waited {after:?} for {waited_for}")]
    TimedOut {
        path: PathBuf,
        after: Duration,
        waited_for: String,
    },
}

/// The server side: accepts clients and forwards their requests.
pub struct ControlServer {
    path: PathBuf,
    /// One task per client being served, at most [`MAX_CLIENTS`].
    connections: JoinSet<()>,
    listener: tokio::net::UnixListener,
    /// The current pause after a failed `accept`; `None` once one succeeds.
    backoff: Option<Duration>,
    /// Until when accepting is paused (kept here, not in the future, so a
    /// pause outlives the select loop dropping `accept` for another branch).
    paused_until: Option<tokio::time::Instant>,
}

impl ControlServer {
    /// Binds the socket at `path` with mode 0600.
    pub fn bind(path: &Path) -> Result<ControlServer, ControlError> {
        let io = |source| ControlError::Io {
            path: path.to_owned(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            let me = nix::unistd::geteuid().as_raw();
            if meta.uid() != me {
                return Err(ControlError::NotOurs {
                    path: path.to_owned(),
                    owner: meta.uid(),
                    me,
                });
            }
            if !meta.file_type().is_socket() {
                return Err(ControlError::NotASocket {
                    path: path.to_owned(),
                });
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse {
                    path: path.to_owned(),
                });
            }
            // A stale socket from a herd that died: ours to replace.
            std::fs::remove_file(path).map_err(io)?;
        }
        // Create it private from the start: no window where others could connect.
        let old_umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = std::os::unix::net::UnixListener::bind(path);
        nix::sys::stat::umask(old_umask);
        let listener = bound.map_err(io)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        ControlServer::serving(listener, path)
    }

    /// The server on a bound socket, made non-blocking.
    fn serving(
        listener: std::os::unix::net::UnixListener,
        path: &Path,
    ) -> Result<ControlServer, ControlError> {
        let io = |source| ControlError::Io {
            path: path.to_owned(),
            source,
        };
        listener.set_nonblocking(true).map_err(io)?;
        Ok(ControlServer {
            path: path.to_owned(),
            connections: JoinSet::new(),
            listener: tokio::net::UnixListener::from_std(listener).map_err(io)?,
            backoff: None,
            paused_until: None,
        })
    }

    /// The socket a herd before `herd upgrade` bound at `path`, inherited
    /// as `fd`.
    pub fn adopt(fd: std::os::fd::RawFd, path: &Path) -> Result<ControlServer, ControlError> {
        let io = |source| ControlError::Io {
            path: path.to_owned(),
            source,
        };
        let fd = herd_protocol::fdpass::adopt_inherited_fd(fd).map_err(io)?;
        ControlServer::serving(std::os::unix::net::UnixListener::from(fd), path)
    }

    /// The listening socket's fd, for `herd upgrade` to carry.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.listener)
    }

    /// Waits for the next client and starts a task that serves it. Cancel
    /// safe: the select loop may drop it for another branch at any await.
    pub async fn accept(&mut self, requests: &mpsc::UnboundedSender<PendingRequest>) {
        // Reap finished connection tasks so the set holds only live clients.
        while self.connections.try_join_next().is_some() {}
        if let Some(until) = self.paused_until {
            tokio::time::sleep_until(until).await;
            self.paused_until = None;
        }
        if self.connections.len() >= MAX_CLIENTS {
            // Further clients wait in the kernel's queue until one is done.
            self.connections.join_next().await;
            return;
        }
        match self.listener.accept().await {
            Ok((stream, _)) => {
                self.backoff = None;
                self.connections
                    .spawn(serve_client(stream, requests.clone()));
            }
            Err(e) => {
                let pause = match self.backoff {
                    None => {
                        warn!(
                            event = "control_accept_failed",
                            "control socket: cannot accept a client ({e}); retrying after {ACCEPT_BACKOFF_FIRST:?}, doubling up to {ACCEPT_BACKOFF_MAX:?} (logged once until accepting works again)"
                        );
                        ACCEPT_BACKOFF_FIRST
                    }
                    Some(pause) => (pause * 2).min(ACCEPT_BACKOFF_MAX),
                };
                self.backoff = Some(pause);
                self.paused_until = Some(tokio::time::Instant::now() + pause);
            }
        }
    }

    /// Lets answers already given reach their clients, then removes the socket.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while self.connections.join_next().await.is_some() {}
        })
        .await;
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves one client: reads its request (bounded in size and time),
/// passes it to the main loop, sends heartbeats while the answer is not
/// there, then the answer.
async fn serve_client(
    stream: tokio::net::UnixStream,
    requests: mpsc::UnboundedSender<PendingRequest>,
) {
    let (read, mut write) = stream.into_split();
    let response = match read_request(read).await {
        Err(refused) => {
            debug!("control socket: refused a client: {refused}");
            Response::failed(refused)
        }
        Ok(request) => {
            let name = request.name();
            let (reply, answer) = oneshot::channel();
            if requests.send(PendingRequest { request, reply }).is_err() {
                Response::failed("herd is stopping")
            } else {
                match answer_with_heartbeats(answer, &mut write, name).await {
                    Some(response) => response,
                    // The client went away: nobody to answer.
                    None => return,
                }
            }
        }
    };
    let _ = write_line(&mut write, &response).await;
}

/// Reads one request line: at most [`MAX_REQUEST_BYTES`], within
/// [`REQUEST_TIMEOUT`]; Err says why the client is refused.
async fn read_request(read: impl AsyncRead + Unpin) -> Result<ControlRequest, String> {
    let mut line = Vec::new();
    let mut bounded = tokio::io::BufReader::new(read).take(MAX_REQUEST_BYTES as u64);
    match tokio::time::timeout(REQUEST_TIMEOUT, bounded.read_until(b'\n', &mut line)).await {
        Err(_) => Err(format!("no request within {REQUEST_TIMEOUT:?}")),
        Ok(Err(e)) => Err(format!("cannot read the request: {e}")),
        Ok(Ok(0)) => Err("no request received".into()),
        // No newline within the bound (a request ended by EOF is shorter).
        Ok(Ok(_)) if !line.ends_with(b"\n") && line.len() >= MAX_REQUEST_BYTES => Err(format!(
            "request larger than {} KiB",
            MAX_REQUEST_BYTES / 1024
        )),
        Ok(Ok(_)) => {
            serde_json::from_slice(line.trim_ascii()).map_err(|e| format!("bad request: {e}"))
        }
    }
}

/// Waits for the main loop's answer, writing a [`Heartbeat`] every
/// [`HEARTBEAT_INTERVAL`] meanwhile; `None` if the client went away.
async fn answer_with_heartbeats(
    mut answer: oneshot::Receiver<Response>,
    write: &mut (impl AsyncWrite + Unpin),
    request: &str,
) -> Option<Response> {
    let start = tokio::time::Instant::now() + HEARTBEAT_INTERVAL;
    let mut beats = tokio::time::interval_at(start, HEARTBEAT_INTERVAL);
    loop {
        tokio::select! {
            answer = &mut answer => {
                return Some(answer.unwrap_or_else(|_| Response::failed("herd stopped before answering")));
            }
            _ = beats.tick() => {
                let heartbeat = Heartbeat { waiting: request.to_string() };
                if write_line(write, &heartbeat).await.is_err() {
                    return None;
                }
            }
        }
    }
}

/// Writes `value` as one JSON line, within [`WRITE_TIMEOUT`].
async fn write_line(
    write: &mut (impl AsyncWrite + Unpin),
    value: &impl Serialize,
) -> Result<(), ()> {
    let mut text = serde_json::to_vec(value).map_err(|_| ())?;
    text.push(b'\n');
    match tokio::time::timeout(WRITE_TIMEOUT, write.write_all(&text)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// The client side: sends one request and waits for its answer, each wait
/// bounded by [`CLIENT_TIMEOUT`] (a `reload` or `stop` may take longer: herd
/// sends heartbeats meanwhile).
pub fn request(path: &Path, request: &ControlRequest) -> Result<Response, ControlError> {
    request_within(path, request, CLIENT_TIMEOUT)
}

/// [`request`], with `timeout` bounding each wait: for herd to accept the
/// connection, to take the request, and between the lines of its answer.
pub fn request_within(
    path: &Path,
    request: &ControlRequest,
    timeout: Duration,
) -> Result<Response, ControlError> {
    // A zero timeout would mean "none" to the socket options.
    let timeout = timeout.max(Duration::from_millis(1));
    let timed_out = |waited_for: String| ControlError::TimedOut {
        path: path.to_owned(),
        after: timeout,
        waited_for,
    };
    let bad_answer = |reason: String| ControlError::BadAnswer {
        path: path.to_owned(),
        reason,
    };
    let mut stream = connect(path, timeout)?;
    let io = |e: std::io::Error| ControlError::Io {
        path: path.to_owned(),
        source: e,
    };
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_string(request).expect("requests serialize");
    line.push('\n');
    if let Err(e) = stream.write_all(line.as_bytes()) {
        return Err(if is_timeout(&e) {
            timed_out(format!(
                "herd to read the `{}` request (it accepted the connection: is it stuck? its log may say why)",
                request.name()
            ))
        } else {
            ControlError::NotRunning {
                path: path.to_owned(),
                reason: e.to_string().to_lowercase(),
            }
        });
    }
    // herd answers `reload` and `stop` when they are done, with heartbeats
    // meanwhile: a timeout shorter than their interval would give up on a
    // herd that is at it.
    let silence = if matches!(
        request,
        ControlRequest::Reload | ControlRequest::Stop | ControlRequest::Upgrade
    ) {
        timeout.max(HEARTBEAT_INTERVAL * 2)
    } else {
        timeout
    };
    stream.set_read_timeout(Some(silence)).map_err(io)?;
    let mut answers = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        match (&mut answers).take(MAX_ANSWER_BYTES).read_until(b'\n', &mut line) {
            Err(e) if is_timeout(&e) => {
                return Err(ControlError::TimedOut {
                    path: path.to_owned(),
                    after: silence,
                    waited_for: format!(
                        "an answer to `{}`: herd took the request but sent neither an answer nor a heartbeat (is it stuck? its log may say why)",
                        request.name()
                    ),
                })
            }
            Err(e) => return Err(bad_answer(e.to_string())),
            Ok(0) => return Err(bad_answer("herd closed the connection without answering".into())),
            Ok(_) => {}
        }
        match serde_json::from_slice::<Response>(&line) {
            Ok(response) => return Ok(response),
            Err(_) if serde_json::from_slice::<Heartbeat>(&line).is_ok() => continue,
            Err(e) => {
                return Err(bad_answer(format!(
                    "{e} in {:?}",
                    String::from_utf8_lossy(&line)
                )))
            }
        }
    }
}

/// Connects to the control socket, waiting at most `timeout` for herd to
/// accept: a blocking connect to a Unix socket whose accept queue is full
/// waits up to the socket's send timeout, then fails with EAGAIN.
fn connect(path: &Path, timeout: Duration) -> Result<UnixStream, ControlError> {
    use nix::sys::socket::{
        connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, UnixAddr,
    };
    use nix::sys::time::TimeValLike;
    let not_running = |e: nix::Error| ControlError::NotRunning {
        path: path.to_owned(),
        reason: std::io::Error::from(e).to_string().to_lowercase(),
    };
    let socket = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(not_running)?;
    let wait =
        nix::sys::time::TimeVal::milliseconds(timeout.as_millis().min(i64::MAX as u128) as i64);
    setsockopt(&socket, sockopt::SendTimeout, &wait).map_err(not_running)?;
    let address = UnixAddr::new(path).map_err(not_running)?;
    match connect(socket.as_raw_fd(), &address) {
        Ok(()) => Ok(UnixStream::from(socket)),
        Err(nix::errno::Errno::EAGAIN) => Err(ControlError::TimedOut {
            path: path.to_owned(),
            after: timeout,
            waited_for: "herd to accept the connection: its control socket's queue is full (is herd out of file descriptors, or stuck? its log may say why)".into(),
        }),
        Err(e) => Err(not_running(e)),
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Renders the status report as a table, like `pm2 ls`.
pub fn render_table(report: &StatusReport) -> String {
    let threads = match report.handoff_threads {
        0 | 1 => String::new(),
        n => format!(" ({n} hand-off threads)"),
    };
    let mut out = format!(
        "herd pid {} · {} · up {} · mode {}{threads} · listening on {}\n",
        report.pid,
        report.phase,
        human_duration(report.uptime_secs),
        report.mode,
        if report.listen.is_empty() {
            "nothing yet".to_string()
        } else {
            report.listen.join(", ")
        }
    );
    out.push_str(&format!(
        "{:>4}  {:>8}  {:<13}  {:>8}  {:>8}  {:>10}  {:>9}  {:>6}\n",
        "slot", "pid", "state", "uptime", "restarts", "handed", "memory", "cpu"
    ));
    for row in &report.workers {
        out.push_str(&format!(
            "{:>4}  {:>8}  {:<13}  {:>8}  {:>8}  {:>10}  {:>9}  {:>6}\n",
            row.slot,
            row.pid.map_or("-".into(), |p| p.to_string()),
            kebab(&row.state),
            row.uptime_secs.map_or("-".into(), human_duration),
            row.restarts,
            row.handed_off,
            row.rss_bytes
                .map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0)),
            row.cpu_percent.map_or("-".into(), |c| format!("{c:.1}%")),
        ));
    }
    for row in &report.workers {
        if let Some(text) = &row.notify_status {
            out.push_str(&format!("slot {} says: {text}\n", row.slot));
        }
    }
    if let Some(fair) = &report.fairness {
        let ratio = fair.max_min_ratio.map_or("-".into(), |r| format!("{r:.2}"));
        out.push_str(&format!(
            "fairness: max/min {ratio} · Jain's index {:.3}\n",
            fair.jain_index
        ));
    }
    if report.kernel_dealt > 0 {
        out.push_str(&format!(
            "kernel rotation: {} connections dealt straight to the workers' own sockets\n",
            report.kernel_dealt
        ));
    }
    out
}

fn human_duration(secs: f64) -> String {
    let secs = secs as u64;
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{}s", secs / 60, secs % 60),
        3600..=86399 => format!("{}h{}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{}h", secs / 86400, secs % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_json_form() {
        assert_eq!(
            serde_json::to_string(&ControlRequest::Status).unwrap(),
            r#"{"command":"status"}"#
        );
        assert_eq!(
            serde_json::to_string(&ControlRequest::Scale { workers: 3 }).unwrap(),
            r#"{"command":"scale","workers":3}"#
        );
        assert_eq!(
            serde_json::from_str::<ControlRequest>(r#"{"command":"reload"}"#).unwrap(),
            ControlRequest::Reload
        );
    }

    #[test]
    fn durations_read_like_pm2() {
        assert_eq!(human_duration(5.2), "5s");
        assert_eq!(human_duration(125.0), "2m5s");
        assert_eq!(human_duration(7300.0), "2h1m");
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("herd-control-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_client_reads_heartbeats_until_the_answer() {
        let dir = scratch("heartbeats");
        let path = dir.join("c.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut request = String::new();
            BufReader::new(&stream).read_line(&mut request).unwrap();
            let mut stream = &stream;
            for _ in 0..3 {
                stream.write_all(b"{\"waiting\":\"reload\"}\n").unwrap();
            }
            stream
                .write_all(b"{\"ok\":true,\"message\":\"reloaded\"}\n")
                .unwrap();
            request
        });
        let response =
            request_within(&path, &ControlRequest::Reload, Duration::from_secs(20)).unwrap();
        assert!(response.ok);
        assert_eq!(response.message, "reloaded");
        assert_eq!(server.join().unwrap(), "{\"command\":\"reload\"}\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_client_gives_up_on_a_silent_herd_and_on_a_full_queue() {
        use nix::sys::socket::{
            bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
        };
        let dir = scratch("silent");
        let path = dir.join("c.sock");
        // A socket that never accepts, with room for two waiting clients.
        let listener = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(listener.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        listen(&listener, Backlog::new(1).unwrap()).unwrap();
        let mut waited_for = Vec::new();
        // Bounded: the queue is full after two.
        for _ in 0..10 {
            match request_within(&path, &ControlRequest::Status, Duration::from_millis(50)) {
                Err(ControlError::TimedOut {
                    waited_for: what,
                    after,
                    ..
                }) => {
                    assert_eq!(after, Duration::from_millis(50));
                    let full = what.starts_with("herd to accept the connection");
                    waited_for.push(what);
                    if full {
                        break;
                    }
                }
                other => panic!("expected a timeout, got {other:?}"),
            }
        }
        assert!(
            waited_for[0].starts_with("an answer to `status`"),
            "{waited_for:?}"
        );
        assert!(
            waited_for.last().unwrap().contains("queue is full"),
            "{waited_for:?}"
        );
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn binding_refuses_a_live_socket_and_replaces_a_stale_one() {
        let dir = std::env::temp_dir().join(format!("herd-control-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.sock");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let first = ControlServer::bind(&path).unwrap();
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            assert!(matches!(
                ControlServer::bind(&path),
                Err(ControlError::InUse { .. })
            ));
            drop(first); // the file stays behind, as after a crash
            assert!(ControlServer::bind(&path).is_ok());
        });
        std::fs::write(dir.join("plain"), "x").unwrap();
        assert!(matches!(
            ControlServer::bind(&dir.join("plain")),
            Err(ControlError::NotASocket { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
