//! `herd bench`: a small, bounded HTTP/1.1 load generator.
//!
//! Owns the target and source-range parsing, the client tasks, reading
//! responses (heads parsed by httparse) and the [`BenchReport`]. It sends
//! `GET` requests to one explicit address (an IP, or `localhost`; never a
//! name that needs DNS), from `connections` concurrent tasks, on keep-alive
//! connections or on a fresh connection per request, optionally binding each
//! new client socket to the next address of a source range so that sticky
//! mode sees many clients.
//!
//! Every run is bounded: by a duration (at most [`MAX_DURATION`]) or by an
//! exact request budget (at most [`MAX_REQUESTS`]) that the tasks claim one
//! request at a time from a shared atomic, and each request by a timeout.
//! Failures never abort a run: they are counted by kind in the report.

use std::collections::BTreeMap;
use std::fmt;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;

use herd::metrics::{fairness, Fairness};

/// Longest run `--duration` accepts.
pub const MAX_DURATION: Duration = Duration::from_secs(600);
/// Largest `--requests` budget.
pub const MAX_REQUESTS: u64 = 100_000_000;
/// Most concurrent client tasks.
pub const MAX_CONNECTIONS: usize = 10_000;
/// A response whose header block is larger than this is an error.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// A response with more header lines than this is an error.
const MAX_HEADERS: usize = 100;
/// A response whose body is larger than this is an error.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Latencies are recorded in microseconds up to one hour (longer saturate).
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// A bad target, range or option: nothing was sent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BenchError {
    #[error("bad target {target:?}: {reason}")]
    Target { target: String, reason: String },
    #[error("bad source range {range:?}: {reason}")]
    SourceRange { range: String, reason: String },
    #[error("{0}")]
    Options(String),
}

/// Where the load goes: one explicit address and a request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    pub path: String,
}

impl Target {
    /// Parses `http://IP:PORT/path`, `IP:PORT` (path `/`) or the same with
    /// `localhost` (127.0.0.1). Other host names are refused: the load must
    /// only go to an address given explicitly.
    pub fn parse(text: &str) -> Result<Target, BenchError> {
        let bad = |reason: &str| BenchError::Target {
            target: text.to_string(),
            reason: reason.to_string(),
        };
        let rest = text.trim();
        if rest.starts_with("https://") {
            return Err(bad("https is not supported; use http://IP:PORT/path"));
        }
        let rest = rest.strip_prefix("http://").unwrap_or(rest);
        if rest.contains("://") {
            return Err(bad("only http:// targets are supported"));
        }
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad(
                "the path must not contain spaces or control characters",
            ));
        }
        if authority.is_empty() {
            return Err(bad(
                "missing address: expected http://IP:PORT/path or IP:PORT",
            ));
        }
        if authority.contains('@') {
            return Err(bad("credentials in the target are not supported"));
        }
        let addr = match authority.parse::<SocketAddr>() {
            Ok(addr) => addr,
            Err(_) => {
                let Some((host, port)) = authority.rsplit_once(':') else {
                    return Err(bad("missing port: expected IP:PORT"));
                };
                let port: u16 = port
                    .parse()
                    .map_err(|_| bad("the port must be a number from 1 to 65535"))?;
                if host.eq_ignore_ascii_case("localhost") {
                    SocketAddr::from(([127, 0, 0, 1], port))
                } else if host.parse::<IpAddr>().is_ok() || host.starts_with('[') {
                    return Err(bad("malformed address (IPv6 addresses go in brackets)"));
                } else {
                    return Err(bad(&format!(
                        "host names are refused (only localhost is): \
                         give the IP address of {host:?} explicitly"
                    )));
                }
            }
        };
        if addr.port() == 0 {
            return Err(bad("port 0 is not a destination"));
        }
        if addr.ip().is_unspecified() || addr.ip().is_multicast() {
            return Err(bad("not a unicast destination address"));
        }
        Ok(Target { addr, path })
    }

    fn url(&self) -> String {
        format!("http://{}{}", self.addr, self.path)
    }
}

