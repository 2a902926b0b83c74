//! The app primary's life: started before the workers, restarted when it
//! exits with the workers' backoff (`[restart]`: at once after a run of
//! `min_uptime`, else `backoff_base` doubling per such short run, up to
//! `backoff_max`; it is never given up on, since the workers keep serving
//! without it), sent SIGTERM when herd stops and SIGKILL if it outlives
//! the workers.
//!
//! The supervisor owns an [`AppPrimary`] and calls it from its own events
//! (start, reap, tick, stop); the channel it returns goes to the hand-off
//! loop, which relays.

use std::os::fd::{OwnedFd, RawFd};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use std::os::unix::process::ExitStatusExt;
use tracing::{error, info, warn};

use super::{launch, ShimFile};
use crate::config::{NodePrimary, RestartSettings, Settings};
use crate::process;

/// Where the app's primary is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running {
        pid: u32,
        started: Instant,
    },
    /// Exited (or failed to start): started again at `until`.
    Waiting {
        until: Instant,
    },
    /// herd is stopping: not started again.
    Stopped,
}

/// The app's primary process (`node.primary = "run"`).
#[derive(Debug)]
pub struct AppPrimary {
    shim: ShimFile,
    state: State,
    /// Starts in a row that did not last `restart.min_uptime`.
    failures: u32,
    /// herd is stopping: an exit is final.
    stopping: bool,
    /// The running primary's stdout and stderr as herd forwards them.
    output: Vec<Option<crate::worker_output::Pipe>>,
}

/// What `herd upgrade` carries of the app's primary.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CarriedAppPrimary {
    /// The running one: pid, age (ms), herd's ends of its stdout and stderr.
    pub running: Option<(u32, u64, Option<RawFd>, Option<RawFd>)>,
    pub failures: u32,
}

/// A primary just started: its pid and herd's end of its channel.
#[derive(Debug)]
pub struct Spawned {
    pub pid: u32,
    pub channel: OwnedFd,
}

impl AppPrimary {
    /// `None` unless `node.primary = "run"`; the shim file is written now.
    pub fn of(settings: &Settings) -> Option<AppPrimary> {
        if settings.node_primary != NodePrimary::Run {
            return None;
        }
        let reader = settings
            .run_as
            .as_ref()
            .filter(|user| !user.is_herds_own())
            .map(|user| user.uid);
        match ShimFile::write(reader) {
            Ok(shim) => Some(AppPrimary {
                shim,
                state: State::Waiting {
                    until: Instant::now(),
                },
                failures: 0,
                stopping: false,
                output: Vec::new(),
            }),
            Err(e) => {
                error!(
                    event = "node_primary_start_failed",
                    "the app's primary cannot run: {e}"
                );
                None
            }
        }
    }

    /// Starts the primary if it is due (`now` past its wait).
    pub fn start_if_due(
        &mut self,
        now: Instant,
        settings: &Settings,
        workers: usize,
        restart: &RestartSettings,
    ) -> Option<Spawned> {
        let State::Waiting { until } = self.state else {
            return None;
        };
        if until > now {
            return None;
        }
        match launch::spawn(settings, &self.shim, workers) {
            Ok(started) => {
                info!(
                    pid = started.pid,
                    event = "node_primary_started",
                    "the app's primary started"
                );
                self.output = forward_output(
                    [(Some(started.stdout), false), (Some(started.stderr), true)],
                    started.pid,
                    settings.framing,
                );
                self.state = State::Running {
                    pid: started.pid,
                    started: now,
                };
                Some(Spawned {
                    pid: started.pid,
                    channel: started.channel,
                })
            }
            Err(e) => {
                let delay = self.backoff(restart);
                error!(
                    event = "node_primary_start_failed",
                    delay_ms = delay.as_millis() as u64,
                    "the app's primary did not start: {e}"
                );
                self.state = State::Waiting { until: now + delay };
                None
            }
        }
    }

    /// What `herd upgrade` carries (the primary keeps running through it).
    pub fn carried(&self, now: Instant) -> CarriedAppPrimary {
        let running = match self.state {
            State::Running { pid, started } => {
                let pipe = |i: usize| self.output.get(i).and_then(|p| p.as_ref()?.fd());
                let age = u64::try_from(now.saturating_duration_since(started).as_millis());
                Some((pid, age.unwrap_or(u64::MAX), pipe(0), pipe(1)))
            }
            _ => None,
        };
        CarriedAppPrimary {
            running,
            failures: self.failures,
        }
    }

    /// The new herd's: the carried primary is this one's, running (its
    /// output forwarded again), or started when due if none ran.
    pub fn adopt(&mut self, carried: &CarriedAppPrimary, framing: crate::worker_output::Framing) {
        let now = Instant::now();
        self.failures = carried.failures;
        let Some((pid, age_ms, stdout, stderr)) = carried.running else {
            return;
        };
        let claim = |fd: Option<RawFd>| {
            fd.and_then(|fd| herd_protocol::fdpass::adopt_inherited_fd(fd).ok())
        };
        self.output = forward_output(
            [(claim(stdout), false), (claim(stderr), true)],
            pid,
            framing,
        );
        self.state = State::Running {
            pid,
            started: now
                .checked_sub(Duration::from_millis(age_ms))
                .unwrap_or(now),
        };
    }

