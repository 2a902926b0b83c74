//! Worker processes: spawning, watching, restarting, stopping.
//!
//! Owns the child processes. Each slot `0..N` holds at most one live worker;
//! a worker that exits is logged with its exit code or signal and its slot is
//! refilled after a backoff that doubles while starts keep failing. Spawning
//! creates the worker's channel and hands the primary's end to the hand-off
//! loop; the worker's stdout and stderr are forwarded line by line, tagged
//! with the slot.
//!
//! Runs on the main thread's tokio runtime: `PR_SET_PDEATHSIG` is tied to the
//! thread that forks, and the main thread lives exactly as long as herd.

use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::config::Settings;
use crate::fdpass;
use crate::handoff::{Command, Controller};

/// Sent to the supervisor by its own tasks.
#[derive(Debug)]
pub enum Notice {
    /// A worker process ended.
    Exited {
        slot: usize,
        uid: u64,
        status: std::io::Result<ExitStatus>,
    },
    /// A slot's restart delay is over.
    RestartDue { slot: usize },
    /// A worker's channel closed a while ago; is the process still there?
    ChannelLost { slot: usize, uid: u64 },
    /// A worker asked to stop had its time; SIGKILL it if it is still there.
    KillIfAlive { slot: usize, uid: u64 },
}

/// How long a worker may outlive its channel before herd stops it. Its exit
/// normally follows the channel's close within milliseconds.
const CHANNEL_LOSS_GRACE: Duration = Duration::from_secs(1);

/// The state of one worker slot (see docs/architecture.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// No process: waiting for the restart delay.
    Waiting,
    /// Process started, has not said READY.
    Starting,
    /// Process said READY and gets connections.
    Ready,
}

#[derive(Debug)]
struct Slot {
    state: SlotState,
    /// The live process, if any.
    process: Option<Process>,
    /// Failed starts in a row (exits before `min_uptime`); drives the backoff.
    failures: u32,
    restarts: u64,
}

#[derive(Debug, Clone, Copy)]
struct Process {
    uid: u64,
    pid: u32,
    started: Instant,
}

/// Spawns and tracks the worker processes.
pub struct Supervisor {
    settings: Settings,
    handoff: Controller,
    slots: Vec<Slot>,
    next_uid: u64,
    notices: mpsc::UnboundedSender<Notice>,
    /// Set once herd is stopping: exits are no longer followed by restarts.
    stopping: bool,
}

impl Supervisor {
    pub fn new(
        settings: Settings,
        handoff: Controller,
    ) -> (Supervisor, mpsc::UnboundedReceiver<Notice>) {
        let (notices, inbox) = mpsc::unbounded_channel();
        let slots = (0..settings.workers)
            .map(|_| Slot {
                state: SlotState::Waiting,
                process: None,
                failures: 0,
                restarts: 0,
            })
            .collect();
        let supervisor = Supervisor {
            settings,
            handoff,
            slots,
            next_uid: 0,
            notices,
            stopping: false,
        };
        (supervisor, inbox)
    }

    /// Starts a worker in every slot.
    pub fn start_all(&mut self) {
        for slot in 0..self.slots.len() {
            self.spawn(slot);
        }
    }

    /// How many worker processes are alive.
    pub fn live(&self) -> usize {
        self.slots.iter().filter(|s| s.process.is_some()).count()
    }

    pub fn on_notice(&mut self, notice: Notice) {
        match notice {
            Notice::Exited { slot, uid, status } => self.on_exit(slot, uid, status),
            Notice::ChannelLost { slot, uid } => self.on_channel_lost(slot, uid),
            Notice::KillIfAlive { slot, uid } => {
                if let Some(process) = self.live_process(slot, uid) {
                    warn!(
                        slot,
                        pid = process.pid,
                        "worker did not stop; sending SIGKILL"
                    );
                    let _ = killpg(Pid::from_raw(process.pid as i32), Signal::SIGKILL);
                }
            }
            Notice::RestartDue { slot } => {
                if !self.stopping && self.slots[slot].process.is_none() {
                    self.slots[slot].restarts += 1;
                    self.spawn(slot);
                }
            }
        }
    }

