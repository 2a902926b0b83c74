//! The HTTP endpoint on `metrics.address`: `/metrics` for Prometheus,
//! `/livez` and `/readyz` for probes (Kubernetes, load balancers),
//! `/status` for `herd status --json` without the control socket.
//!
//! Owns the listener, the connections (bounded in number, in fds and in
//! time) and the routing. Answers come from the main thread, which alone
//! knows the workers' states: each request is an [`Asked`] sent to it, and
//! the connection waits for its [`Answer`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

/// What a client asked the endpoint, by path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    /// `/metrics`: the Prometheus text.
    Metrics,
    /// `/livez`: herd's loops answer.
    Live,
    /// `/readyz`: enough workers are ready and herd is not stopping.
    Ready,
    /// `/status`: the `herd status --json` document.
    Status,
}

impl Query {
    /// The paths served, and what each is.
    pub const PATHS: &'static [(&'static str, Query)] = &[
        ("/metrics", Query::Metrics),
        ("/livez", Query::Live),
        ("/readyz", Query::Ready),
        ("/status", Query::Status),
    ];

    fn of(path: &str) -> Option<Query> {
        Query::PATHS
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(_, q)| *q)
    }
}

/// The main thread's answer to a [`Query`].
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Answer {
    /// A plain-text answer: one line.
    pub fn text(status: StatusCode, line: impl Into<String>) -> Answer {
        let mut body = line.into().into_bytes();
        body.push(b'\n');
        Answer {
            status,
            content_type: "text/plain; charset=utf-8",
            body,
        }
    }
}

/// A query waiting for the main thread, which alone knows the answer.
#[derive(Debug)]
pub struct Asked {
    pub query: Query,
    pub reply: oneshot::Sender<Answer>,
}

/// Why the metrics endpoint could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {source}")]
pub struct MetricsBindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds the metrics listener (before any worker starts, like the others).
pub fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, MetricsBindError> {
    let fail = |source| MetricsBindError { addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(fail)?;
    listener.set_nonblocking(true).map_err(fail)?;
    tokio::net::TcpListener::from_std(listener).map_err(fail)
}

/// Connections `/metrics` serves at once. Prometheus needs one; the bound
/// keeps a client that opens many, or leaves them idle, from taking herd's
/// fds and its main thread. Past it, further connections wait in the
/// kernel's accept queue (costing herd nothing) until one closes.
pub const MAX_METRICS_CONNECTIONS: usize = 32;

/// File descriptors `/metrics` leaves to the rest of herd: it accepts only
/// while at least this many are free under herd's `RLIMIT_NOFILE`, so
/// scrapes never take the fds that hand-offs, workers' pipes and the
/// control socket need. Below it, scrapes wait in the kernel's queue.
pub const METRICS_FD_RESERVE: usize = 64;

/// How long a client has to send its request headers, on a new connection
/// and between the requests of a kept-alive one; then hyper closes it, so
/// an idle client holds one of the [`MAX_METRICS_CONNECTIONS`] for no longer.
pub const METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `/metrics` pauses before it looks again when `accept` failed or
/// herd was short of fds: retrying at once would spin.
const METRICS_RETRY: Duration = Duration::from_millis(100);

/// Serves `GET` of [`Query::PATHS`] (404 elsewhere, 405 for other
/// methods) until herd exits: at most [`MAX_METRICS_CONNECTIONS`] at once,
/// and only while herd has [`METRICS_FD_RESERVE`] fds to spare.
pub async fn serve(listener: tokio::net::TcpListener, scrapes: mpsc::UnboundedSender<Asked>) {
    use hyper::server::conn::http1;
    use hyper_util::rt::{TokioIo, TokioTimer};
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_METRICS_CONNECTIONS));
    // Warn once per episode, not once per retry.
    let mut accept_failing = false;
    let mut short_of_fds = false;
    loop {
        let Ok(permit) = connections.clone().acquire_owned().await else {
            return; // never closed
        };
        if !fds_to_spare(METRICS_FD_RESERVE) {
            if !short_of_fds {
                warn!(
                    event = "metrics_paused",
                    "metrics endpoint: fewer than {METRICS_FD_RESERVE} file descriptors free; not accepting scrapes until there are (they wait in the kernel's queue)"
                );
                short_of_fds = true;
            }
            tokio::time::sleep(METRICS_RETRY).await;
            continue;
        }
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                if !accept_failing {
                    warn!(
                        event = "metrics_accept_failed",
                        "metrics endpoint: accept failed: {e}; retrying every {METRICS_RETRY:?} (logged once until it works again)"
                    );
                    accept_failing = true;
                }
                tokio::time::sleep(METRICS_RETRY).await;
                continue;
            }
        };
        accept_failing = false;
        // The wait in `accept` may have been long: look again, and give the
        // fd back at once if herd is short of them now.
        if !fds_to_spare(METRICS_FD_RESERVE) {
            // The permit bounds these too: at most MAX_METRICS_CONNECTIONS.
            tokio::spawn(async move {
                let _permit = permit;
                refuse_short_of_fds(stream).await;
            });
            continue;
        }
        short_of_fds = false;
        let scrapes = scrapes.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service =
                hyper::service::service_fn(move |request| respond(request, scrapes.clone()));
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(METRICS_HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// How long a scrape refused for want of fds has to send its request.
const REFUSAL_WAIT: Duration = Duration::from_secs(1);

/// A scrape accepted just as herd turned short of fds: answered `503` with
/// `Retry-After: 1` (a scraper's next try) rather than closed unanswered,
/// which resets it. Its request is read first (waiting at most
/// [`REFUSAL_WAIT`] for it), so the close does not reset the answer either.
async fn refuse_short_of_fds(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = [0u8; 4096];
    let _ = tokio::time::timeout(REFUSAL_WAIT, stream.read(&mut request)).await;
    let body = "herd is short of file descriptors; retry\n";
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSAL_WAIT, stream.write_all(answer.as_bytes())).await;
}

