//! `herd upgrade` (and SIGUSR2): herd re-executes its binary in place and
//! goes on supervising the same workers, so neither a connection nor a
//! request is lost.
//!
//! Owns the steps around the exec; what is carried is each part's own
//! (`handoff::handover`, `supervisor::handover`, `lifecycle::adopt`):
//! 1. **Dry run.** The binary on disk (the path herd was started as) is run
//!    as `herd __upgrade-probe <the run arguments>`: it must load the same
//!    config and print [`PROBE_ANSWER`] with its handover version within
//!    [`PROBE_TIMEOUT`]. A missing, broken or older binary fails here, and
//!    nothing was touched.
//! 2. **Freeze and describe.** The hand-off loop stops turning (connections
//!    wait in the kernel's queues), and listeners, channels, connections in
//!    flight or queued, slots, worker pids, pipes and counters are written
//!    to a memfd ([`state::Handover`]).
//! 3. **Exec** ([`exec`]), in place: the pid stays, so the workers remain
//!    herd's children and keep running; the fds named stay open. Signals
//!    are blocked across it, so a SIGTERM in the gap waits for the new
//!    herd's handler rather than killing herd. If the exec itself fails,
//!    the old herd thaws and goes on.
//! 4. **Take over** (the new herd, [`inherited`]): it reads the document
//!    and rebuilds each part from it. If it cannot (the document, the
//!    config), it re-executes the *old* binary from the fd the old herd
//!    kept of its own executable ([`Inherited::fall_back`]): that one takes
//!    over again from the same document, and says why the upgrade failed.

pub mod state;

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};

pub use state::{Handover, HANDOVER_READS, HANDOVER_VERSION};

/// The hidden subcommand of the dry run.
pub const PROBE_ARG: &str = "__upgrade-probe";

/// What the dry run prints when the binary can take over: this, a space,
/// and its [`HANDOVER_VERSION`].
pub const PROBE_ANSWER: &str = "herd-handover";

/// How long the dry run may take before it is killed and the upgrade refused.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes of the dry run's output kept for the refusal message.
pub const PROBE_OUTPUT_MAX: usize = 4096;

/// `<handover fd>,<old executable fd>`: set for the new herd only.
pub const UPGRADE_FD_ENV: &str = "HERD_UPGRADE_FD";

/// Set by a new herd that could not take over, for the old binary it
/// re-executes: why, for the log and `herd status`.
pub const UPGRADE_FAILED_ENV: &str = "HERD_UPGRADE_FAILED";

/// What herd was started as, to run it again.
#[derive(Debug)]
pub struct Origin {
    /// `argv[0]` resolved (against PATH, or the directory herd started in):
    /// the file on disk now, which may be a newer herd than this one.
    pub binary: PathBuf,
    /// `argv[0]` as given.
    pub argv0: OsString,
    /// Every argument; the first is `run`.
    pub args: Vec<OsString>,
    /// This herd's own executable, open: a new binary that fails to take
    /// over runs this one again, even after the file on disk was replaced.
    exe: OwnedFd,
}

impl Origin {
    /// This process's. Fails for a herd not started by `herd run` (the
    /// in-process tests run the primary inside a test binary).
    pub fn of_this_process() -> Result<Origin, String> {
        let mut argv = std::env::args_os();
        let argv0 = argv.next().ok_or("no argv[0]")?;
        let args: Vec<OsString> = argv.collect();
        if args.first().map(OsString::as_os_str) != Some(OsStr::new("run")) {
            return Err("this herd was not started by `herd run`".into());
        }
        let binary = resolve(Path::new(&argv0)).ok_or_else(|| {
            format!(
                "cannot find the binary herd was started as ({})",
                Path::new(&argv0).display()
            )
        })?;
        let exe = std::fs::File::open("/proc/self/exe")
            .map_err(|e| format!("cannot open /proc/self/exe: {e}"))?;
        Ok(Origin {
            binary,
            argv0,
            args,
            exe: exe.into(),
        })
    }

    /// The command line, `argv[0]` first, as the handover carries it.
    pub fn argv(&self) -> Vec<Vec<u8>> {
        std::iter::once(&self.argv0)
            .chain(&self.args)
            .map(|arg| arg.as_bytes().to_vec())
            .collect()
    }

    /// The dry run's command line: the binary with [`PROBE_ARG`] in place of `run`.
    pub fn probe_command(&self) -> std::process::Command {
        let mut command = std::process::Command::new(&self.binary);
        command.arg(PROBE_ARG).args(&self.args[1..]);
        command
    }
}

/// `argv0` as a path to run: as given when it names a directory, else
/// searched in PATH, as a shell would have found it.
fn resolve(argv0: &Path) -> Option<PathBuf> {
    if argv0.components().count() > 1 {
        return std::path::absolute(argv0).ok();
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(argv0))
        .find(|candidate| candidate.is_file())
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::other("a NUL byte in an argument"))
}

/// The environment, without herd's upgrade variables, plus `extra`.
fn environment(extra: &[(&str, String)]) -> io::Result<Vec<CString>> {
    let mut env = Vec::new();
    for (key, value) in std::env::vars_os() {
        if key == UPGRADE_FD_ENV || key == UPGRADE_FAILED_ENV {
            continue;
        }
        let mut pair = key.as_bytes().to_vec();
        pair.push(b'=');
        pair.extend_from_slice(value.as_bytes());
        env.push(cstring(&pair)?);
    }
    for (key, value) in extra {
        env.push(cstring(format!("{key}={value}").as_bytes())?);
    }
    Ok(env)
}

/// The signals blocked across the exec (see the module docs).
fn held_signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGHUP,
        Signal::SIGUSR2,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
        Signal::SIGCHLD,
    ] {
        set.add(signal);
    }
    set
}

