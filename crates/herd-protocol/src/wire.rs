//! The wire protocol between the primary and its workers, version 1.
//!
//! Owns the byte layout of every message on a worker's channel (a
//! `SOCK_SEQPACKET` socketpair, so one `send` is one message and message
//! boundaries are kept by the kernel). `docs/protocol.md` is the normative
//! description for workers written in other languages; the unit tests below
//! pin the layout so the two cannot drift apart.
//!
//! Every message starts with the same two bytes: the protocol version and the
//! message type. All integers are little-endian. Encoding writes into a
//! caller-provided stack buffer so the hand-off path never allocates.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Buf, BufMut};

/// The protocol version this build speaks; the first byte of every message.
pub const VERSION: u8 = 1;

/// READY flag (header bytes 2..4): the worker sends CLOSED for each connection it closes.
pub const READY_REPORTS_CLOSED: u16 = 0x0001;

/// Size of an encoded address block: family, reserved, port, 16 address bytes.
const ADDRESS_LEN: usize = 20;

/// Size of a HANDOFF message (primary → worker); exactly one fd rides with it.
pub const HANDOFF_LEN: usize = 4 + 8 + ADDRESS_LEN + ADDRESS_LEN;

/// Size of ACK, NACK, CLOSED and ACCEPTED: the header and an id.
const ID_MESSAGE_LEN: usize = 4 + 8;

/// Size of BOUND: the header and one address block.
const BOUND_LEN: usize = 4 + ADDRESS_LEN;

/// Size of the largest message a worker sends (BOUND, with an address).
pub const WORKER_MESSAGE_MAX_LEN: usize = BOUND_LEN;

/// BOUND's listener field when the address was not one herd serves: the
/// program's own socket was left alone.
pub const BOUND_PASSED: u16 = u16::MAX;

/// Largest message either side sends; receive buffers of this size never truncate.
pub const MAX_MESSAGE_LEN: usize = HANDOFF_LEN;

/// Message type bytes. Primary → worker types are below 0x80, worker →
/// primary types have the high bit set, so a message sent the wrong way is
/// recognisable at once.
mod kind {
    pub const HANDOFF: u8 = 0x01;
    pub const DRAIN: u8 = 0x02;
    pub const ACK: u8 = 0x81;
    pub const READY: u8 = 0x82;
    pub const CLOSED: u8 = 0x83;
    pub const NACK: u8 = 0x84;
    pub const ACCEPTED: u8 = 0x85;
    pub const BOUND: u8 = 0x86;
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("empty message")]
    Empty,
    #[error("unsupported protocol version {0} (this herd speaks version {VERSION})")]
    Version(u8),
    #[error("unknown message type 0x{0:02x}")]
    UnknownType(u8),
    #[error("message type 0x{kind:02x} must be {expected} bytes, got {got}")]
    Length {
        kind: u8,
        expected: usize,
        got: usize,
    },
    #[error("unknown address family {0}")]
    Family(u8),
}

/// The header that travels with each connection's fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handoff {
    /// Unique per herd process; the worker echoes it in ACK/NACK/CLOSED.
    pub connection_id: u64,
    /// Which configured listener accepted the connection (0-based, config order).
    pub listener: u16,
    /// The client's address as the primary saw it on accept.
    pub peer: SocketAddr,
    /// The local address the client connected to.
    pub local: SocketAddr,
}

/// Messages the primary sends to a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimaryMessage {
    /// A connection: the fd arrives as SCM_RIGHTS on the same message.
    Handoff(Handoff),
    /// Stop taking connections, finish the ones in progress, then exit.
    Drain,
}

