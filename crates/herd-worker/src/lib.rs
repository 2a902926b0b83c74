//! herd-worker: the library a Rust server links to run under herd.
//!
//! Owns the worker's end of the channel. A worker started by herd finds its
//! channel in `HERD_CHANNEL_FD`; [`Worker::accept`] says READY on first use,
//! then yields one [`Connection`] per hand-off, acknowledging each as soon as
//! the fd is in hand (so herd can close its copy), and `None` once herd asks
//! the worker to drain or goes away. Each connection's [`HerdStream`] tells
//! herd when it is dropped (CLOSED), so herd knows how many connections each
//! worker holds (least-connections dispatch, `herd_worker_open_connections`).
//!
//! In the OS-scheduled modes (`shared`, `reuseport`) the worker also
//! inherits listening sockets (systemd's `LISTEN_FDS`, from fd 3); `accept`
//! then accepts from them itself and reports each connection to herd
//! (ACCEPTED), so the same worker code runs unchanged in every mode.
//!
//! ```no_run
//! # async fn serve(_: herd_worker::Connection) {}
//! # async fn example() -> Result<(), herd_worker::WorkerError> {
//! let mut worker = herd_worker::Worker::from_env()?;
//! while let Some(connection) = worker.accept().await? {
//!     tokio::spawn(serve(connection));
//! }
//! # Ok(()) }
//! ```
//!
//! `examples/echo.rs` is a whole server in 30 lines.
//!
//! # Layout
//! One module, small on purpose: [`Worker`] (the channel: READY, receive
//! and acknowledge hand-offs, accept from inherited sockets, DRAIN),
//! [`Connection`] and its [`HerdStream`] (a `TcpStream` that reports
//! CLOSED when dropped), and [`WorkerError`]. The bytes on the channel and
//! the fd passing are herd-protocol's; this crate has no `unsafe` and no
//! dependency beyond tokio, thiserror and herd-protocol.

#![forbid(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use std::collections::VecDeque;

use herd_protocol::fdpass;
use herd_protocol::page::{Page, MAX_HANDOFF_THREADS, PAGE_FD_ENV};
use herd_protocol::wire::{
    handoff_thread, Batch, Handoff, PrimaryMessage, ProtocolError, ReadyFlags, WorkerMessage,
    MAX_BATCH_LEN, MAX_MESSAGE_LEN, WORKER_MESSAGE_MAX_LEN,
};

pub use herd_protocol::env::{CHANNEL_FD_ENV, WORKER_ID_ENV};

/// Why the worker side failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{CHANNEL_FD_ENV} is not set: this program must be started by herd")]
    NotUnderHerd,
    #[error("{name}={value:?} is not a valid value")]
    BadEnvironment { name: &'static str, value: String },
    #[error("herd channel: {0}")]
    Io(#[from] io::Error),
    #[error("herd sent a bad message: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("herd sent a connection without its file descriptor")]
    MissingFd,
    #[error("inherited listening sockets: {0}")]
    Listeners(String),
}

/// One connection handed over by herd.
#[derive(Debug)]
pub struct Connection {
    /// The client connection; dropping it closes it and tells herd.
    pub stream: HerdStream,
    /// The client's address.
    pub peer: SocketAddr,
    /// The address the client connected to.
    pub local: SocketAddr,
    /// Index of the herd listener that accepted it, in config order.
    pub listener: u16,
    /// herd's id for this connection (unique per herd process); in the OS
    /// modes, this worker's own count of the connections it accepted.
    pub id: u64,
}

/// A client connection from herd: a [`TcpStream`] (it derefs to one and
/// reads and writes like one) that sends herd CLOSED when it is dropped.
#[derive(Debug)]
pub struct HerdStream {
    // Field order matters: the socket closes before herd is told.
    inner: TcpStream,
    _report: CloseReport,
}

impl Deref for HerdStream {
    type Target = TcpStream;
    fn deref(&self) -> &TcpStream {
        &self.inner
    }
}

impl DerefMut for HerdStream {
    fn deref_mut(&mut self) -> &mut TcpStream {
        &mut self.inner
    }
}

impl AsyncRead for HerdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for HerdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Tells herd one connection closed when dropped: a count in the page, or
/// a CLOSED message.
#[derive(Debug)]
enum CloseReport {
    Page(Arc<Page>),
    Message {
        channel: Arc<AsyncFd<OwnedFd>>,
        id: u64,
    },
}

impl Drop for CloseReport {
    fn drop(&mut self) {
        let (channel, id) = match self {
            CloseReport::Page(page) => return page.add_closed(1),
            CloseReport::Message { channel, id } => (channel, *id),
        };
        let mut buf = [0u8; WORKER_MESSAGE_MAX_LEN];
        let bytes = WorkerMessage::Closed(id).encode(&mut buf);
        // A full channel: send it as soon as there is room, off this drop.
        // Any other error means herd is gone and no longer counts.
        if let Err(e) = fdpass::send(channel.get_ref().as_fd(), bytes, true) {
            if e.kind() == io::ErrorKind::WouldBlock {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let (channel, message) = (channel.clone(), WorkerMessage::Closed(id));
                    runtime.spawn(async move { send_on(&channel, message).await });
                }
            }
        }
    }
}

