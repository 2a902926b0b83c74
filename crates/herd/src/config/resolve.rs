//! What the host says about a [`ValidConfig`]: who the workers' user and
//! group are, whether they can enter `cwd` and run the program (found in
//! PATH as a shell would), how many cores "max" workers is. The one step of
//! loading that does I/O; `herd run`, `herd check` and every reload go
//! through it ([`ConfigSource::load`]), so `check` refuses what `run` would.

use super::*;

/// Resolves `valid` on this host into the [`Settings`] herd runs on.
pub fn resolve(valid: ValidConfig) -> Result<Settings, ConfigError> {
    let ValidConfig {
        config,
        mut protocol,
        mut kernel_rotation,
    } = valid;
    let run_as = match &config.user {
        Some(user) => Some(resolve_user(user, config.group.as_deref())?),
        None => None,
    };
    // Paths are checked as the workers will use them: as their user.
    let identity = match &run_as {
        Some(user) => user.identity(),
        None => herds_identity(),
    };
    if let Some(dir) = &config.cwd {
        let value = format!("{:?}", dir.display().to_string());
        if !dir.is_dir() {
            return Err(invalid("cwd", value, "not a directory"));
        }
        // The worker must be able to stay in it: search on the way and on it.
        identity
            .can_enter(dir)
            .map_err(|reason| invalid("cwd", value, reason))?;
    }
    not_a_package_runner(&config.command, config.cwd.as_deref())?;
    let (program, args) = program_of(&config.command)?;
    let args = args.to_vec();
    let program = resolve_program(program, config.cwd.as_deref(), &identity)?;
    // A script whose `#!` line runs node is a Node app, as `node app.js` is.
    if config.protocol == ProtocolChoice::Auto
        && protocol == WorkerProtocol::Herd
        && runs_node_by_shebang(&program)
    {
        protocol = WorkerProtocol::NodeCluster;
        kernel_rotation = config.dealing(protocol)?;
    }
    let preload = match protocol {
        WorkerProtocol::Preload => Some(preload::for_workers(&program, &identity)?),
        _ => None,
    };
    // Workers that inherit sockets start through herd's shim (LISTEN_PID).
    if (!config.mode.hands_off() || kernel_rotation) && protocol != WorkerProtocol::NodeCluster {
        if let Some(user) = run_as.as_ref().filter(|user| !user.is_herds_own()) {
            shim_runnable_by(user, config.mode)?;
        }
    }
    node::primary_fits(config.node.primary, protocol)?;
    log_dir_writable(config.log_dir.as_deref())?;
    // Checked by `validate`; the default is READY on herd's channel.
    let ready = config.readiness()?.unwrap_or(Readiness::Herd);
    let workers = match config.workers {
        WorkerCount::Max => available_cores(),
        WorkerCount::Count(n) => n,
    };
    if config.ready_min > workers {
        return Err(invalid(
            "ready_min",
            config.ready_min,
            format!("more than the {workers} worker(s) herd runs: /readyz would never say ready"),
        ));
    }
    let handoff_threads = handoff_threads(&config, protocol, kernel_rotation)?;
    Ok(settings(
        config,
        Resolved {
            workers,
            handoff_threads,
            program,
            args,
            protocol,
            kernel_rotation,
            run_as,
            ready,
            preload,
        },
    ))
}

/// `handoff_threads` for this host: "auto" is one per
/// [`CORES_PER_HANDOFF_THREAD`] cores where threads can hand off, else
/// one; a count above one where they cannot is refused, saying why.
fn handoff_threads(
    config: &Config,
    protocol: WorkerProtocol,
    kernel_rotation: bool,
) -> Result<usize, ConfigError> {
    let refusal = config.threads_refusal(protocol, kernel_rotation);
    Ok(match (config.handoff_threads, refusal) {
        (HandoffThreadCount::Count(n @ 2..), Some(why)) => {
            return Err(invalid("handoff_threads", n, why))
        }
        (HandoffThreadCount::Count(n), _) => n,
        (HandoffThreadCount::Auto, None) => (available_cores() / CORES_PER_HANDOFF_THREAD)
            .clamp(1, herd_protocol::page::MAX_HANDOFF_THREADS),
        (HandoffThreadCount::Auto, Some(_)) => 1,
    })
}

/// What validation and the host decided, beside the config's own values.
struct Resolved {
    workers: usize,
    handoff_threads: usize,
    program: PathBuf,
    args: Vec<String>,
    protocol: WorkerProtocol,
    kernel_rotation: bool,
    run_as: Option<RunAs>,
    ready: Readiness,
    preload: Option<PathBuf>,
}

fn settings(config: Config, resolved: Resolved) -> Settings {
    let handoff = HandoffSettings {
        max_unacked: config.handoff.max_unacked,
        ack_timeout: config.handoff.ack_timeout.get(),
        queue_limit: config.handoff.queue_limit,
        queue_timeout: config.handoff.queue_timeout.get(),
        kernel_rotation: resolved.kernel_rotation,
    };
    let restart = RestartSettings {
        backoff_base: config.restart.backoff_base.get(),
        backoff_max: config.restart.backoff_max.get(),
        min_uptime: config.restart.min_uptime.get(),
        max_restarts: config.restart.max_restarts,
        window: config.restart.window.get(),
    };
    Settings {
        listen: config.listen,
        backlog: config.backlog,
        workers: resolved.workers,
        handoff_threads: resolved.handoff_threads,
        mode: config.mode,
        program: resolved.program,
        args: resolved.args,
        protocol: resolved.protocol,
        preload: resolved.preload,
        env: config.env,
        cwd: config.cwd,
        shutdown_timeout: config.shutdown_timeout.get(),
        shutdown_delay: config.shutdown_delay.get(),
        ready_min: config.ready_min,
        log_files: config
            .log_dir
            .clone()
            .map(|dir| crate::log_files::LogFileSettings {
                dir,
                max_size: config.log_file_size.bytes(),
                keep: config.log_file_keep,
            }),
        framing: crate::line_format::Framing {
            format: config.log_lines,
            timestamps: config.log_timestamps,
        },
        stop_signal: config.stop_signal.map(StopSignal::get),
        ready_timeout: config.ready_timeout.get(),
        ready: resolved.ready,
        hang_timeout: Some(config.hang_timeout.get()).filter(|timeout| !timeout.is_zero()),
        kill_mode: config.kill_mode,
        reload_batch: config.reload_batch,
        max_memory: config.max_memory.map(ByteSize::bytes),
        max_connections_per_worker: config.max_connections_per_worker,
        max_connections_jitter: config.max_connections_jitter,
        run_as: resolved.run_as,
        control: config.control,
        monitor_interval: config.monitor_interval.get(),
        metrics: config.metrics.address,
        handoff,
        restart,
        node_primary: config.node.primary,
    }
}

/// `log_dir` can be created and written by herd (which writes the files,
/// not the workers): refused now rather than found out at the first line.
fn log_dir_writable(dir: Option<&Path>) -> Result<(), ConfigError> {
    let Some(dir) = dir else {
        return Ok(());
    };
    let refuse = |why: String| invalid("log_dir", format!("{:?}", dir.display().to_string()), why);
    std::fs::create_dir_all(dir).map_err(|e| refuse(format!("cannot create it: {e}")))?;
    let probe = dir.join(format!(".herd-write-test.{}", std::process::id()));
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&probe)
        .map_err(|e| refuse(format!("herd cannot write in it: {e}")))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}