/// An inclusive range of IPv4 source addresses, used round-robin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceRange {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
}

impl SourceRange {
    /// Parses `A-B` (e.g. `127.0.0.2-127.0.0.51`) or a single address `A`.
    pub fn parse(text: &str) -> Result<SourceRange, BenchError> {
        let bad = |reason: &str| BenchError::SourceRange {
            range: text.to_string(),
            reason: reason.to_string(),
        };
        let (first, last) = text.trim().split_once('-').unwrap_or((text, text));
        let parse = |s: &str| {
            s.trim()
                .parse::<Ipv4Addr>()
                .map_err(|_| bad(&format!("{:?} is not an IPv4 address", s.trim())))
        };
        let (first, last) = (parse(first)?, parse(last)?);
        if u32::from(first) > u32::from(last) {
            return Err(bad("the first address is above the last"));
        }
        if first.is_unspecified() || first.is_broadcast() || last.is_broadcast() {
            return Err(bad(
                "0.0.0.0 and 255.255.255.255 cannot be source addresses",
            ));
        }
        Ok(SourceRange { first, last })
    }

    pub fn len(&self) -> u64 {
        u64::from(u32::from(self.last) - u32::from(self.first)) + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The `index`-th address, wrapping around.
    pub fn nth(&self, index: u64) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.first) + (index % self.len()) as u32)
    }
}

/// When a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Send requests until this much time has passed.
    Duration(Duration),
    /// Attempt exactly this many requests in total.
    Requests(u64),
}

/// Everything `herd bench` was asked to do.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub target: Target,
    pub connections: usize,
    pub limit: Limit,
    pub new_connection_per_request: bool,
    pub source_range: Option<SourceRange>,
    /// Per request (connecting included); a request that takes longer is an error.
    pub timeout: Duration,
}

impl BenchOptions {
    /// Checks the bounds every run must respect.
    pub fn validate(&self) -> Result<(), BenchError> {
        let bad = |s: String| Err(BenchError::Options(s));
        if self.connections == 0 || self.connections > MAX_CONNECTIONS {
            return bad(format!(
                "--connections must be from 1 to {MAX_CONNECTIONS}, not {}",
                self.connections
            ));
        }
        match self.limit {
            Limit::Duration(d) if d.is_zero() || d > MAX_DURATION => {
                return bad(format!(
                    "--duration must be above 0 and at most 10m, not {d:?}"
                ))
            }
            Limit::Requests(n) if n == 0 || n > MAX_REQUESTS => {
                return bad(format!(
                    "--requests must be from 1 to {MAX_REQUESTS}, not {n}"
                ))
            }
            _ => {}
        }
        if self.timeout.is_zero() || self.timeout > MAX_DURATION {
            return bad(format!(
                "--timeout must be above 0 and at most 10m, not {:?}",
                self.timeout
            ));
        }
        if self.source_range.is_some() && !self.target.addr.is_ipv4() {
            return bad("--source-range is IPv4 but the target is IPv6".into());
        }
        Ok(())
    }
}

/// Latency of successful requests, write to full response, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Latency {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// How many successful answers one worker process gave.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerShare {
    pub pid: u32,
    pub count: u64,
    pub share_percent: f64,
}

/// The result of a run: what was sent, what came back, how fast.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub target: String,
    /// `keep-alive` or `new-connection-per-request`.
    pub mode: &'static str,
    pub connections: usize,
    /// The `--requests` budget, when the run was bounded by one.
    pub requests_limit: Option<u64>,
    /// The `--duration`, in seconds, when the run was bounded by one.
    pub duration_limit_secs: Option<f64>,
    pub requests: u64,
    pub succeeded: u64,
    pub errors: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    pub duration_secs: f64,
    pub requests_per_sec: f64,
    pub connections_opened: u64,
    pub connections_per_sec: f64,
    /// `None` when no request succeeded.
    pub latency: Option<Latency>,
    /// Answers per worker pid (from `Handled by worker <pid>` bodies), by pid.
    pub workers: Vec<WorkerShare>,
    /// Spread over `workers`; `None` when no pid was seen.
    pub fairness: Option<Fairness>,
}

