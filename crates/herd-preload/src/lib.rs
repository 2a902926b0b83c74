//! herd-preload: an `LD_PRELOAD` library with which a program that binds
//! its own port takes herd's hand-offs, unmodified (`protocol = "preload"`,
//! docs/preload.md).
//!
//! herd starts such a worker with this library in `LD_PRELOAD`, its
//! channel in `HERD_CHANNEL_FD` and the served addresses in
//! `HERD_PRELOAD_LISTEN`. The library takes over the program's `bind()` to
//! a served port (see [`takeover`]); everything else passes through. With
//! none of that environment (a program the worker `exec`s, say) the
//! library is inert: every call is the system call.
//!
//! # Layout
//! - [`served`]: which binds are captured (pure).
//! - [`sys`]: the raw system calls, socket addresses and per-fd tables.
//! - [`takeover`]: the library's state and what each interposed call does.
//! - `exports` (not in tests): the C symbols, thin calls into [`takeover`].
//!
//! `unsafe` is allowed in this crate alone besides herd-protocol's fd
//! passing: interposing libc's symbols takes raw pointers from the program
//! by definition. Each block says why it holds.

// The interposed calls take the program's raw pointers; see the header.
#![allow(unsafe_code)]

pub mod served;
pub mod sys;
pub mod takeover;

#[cfg(not(test))]
mod exports;

use std::os::fd::RawFd;

use herd_protocol::env::{
    CHANNEL_FD_ENV, LISTEN_FDS_ENV, LISTEN_PID_ENV, PRELOAD_LISTEN_ENV, PRELOAD_STOP_ENV,
    PRELOAD_STOP_SELF,
};
use herd_protocol::fdpass::FIRST_INHERITED_FD;

use takeover::State;

/// Run by the dynamic loader before the program's `main`.
#[cfg(not(test))]
#[used]
#[link_section = ".init_array"]
static LOAD: extern "C" fn() = load;

/// Finds herd's environment; without it (or with a channel that is not
/// one) the library stays inert.
#[cfg_attr(test, allow(dead_code))]
extern "C" fn load() {
    let Some(state) = state_from_env() else {
        return;
    };
    // SAFETY: registers a handler with no preconditions, run in the child
    // after fork; it only stores to an atomic.
    unsafe { libc::pthread_atfork(None, None, Some(takeover::forked_child)) };
    let _ = takeover::STATE.set(state);
}

#[cfg_attr(test, allow(dead_code))]
fn state_from_env() -> Option<State> {
    let channel: RawFd = std::env::var(CHANNEL_FD_ENV).ok()?.parse().ok()?;
    let served = takeover_served()?;
    // The fd must be a herd channel: a Unix SEQPACKET socket. A program
    // exec'd later with the variable but not the fd finds something else.
    let is_channel = sys::int_option(channel, libc::SO_DOMAIN) == Some(libc::AF_UNIX)
        && sys::int_option(channel, libc::SO_TYPE) == Some(libc::SOCK_SEQPACKET);
    if !is_channel {
        return None;
    }
    let inherited = inherited(served.len());
    let len = sys::table_len();
    Some(State {
        channel,
        served,
        inherited,
        captured: sys::FdTable::map(len, false)?,
        connections: sys::FdTable::map(len, true)?,
        started: sys::pid(),
        stops_itself: std::env::var(PRELOAD_STOP_ENV).is_ok_and(|v| v == PRELOAD_STOP_SELF),
    })
}

#[cfg_attr(test, allow(dead_code))]
fn takeover_served() -> Option<Vec<std::net::SocketAddr>> {
    served::parse(&std::env::var(PRELOAD_LISTEN_ENV).ok()?).ok()
}

/// The OS-scheduled modes: the listening sockets herd passed, one per
/// served address, when `LISTEN_PID` is this process.
#[cfg_attr(test, allow(dead_code))]
fn inherited(count: usize) -> Option<Vec<RawFd>> {
    let pid: i32 = std::env::var(LISTEN_PID_ENV).ok()?.parse().ok()?;
    let fds: usize = std::env::var(LISTEN_FDS_ENV).ok()?.parse().ok()?;
    (pid == sys::pid() && fds == count).then(|| {
        (0..count as RawFd)
            .map(|i| FIRST_INHERITED_FD + i)
            .collect()
    })
}