    /// The hand-off loop saw the worker say READY.
    pub fn on_ready(&mut self, slot: usize, uid: u64, pid: u32) {
        if let Some(entry) = self.slots.get_mut(slot) {
            if entry.process.is_some_and(|p| p.uid == uid) {
                entry.state = SlotState::Ready;
                info!(slot, pid, "worker ready");
            }
        }
    }

    /// The hand-off loop lost this worker's channel. Normally the process
    /// is exiting and its exit notice follows at once; one still alive after
    /// [`CHANNEL_LOSS_GRACE`] can never get a connection again (it closed
    /// the channel or broke the protocol), so it is stopped and restarted.
    pub fn on_channel_closed(&mut self, slot: usize, uid: u64) {
        self.notify_after(CHANNEL_LOSS_GRACE, Notice::ChannelLost { slot, uid });
    }

    fn on_channel_lost(&mut self, slot: usize, uid: u64) {
        let Some(process) = self.live_process(slot, uid) else {
            return;
        };
        warn!(
            slot,
            pid = process.pid,
            "worker closed its channel but is still running; stopping it"
        );
        let _ = killpg(Pid::from_raw(process.pid as i32), Signal::SIGTERM);
        self.notify_after(
            self.settings.shutdown_timeout,
            Notice::KillIfAlive { slot, uid },
        );
    }

    /// The process `uid` if it still holds `slot` and herd is not stopping.
    fn live_process(&self, slot: usize, uid: u64) -> Option<Process> {
        let process = self.slots.get(slot)?.process?;
        (process.uid == uid && !self.stopping).then_some(process)
    }

    fn notify_after(&self, delay: Duration, notice: Notice) {
        let notices = self.notices.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = notices.send(notice);
        });
    }

    fn spawn(&mut self, slot: usize) {
        match self.try_spawn(slot) {
            Ok(process) => {
                info!(slot, pid = process.pid, "worker started");
                let entry = &mut self.slots[slot];
                entry.process = Some(process);
                entry.state = SlotState::Starting;
            }
            Err(e) => {
                error!(slot, program = %self.settings.program.display(), "cannot start worker: {e}");
                self.slots[slot].failures += 1;
                self.schedule_restart(slot);
            }
        }
    }

    fn try_spawn(&mut self, slot: usize) -> std::io::Result<Process> {
        let (primary_end, child_end) = fdpass::channel_pair()?;
        let settings = &self.settings;
        let mut command = tokio::process::Command::new(&settings.program);
        command
            .args(&settings.args)
            .envs(&settings.env)
            .env(
                crate::worker::CHANNEL_FD_ENV,
                child_end.as_raw_fd().to_string(),
            )
            .env(crate::worker::WORKER_ID_ENV, slot.to_string())
            .env("HERD_WORKERS", self.slots.len().to_string())
            .env("HERD_PROTOCOL", crate::protocol::VERSION.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group: a terminal's Ctrl-C reaches herd only, and
            // herd decides how workers stop; signals go to the whole group,
            // so `sh -c` wrappers and their children stop too.
            .process_group(0);
        if let Some(dir) = &settings.cwd {
            command.current_dir(dir);
        }
        fdpass::inherit_fds_and_die_with_parent(&mut command, vec![child_end.as_raw_fd()]);
        let mut child = command.spawn()?;
        drop(child_end);
        let pid = child.id().unwrap_or_default();
        self.next_uid += 1;
        let uid = self.next_uid;
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward_lines(out, slot, false));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward_lines(err, slot, true));
        }
        let notices = self.notices.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = notices.send(Notice::Exited { slot, uid, status });
        });
        self.handoff
            .send(Command::AddWorker {
                slot,
                uid,
                pid,
                channel: primary_end,
            })
            .map_err(|e| std::io::Error::other(format!("hand-off loop: {e}")))?;
        Ok(Process {
            uid,
            pid,
            started: Instant::now(),
        })
    }

    fn on_exit(&mut self, slot: usize, uid: u64, status: std::io::Result<ExitStatus>) {
        let entry = &mut self.slots[slot];
        let Some(process) = entry.process.filter(|p| p.uid == uid) else {
            return;
        };
        entry.process = None;
        entry.state = SlotState::Waiting;
        let uptime = process.started.elapsed();
        let how = match &status {
            Ok(status) => describe_exit(*status),
            Err(e) => format!("unknown status ({e})"),
        };
        if self.stopping {
            info!(slot, pid = process.pid, "worker {how}");
            return;
        }
        warn!(
            slot,
            pid = process.pid,
            uptime_ms = uptime.as_millis() as u64,
            "worker {how}"
        );
        if uptime >= self.settings.restart.min_uptime {
            entry.failures = 0;
        } else {
            entry.failures += 1;
        }
        self.schedule_restart(slot);
    }

    /// Refills the slot now after a good run, or after a doubling delay
    /// while starts keep failing, so a crash loop never spins.
    fn schedule_restart(&mut self, slot: usize) {
        let failures = self.slots[slot].failures;
        let delay = restart_delay(
            failures,
            self.settings.restart.backoff_base,
            self.settings.restart.backoff_max,
        );
        if failures > 0 {
            info!(
                slot,
                failures,
                delay_ms = delay.as_millis() as u64,
                "restarting worker after backoff"
            );
        }
        self.notify_after(delay, Notice::RestartDue { slot });
    }

    /// Stops every worker: SIGTERM to each process group, then SIGKILL to
    /// whatever is left when `grace` runs out. Returns true when all exited in time.
    pub async fn stop_all(
        &mut self,
        inbox: &mut mpsc::UnboundedReceiver<Notice>,
        grace: Duration,
    ) -> bool {
        self.stopping = true;
        self.signal_all(Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + grace;
        while self.live() > 0 {
            match tokio::time::timeout_at(deadline, inbox.recv()).await {
                Ok(Some(notice)) => self.on_notice(notice),
                Ok(None) => break,
                Err(_elapsed) => {
                    warn!(
                        left = self.live(),
                        "workers did not exit within {grace:?}; sending SIGKILL"
                    );
                    self.signal_all(Signal::SIGKILL);
                    while self.live() > 0 {
                        match inbox.recv().await {
                            Some(notice) => self.on_notice(notice),
                            None => break,
                        }
                    }
                    return false;
                }
            }
        }
        true
    }

    fn signal_all(&self, signal: Signal) {
        for process in self.slots.iter().filter_map(|s| s.process) {
            let _ = killpg(Pid::from_raw(process.pid as i32), signal);
        }
    }
}

