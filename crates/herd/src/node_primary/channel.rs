//! herd's end of the app primary's channel: Node's JSON lines, each
//! `NODE_HANDLE` line with the fd that came with it, and an outbox that
//! stops growing at [`MAX_OUTBOX`].
//!
//! The fd rule is Node's (`lib/internal/child_process.js`): the kernel ends
//! a read with the first segment that carries fds, so a read holds at most
//! one, and it belongs to the `NODE_HANDLE` line that read completes.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use herd_protocol::fdpass;

use super::Request;

/// A line from the primary longer than this is a broken primary: its
/// channel is closed (it is restarted as after any exit).
pub const MAX_LINE: usize = 1 << 20;

/// Bytes of herd's messages that may wait for the primary to read them;
/// past it, workers' messages and events for it are dropped (counted and
/// logged), so a primary that never reads cannot make herd grow.
pub const MAX_OUTBOX: usize = 1 << 20;

/// Bytes read from the primary per turn of the hand-off loop, as for a
/// worker's Node channel: the rest on the next turn.
pub const READ_BUDGET: usize = 64 * 1024;

/// One request, with the handle its `NODE_HANDLE` line carried.
#[derive(Debug)]
pub struct Received {
    pub request: Request,
    pub handle: Option<OwnedFd>,
}

/// How a read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadEnd {
    Drained,
    /// The budget ran out: read again next turn.
    More,
    /// EOF, or a failed read.
    Closed,
    /// A line past [`MAX_LINE`]: the primary is broken.
    Broken,
}

/// The channel to the app's primary process.
#[derive(Debug)]
pub struct PrimaryChannel {
    pub pid: u32,
    fd: OwnedFd,
    /// Bytes after the last complete line.
    inbox: Vec<u8>,
    /// What waits for the socket to have room, oldest first (a line, and
    /// the handle that rides on its first byte), and its size.
    outbox: VecDeque<(Vec<u8>, Option<OwnedFd>)>,
    outbox_bytes: usize,
    /// Of the front line, the bytes already sent.
    front_sent: usize,
}

impl PrimaryChannel {
    pub fn new(pid: u32, fd: OwnedFd) -> PrimaryChannel {
        PrimaryChannel {
            pid,
            fd,
            inbox: Vec::new(),
            outbox: VecDeque::new(),
            outbox_bytes: 0,
            front_sent: 0,
        }
    }

    /// What `herd upgrade` carries: the pid, the fd and the part of a line
    /// read; `None` while something waits to be written (not carried).
    pub fn carried(&self) -> Option<(u32, std::os::fd::RawFd, Vec<u8>)> {
        use std::os::fd::AsRawFd;
        self.outbox
            .is_empty()
            .then(|| (self.pid, self.fd.as_raw_fd(), self.inbox.clone()))
    }

    /// The channel as it was carried.
    pub fn restored(pid: u32, fd: OwnedFd, inbox: Vec<u8>) -> PrimaryChannel {
        PrimaryChannel {
            inbox,
            ..PrimaryChannel::new(pid, fd)
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Reads what waits, a turn's budget at most, into `out`. A line that
    /// is not JSON is skipped (the primary's own business).
    pub fn read(&mut self, out: &mut Vec<Received>) -> ReadEnd {
        let mut buf = [0u8; 16 * 1024];
        let mut budget = READ_BUDGET;
        while budget > 0 {
            match fdpass::recv_with_fd(self.fd.as_fd(), &mut buf, true) {
                Ok(Some(received)) => {
                    budget = budget.saturating_sub(received.len.max(1));
                    if !self.take_lines(&buf[..received.len], received.fd, out) {
                        return ReadEnd::Broken;
                    }
                }
                Ok(None) => return ReadEnd::Closed,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadEnd::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return ReadEnd::Closed,
            }
        }
        ReadEnd::More
    }

    /// Parses the lines `bytes` completes; the fd goes with the
    /// `NODE_HANDLE` among them (closed if none takes it). False when the
    /// partial line grew past [`MAX_LINE`].
    fn take_lines(
        &mut self,
        bytes: &[u8],
        mut fd: Option<OwnedFd>,
        out: &mut Vec<Received>,
    ) -> bool {
        self.inbox.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(end) = self.inbox[start..].iter().position(|&b| b == b'\n') {
            if let Ok(request) = super::parse(&self.inbox[start..start + end]) {
                let handle = match &request {
                    super::Request::Send { handle: true, .. } => fd.take(),
                    _ => None,
                };
                out.push(Received { request, handle });
            }
            start += end + 1;
        }
        self.inbox.drain(..start);
        self.inbox.len() <= MAX_LINE
    }

    /// Queues `line` unless the outbox is full; false when it was dropped.
    /// Writes what the socket takes now.
    pub fn send(&mut self, line: Vec<u8>) -> io::Result<bool> {
        self.send_with(line, None)
    }

    /// [`PrimaryChannel::send`] with a handle, sent as Node sends one (on
    /// the `sendmsg` of the line's first byte); closed if dropped.
    pub fn send_with(&mut self, line: Vec<u8>, handle: Option<OwnedFd>) -> io::Result<bool> {
        if self.outbox_bytes + line.len() > MAX_OUTBOX {
            return Ok(false);
        }
        self.outbox_bytes += line.len();
        self.outbox.push_back((line, handle));
        self.flush()?;
        Ok(true)
    }

    /// Queues an answer to a handle whatever the outbox holds: the primary
    /// sends nothing more until it has it, so there is at most one.
    pub fn answer_handle(&mut self, line: &[u8]) -> io::Result<()> {
        self.outbox_bytes += line.len();
        self.outbox.push_back((line.to_vec(), None));
        self.flush()
    }

    /// Writes queued lines until the socket is full.
    pub fn flush(&mut self) -> io::Result<()> {
        while let Some((front, handle)) = self.outbox.front_mut() {
            let sent = match handle.take() {
                Some(fd) => fdpass::sendmsg_with_fd(self.fd.as_fd(), front, fd.as_fd())
                    .inspect_err(|_| *handle = Some(fd)),
                None => fdpass::send_stream(self.fd.as_fd(), &front[self.front_sent..]),
            };
            match sent {
                Ok(sent) => {
                    self.front_sent += sent;
                    if self.front_sent == front.len() {
                        self.outbox_bytes -= front.len();
                        self.front_sent = 0;
                        self.outbox.pop_front();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Bytes wait for room on the socket.
    pub fn wants_write(&self) -> bool {
        !self.outbox.is_empty()
    }
}
