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

/// What a worker says it does, in READY's header bytes 2..4.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadyFlags(pub u16);

impl ReadyFlags {
    /// The worker reports every connection it closes: a CLOSED message,
    /// or with [`ReadyFlags::PAGE`] the closed counter of its page.
    pub const REPORTS_CLOSED: ReadyFlags = ReadyFlags(0x0001);
    /// The worker counts in its counter page (`HERD_PAGE_FD`,
    /// [`crate::page`]) instead of sending ACCEPTED and CLOSED.
    pub const PAGE: ReadyFlags = ReadyFlags(0x0002);
    /// Queued hand-offs (needs [`ReadyFlags::PAGE`]): the worker sends no
    /// ACK; taking a HANDOFF off the channel is taking the connection, and
    /// it counts each in its page. herd keeps no copy of what it sent and
    /// takes back what is still queued on the channel if the worker dies or
    /// stalls. HANDOFFs may come several to a message ([`MAX_BATCH`]); a
    /// refused one goes back as RETURN, with its fd.
    pub const QUEUED: ReadyFlags = ReadyFlags(0x0004);
    /// Receipts per hand-off thread (needs [`ReadyFlags::QUEUED`]): the
    /// worker counts each HANDOFF it takes on the page's counter of the
    /// thread that sent it ([`handoff_thread`] of its id,
    /// [`crate::page::Page::add_received_from`]). herd's extra hand-off
    /// threads send only to workers that say so; the others get every
    /// connection from thread 0.
    pub const THREADS: ReadyFlags = ReadyFlags(0x0008);
    /// Every flag this version knows; the others are reserved, sent as 0.
    pub const KNOWN: ReadyFlags = ReadyFlags(0x000f);

    pub fn contains(self, flags: ReadyFlags) -> bool {
        self.0 & flags.0 == flags.0
    }
}

impl std::ops::BitOr for ReadyFlags {
    type Output = ReadyFlags;
    fn bitor(self, other: ReadyFlags) -> ReadyFlags {
        ReadyFlags(self.0 | other.0)
    }
}

/// A connection id's top byte names the hand-off thread that sent it
/// ([`handoff_thread`]); the rest is that thread's own count.
pub const THREAD_SHIFT: u32 = 56;

/// The hand-off thread that sent the HANDOFF with `connection_id`: its
/// top byte (0 for every id herd's first thread gives).
pub fn handoff_thread(connection_id: u64) -> usize {
    (connection_id >> THREAD_SHIFT) as usize
}

/// Most HANDOFFs in one message to a worker that takes queued hand-offs
/// (one SCM_RIGHTS message carries up to 253 fds; a batch this size is
/// already one system call where there were 32).
pub const MAX_BATCH: usize = 32;

/// The largest message herd sends: a full batch of HANDOFFs. A worker that
/// takes queued hand-offs receives into a buffer this long.
pub const MAX_BATCH_LEN: usize = HANDOFF_LEN * MAX_BATCH;

/// Size of an encoded address block: family, reserved, port, 16 address bytes.
const ADDRESS_LEN: usize = 20;

/// Size of a HANDOFF message (primary → worker); exactly one fd rides with it.
pub const HANDOFF_LEN: usize = 4 + 8 + ADDRESS_LEN + ADDRESS_LEN;

/// Size of ACK, NACK, CLOSED and ACCEPTED: the header and an id.
const ID_MESSAGE_LEN: usize = 4 + 8;

/// Size of BOUND: the header and one address block.
const BOUND_LEN: usize = 4 + ADDRESS_LEN;

/// Size of the largest message a worker sends (RETURN, a HANDOFF sent back).
pub const WORKER_MESSAGE_MAX_LEN: usize = HANDOFF_LEN;

/// BOUND's listener field when the address was not one herd serves: the
/// program's own socket was left alone.
pub const BOUND_PASSED: u16 = u16::MAX;

/// Largest message a worker sends, and herd's largest but for a batch;
/// herd's receive buffers of this size never truncate.
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
    pub const RETURN: u8 = 0x87;
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
    /// The worker is ready to take connections, doing what its flags say
    /// (in the header's spare bytes; [`ReadyFlags`]).
    Ready(ReadyFlags),
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
    /// Queued hand-offs ([`ReadyFlags::QUEUED`]): the worker will not serve
    /// this connection and sends it back, the HANDOFF as it came with its
    /// fd attached; herd hands it to another worker.
    Return(Handoff),
}

