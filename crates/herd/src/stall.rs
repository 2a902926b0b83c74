//! Stalled slots: a worker that takes turns but stops taking its
//! connections loses its turns until it has had time to recover.
//!
//! Owns the decision, as a pure transition ([`step`]) over what herd samples
//! every [`WATCH_INTERVAL`] ([`Sample`]): how many connections wait in the
//! accept queue of a slot's own socket, and how many its worker accepted
//! since the last sample (what the kernel dealt to the slot, less what the
//! queue grew by). A slot is *stalled* when connections waited and its
//! worker made no progress (the queue did not shrink, and it accepted fewer
//! than [`MIN_PROGRESS`]) for [`STALL_SAMPLES`] samples in a row, while
//! another slot dealt to had nothing waiting: its event loop is blocked (or
//! it is stopped), not merely busy like everyone else.
//!
//! Why the accepts and not the queue alone: at thousands of connections a
//! second, a busy worker's queue holds one or two at almost any instant, so
//! "waited at three samples" says nothing; one that accepted hundreds in
//! between is not stalled. Why at least [`MIN_PROGRESS`]: the two counts
//! are read one after the other, so a connection arriving between the two
//! reads shows as one accept too many (or too few) in an interval. A full
//! queue ([`Sample::full`]) counts only its shrinking: the kernel deals (and
//! counts) a connection and then drops it for want of room, so there the
//! deals say nothing of accepts. It is then *skipped*: out
//! of the turns for a probation that doubles with every stall in a row
//! ([`probation`]: 1 s, 2 s, ... 30 s), and back once the probation is over
//! and nothing waits on its socket. A slot that goes [`CLEAN_SAMPLES`]
//! samples without a stuck one is forgiven its earlier stalls.
//!
//! Why a probation and not "until it accepts again": what waited on a
//! skipped slot is moved to the others (`slot_sockets`), and nothing new is
//! dealt to it, so its queue says nothing more about it; the only way to
//! learn that it recovered is to deal to it again. The doubling bounds what
//! a worker that stays stuck costs: each return delays the few connections
//! dealt to it by about `STALL_SAMPLES` samples before they are moved on.
//!
//! Why "while another had nothing waiting": when every slot's queue grows,
//! the load is simply more than the workers take, and moving connections
//! between equally full queues would help no one.

use std::time::{Duration, Instant};

/// How often the queues are sampled.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(100);
/// Samples in a row a queue must wait, its worker making no progress, to
/// be stalled.
pub const STALL_SAMPLES: u32 = 3;
/// Accepts in one interval that count as progress.
pub const MIN_PROGRESS: u64 = 2;
/// Samples in a row without a stuck one after which earlier stalls are forgiven.
pub const CLEAN_SAMPLES: u32 = 100;
const FIRST_PROBATION: Duration = Duration::from_secs(1);
const MAX_PROBATION: Duration = Duration::from_secs(30);

/// Where one slot stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    /// Dealt to. `stuck`: samples in a row its queue waited and did not
    /// shrink; `last`: what waited at the last sample; `strikes`: stalls
    /// not yet forgiven; `clean`: samples in a row that were not stuck.
    Dealt {
        stuck: u32,
        last: u32,
        strikes: u32,
        clean: u32,
    },
    /// Out of the turns until `until` (and its queue is empty).
    Skipped { until: Instant, strikes: u32 },
}

impl Watch {
    /// A slot that starts taking turns, with nothing held against it.
    pub const FRESH: Watch = Watch::Dealt {
        stuck: 0,
        last: 0,
        strikes: 0,
        clean: 0,
    };

    pub fn is_skipped(self) -> bool {
        matches!(self, Watch::Skipped { .. })
    }
}

/// One slot's queue at one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Connections waiting on the slot's socket now.
    pub waiting: u32,
    /// Connections its worker accepted since the last sample, as far as
    /// the counts tell (dealt since, less what the queue grew by).
    pub accepted: u64,
    /// The queue is at its bound.
    pub full: bool,
}

impl Sample {
    /// A sample in which the worker made no progress since `last` waited.
    fn no_progress(self, last: u32) -> bool {
        let accepted = !self.full && self.accepted >= MIN_PROGRESS;
        self.waiting > 0 && self.waiting >= last && !accepted
    }
}

/// What the caller does after a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing changes.
    Keep,
    /// Take the slot out of the turns and move what waits on it on.
    Skip,
    /// Deal to the slot again.
    Resume,
}

