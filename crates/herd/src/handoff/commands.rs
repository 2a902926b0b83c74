//! The supervisor's commands, carried out in the loop's thread.

use super::*;

impl HandoffLoop {
    pub(super) fn run_commands(&mut self) {
        while let Ok(command) = self.commands.try_recv() {
            self.run_command(command);
            if self.shutting_down {
                return;
            }
        }
    }

    pub(super) fn run_command(&mut self, command: Command) {
        match command {
            Command::AddWorker { worker, channel } => self.add_worker(worker, channel),
            Command::Serve { worker } => {
                if let Some(channel) = self.find(worker) {
                    self.serve(channel);
                }
            }
            Command::Drain { worker } => {
                if let Some(channel) = self.find(worker) {
                    self.drain(channel);
                }
            }
            Command::Forget { worker } => {
                if let Some(channel) = self.find(worker) {
                    self.retire(channel, Retired::ProcessExited);
                }
            }
            Command::SetSlots { count } => {
                self.active.truncate(count.min(MAX_WORKERS));
                self.roster_changed = true;
            }
            Command::SetLimits(limits) => self.set_limits(limits),
            Command::StopAccepting => {
                self.stopped_accepting = true;
                // Their copies close with the listeners; what they held waits here.
                drop(self.stop_threads());
                // Last count of what the kernel dealt, for the closing tally.
                self.tally_kernel_rotations();
                self.tally_due = None;
                self.tally_pages();
                self.listeners.clear();
                self.flush_queue();
            }
            Command::Exit => self.shutting_down = true,
            Command::Ping(reply) => {
                let _ = reply.send(());
            }
            Command::Tally(reply) => {
                self.tally_pages();
                let _ = reply.send(());
            }
            Command::AppPrimaryRuns => self.app_primary.runs = true,
            Command::AppPrimary { pid, channel } => self.set_app_primary(pid, channel),
            Command::WorkerExited {
                slot,
                pid,
                code,
                signal,
            } => self.app_primary_exit(slot, pid, code, signal),
            Command::Freeze(reply) => self.freeze(reply),
            // Not frozen (the freeze was refused): nothing to do.
            Command::Thaw => {}
        }
    }

    /// New `[handoff]` limits (a reload); they apply to what is dispatched
    /// and expired from now on. `kernel_rotation` stays: it was fixed when
    /// the listeners were bound, and may have been turned off since because
    /// the kernel refused the program.
    fn set_limits(&mut self, limits: HandoffSettings) {
        self.limits = HandoffSettings {
            kernel_rotation: self.limits.kernel_rotation,
            ..limits
        };
        // `max_unacked` is in the roster.
        self.roster_changed = true;
    }

    /// The channel of `worker`, if it has one still.
    pub(super) fn find(&self, worker: WorkerId) -> Option<ChannelIx> {
        self.channels
            .position(|c| c.as_ref().is_some_and(|c| c.worker == worker))
    }
}
