//! Worker processes as the operating system sees them: starting one (its
//! fds, environment, process group, cgroup and death signal), signalling
//! it, reaping exits, and sweeping up what a worker left behind.
//!
//! herd reaps its children itself instead of leaving it to tokio: when a
//! worker's main process exits, herd first *looks* (`waitid` with
//! `WNOWAIT`), kills the rest of its process group while the zombie still
//! holds the group id (so the id cannot have been reused), and only then
//! reaps it. herd is also a *subreaper* (`PR_SET_CHILD_SUBREAPER`): a
//! helper whose worker died is re-parented to herd rather than to init, so
//! herd reaps it and, when it stops, can find and kill it.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{ExitStatus, Stdio};

use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::activation;
use crate::config::{Settings, WorkerProtocol};
use crate::ids::SlotIx;
use crate::node_ipc;
use crate::notify::NotifySocket;
use herd_protocol::env::{LISTEN_FDNAMES_ENV, LISTEN_FDS_ENV, LISTEN_PID_ENV};
use herd_protocol::fdpass;

/// Where an `sd_notify(3)` client sends what it says.
const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// How often an `sd_notify` client must send `WATCHDOG=1`, in microseconds.
const WATCHDOG_USEC_ENV: &str = "WATCHDOG_USEC";

/// The pid `WATCHDOG_USEC` is meant for: herd's, if systemd set it, so
/// never passed on (the worker's own is left unset, which means "any").
const WATCHDOG_PID_ENV: &str = "WATCHDOG_PID";

/// A worker process just started.
#[derive(Debug)]
pub struct Started {
    pub pid: u32,
    /// herd's end of the worker's channel.
    pub channel: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// A herd-protocol worker's counter page and herd's copy of the
    /// worker's end of its channel (see `WorkerLink`).
    pub link: Option<WorkerLink>,
}

/// What herd keeps of a herd-protocol worker besides its channel, until
/// the worker's READY says whether it uses them: its counter page
/// (`HERD_PAGE_FD`), and a copy of the worker's own end of the channel,
/// from which herd takes back the hand-offs still queued there when a
/// worker that takes queued hand-offs dies or hangs.
#[derive(Debug)]
pub struct WorkerLink {
    pub page: herd_protocol::page::Page,
    pub worker_end: OwnedFd,
}

/// What a worker process is started with.
#[derive(Debug)]
pub struct Launch<'a> {
    pub settings: &'a Settings,
    pub slot: SlotIx,
    /// The slot count, as `HERD_WORKERS`.
    pub workers: usize,
    /// The listening sockets it inherits (OS-scheduled modes), as fds 3, 4, …
    pub listen_fds: Vec<RawFd>,
    /// `cgroup.procs` of the cgroup it joins before exec.
    pub cgroup_procs: Option<RawFd>,
    /// The `RLIMIT_NOFILE` (soft, hard) it gets: herd's original one.
    pub nofile: Option<(u64, u64)>,
    /// Its `NOTIFY_SOCKET` and `WATCHDOG_USEC` (`ready = "notify"`); `None`:
    /// herd's own, if any, are not passed on, so a worker cannot speak for
    /// herd to systemd.
    pub notify: Option<&'a NotifySocket>,
    /// The addresses herd serves, as bound, in `listen` order (told to the
    /// preload library).
    pub served: &'a [SocketAddr],
}