/// One sample of one slot, and whether another slot dealt to had nothing
/// waiting at this sample.
pub fn step(watch: Watch, sample: Sample, another_idle: bool, now: Instant) -> (Watch, Verdict) {
    let waiting = sample.waiting;
    match watch {
        Watch::Dealt {
            stuck,
            last,
            strikes,
            clean,
        } => {
            let stuck = if sample.no_progress(last) {
                stuck + 1
            } else {
                0
            };
            if stuck >= STALL_SAMPLES && another_idle {
                let strikes = strikes + 1;
                let until = now + probation(strikes);
                return (Watch::Skipped { until, strikes }, Verdict::Skip);
            }
            let clean = if stuck == 0 {
                clean.saturating_add(1)
            } else {
                0
            };
            let strikes = if clean >= CLEAN_SAMPLES { 0 } else { strikes };
            let watch = Watch::Dealt {
                stuck,
                last: waiting,
                strikes,
                clean,
            };
            (watch, Verdict::Keep)
        }
        Watch::Skipped { until, strikes } if now >= until && waiting == 0 => {
            let watch = Watch::Dealt {
                stuck: 0,
                last: 0,
                strikes,
                clean: 0,
            };
            (watch, Verdict::Resume)
        }
        skipped => (skipped, Verdict::Keep),
    }
}

