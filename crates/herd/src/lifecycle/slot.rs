//! One worker slot's restart accounting: the backoff, crash-loop detection
//! and the timer a restart waits for.
//!
//! A slot remembers failed starts, not workers: a start failed when the
//! worker ended before it was ready or within `restart.min_uptime`. Each
//! failure in a row doubles the delay before the slot's next start, from
//! `restart.backoff_base` up to `restart.backoff_max`; a good run resets it.
//! More than `restart.max_restarts` failures within `restart.window` mark the
//! slot crash-looping, which only changes what it reports: it keeps retrying
//! at the capped delay, because a primary never gives up on a slot.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::RestartSettings;
use crate::lifecycle::Version;

/// A worker slot, `HERD_WORKER_ID` = its index.
#[derive(Debug, Clone)]
pub(super) struct Slot {
    /// The version this slot's workers should run; a reload moves it.
    pub version: Version,
    /// Failed starts in a row; drives the backoff.
    pub failures: u32,
    /// When the recent failed starts happened, newest last; never longer
    /// than `max_restarts + 1` entries (all crash-loop detection needs).
    recent_failures: VecDeque<Instant>,
    pub crash_looping: bool,
    /// Workers started to refill this slot after its first.
    pub restarts: u64,
    /// A worker was ever started here (so the next fill is a restart).
    pub filled_before: bool,
    /// The slot's next start waits until then. `None`: no start is
    /// waiting, one may be scheduled when the slot needs a worker.
    pub retry_at: Option<Instant>,
    /// Its last worker was found hung, and no worker has been ready since:
    /// `herd status` says `hung` while the replacement starts.
    pub hung: bool,
}

/// Whether a start may happen now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StartGate {
    Now,
    /// The backoff timer was set just now, to run until then.
    Scheduled(Instant),
    /// The backoff timer runs until then.
    Waiting(Instant),
}

impl Slot {
    pub fn new(version: Version) -> Slot {
        Slot {
            version,
            failures: 0,
            recent_failures: VecDeque::new(),
            crash_looping: false,
            restarts: 0,
            filled_before: false,
            retry_at: None,
            hung: false,
        }
    }

    /// Records that a start failed at `now`. Returns true if this failure
    /// made the slot crash-looping (so it is reported once).
    pub fn record_failure(&mut self, now: Instant, restart: &RestartSettings) -> bool {
        self.failures = self.failures.saturating_add(1);
        self.retry_at = None;
        self.recent_failures.push_back(now);
        let keep = restart.max_restarts as usize + 1;
        while self.recent_failures.len() > keep
            || self
                .recent_failures
                .front()
                .is_some_and(|at| now.saturating_duration_since(*at) > restart.window)
        {
            self.recent_failures.pop_front();
        }
        let looping = self.recent_failures.len() > restart.max_restarts as usize;
        let newly = looping && !self.crash_looping;
        self.crash_looping |= looping;
        newly
    }

    /// A worker ran long enough: the next start is immediate again.
    pub fn record_good_run(&mut self) {
        self.failures = 0;
        self.crash_looping = false;
        self.retry_at = None;
    }

    /// May the slot start a worker at `now`? The first time it is asked
    /// after a failure it sets the backoff timer; later it waits for it.
    pub fn start_gate(&mut self, now: Instant, restart: &RestartSettings) -> StartGate {
        match self.retry_at {
            Some(at) if at <= now => StartGate::Now,
            Some(at) => StartGate::Waiting(at),
            None => {
                let delay = restart_delay(self.failures, restart.backoff_base, restart.backoff_max);
                if delay.is_zero() {
                    return StartGate::Now;
                }
                self.retry_at = Some(now + delay);
                StartGate::Scheduled(now + delay)
            }
        }
    }

    /// A worker was started: the timer is used up.
    pub fn started(&mut self, fill: bool) {
        if fill && self.filled_before {
            self.restarts += 1;
        }
        self.filled_before = true;
        self.retry_at = None;
    }
}

/// 0 after a good run; then base, 2·base, 4·base, … capped at `max`.
pub fn restart_delay(failures: u32, base: Duration, max: Duration) -> Duration {
    match failures {
        0 => Duration::ZERO,
        n => base.saturating_mul(1u32 << (n - 1).min(20)).min(max),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restart() -> RestartSettings {
        RestartSettings {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            min_uptime: Duration::from_secs(5),
            max_restarts: 3,
            window: Duration::from_secs(60),
        }
    }

    #[test]
    fn backoff_doubles_from_base_to_cap() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        let delays: Vec<_> = (0..7)
            .map(|n| restart_delay(n, base, max).as_millis())
            .collect();
        assert_eq!(delays, [0, 100, 200, 400, 800, 1600, 2000]);
        assert_eq!(restart_delay(u32::MAX, base, max), max);
    }

    #[test]
    fn a_failure_delays_the_next_start_and_a_good_run_clears_it() {
        let (now, restart) = (Instant::now(), restart());
        let mut slot = Slot::new(Version(0));
        assert_eq!(slot.start_gate(now, &restart), StartGate::Now);
        slot.started(true);
        slot.record_failure(now, &restart);
        let later = now + Duration::from_millis(100);
        assert_eq!(slot.start_gate(now, &restart), StartGate::Scheduled(later));
        // Asking again does not push the timer out.
        assert_eq!(
            slot.start_gate(now + Duration::from_millis(50), &restart),
            StartGate::Waiting(later)
        );
        assert_eq!(slot.start_gate(later, &restart), StartGate::Now);
        slot.started(true);
        assert_eq!(slot.restarts, 1);
        slot.record_good_run();
        assert_eq!(slot.start_gate(later, &restart), StartGate::Now);
    }

    #[test]
    fn more_than_max_restarts_in_the_window_is_a_crash_loop_reported_once() {
        let (now, restart) = (Instant::now(), restart());
        let mut slot = Slot::new(Version(0));
        let newly: Vec<bool> = (0..6)
            .map(|i| slot.record_failure(now + Duration::from_secs(i), &restart))
            .collect();
        assert_eq!(newly, [false, false, false, true, false, false]);
        assert!(slot.crash_looping);
        assert!(
            slot.recent_failures.len() <= 4,
            "bounded by max_restarts + 1"
        );
        slot.record_good_run();
        assert!(!slot.crash_looping);
    }

    #[test]
    fn failures_spread_wider_than_the_window_are_no_crash_loop() {
        let (now, restart) = (Instant::now(), restart());
        let mut slot = Slot::new(Version(0));
        for i in 0..10 {
            assert!(!slot.record_failure(now + Duration::from_secs(61 * i), &restart));
        }
        assert!(!slot.crash_looping);
    }
}
