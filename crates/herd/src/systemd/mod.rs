//! systemd, both ways: herd as a `Type=notify` service, and herd's own
//! listeners taken from socket activation.
//!
//! Owns what herd tells its service manager and when, as a small state
//! machine over what the main loop observes after every event ([`Seen`]):
//! `READY=1` once every slot's first worker is ready; `STATUS=` lines when
//! what they say changes, at most once a second; `RELOADING=1` with
//! `MONOTONIC_USEC=` when a reload starts and `READY=1` when it ends, even
//! when it failed (the `STATUS=` says so: the service is up either way);
//! `STOPPING=1` once, when the stop starts; `WATCHDOG=1` every half of
//! `WATCHDOG_USEC`, from the main loop itself, so a hung loop stops the
//! pings and systemd restarts herd. Nothing here blocks: see `notify`.
//!
//! `notify` is the datagram client, `listen_fds` the inherited sockets.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::activation::SocketPlan;
use crate::config::Settings;
use crate::counters::Counters;
use crate::dispatch::Mode;
use crate::listener::BoundListener;
use crate::status::{Phase, SlotState};
use crate::supervisor::Supervisor;

mod listen_fds;
mod notify;

pub use listen_fds::ActivationError;
pub use notify::{monotonic_usec, Notifier};

/// How often a `STATUS=` that changed may be sent.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// What herd's service manager asks it to ping, microseconds.
const WATCHDOG_USEC_ENV: &str = "WATCHDOG_USEC";

/// The pid `WATCHDOG_USEC` is meant for; unset means herd.
const WATCHDOG_PID_ENV: &str = "WATCHDOG_PID";

/// What the main loop sees of herd after an event.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    pub ready: usize,
    pub slots: usize,
    pub phase: Phase,
    pub mode: &'a str,
    pub listen: &'a [SocketAddr],
}

/// What is owed to systemd, and when.
#[derive(Debug)]
pub struct Systemd {
    notifier: Option<Notifier>,
    ready_sent: bool,
    stopping_sent: bool,
    /// The `STATUS=` last sent, and when.
    status: String,
    status_at: Option<Instant>,
    watchdog: Option<tokio::time::Interval>,
    flush: Option<tokio::time::Interval>,
}

/// A timer of [`Systemd::due`] fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    Watchdog,
    Status,
}

impl Systemd {
    /// From herd's environment: `NOTIFY_SOCKET`, `WATCHDOG_USEC`,
    /// `WATCHDOG_PID`. Without a `NOTIFY_SOCKET` it does nothing at all.
    pub fn from_env() -> Systemd {
        let notifier = match Notifier::from_env() {
            Ok(notifier) => notifier,
            Err(e) => {
                warn!(
                    event = "systemd_notify_unusable",
                    "not notifying systemd: {e}"
                );
                None
            }
        };
        let watchdog = notifier.as_ref().and_then(|_| watchdog_interval());
        if let Some(every) = watchdog {
            info!(
                every_ms = every.as_millis() as u64,
                event = "systemd_watchdog",
                "pinging systemd's watchdog every {every:?}"
            );
        }
        let timer = |period| {
            let mut timer = tokio::time::interval(period);
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            timer
        };
        Systemd {
            flush: notifier.as_ref().map(|_| timer(STATUS_EVERY)),
            watchdog: watchdog.map(timer),
            notifier,
            ready_sent: false,
            stopping_sent: false,
            status: String::new(),
            status_at: None,
        }
    }

    /// Whether herd has a service manager to tell anything.
    pub fn enabled(&self) -> bool {
        self.notifier.is_some()
    }

