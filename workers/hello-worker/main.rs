//! hello-worker: the seed article's example server, as a herd worker.
//!
//! Answers every HTTP/1.1 request with `200` and `Handled by worker <pid>`,
//! plus an `X-Herd-Worker: <slot>` header. Honours keep-alive and
//! `Connection: close`, and stops gracefully on SIGTERM or when herd asks it
//! to drain: no new connections, the request in progress on each open
//! connection completes, idle keep-alive connections are closed.
//!
//! Fault injection for tests and demos:
//! - `--stall-slot N`: the worker in slot N says READY, then never reads its
//!   channel (a hung worker).

use std::process::ExitCode;

use bytes::{Buf, BytesMut};
use herd::worker::{Connection, Worker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Requests with a header block larger than this are refused (431) and closed.
const MAX_HEADER_BYTES: usize = 16 * 1024;

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

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let stall_slot = parse_stall_slot()?;
    let mut worker = Worker::from_env()?;
    if stall_slot == Some(worker.slot()) {
        worker.ready().await?;
        eprintln!("stalling on purpose (--stall-slot {})", worker.slot());
        std::future::pending::<()>().await;
    }
    let response = Response::new(worker.slot());
    let mut terminate = signal(SignalKind::terminate())?;
    let (draining_tx, draining) = watch::channel(false);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = worker.accept() => match accepted? {
                Some(connection) => {
                    connections.spawn(serve(connection, response.clone(), draining.clone()));
                }
                None => break,
            },
            _ = terminate.recv() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    let _ = draining_tx.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

fn parse_stall_slot() -> Result<Option<usize>, String> {
    let mut args = std::env::args().skip(1);
    let mut stall = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--stall-slot" => {
                let value = args.next().ok_or("--stall-slot needs a slot number")?;
                stall = Some(
                    value
                        .parse()
                        .map_err(|_| format!("--stall-slot {value:?}: not a slot number"))?,
                );
            }
            other => {
                return Err(format!(
                    "unknown argument {other:?} (known: --stall-slot N)"
                ))
            }
        }
    }
    Ok(stall)
}

/// The fixed response, built once.
#[derive(Clone)]
struct Response {
    keep_alive: std::sync::Arc<[u8]>,
    close: std::sync::Arc<[u8]>,
}

impl Response {
    fn new(slot: usize) -> Self {
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

async fn serve(connection: Connection, response: Response, mut draining: watch::Receiver<bool>) {
    let mut stream: TcpStream = connection.stream;
    let mut buffer = BytesMut::with_capacity(4096);
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
            // Wait for more bytes; an idle connection is closed when draining.
            let idle = buffer.is_empty();
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
        let keep_alive = head.keep_alive && !*draining.borrow();
        let bytes = if keep_alive {
            &response.keep_alive
        } else {
            &response.close
        };
        if stream.write_all(bytes).await.is_err() || !keep_alive {
            return;
        }
    }
}

/// Parses a request head once it is complete. `Err` carries the error response.
fn parse_head(buffer: &[u8]) -> Result<Option<RequestHead>, &'static str> {
    let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buffer.len() > MAX_HEADER_BYTES {
            return Err("HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
        return Ok(None);
    };
    const BAD_REQUEST: &str =
        "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let head = std::str::from_utf8(&buffer[..end]).map_err(|_| BAD_REQUEST)?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let version = request_line.rsplit(' ').next().unwrap_or_default();
    let mut keep_alive = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(BAD_REQUEST),
    };
    let mut body_len = 0;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(BAD_REQUEST);
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("connection") {
            if value.eq_ignore_ascii_case("close") {
                keep_alive = false;
            } else if value.eq_ignore_ascii_case("keep-alive") {
                keep_alive = true;
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            body_len = value.parse().map_err(|_| BAD_REQUEST)?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked bodies are not supported by this tiny server.
            return Err(
                "HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    }
    Ok(Some(RequestHead {
        head_len: end + 4,
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
        assert!(parse_head(b"hello\r\n\r\n").is_err());
        assert!(parse_head(&[b'a'; MAX_HEADER_BYTES + 1]).is_err());
    }
}