/// The worker's end of its herd channel.
#[derive(Debug)]
pub struct Worker {
    channel: Arc<AsyncFd<OwnedFd>>,
    slot: usize,
    said_ready: bool,
    /// Listening sockets inherited in the OS-scheduled modes; empty otherwise.
    listeners: Vec<TcpListener>,
    /// Connections this worker accepted itself (their ids).
    accepted: u64,
    /// A connection taken (accepted itself, or handed off) whose report to
    /// herd (ACCEPTED, ACK) waits for room on the channel. [`Worker::accept`]
    /// may be cancelled there (a `select!` that takes another branch); the
    /// connection stays here and the next call serves it, instead of it
    /// being dropped, which would reset the client. herd stops reading the
    /// channel for a moment during `herd upgrade`, so the wait is real.
    pending: Option<Pending>,
    /// The counter page (`HERD_PAGE_FD`), when herd passed one: then this
    /// worker counts in it and takes queued hand-offs (no ACK, no
    /// ACCEPTED, no CLOSED message).
    page: Option<Arc<Page>>,
    /// Hand-offs of one batch not handed out yet, in order.
    taken: VecDeque<(Handoff, OwnedFd)>,
}

/// See [`Worker::pending`].
#[derive(Debug)]
enum Pending {
    /// Accepted from inherited listener `listener`; reported as `id`.
    Itself {
        listener: u16,
        id: u64,
        stream: TcpStream,
        peer: SocketAddr,
    },
    /// Handed off: acknowledged once the ACK is sent.
    Handoff {
        handoff: herd_protocol::wire::Handoff,
        stream: TcpStream,
    },
}

impl Worker {
    /// Adopts the channel herd passed in the environment. Must be called
    /// inside a tokio runtime.
    pub fn from_env() -> Result<Worker, WorkerError> {
        let fd = std::env::var(CHANNEL_FD_ENV).map_err(|_| WorkerError::NotUnderHerd)?;
        let fd = fd.parse().map_err(|_| WorkerError::BadEnvironment {
            name: CHANNEL_FD_ENV,
            value: fd.clone(),
        })?;
        let slot = std::env::var(WORKER_ID_ENV).unwrap_or_default();
        let slot = slot.parse().map_err(|_| WorkerError::BadEnvironment {
            name: WORKER_ID_ENV,
            value: slot.clone(),
        })?;
        let channel = fdpass::adopt_inherited_fd(fd)?;
        let listeners = herd_protocol::env::inherited_listen_fds()
            .map_err(WorkerError::Listeners)?
            .into_iter()
            .map(|fd| {
                let socket = std::net::TcpListener::from(fdpass::adopt_inherited_fd(fd)?);
                socket.set_nonblocking(true)?;
                TcpListener::from_std(socket)
            })
            .collect::<io::Result<_>>()?;
        Ok(Worker {
            channel: Arc::new(fdpass::async_channel(channel)?),
            slot,
            said_ready: false,
            listeners,
            accepted: 0,
            pending: None,
            page: page_from_env().map(Arc::new),
            taken: VecDeque::new(),
        })
    }

