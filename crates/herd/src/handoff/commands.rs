//! The supervisor's commands ([`Command`], sent through [`Controller`]),
//! carried out in the loop's thread.

use super::*;

/// What the supervisor tells the hand-off loop. The supervisor decides
/// every worker's [`Role`]; the loop routes connections by it and never
/// changes it on its own.
#[derive(Debug)]
pub enum Command {
    /// A new worker, starting: it gets nothing until [`Command::Serve`].
    AddWorker { worker: NewWorker, channel: OwnedFd },
    /// The worker holds its slot now and gets the slot's connections.
    Serve { worker: WorkerId },
    /// The worker gets nothing more and is sent DRAIN (Node: `disconnect`).
    Drain { worker: WorkerId },
    /// The worker's process has exited: what it had not acknowledged goes to
    /// other workers now, even if a helper still holds its channel open.
    Forget { worker: WorkerId },
    /// Only slots below `count` remain (their workers were drained first).
    SetSlots { count: usize },
    /// A reload's `[handoff]` limits, from now on (`kernel_rotation` excepted).
    SetLimits(HandoffSettings),
    /// Close the listeners and hand off what is queued where possible. The
    /// loop keeps collecting ACKs until [`Command::Exit`].
    StopAccepting,
    /// End the loop now.
    Exit,
    /// `herd upgrade`: describe everything the loop holds and stop turning
    /// until [`Command::Thaw`] (`handover`); the reply says why not if the
    /// loop cannot be described, and it is not frozen then.
    Freeze(std::sync::mpsc::SyncSender<Result<CarriedLoop, String>>),
    /// The upgrade did not happen: turn again, as if nothing had.
    Thaw,
    /// `/livez`: the loop answers when it gets to it, proving it turns.
    Ping(tokio::sync::oneshot::Sender<()>),
    /// Read every counter page into the counters now, then answer: status
    /// and metrics are fresh to the moment they were asked for.
    Tally(mpsc::SyncSender<()>),
    /// `node.primary = "run"`: relay workers' messages and lives to the
    /// app's primary, which counts them ready once `online`. Sent before
    /// the first worker is added.
    AppPrimaryRuns,
    /// The app's primary started (again): `channel` is herd's end of its channel.
    AppPrimary { pid: u32, channel: OwnedFd },
    /// The worker in `slot` (process `pid`) was reaped: the app's primary
    /// hears its `exit` (its exit `code`, or the `signal` it died of).
    WorkerExited {
        slot: SlotIx,
        pid: u32,
        code: Option<i32>,
        signal: Option<i32>,
    },
}

/// The supervisor's handle on the loop.
#[derive(Debug, Clone)]
pub struct Controller {
    pub(super) commands: mpsc::Sender<Command>,
    pub(super) waker: Arc<Waker>,
}

impl Controller {
    /// Queues a command and wakes the loop. Fails only once the loop has ended.
    pub fn send(&self, command: Command) -> io::Result<()> {
        self.commands
            .send(command)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "hand-off loop has stopped"))?;
        self.waker.wake()
    }

    /// Has the loop read every worker's counter page ([`Command::Tally`])
    /// and waits for it, at most `within` (it answers within a turn; a
    /// frozen loop, after the thaw). False if it did not answer in time:
    /// the counts are then as of the last tally, at most 100 ms old.
    pub fn tally(&self, within: Duration) -> bool {
        let (done, answered) = mpsc::sync_channel(1);
        self.send(Command::Tally(done)).is_ok() && answered.recv_timeout(within).is_ok()
    }
}

/// How long status and metrics wait for [`Controller::tally`].
pub const TALLY_WAIT: Duration = Duration::from_millis(50);

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