/// Messages a worker sends to the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerMessage {
    /// The worker holds its own copy of the connection's fd; the primary may close its copy.
    Ack(u64),
    /// The worker will not serve this connection; the primary hands it to another worker.
    Nack(u64),
    /// The worker is ready to take connections. `reports_closed` (flag bit
    /// 0 in the header's spare bytes) promises a CLOSED for every connection
    /// it closes, so herd can count its open connections.
    Ready { reports_closed: bool },
    /// The worker closed a connection it had acknowledged (for least-connections dispatch).
    Closed(u64),
    /// OS-scheduled modes (`shared`, `reuseport`): the worker accepted a
    /// connection itself on inherited listener `listener` and calls it `id`
    /// (its own numbering; a later CLOSED names the same id). herd never sees
    /// these connections, so this report is how it counts them.
    Accepted { listener: u16, id: u64 },
    /// Sent by herd's preload library (`protocol = "preload"`): the program
    /// called `bind(address)` on a TCP socket. `listener` is the served
    /// listener it was captured for, or `None` when the address is not one
    /// herd serves and the program's socket was left alone. Only logged.
    Bound {
        listener: Option<u16>,
        address: SocketAddr,
    },
}

impl Handoff {
    /// Writes the message into `buf` and returns it.
    pub fn encode<'a>(&self, buf: &'a mut [u8; HANDOFF_LEN]) -> &'a [u8] {
        let mut out = &mut buf[..];
        out.put_u8(VERSION);
        out.put_u8(kind::HANDOFF);
        out.put_u16_le(self.listener);
        out.put_u64_le(self.connection_id);
        put_address(&mut out, self.peer);
        put_address(&mut out, self.local);
        debug_assert!(out.is_empty());
        &buf[..]
    }
}

impl PrimaryMessage {
    /// Encodes DRAIN (HANDOFF has its own fixed-size encoder).
    pub fn encode_drain() -> [u8; 4] {
        [VERSION, kind::DRAIN, 0, 0]
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let (kind, mut body) = split_header(bytes)?;
        match kind {
            kind::HANDOFF => {
                expect_len(kind, bytes, HANDOFF_LEN)?;
                // HANDOFF keeps the listener index in the header's spare bytes.
                let listener = u16::from_le_bytes([bytes[2], bytes[3]]);
                let connection_id = body.get_u64_le();
                let peer = get_address(&mut body)?;
                let local = get_address(&mut body)?;
                Ok(PrimaryMessage::Handoff(Handoff {
                    connection_id,
                    listener,
                    peer,
                    local,
                }))
            }
            kind::DRAIN => {
                expect_len(kind, bytes, 4)?;
                Ok(PrimaryMessage::Drain)
            }
            other => Err(ProtocolError::UnknownType(other)),
        }
    }
}

