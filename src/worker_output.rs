//! Workers' stdout and stderr, copied to herd's own, one whole line at a
//! time and tagged with the worker's slot so interleaved workers stay
//! readable.

use std::os::fd::OwnedFd;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tracing::debug;

/// Copies the pipe `fd` (a worker's stdout, or its stderr) to herd's, on
/// the current tokio runtime, until the worker closes it.
pub fn forward(fd: OwnedFd, slot: usize, is_stderr: bool) {
    match tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
        Ok(pipe) => {
            tokio::spawn(forward_lines(pipe, slot, is_stderr));
        }
        Err(e) => debug!(slot, "cannot read the worker's output: {e}"),
    }
}

async fn forward_lines(stream: impl AsyncRead + Unpin, slot: usize, is_stderr: bool) {
    use std::io::Write;
    let mut lines = BufReader::new(stream).split(b'\n');
    let prefix = format!("[worker {slot}] ");
    let mut line_out = Vec::with_capacity(256);
    while let Ok(Some(line)) = lines.next_segment().await {
        line_out.clear();
        line_out.extend_from_slice(prefix.as_bytes());
        line_out.extend_from_slice(&line);
        line_out.push(b'\n');
        let _ = if is_stderr {
            std::io::stderr().lock().write_all(&line_out)
        } else {
            std::io::stdout().lock().write_all(&line_out)
        };
    }
}