/// Starts a worker: its own process group, the channel after the
/// inherited sockets, stdio piped to herd, dying with herd.
pub fn spawn(launch: Launch<'_>) -> io::Result<Started> {
    let Launch {
        settings,
        slot,
        workers,
        listen_fds,
        cgroup_procs,
        nofile,
        notify,
        served,
    } = launch;
    let (primary_end, child_end, page) = channel_for(settings.protocol)?;
    let channel_fd = herd_protocol::env::channel_fd(listen_fds.len()).to_string();
    let page_fd = herd_protocol::env::channel_fd(listen_fds.len() + 1).to_string();
    let mut command = if listen_fds.is_empty() {
        let mut command = std::process::Command::new(&settings.program);
        // herd's own, if systemd socket-activated it: not the worker's.
        for name in [LISTEN_PID_ENV, LISTEN_FDS_ENV, LISTEN_FDNAMES_ENV] {
            command.env_remove(name);
        }
        command
    } else {
        // Through the shim, which sets LISTEN_PID to the worker's pid.
        let mut shim = std::process::Command::new("/proc/self/exe");
        shim.arg(activation::EXEC_WORKER_ARG)
            .arg(&settings.program)
            .envs(herd_protocol::env::listen_env(listen_fds.len()));
        shim
    };
    command
        .args(&settings.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Own process group: a terminal's Ctrl-C reaches herd only, and
        // herd decides how workers stop; signals go to the whole group,
        // so `sh -c` wrappers and their children stop too.
        .process_group(0);
    let env = WorkerEnv {
        settings,
        slot,
        workers,
        channel_fd: &channel_fd,
        page_fd: page.as_ref().map(|_| page_fd.as_str()),
        notify,
        served,
    };
    set_environment(&mut command, &env);
    if let Some(dir) = &settings.cwd {
        command.current_dir(dir);
    }
    if let Some(user) = settings.run_as.as_ref().filter(|user| !user.is_herds_own()) {
        // Before `prepare_child`: switching ids clears the death signal.
        fdpass::run_as_user(&mut command, user.uid, user.gid, user.groups.clone());
    }
    let mut inherited = listen_fds;
    inherited.push(child_end.as_raw_fd());
    if let Some(page) = &page {
        inherited.push(page.fd().as_raw_fd());
    }
    fdpass::prepare_child(&mut command, inherited, cgroup_procs, nofile);
    let mut child = command.spawn()?;
    let link = page.map(|page| WorkerLink {
        page,
        worker_end: child_end,
    });
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(io::Error::other("the worker's output pipes are missing"));
    };
    // `child` is dropped without waiting: herd reaps by pid (see `next_exited`).
    Ok(Started {
        pid: child.id(),
        channel: primary_end,
        stdout: stdout.into(),
        stderr: stderr.into(),
        link,
    })
}

/// A worker's channel (herd's end, the worker's) and, for a herd-protocol
/// worker, its counter page; a Node app gets Node's stream channel, no page.
fn channel_for(
    protocol: WorkerProtocol,
) -> io::Result<(OwnedFd, OwnedFd, Option<herd_protocol::page::Page>)> {
    if protocol == WorkerProtocol::NodeCluster {
        let (primary_end, child_end) = fdpass::stream_pair()?;
        return Ok((primary_end, child_end, None));
    }
    let (primary_end, child_end) = fdpass::channel_pair()?;
    let page = herd_protocol::page::Page::create().map_err(io::Error::other)?;
    Ok((primary_end, child_end, Some(page)))
}

/// What a worker's environment is made of, beside herd's own.
struct WorkerEnv<'a> {
    settings: &'a Settings,
    slot: SlotIx,
    workers: usize,
    /// The channel's fd number, as the worker's protocol names it.
    channel_fd: &'a str,
    /// The counter page's fd number (herd-protocol workers).
    page_fd: Option<&'a str>,
    notify: Option<&'a NotifySocket>,
    served: &'a [SocketAddr],
}

/// The worker's environment: its user's, `env`, herd's variables (or
/// Node's, for a Node cluster app) and `NOTIFY_SOCKET`.
fn set_environment(command: &mut std::process::Command, env: &WorkerEnv<'_>) {
    let settings = env.settings;
    if let Some(user) = &settings.run_as {
        // What a login as the user sets (`su -`, systemd's `User=`), so the
        // program finds its own files, not root's; `env` may override them.
        command
            .env("HOME", &user.home)
            .env("USER", &user.name)
            .env("LOGNAME", &user.name);
    }
    command
        .envs(&settings.env)
        .env(herd_protocol::env::CHANNEL_FD_ENV, env.channel_fd)
        .env(herd_protocol::env::WORKER_ID_ENV, env.slot.to_string())
        .env("HERD_WORKERS", env.workers.to_string())
        .env("HERD_PROTOCOL", herd_protocol::wire::VERSION.to_string());
    match env.page_fd {
        Some(fd) => command.env(herd_protocol::page::PAGE_FD_ENV, fd),
        None => command.env_remove(herd_protocol::page::PAGE_FD_ENV),
    };
    if settings.protocol == WorkerProtocol::NodeCluster {
        // An unmodified Node cluster app: it finds herd as its cluster primary.
        command
            .env_remove(herd_protocol::env::CHANNEL_FD_ENV)
            // `cluster.worker.id`: Node counts from 1, and an app testing
            // `if (cluster.worker.id)` must not find slot 0 false.
            .env(
                node_ipc::NODE_UNIQUE_ID_ENV,
                (env.slot.get() + 1).to_string(),
            )
            // PM2's name for the instance number, which `config` and many apps read.
            .env(node_ipc::NODE_APP_INSTANCE_ENV, env.slot.to_string())
            .env(node_ipc::NODE_CHANNEL_FD_ENV, env.channel_fd)
            .env(node_ipc::NODE_CHANNEL_SERIALIZATION_MODE_ENV, "json");
    }
    if let Some(library) = &settings.preload {
        preload_environment(command, library, env.served);
        // Without a stop signal of its own, the program is stopped by the
        // library once drained; with one, herd sends it.
        let stop = match settings.stop_signal {
            None => herd_protocol::env::PRELOAD_STOP_SELF,
            Some(_) => "signal",
        };
        command.env(herd_protocol::env::PRELOAD_STOP_ENV, stop);
    }
    match env.notify {
        Some(socket) => command.env(NOTIFY_SOCKET_ENV, &socket.env),
        None => command.env_remove(NOTIFY_SOCKET_ENV),
    };
    match env.notify.and_then(|socket| socket.watchdog) {
        Some(timeout) => command.env(WATCHDOG_USEC_ENV, timeout.as_micros().to_string()),
        None => command.env_remove(WATCHDOG_USEC_ENV),
    };
    command.env_remove(WATCHDOG_PID_ENV);
}

