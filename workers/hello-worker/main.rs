//! hello-worker: the seed article's example server, as a herd worker.
//!
//! Answers every HTTP/1.1 request with `200` and `Handled by worker <pid>`,
//! plus an `X-Herd-Worker: <slot>` header. Honours keep-alive and
//! `Connection: close`, and stops gracefully on SIGTERM or when herd asks it
//! to drain: no new connections, the request in progress on each open
//! connection completes, idle keep-alive connections are closed.
//!
//! Options:
//! - `--listen ADDR`: run without herd, accepting on ADDR itself (the
//!   no-front baseline in BENCHMARKS.md).
//!
//! Fault injection, for tests and demos (`--slow-slot`, `--stall-slot`,
//! `--unready-slot` pick one slot; `--delay-ms` without `--slow-slot`
//! applies to every slot):
//! - `--delay-ms N` [`--slow-slot S`]: answer each request after N ms.
//! - `--stall-slot N`: say READY, then never read the channel (a hung worker).
//! - `--unready-slot N`: never say READY (a worker that never starts up).
//! - `--ignore-drain`: ignore DRAIN and SIGTERM; serve until killed.
//! - `--memory-mb N`: allocate and touch N MiB at start (for `max_memory`).
//! - `--by-message`: ignore herd's counter page and report every connection
//!   by message (ACK, ACCEPTED, CLOSED), as a worker written before the
//!   page did (docs/protocol.md): herd then holds each connection until
//!   its ACK.

use std::mem::MaybeUninit;
use std::process::ExitCode;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use herd_worker::{Connection, Worker};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Requests with a header block larger than this are refused (431) and closed.
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Requests with more header lines than this are refused (431) and closed.
const MAX_HEADERS: usize = 64;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hello-worker: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where connections come from.
enum Source {
    Herd(Worker),
    Standalone(TcpListener),
}

