//! connect_storm: a bounded load of bare TCP connections, for servers that
//! close each connection at once (`herd-worker`'s `close_at_once` example),
//! so what is measured is the front's cost per connection, not a request's.
//!
//! Two shapes, each bounded by `--duration` (at most 10 min) and by
//! `--connections` (at most 10,000 concurrent), and printing one JSON line
//! on stdout when it ends:
//! - storm (the default): `--connections` loops, each connecting, waiting for
//!   EOF (the server closed) or a reset, and connecting again, until the
//!   duration is over. Counts completed connections, errors and timeouts.
//! - `--hold`: each loop connects once and keeps its connection open until
//!   the duration is over (or the server closes it), then closes it: open
//!   connections that wait in a front's queue (`benches/memory.sh`). Once
//!   every connect was tried it prints a first line, `"event": "holding"`.
//!
//! ```sh
//! cargo build --release --workspace --examples
//! ./target/release/examples/connect_storm 127.0.0.1:7000 --connections 50 --duration 5s
//! ./target/release/examples/connect_storm 127.0.0.1:7000 --connections 10000 --duration 20s --hold
//! ```
//!
//! Only the address given is contacted (an IP, as `herd bench` takes it).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use herd_tooling::bench::{SourceRange, Target, MAX_CONNECTIONS, MAX_DURATION};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{timeout_at, Instant};

/// A connection attempt (connect, then the wait for EOF) longer than this is
/// a timeout, unless `--timeout` says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed connect a loop pauses this long, so a refused or
/// exhausted target (no ephemeral port left) is not retried in a spin.
const ERROR_PAUSE: Duration = Duration::from_millis(10);
/// `--hold`: connects in flight at once, so 10,000 connections do not
/// overflow the target's accept queue in one burst (SYNs dropped, retried
/// a second later).
const HOLD_CONNECTS_IN_FLIGHT: usize = 256;

const USAGE: &str = "usage: connect_storm IP:PORT [--connections N] [--duration DUR] \
[--timeout DUR] [--source-range A-B] [--hold]";

/// What the command line asked for.
#[derive(Debug)]
struct Options {
    target: SocketAddr,
    /// Concurrent loops (storm) or connections held (hold).
    connections: usize,
    duration: Duration,
    /// Per connection attempt, connect and wait for EOF together.
    timeout: Duration,
    /// Bind each new socket to the next address of this range.
    source_range: Option<SourceRange>,
    hold: bool,
}

/// What the loops counted, shared between them.
#[derive(Debug, Default)]
struct Tally {
    /// Connections the connect of which succeeded.
    opened: AtomicU64,
    /// Ended by the server: EOF.
    eof: AtomicU64,
    /// Ended by the server: a reset after the connect.
    resets: AtomicU64,
    /// Connects that failed, and reads that failed otherwise than by reset.
    errors: AtomicU64,
    /// Attempts that took longer than `--timeout`.
    timeouts: AtomicU64,
    /// `--hold`: connections still open when the duration ended.
    still_open: AtomicU64,
    /// Connect attempts made so far (`--hold` says "holding" once all are).
    tried: AtomicU64,
    /// The first error's text, to say why errors happened.
    first_error: std::sync::Mutex<Option<String>>,
}

impl Tally {
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(what);
    }
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut options = Options {
        target: SocketAddr::from(([127, 0, 0, 1], 0)),
        connections: 50,
        duration: Duration::from_secs(5),
        timeout: DEFAULT_TIMEOUT,
        source_range: None,
        hold: false,
    };
    let mut target = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match arg.as_str() {
            "-c" | "--connections" => {
                let text = value(arg)?;
                options.connections = text
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_CONNECTIONS).contains(n))
                    .ok_or_else(|| {
                        format!("--connections {text:?}: expected 1 to {MAX_CONNECTIONS}")
                    })?;
            }
            "-d" | "--duration" => {
                let text = value(arg)?;
                options.duration = herd::config::parse_duration(&text)
                    .ok()
                    .filter(|d| !d.is_zero() && *d <= MAX_DURATION)
                    .ok_or_else(|| format!("--duration {text:?}: expected e.g. 5s, at most 10m"))?;
            }
            "--timeout" => {
                let text = value(arg)?;
                options.timeout = herd::config::parse_duration(&text)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| format!("--timeout {text:?}: expected e.g. 2s"))?;
            }
            "--source-range" => {
                let text = value(arg)?;
                options.source_range = Some(SourceRange::parse(&text).map_err(|e| e.to_string())?);
            }
            "--hold" => options.hold = true,
            "-h" | "--help" => return Err(USAGE.into()),
            text if target.is_none() && !text.starts_with('-') => {
                target = Some(Target::parse(text).map_err(|e| e.to_string())?.addr);
            }
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    options.target = target.ok_or("the target IP:PORT is missing")?;
    if options.source_range.is_some() && !options.target.is_ipv4() {
        return Err("--source-range is IPv4 but the target is IPv6".into());
    }
    Ok(options)
}

/// Opens one connection, from the `index`-th address of the range if any.
async fn connect(options: &Options, index: u64) -> std::io::Result<TcpStream> {
    let socket = if options.target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(range) = &options.source_range {
        socket.bind(SocketAddr::new(range.nth(index).into(), 0))?;
    }
    socket.connect(options.target).await
}