/// Lets the signals held across the exec through again: the new herd
/// calls this once its handlers are installed; what arrived in the gap is
/// delivered then.
pub fn release_signals() {
    let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&held_signals()), None);
}

/// Re-executes `origin`'s binary with `handover` (its document in `doc`).
/// Returns only if the exec failed, with everything as it was.
pub fn exec(origin: &Origin, doc: &OwnedFd, handover: &Handover) -> io::Error {
    let mut fds = handover.fds();
    fds.extend([doc.as_raw_fd(), origin.exe.as_raw_fd()]);
    let value = format!("{},{}", doc.as_raw_fd(), origin.exe.as_raw_fd());
    let prepared = (|| {
        let path = cstring(origin.binary.as_os_str().as_bytes())?;
        let mut args = vec![cstring(origin.binary.as_os_str().as_bytes())?];
        for arg in &origin.args {
            args.push(cstring(arg.as_bytes())?);
        }
        let env = environment(&[(UPGRADE_FD_ENV, value)])?;
        Ok::<_, io::Error>((path, args, env))
    })();
    let (path, args, env) = match prepared {
        Ok(prepared) => prepared,
        Err(e) => return e,
    };
    if let Err(e) = state::keep_open(&fds, true) {
        let _ = state::keep_open(&fds, false);
        return e;
    }
    let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&held_signals()), None);
    let error = match nix::unistd::execve(&path, &args, &env) {
        Ok(never) => match never {},
        Err(e) => io::Error::from(e),
    };
    release_signals();
    let _ = state::keep_open(&fds, false);
    error
}

/// A new herd's inheritance, read from [`UPGRADE_FD_ENV`].
#[derive(Debug)]
pub struct Inherited {
    doc: OwnedFd,
    /// The old herd's executable, to fall back to.
    old_exe: OwnedFd,
    /// Why the new binary gave up, when this is the old one again.
    pub failed: Option<String>,
}

/// The inheritance of a herd started by `herd upgrade`; `None` for a herd
/// started afresh. The variables are removed, so no worker sees them.
pub fn inherited() -> Option<Result<Inherited, String>> {
    let value = std::env::var(UPGRADE_FD_ENV).ok()?;
    let failed = std::env::var(UPGRADE_FAILED_ENV).ok();
    // Called first thing in `herd run`, before any other thread exists.
    std::env::remove_var(UPGRADE_FD_ENV);
    std::env::remove_var(UPGRADE_FAILED_ENV);
    let parse = || -> Result<Inherited, String> {
        let (doc, exe) = value
            .split_once(',')
            .ok_or_else(|| format!("{UPGRADE_FD_ENV}={value:?} is not two fds"))?;
        let fd = |text: &str| -> Result<OwnedFd, String> {
            let number: RawFd = text
                .parse()
                .map_err(|_| format!("{UPGRADE_FD_ENV}={value:?} is not two fds"))?;
            herd_protocol::fdpass::adopt_inherited_fd(number)
                .map_err(|e| format!("{UPGRADE_FD_ENV}: fd {number}: {e}"))
        };
        Ok(Inherited {
            doc: fd(doc)?,
            old_exe: fd(exe)?,
            failed: failed.clone(),
        })
    };
    Some(parse())
}

impl Inherited {
    /// The handover document.
    pub fn handover(&self) -> Result<Handover, String> {
        Handover::read(self.doc.as_fd())
    }

    /// Every fd the document names is open. Checked first thing, before
    /// this herd opens any fd of its own: a number the old herd named but
    /// did not keep open would otherwise be taken by something else and
    /// then claimed twice.
    pub fn check_fds(&self) -> Result<(), String> {
        let handover = self.handover()?;
        match handover
            .fds()
            .into_iter()
            .find(|&fd| !herd_protocol::fdpass::is_open(fd))
        {
            Some(fd) => Err(format!("fd {fd}, which the handover names, is not open")),
            None => Ok(()),
        }
    }

    /// Gives up taking over, for `why`: runs the old binary again (from its
    /// fd) with the same document and arguments. Returns only if that
    /// failed too, or if this already is the old binary falling back.
    /// `handover` is the document, if it could be read (else the fds it
    /// names were not claimed, so they are open across an exec still, and
    /// this herd's own command line is used).
    pub fn fall_back(self, why: &str, handover: Option<&Handover>) -> io::Error {
        if self.failed.is_some() {
            return io::Error::other(format!("the old herd cannot take over again either: {why}"));
        }
        let mut fds = handover.map(Handover::fds).unwrap_or_default();
        fds.extend([self.doc.as_raw_fd(), self.old_exe.as_raw_fd()]);
        let value = format!("{},{}", self.doc.as_raw_fd(), self.old_exe.as_raw_fd());
        let prepared = (|| {
            let argv = match handover {
                Some(handover) => handover.argv.clone(),
                None => std::env::args_os().map(|a| a.as_bytes().to_vec()).collect(),
            };
            let mut args = Vec::new();
            for arg in argv {
                args.push(cstring(&arg)?);
            }
            let env = environment(&[
                (UPGRADE_FD_ENV, value),
                (UPGRADE_FAILED_ENV, why.to_string()),
            ])?;
            Ok::<_, io::Error>((args, env))
        })();
        let (args, env) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => return e,
        };
        if let Err(e) = state::keep_open(&fds, true) {
            return e;
        }
        let _ =
            nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&held_signals()), None);
        match nix::unistd::fexecve(self.old_exe.as_fd(), &args, &env) {
            Ok(never) => match never {},
            Err(e) => io::Error::from(e),
        }
    }
}
