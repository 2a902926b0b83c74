//! Node.js cluster IPC: the messages Node's `cluster` workers exchange with
//! their primary, so that herd can be that primary (issue 6).
//!
//! Owns the wire format only: parsing what a Node worker sends into the few
//! things herd acts on, and building herd's replies byte for byte as Node's
//! own primary does (`lib/internal/cluster/{primary,child,utils}.js`,
//! `lib/internal/child_process.js`). A child is a cluster worker when it has
//! `NODE_UNIQUE_ID`, `NODE_CHANNEL_FD` (an AF_UNIX SOCK_STREAM socketpair end)
//! and `NODE_CHANNEL_SERIALIZATION_MODE=json`; messages are one JSON object
//! per line. A handle (fd) rides SCM_RIGHTS on the `sendmsg` that carries the
//! start of a `{"cmd":"NODE_HANDLE",...}` line, and the receiver answers
//! `NODE_HANDLE_ACK` before the sender may send anything else.
//!
//! [`NodeChannel`] keeps one worker's framing state for the hand-off loop:
//! partial lines in, partial writes out, and Node's rule that nothing follows
//! a handle until the worker has acknowledged it.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use serde_json::{json, Value};

use herd_protocol::fdpass;

use crate::ids::ListenerIx;

/// A line longer than this from a worker is a broken worker, not a message.
const MAX_LINE: usize = 1 << 20;

/// The worker's cluster id (`cluster.worker.id`): herd passes the slot + 1
/// (Node's ids start at 1; 0 would read as false in JavaScript).
pub const NODE_UNIQUE_ID_ENV: &str = "NODE_UNIQUE_ID";
/// PM2's instance number (its cluster mode sets it to 0, 1, ...): the slot.
pub const NODE_APP_INSTANCE_ENV: &str = "NODE_APP_INSTANCE";
/// The fd of the worker's end of the IPC socketpair.
pub const NODE_CHANNEL_FD_ENV: &str = "NODE_CHANNEL_FD";
/// `json`: one JSON object per line (Node's default, and all herd speaks).
pub const NODE_CHANNEL_SERIALIZATION_MODE_ENV: &str = "NODE_CHANNEL_SERIALIZATION_MODE";

/// Why a line from a Node worker could not be understood.
#[derive(Debug, thiserror::Error)]
pub enum NodeIpcError {
    #[error("not a JSON object: {0}")]
    Json(#[from] serde_json::Error),
}

/// What herd needs from a `queryServer` request (a worker's `listen`).
#[derive(Debug, Clone, PartialEq)]
pub struct QueryServer {
    /// The worker's `seq`, echoed as `ack` in the reply.
    pub seq: u64,
    /// `None` (JSON `null`): all interfaces, as Node's primary binds it.
    pub address: Option<String>,
    /// The TCP port asked for (0: any free port, chosen once and shared by
    /// every worker); `None` for what herd does not serve: a Unix socket
    /// path (`addressType` -1), UDP (`udp4`/`udp6`), a nonsense port.
    pub port: Option<u16>,
    /// `listen({ipv6Only: true})` (Node v22's `flags` bit 1): no IPv4 on `::`.
    pub ipv6_only: bool,
    /// `listen({fd})`: a socket the worker already has; its number means
    /// nothing in herd's process.
    pub fd: Option<i64>,
    /// Echoed back: TLS servers keep their ticket keys in it.
    pub data: Value,
    /// Node's key for this server: `address:port:addressType:fd:index`,
    /// written as Node's template string writes those values.
    pub key: String,
}

/// A message from a Node worker, reduced to what herd acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeMessage {
    /// `act: online`: the process is up (not yet listening).
    Online,
    /// `act: queryServer`: the worker called `listen`.
    QueryServer(QueryServer),
    /// `act: listening`: the worker's server is listening: it is ready.
    Listening,
    /// The answer to a `newconn`: `accepted: false` means hand it elsewhere.
    Accepted { ack: u64, accepted: bool },
    /// The worker holds the handle herd sent; herd may send again.
    HandleAck,
    /// The worker could not take the handle herd sent.
    HandleNack,
    /// The worker sent a handle of its own (a user `process.send(msg, handle)`):
    /// herd must answer `NODE_HANDLE_ACK` and close the fd.
    Handle,
    /// `act: exitedAfterDisconnect`: the worker is leaving on purpose; it
    /// waits for an `ack` to its `seq` before disconnecting.
    ExitedAfterDisconnect { seq: u64 },
    /// `act: close`: the worker closed the server it knows by `key`; herd
    /// keeps the listener for the others.
    Close { key: String },
    /// A message of the app's own (`process.send(msg)` in a worker): for
    /// the app's primary branch, which herd does not run.
    App,
    /// A message of the app's own, as the worker wrote it (without its
    /// `\n`), when the app's primary runs to receive it (`node.primary =
    /// "run"`, [`NodeChannel::relay_app_messages`]).
    AppLine(Vec<u8>),
    /// A message of the app's own with a handle (`process.send(msg,
    /// socket)`), its whole `NODE_HANDLE` line, when the app's primary runs:
    /// the fd waits in [`NodeChannel::take_relayed_handle`].
    AppHandle(Vec<u8>),
    /// `total` of the app's own messages dropped so far; reported by
    /// [`NodeChannel::read`] at the 1st, 2nd, 4th, ... one (a worker may send
    /// millions: each is counted where it is parsed, and goes no further).
    AppDropped { total: u64 },
    /// Anything else: ignored.
    Other,
}