/// How long a slot stalled for the `strikes`-th time in a row is skipped.
pub fn probation(strikes: u32) -> Duration {
    let doublings = strikes.saturating_sub(1).min(16);
    (FIRST_PROBATION * 2u32.pow(doublings)).min(MAX_PROBATION)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sample of a worker that accepted nothing.
    fn stuck_at(waiting: u32) -> Sample {
        Sample {
            waiting,
            accepted: 0,
            full: false,
        }
    }

    /// Runs `samples` (waiting, another_idle), the worker accepting
    /// nothing, from `watch`, one interval apart; the verdicts.
    fn run(mut watch: Watch, samples: &[(u32, bool)], start: Instant) -> (Watch, Vec<Verdict>) {
        let mut verdicts = Vec::new();
        for (i, &(waiting, idle)) in samples.iter().enumerate() {
            let now = start + WATCH_INTERVAL * i as u32;
            let (next, verdict) = step(watch, stuck_at(waiting), idle, now);
            watch = next;
            verdicts.push(verdict);
        }
        (watch, verdicts)
    }

    #[test]
    fn a_queue_that_waits_without_shrinking_while_another_idles_is_skipped() {
        let now = Instant::now();
        let (watch, verdicts) = run(Watch::FRESH, &[(1, true), (3, true), (3, true)], now);
        assert_eq!(verdicts.last(), Some(&Verdict::Skip));
        assert_eq!(
            watch,
            Watch::Skipped {
                until: now + WATCH_INTERVAL * 2 + probation(1),
                strikes: 1
            }
        );
    }

    #[test]
    fn a_busy_worker_whose_queue_shrinks_now_and_then_keeps_its_turns() {
        let samples = [
            (2, true),
            (5, true),
            (4, true),
            (6, true),
            (6, true),
            (1, true),
        ];
        let (watch, verdicts) = run(Watch::FRESH, &samples, Instant::now());
        assert!(verdicts.iter().all(|&v| v == Verdict::Keep), "{verdicts:?}");
        assert!(!watch.is_skipped());
    }

    /// At a high rate a queue holds a connection at every sample: the
    /// worker accepting hundreds in between is not stalled; one that
    /// accepts a single one (or the counts' one of noise) is.
    #[test]
    fn a_worker_that_accepts_keeps_its_turns_whatever_waits_at_the_samples() {
        let busy = Sample {
            waiting: 1,
            accepted: 800,
            full: false,
        };
        let mut watch = Watch::FRESH;
        for i in 0..10 {
            let (next, verdict) = step(watch, busy, true, Instant::now());
            assert_eq!(verdict, Verdict::Keep, "sample {i}");
            watch = next;
        }
        let trickle = Sample {
            accepted: 1,
            ..busy
        };
        let (_, verdicts) = (0..3).fold((Watch::FRESH, Vec::new()), |(w, mut v), _| {
            let (next, verdict) = step(w, trickle, true, Instant::now());
            v.push(verdict);
            (next, v)
        });
        assert_eq!(verdicts.last(), Some(&Verdict::Skip));
    }

    /// A full queue: the kernel deals and drops, so deals are no accepts.
    #[test]
    fn a_full_queue_progresses_only_by_shrinking() {
        let full = Sample {
            waiting: 64,
            accepted: 50,
            full: true,
        };
        let (mut watch, mut last) = (Watch::FRESH, Verdict::Keep);
        for _ in 0..STALL_SAMPLES {
            (watch, last) = step(watch, full, true, Instant::now());
        }
        assert_eq!(last, Verdict::Skip);
        let shrinking = Sample {
            waiting: 60,
            ..full
        };
        let stuck = Watch::Dealt {
            stuck: 2,
            last: 64,
            strikes: 0,
            clean: 0,
        };
        assert_eq!(
            step(stuck, shrinking, true, Instant::now()).1,
            Verdict::Keep
        );
    }

    #[test]
    fn when_every_queue_waits_nobody_is_skipped() {
        let samples = [(5, false); 20];
        let (watch, verdicts) = run(Watch::FRESH, &samples, Instant::now());
        assert!(verdicts.iter().all(|&v| v == Verdict::Keep));
        assert!(matches!(watch, Watch::Dealt { stuck: 20, .. }));
    }

    #[test]
    fn an_empty_queue_is_never_stuck() {
        let (watch, verdicts) = run(Watch::FRESH, &[(0, true); 10], Instant::now());
        assert!(verdicts.iter().all(|&v| v == Verdict::Keep));
        assert!(matches!(
            watch,
            Watch::Dealt {
                stuck: 0,
                clean: 10,
                ..
            }
        ));
    }

    #[test]
    fn a_skipped_slot_returns_after_its_probation_once_its_queue_is_empty() {
        let start = Instant::now();
        let skipped = Watch::Skipped {
            until: start + probation(1),
            strikes: 1,
        };
        // Before the probation ends: still skipped, whatever waits.
        assert_eq!(step(skipped, stuck_at(0), true, start).1, Verdict::Keep);
        let after = start + probation(1);
        // After it, not while something still waits there.
        assert_eq!(step(skipped, stuck_at(2), true, after).1, Verdict::Keep);
        let (watch, verdict) = step(skipped, stuck_at(0), false, after);
        assert_eq!(verdict, Verdict::Resume);
        assert!(matches!(
            watch,
            Watch::Dealt {
                strikes: 1,
                stuck: 0,
                ..
            }
        ));
    }

    #[test]
    fn stalls_in_a_row_double_the_probation_up_to_its_bound() {
        assert_eq!(probation(1), Duration::from_secs(1));
        assert_eq!(probation(2), Duration::from_secs(2));
        assert_eq!(probation(5), Duration::from_secs(16));
        assert_eq!(probation(6), MAX_PROBATION);
        assert_eq!(probation(u32::MAX), MAX_PROBATION);
        // A slot that resumes and stalls again gets the longer one.
        let start = Instant::now();
        let resumed = Watch::Dealt {
            stuck: 0,
            last: 0,
            strikes: 1,
            clean: 0,
        };
        let (watch, _) = run(resumed, &[(1, true), (1, true), (1, true)], start);
        assert!(
            matches!(watch, Watch::Skipped { strikes: 2, .. }),
            "{watch:?}"
        );
    }

    #[test]
    fn a_long_clean_run_forgives_earlier_stalls() {
        let struck = Watch::Dealt {
            stuck: 0,
            last: 0,
            strikes: 3,
            clean: 0,
        };
        let samples = vec![(0, true); CLEAN_SAMPLES as usize];
        let (watch, _) = run(struck, &samples, Instant::now());
        assert!(
            matches!(watch, Watch::Dealt { strikes: 0, .. }),
            "{watch:?}"
        );
        // A stuck sample before that restarts the count.
        let mut samples = vec![(0, true); CLEAN_SAMPLES as usize - 1];
        samples.push((1, true));
        let (watch, _) = run(struck, &samples, Instant::now());
        assert!(
            matches!(watch, Watch::Dealt { strikes: 3, .. }),
            "{watch:?}"
        );
    }

    /// Every short sequence of samples: a skip happens exactly when the
    /// last `STALL_SAMPLES` samples waited with no progress, with another
    /// slot idle at the last one, and a skipped slot never resumes early.
    #[test]
    fn exhaustively_a_skip_needs_a_stuck_queue_and_an_idle_neighbour() {
        let start = Instant::now();
        // Each sample: waiting 0..3, accepted 0..3, full or not, idle or not.
        let mut options = Vec::new();
        for waiting in 0..3u32 {
            for accepted in 0..3u64 {
                for full in [false, true] {
                    for idle in [false, true] {
                        let sample = Sample {
                            waiting,
                            accepted,
                            full,
                        };
                        options.push((sample, idle));
                    }
                }
            }
        }
        // 4 samples: 36^4 sequences.
        let mut sequence = [0usize; 4];
        loop {
            let samples: Vec<(Sample, bool)> = sequence.iter().map(|&i| options[i]).collect();
            check_sequence(&samples, start);
            // Next sequence, like an odometer.
            let mut digit = 0;
            while digit < sequence.len() && sequence[digit] == options.len() - 1 {
                sequence[digit] = 0;
                digit += 1;
            }
            if digit == sequence.len() {
                break;
            }
            sequence[digit] += 1;
        }
    }

    fn check_sequence(samples: &[(Sample, bool)], start: Instant) {
        let mut watch = Watch::FRESH;
        let mut stuck_run = 0;
        let mut last = 0;
        for (i, &(sample, idle)) in samples.iter().enumerate() {
            let now = start + WATCH_INTERVAL * i as u32;
            let was_skipped = watch.is_skipped();
            let (next, verdict) = step(watch, sample, idle, now);
            if was_skipped {
                // Within 4 samples (0.4 s) no probation (1 s or more) ends.
                assert_eq!(verdict, Verdict::Keep, "{samples:?} at {i}");
            } else {
                let progress =
                    sample.waiting < last || (!sample.full && sample.accepted >= MIN_PROGRESS);
                stuck_run = if sample.waiting > 0 && !progress {
                    stuck_run + 1
                } else {
                    0
                };
                last = sample.waiting;
                let expected = stuck_run >= STALL_SAMPLES && idle;
                assert_eq!(verdict == Verdict::Skip, expected, "{samples:?} at {i}");
            }
            watch = next;
        }
    }
}