/// How one connection ended, once open.
enum Ended {
    Eof,
    Reset,
    Failed(std::io::Error),
}

/// Reads until the server closes: EOF or a reset. A server that sends
/// bytes first has them read and ignored.
async fn until_closed(stream: &mut TcpStream) -> Ended {
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => return Ended::Eof,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ended::Reset,
            Err(e) => return Ended::Failed(e),
        }
    }
}

/// One storm loop: connect, wait for the close, again, until `deadline`.
/// An attempt still running at the deadline is dropped uncounted.
async fn storm(options: Arc<Options>, tally: Arc<Tally>, next: Arc<AtomicU64>, deadline: Instant) {
    while Instant::now() < deadline {
        let attempt_deadline = (Instant::now() + options.timeout).min(deadline);
        let index = next.fetch_add(1, Relaxed);
        let attempt = async {
            let mut stream = match connect(&options, index).await {
                Ok(stream) => stream,
                Err(e) => return Err(e),
            };
            tally.opened.fetch_add(1, Relaxed);
            Ok(until_closed(&mut stream).await)
        };
        match timeout_at(attempt_deadline, attempt).await {
            Ok(Ok(Ended::Eof)) => {
                tally.eof.fetch_add(1, Relaxed);
            }
            Ok(Ok(Ended::Reset)) => {
                tally.resets.fetch_add(1, Relaxed);
            }
            Ok(Ok(Ended::Failed(e))) => tally.error(format!("read: {e}")),
            Ok(Err(e)) => {
                tally.error(format!("connect: {e}"));
                tokio::time::sleep(ERROR_PAUSE).await;
            }
            Err(_) if attempt_deadline < deadline => {
                tally.timeouts.fetch_add(1, Relaxed);
            }
            Err(_) => {}
        }
    }
}

/// One hold loop: connect once, keep the connection until `deadline` or
/// until the server closes it, then close it.
async fn hold(
    options: Arc<Options>,
    tally: Arc<Tally>,
    index: u64,
    connects: Arc<Semaphore>,
    deadline: Instant,
) {
    let connected = {
        let _permit = connects.acquire().await;
        let connect_deadline = (Instant::now() + options.timeout).min(deadline);
        let connected = timeout_at(connect_deadline, connect(&options, index)).await;
        tally.tried.fetch_add(1, Relaxed);
        connected
    };
    let mut stream = match connected {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return tally.error(format!("connect: {e}")),
        Err(_) => {
            tally.timeouts.fetch_add(1, Relaxed);
            return;
        }
    };
    tally.opened.fetch_add(1, Relaxed);
    match timeout_at(deadline, until_closed(&mut stream)).await {
        Ok(Ended::Eof) => {
            tally.eof.fetch_add(1, Relaxed);
        }
        Ok(Ended::Reset) => {
            tally.resets.fetch_add(1, Relaxed);
        }
        Ok(Ended::Failed(e)) => tally.error(format!("read: {e}")),
        Err(_) => {
            tally.still_open.fetch_add(1, Relaxed);
        }
    }
}

async fn run(options: Options) -> serde_json::Value {
    let options = Arc::new(options);
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let deadline = start + options.duration;
    let mut loops = JoinSet::new();
    let next = Arc::new(AtomicU64::new(0));
    let connects = Arc::new(Semaphore::new(HOLD_CONNECTS_IN_FLIGHT));
    for index in 0..options.connections as u64 {
        let (options, tally) = (options.clone(), tally.clone());
        if options.hold {
            loops.spawn(hold(options, tally, index, connects.clone(), deadline));
        } else {
            loops.spawn(storm(options, tally, next.clone(), deadline));
        }
    }
    if options.hold {
        // Say once when every connect was tried, so a script can measure.
        let total = options.connections as u64;
        while tally.tried.load(Relaxed) < total && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let line = serde_json::json!({
            "event": "holding",
            "open": tally.opened.load(Relaxed),
            "errors": tally.errors.load(Relaxed),
            "timeouts": tally.timeouts.load(Relaxed),
            "after_s": start.elapsed().as_secs_f64(),
        });
        println!("{line}");
    }
    while loops.join_next().await.is_some() {}
    let elapsed = start.elapsed().as_secs_f64();
    let eof = tally.eof.load(Relaxed);
    let resets = tally.resets.load(Relaxed);
    let completed = eof + resets;
    let first_error = tally
        .first_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    serde_json::json!({
        "event": "done",
        "target": options.target.to_string(),
        "shape": if options.hold { "hold" } else { "storm" },
        "concurrency": options.connections,
        "opened": tally.opened.load(Relaxed),
        "connections": completed,
        "eof": eof,
        "resets": resets,
        "errors": tally.errors.load(Relaxed),
        "timeouts": tally.timeouts.load(Relaxed),
        "still_open": tally.still_open.load(Relaxed),
        "duration_s": elapsed,
        "conn_per_sec": completed as f64 / elapsed,
        "first_error": first_error,
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match parse(&args) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("connect_storm: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("connect_storm: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let report = runtime.block_on(run(options));
    println!("{report}");
    ExitCode::SUCCESS
}
