//! What herd reports about itself: its phase, each slot's state, the
//! `herd status` report and how evenly connections spread.
//!
//! These are the types the supervisor produces and the control socket,
//! the metrics and `herd compare` read, so they live below all of them:
//! this module imports nothing from the rest of herd.

use serde::{Deserialize, Serialize};

/// What herd as a whole is doing (docs/lifecycle.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Running,
    Reloading,
    Stopping,
}

/// What a slot is doing, as `herd status` shows it (docs/lifecycle.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlotState {
    /// A worker was started and has not said READY yet.
    Starting,
    /// A ready worker holds the slot and gets connections.
    Ready,
    /// A ready worker serves while its replacement starts (reload, memory, recycle).
    Replacing,
    /// No worker: waiting out the restart delay.
    Waiting,
    /// Waiting, after more than `max_restarts` failed starts within `window`.
    CrashLooping,
    /// Its worker stopped acknowledging hand-offs: killed, being replaced.
    Hung,
}

/// What `herd status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub pid: u32,
    pub phase: String,
    pub uptime_secs: f64,
    pub mode: String,
    pub listen: Vec<String>,
    pub workers: Vec<SlotStatus>,
    /// How evenly hand-offs spread over the current slots since start.
    pub fairness: Option<Fairness>,
    /// Of the hand-offs, those the kernel rotation dealt (Node workers).
    #[serde(default)]
    pub kernel_dealt: u64,
    /// `herd upgrade`s of this herd: how many took over, how many did not.
    #[serde(default)]
    pub upgrades: UpgradeRecord,
    /// Hand-off threads running (`handoff_threads`).
    #[serde(default = "one")]
    pub handoff_threads: u64,
}

fn one() -> u64 {
    1
}

/// What became of `herd upgrade`s (carried over each one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeRecord {
    /// Upgrades where the new binary took over.
    pub done: u64,
    /// Upgrades refused, or whose new binary failed (the old one went on).
    pub failed: u64,
    /// What the last one said.
    pub last: Option<String>,
}

/// One row of `herd status` (and of its JSON): a slot and the worker that
/// stands for it (serving, else starting, else hung).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlotStatus {
    pub slot: usize,
    pub pid: Option<u32>,
    pub state: SlotState,
    pub uptime_secs: Option<f64>,
    pub restarts: u64,
    pub handed_off: u64,
    pub rss_bytes: Option<u64>,
    pub cpu_percent: Option<f64>,
    /// What the worker last said in `STATUS=` on its NOTIFY_SOCKET (`ready = "notify"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_status: Option<String>,
}

/// The serde name of a unit enum variant (e.g. `crash-looping`).
pub fn kebab(value: &impl Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

pub fn phase_name(phase: Phase) -> String {
    kebab(&phase)
}

/// How evenly connections were spread over the slots.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Fairness {
    /// Most hand-offs to one slot divided by the fewest; `None` while a slot has none.
    pub max_min_ratio: Option<f64>,
    /// Jain's fairness index: 1 = perfectly even, 1/n = all on one slot.
    pub jain_index: f64,
}

/// Fairness of per-slot counts; `None` when nothing was handed off yet.
pub fn fairness(counts: &[u64]) -> Option<Fairness> {
    let sum: f64 = counts.iter().map(|&c| c as f64).sum();
    if counts.is_empty() || sum == 0.0 {
        return None;
    }
    let squares: f64 = counts.iter().map(|&c| (c as f64).powi(2)).sum();
    let (max, min) = (counts.iter().max()?, counts.iter().min()?);
    Some(Fairness {
        max_min_ratio: (*min > 0).then(|| *max as f64 / *min as f64),
        jain_index: sum * sum / (counts.len() as f64 * squares),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fairness_of_even_and_skewed_spreads() {
        assert_eq!(
            fairness(&[1000, 1000, 1000, 1000]),
            Some(Fairness {
                max_min_ratio: Some(1.0),
                jain_index: 1.0
            })
        );
        let skewed = fairness(&[700, 100, 100, 100]).unwrap();
        assert_eq!(skewed.max_min_ratio, Some(7.0));
        assert!((skewed.jain_index - 1_000_000.0 / (4.0 * 520_000.0)).abs() < 1e-9);
        assert_eq!(fairness(&[5, 0]).unwrap().max_min_ratio, None);
        assert_eq!(fairness(&[0, 0]), None);
    }
}