/// Runs the load and reports. Fails only on invalid options; every failed
/// request is counted in the report instead.
pub async fn run(options: BenchOptions) -> Result<BenchReport, BenchError> {
    options.validate()?;
    let shared = Arc::new(Shared {
        request: request_bytes(&options),
        budget: AtomicU64::new(match options.limit {
            Limit::Requests(n) => n,
            Limit::Duration(_) => u64::MAX,
        }),
        next_source: AtomicUsize::new(0),
        options: options.clone(),
    });
    let start = Instant::now();
    let deadline = match options.limit {
        Limit::Duration(d) => Some(start + d),
        Limit::Requests(_) => None,
    };
    let tasks = match options.limit {
        Limit::Requests(n) => options.connections.min(n as usize),
        Limit::Duration(_) => options.connections,
    };
    let mut set = JoinSet::new();
    for _ in 0..tasks {
        set.spawn(client(shared.clone(), deadline));
    }
    let mut total = Tally::new();
    while let Some(result) = set.join_next().await {
        match result {
            Ok(tally) => total.merge(tally),
            Err(e) => *total.errors.entry(format!("task: {e}")).or_insert(0) += 1,
        }
    }
    Ok(total.report(&options, start.elapsed()))
}

/// What every client task reads.
struct Shared {
    options: BenchOptions,
    request: Vec<u8>,
    /// Requests left to claim (`u64::MAX` for a duration run).
    budget: AtomicU64,
    /// Index of the next source address to bind.
    next_source: AtomicUsize,
}

fn request_bytes(options: &BenchOptions) -> Vec<u8> {
    let close = if options.new_connection_per_request {
        "Connection: close\r\n"
    } else {
        ""
    };
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n{close}\r\n",
        options.target.path, options.target.addr
    )
    .into_bytes()
}

/// One task's counts, merged at the end.
struct Tally {
    requests: u64,
    succeeded: u64,
    errors: BTreeMap<String, u64>,
    connections_opened: u64,
    pids: BTreeMap<u32, u64>,
    latency: Histogram<u64>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            requests: 0,
            succeeded: 0,
            errors: BTreeMap::new(),
            connections_opened: 0,
            pids: BTreeMap::new(),
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid bounds"),
        }
    }

    fn error(&mut self, kind: String) {
        *self.errors.entry(kind).or_insert(0) += 1;
    }

    fn merge(&mut self, other: Tally) {
        self.requests += other.requests;
        self.succeeded += other.succeeded;
        self.connections_opened += other.connections_opened;
        for (kind, n) in other.errors {
            *self.errors.entry(kind).or_insert(0) += n;
        }
        for (pid, n) in other.pids {
            *self.pids.entry(pid).or_insert(0) += n;
        }
        self.latency
            .add(&other.latency)
            .expect("histograms with the same bounds");
    }

    fn report(self, options: &BenchOptions, elapsed: Duration) -> BenchReport {
        let secs = elapsed.as_secs_f64();
        let per_sec = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let errors = self.errors.values().sum();
        let latency = (!self.latency.is_empty()).then(|| Latency {
            p50_us: self.latency.value_at_quantile(0.50),
            p90_us: self.latency.value_at_quantile(0.90),
            p99_us: self.latency.value_at_quantile(0.99),
            max_us: self.latency.max(),
        });
        let answered: u64 = self.pids.values().sum();
        let workers = self
            .pids
            .iter()
            .map(|(&pid, &count)| WorkerShare {
                pid,
                count,
                share_percent: 100.0 * count as f64 / answered as f64,
            })
            .collect();
        let counts: Vec<u64> = self.pids.values().copied().collect();
        BenchReport {
            target: options.target.url(),
            mode: if options.new_connection_per_request {
                "new-connection-per-request"
            } else {
                "keep-alive"
            },
            connections: options.connections,
            requests_limit: match options.limit {
                Limit::Requests(n) => Some(n),
                Limit::Duration(_) => None,
            },
            duration_limit_secs: match options.limit {
                Limit::Duration(d) => Some(d.as_secs_f64()),
                Limit::Requests(_) => None,
            },
            requests: self.requests,
            succeeded: self.succeeded,
            errors,
            errors_by_kind: self.errors,
            duration_secs: secs,
            requests_per_sec: per_sec(self.requests),
            connections_opened: self.connections_opened,
            connections_per_sec: per_sec(self.connections_opened),
            latency,
            workers,
            fairness: fairness(&counts),
        }
    }
}