/// `protocol = "preload"`: herd's library first in `LD_PRELOAD` (ahead of
/// any the user's `env` or herd's own environment names), and the served
/// addresses whose bind it captures.
fn preload_environment(command: &mut std::process::Command, library: &Path, served: &[SocketAddr]) {
    let theirs = command
        .get_envs()
        .find(|(name, _)| *name == LD_PRELOAD_ENV)
        .and_then(|(_, value)| value.map(|v| v.to_os_string()))
        .or_else(|| std::env::var_os(LD_PRELOAD_ENV))
        .filter(|value| !value.is_empty());
    let mut preload = library.as_os_str().to_os_string();
    if let Some(theirs) = theirs {
        preload.push(":");
        preload.push(theirs);
    }
    let served: Vec<String> = served.iter().map(SocketAddr::to_string).collect();
    command
        .env(LD_PRELOAD_ENV, preload)
        .env(herd_protocol::env::PRELOAD_LISTEN_ENV, served.join(","));
}

/// The dynamic loader's list of libraries to load first.
const LD_PRELOAD_ENV: &str = "LD_PRELOAD";

/// Sends `signal` to the process group a worker leads.
pub fn signal_group(pid: u32, signal: Signal) {
    let _ = killpg(Pid::from_raw(pid as i32), signal);
}

/// Makes herd the reaper of every orphan among its descendants.
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// The next child that has exited, not yet reaped (it stays a zombie, so
/// its pid and process group id stay taken until [`reap`]).
pub fn next_exited() -> Option<u32> {
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    loop {
        match waitid(Id::All, flags) {
            Ok(status) => return status.pid().map(|pid| pid.as_raw() as u32),
            Err(nix::Error::EINTR) => continue,
            // ECHILD: no children at all.
            Err(_) => return None,
        }
    }
}

/// Reaps the exited child `pid`; its exit status.
pub fn reap(pid: u32) -> Option<ExitStatus> {
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG;
    loop {
        match waitid(Id::Pid(Pid::from_raw(pid as i32)), flags) {
            Ok(WaitStatus::Exited(_, code)) => {
                return Some(ExitStatus::from_raw((code & 0xff) << 8))
            }
            Ok(WaitStatus::Signaled(_, signal, core)) => {
                return Some(ExitStatus::from_raw(
                    signal as i32 | if core { 0x80 } else { 0 },
                ))
            }
            Ok(_) => return None,
            Err(nix::Error::EINTR) => continue,
            Err(_) => return None,
        }
    }
}

/// herd's live children by pid, with their command lines: workers, and
/// whatever herd adopted as a subreaper.
pub fn children() -> BTreeMap<u32, String> {
    let me = std::process::id();
    let mut found = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parens.
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let mut fields = rest.split(' ');
        let (state, ppid) = (
            fields.next(),
            fields.next().and_then(|p| p.parse::<u32>().ok()),
        );
        if ppid == Some(me) && state != Some("Z") {
            let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .replace('\0', " ");
            found.insert(pid, cmdline.trim_end().to_string());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // The child is reaped by pid below, which is the point of the test.
    #[allow(clippy::zombie_processes)]
    fn an_exited_child_is_seen_before_it_is_reaped_and_its_status_kept() {
        let child = std::process::Command::new("sh")
            .args(["-c", "exit 7"])
            .spawn()
            .unwrap();
        let pid = child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        // Other tests' children may exit too: look until ours is seen.
        loop {
            if std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| stat.contains(") Z "))
            {
                break;
            }
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // Still a zombie after a look with WNOWAIT.
        let _ = next_exited();
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
        assert_eq!(reap(pid).and_then(|s| s.code()), Some(7));
        assert!(reap(pid).is_none(), "reaped once");
    }
}
