//! What herd knows of a live worker process besides the core's view: its
//! pid and slot, its cgroup, what it said on its NOTIFY_SOCKET, its
//! readiness probe, and its last memory and CPU sample.

use std::time::Instant;

use crate::cgroup::Leaf;
use crate::ids::SlotIx;
use crate::notify::{Heard, Listening};
use crate::probe::Probing;
use crate::procstat::{self, Sample};
use crate::worker_output::Pipe;

#[derive(Debug)]
pub(super) struct Process {
    pub pid: u32,
    pub slot: SlotIx,
    pub started: Instant,
    pub last_sample: Option<Sample>,
    pub cpu_percent: f64,
    /// Its cgroup (kill_mode control-group).
    pub leaf: Option<Leaf>,
    /// Its NOTIFY_SOCKET being read (`ready = "notify"`); dropped with it.
    pub _notify: Option<Listening>,
    /// What it said there.
    pub heard: Heard,
    /// Its readiness probe (`ready = "tcp"`, `"http:/path"`); dropped with it.
    pub _probe: Option<Probing>,
    /// Its stdout and stderr as herd forwards them (`herd upgrade` carries them).
    pub output: Vec<Option<Pipe>>,
}

impl Process {
    /// Samples its memory and CPU: its resident bytes, and the CPU seconds
    /// it used since the last sample; `None` when /proc has it no more.
    pub fn sample(&mut self) -> Option<(u64, f64)> {
        let sample = procstat::sample(self.pid)?;
        let new_ticks = match &self.last_sample {
            Some(previous) => {
                self.cpu_percent = procstat::cpu_percent(previous, &sample);
                sample.cpu_ticks.saturating_sub(previous.cpu_ticks)
            }
            None => sample.cpu_ticks,
        };
        self.last_sample = Some(sample);
        Some((sample.rss, procstat::ticks_to_seconds(new_ticks)))
    }
}