/// Why one request failed; the text is the error kind in the report.
#[derive(Debug)]
enum Failure {
    Connect(String),
    Write(String),
    Read(String),
}

impl Failure {
    fn kind(&self) -> String {
        match self {
            Failure::Connect(e) => format!("connect: {e}"),
            Failure::Write(e) => format!("write: {e}"),
            Failure::Read(e) => format!("read: {e}"),
        }
    }
}

/// An open client connection and its read buffer.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// One client task: claims a request, sends it, reads the answer, until the
/// budget is spent or the deadline passes.
async fn client(shared: Arc<Shared>, deadline: Option<Instant>) -> Tally {
    let options = &shared.options;
    let mut tally = Tally::new();
    let mut conn: Option<Conn> = None;
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        // Claim one request of the budget before sending it, so that exactly
        // N are attempted over all tasks.
        if shared
            .budget
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
            .is_err()
        {
            break;
        }
        let attempt = tokio::time::timeout(
            options.timeout,
            request(&shared, &mut conn, &mut tally.connections_opened),
        );
        let outcome = match deadline {
            // A request still running when a duration run ends is abandoned
            // and not counted.
            Some(d) => match tokio::time::timeout_at(d, attempt).await {
                Ok(outcome) => outcome,
                Err(_) => break,
            },
            None => attempt.await,
        };
        tally.requests += 1;
        match outcome {
            Err(_) => {
                conn = None;
                tally.error("timeout".into());
            }
            Ok(Err(failure)) => {
                conn = None;
                tally.error(failure.kind());
            }
            Ok(Ok((answer, latency))) => {
                if !answer.keep_alive || options.new_connection_per_request {
                    conn = None;
                }
                if (200..300).contains(&answer.status) {
                    tally.succeeded += 1;
                    tally
                        .latency
                        .saturating_record(latency.as_micros().max(1) as u64);
                    if let Some(pid) = answer.pid {
                        *tally.pids.entry(pid).or_insert(0) += 1;
                    }
                } else {
                    tally.error(format!("status {}xx", answer.status / 100));
                }
            }
        }
    }
    tally
}

/// What came back for one request.
struct Answer {
    status: u16,
    keep_alive: bool,
    pid: Option<u32>,
}

/// Sends one request (connecting first if needed) and reads its response.
/// Returns the latency from write to full response.
///
/// A reused keep-alive connection that the server closed while idle (the
/// write fails, or it ends before a single byte of response) is not an
/// error: the request is sent once more on a new connection.
async fn request(
    shared: &Shared,
    conn: &mut Option<Conn>,
    opened: &mut u64,
) -> Result<(Answer, Duration), Failure> {
    let options = &shared.options;
    let mut reused = conn.is_some();
    loop {
        let c = match conn {
            Some(c) => c,
            None => {
                let stream = connect(shared).await.map_err(Failure::Connect)?;
                *opened += 1;
                conn.insert(Conn {
                    stream,
                    buf: Vec::with_capacity(4096),
                })
            }
        };
        let started = Instant::now();
        if let Err(e) = c.stream.write_all(&shared.request).await {
            if reused {
                (*conn, reused) = (None, false);
                continue;
            }
            return Err(Failure::Write(e.to_string()));
        }
        let response = read_response(
            &mut c.stream,
            &mut c.buf,
            options.new_connection_per_request,
        )
        .await;
        let (head, body) = match response {
            Ok(response) => response,
            Err(_) if reused && c.buf.is_empty() => {
                (*conn, reused) = (None, false);
                continue;
            }
            Err(e) => return Err(Failure::Read(e)),
        };
        let latency = started.elapsed();
        let pid = worker_pid(&c.buf[body]);
        return Ok((
            Answer {
                status: head.status,
                keep_alive: !head.close,
                pid,
            },
            latency,
        ));
    }
}

