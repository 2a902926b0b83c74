//! `herd upgrade` on the new herd's side (see [`crate::upgrade`]): read
//! what the old herd carried, check it can be taken over, rebuild the
//! parts from it and run as any herd does.
//!
//! Everything that can refuse the takeover is checked before a carried fd
//! is claimed (the document, the config, the listeners, the cgroups); a
//! refusal re-executes the old binary with the same document
//! ([`Inherited::fall_back`]), which takes over again and reports why the
//! upgrade failed.

use std::time::Duration;

use super::*;
use crate::status::UpgradeRecord;
use crate::supervisor::CarriedSupervisor;
use crate::upgrade::{Handover, Inherited};

/// What [`Primary::take_over`] needs of the handover.
pub(super) struct Carried {
    supervisor: CarriedSupervisor,
    record: UpgradeRecord,
    uptime: Duration,
    config_changed: bool,
    from: String,
    binary: String,
    /// This is the old binary again: why the new one did not take over.
    failed: Option<String>,
}

/// `herd run` in a herd that `herd upgrade` started: takes over from the
/// old one, or falls back to it. `settings` is the config as this binary
/// read it (refused: the old binary goes on).
pub async fn run_carried(
    source: ConfigSource,
    settings: Result<Settings, String>,
    inherited: Inherited,
) -> Result<Outcome, PrimaryError> {
    let handover = match inherited.handover() {
        Ok(handover) => handover,
        Err(why) => {
            let why = format!("cannot read what the old herd handed over: {why}");
            return Err(fall_back(inherited, &why, None));
        }
    };
    let settings = match settings.and_then(|s| fits(&s, &handover).map(|()| s)) {
        Ok(settings) => settings,
        Err(why) => return Err(fall_back(inherited, &why, Some(&handover))),
    };
    if let Err(e) = process::become_subreaper() {
        warn!(
            event = "subreaper_failed",
            "cannot become the subreaper: {e}"
        );
    }
    let cgroups = match crate::cgroup::for_workers(settings.kill_mode) {
        Ok(cgroups) => cgroups,
        Err(e) => {
            let why = format!("cannot find the workers' cgroups: {e}");
            return Err(fall_back(inherited, &why, Some(&handover)));
        }
    };
    // From here on the carried fds are claimed: no going back.
    let failed = inherited.failed.clone();
    drop(inherited);
    start_log_files(&settings);
    let parts = claim(&handover, &settings, cgroups)?;
    upgrade::release_signals();
    let carried = Carried {
        supervisor: handover.supervisor,
        record: handover.record,
        uptime: Duration::from_millis(handover.uptime_ms),
        config_changed: handover.config_changed,
        from: handover.from,
        binary: handover.binary,
        failed,
    };
    drive(parts, source, settings, Start::Carried(Box::new(carried))).await
}

/// Re-executes the old binary; returns why the takeover failed, if even that failed.
fn fall_back(inherited: Inherited, why: &str, handover: Option<&Handover>) -> PrimaryError {
    error!(
        event = "takeover_refused",
        "cannot take over from the old herd: {why}"
    );
    // herd's log reaches stderr through a queue whose thread the exec ends.
    crate::worker_output::flush(crate::worker_output::EXIT_FLUSH_TIMEOUT);
    let error = inherited.fall_back(why, handover);
    PrimaryError::Upgrade(format!(
        "{why}; and the old binary could not run again: {error}"
    ))
}

/// The config this binary read serves the listeners the old herd had.
fn fits(settings: &Settings, handover: &Handover) -> Result<(), String> {
    let same = settings.listen.len() == handover.listen_addrs.len()
        && settings
            .listen
            .iter()
            .zip(&handover.listen_addrs)
            .all(|(wanted, bound)| {
                wanted.ip() == bound.ip() && (wanted.port() == 0 || wanted.port() == bound.port())
            });
    if same {
        Ok(())
    } else {
        Err(format!(
            "`listen` is not what the old herd listens on ({:?})",
            handover.listen_addrs
        ))
    }
}

/// Claims the carried fds: control socket, `/metrics`, the hand-off loop
/// with its listeners, channels and connections, `shared` mode's sockets.
fn claim(
    handover: &Handover,
    settings: &Settings,
    cgroups: Option<CgroupTree>,
) -> Result<Parts, PrimaryError> {
    let control = ControlServer::adopt(handover.control_fd, &settings.control)?;
    let metrics = handover
        .metrics_fd
        .map(|fd| {
            let listener = std::net::TcpListener::from(
                herd_protocol::fdpass::adopt_inherited_fd(fd).map_err(PrimaryError::HandoffLoop)?,
            );
            listener
                .set_nonblocking(true)
                .map_err(PrimaryError::HandoffLoop)?;
            tokio::net::TcpListener::from_std(listener).map_err(PrimaryError::HandoffLoop)
        })
        .transpose()?;
    let counters = Arc::new(Counters::new(&handover.listen_addrs));
    counters.restore(&handover.counters);
    let (events_tx, events) = mpsc::unbounded_channel();
    let limits = HandoffSettings {
        kernel_rotation: node_kernel_rotation(settings),
        ..settings.handoff
    };
    let (controller, handoff_thread) = handoff::spawn_carried(
        handover.handoff.clone(),
        settings.mode,
        limits,
        events_tx,
        counters.clone(),
        settings.metrics.is_some(),
        settings.backlog,
        settings.handoff_threads,
    )
    .map_err(PrimaryError::HandoffLoop)?;
    let sockets =
        Supervisor::carried_sockets(&handover.supervisor).map_err(PrimaryError::HandoffLoop)?;
    let signals = signals::forward_os_signals().map_err(PrimaryError::Signals)?;
    let (original, soft, hard) = handover.fd_limit;
    Ok(Parts {
        listen_addrs: handover.listen_addrs.clone(),
        sockets,
        metrics,
        control,
        cgroups,
        fd_limit: FdLimit {
            original,
            soft,
            hard,
        },
        counters,
        controller,
        handoff_thread,
        events,
        signals,
    })
}

impl Primary {
    /// The carried workers become this herd's; the upgrade is counted.
    pub(super) fn take_over(&mut self, carried: Carried) {
        let now = Instant::now();
        let since = now.checked_sub(carried.uptime).unwrap_or(now);
        self.started = since;
        self.upgrading.since = since;
        self.upgrading.record = carried.record;
        let kept = carried.supervisor.workers.len();
        self.supervisor.adopt(carried.supervisor);
        let record = &mut self.upgrading.record;
        let to = env!("CARGO_PKG_VERSION");
        match carried.failed {
            None => {
                record.done += 1;
                let said = format!(
                    "upgraded: herd {} -> {to} ({}), {kept} worker(s) kept",
                    carried.from, carried.binary
                );
                info!(workers = kept, event = "upgraded", "{said}");
                record.last = Some(said);
            }
            Some(why) => {
                record.failed += 1;
                let said = format!(
                    "upgrade failed: {} could not take over ({why}); the old herd went on",
                    carried.binary
                );
                warn!(failed = record.failed, event = "upgrade_failed", "{said}");
                record.last = Some(said);
            }
        }
        // Whatever exited while herd re-executed, and slots with no worker.
        self.supervisor.reap();
        self.supervisor.tick();
        if carried.config_changed {
            info!(
                event = "upgrade_reloads",
                "the config on disk differs from the one the workers run: reloading them"
            );
            let (reply, _answer) = oneshot::channel();
            start_reload(self, reply);
        }
    }
}
