//! Where a row's spread over the workers comes from: the response bodies
//! (`Handled by worker <pid>`, requests answered per worker) when they name
//! a worker, else herd's own per-slot counts (`SlotStatus::handed_off`:
//! connections herd handed to the slot, or that the slot's herd-protocol
//! worker reported accepting in shared and reuseport), taken before and
//! after the load. When neither says anything, the row has no spread and
//! a note says why: never a made-up number.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::bench::{self, BenchReport};
use herd::status::{fairness, Fairness, StatusReport};

/// What a row's max/min and Jain's index were computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SpreadSource {
    /// Successful answers per worker pid, read from the bodies.
    Bodies,
    /// Connections per slot, as herd counted them during the load.
    Herd,
}

impl SpreadSource {
    pub fn name(self) -> &'static str {
        match self {
            SpreadSource::Bodies => "bodies",
            SpreadSource::Herd => "herd",
        }
    }
}

/// Why a measured row has no spread.
pub const NO_SPREAD: &str = "no spread: the bodies name no worker and herd counted \
     nothing per slot (in shared it counts only what herd-protocol workers report; reuseport and kernel rotation need CAP_BPF to count)";

/// A row's spread, and where it came from; both `None` when nothing said.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub fairness: Option<Fairness>,
    pub source: Option<SpreadSource>,
}

impl Spread {
    /// From the bodies when they name a worker, else from herd's counts.
    pub fn choose(pids: &[u32], report: &BenchReport, dealt: &[u64]) -> Spread {
        if let Some(f) = spread(pids, &report.workers) {
            return Spread {
                fairness: Some(f),
                source: Some(SpreadSource::Bodies),
            };
        }
        let from_herd = fairness(dealt);
        Spread {
            source: from_herd.map(|_| SpreadSource::Herd),
            fairness: from_herd,
        }
    }
}

/// Fairness of the answers over `pids` (herd's workers when the load began;
/// one that answered nothing counts as 0) and any other pid that answered.
pub fn spread(pids: &[u32], shares: &[bench::WorkerShare]) -> Option<Fairness> {
    let mut counts: BTreeMap<u32, u64> = pids.iter().map(|&pid| (pid, 0)).collect();
    for share in shares {
        *counts.entry(share.pid).or_insert(0) += share.count;
    }
    fairness(&counts.into_values().collect::<Vec<_>>())
}

/// What herd counted during a load, from its status before and after.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HerdCounts {
    /// Per slot herd had before the load, in slot order (see [`dealt`]).
    pub per_slot: Vec<u64>,
    /// Of those, the connections the kernel's rotation dealt.
    pub kernel_dealt: u64,
}

impl HerdCounts {
    pub fn since(before: &StatusReport, after: &StatusReport) -> HerdCounts {
        HerdCounts {
            per_slot: dealt(before, after),
            kernel_dealt: after.kernel_dealt.saturating_sub(before.kernel_dealt),
        }
    }
}

/// Per slot herd had before the load, in slot order: what herd counted
/// for it between `before` and `after` (a slot gone by then counts 0).
pub fn dealt(before: &StatusReport, after: &StatusReport) -> Vec<u64> {
    let now: BTreeMap<usize, u64> = after
        .workers
        .iter()
        .map(|w| (w.slot, w.handed_off))
        .collect();
    let mut slots: Vec<(usize, u64)> = before
        .workers
        .iter()
        .map(|w| {
            let after = now.get(&w.slot).copied().unwrap_or(w.handed_off);
            (w.slot, after.saturating_sub(w.handed_off))
        })
        .collect();
    slots.sort_unstable();
    slots.into_iter().map(|(_, count)| count).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::WorkerShare;
    use herd::status::{SlotState, SlotStatus};

    fn share(pid: u32, count: u64) -> WorkerShare {
        WorkerShare {
            pid,
            count,
            share_percent: 0.0,
        }
    }

    fn status(counts: &[(usize, u64)]) -> StatusReport {
        StatusReport {
            pid: 1,
            phase: "running".into(),
            uptime_secs: 1.0,
            mode: "shared".into(),
            listen: vec![],
            workers: counts
                .iter()
                .map(|&(slot, handed_off)| SlotStatus {
                    slot,
                    pid: Some(100 + slot as u32),
                    state: SlotState::Ready,
                    uptime_secs: None,
                    restarts: 0,
                    handed_off,
                    rss_bytes: None,
                    cpu_percent: None,
                    notify_status: None,
                })
                .collect(),
            fairness: None,
            kernel_dealt: 0,
            upgrades: Default::default(),
            handoff_threads: 1,
        }
    }

    #[test]
    fn spread_counts_silent_workers_as_zero() {
        // Only one of two workers answered: not "perfectly fair".
        let f = spread(&[1, 2], &[share(1, 100)]).unwrap();
        assert_eq!(f.max_min_ratio, None);
        assert!((f.jain_index - 0.5).abs() < 1e-9);
        let f = spread(&[1, 2], &[share(1, 100), share(2, 50)]).unwrap();
        assert_eq!(f.max_min_ratio, Some(2.0));
        // A replacement worker that answered is counted too.
        let f = spread(&[1], &[share(1, 10), share(3, 10)]).unwrap();
        assert_eq!(f.max_min_ratio, Some(1.0));
        assert_eq!(spread(&[1, 2], &[]), None);
    }

    #[test]
    fn dealt_is_the_difference_per_slot() {
        let before = status(&[(1, 7), (0, 5)]);
        let after = status(&[(0, 15), (1, 27), (2, 9)]);
        assert_eq!(dealt(&before, &after), [10, 20]);
        // A slot gone after the load counted nothing more.
        assert_eq!(dealt(&before, &status(&[(0, 6)])), [1, 0]);
        let mut after_kernel = after.clone();
        after_kernel.kernel_dealt = 25;
        let mut before_kernel = before.clone();
        before_kernel.kernel_dealt = 5;
        let counts = HerdCounts::since(&before_kernel, &after_kernel);
        assert_eq!((counts.per_slot, counts.kernel_dealt), (vec![10, 20], 20));
    }

    #[test]
    fn bodies_first_then_herd_then_nothing() {
        let mut report = crate::compare::sample::bench_report(100, 0, 1000);
        let from_bodies = Spread::choose(&[10], &report, &[30, 70]);
        assert_eq!(from_bodies.source, Some(SpreadSource::Bodies));
        assert_eq!(from_bodies.fairness.unwrap().max_min_ratio, Some(1.0));
        report.workers.clear();
        let from_herd = Spread::choose(&[10, 11], &report, &[30, 60]);
        assert_eq!(from_herd.source, Some(SpreadSource::Herd));
        assert_eq!(from_herd.fairness.unwrap().max_min_ratio, Some(2.0));
        let nothing = Spread::choose(&[10, 11], &report, &[0, 0]);
        assert_eq!((nothing.fairness, nothing.source), (None, None));
    }
}
