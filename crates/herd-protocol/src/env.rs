//! The environment a worker is started with: the names herd sets and the
//! rules for reading them, shared by the primary (which sets them) and the
//! worker library (which reads them).
//!
//! A herd-protocol worker finds its channel in [`CHANNEL_FD_ENV`] and its
//! slot in [`WORKER_ID_ENV`]. In the OS-scheduled modes it also inherits
//! listening sockets by systemd's convention (`sd_listen_fds(3)`): fds 3, 4,
//! … in `listen` order, counted by [`LISTEN_FDS_ENV`], named by
//! [`LISTEN_FDNAMES_ENV`], and meant for the process whose pid is
//! [`LISTEN_PID_ENV`]; the channel comes after them.

use std::os::fd::RawFd;

use crate::fdpass::FIRST_INHERITED_FD;

/// Environment variable naming the inherited channel fd.
pub const CHANNEL_FD_ENV: &str = "HERD_CHANNEL_FD";
/// Environment variable with the worker's slot, 0..N-1; stable across restarts.
pub const WORKER_ID_ENV: &str = "HERD_WORKER_ID";
/// `protocol = "preload"`: the served addresses, comma-separated in
/// `listen` order, whose `bind()` herd's preload library captures.
pub const PRELOAD_LISTEN_ENV: &str = "HERD_PRELOAD_LISTEN";
/// `protocol = "preload"`: what the library does once herd said DRAIN and
/// nothing is open: [`PRELOAD_STOP_SELF`] (SIGTERM to the program, which
/// has no graceful stop herd knows of), or anything else (herd sends the
/// program's own `stop_signal`; the library only stops taking connections).
pub const PRELOAD_STOP_ENV: &str = "HERD_PRELOAD_STOP";
/// See [`PRELOAD_STOP_ENV`].
pub const PRELOAD_STOP_SELF: &str = "self";
/// How many listening sockets the worker inherited (from fd 3 on).
pub const LISTEN_FDS_ENV: &str = "LISTEN_FDS";
/// The pid the inherited sockets are meant for.
pub const LISTEN_PID_ENV: &str = "LISTEN_PID";
/// Colon-separated names of the inherited sockets.
pub const LISTEN_FDNAMES_ENV: &str = "LISTEN_FDNAMES";

/// The environment describing `count` inherited sockets (all but
/// `LISTEN_PID`, which only the started process can know).
pub fn listen_env(count: usize) -> [(&'static str, String); 2] {
    let names: Vec<String> = (0..count).map(|i| format!("listen{i}")).collect();
    [
        (LISTEN_FDS_ENV, count.to_string()),
        (LISTEN_FDNAMES_ENV, names.join(":")),
    ]
}

/// The fd number of the channel when `listen_fds` sockets come first.
pub fn channel_fd(listen_fds: usize) -> RawFd {
    FIRST_INHERITED_FD + listen_fds as RawFd
}

/// The listening sockets this process inherited for itself by the systemd
/// convention: fds 3.. if `LISTEN_PID` is our pid, else none. (A program
/// this one starts sees a `LISTEN_PID` that is not its own and ignores them,
/// so the variables need not be removed, which would race other threads.)
pub fn inherited_listen_fds() -> Result<Vec<RawFd>, String> {
    let Ok(pid) = std::env::var(LISTEN_PID_ENV) else {
        return Ok(Vec::new());
    };
    if pid.trim() != std::process::id().to_string() {
        return Ok(Vec::new());
    }
    let count = std::env::var(LISTEN_FDS_ENV).unwrap_or_default();
    let count: usize = count
        .trim()
        .parse()
        .map_err(|_| format!("{LISTEN_FDS_ENV}={count:?} is not a count"))?;
    Ok((0..count)
        .map(|i| FIRST_INHERITED_FD + i as RawFd)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_env_names_every_socket() {
        assert_eq!(
            listen_env(2),
            [
                (LISTEN_FDS_ENV, "2".to_string()),
                (LISTEN_FDNAMES_ENV, "listen0:listen1".to_string())
            ]
        );
        assert_eq!(channel_fd(2), 5);
        assert_eq!(channel_fd(0), 3);
    }
}