/// Opens a connection to the target, from the next source address if a range was given.
async fn connect(shared: &Shared) -> Result<TcpStream, String> {
    let options = &shared.options;
    let addr = options.target.addr;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| e.to_string())?;
    if let Some(range) = &options.source_range {
        let index = shared.next_source.fetch_add(1, Relaxed) as u64;
        let source = range.nth(index);
        socket
            .bind(SocketAddr::new(source.into(), 0))
            .map_err(|e| format!("bind {source}: {e}"))?;
    }
    let stream = socket.connect(addr).await.map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// The parts of a response head the client needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    /// `Content-Length`, if present.
    pub content_length: Option<usize>,
    /// The server said `Connection: close` (or spoke HTTP/1.0 without keep-alive).
    pub close: bool,
    /// Bytes of the status line and headers, the blank line included.
    pub head_len: usize,
}

/// Parses a response head from the start of `buf` with httparse: `Ok(None)`
/// while the blank line that ends it has not arrived yet. Only HTTP/1.0 and
/// HTTP/1.1, a status from 100 to 599, UTF-8 header values, and a body
/// framed by `Content-Length` (or by the end of the connection).
pub fn parse_head(buf: &[u8]) -> Result<Option<ResponseHead>, String> {
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut headers,
    );
    let head_len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e @ (httparse::Error::Version | httparse::Error::Status)) => {
            return Err(format!("malformed status line: {e}"))
        }
        Err(e) => return Err(format!("malformed response head: {e}")),
    };
    let status = response
        .code
        .filter(|s| (100..600).contains(s))
        .ok_or("malformed status line: status out of range")?;
    let mut content_length = None;
    let mut close = response.version == Some(0);
    for header in response.headers.iter() {
        let name = header.name;
        let value = std::str::from_utf8(header.value)
            .map_err(|_| "non-UTF-8 response head")?
            .trim();
        if name.eq_ignore_ascii_case("content-length") {
            let length: usize = value
                .parse()
                .map_err(|_| format!("bad Content-Length {value:?}"))?;
            if content_length.is_some_and(|l| l != length) {
                return Err("conflicting Content-Length headers".into());
            }
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("Transfer-Encoding is not supported; need Content-Length".into());
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    close = false;
                }
            }
        }
    }
    Ok(Some(ResponseHead {
        status,
        content_length,
        close,
        head_len,
    }))
}

