//! How herd stops, and what its signals do: SIGTERM and `herd stop` wait
//! out `shutdown_delay` first (`/readyz` failing, everything still served,
//! so a load balancer or kube-proxy stops sending), then close the
//! listeners and drain; SIGINT stops at once; a second SIGINT, or SIGQUIT,
//! kills. The other signals reload and scale.

use super::*;

impl Primary {
    /// A graceful stop by `why`: after `shutdown_delay` if there is one
    /// (not for SIGINT, which a terminal sends to mean "now").
    pub(super) fn stop_after_delay(&mut self, why: &'static str) {
        let delay = self.supervisor.settings().shutdown_delay;
        if self.stopping() || self.stop_at.is_some() {
            // A second request does not wait again: it stops now.
            self.stop_now(why);
            return;
        }
        if delay.is_zero() {
            return self.stop_now(why);
        }
        info!(
            delay_ms = delay.as_millis() as u64,
            event = "stop_delayed",
            "{why}: /readyz fails from now; still serving for {delay:?} (shutdown_delay) before stopping"
        );
        self.stop_at = Some((Instant::now() + delay, why));
        // systemd hears of the stop now, not after the delay.
        self.systemd.stopping();
    }

    /// When a stop waiting out `shutdown_delay` begins, if one waits.
    pub(super) fn stop_due(&self) -> Option<tokio::time::Instant> {
        self.stop_at
            .map(|(at, _)| tokio::time::Instant::from_std(at))
    }

    /// `shutdown_delay` is over: the stop begins.
    pub(super) fn delay_over(&mut self) {
        let why = self.stop_at.map_or("stop", |(_, why)| why);
        self.stop_now(why);
    }

    /// Stops now: the delay, if one runs, is over.
    pub(super) fn stop_now(&mut self, why: &str) {
        self.stop_at = None;
        begin_stop(&mut self.supervisor, why);
    }

    /// Whether herd is stopping or about to (`/readyz` fails).
    pub(super) fn leaving(&self) -> Option<&'static str> {
        if self.stopping() {
            Some("stopping")
        } else if self.stop_at.is_some() {
            Some("stopping after shutdown_delay")
        } else {
            None
        }
    }

    pub(super) fn on_signal(&mut self, event: SignalEvent) {
        let name = event.signal_name();
        match event {
            SignalEvent::Terminate => self.stop_after_delay("SIGTERM"),
            SignalEvent::Interrupt if self.stopping() => {
                warn!(
                    signal = "SIGINT",
                    event = "fast_stop",
                    "second SIGINT: killing the remaining workers now"
                );
                self.supervisor.kill_all();
            }
            SignalEvent::Interrupt => self.stop_now(name),
            SignalEvent::Quit => {
                self.stop_now("SIGQUIT (fast stop)");
                warn!(
                    signal = "SIGQUIT",
                    event = "fast_stop",
                    "SIGQUIT: killing workers without waiting"
                );
                self.supervisor.kill_all();
            }
            SignalEvent::Reload => {
                let (reply, answer) = oneshot::channel();
                start_reload(self, reply);
                tokio::spawn(async move {
                    match answer.await {
                        Ok(response) if response.ok => {
                            info!(event = "sighup_reloaded", "SIGHUP: {}", response.message)
                        }
                        Ok(response) => {
                            error!(
                                event = "sighup_reload_failed",
                                "SIGHUP: {}", response.message
                            )
                        }
                        Err(_) => {}
                    }
                });
            }
            // Scaling by signal is ignored while stopping, as before.
            SignalEvent::AddWorker | SignalEvent::RemoveWorker if self.stopping() => {}
            SignalEvent::AddWorker => {
                let target = self.supervisor.worker_count() + 1;
                self.scale_by_signal(name, target);
            }
            SignalEvent::RemoveWorker => {
                let target = self.supervisor.worker_count().saturating_sub(1).max(1);
                self.scale_by_signal(name, target);
            }
            SignalEvent::Upgrade => self.start_upgrade("SIGUSR2", None),
        }
    }

    fn scale_by_signal(&mut self, name: &str, target: usize) {
        match self.supervisor.scale(target) {
            Ok(done) => info!(
                signal = name,
                workers = self.supervisor.worker_count(),
                event = "signal_scaled",
                "{name}: {done}"
            ),
            Err(refused) => warn!(
                signal = name,
                event = "signal_scale_refused",
                "{name}: {refused}"
            ),
        }
    }
}

/// Stops accepting and asks every worker to drain; they get until
/// `shutdown_timeout`, then SIGKILL.
fn begin_stop(supervisor: &mut Supervisor, why: &str) {
    if supervisor.phase() == Phase::Stopping {
        return;
    }
    let grace = supervisor.settings().shutdown_timeout;
    info!(
        event = "stopping",
        "{why}: stopping (listeners closed, workers drain for up to {grace:?})"
    );
    supervisor.stop();
}