/// Parses one line (without its `\n`).
pub fn parse(line: &[u8]) -> Result<NodeMessage, NodeIpcError> {
    let message: Value = serde_json::from_slice(line)?;
    let cmd = message.get("cmd").and_then(Value::as_str);
    Ok(match cmd {
        Some("NODE_HANDLE_ACK") => NodeMessage::HandleAck,
        Some("NODE_HANDLE_NACK") => NodeMessage::HandleNack,
        Some("NODE_HANDLE") => NodeMessage::Handle,
        Some("NODE_CLUSTER") => parse_cluster(&message),
        // Node's own messages all carry `cmd: NODE_...`; anything else is the app's.
        Some(cmd) if cmd.starts_with("NODE_") => NodeMessage::Other,
        _ => NodeMessage::App,
    })
}

fn parse_cluster(message: &Value) -> NodeMessage {
    let seq = message.get("seq").and_then(Value::as_u64).unwrap_or(0);
    match message.get("act").and_then(Value::as_str) {
        Some("online") => NodeMessage::Online,
        Some("listening") => NodeMessage::Listening,
        Some("close") => NodeMessage::Close {
            key: js_text(message.get("key")),
        },
        Some("exitedAfterDisconnect") => NodeMessage::ExitedAfterDisconnect { seq },
        Some("queryServer") => NodeMessage::QueryServer(parse_query(message, seq)),
        Some(_) => NodeMessage::Other,
        None => match (
            message.get("ack").and_then(Value::as_u64),
            message.get("accepted").and_then(Value::as_bool),
        ) {
            (Some(ack), Some(accepted)) => NodeMessage::Accepted { ack, accepted },
            _ => NodeMessage::Other,
        },
    }
}

fn parse_query(message: &Value, seq: u64) -> QueryServer {
    let field = |name: &str| message.get(name);
    let address_type = field("addressType").and_then(Value::as_i64);
    let port = field("port")
        .and_then(Value::as_u64)
        .and_then(|port| u16::try_from(port).ok())
        .filter(|_| matches!(address_type, Some(4 | 6)));
    // Node's primary: `${address}:${port}:${addressType}:${fd}:${index}`.
    let key = ["address", "port", "addressType", "fd", "index"]
        .map(|name| js_text(field(name)))
        .join(":");
    QueryServer {
        seq,
        address: field("address").and_then(Value::as_str).map(str::to_owned),
        port,
        ipv6_only: field("flags")
            .and_then(Value::as_u64)
            .is_some_and(|flags| flags & UV_TCP_IPV6ONLY != 0),
        fd: field("fd").and_then(Value::as_i64),
        data: field("data").cloned().unwrap_or(Value::Null),
        key,
    }
}

/// libuv's `UV_TCP_IPV6ONLY`, as Node passes it in `flags`.
const UV_TCP_IPV6ONLY: u64 = 1;