/// 0 after a good run; then base, 2·base, 4·base, … capped at `max`.
fn restart_delay(failures: u32, base: Duration, max: Duration) -> Duration {
    match failures {
        0 => Duration::ZERO,
        n => base.saturating_mul(1u32 << (n - 1).min(20)).min(max),
    }
}

fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => {
            let name = Signal::try_from(signal).map_or("unknown", |s| s.as_str());
            format!("was killed by signal {signal} ({name})")
        }
        _ => format!("ended ({status})"),
    }
}

/// Copies a worker's output to herd's, one whole line at a time, tagged
/// with its slot so interleaved workers stay readable.
async fn forward_lines(stream: impl AsyncRead + Unpin, slot: usize, is_stderr: bool) {
    use std::io::Write;
    let mut lines = BufReader::new(stream).split(b'\n');
    let prefix = format!("[worker {slot}] ");
    let mut line_out = Vec::with_capacity(256);
    while let Ok(Some(line)) = lines.next_segment().await {
        line_out.clear();
        line_out.extend_from_slice(prefix.as_bytes());
        line_out.extend_from_slice(&line);
        line_out.push(b'\n');
        let _ = if is_stderr {
            std::io::stderr().lock().write_all(&line_out)
        } else {
            std::io::stdout().lock().write_all(&line_out)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn exits_are_described_with_code_or_signal() {
        assert_eq!(
            describe_exit(ExitStatus::from_raw(3 << 8)),
            "exited with code 3"
        );
        assert_eq!(
            describe_exit(ExitStatus::from_raw(9)),
            "was killed by signal 9 (SIGKILL)"
        );
    }
}
