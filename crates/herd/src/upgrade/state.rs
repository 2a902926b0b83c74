//! The handover document: everything the old herd passes the new one
//! across the exec, as JSON in a memfd whose number is in the environment.
//!
//! The fds it names stay open through the exec (their close-on-exec flag
//! is cleared just before it, [`keep_open`]); the numbers are the same on
//! the other side, because an exec keeps the fd table. The document is
//! read once, whole, bounded by [`MAX_HANDOVER_BYTES`].

use std::io::{self, Read, Seek, Write};
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};

use crate::counters::CarriedCounters;
use crate::handoff::CarriedLoop;
use crate::supervisor::CarriedSupervisor;

/// The format of [`Handover`] this herd writes. A new herd that does not
/// read it says so in the dry run, before anything is frozen. Version 2
/// carries counter pages and queued hand-offs, which a herd that reads only
/// version 1 would treat as workers that ACK: it is not handed one.
/// Version 3 carries the hand-off threads' listener copies and what each
/// thread sent each worker, which a version-2 herd would leave unread (the
/// copies' queued connections never accepted).
pub const HANDOVER_VERSION: u32 = 3;

/// Every format this herd reads (what its dry run answers, one line each):
/// a version-1 document is a version-2 one with no page and nothing queued,
/// and a version-2 one a version-3 one with one hand-off thread.
pub const HANDOVER_READS: [u32; 3] = [1, 2, 3];

/// The largest document a herd reads: far above what [`MAX_WORKERS`]
/// workers with their queues make, so a corrupt one cannot make herd grow.
///
/// [`MAX_WORKERS`]: crate::config::MAX_WORKERS
pub const MAX_HANDOVER_BYTES: u64 = 64 << 20;

/// What the old herd passes on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Handover {
    pub version: u32,
    /// The old herd's version (`herd --version`).
    pub from: String,
    /// The binary the old herd re-executed.
    pub binary: String,
    /// The old herd's command line, `argv[0]` first: a new binary that cannot
    /// take over runs the old one again with it (not with its own, which
    /// may be what is wrong).
    pub argv: Vec<Vec<u8>>,
    pub control_fd: RawFd,
    pub metrics_fd: Option<RawFd>,
    /// The configured listeners as bound, in `listen` order.
    pub listen_addrs: Vec<SocketAddr>,
    pub handoff: CarriedLoop,
    pub supervisor: CarriedSupervisor,
    pub counters: CarriedCounters,
    /// herd's open-file limit: (the original soft one, soft, hard).
    pub fd_limit: (u64, u64, u64),
    /// How long herd has run, over every upgrade.
    pub uptime_ms: u64,
    pub record: crate::status::UpgradeRecord,
    /// The config on disk differs from the one running: the new herd
    /// reloads (rolling) once it took over, so no setting is left unapplied.
    pub config_changed: bool,
}

impl Handover {
    /// Every fd the exec must keep open for the new herd.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.control_fd];
        fds.extend(self.metrics_fd);
        fds.extend(self.handoff.fds());
        fds.extend(self.supervisor.fds());
        fds
    }

    /// The document in a new memfd (close-on-exec until [`keep_open`]).
    pub fn write(&self) -> io::Result<OwnedFd> {
        let fd = nix::sys::memfd::memfd_create(
            c"herd-handover",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )?;
        let mut file = std::fs::File::from(fd);
        serde_json::to_writer(&mut file, self)?;
        file.flush()?;
        Ok(file.into())
    }

    /// Reads the document from the start of `fd` (it is read again from
    /// the start if this herd falls back to the old binary).
    pub fn read(fd: BorrowedFd<'_>) -> Result<Handover, String> {
        let mut file = std::fs::File::from(fd.try_clone_to_owned().map_err(|e| e.to_string())?);
        file.rewind().map_err(|e| format!("cannot read it: {e}"))?;
        let mut text = Vec::new();
        (&mut file)
            .take(MAX_HANDOVER_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(|e| format!("cannot read it: {e}"))?;
        if text.len() as u64 > MAX_HANDOVER_BYTES {
            return Err(format!("it is over {MAX_HANDOVER_BYTES} bytes"));
        }
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let versioned: Versioned =
            serde_json::from_slice(&text).map_err(|e| format!("it is not a handover: {e}"))?;
        if !HANDOVER_READS.contains(&versioned.version) {
            return Err(format!(
                "it is version {}, this herd reads versions {HANDOVER_READS:?}",
                versioned.version
            ));
        }
        serde_json::from_slice(&text).map_err(|e| format!("it is malformed: {e}"))
    }
}

/// Clears (`keep`) or sets close-on-exec on each of `fds`: cleared, they
/// survive the exec; set again, they do not leak into workers if it failed.
pub fn keep_open(fds: &[RawFd], keep: bool) -> io::Result<()> {
    for &fd in fds {
        herd_protocol::fdpass::set_inherited(fd, keep)?;
    }
    Ok(())
}
