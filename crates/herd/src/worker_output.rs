//! herd's stdout and stderr: what its workers print and herd's own log,
//! written without ever blocking herd.
//!
//! Owns both output streams. Each has a bounded queue of whole lines and a
//! writer thread of its own that drains it; herd's threads only append to a
//! queue. So a stdout or stderr that cannot take more (a stalled log
//! shipper, a full pipe) blocks that writer thread and nothing else: the
//! supervisor, the control socket and `/metrics` keep running. When a queue
//! is full, new lines are dropped and counted (`herd_log_lines_dropped_total`),
//! and herd's log says how many, at the first drop and then at most once per
//! [`DROP_WARNING_INTERVAL`].
//!
//! Workers' stdout and stderr pipes are read here and cut into lines tagged
//! with the worker's slot (`[worker N] `), so interleaved workers stay
//! readable. A line longer than [`MAX_LINE_BYTES`] is forwarded in pieces,
//! each but the last ending in [`SPLIT_MARKER`]: a worker printing without
//! newlines costs herd a bounded amount of memory. herd's own log reaches
//! stderr through the same queue ([`LogWriter`]), in order with the
//! workers' stderr.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::ids::SlotIx;
pub use crate::line_format::{Framing, Origin, SPLIT_MARKER};

/// The longest line herd forwards, not counting its `[worker N] ` prefix.
/// journald splits at 48 KiB for the same reason: a line is held in memory
/// until its newline comes, so without a bound a worker printing 1 GB with
/// no newline would grow herd by 1 GB. Past it the line is forwarded in
/// pieces, each but the last ending in [`SPLIT_MARKER`].
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Bytes each stream's queue holds (lines queued or being written): what a
/// stdout or stderr that cannot keep up costs herd in memory. A few seconds
/// of a chatty worker; past it new lines are dropped and counted.
pub const QUEUE_BYTES: usize = 4 << 20;

/// How often, at most, herd's log says how many lines were dropped (the
/// first drop is reported at once), so a stream that stays full does not
/// fill stderr with warnings about itself.
pub const DROP_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// How long a stopping herd waits for its queued output to be written
/// before it exits anyway (a reader that stalled for good must not keep
/// herd from exiting); what is still queued then is lost.
pub const EXIT_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// How much of a worker's pipe is read at a time: the buffer every worker
/// stream keeps while it runs (the pipe itself holds 64 KiB more).
const READ_CHUNK_BYTES: usize = 8 * 1024;

/// One of herd's two output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub const ALL: [Stream; 2] = [Stream::Stdout, Stream::Stderr];

    /// The `stream` label of `herd_log_lines_dropped_total`.
    pub fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Lines dropped from `stream` since herd started: its queue was full, or
/// writing them failed (e.g. nothing reads herd's stdout any more).
pub fn lines_dropped(stream: Stream) -> u64 {
    cell(stream).get().map_or(0, |q| q.dropped.load(Relaxed))
}

/// A pipe being forwarded: its fd number while it is open, so that
/// `herd upgrade` can carry it. Read on the main thread's runtime only
/// (herd's is single-threaded), so between two awaits the forwarding task
/// cannot close the fd under it.
#[derive(Debug, Clone)]
pub struct Pipe {
    fd: std::os::fd::RawFd,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Pipe {
    /// The fd, while the forwarding task still holds it.
    pub fn fd(&self) -> Option<std::os::fd::RawFd> {
        self.open.load(Relaxed).then_some(self.fd)
    }
}

/// Copies the pipe `fd` (a worker's stdout, or its stderr, as `origin`
/// says; or a Node app's own primary's) to herd's, each line framed as
/// `framing` says (`log_lines`), on the current tokio runtime, until the
/// process closes it.
pub fn forward(fd: OwnedFd, origin: Origin, framing: Framing) -> Option<Pipe> {
    let stream = if origin.stderr {
        Stream::Stderr
    } else {
        Stream::Stdout
    };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    match tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
        Ok(pipe) => {
            let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
            let closed = open.clone();
            tokio::spawn(async move {
                forward_lines(pipe, origin, framing, queue(stream)).await;
                // The fd closed as `forward_lines` returned; nothing ran
                // on this thread in between (no await), so no reader of
                // `fd()` saw a closed number.
                closed.store(false, Relaxed);
            });
            Some(Pipe { fd: raw, open })
        }
        Err(e) => {
            debug!(pid = origin.pid, "cannot read the process's output: {e}");
            None
        }
    }
}