impl Handoff {
    /// Writes the message into `buf` and returns it.
    pub fn encode<'a>(&self, buf: &'a mut [u8; HANDOFF_LEN]) -> &'a [u8] {
        self.encode_as(kind::HANDOFF, buf)
    }

    fn encode_as<'a>(&self, kind: u8, buf: &'a mut [u8; HANDOFF_LEN]) -> &'a [u8] {
        let mut out = &mut buf[..];
        out.put_u8(VERSION);
        out.put_u8(kind);
        out.put_u16_le(self.listener);
        out.put_u64_le(self.connection_id);
        put_address(&mut out, self.peer);
        put_address(&mut out, self.local);
        debug_assert!(out.is_empty());
        &buf[..]
    }
}

/// Reads a HANDOFF-shaped record (HANDOFF, RETURN): the listener index in
/// the header's spare bytes, then the id and both addresses.
fn decode_handoff(kind: u8, bytes: &[u8], mut body: &[u8]) -> Result<Handoff, ProtocolError> {
    expect_len(kind, bytes, HANDOFF_LEN)?;
    let listener = u16::from_le_bytes([bytes[2], bytes[3]]);
    let connection_id = body.get_u64_le();
    let peer = get_address(&mut body)?;
    let local = get_address(&mut body)?;
    Ok(Handoff {
        connection_id,
        listener,
        peer,
        local,
    })
}

impl PrimaryMessage {
    /// Encodes DRAIN (HANDOFF has its own fixed-size encoder).
    pub fn encode_drain() -> [u8; 4] {
        [VERSION, kind::DRAIN, 0, 0]
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let (kind, body) = split_header(bytes)?;
        match kind {
            kind::HANDOFF => decode_handoff(kind, bytes, body).map(PrimaryMessage::Handoff),
            kind::DRAIN => {
                expect_len(kind, bytes, 4)?;
                Ok(PrimaryMessage::Drain)
            }
            other => Err(ProtocolError::UnknownType(other)),
        }
    }

    /// Splits a message to a worker that takes queued hand-offs into its
    /// messages: one DRAIN, one HANDOFF, or a batch of 2 to [`MAX_BATCH`]
    /// HANDOFFs back to back (one fd each, in order).
    pub fn decode_batch(bytes: &[u8]) -> Result<Batch, ProtocolError> {
        if bytes.len() > HANDOFF_LEN && bytes.len().is_multiple_of(HANDOFF_LEN) {
            if bytes.len() > MAX_BATCH_LEN {
                return Err(ProtocolError::Length {
                    kind: bytes[1],
                    expected: MAX_BATCH_LEN,
                    got: bytes.len(),
                });
            }
            let handoffs = bytes
                .chunks_exact(HANDOFF_LEN)
                .map(|record| match PrimaryMessage::decode(record)? {
                    PrimaryMessage::Handoff(handoff) => Ok(handoff),
                    PrimaryMessage::Drain => Err(ProtocolError::UnknownType(kind::DRAIN)),
                })
                .collect::<Result<_, _>>()?;
            return Ok(Batch::Handoffs(handoffs));
        }
        Ok(match PrimaryMessage::decode(bytes)? {
            PrimaryMessage::Handoff(handoff) => Batch::Handoffs(vec![handoff]),
            PrimaryMessage::Drain => Batch::Drain,
        })
    }
}

/// What one message to a worker that takes queued hand-offs holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Batch {
    /// Connections, one fd each in the message's SCM_RIGHTS, in order.
    Handoffs(Vec<Handoff>),
    Drain,
}

/// Encodes `handoffs` (the first [`MAX_BATCH`] of them) back to back into
/// `buf`: one message, sent with their fds in the same order.
pub fn encode_batch<'a, 'h>(
    handoffs: impl IntoIterator<Item = &'h Handoff>,
    buf: &'a mut [u8; MAX_BATCH_LEN],
) -> &'a [u8] {
    let mut count = 0;
    for (handoff, record) in handoffs.into_iter().zip(buf.chunks_exact_mut(HANDOFF_LEN)) {
        let record: &mut [u8; HANDOFF_LEN] = record.try_into().expect("a record is HANDOFF_LEN");
        handoff.encode(record);
        count += 1;
    }
    &buf[..count * HANDOFF_LEN]
}

