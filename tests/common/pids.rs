//! Which worker answered: the pid in `Handled by worker <pid>` (the Rust and
//! Python example workers, workers/python/socket_activated.py with
//! ` (LISTEN_PID=<pid>)` after it, the probe fixture), one response read on
//! a new connection, since some keep it open.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::{responses, send_request};

/// The plain socket-activated example: no herd code, says nothing.
pub fn socket_activated() -> String {
    format!(
        "{}/workers/python/socket_activated.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// The pid in the one response read from `stream`, within `timeout`.
pub fn answer_pid(mut stream: TcpStream, timeout: Duration) -> Result<u32, String> {
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| format!("set timeout: {e}"))?;
    let response = responses::read_one(&mut stream)?;
    if response.status != 200 {
        return Err(format!("status {} in {response:?}", response.status));
    }
    response
        .body
        .strip_prefix("Handled by worker ")
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|pid| pid.parse().ok())
        .ok_or_else(|| format!("no pid in {:?}", response.body))
}

/// One GET on a new connection; the pid that answered it.
pub fn get_pid(addr: SocketAddr, timeout: Duration) -> Result<u32, String> {
    let stream = send_request(addr).map_err(|e| format!("connect/send: {e}"))?;
    answer_pid(stream, timeout)
}
