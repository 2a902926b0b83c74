//! The primary process: binds, starts the hand-off loop and the workers, and
//! runs until told to stop.
//!
//! Owns herd's own lifecycle and the wiring between the parts: listeners are
//! bound first (a busy port stops herd before any worker exists), then the
//! hand-off thread starts, then the supervisor fills the worker slots. The
//! main thread's tokio runtime then multiplexes supervisor notices, hand-off
//! events and signals.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::config::Settings;
use crate::handoff::{self, Command, Counters, Event};
use crate::listener::{self, ListenError};
use crate::supervisor::Supervisor;

/// Why herd could not run.
#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot start the hand-off loop: {0}")]
    HandoffLoop(#[source] std::io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

impl PrimaryError {
    /// The process exit code for this error (documented in README.md).
    pub fn exit_code(&self) -> u8 {
        match self {
            PrimaryError::Listen(_) => 3,
            _ => 1,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every worker exited within the shutdown timeout.
    Clean,
    /// Some workers had to be SIGKILLed.
    Forced,
}

/// Runs herd with `settings` until SIGTERM or SIGINT.
pub async fn run(settings: Settings) -> Result<Outcome, PrimaryError> {
    let listeners = listener::bind_all(&settings.listen, settings.backlog)?;
    for bound in &listeners {
        info!(listener = bound.index, "listening on {}", bound.local);
    }
    let mut terminate = signal(SignalKind::terminate()).map_err(PrimaryError::Signals)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(PrimaryError::Signals)?;

    let counters = Arc::new(Counters::new(listeners.len()));
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let (controller, handoff_thread) = handoff::spawn(
        listeners,
        settings.mode,
        settings.handoff,
        events_tx,
        counters.clone(),
    )
    .map_err(PrimaryError::HandoffLoop)?;

    info!(
        workers = settings.workers,
        mode = settings.mode.name(),
        program = %settings.program.display(),
        "starting workers"
    );
    let grace = settings.shutdown_timeout;
    let (mut supervisor, mut notices) = Supervisor::new(settings, controller.clone());
    supervisor.start_all();

    let reason = loop {
        tokio::select! {
            Some(notice) = notices.recv() => supervisor.on_notice(notice),
            Some(event) = events.recv() => match event {
                Event::WorkerReady { slot, uid, pid } => supervisor.on_ready(slot, uid, pid),
                Event::ChannelClosed { slot, uid, .. } => supervisor.on_channel_closed(slot, uid),
            },
            _ = terminate.recv() => break "SIGTERM",
            _ = interrupt.recv() => break "SIGINT",
        }
    };
    info!("{reason}: stopping (closing listeners, then workers get up to {grace:?})");
    let _ = controller.send(Command::Shutdown);
    let clean = supervisor.stop_all(&mut notices, grace).await;
    if handoff_thread.join().is_err() {
        warn!("hand-off thread panicked");
    }
    info!(
        accepted = counters
            .accepted
            .iter()
            .map(|c| c.load(Relaxed))
            .sum::<u64>(),
        handed_off = counters
            .handed_off
            .iter()
            .map(|c| c.load(Relaxed))
            .sum::<u64>(),
        requeued = counters.requeued.load(Relaxed),
        dropped_queue_full = counters.dropped_queue_full.load(Relaxed),
        dropped_queue_timeout = counters.dropped_queue_timeout.load(Relaxed),
        accept_errors = counters.accept_errors.load(Relaxed),
        "stopped"
    );
    Ok(if clean {
        Outcome::Clean
    } else {
        Outcome::Forced
    })
}
