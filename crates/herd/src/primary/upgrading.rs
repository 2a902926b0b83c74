//! `herd upgrade` on the old herd's side (see [`crate::upgrade`] for the
//! whole): refused at once when this herd cannot be carried, else the dry
//! run of the binary on disk, then the freeze, the document and the exec.
//! Only one runs at a time; each that does not end in the exec is counted
//! (`herd status`, `upgrade_failed` in the log) and answered with why.

use std::os::fd::RawFd;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use super::*;
use crate::status::UpgradeRecord;
use crate::upgrade::{self, Handover, Origin, HANDOVER_VERSION, PROBE_ANSWER, PROBE_OUTPUT_MAX};

/// How long the hand-off loop has to describe itself and freeze.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the dry run printed, once it closed its output.
pub(super) struct ProbeAnswer {
    pid: u32,
    output: Vec<u8>,
}

/// A dry run under way.
struct Probing {
    pid: u32,
    /// Killed then, if it has not answered.
    deadline: Option<Instant>,
    timed_out: bool,
    reply: Option<oneshot::Sender<Response>>,
    asked_by: &'static str,
}

/// What an upgrade needs of the running herd, and the one under way.
pub(super) struct Upgrading {
    /// `None` (and why) when this herd cannot re-execute itself.
    origin: Result<Origin, String>,
    control_fd: RawFd,
    metrics_fd: Option<RawFd>,
    probes: mpsc::UnboundedSender<ProbeAnswer>,
    probing: Option<Probing>,
    /// Counted over every upgrade of this herd (carried across them).
    pub(super) record: UpgradeRecord,
    /// When this herd first started, over every upgrade.
    pub(super) since: Instant,
}

impl Upgrading {
    pub(super) fn new(
        control_fd: RawFd,
        metrics_fd: Option<RawFd>,
        probes: mpsc::UnboundedSender<ProbeAnswer>,
    ) -> Upgrading {
        Upgrading {
            origin: Origin::of_this_process(),
            control_fd,
            metrics_fd,
            probes,
            probing: None,
            record: UpgradeRecord::default(),
            since: Instant::now(),
        }
    }

    /// When the dry run is to be killed.
    pub(super) fn due(&self) -> Option<tokio::time::Instant> {
        self.probing
            .as_ref()
            .and_then(|p| p.deadline)
            .map(tokio::time::Instant::from_std)
    }

