//! The signals herd acts on, as a documented enum.
//!
//! Owns the mapping from Unix signals to what herd does about them
//! (README, "Signals"). The primary's loop takes a stream of
//! [`SignalEvent`]s rather than installing handlers itself, so a test can
//! inject a reload or a stop without sending a signal to its own process,
//! and `herd run` forwards the real ones ([`forward_os_signals`]).
//! SIGCHLD is not here: reaping is the primary's own business, not a
//! request.

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

/// What a signal asks of herd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalEvent {
    /// SIGTERM: stop gracefully (listeners closed, workers drain for up to
    /// `shutdown_timeout`, then SIGKILL).
    Terminate,
    /// SIGINT: as SIGTERM; a second one while stopping kills the remaining
    /// workers at once.
    Interrupt,
    /// SIGQUIT: stop fast, killing the workers without waiting.
    Quit,
    /// SIGHUP: re-read the config and reload the workers, rolling.
    Reload,
    /// SIGTTIN: one worker more.
    AddWorker,
    /// SIGTTOU: one worker fewer, never below one.
    RemoveWorker,
    /// SIGUSR2: re-execute herd's binary in place (`herd upgrade`), as
    /// nginx and unicorn do on it.
    Upgrade,
}

impl SignalEvent {
    /// Every event with the signal that asks for it.
    pub const ALL: [(SignalEvent, i32); 7] = [
        (SignalEvent::Terminate, nix::libc::SIGTERM),
        (SignalEvent::Interrupt, nix::libc::SIGINT),
        (SignalEvent::Quit, nix::libc::SIGQUIT),
        (SignalEvent::Reload, nix::libc::SIGHUP),
        (SignalEvent::AddWorker, nix::libc::SIGTTIN),
        (SignalEvent::RemoveWorker, nix::libc::SIGTTOU),
        (SignalEvent::Upgrade, nix::libc::SIGUSR2),
    ];

    /// The signal's name, for the log (`SIGTERM`, ...).
    pub fn signal_name(self) -> &'static str {
        match self {
            SignalEvent::Terminate => "SIGTERM",
            SignalEvent::Interrupt => "SIGINT",
            SignalEvent::Quit => "SIGQUIT",
            SignalEvent::Reload => "SIGHUP",
            SignalEvent::AddWorker => "SIGTTIN",
            SignalEvent::RemoveWorker => "SIGTTOU",
            SignalEvent::Upgrade => "SIGUSR2",
        }
    }
}

/// Installs handlers for every signal in [`SignalEvent::ALL`] and forwards
/// each delivery as its event. Must be called inside a tokio runtime; the
/// handlers stay for the process's life (tokio never uninstalls them).
/// The channel is bounded: signals that arrive while 64 events wait
/// unread are dropped, as the kernel itself merges pending signals.
pub fn forward_os_signals() -> std::io::Result<mpsc::Receiver<SignalEvent>> {
    let (events, receiver) = mpsc::channel(64);
    for (event, number) in SignalEvent::ALL {
        let mut stream = signal(SignalKind::from_raw(number))?;
        let events = events.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if events.try_send(event).is_err() && events.is_closed() {
                    return;
                }
            }
        });
    }
    Ok(receiver)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_has_its_own_signal() {
        let mut numbers: Vec<i32> = SignalEvent::ALL.iter().map(|(_, n)| *n).collect();
        numbers.sort();
        numbers.dedup();
        assert_eq!(numbers.len(), SignalEvent::ALL.len());
        for (event, number) in SignalEvent::ALL {
            let name = nix::sys::signal::Signal::try_from(number).unwrap().as_str();
            assert_eq!(event.signal_name(), name);
        }
    }
}
