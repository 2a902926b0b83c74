//! herd's main loop: the [`Primary`] assembled from its parts (fresh, or
//! carried over `herd upgrade`), then every event, one at a time, until
//! the last worker is gone.

use super::*;

/// What [`drive`] runs on: from [`run`], or after `herd upgrade` from
/// what the old herd carried.
pub(super) struct Parts {
    pub(super) listen_addrs: Vec<SocketAddr>,
    pub(super) sockets: WorkerSockets,
    pub(super) metrics: Option<tokio::net::TcpListener>,
    pub(super) control: ControlServer,
    pub(super) cgroups: Option<CgroupTree>,
    pub(super) fd_limit: FdLimit,
    pub(super) counters: Arc<Counters>,
    pub(super) controller: Controller,
    pub(super) handoff_thread: std::thread::JoinHandle<()>,
    pub(super) events: mpsc::UnboundedReceiver<handoff::Event>,
    pub(super) signals: mpsc::Receiver<SignalEvent>,
}

/// How the workers come to be: started, or carried over an upgrade.
pub(super) enum Start {
    Fresh,
    Carried(Box<taking_over::Carried>),
}

/// The main loop: every event, one at a time, until the last worker is gone.
pub(super) async fn drive(
    parts: Parts,
    source: ConfigSource,
    settings: Settings,
    start: Start,
) -> Result<Outcome, PrimaryError> {
    let Parts {
        listen_addrs,
        sockets,
        metrics: metrics_listener,
        mut control,
        cgroups,
        fd_limit,
        counters,
        controller,
        handoff_thread,
        mut events,
        mut signals,
    } = parts;
    let mut children = signal(SignalKind::child()).map_err(PrimaryError::Signals)?;
    let metrics_fd = metrics_listener.as_ref().map(AsRawFd::as_raw_fd);
    let mut scrapes = serve_metrics(metrics_listener);
    if matches!(start, Start::Fresh) {
        log_starting(&settings);
    }
    let mut monitor = tokio::time::interval(settings.monitor_interval);
    let (notes_tx, mut notes) = crate::notify::channel();
    let (probe_tx, mut probes) = mpsc::unbounded_channel();
    let mut primary = assemble(Assembly {
        settings,
        source,
        sockets,
        cgroups,
        fd_limit,
        counters,
        controller: controller.clone(),
        listen_addrs,
        upgrading: upgrading::Upgrading::new(control.raw_fd(), metrics_fd, probe_tx),
        notes: notes_tx,
    });
    match start {
        Start::Fresh => primary.supervisor.start_all(),
        Start::Carried(carried) => primary.take_over(*carried),
    }
    let (requests_tx, mut requests) = mpsc::unbounded_channel::<PendingRequest>();
    let watching = primary.supervisor.watches_sockets();
    let mut watch = socket_watch();
    while !primary.supervisor.finished() {
        let due = primary
            .supervisor
            .next_deadline()
            .map(tokio::time::Instant::from_std);
        tokio::select! {
            Some(event) = events.recv() => primary.supervisor.on_handoff(event),
            Some(note) = notes.recv() => primary.supervisor.on_note(note),
            _ = children.recv() => primary.supervisor.reap(),
            _ = sleep_until_opt(due) => primary.supervisor.tick(),
            Some(asked) = scrapes.recv() => primary.answer(asked),
            _ = sleep_until_opt(primary.stop_due()) => primary.delay_over(),
            Some(pending) = requests.recv() => primary.on_request(pending),
            _ = control.accept(&requests_tx) => {}
            _ = monitor.tick() => primary.supervisor.monitor(),
            _ = watch.tick(), if watching => primary.supervisor.watch_sockets(&primary.counters),
            Some(event) = signals.recv() => primary.on_signal(event),
            due = primary.systemd.due() => primary.systemd.on_due(due),
            Some(answer) = probes.recv() => primary.probe_answered(answer, &events),
            _ = sleep_until_opt(primary.upgrading.due()) => primary.upgrading.overdue(),
        }
        primary
            .systemd
            .observe_from(&primary.supervisor, &primary.counters);
    }
    Ok(wind_up(primary, controller, handoff_thread, control).await)
}

/// After the last worker: the hand-off thread ends, the tally, the answers
/// to `herd stop`, the control socket removed.
async fn wind_up(
    primary: Primary,
    controller: Controller,
    handoff_thread: std::thread::JoinHandle<()>,
    control: ControlServer,
) -> Outcome {
    let _ = controller.send(Command::Exit);
    if handoff_thread.join().is_err() {
        warn!(event = "handoff_panicked", "hand-off thread panicked");
    }
    let outcome = primary.finish();
    control.close().await;
    outcome
}

/// What [`assemble`] makes the [`Primary`] of.
struct Assembly {
    settings: Settings,
    source: ConfigSource,
    sockets: WorkerSockets,
    cgroups: Option<CgroupTree>,
    fd_limit: FdLimit,
    counters: Arc<Counters>,
    controller: Controller,
    listen_addrs: Vec<SocketAddr>,
    upgrading: upgrading::Upgrading,
    notes: mpsc::Sender<crate::notify::Note>,
}

/// The main thread's state, nothing started yet.
fn assemble(parts: Assembly) -> Primary {
    let metrics = Arc::new(Metrics::new(parts.counters.clone()));
    let supervisor = Supervisor::new(
        parts.settings,
        parts.controller.clone(),
        parts.sockets,
        metrics.clone(),
        parts.cgroups,
        parts.fd_limit,
        parts.notes,
    )
    .serving(parts.listen_addrs);
    Primary {
        supervisor,
        counters: parts.counters,
        metrics,
        source: parts.source,
        started: Instant::now(),
        stop_waiters: Vec::new(),
        stop_at: None,
        handoff: parts.controller,
        systemd: Systemd::from_env(),
        upgrading: parts.upgrading,
    }
}