impl WorkerMessage {
    /// Writes the message into `buf` and returns the bytes to send.
    pub fn encode<'a>(&self, buf: &'a mut [u8; WORKER_MESSAGE_MAX_LEN]) -> &'a [u8] {
        if let WorkerMessage::Bound { listener, address } = *self {
            let mut out = &mut buf[..];
            out.put_u8(VERSION);
            out.put_u8(kind::BOUND);
            out.put_u16_le(listener.unwrap_or(BOUND_PASSED));
            put_address(&mut out, address);
            return &buf[..BOUND_LEN];
        }
        let (kind, id, flags) = match *self {
            WorkerMessage::Ack(id) => (kind::ACK, Some(id), 0),
            WorkerMessage::Nack(id) => (kind::NACK, Some(id), 0),
            WorkerMessage::Closed(id) => (kind::CLOSED, Some(id), 0),
            WorkerMessage::Accepted { listener, id } => (kind::ACCEPTED, Some(id), listener),
            WorkerMessage::Ready { reports_closed } => (
                kind::READY,
                None,
                u16::from(reports_closed) * READY_REPORTS_CLOSED,
            ),
            WorkerMessage::Bound { .. } => unreachable!("encoded above"),
        };
        let mut out = &mut buf[..];
        out.put_u8(VERSION);
        out.put_u8(kind);
        out.put_u16_le(flags);
        match id {
            Some(id) => {
                out.put_u64_le(id);
                &buf[..ID_MESSAGE_LEN]
            }
            None => &buf[..4],
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let (kind, mut body) = split_header(bytes)?;
        match kind {
            kind::READY => {
                expect_len(kind, bytes, 4)?;
                let flags = u16::from_le_bytes([bytes[2], bytes[3]]);
                Ok(WorkerMessage::Ready {
                    reports_closed: flags & READY_REPORTS_CLOSED != 0,
                })
            }
            kind::ACK | kind::NACK | kind::CLOSED => {
                expect_len(kind, bytes, ID_MESSAGE_LEN)?;
                let id = body.get_u64_le();
                Ok(match kind {
                    kind::ACK => WorkerMessage::Ack(id),
                    kind::NACK => WorkerMessage::Nack(id),
                    _ => WorkerMessage::Closed(id),
                })
            }
            kind::ACCEPTED => {
                expect_len(kind, bytes, ID_MESSAGE_LEN)?;
                // Like HANDOFF, the listener index rides in the header's spare bytes.
                let listener = u16::from_le_bytes([bytes[2], bytes[3]]);
                let id = body.get_u64_le();
                Ok(WorkerMessage::Accepted { listener, id })
            }
            kind::BOUND => {
                expect_len(kind, bytes, BOUND_LEN)?;
                let listener = u16::from_le_bytes([bytes[2], bytes[3]]);
                let address = get_address(&mut body)?;
                Ok(WorkerMessage::Bound {
                    listener: Some(listener).filter(|l| *l != BOUND_PASSED),
                    address,
                })
            }
            other => Err(ProtocolError::UnknownType(other)),
        }
    }
}

/// Checks version and returns (type, bytes after the 4-byte header).
fn split_header(bytes: &[u8]) -> Result<(u8, &[u8]), ProtocolError> {
    match bytes {
        [] => Err(ProtocolError::Empty),
        [version, ..] if *version != VERSION => Err(ProtocolError::Version(*version)),
        [_, kind, ..] if bytes.len() >= 4 => Ok((*kind, &bytes[4..])),
        [_, kind, ..] => Err(ProtocolError::Length {
            kind: *kind,
            expected: 4,
            got: bytes.len(),
        }),
        [_] => Err(ProtocolError::Empty),
    }
}

fn expect_len(kind: u8, bytes: &[u8], expected: usize) -> Result<(), ProtocolError> {
    if bytes.len() == expected {
        Ok(())
    } else {
        Err(ProtocolError::Length {
            kind,
            expected,
            got: bytes.len(),
        })
    }
}

fn put_address(out: &mut &mut [u8], addr: SocketAddr) {
    let mut ip = [0u8; 16];
    let family = match addr.ip() {
        IpAddr::V4(v4) => {
            ip[..4].copy_from_slice(&v4.octets());
            4
        }
        IpAddr::V6(v6) => {
            ip.copy_from_slice(&v6.octets());
            6
        }
    };
    out.put_u8(family);
    out.put_u8(0);
    out.put_u16_le(addr.port());
    out.put_slice(&ip);
}