/// [`forward`] for a worker of `slot`.
pub fn forward_worker(
    fd: OwnedFd,
    slot: SlotIx,
    pid: u32,
    stderr: bool,
    framing: Framing,
) -> Option<Pipe> {
    let origin = Origin {
        slot: Some(slot.get()),
        pid,
        stderr,
    };
    forward(fd, origin, framing)
}

async fn forward_lines(
    pipe: tokio::net::unix::pipe::Receiver,
    origin: Origin,
    framing: Framing,
    queue: &OutputQueue,
) {
    let mut lines = LineSplitter::new(origin, framing, MAX_LINE_BYTES);
    let mut send = |line| queue.send(line);
    // One read buffer per thread, not per pipe: with 512 workers, 1024
    // idle pipes would otherwise hold 8 MiB of buffers between lines.
    thread_local! {
        static CHUNK: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; READ_CHUNK_BYTES]);
    }
    loop {
        if pipe.readable().await.is_err() {
            break;
        }
        // Read and split without awaiting, so the buffer is free again
        // before another pipe's turn.
        let open = CHUNK.with_borrow_mut(|chunk| match pipe.try_read(chunk) {
            Ok(0) => false,
            Ok(read) => {
                lines.push(&chunk[..read], &mut send);
                true
            }
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        });
        if !open {
            break;
        }
    }
    lines.finish(&mut send);
}

/// Writes `text` and a newline to herd's stderr through its queue, for the
/// message herd prints when it cannot run.
pub fn eprint_line(text: &str) {
    let mut line = Vec::with_capacity(text.len() + 1);
    line.extend_from_slice(text.as_bytes());
    line.push(b'\n');
    queue(Stream::Stderr).send(line);
}

/// Reports the drops not yet reported, then waits until everything queued
/// is written, at most `within` in all. For herd's exit.
pub fn flush(within: Duration) {
    let deadline = Instant::now() + within;
    for stream in Stream::ALL {
        if let Some(queue) = cell(stream).get() {
            queue.warn_if_due(Duration::ZERO);
        }
    }
    // stdout first: its last warning may still go to stderr.
    for stream in Stream::ALL {
        if let Some(queue) = cell(stream).get() {
            queue.wait_written(deadline);
        }
    }
}

/// herd's own log, for `tracing_subscriber::fmt().with_writer(LogWriter)`:
/// each event goes to stderr's queue as one line (dropped and counted if
/// the queue is full), so logging never blocks herd either.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogLine;

    fn make_writer(&'a self) -> LogLine {
        LogLine(Vec::new())
    }
}

/// One log event being formatted; queued whole when dropped.
#[derive(Debug)]
pub struct LogLine(Vec<u8>);

impl Write for LogLine {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            // Never a warning from here: this runs inside a log event.
            let _ = queue(Stream::Stderr).push(std::mem::take(&mut self.0));
        }
    }
}

fn cell(stream: Stream) -> &'static OnceLock<OutputQueue> {
    static STDOUT: OnceLock<OutputQueue> = OnceLock::new();
    static STDERR: OnceLock<OutputQueue> = OnceLock::new();
    match stream {
        Stream::Stdout => &STDOUT,
        Stream::Stderr => &STDERR,
    }
}

