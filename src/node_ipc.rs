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
use std::os::fd::BorrowedFd;

use serde_json::{json, Value};

use crate::fdpass;

/// A line longer than this from a worker is a broken worker, not a message.
const MAX_LINE: usize = 1 << 20;

/// The worker's cluster id (`cluster.worker.id`): herd passes the slot.
pub const NODE_UNIQUE_ID_ENV: &str = "NODE_UNIQUE_ID";
/// The fd of the worker's end of the IPC socketpair.
pub const NODE_CHANNEL_FD_ENV: &str = "NODE_CHANNEL_FD";
/// `json`: one JSON object per line (Node's default, and all herd speaks).
pub const NODE_CHANNEL_SERIALIZATION_MODE_ENV: &str = "NODE_CHANNEL_SERIALIZATION_MODE";

/// Why a line from a Node worker could not be understood.
#[derive(Debug, thiserror::Error)]
pub enum NodeIpcError {
    #[error("not a JSON object: {0}")]
    Json(#[from] serde_json::Error),
    #[error("`queryServer` without a valid {0}")]
    QueryServer(&'static str),
}

/// What herd needs from a `queryServer` request (a worker's `listen`).
#[derive(Debug, Clone, PartialEq)]
pub struct QueryServer {
    /// The worker's `seq`, echoed as `ack` in the reply.
    pub seq: u64,
    /// `null` in the JSON: all interfaces, as Node's primary binds it.
    pub address: Option<String>,
    /// 0 asks for any free port, chosen once and shared by every worker.
    pub port: u16,
    /// 4, 6, or -1 for a Unix socket path (which herd refuses).
    pub address_type: i64,
    /// Echoed back: TLS servers keep their ticket keys in it.
    pub data: Value,
    /// Node's key for this server: `address:port:addressType:fd:index`.
    pub key: String,
}

/// A message from a Node worker, reduced to what herd acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
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
    /// `act: close`: the worker closed a server; herd keeps the listener for the others.
    Close,
    /// Anything else, such as the app's own `process.send` messages: ignored.
    Other,
}

/// Parses one line (without its `\n`).
pub fn parse(line: &[u8]) -> Result<Incoming, NodeIpcError> {
    let message: Value = serde_json::from_slice(line)?;
    let cmd = message.get("cmd").and_then(Value::as_str);
    Ok(match cmd {
        Some("NODE_HANDLE_ACK") => Incoming::HandleAck,
        Some("NODE_HANDLE_NACK") => Incoming::HandleNack,
        Some("NODE_HANDLE") => Incoming::Handle,
        Some("NODE_CLUSTER") => parse_cluster(&message)?,
        _ => Incoming::Other,
    })
}

fn parse_cluster(message: &Value) -> Result<Incoming, NodeIpcError> {
    let seq = message.get("seq").and_then(Value::as_u64).unwrap_or(0);
    Ok(match message.get("act").and_then(Value::as_str) {
        Some("online") => Incoming::Online,
        Some("listening") => Incoming::Listening,
        Some("close") => Incoming::Close,
        Some("exitedAfterDisconnect") => Incoming::ExitedAfterDisconnect { seq },
        Some("queryServer") => Incoming::QueryServer(parse_query(message, seq)?),
        Some(_) => Incoming::Other,
        None => match (
            message.get("ack").and_then(Value::as_u64),
            message.get("accepted").and_then(Value::as_bool),
        ) {
            (Some(ack), Some(accepted)) => Incoming::Accepted { ack, accepted },
            _ => Incoming::Other,
        },
    })
}

fn parse_query(message: &Value, seq: u64) -> Result<QueryServer, NodeIpcError> {
    let address = match message.get("address") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(text.clone()),
        Some(_) => return Err(NodeIpcError::QueryServer("address")),
    };
    let port = message
        .get("port")
        .and_then(Value::as_i64)
        .ok_or(NodeIpcError::QueryServer("port"))?;
    let address_type = message
        .get("addressType")
        .and_then(Value::as_i64)
        .ok_or(NodeIpcError::QueryServer("addressType"))?;
    // A Unix socket path has port -1: keep it as 0 here, address_type says which.
    let port = u16::try_from(port.max(0)).map_err(|_| NodeIpcError::QueryServer("port"))?;
    let index = message.get("index").and_then(Value::as_u64).unwrap_or(0);
    let fd = message
        .get("fd")
        .and_then(Value::as_i64)
        .map_or("undefined".to_string(), |fd| fd.to_string());
    let key = format!(
        "{}:{port}:{address_type}:{fd}:{index}",
        address.as_deref().unwrap_or("null")
    );
    Ok(QueryServer {
        seq,
        address,
        port,
        address_type,
        data: message.get("data").cloned().unwrap_or(Value::Null),
        key,
    })
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

/// The reply to a `queryServer`: `sockname` for a listening TCP server
/// (without it `server.address()` is null), or `errno` (a negative libuv
/// code, e.g. -98 for EADDRINUSE) when herd could not listen.
pub fn query_reply(
    query: &QueryServer,
    sockname: Option<std::net::SocketAddr>,
    errno: Option<i32>,
    seq: u64,
) -> Vec<u8> {
    let mut reply = json!({
        "cmd": "NODE_CLUSTER",
        "errno": errno,
        "key": query.key,
        "ack": query.seq,
        "data": query.data,
        "seq": seq,
    });
    if let Some(addr) = sockname {
        reply["sockname"] = json!({
            "address": addr.ip().to_string(),
            "family": if addr.is_ipv4() { "IPv4" } else { "IPv6" },
            "port": addr.port(),
        });
    }
    line(&reply)
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
#[derive(Debug, Default)]
pub struct NodeChannel {
    /// Bytes received after the last complete line.
    inbox: Vec<u8>,
    /// Bytes accepted for sending that the socket has not taken yet.
    outbox: Vec<u8>,
    /// The connection whose handle was sent and whose NODE_HANDLE_ACK has
    /// not come back.
    handle_in_flight: Option<u64>,
    /// Connections dispatched to this worker whose handles wait their turn
    /// (one at a time), oldest first. herd still holds their fds.
    pub waiting_handles: VecDeque<u64>,
    /// Lines held back until that ack (Node sends nothing else meanwhile).
    held: VecDeque<Vec<u8>>,
    /// The key of the server the worker listens on (from its `queryServer`);
    /// it gets no connection before it has one.
    pub key: Option<String>,
    /// herd's `seq` for messages other than `newconn` (which uses the
    /// connection id, so the worker's `ack` names the connection).
    seq: u64,
}

impl NodeChannel {
    /// Is the worker listening, so that connections may be dispatched to it?
    pub fn listening(&self) -> bool {
        self.key.is_some()
    }

    /// Can a `newconn` go out now (no handle unanswered, nothing unsent)?
    pub fn can_send_handle(&self) -> bool {
        self.handle_in_flight.is_none() && self.outbox.is_empty()
    }

    /// The connection whose handle awaits the worker's answer.
    pub fn handle_in_flight(&self) -> Option<u64> {
        self.handle_in_flight
    }

    /// Bytes are waiting for the socket to have room.
    pub fn wants_write(&self) -> bool {
        !self.outbox.is_empty()
    }

    pub fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Sends `newconn` for connection `id` with `fd` on its first byte.
    /// Returns `WouldBlock` if nothing could be sent; a partial send keeps
    /// the rest in the outbox (the fd went with the first byte).
    pub fn send_handle(
        &mut self,
        channel: BorrowedFd<'_>,
        id: u64,
        fd: BorrowedFd<'_>,
    ) -> io::Result<()> {
        let key = self.key.as_deref().unwrap_or_default();
        let message = newconn(key, id);
        let sent = fdpass::sendmsg_with_fd(channel, &message, fd)?;
        self.outbox.extend_from_slice(&message[sent..]);
        self.handle_in_flight = Some(id);
        Ok(())
    }

    /// Sends a line now, or after the pending handle's ack.
    pub fn send_line(&mut self, channel: BorrowedFd<'_>, line: Vec<u8>) -> io::Result<()> {
        if self.handle_in_flight.is_some() {
            self.held.push_back(line);
            return Ok(());
        }
        self.outbox.extend_from_slice(&line);
        self.flush(channel)
    }

    /// The worker acknowledged (or refused) the handle: release what waited.
    pub fn handle_answered(&mut self, channel: BorrowedFd<'_>) -> io::Result<()> {
        self.handle_in_flight = None;
        while let Some(line) = self.held.pop_front() {
            self.outbox.extend_from_slice(&line);
        }
        self.flush(channel)
    }

    /// Writes what the socket takes of the outbox.
    pub fn flush(&mut self, channel: BorrowedFd<'_>) -> io::Result<()> {
        while !self.outbox.is_empty() {
            match fdpass::send_stream(channel, &self.outbox) {
                Ok(sent) => {
                    self.outbox.drain(..sent);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads what is waiting and parses every complete line into `out`.
    /// Returns `false` once the worker closed its end. A handle the worker
    /// sent is closed at once (it is reported as [`Incoming::Handle`]).
    pub fn read(&mut self, channel: BorrowedFd<'_>, out: &mut Vec<Incoming>) -> io::Result<bool> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match fdpass::recv_with_fd(channel, &mut buf, true) {
                Ok(Some(received)) => {
                    drop(received.fd);
                    self.inbox.extend_from_slice(&buf[..received.len]);
                }
                Ok(None) => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let mut start = 0;
        while let Some(end) = self.inbox[start..].iter().position(|&b| b == b'\n') {
            let line = &self.inbox[start..start + end];
            // A line that is not JSON is the app's business, not ours.
            out.push(parse(line).unwrap_or(Incoming::Other));
            start += end + 1;
        }
        self.inbox.drain(..start);
        if self.inbox.len() > MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a message line longer than 1 MiB",
            ));
        }
        Ok(true)
    }
}

/// libuv's error code (negative errno on Linux) for a failed `listen`.
pub fn uv_errno(error: nix::Error) -> i32 {
    -(error as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `listen(3000)` sequence captured from Node v20 (issue 6).
    #[test]
    fn the_captured_listen_sequence_parses() {
        assert_eq!(
            parse(br#"{"cmd":"NODE_CLUSTER","act":"online","seq":0}"#).unwrap(),
            Incoming::Online
        );
        let query = parse(
            br#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,"address":null,"port":3000,"addressType":4,"backlog":0,"seq":1}"#,
        )
        .unwrap();
        let Incoming::QueryServer(query) = query else {
            panic!("{query:?}")
        };
        assert_eq!(query.key, "null:3000:4:undefined:0");
        assert_eq!((query.seq, query.port, query.address_type), (1, 3000, 4));
        assert_eq!(query.address, None);
        // v22 adds "flags": still the same request.
        let v22 = br#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,"address":null,"port":3000,"addressType":4,"backlog":0,"flags":0,"seq":1}"#;
        assert_eq!(parse(v22).unwrap(), Incoming::QueryServer(query.clone()));
        assert_eq!(
            parse(br#"{"cmd":"NODE_CLUSTER","act":"listening","index":0,"data":null,"address":null,"port":3000,"addressType":4,"backlog":0,"seq":2}"#).unwrap(),
            Incoming::Listening
        );
        assert_eq!(
            parse(br#"{"cmd":"NODE_HANDLE_ACK"}"#).unwrap(),
            Incoming::HandleAck
        );
        assert_eq!(
            parse(br#"{"cmd":"NODE_CLUSTER","ack":1,"accepted":true,"seq":3}"#).unwrap(),
            Incoming::Accepted {
                ack: 1,
                accepted: true
            }
        );
        assert_eq!(
            parse(
                br#"{"cmd":"NODE_CLUSTER","act":"close","key":"null:3000:4:undefined:0","seq":4}"#
            )
            .unwrap(),
            Incoming::Close
        );
    }

    #[test]
    fn replies_match_what_nodes_primary_sends() {
        let query = QueryServer {
            seq: 1,
            address: None,
            port: 3000,
            address_type: 4,
            data: Value::Null,
            key: "null:3000:4:undefined:0".into(),
        };
        let reply = query_reply(&query, Some("[::]:3000".parse().unwrap()), None, 0);
        let reply: Value = serde_json::from_slice(&reply).unwrap();
        assert_eq!(
            reply,
            json!({"cmd":"NODE_CLUSTER","errno":null,"key":"null:3000:4:undefined:0","ack":1,"data":null,"sockname":{"address":"::","family":"IPv6","port":3000},"seq":0})
        );
        assert_eq!(
            newconn("null:3000:4:undefined:0", 1),
            b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":{\"cmd\":\"NODE_CLUSTER\",\"act\":\"newconn\",\"key\":\"null:3000:4:undefined:0\",\"seq\":1}}\n"
        );
        assert_eq!(
            disconnect(2),
            b"{\"cmd\":\"NODE_CLUSTER\",\"act\":\"disconnect\",\"seq\":2}\n"
        );
        let refused = query_reply(&query, None, Some(uv_errno(nix::Error::EADDRINUSE)), 0);
        let refused: Value = serde_json::from_slice(&refused).unwrap();
        assert_eq!(refused["errno"], -98);
        assert!(refused.get("sockname").is_none());
    }

    #[test]
    fn keys_are_escaped_in_newconn() {
        let odd = "we\"ird\\:80:4:undefined:0";
        let message: Value = serde_json::from_slice(&newconn(odd, 9)).unwrap();
        assert_eq!(message["msg"]["key"], odd);
        assert_eq!(message["msg"]["seq"], 9);
    }

    #[test]
    fn user_messages_and_handles_are_told_apart() {
        assert_eq!(parse(br#"{"hello":"world"}"#).unwrap(), Incoming::Other);
        assert_eq!(
            parse(br#"{"cmd":"NODE_HANDLE","type":"net.Socket","msg":{"x":1}}"#).unwrap(),
            Incoming::Handle
        );
        assert_eq!(
            parse(br#"{"cmd":"NODE_CLUSTER","act":"exitedAfterDisconnect","seq":7}"#).unwrap(),
            Incoming::ExitedAfterDisconnect { seq: 7 }
        );
        assert!(parse(b"not json").is_err());
        assert!(parse(br#"{"cmd":"NODE_CLUSTER","act":"queryServer","seq":1}"#).is_err());
    }
}