fn get_address(body: &mut &[u8]) -> Result<SocketAddr, ProtocolError> {
    let family = body.get_u8();
    let _reserved = body.get_u8();
    let port = body.get_u16_le();
    let mut ip = [0u8; 16];
    body.copy_to_slice(&mut ip);
    let ip = match family {
        4 => IpAddr::V4(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3])),
        6 => IpAddr::V6(Ipv6Addr::from(ip)),
        other => return Err(ProtocolError::Family(other)),
    };
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Handoff {
        Handoff {
            connection_id: 0x0102_0304_0506_0708,
            listener: 3,
            peer: "10.1.2.3:54321".parse().unwrap(),
            local: "[::1]:3000".parse().unwrap(),
        }
    }

    #[test]
    fn handoff_layout_is_pinned() {
        let mut buf = [0u8; HANDOFF_LEN];
        let bytes = sample().encode(&mut buf);
        assert_eq!(bytes.len(), 52);
        assert_eq!(&bytes[..4], &[1, 0x01, 3, 0]);
        assert_eq!(&bytes[4..12], &[8, 7, 6, 5, 4, 3, 2, 1]);
        // peer: family 4, reserved, port 54321 little-endian, 10.1.2.3 then zeros
        assert_eq!(&bytes[12..20], &[4, 0, 0x31, 0xd4, 10, 1, 2, 3]);
        assert!(bytes[20..32].iter().all(|b| *b == 0));
        // local: family 6, port 3000, ::1
        assert_eq!(&bytes[32..36], &[6, 0, 0xb8, 0x0b]);
        assert_eq!(bytes[51], 1);
    }

    #[test]
    fn handoff_round_trips() {
        let mut buf = [0u8; HANDOFF_LEN];
        let bytes = sample().encode(&mut buf);
        assert_eq!(
            PrimaryMessage::decode(bytes),
            Ok(PrimaryMessage::Handoff(sample()))
        );
    }

    #[test]
    fn worker_messages_round_trip() {
        for message in [
            WorkerMessage::Ack(7),
            WorkerMessage::Nack(u64::MAX),
            WorkerMessage::Closed(0),
            WorkerMessage::Accepted { listener: 3, id: 9 },
            WorkerMessage::Ready {
                reports_closed: false,
            },
            WorkerMessage::Ready {
                reports_closed: true,
            },
            WorkerMessage::Bound {
                listener: Some(1),
                address: "[::]:3000".parse().unwrap(),
            },
            WorkerMessage::Bound {
                listener: None,
                address: "127.0.0.1:9".parse().unwrap(),
            },
        ] {
            let mut buf = [0u8; WORKER_MESSAGE_MAX_LEN];
            let bytes = message.encode(&mut buf);
            assert_eq!(WorkerMessage::decode(bytes), Ok(message));
        }
        let mut buf = [0u8; WORKER_MESSAGE_MAX_LEN];
        assert_eq!(
            WorkerMessage::Ready {
                reports_closed: false
            }
            .encode(&mut buf),
            &[1, 0x82, 0, 0]
        );
        assert_eq!(
            WorkerMessage::Ready {
                reports_closed: true
            }
            .encode(&mut buf),
            &[1, 0x82, 1, 0]
        );
        assert_eq!(
            WorkerMessage::Ack(1).encode(&mut buf),
            &[1, 0x81, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            WorkerMessage::Accepted { listener: 2, id: 5 }.encode(&mut buf),
            &[1, 0x85, 2, 0, 5, 0, 0, 0, 0, 0, 0, 0]
        );
        let bound = WorkerMessage::Bound {
            listener: None,
            address: "10.0.0.1:80".parse().unwrap(),
        };
        assert_eq!(
            bound.encode(&mut buf),
            &[1, 0x86, 0xff, 0xff, 4, 0, 80, 0, 10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn drain_round_trips() {
        assert_eq!(
            PrimaryMessage::decode(&PrimaryMessage::encode_drain()),
            Ok(PrimaryMessage::Drain)
        );
    }

    #[test]
    fn malformed_messages_are_rejected() {
        assert_eq!(WorkerMessage::decode(&[]), Err(ProtocolError::Empty));
        assert_eq!(
            WorkerMessage::decode(&[2, 0x82, 0, 0]),
            Err(ProtocolError::Version(2))
        );
        assert_eq!(
            WorkerMessage::decode(&[1, 0x99, 0, 0]),
            Err(ProtocolError::UnknownType(0x99))
        );
        assert_eq!(
            WorkerMessage::decode(&[1, 0x81, 0, 0, 1]),
            Err(ProtocolError::Length {
                kind: 0x81,
                expected: 12,
                got: 5
            })
        );
        let mut buf = [0u8; HANDOFF_LEN];
        sample().encode(&mut buf);
        buf[12] = 9;
        assert_eq!(PrimaryMessage::decode(&buf), Err(ProtocolError::Family(9)));
    }
}
