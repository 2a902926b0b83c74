//! The app's own primary (`node.primary = "run"`): a Node cluster app's
//! `if (cluster.isPrimary)` branch, run in a process of its own beside
//! herd's workers (issue 16, point 4).
//!
//! Owns what herd says to that process and what it hears back, the
//! JavaScript preloaded into it ([`SHIM_JS`], embedded in the binary and
//! written to a private file at start, [`ShimFile`]), starting it
//! (`launch`), restarting it (`supervise`), and its channel (`channel`).
//! The hand-off loop, which owns the workers' channels, relays between
//! them (`handoff::app_primary`); the supervisor starts and reaps it.
//!
//! The wire is Node's own IPC channel (JSON lines on a SOCK_STREAM
//! socketpair, handles in SCM_RIGHTS with `NODE_HANDLE_ACK`), so the
//! preloaded module only calls `process.send` and listens to
//! `process.on('message')`. herd's messages to it carry `herd` (the event),
//! `id` (the worker's `cluster.worker.id`, its slot + 1) and `pid` (its
//! process: during a reload two share a slot):
//!
//! | herd → primary | when |
//! |---|---|
//! | `{"herd":"fork","id","pid"}` | herd started a worker in that slot |
//! | `{"herd":"online","id","pid"}`, `{"herd":"listening","id","pid"}` | the worker said so |
//! | `{"herd":"message","id","pid","msg"}` | the worker's `process.send(msg)` (a `NODE_HANDLE` with its socket) |
//! | `{"herd":"disconnect","id","pid"}` | the worker's channel closed |
//! | `{"herd":"exit","id","pid","code","signal"}` | herd reaped the worker |
//!
//! | primary → herd | what herd does |
//! |---|---|
//! | `{"herd":"send","id","pid","msg"}`, maybe as a `NODE_HANDLE` | relays `msg` (and the handle) to the worker |
//! | `{"herd":"kill","id","pid","signal"}` | signals the worker (herd restarts it) |
//! | `{"herd":"disconnect","id","pid"}` | sends the worker Node's `disconnect` |
//!
//! A request names the process (`pid`) as well as the slot: it goes to
//! that worker of herd's, or nowhere; herd signals no other process.
//! | `{"herd":"unsupported","what"}` | logs `node_primary_unsupported` |
//!
//! # Layout
//! - this module: the messages both ways, the shim file.
//! - `channel`: herd's end of the primary's channel: lines in (with the
//!   handle each `NODE_HANDLE` carries), a bounded outbox.
//! - `launch`: starting the process (`NODE_OPTIONS=--require`, the channel).
//! - `supervise`: its life: restarted with the workers' backoff, stopped with herd.

pub mod channel;
pub mod launch;
pub mod supervise;

use std::io;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::value::RawValue;

/// The preloaded module: herd's `cluster` for the app's primary.
pub const SHIM_JS: &str = include_str!("shim.js");

/// Tells the shim it is in the process herd started as the primary (and
/// what to take out of `NODE_OPTIONS` so that the app's children do not
/// load it again).
pub const MARKER_ENV: &str = "HERD_NODE_PRIMARY";

/// Why the app's primary could not be started.
#[derive(Debug, thiserror::Error)]
pub enum PrimaryStartError {
    #[error("cannot write the preloaded module {path}: {source}")]
    Shim {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
}

/// [`SHIM_JS`] in a directory of herd's own (mode 0700 under the temp
/// dir), readable by the app's user; removed when dropped.
#[derive(Debug)]
pub struct ShimFile {
    dir: PathBuf,
    path: PathBuf,
}

impl ShimFile {
    /// Writes the module; `reader` is the uid that must read it (the
    /// workers' user), if not herd's own.
    pub fn write(reader: Option<u32>) -> Result<ShimFile, PrimaryStartError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let dir = std::env::temp_dir().join(format!("herd-{}-node-primary", std::process::id()));
        let path = dir.join("herd-cluster-primary.js");
        let failed = |source| PrimaryStartError::Shim {
            path: path.clone(),
            source,
        };
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(failed)?;
        std::fs::write(&path, SHIM_JS).map_err(failed)?;
        if let Some(uid) = reader {
            // Only the app's user besides herd: the directory is theirs to enter.
            std::os::unix::fs::chown(&dir, Some(uid), None).map_err(failed)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444))
                .map_err(failed)?;
        }
        Ok(ShimFile { dir, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ShimFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the app's primary asked of herd.
#[derive(Debug, PartialEq)]
pub enum Request {
    /// Relay `line` (the message as the worker gets it) to worker `to`;
    /// `handle` says it is a `NODE_HANDLE` (the fd travels beside it).
    Send {
        to: Target,
        line: Vec<u8>,
        handle: bool,
    },
    /// Signal worker `to`.
    Kill { to: Target, signal: String },
    /// Send worker `to` Node's `disconnect`.
    Disconnect { to: Target },
    /// Something of Node's cluster API herd does not do; logged.
    Unsupported { what: String },
    /// The answer to a handle herd sent: none are, so nothing to do.
    HandleAnswer,
    /// Anything else (Node's own bookkeeping, `NODE_SOCKET_*`): ignored.
    Other,
}

/// The worker a request is for: `cluster.worker.id`, and the process the
/// primary's `Worker` stands for (during a reload a slot has two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub id: u64,
    pub pid: Option<u32>,
}

/// The primary's envelope, `{"herd": ..., "id": ..., "pid": ..., "msg": ...}`.
#[derive(Deserialize)]
struct Envelope<'a> {
    herd: Option<String>,
    id: Option<u64>,
    pid: Option<u32>,
    #[serde(borrow)]
    msg: Option<&'a RawValue>,
    signal: Option<String>,
    what: Option<String>,
}