    /// A reload starts (`herd reload`, SIGHUP): the notifier its outcome
    /// is told on, by [`reload_finished`].
    /// `None` (nothing said) before the first `READY=1`, whose own is
    /// still to come, and once stopping: a READY then would tell systemd
    /// the service is back.
    pub fn reload_started(&mut self) -> Option<Notifier> {
        if !self.ready_sent || self.stopping_sent {
            return None;
        }
        let notifier = self.notifier.clone()?;
        let message = format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading",
            monotonic_usec()
        );
        notifier.send(&message);
        self.status = "reloading".into();
        self.status_at = Some(Instant::now());
        Some(notifier)
    }

    /// Called after every event with what herd looks like now.
    pub fn observe(&mut self, seen: Seen<'_>) {
        let Some(notifier) = self.notifier.clone() else {
            return;
        };
        if seen.phase == Phase::Stopping {
            self.stopping();
            return;
        }
        if self.stopping_sent {
            return;
        }
        let status = describe(&seen);
        if !self.ready_sent && seen.ready == seen.slots && seen.phase == Phase::Running {
            self.ready_sent = true;
            notifier.ready(&status);
            info!(
                event = "systemd_ready",
                "told systemd herd is ready: {status}"
            );
            self.sent(status);
            return;
        }
        let due = self.status_at.is_none_or(|at| at.elapsed() >= STATUS_EVERY);
        if status != self.status && due {
            notifier.send(&format!("STATUS={status}"));
            self.sent(status);
        }
    }

    /// `STOPPING=1`, once: from [`Systemd::observe`] when the phase
    /// becomes stopping, or earlier by a stop path that keeps serving a
    /// while first. Nothing but the stop is said after it.
    pub fn stopping(&mut self) {
        let Some(notifier) = &self.notifier else {
            return;
        };
        if !self.stopping_sent {
            self.stopping_sent = true;
            notifier.stopping("stopping: workers drain");
            info!(event = "systemd_stopping", "told systemd herd is stopping");
        }
    }

    /// [`Systemd::observe`] of the supervisor's slots, when there is a
    /// service manager to tell (else nothing is computed).
    pub fn observe_from(&mut self, supervisor: &Supervisor, counters: &Counters) {
        if !self.enabled() {
            return;
        }
        let slots = supervisor.status(|_| 0);
        let serving = |state| matches!(state, SlotState::Ready | SlotState::Replacing);
        let listen = counters.listen_addrs();
        self.observe(Seen {
            ready: slots.iter().filter(|slot| serving(slot.state)).count(),
            slots: slots.len(),
            phase: supervisor.phase(),
            mode: supervisor.settings().mode.name(),
            listen: &listen,
        });
    }

    fn sent(&mut self, status: String) {
        self.status = status;
        self.status_at = Some(Instant::now());
    }

    /// Waits for the next watchdog ping or status flush; forever when
    /// there is neither (no `NOTIFY_SOCKET`).
    pub async fn due(&mut self) -> Due {
        async fn tick(timer: Option<&mut tokio::time::Interval>) {
            match timer {
                Some(timer) => {
                    timer.tick().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = tick(self.watchdog.as_mut()) => Due::Watchdog,
            _ = tick(self.flush.as_mut()) => Due::Status,
        }
    }

    /// A timer fired: ping the watchdog (a status change held back by the
    /// rate limit goes out with the next [`Systemd::observe`]).
    pub fn on_due(&mut self, due: Due) {
        if let (Due::Watchdog, Some(notifier)) = (due, &self.notifier) {
            notifier.send("WATCHDOG=1");
        }
    }
}

/// After a reload: `READY=1`, with what became of it.
pub fn reload_finished(notifier: Option<Notifier>, outcome: Result<&str, &str>) {
    let Some(notifier) = notifier else { return };
    let status = match outcome {
        Ok(message) => format!("reload finished: {message}"),
        Err(message) => format!("reload failed: {message}"),
    };
    notifier.ready(&one_line(&status));
}

/// `STATUS=` is one line: a newline would start another `KEY=VALUE`.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// E.g. "2/2 workers ready, mode round-robin, listening on 127.0.0.1:3000".
fn describe(seen: &Seen<'_>) -> String {
    let listen: Vec<String> = seen.listen.iter().map(ToString::to_string).collect();
    let phase = match seen.phase {
        Phase::Reloading => ", reloading",
        _ => "",
    };
    format!(
        "{}/{} workers ready{phase}, mode {}, listening on {}",
        seen.ready,
        seen.slots,
        seen.mode,
        listen.join(", ")
    )
}

/// Half of `WATCHDOG_USEC`, if it is set and meant for herd.
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var(WATCHDOG_USEC_ENV).ok()?.trim().parse().ok()?;
    if let Ok(pid) = std::env::var(WATCHDOG_PID_ENV) {
        if pid.trim() != std::process::id().to_string() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// The keys that make herd bind sockets of its own on each `listen`
/// address besides the listener (per-slot SO_REUSEPORT groups), if any.
pub fn own_sockets(
    settings: &Settings,
    plan: SocketPlan,
    node_rotation: bool,
) -> Option<&'static str> {
    match plan {
        SocketPlan::PerSlot(_) if settings.mode == Mode::ReusePort => {
            Some("`mode` = \"reuseport\"")
        }
        SocketPlan::PerSlot(_) => Some("`rotation` = \"kernel\""),
        _ if node_rotation => Some("`rotation` = \"kernel\""),
        _ => None,
    }
}

/// herd's listeners from socket activation, in `listen` order, or `None`
/// when herd was not socket-activated. `own_sockets`: the mode binds
/// sockets of its own on the port (per-slot groups), which a socket
/// systemd holds would keep out, so it is refused with the keys to change.
pub fn inherited_listeners(
    listen: &[SocketAddr],
    own_sockets: Option<&str>,
) -> Result<Option<Vec<BoundListener>>, ActivationError> {
    let Some(inherited) = listen_fds::inherited()? else {
        return Ok(None);
    };
    if let Some(keys) = own_sockets {
        return Err(ActivationError::Mode(format!(
            "{keys} binds a socket per worker on each `listen` address, which the socket systemd \
             passed (LISTEN_FDS) and keeps would shut out; under socket activation use mode \
             \"shared\" or a mode herd hands connections off in (round-robin, least-conn, ...)"
        )));
    }
    let matched = listen_fds::match_listen(listen, inherited)?;
    let mut listeners = Vec::with_capacity(matched.len());
    for (bound, fd, name) in matched {
        info!(
            listener = bound.index.get(),
            addr = %bound.local,
            fd,
            name = %name,
            event = "listener_inherited",
            "listening on {}, a socket systemd passed (fd {fd}, {name})",
            bound.local
        );
        listeners.push(bound);
    }
    Ok(Some(listeners))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    fn manager(name: &str) -> (UnixDatagram, Systemd) {
        let path = std::env::temp_dir().join(format!("herd-sd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        server.set_nonblocking(true).unwrap();
        let systemd = Systemd {
            notifier: Some(Notifier::to(path.to_str().unwrap()).unwrap()),
            ready_sent: false,
            stopping_sent: false,
            status: String::new(),
            status_at: None,
            watchdog: None,
            flush: None,
        };
        (server, systemd)
    }

    fn heard(server: &UnixDatagram) -> Vec<String> {
        let mut buf = [0u8; 4096];
        let mut messages = Vec::new();
        while let Ok(n) = server.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        messages
    }

    fn seen(ready: usize, phase: Phase) -> Seen<'static> {
        const LISTEN: &[SocketAddr] = &[SocketAddr::new(
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            3000,
        )];
        Seen {
            ready,
            slots: 2,
            phase,
            mode: "round-robin",
            listen: LISTEN,
        }
    }

    #[test]
    fn ready_once_every_slot_is_ready_then_status_changes_at_most_once_a_second() {
        let (server, mut systemd) = manager("ready");
        systemd.observe(seen(0, Phase::Running));
        systemd.observe(seen(1, Phase::Running));
        let early = heard(&server);
        assert_eq!(
            early,
            ["STATUS=0/2 workers ready, mode round-robin, listening on 127.0.0.1:3000"]
        );
        systemd.observe(seen(2, Phase::Running));
        assert_eq!(
            heard(&server),
            ["READY=1\nSTATUS=2/2 workers ready, mode round-robin, listening on 127.0.0.1:3000"]
        );
        // A change within the second is held back, and nothing repeats.
        systemd.observe(seen(1, Phase::Running));
        systemd.observe(seen(2, Phase::Running));
        assert!(heard(&server).is_empty());
    }

    #[test]
    fn no_reload_before_ready_and_nothing_but_stopping_after_it() {
        let (server, mut systemd) = manager("stop");
        assert!(systemd.reload_started().is_none());
        systemd.observe(seen(2, Phase::Running));
        let reload = systemd.reload_started();
        assert!(reload.is_some());
        systemd.observe(seen(2, Phase::Stopping));
        systemd.observe(seen(2, Phase::Stopping));
        // The reload's outcome comes after the stop began: no READY=1.
        reload_finished(reload, Ok("reloaded 2 worker(s)"));
        assert!(systemd.reload_started().is_none());
        let told: Vec<String> = heard(&server)
            .iter()
            .map(|m| m.lines().next().unwrap().to_string())
            .collect();
        assert_eq!(told, ["READY=1", "RELOADING=1", "STOPPING=1"]);
    }

    #[test]
    fn status_is_one_line() {
        assert_eq!(
            one_line("reload failed:\nslot 0 kept"),
            "reload failed: slot 0 kept"
        );
    }
}
