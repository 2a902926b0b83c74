//! File descriptors, planned rather than hoped for.
//!
//! Owns herd's `RLIMIT_NOFILE` and the arithmetic of what a configuration
//! may hold open. At start herd raises its soft limit to the hard one (as
//! Go programs and systemd services do; workers get the original soft limit
//! back, since `select(2)`-based programs break above 1024) and checks the
//! configuration against it: every connection herd holds is an fd, and the
//! most it can hold is known from the settings. A configuration that could
//! run out is warned about at start, naming the keys; `herd scale` (and a
//! reload) past the budget is refused with the numbers.

use std::fmt;

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// What herd holds besides connections and workers: stdio, the poll and
/// its waker, the control and metrics listeners and their clients (each
/// capped), the reserve fd for shedding, cgroup directories, the tokio
/// runtime's own. Generous on purpose: running out costs far more than a
/// few unused fds.
pub const FIXED_OVERHEAD: u64 = 128;

/// The eBPF program and its three maps, per listener whose group has one
/// (`reuseport`, the kernel rotation).
pub const PROGRAM_FDS: u64 = 4;

/// Per worker, besides the connections in flight to it: its channel, its
/// stdout and stderr pipes, its cgroup's `cgroup.procs`, its counter page
/// and herd's copy of the worker's end of the channel.
pub const PER_WORKER: u64 = 6;

/// herd's open-file limit, before and after raising it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    /// The soft limit herd started with: what workers get back.
    pub original: u64,
    /// The soft limit now (the hard limit, unless raising failed).
    pub soft: u64,
    pub hard: u64,
}

impl FdLimit {
    /// Whether `workers` slots of `settings` fit in this limit; the
    /// refusal says why.
    pub fn fits(&self, settings: &crate::config::Settings, workers: usize) -> Result<(), String> {
        let plan = Plan::of(settings, workers);
        let need = plan.need();
        if need.total <= self.soft {
            return Ok(());
        }
        Err(format!(
            "{workers} workers may need {need}, and herd's limit (RLIMIT_NOFILE) is {}: at most {} workers fit (raise the limit, or lower handoff.max_unacked or handoff.queue_limit)",
            self.soft,
            plan.max_workers(self.soft)
        ))
    }

    /// Raises the soft limit to the hard one. Never fails: on error herd
    /// keeps the limit it has (returned as it is).
    pub fn raise() -> FdLimit {
        let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
            return FdLimit {
                original: 1024,
                soft: 1024,
                hard: 1024,
            };
        };
        let raised = soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok();
        FdLimit {
            original: soft,
            soft: if raised { hard } else { soft },
            hard,
        }
    }
}

/// The settings that decide how many fds herd may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub workers: u64,
    pub listeners: u64,
    /// One socket per slot and listener as well (`reuseport` mode, the
    /// kernel rotation for Node workers).
    pub sockets_per_slot: bool,
    pub max_unacked: u64,
    pub queue_limit: u64,
    /// `handoff_threads`: each past the first holds a copy of every
    /// listener, its poll and waker, and per worker the batch it builds.
    pub handoff_threads: u64,
}

/// Per hand-off thread past the first, besides its listener copies: its
/// poll and its waker.
pub const THREAD_FDS: u64 = 2;

/// What a plan may need, in parts, to explain a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub plan: Plan,
    pub total: u64,
}

impl Plan {
    /// The plan of `settings` with `workers` slots. In the OS-scheduled
    /// modes herd holds no connection (the workers accept), so only the
    /// sockets count.
    pub fn of(settings: &crate::config::Settings, workers: usize) -> Plan {
        let hands_off = settings.mode.hands_off();
        Plan {
            workers: workers as u64,
            listeners: settings.listen.len().max(1) as u64,
            sockets_per_slot: settings.mode == crate::dispatch::Mode::ReusePort
                || settings.handoff.kernel_rotation,
            max_unacked: if hands_off {
                settings.handoff.max_unacked as u64
            } else {
                0
            },
            queue_limit: if hands_off {
                settings.handoff.queue_limit as u64
            } else {
                0
            },
            handoff_threads: settings.handoff_threads as u64,
        }
    }

    fn other_threads(self) -> u64 {
        self.handoff_threads.saturating_sub(1)
    }

    /// What the other threads hold besides per-worker batches: their
    /// copies, polls and wakers, and what waits forwarded to thread 0.
    fn threads_fixed(self) -> u64 {
        match self.other_threads() {
            0 => 0,
            others => others * (self.listeners + THREAD_FDS) + crate::handoff::FORWARD_LIMIT as u64,
        }
    }

    /// Per worker, the batch each other thread may be building for it.
    fn threads_per_worker(self) -> u64 {
        self.other_threads() * self.max_unacked.min(herd_protocol::wire::MAX_BATCH as u64)
    }