/// A `NODE_HANDLE` line: the envelope rides in `msg`.
#[derive(Deserialize)]
struct HandleLine<'a> {
    cmd: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(borrow)]
    msg: Option<&'a RawValue>,
}

/// Parses one line from the primary (without its `\n`). The message for
/// the worker is kept as the primary wrote it, byte for byte.
pub fn parse(line: &[u8]) -> Result<Request, serde_json::Error> {
    let outer: HandleLine<'_> = serde_json::from_slice(line)?;
    match outer.cmd.as_deref() {
        Some("NODE_HANDLE") => {
            let kind = outer.kind.unwrap_or_default();
            let inner = outer.msg.map_or("null", RawValue::get);
            let request = parse_envelope(inner.as_bytes())?;
            Ok(match request {
                Request::Send { to, line, .. } => Request::Send {
                    to,
                    line: handle_line(&kind, &line),
                    handle: true,
                },
                other => other,
            })
        }
        Some("NODE_HANDLE_ACK" | "NODE_HANDLE_NACK") => Ok(Request::HandleAnswer),
        Some(cmd) if cmd.starts_with("NODE_") => Ok(Request::Other),
        _ => parse_envelope(line),
    }
}

fn parse_envelope(line: &[u8]) -> Result<Request, serde_json::Error> {
    let envelope: Envelope<'_> = serde_json::from_slice(line)?;
    let to = Target {
        id: envelope.id.unwrap_or(0),
        pid: envelope.pid,
    };
    Ok(match envelope.herd.as_deref() {
        Some("send") => {
            let mut line = envelope
                .msg
                .map_or("null", RawValue::get)
                .as_bytes()
                .to_vec();
            line.push(b'\n');
            Request::Send {
                to,
                line,
                handle: false,
            }
        }
        Some("kill") => Request::Kill {
            to,
            signal: envelope.signal.unwrap_or_else(|| "SIGTERM".into()),
        },
        Some("disconnect") => Request::Disconnect { to },
        Some("unsupported") => Request::Unsupported {
            what: envelope.what.unwrap_or_default(),
        },
        _ => Request::Other,
    })
}

/// The worker's `NODE_HANDLE` line for a message `msg` (with its `\n`),
/// as Node's own primary writes it (`key`, for `server.close()`'s count of
/// a server's sockets across processes, is not passed on: nobody asks).
fn handle_line(kind: &str, msg: &[u8]) -> Vec<u8> {
    let kind = serde_json::Value::from(kind);
    let msg = msg.strip_suffix(b"\n").unwrap_or(msg);
    let mut line = format!("{{\"cmd\":\"NODE_HANDLE\",\"type\":{kind},\"msg\":").into_bytes();
    line.extend_from_slice(msg);
    line.extend_from_slice(b"}\n");
    line
}

/// Worker `id`'s `NODE_HANDLE` line (without its `\n`) as a `message`
/// for the primary, still a `NODE_HANDLE` (the fd rides with it); `None`
/// if it is not one.
pub fn handle_message(id: u64, pid: u32, line: &[u8]) -> Option<Vec<u8>> {
    let outer: HandleLine<'_> = serde_json::from_slice(line).ok()?;
    let kind = serde_json::Value::from(outer.kind?);
    let mut message = format!("{{\"cmd\":\"NODE_HANDLE\",\"type\":{kind},\"msg\":").into_bytes();
    message.extend_from_slice(&self::message(id, pid, outer.msg?.get().as_bytes()));
    // `message` ended its line: the envelope closes before the outer object.
    message.pop();
    message.extend_from_slice(b"}\n");
    Some(message)
}

/// Node's answer to a handle: herd holds it now.
pub const HANDLE_ACK: &[u8] = b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n";
/// The answer to a `NODE_HANDLE` that came without its fd: Node's sender
/// sends it again.
pub const HANDLE_NACK: &[u8] = b"{\"cmd\":\"NODE_HANDLE_NACK\"}\n";

/// `{"herd":"fork","id":..,"pid":..}`.
pub fn fork(id: u64, pid: u32) -> Vec<u8> {
    format!("{{\"herd\":\"fork\",\"id\":{id},\"pid\":{pid}}}\n").into_bytes()
}

/// `online`, `listening` or `disconnect` of worker `id`, process `pid`
/// (during a reload two processes share a slot, and so an id).
pub fn worker_event(event: &str, id: u64, pid: u32) -> Vec<u8> {
    format!("{{\"herd\":\"{event}\",\"id\":{id},\"pid\":{pid}}}\n").into_bytes()
}

/// Worker `id`'s (process `pid`'s) own message, `raw` as it wrote it.
pub fn message(id: u64, pid: u32, raw: &[u8]) -> Vec<u8> {
    let mut line =
        format!("{{\"herd\":\"message\",\"id\":{id},\"pid\":{pid},\"msg\":").into_bytes();
    line.extend_from_slice(raw);
    line.extend_from_slice(b"}\n");
    line
}

/// Worker `id` (process `pid`) exited with `code`, or of `signal` (its name).
pub fn exit(id: u64, pid: u32, code: Option<i32>, signal: Option<&str>) -> Vec<u8> {
    let code = code.map_or("null".into(), |code| code.to_string());
    let signal = signal.map_or("null".into(), |name| format!("\"{name}\""));
    format!("{{\"herd\":\"exit\",\"id\":{id},\"pid\":{pid},\"code\":{code},\"signal\":{signal}}}\n")
        .into_bytes()
}

#[cfg(test)]
mod tests;