/// The queue of `stream`, with its writer thread started on first use.
fn queue(stream: Stream) -> &'static OutputQueue {
    let mut created = false;
    let queue = cell(stream).get_or_init(|| {
        created = true;
        OutputQueue::new(stream, QUEUE_BYTES)
    });
    if created {
        let out = destination(stream);
        let spawned = std::thread::Builder::new()
            .name(format!("herd-{}", stream.name()))
            .spawn(move || queue.write_forever(out));
        if let Err(e) = spawned {
            // Lines then queue up to the bound and are dropped and counted.
            eprintln!("herd: cannot start the {} writer: {e}", stream.name());
        }
    }
    queue
}

/// Where `stream`'s writer thread writes: a duplicate of fd 1 or 2, so it
/// needs neither std's lock on stdout/stderr (a stray `eprintln!` elsewhere
/// never waits on a writer that is blocked) nor its line buffer; std's own
/// handle if the fd cannot be duplicated (std treats a closed one as a sink).
fn destination(stream: Stream) -> Box<dyn Write + Send> {
    let fd = match stream {
        Stream::Stdout => std::io::stdout().as_fd().try_clone_to_owned(),
        Stream::Stderr => std::io::stderr().as_fd().try_clone_to_owned(),
    };
    match (fd, stream) {
        (Ok(fd), _) => Box::new(File::from(fd)),
        (Err(_), Stream::Stdout) => Box::new(std::io::stdout()),
        (Err(_), Stream::Stderr) => Box::new(std::io::stderr()),
    }
}

/// Whether [`OutputQueue::push`] took a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
enum Pushed {
    Queued,
    /// The queue was full: the line is gone, and counted.
    Dropped,
}

/// One stream's lines on their way out, bounded by bytes.
struct OutputQueue {
    stream: Stream,
    /// [`QUEUE_BYTES`], smaller in tests.
    budget: usize,
    state: Mutex<QueueState>,
    /// Wakes the writer thread when lines arrive.
    arrived: Condvar,
    /// Wakes [`flush`] when the writer has written a batch.
    written: Condvar,
    /// Lines dropped since start, for `/metrics` (read without the lock).
    dropped: AtomicU64,
}

struct QueueState {
    lines: VecDeque<Vec<u8>>,
    /// Bytes of the lines queued and of the batch being written: what the
    /// queue costs in memory, held under `budget`.
    bytes: usize,
    warning: DropWarning,
}