    /// Is `pid` the primary's process?
    pub fn owns(&self, pid: u32) -> bool {
        matches!(self.state, State::Running { pid: running, .. } if running == pid)
    }

    /// Its process exited with `status` (and was reaped): started again
    /// after the backoff, unless herd is stopping.
    pub fn exited(&mut self, status: ExitStatus, now: Instant, restart: &RestartSettings) {
        let State::Running { pid, started } = self.state else {
            return;
        };
        let uptime = now.duration_since(started);
        let stopping = self.stopping;
        // As for a worker: at once after a good run, else the backoff.
        let delay = if uptime >= restart.min_uptime {
            self.failures = 0;
            Duration::ZERO
        } else {
            self.backoff(restart)
        };
        self.state = if stopping {
            State::Stopped
        } else {
            State::Waiting { until: now + delay }
        };
        if stopping {
            info!(
                pid,
                code = status.code(),
                signal = status.signal(),
                event = "node_primary_exited",
                "the app's primary exited (herd is stopping)"
            );
            return;
        }
        warn!(
            pid,
            code = status.code(),
            signal = status.signal(),
            uptime_ms = uptime.as_millis() as u64,
            delay_ms = delay.as_millis() as u64,
            event = "node_primary_exited",
            "the app's primary exited; starting it again in {delay:?} (the workers keep serving)"
        );
    }

    /// herd is stopping: SIGTERM to the primary's process group, and no
    /// restart after it exits.
    pub fn stop(&mut self) {
        if let State::Running { pid, .. } = self.state {
            process::signal_group(pid, Signal::SIGTERM);
        }
        self.stop_restarts();
    }

    /// The workers are gone: whatever of the primary is left is killed.
    pub fn kill(&mut self) {
        if let State::Running { pid, .. } = self.state {
            process::signal_group(pid, Signal::SIGKILL);
        }
        self.stop_restarts();
    }

    fn stop_restarts(&mut self) {
        if let State::Waiting { .. } = self.state {
            self.state = State::Stopped;
        }
        self.stopping = true;
    }

    /// Running (not yet reaped).
    pub fn running(&self) -> bool {
        matches!(self.state, State::Running { .. })
    }

    /// When [`AppPrimary::start_if_due`] is due next.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.state {
            State::Waiting { until } => Some(until),
            _ => None,
        }
    }

    /// The wait before the next start, counting this one as a failure.
    fn backoff(&mut self, restart: &RestartSettings) -> Duration {
        let doubling = 2u32.saturating_pow(self.failures.min(20));
        self.failures += 1;
        restart
            .backoff_base
            .saturating_mul(doubling)
            .min(restart.backoff_max)
    }
}

/// Forwards the primary's output pipes (`(fd, stderr)`) to herd's.
fn forward_output(
    pipes: [(Option<OwnedFd>, bool); 2],
    pid: u32,
    framing: crate::worker_output::Framing,
) -> Vec<Option<crate::worker_output::Pipe>> {
    pipes
        .into_iter()
        .map(|(fd, stderr)| {
            let origin = crate::worker_output::Origin {
                slot: None,
                pid,
                stderr,
            };
            crate::worker_output::forward(fd?, origin, framing)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Short runs back off, doubling up to the cap; a good run restarts at
    /// once and resets the count; a stop is final.
    #[test]
    fn restarts_follow_the_workers_backoff() {
        let restart = RestartSettings {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_millis(400),
            min_uptime: Duration::from_secs(5),
            max_restarts: 10,
            window: Duration::from_secs(60),
        };
        let mut primary = AppPrimary {
            shim: ShimFile::write(None).unwrap(),
            state: State::Stopped,
            failures: 0,
            stopping: false,
            output: Vec::new(),
        };
        let killed = ExitStatus::from_raw(9);
        let run = |primary: &mut AppPrimary, lasted: Duration| {
            let started = Instant::now();
            primary.state = State::Running { pid: 1, started };
            primary.exited(killed, started + lasted, &restart);
            primary.next_deadline().map(|at| at - (started + lasted))
        };
        let short = Duration::from_secs(1);
        let waits: Vec<_> = (0..4).map(|_| run(&mut primary, short)).collect();
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(waits, [ms(100), ms(200), ms(400), ms(400)]);
        assert_eq!(run(&mut primary, Duration::from_secs(6)), ms(0));
        assert_eq!(run(&mut primary, short), ms(100), "the count was reset");
        primary.stop();
        assert_eq!(primary.state, State::Stopped);
        assert_eq!(run(&mut primary, short), None, "no restart while stopping");
        assert!(!primary.running());
    }
}