    /// Does this worker count in herd's counter page (and so take queued
    /// hand-offs)? Only when herd passed one that maps.
    pub fn counts_in_page(&self) -> bool {
        self.page.is_some()
    }

    /// Leaves herd's counter page unused: this worker reports by message
    /// (ACK, ACCEPTED, CLOSED) and herd holds each hand-off until its ACK,
    /// as with a worker written before the page. Call it before the first
    /// `ready` or `accept`.
    pub fn without_page(mut self) -> Worker {
        self.page = None;
        self
    }

    /// How many listening sockets this worker accepts from itself (OS modes).
    pub fn inherited_listeners(&self) -> usize {
        self.listeners.len()
    }

    /// This worker's slot (`HERD_WORKER_ID`).
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// Tells herd this worker takes connections. `accept` does it on first
    /// use; call it earlier only to become ready before the first accept.
    pub async fn ready(&mut self) -> Result<(), WorkerError> {
        if !self.said_ready {
            let flags = match self.page {
                Some(_) => {
                    ReadyFlags::REPORTS_CLOSED
                        | ReadyFlags::PAGE
                        | ReadyFlags::QUEUED
                        | ReadyFlags::THREADS
                }
                None => ReadyFlags::REPORTS_CLOSED,
            };
            send_on(&self.channel, WorkerMessage::Ready(flags)).await?;
            self.said_ready = true;
        }
        Ok(())
    }

