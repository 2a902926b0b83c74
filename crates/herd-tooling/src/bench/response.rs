//! Reading one HTTP/1.1 response on a client connection: the head parsed by
//! httparse into a [`ResponseHead`], then a body framed by `Content-Length`
//! (or by the end of the connection), within fixed bounds; and the worker
//! pid in a hello-worker body.

use std::mem::MaybeUninit;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// A response whose header block is larger than this is an error.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// A response with more header lines than this is an error.
const MAX_HEADERS: usize = 100;
/// A response whose body is larger than this is an error.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

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
pub(super) async fn read_response(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