/// A JSON value as a JavaScript template string shows it (a missing one is
/// `undefined`), so herd's keys are the ones Node's primary would make.
fn js_text(value: Option<&Value>) -> String {
    match value {
        None => "undefined".into(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    }
}

/// A line as Node writes it: compact JSON and `\n`.
fn line(value: &Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(value).expect("a JSON value always serialises");
    bytes.push(b'\n');
    bytes
}

/// The `newconn` message; the connection's fd must ride on the `sendmsg`
/// that carries its first byte. The worker answers `ack: seq`.
/// Written by hand, in Node's own key order: it is per connection, and
/// `json!` would sort the keys.
pub fn newconn(key: &str, seq: u64) -> Vec<u8> {
    let key = Value::from(key); // quoted and escaped
    format!(
        "{{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":{{\"cmd\":\"NODE_CLUSTER\",\"act\":\"newconn\",\"key\":{key},\"seq\":{seq}}}}}\n"
    )
    .into_bytes()
}

/// The reply to a `queryServer` in the hand-off modes: `sockname` for a
/// listening TCP server (without it `server.address()` is null), or `errno`
/// (a negative libuv code, e.g. -98 for EADDRINUSE) when herd could not listen.
pub fn query_reply(
    query: &QueryServer,
    sockname: Option<std::net::SocketAddr>,
    errno: Option<i32>,
    seq: u64,
) -> Vec<u8> {
    let mut reply = reply_message(query, errno, seq);
    if let Some(addr) = sockname {
        reply["sockname"] = json!({
            "address": addr.ip().to_string(),
            "family": if addr.is_ipv4() { "IPv4" } else { "IPv6" },
            "port": addr.port(),
        });
    }
    line(&reply)
}

/// The reply to a `queryServer` in `shared` mode: the listening socket
/// itself rides on it (a `net.Native` handle, as Node's SharedHandle sends
/// it), and the worker accepts from it directly.
pub fn query_reply_with_server(query: &QueryServer, seq: u64) -> Vec<u8> {
    line(&json!({
        "cmd": "NODE_HANDLE",
        "type": "net.Native",
        "msg": reply_message(query, None, seq),
    }))
}

fn reply_message(query: &QueryServer, errno: Option<i32>, seq: u64) -> Value {
    json!({
        "cmd": "NODE_CLUSTER",
        "errno": errno,
        "key": query.key,
        "ack": query.seq,
        "data": query.data,
        "seq": seq,
    })
}

/// Asks the worker to close its servers and leave (herd's DRAIN).
pub fn disconnect(seq: u64) -> Vec<u8> {
    format!("{{\"cmd\":\"NODE_CLUSTER\",\"act\":\"disconnect\",\"seq\":{seq}}}\n").into_bytes()
}

/// Acknowledges a worker message that waits for it (`exitedAfterDisconnect`).
pub fn ack(worker_seq: u64, seq: u64) -> Vec<u8> {
    line(&json!({"cmd": "NODE_CLUSTER", "ack": worker_seq, "seq": seq}))
}

/// The answer to a handle the worker sent.
pub fn handle_ack() -> Vec<u8> {
    line(&json!({"cmd": "NODE_HANDLE_ACK"}))
}

/// One Node worker's side of the channel, as the hand-off loop sees it.
///
/// Handles are pipelined: herd does not wait for one NODE_HANDLE_ACK before
/// sending the next handle, as Node's own primary does. The kernel never
/// glues an SCM_RIGHTS message to what follows it in one read (a read ends
/// with the first skb that carries fds), so every chunk Node's worker reads
/// holds at most one handle, and Node's reader gives it to the NODE_HANDLE
/// line in that chunk (`lib/internal/child_process.js` relies on exactly
/// this). What herd must guarantee is that a handle's whole line goes out in
/// the one `sendmsg` that carries the fd: a line of a few hundred bytes is
/// one skb on a Unix stream socket, sent whole or not at all, and a handle
/// never goes out behind a partly sent line. The worker answers handles in
/// the order it got them, so ACKs and NACKs are matched in order.
#[derive(Debug, Default)]
pub struct NodeChannel {
    /// Bytes received after the last complete line.
    inbox: Vec<u8>,
    /// The rest of a line the socket took only part of.
    outbox: Vec<u8>,
    /// Handles sent whose NODE_HANDLE_ACK (or NACK) has not come back, oldest first.
    handles_in_flight: VecDeque<SentHandle>,
    /// Messages that wait for the socket to have room, in order.
    queued: VecDeque<Outgoing>,
    /// The servers the worker listens on: herd's listener and the worker's
    /// key for it (from its `queryServer`). It gets connections from these
    /// listeners only.
    servers: Vec<(ListenerIx, String)>,
    /// herd's `seq` for messages other than `newconn` (which uses the
    /// connection id, so the worker's `ack` names the connection).
    seq: u64,
    /// The app's own messages, dropped (logged at the 1st, 2nd, 4th, ...).
    app_messages: crate::rate_limit::Occurrences,
    /// The app's own messages go to its primary ([`NodeMessage::AppLine`])
    /// instead of being dropped.
    relay_app: bool,
    /// Bytes of the lines in `queued`: relayed messages stop at
    /// [`MAX_RELAY_QUEUE`] of them, so a worker that never reads cannot
    /// make herd grow.
    queued_bytes: usize,
    /// The fd of the last [`NodeMessage::AppHandle`], until the loop takes
    /// it; a read stops at such a handle, so there is at most one.
    relayed_handle: Option<OwnedFd>,
}

/// Bytes that may wait in one worker's queue before a message relayed from
/// the app's primary is dropped instead (herd's own lines always queue:
/// there are a few per worker life).
pub const MAX_RELAY_QUEUE: usize = 1 << 20;

/// A handle sent to the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SentHandle {
    /// A connection (`newconn`), by id.
    Connection(u64),
    /// A listening socket (the `queryServer` reply in `shared` mode).
    Server,
    /// A handle the app's primary sent with a message (`worker.send(msg,
    /// socket)`), relayed; herd closed its copy once it was sent.
    Relayed,
}

/// Why a relayed message was not queued.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("{MAX_RELAY_QUEUE} bytes already wait for the worker to read them")]
    Full,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A message waiting its turn, with the handle that rides on its first byte.
#[derive(Debug)]
struct Outgoing {
    line: Vec<u8>,
    handle: Option<(SentHandle, OwnedFd)>,
}

impl NodeChannel {
    /// Is the worker listening, so that it may be made ready?
    pub fn listening(&self) -> bool {
        !self.servers.is_empty()
    }

    /// Does the worker listen on herd's listener `listener`?
    pub fn serves(&self, listener: ListenerIx) -> bool {
        self.servers.iter().any(|(served, _)| *served == listener)
    }

    /// The worker now listens on `listener`, under its own `key`.
    pub fn add_server(&mut self, listener: ListenerIx, key: String) {
        self.servers.push((listener, key));
    }

    /// The worker closed the server it knows as `key`; returns herd's
    /// listener for it.
    pub fn remove_server(&mut self, key: &str) -> Option<ListenerIx> {
        let position = self.servers.iter().position(|(_, known)| known == key)?;
        Some(self.servers.remove(position).0)
    }

    /// The app's own messages are returned as [`NodeMessage::AppLine`]
    /// from now on, for the app's primary.
    pub fn relay_app_messages(&mut self) {
        self.relay_app = true;
    }

    /// Queues a message from the app's primary, with the handle it carries
    /// (sent as Node sends one: on the `sendmsg` of the line's first byte).
    /// Refused, not queued, past [`MAX_RELAY_QUEUE`].
    pub fn send_relayed(
        &mut self,
        channel: BorrowedFd<'_>,
        line: Vec<u8>,
        handle: Option<OwnedFd>,
    ) -> Result<(), RelayError> {
        if self.queued_bytes + self.outbox.len() + line.len() > MAX_RELAY_QUEUE {
            return Err(RelayError::Full);
        }
        self.enqueue(Outgoing {
            line,
            handle: handle.map(|fd| (SentHandle::Relayed, fd)),
        });
        Ok(self.flush(channel)?)
    }

    /// The fd that came with the last [`NodeMessage::AppHandle`].
    pub fn take_relayed_handle(&mut self) -> Option<OwnedFd> {
        self.relayed_handle.take()
    }

    fn enqueue(&mut self, outgoing: Outgoing) {
        self.queued_bytes += outgoing.line.len();
        self.queued.push_back(outgoing);
    }

    /// Bytes are waiting for the socket to have room.
    pub fn wants_write(&self) -> bool {
        !self.outbox.is_empty() || !self.queued.is_empty()
    }

    pub fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Sends `newconn` for connection `id`, arriving on `listener`, with
    /// `fd` on its first byte. `WouldBlock` when the channel has no room (or
    /// is still busy with earlier messages): the caller tries another
    /// worker, as for a full herd channel.
    pub fn send_connection(
        &mut self,
        channel: BorrowedFd<'_>,
        id: u64,
        listener: ListenerIx,
        fd: BorrowedFd<'_>,
    ) -> io::Result<()> {
        let key = self
            .servers
            .iter()
            .find(|(served, _)| *served == listener)
            .map_or("", |(_, key)| key.as_str());
        if self.wants_write() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let line = newconn(key, id);
        let sent = fdpass::sendmsg_with_fd(channel, &line, fd)?;
        self.outbox.extend_from_slice(&line[sent..]);
        self.handles_in_flight.push_back(SentHandle::Connection(id));
        Ok(())
    }

    /// Sends a line carrying a listening socket, now or in its turn (a
    /// copy of the socket waits with it).
    pub fn send_server(
        &mut self,
        channel: BorrowedFd<'_>,
        line: Vec<u8>,
        socket: BorrowedFd<'_>,
    ) -> io::Result<()> {
        let socket = socket.try_clone_to_owned()?;
        self.enqueue(Outgoing {
            line,
            handle: Some((SentHandle::Server, socket)),
        });
        self.flush(channel)
    }

    /// Sends a line now, or in its turn.
    pub fn send_line(&mut self, channel: BorrowedFd<'_>, line: Vec<u8>) -> io::Result<()> {
        self.enqueue(Outgoing { line, handle: None });
        self.flush(channel)
    }

    /// The worker answered the oldest handle in flight (ACK or NACK): which was it?
    pub fn handle_answered(&mut self) -> Option<SentHandle> {
        self.handles_in_flight.pop_front()
    }

    /// Writes what the socket takes: the rest of a partly sent line, then
    /// the queued messages in order.
    pub fn flush(&mut self, channel: BorrowedFd<'_>) -> io::Result<()> {
        loop {
            while !self.outbox.is_empty() {
                match fdpass::send_stream(channel, &self.outbox) {
                    Ok(sent) => {
                        self.outbox.drain(..sent);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
            let Some(next) = self.queued.pop_front() else {
                return Ok(());
            };
            self.queued_bytes -= next.line.len();
            let Some((handle, fd)) = next.handle.as_ref() else {
                self.outbox = next.line;
                continue;
            };
            match fdpass::sendmsg_with_fd(channel, &next.line, fd.as_fd()) {
                Ok(sent) => {
                    self.outbox.extend_from_slice(&next.line[sent..]);
                    self.handles_in_flight.push_back(*handle);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.queued_bytes += next.line.len();
                    self.queued.push_front(next);
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads what is waiting, at most [`READ_BUDGET`] bytes, and parses
    /// each complete line as it comes into `out` (lines herd does not act
    /// on, an app's own messages, are dropped at once), so memory stays
    /// flat however fast the worker writes. A handle the worker sent is
    /// closed at once (it is reported as [`NodeMessage::Handle`]).
    pub fn read(
        &mut self,
        channel: BorrowedFd<'_>,
        out: &mut Vec<NodeMessage>,
    ) -> io::Result<Read> {
        let mut buf = [0u8; 16 * 1024];
        let mut budget = READ_BUDGET;
        while budget > 0 {
            match fdpass::recv_with_fd(channel, &mut buf, true) {
                Ok(Some(received)) => {
                    budget = budget.saturating_sub(received.len.max(1));
                    self.take_lines(&buf[..received.len], received.fd, out)?;
                    if self.relayed_handle.is_some() {
                        // Taken by the loop before the next read.
                        return Ok(Read::More);
                    }
                }
                Ok(None) => return Ok(Read::Closed),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Read::Drained),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Read::More)
    }

    /// Appends `bytes` to the partial line and parses what completes.
    /// The fd of the read that brought `bytes` goes with the `NODE_HANDLE`
    /// line among them, if it is the app's and relayed; else it is closed.
    fn take_lines(
        &mut self,
        bytes: &[u8],
        mut fd: Option<OwnedFd>,
        out: &mut Vec<NodeMessage>,
    ) -> io::Result<()> {
        self.inbox.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(end) = self.inbox[start..].iter().position(|&b| b == b'\n') {
            // A line that is not JSON, or not for the primary, is the app's
            // business, not ours.
            match parse(&self.inbox[start..start + end]) {
                Ok(NodeMessage::Other) | Err(_) => {}
                Ok(NodeMessage::Handle) if self.relay_app && fd.is_some() => {
                    self.relayed_handle = fd.take();
                    out.push(NodeMessage::AppHandle(
                        self.inbox[start..start + end].to_vec(),
                    ))
                }
                Ok(NodeMessage::App) if self.relay_app => out.push(NodeMessage::AppLine(
                    self.inbox[start..start + end].to_vec(),
                )),
                Ok(NodeMessage::App) => {
                    if let Some(total) = self.app_messages.record() {
                        out.push(NodeMessage::AppDropped { total });
                    }
                }
                Ok(message) => out.push(message),
            }
            start += end + 1;
        }
        self.inbox.drain(..start);
        if self.inbox.len() > MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a message line longer than 1 MiB",
            ));
        }
        Ok(())
    }
}

/// How a [`NodeChannel::read`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// Everything waiting was read.
    Drained,
    /// The budget ran out: more may wait; read again on the next turn.
    More,
    /// The worker closed its end.
    Closed,
}

/// Bytes read from one Node channel per turn of the hand-off loop: a
/// worker writing faster than herd parses gets its next turn after every
/// other ready fd had one.
pub const READ_BUDGET: usize = 64 * 1024;

/// libuv's error code (negative errno on Linux) for a failed `listen`.
pub fn uv_errno(error: nix::Error) -> i32 {
    -(error as i32)
}

mod handover;
pub use handover::CarriedNodeChannel;

#[cfg(test)]
mod tests;
