//! One worker process as the decision core sees it: its stage, the timers
//! that stage runs, and why it is ending.
//!
//! A stage carries its own deadlines, so cancelling a timer is never a
//! separate step: leaving the stage drops it. [`Worker::next_deadline`] is
//! all the supervisor needs to know when to wake up.

use std::time::{Duration, Instant};

use crate::ids::{SlotIx, WorkerId};
#[cfg(test)]
use crate::lifecycle::Role;
use crate::lifecycle::Version;

/// How long a worker may outlive its channel before herd stops it: its
/// exit normally follows the channel's close within milliseconds, and a
/// crash must be seen as a crash (an exit), not as a channel loss.
pub const CHANNEL_LOSS_GRACE: Duration = Duration::from_secs(1);

/// Why a worker is asked to drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainCause {
    /// Its replacement is ready (restart, reload, recycle: the same move).
    Replaced,
    /// Its slot was removed by a scale-down.
    ScaledDown,
    /// herd is stopping.
    Stopping,
    /// It closed its channel and kept running past [`CHANNEL_LOSS_GRACE`].
    ChannelLost,
}

/// Why herd sent a worker SIGKILL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillCause {
    /// It was not ready within `ready_timeout`.
    ReadyTimeout,
    /// Its oldest unacknowledged hand-off was older than `hang_timeout`.
    Hung,
    /// It was still starting a version its slot no longer wants (a reload
    /// began or failed meanwhile).
    Superseded,
    /// It did not finish draining within `shutdown_timeout`.
    DrainTimeout,
    /// A fast stop (second SIGINT, SIGQUIT).
    FastStop,
}

/// Why a serving worker is to be replaced gracefully.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplaceCause {
    /// Over `max_memory`.
    Memory,
    /// Reached `max_connections_per_worker`.
    Recycle,
}

/// Where a worker process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Started, not ready: gets no connections.
    Starting {
        /// Killed as a failed start if not ready by then (`ready_timeout`).
        ready_by: Instant,
        /// Counted ready then even without READY (`ready_delay`).
        ready_at: Option<Instant>,
    },
    /// Holds its slot and gets its connections.
    Serving {
        /// To be replaced gracefully: a new worker starts, takes the slot
        /// when ready, and this one drains.
        replace: Option<ReplaceCause>,
    },
    /// Asked to stop: takes no connections, finishes what it has.
    Draining { kill_at: Instant, cause: DrainCause },
    /// Sent SIGKILL; waiting for its exit to be reaped.
    Killed { cause: KillCause },
}

/// A worker process.
#[derive(Debug, Clone)]
pub struct Worker {
    pub id: WorkerId,
    pub slot: SlotIx,
    pub version: Version,
    /// Known once the spawn succeeded.
    pub pid: Option<u32>,
    pub started: Instant,
    pub stage: Stage,
    /// It said READY (or Node's `listening`) itself, so it reads DRAIN;
    /// one made ready by `ready_delay` may not and is sent SIGTERM too
    /// (`stop_signal` when set).
    pub announced: bool,
    /// Its channel closed while it was starting or serving: herd checks
    /// then whether the process is still there.
    pub channel_check_at: Option<Instant>,
}

impl Worker {
    #[cfg(test)]
    pub fn role(&self) -> Role {
        match self.stage {
            Stage::Starting { .. } => Role::Starting,
            Stage::Serving { .. } => Role::Serving,
            Stage::Draining { .. } | Stage::Killed { .. } => Role::Draining,
        }
    }

    /// Starting or serving: it counts for its slot.
    pub fn is_live(&self) -> bool {
        matches!(self.stage, Stage::Starting { .. } | Stage::Serving { .. })
    }

    pub fn is_serving(&self) -> bool {
        matches!(self.stage, Stage::Serving { .. })
    }

    pub fn is_starting(&self) -> bool {
        matches!(self.stage, Stage::Starting { .. })
    }

    /// The earliest moment one of this worker's timers fires.
    pub fn next_deadline(&self) -> Option<Instant> {
        let stage = match self.stage {
            Stage::Starting { ready_by, ready_at } => {
                Some(ready_at.map_or(ready_by, |at| at.min(ready_by)))
            }
            Stage::Draining { kill_at, .. } => Some(kill_at),
            Stage::Serving { .. } | Stage::Killed { .. } => None,
        };
        let channel = self.channel_check_at.filter(|_| self.is_live());
        [stage, channel].into_iter().flatten().min()
    }
}