    /// At most how many fds herd holds under this plan.
    pub fn need(self) -> Need {
        let per_worker = PER_WORKER + self.max_unacked + self.threads_per_worker();
        let slot_sockets = if self.sockets_per_slot {
            self.workers * self.listeners + PROGRAM_FDS * self.listeners
        } else {
            0
        };
        let total = FIXED_OVERHEAD
            + self.listeners
            + self.threads_fixed()
            + slot_sockets
            + self.workers * per_worker
            + self.queue_limit;
        Need { plan: self, total }
    }

    /// The most workers this plan's other settings allow within `limit`.
    pub fn max_workers(self, limit: u64) -> u64 {
        let programs = if self.sockets_per_slot {
            PROGRAM_FDS * self.listeners
        } else {
            0
        };
        let fixed =
            FIXED_OVERHEAD + self.listeners + self.threads_fixed() + programs + self.queue_limit;
        let per_worker = PER_WORKER
            + self.max_unacked
            + self.threads_per_worker()
            + if self.sockets_per_slot {
                self.listeners
            } else {
                0
            };
        limit.saturating_sub(fixed) / per_worker
    }
}

impl fmt::Display for Need {
    /// "1234 file descriptors: workers = 4 × (6 + handoff.max_unacked 64) + ..."
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.plan;
        write!(
            f,
            "{} file descriptors: workers = {} × ({PER_WORKER} + handoff.max_unacked = {}) + handoff.queue_limit = {} + {} listener(s)",
            self.total, p.workers, p.max_unacked, p.queue_limit, p.listeners
        )?;
        if p.sockets_per_slot {
            write!(
                f,
                " + one socket per worker and listener + {PROGRAM_FDS} per listener for its eBPF program"
            )?;
        }
        if p.other_threads() > 0 {
            write!(
                f,
                " + handoff_threads = {} (each past the first: a copy of each listener, {THREAD_FDS} of its own and up to {} per worker; {} forwarded to thread 0)",
                p.handoff_threads,
                p.max_unacked.min(herd_protocol::wire::MAX_BATCH as u64),
                crate::handoff::FORWARD_LIMIT
            )?;
        }
        write!(f, " + {FIXED_OVERHEAD} for herd itself")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(workers: u64) -> Plan {
        Plan {
            workers,
            listeners: 1,
            sockets_per_slot: false,
            max_unacked: 64,
            queue_limit: 1024,
            handoff_threads: 1,
        }
    }

    #[test]
    fn need_counts_every_part() {
        assert_eq!(plan(2).need().total, 128 + 1 + 2 * 70 + 1024);
        let per_slot = Plan {
            sockets_per_slot: true,
            listeners: 2,
            ..plan(3)
        };
        assert_eq!(
            per_slot.need().total,
            128 + 2 + 3 * 2 + 2 * 4 + 3 * 70 + 1024
        );
    }

    #[test]
    fn hand_off_threads_count_their_copies_batches_and_forwards() {
        let threads = Plan {
            handoff_threads: 3,
            listeners: 2,
            ..plan(4)
        };
        let forwarded = crate::handoff::FORWARD_LIMIT as u64;
        assert_eq!(
            threads.need().total,
            128 + 2 + 2 * (2 + 2) + forwarded + 4 * (70 + 2 * 32) + 1024
        );
        let text = threads.need().to_string();
        assert!(text.contains("handoff_threads = 3"), "{text}");
        for limit in [4096, 65536] {
            let most = threads.max_workers(limit);
            let with = |workers| Plan { workers, ..threads };
            assert!(most > 0 && with(most).need().total <= limit, "{limit}");
            assert!(with(most + 1).need().total > limit, "{limit}");
        }
    }

    #[test]
    fn max_workers_is_the_largest_count_that_fits() {
        for limit in [1400, 4096, 65536] {
            let most = plan(0).max_workers(limit);
            assert!(most > 0 && plan(most).need().total <= limit, "{limit}");
            assert!(plan(most + 1).need().total > limit, "{limit}");
        }
        // The queue alone is over a limit of 1024: no worker fits.
        assert_eq!(plan(0).max_workers(1024), 0);
        assert_eq!(plan(0).max_workers(100), 0, "not even herd itself fits");
    }

    #[test]
    fn the_explanation_names_the_keys() {
        let text = plan(4).need().to_string();
        assert!(
            text.starts_with("1433 file descriptors: workers = 4"),
            "{text}"
        );
        assert!(text.contains("handoff.max_unacked = 64"), "{text}");
        assert!(text.contains("handoff.queue_limit = 1024"), "{text}");
    }

    #[test]
    fn raising_never_lowers_the_limit() {
        let limit = FdLimit::raise();
        assert!(limit.soft >= limit.original);
        assert!(limit.soft <= limit.hard);
    }
}