    /// The next connection, or `None` when herd asks this worker to drain
    /// (or has gone away): stop accepting, finish what is open, exit.
    ///
    /// Cancel safe: dropped in a `select!` before it returns, it loses no
    /// connection (one already taken comes out of the next call).
    pub async fn accept(&mut self) -> Result<Option<Connection>, WorkerError> {
        self.ready().await?;
        if self.pending.is_some() {
            return self.report_pending().await.map(Some);
        }
        if self.page.is_some() {
            return self.accept_counted().await;
        }
        let mut buf = [0u8; MAX_MESSAGE_LEN];
        loop {
            let received = tokio::select! {
                received = receive(&self.channel, &mut buf) => received?,
                (listener, accepted) = accept_any(&self.listeners), if !self.listeners.is_empty() => {
                    match accepted {
                        Ok((stream, peer)) => return self.accepted_itself(listener, stream, peer).await.map(Some),
                        // The client gave up while queued: take the next one.
                        Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            };
            let Some(received) = received else {
                return Ok(None);
            };
            match PrimaryMessage::decode(&buf[..received.len])? {
                PrimaryMessage::Drain => return Ok(None),
                PrimaryMessage::Handoff(handoff) => {
                    let fd = received.fd.ok_or(WorkerError::MissingFd)?;
                    let stream = std::net::TcpStream::from(fd);
                    stream.set_nonblocking(true)?;
                    let stream = TcpStream::from_std(stream)?;
                    self.pending = Some(Pending::Handoff { handoff, stream });
                    return self.report_pending().await.map(Some);
                }
            }
        }
    }

    /// `accept` for a worker that counts in the page: hand-offs come
    /// queued, maybe several to a message, and nothing is sent back.
    async fn accept_counted(&mut self) -> Result<Option<Connection>, WorkerError> {
        let page = self.page.clone().expect("counting in the page");
        let mut buf = vec![0u8; MAX_BATCH_LEN];
        loop {
            if let Some((handoff, fd)) = self.taken.pop_front() {
                let stream = std::net::TcpStream::from(fd);
                stream.set_nonblocking(true)?;
                // A wildcard listener's connections come with 0.0.0.0 or
                // [::]: the address is the socket's to tell, here.
                let local = match handoff.local.ip().is_unspecified() {
                    true => stream.local_addr()?,
                    false => handoff.local,
                };
                return Ok(Some(Connection {
                    stream: HerdStream {
                        inner: TcpStream::from_std(stream)?,
                        _report: CloseReport::Page(page),
                    },
                    peer: handoff.peer,
                    local,
                    listener: handoff.listener,
                    id: handoff.connection_id,
                }));
            }
            let received = tokio::select! {
                received = receive_batch(&self.channel, &mut buf) => received?,
                (listener, accepted) = accept_any(&self.listeners), if !self.listeners.is_empty() => {
                    match accepted {
                        Ok((stream, peer)) => {
                            page.add_accepted(listener, 1);
                            self.accepted += 1;
                            return Ok(Some(Connection {
                                local: stream.local_addr()?,
                                stream: HerdStream { inner: stream, _report: CloseReport::Page(page) },
                                peer,
                                listener: listener as u16,
                                id: self.accepted,
                            }));
                        }
                        Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            };
            let Some(received) = received else {
                return Ok(None);
            };
            // Taken off the channel: counted at once, before anything can
            // fail (herd takes back only what is still queued there).
            let handoffs = match PrimaryMessage::decode_batch(&buf[..received.len])? {
                Batch::Drain => return Ok(None),
                Batch::Handoffs(handoffs) => handoffs,
            };
            // On the counter of the thread that sent each (READY said THREADS).
            let mut per_thread = [0u64; MAX_HANDOFF_THREADS];
            for handoff in &handoffs {
                let thread = handoff_thread(handoff.connection_id);
                per_thread[if thread < MAX_HANDOFF_THREADS {
                    thread
                } else {
                    0
                }] += 1;
            }
            for (thread, &count) in per_thread.iter().enumerate().filter(|(_, &n)| n > 0) {
                page.add_received_from(thread, count);
            }
            if received.fds.len() != handoffs.len() {
                return Err(WorkerError::MissingFd);
            }
            self.taken.extend(handoffs.into_iter().zip(received.fds));
        }
    }

    /// A connection this worker accepted from an inherited socket: tell herd
    /// (before any CLOSED for it can be sent) and wrap it.
    async fn accepted_itself(
        &mut self,
        listener: usize,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> Result<Connection, WorkerError> {
        self.accepted += 1;
        self.pending = Some(Pending::Itself {
            listener: listener as u16,
            id: self.accepted,
            stream,
            peer,
        });
        self.report_pending().await
    }

    /// Tells herd of the pending connection (ACCEPTED, or the hand-off's
    /// ACK), then hands it out. Cancelled while waiting for room, the
    /// connection stays pending (see [`Worker::pending`]).
    async fn report_pending(&mut self) -> Result<Connection, WorkerError> {
        let message = match self.pending.as_ref().expect("a pending connection") {
            Pending::Itself { listener, id, .. } => WorkerMessage::Accepted {
                listener: *listener,
                id: *id,
            },
            Pending::Handoff { handoff, .. } => WorkerMessage::Ack(handoff.connection_id),
        };
        match send_on(&self.channel, message).await {
            // herd is gone (stopped or died): for a hand-off its copy went
            // with it, so ours is the only one; serve anyway.
            Err(WorkerError::Io(e)) if is_peer_gone(&e) => {}
            Err(e) => {
                self.pending = None;
                return Err(e);
            }
            Ok(()) => {}
        }
        Ok(match self.pending.take().expect("a pending connection") {
            Pending::Itself {
                listener,
                id,
                stream,
                peer,
            } => Connection {
                local: stream.local_addr()?,
                stream: self.herd_stream(stream, id),
                peer,
                listener,
                id,
            },
            Pending::Handoff { handoff, stream } => Connection {
                stream: self.herd_stream(stream, handoff.connection_id),
                peer: handoff.peer,
                local: handoff.local,
                listener: handoff.listener,
                id: handoff.connection_id,
            },
        })
    }

    fn herd_stream(&self, inner: TcpStream, id: u64) -> HerdStream {
        HerdStream {
            inner,
            _report: CloseReport::Message {
                channel: self.channel.clone(),
                id,
            },
        }
    }
}

/// The counter page herd passed (`HERD_PAGE_FD`), mapped; `None` if there
/// is none or it does not map (the worker then reports by message).
fn page_from_env() -> Option<Page> {
    let fd: std::os::fd::RawFd = std::env::var(PAGE_FD_ENV).ok()?.parse().ok()?;
    let fd = fdpass::adopt_inherited_fd(fd).ok()?;
    Page::map(fd, true).ok()
}

/// Receives the next message to a worker that takes queued hand-offs, with
/// all its fds (`None`: the channel closed).
async fn receive_batch(
    channel: &AsyncFd<OwnedFd>,
    buf: &mut [u8],
) -> Result<Option<fdpass::ReceivedBatch>, WorkerError> {
    loop {
        let mut guard = channel.readable().await?;
        match guard.try_io(|channel| fdpass::recv_batch(channel.get_ref().as_fd(), buf, true, true))
        {
            Ok(result) => return Ok(result?),
            Err(_would_block) => continue,
        }
    }
}

/// Receives the next message from herd (`None`: the channel closed).
async fn receive(
    channel: &AsyncFd<OwnedFd>,
    buf: &mut [u8; MAX_MESSAGE_LEN],
) -> Result<Option<fdpass::Received>, WorkerError> {
    loop {
        let mut guard = channel.readable().await?;
        match guard.try_io(|channel| fdpass::recv_with_fd(channel.get_ref().as_fd(), buf, true)) {
            Ok(result) => return Ok(result?),
            Err(_would_block) => continue,
        }
    }
}

/// Accepts from whichever inherited listener has a connection first; yields
/// the listener's index with the result.
async fn accept_any(listeners: &[TcpListener]) -> (usize, io::Result<(TcpStream, SocketAddr)>) {
    std::future::poll_fn(|cx| {
        for (index, listener) in listeners.iter().enumerate() {
            if let Poll::Ready(result) = listener.poll_accept(cx) {
                return Poll::Ready((index, result));
            }
        }
        Poll::Pending
    })
    .await
}

/// Sends one message, waiting for room if the channel is full.
async fn send_on(channel: &AsyncFd<OwnedFd>, message: WorkerMessage) -> Result<(), WorkerError> {
    let mut buf = [0u8; WORKER_MESSAGE_MAX_LEN];
    let bytes = message.encode(&mut buf);
    loop {
        let mut guard = channel.writable().await?;
        match guard.try_io(|channel| fdpass::send(channel.get_ref().as_fd(), bytes, true)) {
            Ok(result) => return Ok(result?),
            Err(_would_block) => continue,
        }
    }
}

fn is_peer_gone(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    /// With the counter page: a batch of hand-offs comes out of `accept` in
    /// order, counted received at once; each close is counted, no message
    /// is sent back, and DRAIN ends it.
    #[tokio::test]
    async fn a_worker_with_the_page_takes_a_batch_and_sends_nothing() {
        use herd_protocol::wire::{encode_batch, MAX_BATCH_LEN};
        let (herd, ours) = fdpass::channel_pair().unwrap();
        let herds_page = Page::create().unwrap();
        let page = Page::map(herds_page.fd().try_clone_to_owned().unwrap(), true).unwrap();
        let mut worker = Worker {
            channel: Arc::new(fdpass::async_channel(ours).unwrap()),
            slot: 0,
            said_ready: true,
            listeners: Vec::new(),
            accepted: 0,
            pending: None,
            page: Some(Arc::new(page)),
            taken: VecDeque::new(),
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        let mut handoffs = Vec::new();
        let mut servers = Vec::new();
        for id in 1..=3u64 {
            clients.push(std::net::TcpStream::connect(addr).unwrap());
            let (server, peer) = listener.accept().unwrap();
            handoffs.push(Handoff {
                connection_id: id,
                listener: 0,
                peer,
                local: addr,
            });
            servers.push(server);
        }
        let mut buf = [0u8; MAX_BATCH_LEN];
        let bytes = encode_batch(&handoffs, &mut buf);
        let fds: Vec<_> = servers.iter().map(|s| s.as_raw_fd()).collect();
        fdpass::send_with_fds(herd.as_fd(), bytes, &fds).unwrap();
        drop(servers);
        fdpass::send(herd.as_fd(), &PrimaryMessage::encode_drain(), true).unwrap();
        for id in 1..=3u64 {
            let connection = worker.accept().await.unwrap().expect("a connection");
            assert_eq!(connection.id, id);
            assert_eq!(herds_page.received(), 3, "counted on receipt");
            drop(connection);
            assert_eq!(herds_page.closed(), id);
        }
        assert!(worker.accept().await.unwrap().is_none(), "DRAIN");
        let mut message = [0u8; MAX_MESSAGE_LEN];
        let sent = fdpass::recv_with_fd(herd.as_fd(), &mut message, true);
        assert_eq!(
            sent.unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "no ACK, no CLOSED"
        );
    }

    /// herd stops reading the channel during `herd upgrade`; an `accept`
    /// that took a connection and waits to report it may be cancelled
    /// (hello-worker's `select!` does so whenever a connection task ends).
    /// The connection must come out of the next `accept`, not be dropped
    /// (which resets the client).
    #[tokio::test]
    async fn an_accept_cancelled_while_herd_reads_nothing_keeps_its_connection() {
        let (herd, ours) = fdpass::channel_pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let mut worker = Worker {
            channel: Arc::new(fdpass::async_channel(ours).unwrap()),
            slot: 0,
            said_ready: true,
            listeners: vec![TcpListener::from_std(listener).unwrap()],
            accepted: 0,
            pending: None,
            page: None,
            taken: VecDeque::new(),
        };
        // Fill the channel: herd reads nothing.
        let mut buf = [0u8; WORKER_MESSAGE_MAX_LEN];
        let closed = WorkerMessage::Closed(0).encode(&mut buf).to_vec();
        let mut filled = 0;
        while fdpass::send(worker.channel.get_ref().as_fd(), &closed, true).is_ok() {
            filled += 1;
            assert!(filled < 100_000, "the channel never filled");
        }
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        client.write_all(b"ping").unwrap();
        // It accepts the client, then waits for room to say so: cancelled.
        let cancelled = tokio::time::timeout(Duration::from_millis(200), worker.accept()).await;
        assert!(cancelled.is_err(), "accept could not have reported it");
        assert!(worker.pending.is_some(), "the connection is kept");
        // herd reads again: the next accept hands out that connection.
        let mut message = [0u8; MAX_MESSAGE_LEN];
        while let Ok(Some(_)) = fdpass::recv_with_fd(herd.as_fd(), &mut message, true) {}
        let connection = worker.accept().await.unwrap().expect("the kept connection");
        assert_eq!(connection.id, 1);
        let mut stream = connection.stream;
        let mut got = [0u8; 4];
        tokio::io::AsyncReadExt::read_exact(&mut stream, &mut got)
            .await
            .unwrap();
        assert_eq!(&got, b"ping");
        tokio::io::AsyncWriteExt::write_all(&mut stream, b"pong")
            .await
            .unwrap();
        let mut answer = [0u8; 4];
        client.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"pong");
    }
}