impl WorkerMessage {
    /// Writes the message into `buf` and returns the bytes to send.
    pub fn encode<'a>(&self, buf: &'a mut [u8; WORKER_MESSAGE_MAX_LEN]) -> &'a [u8] {
        if let WorkerMessage::Return(handoff) = self {
            return handoff.encode_as(kind::RETURN, buf);
        }
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
            WorkerMessage::Ready(flags) => (kind::READY, None, flags.0),
            WorkerMessage::Bound { .. } | WorkerMessage::Return(_) => {
                unreachable!("encoded above")
            }
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
                // Reserved bits are ignored on receipt.
                Ok(WorkerMessage::Ready(ReadyFlags(
                    flags & ReadyFlags::KNOWN.0,
                )))
            }
            kind::RETURN => decode_handoff(kind, bytes, body).map(WorkerMessage::Return),
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
            WorkerMessage::Ready(ReadyFlags::default()),
            WorkerMessage::Ready(ReadyFlags::REPORTS_CLOSED),
            WorkerMessage::Ready(ReadyFlags::KNOWN),
            WorkerMessage::Return(sample()),
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
            WorkerMessage::Ready(ReadyFlags::default()).encode(&mut buf),
            &[1, 0x82, 0, 0]
        );
        assert_eq!(
            WorkerMessage::Ready(ReadyFlags::REPORTS_CLOSED).encode(&mut buf),
            &[1, 0x82, 1, 0]
        );
        let queued = ReadyFlags::REPORTS_CLOSED | ReadyFlags::PAGE | ReadyFlags::QUEUED;
        assert_eq!(
            WorkerMessage::Ready(queued).encode(&mut buf),
            &[1, 0x82, 7, 0]
        );
        assert_eq!(
            WorkerMessage::Ready(queued | ReadyFlags::THREADS).encode(&mut buf),
            &[1, 0x82, 0x0f, 0]
        );
        // The id's top byte names the thread; herd's first thread's ids are below it.
        assert_eq!(handoff_thread(5), 0);
        assert_eq!(handoff_thread((3 << THREAD_SHIFT) | 5), 3);
        // Reserved bits are dropped on receipt.
        assert_eq!(
            WorkerMessage::decode(&[1, 0x82, 0x19, 0x80]),
            Ok(WorkerMessage::Ready(
                ReadyFlags::REPORTS_CLOSED | ReadyFlags::THREADS
            ))
        );
        let returned = WorkerMessage::Return(sample()).encode(&mut buf).to_vec();
        let mut handoff = [0u8; HANDOFF_LEN];
        let mut expected = sample().encode(&mut handoff).to_vec();
        expected[1] = 0x87;
        assert_eq!(returned, expected);
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
    fn batches_are_handoffs_back_to_back() {
        let mut handoffs: Vec<Handoff> = (1..=MAX_BATCH as u64)
            .map(|id| Handoff {
                connection_id: id,
                ..sample()
            })
            .collect();
        let mut buf = [0u8; MAX_BATCH_LEN];
        for count in [1, 2, MAX_BATCH] {
            let bytes = encode_batch(&handoffs[..count], &mut buf).to_vec();
            assert_eq!(bytes.len(), count * HANDOFF_LEN);
            let mut one = [0u8; HANDOFF_LEN];
            assert_eq!(&bytes[..HANDOFF_LEN], handoffs[0].encode(&mut one));
            assert_eq!(
                PrimaryMessage::decode_batch(&bytes),
                Ok(Batch::Handoffs(handoffs[..count].to_vec()))
            );
        }
        assert_eq!(
            PrimaryMessage::decode_batch(&PrimaryMessage::encode_drain()),
            Ok(Batch::Drain)
        );
        // A DRAIN inside a batch, a ragged length, one record too many.
        let bytes = encode_batch(&handoffs[..2], &mut buf).to_vec();
        let mut with_drain = bytes[..HANDOFF_LEN].to_vec();
        with_drain.extend_from_slice(&[1, 0x02, 0, 0]);
        with_drain.resize(2 * HANDOFF_LEN, 0);
        assert!(PrimaryMessage::decode_batch(&with_drain).is_err());
        assert!(PrimaryMessage::decode_batch(&bytes[..HANDOFF_LEN + 3]).is_err());
        handoffs.push(sample());
        let mut long = encode_batch(&handoffs[..MAX_BATCH], &mut buf).to_vec();
        long.extend_from_slice(&bytes[..HANDOFF_LEN]);
        assert!(PrimaryMessage::decode_batch(&long).is_err());
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