/// A client connection from either source: herd's (which reports CLOSED
/// to herd when dropped) or a plain TcpStream.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Source {
    async fn next(&mut self) -> Result<Option<Box<dyn Io>>, Box<dyn std::error::Error>> {
        match self {
            Source::Herd(worker) => Ok(worker
                .accept()
                .await?
                .map(|c: Connection| Box::new(c.stream) as Box<dyn Io>)),
            Source::Standalone(listener) => Ok(Some(Box::new(listener.accept().await?.0))),
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let options = parse_options()?;
    let mut source = match options.listen {
        Some(addr) => Source::Standalone(TcpListener::bind(addr).await?),
        None if options.by_message => Source::Herd(Worker::from_env()?.without_page()),
        None => Source::Herd(Worker::from_env()?),
    };
    let slot = match &mut source {
        Source::Herd(worker) => worker.slot(),
        Source::Standalone(_) => 0,
    };
    if options.memory_mb > 0 {
        // Touch every page so it is resident, and keep it for the process's life.
        std::mem::forget(vec![1u8; options.memory_mb << 20]);
    }
    if let Source::Herd(worker) = &mut source {
        if options.stall_slot == Some(slot) {
            worker.ready().await?;
            eprintln!("stalling on purpose (--stall-slot {slot})");
            std::future::pending::<()>().await;
        }
        if options.unready_slot == Some(slot) {
            eprintln!("never saying READY (--unready-slot {slot})");
            std::future::pending::<()>().await;
        }
    }
    let delay = match options.slow_slot {
        Some(slow) if slow != slot => Duration::ZERO,
        _ => Duration::from_millis(options.delay_ms),
    };
    let response = Response::new(slot, delay);
    let mut terminate = signal(SignalKind::terminate())?;
    let (draining_tx, draining) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut failure = None;
    loop {
        tokio::select! {
            accepted = source.next() => match accepted {
                Ok(Some(stream)) => {
                    connections.spawn(serve(stream, response.clone(), draining.clone()));
                }
                Ok(None) => break,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            },
            _ = terminate.recv() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    if options.ignore_drain && failure.is_none() {
        eprintln!("ignoring the request to stop (--ignore-drain)");
        std::future::pending::<()>().await;
    }
    // Finish what is open before exiting, even when accepting failed.
    let _ = draining_tx.send(true);
    while connections.join_next().await.is_some() {}
    failure.map_or(Ok(()), Err)
}

#[derive(Default)]
struct Options {
    listen: Option<std::net::SocketAddr>,
    stall_slot: Option<usize>,
    unready_slot: Option<usize>,
    slow_slot: Option<usize>,
    delay_ms: u64,
    ignore_drain: bool,
    memory_mb: usize,
    by_message: bool,
}

fn parse_options() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let mut options = Options::default();
    while let Some(arg) = args.next() {
        if arg == "--ignore-drain" {
            options.ignore_drain = true;
            continue;
        }
        if arg == "--by-message" {
            options.by_message = true;
            continue;
        }
        let value = args.next().ok_or(format!("{arg} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("{arg} {value:?}: not a number"))
        };
        match arg.as_str() {
            "--listen" => {
                let addr = value
                    .parse()
                    .map_err(|_| format!("--listen {value:?}: not IP:PORT"))?;
                options.listen = Some(addr);
            }
            "--stall-slot" => options.stall_slot = Some(number()? as usize),
            "--unready-slot" => options.unready_slot = Some(number()? as usize),
            "--slow-slot" => options.slow_slot = Some(number()? as usize),
            "--delay-ms" => options.delay_ms = number()?,
            "--memory-mb" => options.memory_mb = number()? as usize,
            other => {
                return Err(format!(
                    "unknown argument {other:?} (see the header of workers/hello-worker/main.rs)"
                ))
            }
        }
    }
    Ok(options)
}

/// The fixed response, built once.
#[derive(Clone)]
struct Response {
    keep_alive: std::sync::Arc<[u8]>,
    close: std::sync::Arc<[u8]>,
    /// Wait this long before answering (`--delay-ms`).
    delay: Duration,
}

impl Response {
    fn new(slot: usize, delay: Duration) -> Self {
        let body = format!("Handled by worker {}", std::process::id());
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Herd-Worker: {slot}\r\n",
            body.len()
        );
        Response {
            keep_alive: format!("{head}\r\n{body}").into_bytes().into(),
            close: format!("{head}Connection: close\r\n\r\n{body}")
                .into_bytes()
                .into(),
            delay,
        }
    }
}

/// What a request's head says about the connection.
#[derive(Debug, PartialEq)]
struct RequestHead {
    /// Length of the head including the blank line.
    head_len: usize,
    body_len: usize,
    keep_alive: bool,
}

async fn serve(mut stream: Box<dyn Io>, response: Response, mut draining: watch::Receiver<bool>) {
    let mut buffer = BytesMut::with_capacity(4096);
    let mut served = 0u64;
    loop {
        let head = loop {
            match parse_head(&buffer) {
                Ok(Some(head)) => break head,
                Ok(None) => {}
                Err(status) => {
                    let _ = stream.write_all(status.as_bytes()).await;
                    return;
                }
            }
            // Wait for more bytes. When draining, a keep-alive connection
            // waiting for its next request is closed; a new connection is
            // not idle, its first request is on its way and gets served.
            let idle = buffer.is_empty() && served > 0;
            tokio::select! {
                read = stream.read_buf(&mut buffer) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
                _ = draining.wait_for(|d| *d), if idle => return,
            }
        };
        // Skip the request body (this server does not read it).
        let mut to_skip = head.head_len + head.body_len;
        while buffer.len() < to_skip {
            to_skip -= buffer.len();
            buffer.clear();
            match stream.read_buf(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
        buffer.advance(to_skip);
        if !response.delay.is_zero() {
            tokio::time::sleep(response.delay).await;
        }
        let keep_alive = head.keep_alive && !*draining.borrow();
        let bytes = if keep_alive {
            &response.keep_alive
        } else {
            &response.close
        };
        if stream.write_all(bytes).await.is_err() || !keep_alive {
            return;
        }
        served += 1;
    }
}

const BAD_REQUEST: &str =
    "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
const TOO_LARGE: &str =
    "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
/// Chunked bodies are not supported by this tiny server.
const NOT_IMPLEMENTED: &str =
    "HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// Parses a request head once it is complete. `Err` carries the error response.
///
/// httparse reads the head in place: the header slots live on the stack,
/// uninitialised, so a request costs no allocation and no clearing.
fn parse_head(buffer: &[u8]) -> Result<Option<RequestHead>, &'static str> {
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let head_len = match request.parse_with_uninit_headers(buffer, &mut headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buffer.len() > MAX_HEADER_BYTES => return Err(TOO_LARGE),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(TOO_LARGE),
        Err(_) => return Err(BAD_REQUEST),
    };
    // httparse knows HTTP/1.0 and HTTP/1.1 only.
    let mut keep_alive = request.version == Some(1);
    let mut body_len = 0;
    for header in request.headers.iter() {
        let value = std::str::from_utf8(header.value)
            .map_err(|_| BAD_REQUEST)?
            .trim();
        let name = header.name;
        if name.eq_ignore_ascii_case("connection") {
            if value.eq_ignore_ascii_case("close") {
                keep_alive = false;
            } else if value.eq_ignore_ascii_case("keep-alive") {
                keep_alive = true;
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            body_len = value.parse().map_err(|_| BAD_REQUEST)?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(NOT_IMPLEMENTED);
        }
    }
    Ok(Some(RequestHead {
        head_len,
        body_len,
        keep_alive,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_follows_version_and_header() {
        let head = |text: &str| parse_head(text.as_bytes()).unwrap().unwrap();
        assert!(head("GET / HTTP/1.1\r\nHost: x\r\n\r\n").keep_alive);
        assert!(!head("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
    }

    #[test]
    fn incomplete_heads_wait_and_bodies_are_measured() {
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost"), Ok(None));
        let head = parse_head(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
            .unwrap()
            .unwrap();
        assert_eq!(head.body_len, 5);
        assert_eq!(head.head_len, 38);
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(parse_head(b"hello\r\n\r\n"), Err(BAD_REQUEST));
        assert_eq!(parse_head(b"GET / HTTP/2.0\r\n\r\n"), Err(BAD_REQUEST));
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nno colon\r\n\r\n"),
            Err(BAD_REQUEST)
        );
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            Err(BAD_REQUEST)
        );
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nX: \xff\r\n\r\n"),
            Err(BAD_REQUEST)
        );
        assert_eq!(parse_head(&[b'a'; MAX_HEADER_BYTES + 1]), Err(TOO_LARGE));
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "X: y\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(parse_head(many.as_bytes()), Err(TOO_LARGE));
        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(NOT_IMPLEMENTED)
        );
    }
}
