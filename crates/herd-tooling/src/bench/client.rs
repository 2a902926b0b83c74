//! One client task: claims a request of the budget, connects (from the next
//! source address, if a range was given), sends it, reads the response and
//! counts the outcome in its [`Tally`], until the budget is spent or the
//! deadline passes. A keep-alive connection the server closed while idle is
//! reopened, not counted as an error.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use super::report::Tally;
use super::response::{read_response, worker_pid};
use super::Shared;

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
pub(super) async fn run(shared: Arc<Shared>, deadline: Option<Instant>) -> Tally {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::bench::{run, BenchOptions, Limit, Target};

    fn target(text: &str) -> Target {
        Target::parse(text).unwrap()
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
            target: target(&addr.to_string()),
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
            target: target(&format!("127.0.0.1:{port}")),
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
