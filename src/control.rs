//! The control socket: how `herd status`, `reload`, `scale` and `stop` reach
//! a running herd.
//!
//! Owns the Unix-domain socket (mode 0600) and its one-line JSON protocol:
//! a client connects, writes one [`Request`] as a JSON line, and reads one
//! [`Response`] line; then the connection closes. Binding refuses a path
//! that belongs to another user, a path that is not a socket, and a socket
//! another herd is still serving; a stale socket left by a dead herd is
//! replaced.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use crate::lifecycle::{Phase, SlotState};
use crate::metrics::Fairness;

/// A command for the running herd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Reload,
    Scale { workers: usize },
    Stop,
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

/// What `herd status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub pid: u32,
    pub phase: String,
    pub uptime_secs: f64,
    pub mode: String,
    pub listen: Vec<String>,
    pub workers: Vec<SlotStatus>,
    /// How evenly hand-offs spread over the current slots since start.
    pub fairness: Option<Fairness>,
    /// Of the hand-offs, those the kernel rotation dealt (Node workers).
    #[serde(default)]
    pub kernel_dealt: u64,
}

/// One row of `herd status` (and of its JSON): a slot and the worker that
/// stands for it (serving, else starting, else hung).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlotStatus {
    pub slot: usize,
    pub pid: Option<u32>,
    pub state: SlotState,
    pub uptime_secs: Option<f64>,
    pub restarts: u64,
    pub handed_off: u64,
    pub rss_bytes: Option<u64>,
    pub cpu_percent: Option<f64>,
}

/// The serde name of a unit enum variant (e.g. `crash-looping`).
pub fn kebab(value: &impl Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

pub fn phase_name(phase: Phase) -> String {
    kebab(&phase)
}

/// A request from a client, with the way back.
#[derive(Debug)]
pub struct Incoming {
    pub request: Request,
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
}

/// The server side: accepts clients and forwards their requests.
pub struct ControlServer {
    path: PathBuf,
    connections: JoinSet<()>,
    listener: tokio::net::UnixListener,
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
        listener.set_nonblocking(true).map_err(io)?;
        Ok(ControlServer {
            path: path.to_owned(),
            connections: JoinSet::new(),
            listener: tokio::net::UnixListener::from_std(listener).map_err(io)?,
        })
    }

    /// Waits for the next client and starts a task that relays its request.
    pub async fn accept(&mut self, requests: &mpsc::UnboundedSender<Incoming>) {
        let Ok((stream, _)) = self.listener.accept().await else {
            return;
        };
        let requests = requests.clone();
        self.connections.spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = tokio::io::BufReader::new(read);
            let response =
                match tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
                    .await
                {
                    Ok(Ok(_)) => match serde_json::from_str::<Request>(line.trim()) {
                        Ok(request) => {
                            let (reply, answer) = oneshot::channel();
                            let _ = requests.send(Incoming { request, reply });
                            answer.await.unwrap_or_else(|_| {
                                Response::failed("herd stopped before answering")
                            })
                        }
                        Err(e) => Response::failed(format!("bad request: {e}")),
                    },
                    _ => Response::failed("no request received"),
                };
            let mut text = serde_json::to_string(&response).unwrap_or_default();
            text.push('\n');
            let _ = write.write_all(text.as_bytes()).await;
        });
        // Reap finished connection tasks so the set stays small.
        while self.connections.try_join_next().is_some() {}
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

/// The client side: sends one request and waits for the answer (without
/// limit for `reload` and `stop`, which answer when they are done).
pub fn request(path: &Path, request: &Request) -> Result<Response, ControlError> {
    let not_running = |e: std::io::Error| ControlError::NotRunning {
        path: path.to_owned(),
        reason: e.to_string().to_lowercase(),
    };
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(not_running)?;
    let mut line = serde_json::to_string(request).expect("requests serialize");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(not_running)?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(|e| ControlError::BadAnswer {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    serde_json::from_str(answer.trim()).map_err(|e| ControlError::BadAnswer {
        path: path.to_owned(),
        reason: format!("{e} in {answer:?}"),
    })
}

/// Renders the status report as a table, like `pm2 ls`.
pub fn render_table(report: &StatusReport) -> String {
    let mut out = format!(
        "herd pid {} · {} · up {} · mode {} · listening on {}\n",
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
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"command":"status"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Scale { workers: 3 }).unwrap(),
            r#"{"command":"scale","workers":3}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"command":"reload"}"#).unwrap(),
            Request::Reload
        );
    }

    #[test]
    fn durations_read_like_pm2() {
        assert_eq!(human_duration(5.2), "5s");
        assert_eq!(human_duration(125.0), "2m5s");
        assert_eq!(human_duration(7300.0), "2h1m");
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