    /// The dry run took too long: killed; its answer (its closed output)
    /// follows and fails the upgrade.
    pub(super) fn overdue(&mut self) {
        if let Some(probing) = self.probing.as_mut() {
            probing.deadline = None;
            probing.timed_out = true;
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(probing.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Primary {
    /// `herd upgrade` or SIGUSR2: refused now, or the dry run starts.
    pub(super) fn start_upgrade(
        &mut self,
        asked_by: &'static str,
        reply: Option<oneshot::Sender<Response>>,
    ) {
        let refused = if self.upgrading.probing.is_some() {
            Some("an upgrade is already under way".to_string())
        } else {
            self.upgrading
                .origin
                .as_ref()
                .err()
                .cloned()
                .or_else(|| self.supervisor.carried().err())
        };
        if let Some(why) = refused {
            return self.upgrade_failed(why, reply);
        }
        let origin = self.upgrading.origin.as_ref().expect("checked above");
        match spawn_probe(origin, self.upgrading.probes.clone()) {
            Ok(pid) => {
                self.supervisor.expect_child(pid);
                info!(
                    binary = %origin.binary.display(),
                    asked_by,
                    event = "upgrade_started",
                    "{asked_by}: trying {} before re-executing it",
                    origin.binary.display()
                );
                self.upgrading.probing = Some(Probing {
                    pid,
                    deadline: Some(Instant::now() + upgrade::PROBE_TIMEOUT),
                    timed_out: false,
                    reply,
                    asked_by,
                });
            }
            Err(e) => {
                let why = format!("cannot run {}: {e}", origin.binary.display());
                self.upgrade_failed(why, reply);
            }
        }
    }

    /// The dry run ended: on to the exec if it said it can take over.
    pub(super) fn probe_answered(
        &mut self,
        answer: ProbeAnswer,
        events: &mpsc::UnboundedReceiver<handoff::Event>,
    ) {
        let Some(probing) = self.upgrading.probing.take_if(|p| p.pid == answer.pid) else {
            return;
        };
        let binary = self
            .upgrading
            .origin
            .as_ref()
            .map(|o| o.binary.display().to_string());
        let binary = binary.unwrap_or_default();
        let text = String::from_utf8_lossy(&answer.output);
        let wanted = format!("{PROBE_ANSWER} {HANDOVER_VERSION}");
        if probing.timed_out {
            let why = format!(
                "{binary} did not answer its dry run within {:?}; killed it",
                upgrade::PROBE_TIMEOUT
            );
            return self.upgrade_failed(why, probing.reply);
        }
        if !text.lines().any(|line| line.trim() == wanted) {
            let said = one_line(&text);
            let why = format!(
                "{binary} cannot take over from this herd (its dry run said: {})",
                if said.is_empty() { "nothing" } else { &said }
            );
            return self.upgrade_failed(why, probing.reply);
        }
        let why = self.exec_upgrade(&binary, probing.asked_by, events);
        self.upgrade_failed(why, probing.reply);
    }

    /// Freezes, describes and re-executes; returns only if that could not
    /// be done (why), with herd going on as before.
    fn exec_upgrade(
        &mut self,
        binary: &str,
        asked_by: &str,
        events: &mpsc::UnboundedReceiver<handoff::Event>,
    ) -> String {
        let config_changed = match self.config_for_upgrade() {
            Ok(changed) => changed,
            Err(why) => return why,
        };
        let carried_loop = match self.freeze() {
            Ok(carried) => carried,
            Err(why) => return why,
        };
        let thaw = |primary: &mut Primary, why: String| {
            let _ = primary.handoff.send(Command::Thaw);
            why
        };
        if !events.is_empty() {
            let why = "the hand-off loop had news not yet taken in; try again".to_string();
            return thaw(self, why);
        }
        let supervisor = match self.supervisor.carried() {
            Ok(carried) => carried,
            Err(why) => return thaw(self, why),
        };
        let handover = Handover {
            version: HANDOVER_VERSION,
            from: env!("CARGO_PKG_VERSION").to_string(),
            binary: binary.to_string(),
            argv: self
                .upgrading
                .origin
                .as_ref()
                .map(Origin::argv)
                .unwrap_or_default(),
            control_fd: self.upgrading.control_fd,
            metrics_fd: self.upgrading.metrics_fd,
            listen_addrs: self.supervisor.served().to_vec(),
            handoff: carried_loop,
            supervisor,
            counters: self.counters.carried(),
            fd_limit: {
                let limit = self.supervisor.fd_limit();
                (limit.original, limit.soft, limit.hard)
            },
            uptime_ms: millis(self.upgrading.since.elapsed()),
            record: self.upgrading.record.clone(),
            config_changed,
        };
        let doc = match handover.write() {
            Ok(doc) => doc,
            Err(e) => return thaw(self, format!("cannot write the handover: {e}")),
        };
        info!(
            binary,
            asked_by,
            workers = handover.supervisor.workers.len(),
            event = "upgrade_exec",
            "{asked_by}: re-executing {binary}; the workers keep running"
        );
        crate::worker_output::flush(crate::worker_output::EXIT_FLUSH_TIMEOUT);
        let origin = self
            .upgrading
            .origin
            .as_ref()
            .expect("checked when it started");
        let error = upgrade::exec(origin, &doc, &handover);
        thaw(self, format!("cannot execute {binary}: {error}"))
    }

    /// Whether the config on disk differs from the running one (the new
    /// herd then reloads); refused when it is invalid or changes what only
    /// a restart applies, as `herd reload` would refuse it.
    fn config_for_upgrade(&self) -> Result<bool, String> {
        let running = self.supervisor.settings();
        let on_disk = self
            .source
            .load()
            .map_err(|e| format!("the config herd would re-read is invalid: {e}"))?;
        let restart = running.restart_needed(&on_disk);
        if !restart.is_empty() {
            return Err(format!(
                "the config on disk changes what only a restart applies: {}",
                restart.join(", ")
            ));
        }
        Ok(format!("{on_disk:?}") != format!("{:?}", **running))
    }

    /// Freezes the hand-off loop (thawed again if it does not answer in time).
    fn freeze(&self) -> Result<handoff::CarriedLoop, String> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handoff
            .send(Command::Freeze(tx))
            .map_err(|e| format!("hand-off loop: {e}"))?;
        match rx.recv_timeout(FREEZE_TIMEOUT) {
            Ok(described) => described,
            Err(_) => {
                let _ = self.handoff.send(Command::Thaw);
                Err(format!(
                    "the hand-off loop did not freeze within {FREEZE_TIMEOUT:?}"
                ))
            }
        }
    }

    /// An upgrade that did not happen: counted, logged, answered.
    fn upgrade_failed(&mut self, why: String, reply: Option<oneshot::Sender<Response>>) {
        let record = &mut self.upgrading.record;
        record.failed += 1;
        record.last = Some(format!("upgrade failed: {why}"));
        warn!(
            failed = record.failed,
            event = "upgrade_failed",
            "upgrade failed, this herd goes on: {why}"
        );
        if let Some(reply) = reply {
            let _ = reply.send(Response::failed(format!(
                "upgrade failed, herd goes on as it was: {why}"
            )));
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The last lines of `text`, as one line of bounded length.
fn one_line(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" / ");
    tail.chars().take(400).collect()
}

/// Starts the dry run with its stdout and stderr on one pipe, read (at
/// most [`PROBE_OUTPUT_MAX`] bytes kept) until it closes; then the answer
/// goes to `answers`. Its pid.
fn spawn_probe(
    origin: &Origin,
    answers: mpsc::UnboundedSender<ProbeAnswer>,
) -> std::io::Result<u32> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut command = origin.probe_command();
    command
        .stdin(std::process::Stdio::null())
        .stdout(write.try_clone()?)
        .stderr(write);
    let child = command.spawn()?;
    // The command's copies of the write end are closed with it: EOF comes
    // when the dry run (and anything it left) closes its own.
    drop(command);
    let pid = child.id();
    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(read)?;
    tokio::spawn(async move {
        let mut output = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            match pipe.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = PROBE_OUTPUT_MAX.saturating_sub(output.len());
                    output.extend_from_slice(&chunk[..n.min(room)]);
                }
            }
        }
        let _ = answers.send(ProbeAnswer { pid, output });
    });
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dry_runs_words_come_out_as_one_bounded_line() {
        assert_eq!(one_line(""), "");
        assert_eq!(one_line("a\n\n b \nc\nd\n"), "b / c / d");
        assert_eq!(one_line(&"x".repeat(1000)).len(), 400);
    }
}
