//! Starting the app's primary: the workers' command, user, `cwd` and
//! `env`, but as Node's *primary* (no `NODE_UNIQUE_ID`, so
//! `cluster.isPrimary` is true), with an IPC channel to herd
//! (`NODE_CHANNEL_FD`) and the shim preloaded (`NODE_OPTIONS=--require`,
//! which reaches node however the command starts it: `node app.js`,
//! `env node`, a `#!` script).

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Stdio;

use herd_protocol::fdpass;

use super::{PrimaryStartError, ShimFile, MARKER_ENV};
use crate::config::Settings;
use crate::node_ipc;
/// The primary's process, just started: the parts a worker's has.
pub use crate::process::Started;

/// The variables a worker gets that would make the primary a worker, or
/// let it speak for herd.
const NOT_FOR_THE_PRIMARY: &[&str] = &[
    node_ipc::NODE_UNIQUE_ID_ENV,
    node_ipc::NODE_APP_INSTANCE_ENV,
    herd_protocol::env::CHANNEL_FD_ENV,
    herd_protocol::env::WORKER_ID_ENV,
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    // herd's own sockets from systemd, if it was socket-activated.
    herd_protocol::env::LISTEN_PID_ENV,
    herd_protocol::env::LISTEN_FDS_ENV,
    herd_protocol::env::LISTEN_FDNAMES_ENV,
];

/// Starts the primary in a process group of its own, dying with herd.
/// `workers` is the slot count (`HERD_WORKERS`: what `fork()` hands out).
pub fn spawn(
    settings: &Settings,
    shim: &ShimFile,
    workers: usize,
) -> Result<Started, PrimaryStartError> {
    let program = settings.program.display().to_string();
    let failed = |source| PrimaryStartError::Spawn {
        program: program.clone(),
        source,
    };
    let (herds_end, child_end) = fdpass::stream_pair().map_err(failed)?;
    let mut command = std::process::Command::new(&settings.program);
    command
        .args(&settings.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    environment(&mut command, settings, shim, workers);
    if let Some(dir) = &settings.cwd {
        command.current_dir(dir);
    }
    if let Some(user) = settings.run_as.as_ref().filter(|user| !user.is_herds_own()) {
        // Before `prepare_child`: switching ids clears the death signal.
        fdpass::run_as_user(&mut command, user.uid, user.gid, user.groups.clone());
    }
    fdpass::prepare_child(&mut command, vec![child_end.as_raw_fd()], None, None);
    let mut child = command.spawn().map_err(failed)?;
    drop(child_end);
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(failed(std::io::Error::other(
            "its output pipes are missing",
        )));
    };
    // Reaped by pid with the workers (`process::next_exited`), not by `child`.
    Ok(Started {
        pid: child.id(),
        channel: herds_end,
        stdout: stdout.into(),
        stderr: stderr.into(),
        link: None,
    })
}

/// The workers' environment without what makes a worker, plus Node's
/// channel and the preload.
fn environment(
    command: &mut std::process::Command,
    settings: &Settings,
    shim: &ShimFile,
    workers: usize,
) {
    if let Some(user) = &settings.run_as {
        command
            .env("HOME", &user.home)
            .env("USER", &user.name)
            .env("LOGNAME", &user.name);
    }
    command.envs(&settings.env);
    for name in NOT_FOR_THE_PRIMARY {
        command.env_remove(name);
    }
    let path = shim.path().display().to_string();
    // NODE_OPTIONS quotes a path with spaces.
    let require = if path.contains(' ') {
        format!("--require \"{path}\"")
    } else {
        format!("--require {path}")
    };
    let options = settings
        .env
        .get("NODE_OPTIONS")
        .cloned()
        .or_else(|| std::env::var("NODE_OPTIONS").ok())
        .unwrap_or_default();
    command
        .env("NODE_OPTIONS", format!("{options} {require}").trim_start())
        .env(MARKER_ENV, require)
        .env("HERD_WORKERS", workers.to_string())
        .env(
            node_ipc::NODE_CHANNEL_FD_ENV,
            herd_protocol::env::channel_fd(0).to_string(),
        )
        .env(node_ipc::NODE_CHANNEL_SERIALIZATION_MODE_ENV, "json");
}
