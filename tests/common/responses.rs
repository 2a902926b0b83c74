//! HTTP/1.1 responses as the tests read them, parsed by httparse: the one
//! parser behind [`super::parse_answer`], [`super::http`] and the request
//! helpers of single test files.
//!
//! A response is read either to the end of the connection (the tests'
//! requests say `Connection: close`) with [`parse`], or one at a time from a
//! connection that stays open with [`read_one`]. The body is what the head
//! frames: `Content-Length` bytes, a chunked body decoded, or, without
//! either, everything up to the end of the connection.

use std::io::Read;

/// Most header lines a response to a test carries; more is an error.
const MAX_HEADERS: usize = 64;
/// [`read_one`] gives up on a response larger than this.
const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// One response, head and body.
#[derive(Debug, Clone)]
pub struct Response {
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub status: u16,
    /// The reason phrase after the status code (`OK`).
    pub reason: String,
    /// The status line and headers as sent, without the blank line that
    /// ends them, for assertions on the raw text.
    pub head: String,
    /// Every header's name and value, in the order sent.
    pub headers: Vec<(String, String)>,
    /// The body as text (invalid UTF-8 replaced).
    pub body: String,
}

impl Response {
    /// The value of the first header called `name`, in any case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// Parses one whole response, read until the server closed the connection.
/// Err when the head is malformed or incomplete, or the body shorter than
/// its head says.
pub fn parse(bytes: &[u8]) -> Result<Response, String> {
    parse_prefix(bytes, Arrived::All, Body::Framed)?.ok_or_else(|| unreachable_partial(bytes))
}

/// Parses the answer to a `HEAD` request: its head only (its
/// `Content-Length` is that of the body it did not send).
pub fn parse_answer_to_head(bytes: &[u8]) -> Result<Response, String> {
    parse_prefix(bytes, Arrived::All, Body::None)?.ok_or_else(|| unreachable_partial(bytes))
}

/// Reads exactly one response from a connection that stays open
/// (keep-alive): until its head and body have arrived, or the connection
/// ends. Bytes after it are not expected (the tests do not pipeline).
pub fn read_one(stream: &mut impl Read) -> Result<Response, String> {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(response) = parse_prefix(&bytes, Arrived::SoFar, Body::Framed)? {
            return Ok(response);
        }
        if bytes.len() > MAX_RESPONSE_BYTES {
            return Err(format!("response over {MAX_RESPONSE_BYTES} bytes"));
        }
        match stream.read(&mut buf) {
            Ok(0) => return parse(&bytes),
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {e} after {:?}", lossy(&bytes))),
        }
    }
}

/// How much of the response has arrived.
#[derive(Clone, Copy, PartialEq)]
enum Arrived {
    /// All of it: the server closed the connection.
    All,
    /// What has arrived so far: more may come.
    SoFar,
}

/// Whether the response has a body at all.
#[derive(Clone, Copy, PartialEq)]
enum Body {
    /// As its head frames it.
    Framed,
    /// None, whatever its head says (the answer to `HEAD`).
    None,
}

/// Parses the response at the start of `bytes`: `Ok(None)` while more of it
/// is to come.
fn parse_prefix(bytes: &[u8], arrived: Arrived, body: Body) -> Result<Option<Response>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if arrived == Arrived::All => {
            return Err(format!("incomplete response head in {:?}", lossy(bytes)))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed response ({e}): {:?}", lossy(bytes))),
    };
    let status = parsed.code.unwrap_or_default();
    let headers: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| (h.name.to_string(), lossy(h.value)))
        .collect();
    let no_body = body == Body::None || status < 200 || status == 204 || status == 304;
    let rest = &bytes[head_len..];
    let body = if no_body {
        Some(Vec::new())
    } else {
        framed_body(&headers, rest, arrived)?
    };
    let Some(body) = body else {
        return Ok(None);
    };
    Ok(Some(Response {
        version: parsed.version.unwrap_or_default(),
        status,
        reason: parsed.reason.unwrap_or_default().to_string(),
        head: lossy(&bytes[..head_len])
            .trim_end_matches(['\r', '\n'])
            .to_string(),
        headers,
        body: lossy(&body),
    }))
}

/// The body after a head with `headers`: `Ok(None)` while more of it is to come.
fn framed_body(
    headers: &[(String, String)],
    rest: &[u8],
    arrived: Arrived,
) -> Result<Option<Vec<u8>>, String> {
    let value = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    };
    if value("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
        return dechunk(rest, arrived);
    }
    match value("content-length") {
        Some(length) => {
            let length: usize = length
                .parse()
                .map_err(|_| format!("bad Content-Length {length:?}"))?;
            match rest.get(..length) {
                Some(body) => Ok(Some(body.to_vec())),
                None if arrived == Arrived::SoFar => Ok(None),
                None => Err(format!(
                    "body cut short: {} of {length} bytes: {:?}",
                    rest.len(),
                    lossy(rest)
                )),
            }
        }
        None if arrived == Arrived::All => Ok(Some(rest.to_vec())),
        None => Ok(None),
    }
}

/// Decodes a chunked body (its trailers ignored): `Ok(None)` while more of
/// it is to come.
fn dechunk(mut rest: &[u8], arrived: Arrived) -> Result<Option<Vec<u8>>, String> {
    let cut_short = || match arrived {
        Arrived::SoFar => Ok(None),
        Arrived::All => Err("chunked body cut short".to_string()),
    };
    let mut body = Vec::new();
    loop {
        let (skip, size) = match httparse::parse_chunk_size(rest) {
            Ok(httparse::Status::Complete(found)) => found,
            Ok(httparse::Status::Partial) => return cut_short(),
            Err(_) => return Err(format!("bad chunk size in {:?}", lossy(rest))),
        };
        rest = &rest[skip..];
        if size == 0 {
            return Ok(Some(body));
        }
        let size = usize::try_from(size).map_err(|_| "chunk too large".to_string())?;
        let Some(chunk) = rest.get(..size) else {
            return cut_short();
        };
        body.extend_from_slice(chunk);
        rest = &rest[size..];
        match rest.get(..2) {
            Some(b"\r\n") => rest = &rest[2..],
            Some(_) => return Err("no line break after a chunk".into()),
            None => return cut_short(),
        }
    }
}

/// [`parse_prefix`] of a whole response is never partial.
fn unreachable_partial(bytes: &[u8]) -> String {
    format!("incomplete response {:?}", lossy(bytes))
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