/// Reads one full response into `buf` (cleared first): the head, then
/// `Content-Length` bytes of body, or everything to EOF when `to_eof_allowed`
/// and the response has no length. Returns the head and the body's range in `buf`.
async fn read_response(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    to_eof_allowed: bool,
) -> Result<(ResponseHead, std::ops::Range<usize>), String> {
    buf.clear();
    let head = loop {
        if let Some(head) = parse_head(buf)? {
            break head;
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err("response head too large".into());
        }
        if read_more(stream, buf).await? == 0 {
            return Err(if buf.is_empty() {
                "connection closed without a response".into()
            } else {
                "connection closed in the response head".into()
            });
        }
    };
    let no_body = head.status < 200 || head.status == 204 || head.status == 304;
    let length = match head.content_length {
        _ if no_body => 0,
        Some(length) if length > MAX_BODY_BYTES => {
            return Err(format!("response body of {length} bytes is too large"))
        }
        Some(length) => length,
        None if to_eof_allowed => {
            while read_more(stream, buf).await? > 0 {
                if buf.len() - head.head_len > MAX_BODY_BYTES {
                    return Err("response body too large".into());
                }
            }
            let body = head.head_len..buf.len();
            return Ok((
                ResponseHead {
                    close: true,
                    ..head
                },
                body,
            ));
        }
        None => return Err("response without Content-Length on a keep-alive connection".into()),
    };
    let end = head.head_len + length;
    while buf.len() < end {
        if read_more(stream, buf).await? == 0 {
            return Err("connection closed in the response body".into());
        }
    }
    // We never pipeline: bytes beyond the response mean the stream is out of step.
    let close = head.close || buf.len() > end;
    Ok((ResponseHead { close, ..head }, head.head_len..end))
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<usize, String> {
    buf.reserve(8192);
    stream.read_buf(buf).await.map_err(|e| e.to_string())
}

/// The pid in a hello-worker body, `Handled by worker <pid>`.
pub fn worker_pid(body: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(body).ok()?.trim();
    text.strip_prefix("Handled by worker ")?.trim().parse().ok()
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bound = match (self.requests_limit, self.duration_limit_secs) {
            (Some(n), _) => format!("exactly {n} requests"),
            (None, Some(secs)) => format!("for {}", human_secs(secs)),
            (None, None) => String::new(),
        };
        writeln!(
            f,
            "herd bench {}: {} connections, {}, {bound}",
            self.target, self.connections, self.mode
        )?;
        match self.requests_limit {
            Some(n) => writeln!(f, "requests:     {} (of {n} requested)", self.requests)?,
            None => writeln!(f, "requests:     {}", self.requests)?,
        }
        writeln!(f, "succeeded:    {}", self.succeeded)?;
        writeln!(f, "errors:       {}", self.errors)?;
        for (kind, n) in &self.errors_by_kind {
            writeln!(f, "  {n:>10}  {kind}")?;
        }
        writeln!(f, "duration:     {}", human_secs(self.duration_secs))?;
        writeln!(f, "throughput:   {:.1} requests/s", self.requests_per_sec)?;
        writeln!(
            f,
            "connections:  {} opened, {:.1}/s",
            self.connections_opened, self.connections_per_sec
        )?;
        match &self.latency {
            Some(l) => writeln!(
                f,
                "latency:      p50 {}  p90 {}  p99 {}  max {}",
                human_us(l.p50_us),
                human_us(l.p90_us),
                human_us(l.p99_us),
                human_us(l.max_us)
            )?,
            None => writeln!(f, "latency:      - (no successful request)")?,
        }
        if !self.workers.is_empty() {
            writeln!(f, "workers:      {} answered", self.workers.len())?;
            for w in &self.workers {
                writeln!(
                    f,
                    "  pid {:>8}  {:>10}  {:>5.1}%",
                    w.pid, w.count, w.share_percent
                )?;
            }
            if let Some(fair) = &self.fairness {
                let ratio = fair
                    .max_min_ratio
                    .map_or("-".to_string(), |r| format!("{r:.2}"));
                writeln!(
                    f,
                    "fairness:     max/min {ratio}, Jain's index {:.3}",
                    fair.jain_index
                )?;
            }
        }
        Ok(())
    }
}

fn human_secs(secs: f64) -> String {
    if secs < 1.0 {
        format!("{:.0} ms", secs * 1000.0)
    } else {
        format!("{secs:.2} s")
    }
}