impl OutputQueue {
    fn new(stream: Stream, budget: usize) -> OutputQueue {
        OutputQueue {
            stream,
            budget,
            state: Mutex::new(QueueState {
                lines: VecDeque::new(),
                bytes: 0,
                warning: DropWarning::default(),
            }),
            arrived: Condvar::new(),
            written: Condvar::new(),
            dropped: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // Nothing under the lock can leave the state half-changed.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `line`, or drops and counts it if the queue is full. Never
    /// blocks (the lock is only ever held to move lines in or out), and
    /// never logs: it may run inside a log event.
    fn push(&self, line: Vec<u8>) -> Pushed {
        let mut state = self.lock();
        if state.bytes + line.len() > self.budget {
            state.warning.unreported += 1;
            self.dropped.fetch_add(1, Relaxed);
            return Pushed::Dropped;
        }
        state.bytes += line.len();
        state.lines.push_back(line);
        drop(state);
        self.arrived.notify_one();
        Pushed::Queued
    }

    /// [`push`](Self::push), with the rate-limited warning when the line
    /// was dropped.
    fn send(&self, line: Vec<u8>) {
        if self.push(line) == Pushed::Dropped {
            self.warn_if_due(DROP_WARNING_INTERVAL);
        }
    }

    /// Logs the drops not yet reported, unless the last warning is more
    /// recent than `interval`. The warning goes to stderr's queue: so it is
    /// never emitted with a queue locked.
    fn warn_if_due(&self, interval: Duration) {
        let due = self.lock().warning.due(Instant::now(), interval);
        if let Some(dropped) = due {
            warn!(
                stream = self.stream.name(),
                dropped,
                total = self.dropped.load(Relaxed),
                event = "output_dropped",
                "herd's {} could not take output fast enough: dropped {dropped} lines (herd_log_lines_dropped_total counts them)",
                self.stream.name()
            );
        }
    }

    /// The writer thread: writes what is queued, batch by batch. Blocking
    /// here (a full pipe) is the point: it holds up nothing but this stream.
    fn write_forever(&self, mut out: Box<dyn Write + Send>) {
        loop {
            let batch = {
                let mut state = self.lock();
                while state.lines.is_empty() {
                    state = self
                        .arrived
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                std::mem::take(&mut state.lines)
            };
            let size: usize = batch.iter().map(Vec::len).sum();
            // A failed write (nothing reads the stream any more) loses the line.
            let failed = batch
                .iter()
                .filter(|line| out.write_all(line).is_err())
                .count() as u64;
            let _ = out.flush();
            {
                let mut state = self.lock();
                state.bytes -= size;
                state.warning.unreported += failed;
            }
            self.dropped.fetch_add(failed, Relaxed);
            self.written.notify_all();
            self.warn_if_due(DROP_WARNING_INTERVAL);
        }
    }

    /// Waits until every queued line is written, or until `deadline`.
    fn wait_written(&self, deadline: Instant) -> bool {
        let mut state = self.lock();
        while state.bytes > 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .written
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

/// When to say that lines were dropped: at the first drop, then at most
/// once per interval, with the number dropped since the last warning.
#[derive(Debug, Default)]
struct DropWarning {
    unreported: u64,
    last: Option<Instant>,
}

impl DropWarning {
    /// How many drops to report now, if a warning is due.
    fn due(&mut self, now: Instant, interval: Duration) -> Option<u64> {
        if self.unreported == 0 {
            return None;
        }
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < interval)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unreported))
    }
}

/// Cuts a byte stream into lines of at most `max` bytes of content, each
/// emitted whole as `framing` frames it (with [`SPLIT_MARKER`], or
/// `"split":true`, if the line goes on in the next piece).
struct LineSplitter {
    origin: Origin,
    framing: Framing,
    /// The content of the line so far.
    line: Vec<u8>,
    max: usize,
}

impl LineSplitter {
    fn new(origin: Origin, framing: Framing, max: usize) -> LineSplitter {
        LineSplitter {
            origin,
            framing,
            line: Vec::with_capacity(128),
            max,
        }
    }

    fn content_len(&self) -> usize {
        self.line.len()
    }

    /// Takes the next bytes of the stream; emits every line they end.
    fn push(&mut self, mut bytes: &[u8], emit: &mut impl FnMut(Vec<u8>)) {
        while !bytes.is_empty() {
            let newline = bytes.iter().position(|&b| b == b'\n');
            let end = newline.unwrap_or(bytes.len());
            let room = self.max - self.content_len();
            if end > room {
                // The line is longer than the bound: this piece ends here.
                self.line.extend_from_slice(&bytes[..room]);
                self.end_line(true, emit);
                bytes = &bytes[room..];
                continue;
            }
            self.line.extend_from_slice(&bytes[..end]);
            match newline {
                Some(at) => {
                    self.end_line(false, emit);
                    bytes = &bytes[at + 1..];
                }
                None => break,
            }
        }
    }

    /// The stream ended: emits its last line if it had no newline.
    fn finish(mut self, emit: &mut impl FnMut(Vec<u8>)) {
        if self.content_len() > 0 {
            self.end_line(false, emit);
        }
    }

    fn end_line(&mut self, split: bool, emit: &mut impl FnMut(Vec<u8>)) {
        crate::log_files::record(self.origin, &self.line, split);
        let framed =
            self.framing
                .frame(self.origin, &self.line, split, std::time::SystemTime::now());
        self.line.clear();
        emit(framed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::sync::Arc;

    fn split(max: usize, chunks: &[&[u8]]) -> Vec<String> {
        let origin = Origin {
            slot: Some(4),
            pid: 1,
            stderr: false,
        };
        let mut splitter = LineSplitter::new(origin, Framing::default(), max);
        let mut out = Vec::new();
        let mut emit = |line: Vec<u8>| out.push(String::from_utf8(line).unwrap());
        for chunk in chunks {
            splitter.push(chunk, &mut emit);
        }
        splitter.finish(&mut emit);
        out
    }

    #[test]
    fn lines_are_prefixed_and_whole_across_reads() {
        assert_eq!(
            split(64, &[b"one\ntw", b"o\n\nthr", b"ee"]),
            [
                "[worker 4] one\n",
                "[worker 4] two\n",
                "[worker 4] \n",
                "[worker 4] three\n"
            ]
        );
    }

    #[test]
    fn a_long_line_is_split_at_the_bound_and_marked() {
        let marker = String::from_utf8(SPLIT_MARKER.to_vec()).unwrap();
        // Exactly the bound is not split; one byte more is.
        assert_eq!(split(4, &[b"abcd\n"]), ["[worker 4] abcd\n"]);
        assert_eq!(
            split(4, &[b"abcde\n"]),
            [
                format!("[worker 4] abcd{marker}\n"),
                "[worker 4] e\n".into()
            ]
        );
        // The same when the bytes come one read at a time.
        let bytes = b"abcdefghij\nk";
        let one_by_one: Vec<&[u8]> = bytes.chunks(1).collect();
        let expected = [
            format!("[worker 4] abcd{marker}\n"),
            format!("[worker 4] efgh{marker}\n"),
            "[worker 4] ij\n".into(),
            "[worker 4] k\n".into(),
        ];
        assert_eq!(split(4, &one_by_one), expected);
        assert_eq!(split(4, &[bytes]), expected);
        // A full piece whose newline comes in the next read is not split.
        assert_eq!(split(4, &[b"abcd", b"\n"]), ["[worker 4] abcd\n"]);
    }

    #[test]
    fn warnings_come_at_the_first_drop_then_once_per_interval() {
        let mut warning = DropWarning::default();
        let start = Instant::now();
        let interval = Duration::from_secs(10);
        assert_eq!(warning.due(start, interval), None, "nothing dropped yet");
        warning.unreported = 1;
        assert_eq!(warning.due(start, interval), Some(1));
        warning.unreported = 500;
        assert_eq!(warning.due(start + Duration::from_secs(3), interval), None);
        warning.unreported += 1;
        assert_eq!(
            warning.due(start + Duration::from_secs(10), interval),
            Some(501)
        );
        assert_eq!(
            warning.due(start + Duration::from_secs(30), interval),
            None,
            "nothing new to report"
        );
    }

    /// A writer that takes nothing until the test says so.
    struct Gate {
        open: mpsc::Receiver<()>,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gate {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.open
                .recv()
                .map_err(|_| std::io::ErrorKind::BrokenPipe)?;
            self.written.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_writer_makes_the_queue_drop_and_count_never_block() {
        let queue: &'static OutputQueue = Box::leak(Box::new(OutputQueue::new(Stream::Stdout, 10)));
        let (open, gate) = mpsc::channel();
        let written = Arc::new(Mutex::new(Vec::new()));
        let out = Gate {
            open: gate,
            written: written.clone(),
        };
        std::thread::spawn(move || queue.write_forever(Box::new(out)));
        // 10 bytes fit, whatever the writer does; the rest is dropped at once.
        assert_eq!(queue.push(b"12345".to_vec()), Pushed::Queued);
        assert_eq!(queue.push(b"67890".to_vec()), Pushed::Queued);
        assert_eq!(queue.push(b"x".to_vec()), Pushed::Dropped);
        assert_eq!(queue.push(b"y".to_vec()), Pushed::Dropped);
        assert_eq!(queue.dropped.load(Relaxed), 2);
        // The writer comes back: what was queued is written, room again.
        open.send(()).unwrap();
        open.send(()).unwrap();
        assert!(queue.wait_written(Instant::now() + Duration::from_secs(20)));
        assert_eq!(&written.lock().unwrap()[..], b"1234567890");
        assert_eq!(queue.push(b"abc".to_vec()), Pushed::Queued);
        assert_eq!(queue.dropped.load(Relaxed), 2);
    }
}
