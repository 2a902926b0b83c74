//! The supervisor's side of a Node app's own primary (`node.primary =
//! "run"`): started before the workers, reaped beside them, restarted on
//! its timer, told of each worker's exit (through the hand-off loop, which
//! owns its channel), and killed once the workers are gone at a stop.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use super::*;

impl Supervisor {
    /// Before the first worker: the hand-off loop relays from now on, and
    /// the primary starts.
    pub(super) fn start_app_primary(&mut self) {
        if self.app_primary.is_some() {
            self.tell(Command::AppPrimaryRuns);
            self.tick_app_primary();
        }
    }

    /// Starts the primary again if its backoff is over; once the workers
    /// of a stop are gone, kills what is left of it.
    pub(super) fn tick_app_primary(&mut self) {
        if self.app_primary.is_none() {
            return;
        }
        let settings = self.settings().clone();
        let workers = self.core.slot_count();
        let Some(primary) = self.app_primary.as_mut() else {
            return;
        };
        if self.core.finished() {
            return primary.kill();
        }
        let spawned = primary.start_if_due(Instant::now(), &settings, workers, &settings.restart);
        if let Some(spawned) = spawned {
            self.tell(Command::AppPrimary {
                pid: spawned.pid,
                channel: spawned.channel,
            });
        }
    }

    /// Reaps `pid` if it is the primary's process (its group killed first,
    /// as a worker's is); true if it was.
    pub(super) fn reaped_app_primary(&mut self, pid: u32) -> bool {
        let restart = self.settings().restart;
        let Some(primary) = self.app_primary.as_mut().filter(|p| p.owns(pid)) else {
            return false;
        };
        process::signal_group(pid, Signal::SIGKILL);
        if let Some(status) = process::reap(pid) {
            primary.exited(status, Instant::now(), &restart);
        }
        true
    }

    /// The app's primary hears that the worker in `slot` exited.
    pub(super) fn tell_app_primary_exit(&self, slot: SlotIx, pid: u32, status: ExitStatus) {
        if self.app_primary.is_some() {
            self.tell(Command::WorkerExited {
                slot,
                pid,
                code: status.code(),
                signal: status.signal(),
            });
        }
    }
}