fn human_us(us: u64) -> String {
    if us < 1000 {
        format!("{us} µs")
    } else if us < 1_000_000 {
        format!("{:.2} ms", us as f64 / 1000.0)
    } else {
        format!("{:.2} s", us as f64 / 1_000_000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(text: &str) -> Result<Target, BenchError> {
        Target::parse(text)
    }

    #[test]
    fn targets_with_and_without_scheme_and_path() {
        let t = target("http://127.0.0.1:3000/hello?x=1").unwrap();
        assert_eq!(t.addr, "127.0.0.1:3000".parse().unwrap());
        assert_eq!(t.path, "/hello?x=1");
        let t = target("127.0.0.1:3000").unwrap();
        assert_eq!(t.path, "/");
        let t = target("http://127.0.0.1:3000").unwrap();
        assert_eq!(t.path, "/");
        let t = target("http://[::1]:8080/x").unwrap();
        assert_eq!(t.addr, "[::1]:8080".parse().unwrap());
        assert_eq!(t.url(), "http://[::1]:8080/x");
        let t = target("localhost:80").unwrap();
        assert_eq!(t.addr, "127.0.0.1:80".parse().unwrap());
        let t = target("http://LOCALHOST:80/a").unwrap();
        assert_eq!(t.addr, "127.0.0.1:80".parse().unwrap());
    }

    #[test]
    fn host_names_and_malformed_targets_are_refused() {
        let reason = |text: &str| match target(text) {
            Err(BenchError::Target { reason, .. }) => reason,
            other => panic!("{text:?} gave {other:?}"),
        };
        assert!(reason("example.com:80").contains("host names are refused"));
        assert!(reason("http://example.com/").contains("missing port"));
        assert!(reason("http://").contains("missing address"));
        assert!(reason("").contains("missing address"));
        assert!(reason("127.0.0.1").contains("missing port"));
        assert!(reason("127.0.0.1:0").contains("port 0"));
        assert!(reason("127.0.0.1:99999").contains("port"));
        assert!(reason("0.0.0.0:80").contains("unicast"));
        assert!(reason("https://127.0.0.1:443/").contains("https"));
        assert!(reason("ftp://127.0.0.1:21/").contains("only http"));
        assert!(reason("::1:80").contains("brackets"));
        assert!(reason("http://127.0.0.1:80/a b").contains("spaces"));
    }

    #[test]
    fn source_ranges() {
        let r = SourceRange::parse("127.0.0.2-127.0.0.51").unwrap();
        assert_eq!(r.len(), 50);
        assert_eq!(r.nth(0), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(r.nth(49), Ipv4Addr::new(127, 0, 0, 51));
        assert_eq!(r.nth(50), Ipv4Addr::new(127, 0, 0, 2));
        let one = SourceRange::parse("127.0.0.9").unwrap();
        assert_eq!((one.len(), one.nth(7)), (1, Ipv4Addr::new(127, 0, 0, 9)));
        let wide = SourceRange::parse("10.0.0.250-10.0.1.4").unwrap();
        assert_eq!(wide.len(), 11);
        assert_eq!(wide.nth(6), Ipv4Addr::new(10, 0, 1, 0));
        for bad in [
            "127.0.0.5-127.0.0.2",
            "127.0.0.1-x",
            "::1-::2",
            "",
            "0.0.0.0-1.0.0.0",
        ] {
            assert!(
                matches!(SourceRange::parse(bad), Err(BenchError::SourceRange { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn response_heads() {
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap(), None);
        let head =
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 24\r\nX-Herd-Worker: 1\r\n\r\nHandled")
                .unwrap()
                .unwrap();
        assert_eq!(
            head,
            ResponseHead {
                status: 200,
                content_length: Some(24),
                close: false,
                head_len: 57,
            }
        );
        let head = parse_head(b"HTTP/1.1 503 Busy\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            (head.status, head.close, head.content_length),
            (503, true, None)
        );
        let head = parse_head(b"HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert!(head.close);
        let head = parse_head(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!head.close);
        for bad in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/2.0 200 OK\r\n\r\n",
            b"HTTP/1.1 099 Early\r\n\r\n",
            b"HTTP/1.1 600 Late\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: \xff\r\n\r\n",
        ] {
            assert!(
                parse_head(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let many = format!(
            "HTTP/1.1 200 OK\r\n{}\r\n",
            "X: y\r\n".repeat(MAX_HEADERS + 1)
        );
        assert!(parse_head(many.as_bytes()).is_err());
    }

    #[test]
    fn worker_pids_from_bodies() {
        assert_eq!(worker_pid(b"Handled by worker 4242"), Some(4242));
        assert_eq!(worker_pid(b"Handled by worker 7\n"), Some(7));
        assert_eq!(worker_pid(b"hello"), None);
        assert_eq!(worker_pid(b"Handled by worker x"), None);
    }

    #[test]
    fn options_are_bounded() {
        let ok = BenchOptions {
            target: target("127.0.0.1:1").unwrap(),
            connections: 10,
            limit: Limit::Duration(Duration::from_secs(5)),
            new_connection_per_request: false,
            source_range: None,
            timeout: Duration::from_secs(10),
        };
        assert_eq!(ok.validate(), Ok(()));
        let with = |f: &dyn Fn(&mut BenchOptions)| {
            let mut o = ok.clone();
            f(&mut o);
            o.validate()
        };
        assert!(with(&|o| o.connections = 0).is_err());
        assert!(with(&|o| o.limit = Limit::Requests(0)).is_err());
        assert!(with(&|o| o.limit = Limit::Requests(MAX_REQUESTS + 1)).is_err());
        assert!(with(&|o| o.limit = Limit::Duration(Duration::from_secs(601))).is_err());
        assert!(with(&|o| o.limit = Limit::Duration(Duration::ZERO)).is_err());
        assert!(with(&|o| o.timeout = Duration::ZERO).is_err());
        assert!(with(&|o| {
            o.target = target("[::1]:80").unwrap();
            o.source_range = Some(SourceRange::parse("127.0.0.2").unwrap());
        })
        .is_err());
    }

    /// A server that answers one request per connection with Content-Length,
    /// then closes without saying `Connection: close`.
    #[tokio::test]
    async fn keep_alive_reconnects_when_the_server_closes_idle_connections() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for _ in 0..20 {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut buf = Vec::new();
                let whole = |buf: &[u8]| {
                    let mut headers = [httparse::EMPTY_HEADER; 16];
                    let parsed = httparse::Request::new(&mut headers).parse(buf);
                    parsed.is_ok_and(|status| status.is_complete())
                };
                while !whole(&buf) {
                    if stream.read_buf(&mut buf).await.unwrap() == 0 {
                        break;
                    }
                }
                let body = "Handled by worker 77";
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                stream.write_all(response.as_bytes()).await.unwrap();
            }
        });
        let report = run(BenchOptions {
            target: target(&addr.to_string()).unwrap(),
            connections: 1,
            limit: Limit::Requests(20),
            new_connection_per_request: false,
            source_range: None,
            timeout: Duration::from_secs(10),
        })
        .await
        .unwrap();
        server.await.unwrap();
        assert_eq!((report.requests, report.succeeded), (20, 20), "{report}");
        assert_eq!(report.connections_opened, 20, "{report}");
        assert_eq!(report.workers[0].count, 20);
    }

    #[tokio::test]
    async fn exactly_n_requests_against_a_closed_port() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let report = run(BenchOptions {
            target: target(&format!("127.0.0.1:{port}")).unwrap(),
            connections: 3,
            limit: Limit::Requests(10),
            new_connection_per_request: false,
            source_range: None,
            timeout: Duration::from_secs(10),
        })
        .await
        .unwrap();
        assert_eq!(
            (report.requests, report.errors, report.succeeded),
            (10, 10, 0)
        );
        assert_eq!(report.connections_opened, 0);
        assert!(report
            .errors_by_kind
            .keys()
            .all(|k| k.starts_with("connect: ")));
        assert!(report.latency.is_none() && report.fairness.is_none());
    }
}
