//! Which signal a draining worker is sent beside DRAIN on its channel
//! (docs/lifecycle.md, "Stopping a worker"), decided from its policy and
//! what herd knows of it: [`at_drain`] as it starts draining, and
//! [`after_disconnect`] when a draining Node worker closes its channel.
//!
//! Without `stop_signal`, herd sends a signal only where DRAIN may go
//! unread: SIGTERM to a worker that never said READY on its channel (made
//! ready by `ready_delay` or by `READY=1` on its NOTIFY_SOCKET, so it may
//! not read its channel), to one still starting (it has no
//! connection to finish), to one that closed its channel, and to a Node
//! worker once it has disconnected (Node's `worker.kill()`). With
//! `stop_signal` set, the user has said how the server stops: every
//! draining worker is sent that signal at once, whatever it speaks (a
//! herd-protocol worker still gets DRAIN first, a Node worker
//! `disconnect`), and it is the only signal before SIGKILL at
//! `shutdown_timeout`.

use nix::sys::signal::Signal;

use super::worker::DrainCause;
use super::Policy;

/// What herd knows of a worker as it starts draining.
#[derive(Debug, Clone, Copy)]
pub(super) struct Drained {
    /// It said READY (Node: `listening`), so it reads its channel.
    pub announced: bool,
    /// It was not ready yet: it has no connection to finish.
    pub was_starting: bool,
    pub cause: DrainCause,
}

/// The signal sent as the worker starts draining, if any.
pub(super) fn at_drain(policy: &Policy, worker: Drained) -> Option<Signal> {
    if policy.stop_signal.is_some() {
        return policy.stop_signal;
    }
    // Ready by delay or by NOTIFY_SOCKET: it may not read its channel.
    let may_not_read = !worker.announced;
    let unread = may_not_read || worker.was_starting || worker.cause == DrainCause::ChannelLost;
    unread.then_some(Signal::SIGTERM)
}

/// The signal sent when a draining worker closes its channel: SIGTERM to a
/// Node worker (as `worker.kill()` does: one holding a timer or a Redis
/// client would never exit otherwise), unless `stop_signal` was sent
/// already at the drain.
pub(super) fn after_disconnect(policy: &Policy) -> Option<Signal> {
    (policy.node && policy.stop_signal.is_none()).then_some(Signal::SIGTERM)
}