/// Whether herd has at least `reserve` fds free under its soft
/// `RLIMIT_NOFILE` (as `/proc/self` shows them; the limit can change at
/// run time, e.g. by `prlimit`). Not when it cannot even open `/proc`.
fn fds_to_spare(reserve: usize) -> bool {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return false;
    };
    let soft = limits.lines().find_map(|line| {
        line.strip_prefix("Max open files")?
            .split_whitespace()
            .next()
            .map(str::to_owned)
    });
    let Some(Ok(limit)) = soft.map(|soft| soft.parse::<usize>()) else {
        return true; // "unlimited", or a format we do not know
    };
    match std::fs::read_dir("/proc/self/fd") {
        // The count includes the directory's own fd: one more to spare.
        Ok(open) => open.count() + reserve <= limit,
        Err(_) => false,
    }
}

async fn respond<B>(
    request: Request<B>,
    scrapes: mpsc::UnboundedSender<Asked>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let answer = match Query::of(request.uri().path()) {
        None => Answer::text(
            StatusCode::NOT_FOUND,
            "not found: herd serves /metrics, /livez, /readyz and /status",
        ),
        Some(_) if request.method() != Method::GET && request.method() != Method::HEAD => {
            Answer::text(StatusCode::METHOD_NOT_ALLOWED, "use GET")
        }
        Some(query) => ask(query, &scrapes).await,
    };
    let mut response = Response::new(Full::new(Bytes::from(answer.body)));
    *response.status_mut() = answer.status;
    if let Ok(value) = answer.content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    Ok(response)
}

/// The main thread's answer to `query`; 503 when it is gone (herd exits).
async fn ask(query: Query, scrapes: &mpsc::UnboundedSender<Asked>) -> Answer {
    let (reply, answer) = oneshot::channel();
    let stopping = || Answer::text(StatusCode::SERVICE_UNAVAILABLE, "herd is stopping");
    if scrapes.send(Asked { query, reply }).is_err() {
        return stopping();
    }
    answer.await.unwrap_or_else(|_| stopping())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_scrape_refused_for_want_of_fds_gets_a_503_not_a_reset() {
        use std::io::{Read, Write};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::thread::spawn(move || {
            let mut client = std::net::TcpStream::connect(addr).unwrap();
            client
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut answer = String::new();
            client.read_to_string(&mut answer).map(|_| answer)
        });
        let (stream, _) = listener.accept().await.unwrap();
        refuse_short_of_fds(stream).await;
        let answer = client.join().unwrap().expect("an answer, not a reset");
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        assert!(answer.contains("Retry-After: 1"), "{answer}");
    }

    #[test]
    fn a_test_process_has_fds_to_spare_but_not_its_whole_limit() {
        assert!(fds_to_spare(METRICS_FD_RESERVE));
        assert!(!fds_to_spare(usize::MAX / 2));
    }

    #[test]
    fn every_path_is_its_query_and_nothing_else_is() {
        for (path, query) in Query::PATHS {
            assert_eq!(Query::of(path), Some(*query));
        }
        for other in ["/", "/metrics/", "/live", "/readyz?x", "/METRICS", ""] {
            assert_eq!(Query::of(other), None, "{other:?}");
        }
    }
}
