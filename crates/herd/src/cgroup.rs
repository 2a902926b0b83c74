//! cgroup v2 leaves, one per worker process: how herd finds every process
//! a worker started, even those that left its process group (`setsid`,
//! double-forking daemons), to kill them with it.
//!
//! Owns `<herd's cgroup>/herd.<pid>/`, and in it `slot<N>.w<id>` for each
//! worker. A leaf per worker rather than per slot, because during a reload
//! or a recycle a slot has two workers and only the old one is to die. A
//! worker joins its leaf between fork and exec, so even its first child is
//! inside. No controller is enabled, so creating the leaves needs only
//! write access to herd's own cgroup (root, or a delegated cgroup under
//! systemd); where that is missing, `kill_mode = "auto"` falls back to
//! process groups.
//!
//! A herd that was SIGKILLed leaves its `herd.<pid>` behind, with whatever
//! its workers' helpers were; the next herd in the same cgroup kills those
//! and removes the directory before it binds, so a leftover cannot hold
//! the port. (A `herd.<pid>` whose herd is alive is never touched.) The
//! name carries herd's PID namespace too, `herd.<pid>.ns<inode>`: a pid
//! means something only in its own namespace, so a herd judges only the
//! leftovers of its own (two herds in containers that share a cgroup
//! hierarchy are both PID 1, and neither can see the other's processes).

use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::config::KillMode;

/// How long herd waits for a killed cgroup to empty before giving up on
/// removing it (SIGKILL lands at once unless a process is stuck in the kernel).
const EMPTY_WAIT: Duration = Duration::from_secs(2);

/// Why herd cannot give workers cgroups of their own.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 hierarchy is mounted")]
    NoHierarchy,
    #[error("herd's own cgroup is unknown (/proc/self/cgroup has no v2 entry)")]
    NoOwnCgroup,
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What was left behind by a herd that did not stop cleanly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    /// The pid that herd had.
    pub herd_pid: u32,
    /// Processes still in its cgroups, now killed.
    pub killed: usize,
}

/// `herd.<pid>`: the parent of every worker's leaf. Removed on drop.
#[derive(Debug)]
pub struct CgroupTree {
    dir: PathBuf,
}

/// One worker's cgroup.
#[derive(Debug)]
pub struct Leaf {
    dir: PathBuf,
    /// `cgroup.procs`, open for writing: the child writes "0" to it.
    procs: OwnedFd,
}

impl CgroupTree {
    /// Creates herd's tree under its own cgroup, after killing what herds
    /// that died without stopping left there.
    pub fn create() -> Result<(CgroupTree, Vec<Leftover>), CgroupError> {
        let own = own_cgroup_dir()?;
        let leftovers = clean_leftovers(&own);
        Ok((CgroupTree::create_in(&own)?, leftovers))
    }

    /// Whether herd could give workers cgroups here (for `herd check`):
    /// creates a tree and removes it, touching nothing else.
    pub fn probe() -> Result<(), CgroupError> {
        CgroupTree::create_in(&own_cgroup_dir()?).map(drop)
    }

    fn create_in(own: &Path) -> Result<CgroupTree, CgroupError> {
        let dir = own.join(tree_name(std::process::id(), pid_namespace()));
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(CgroupError::Create { path: dir, source }),
        }
        let tree = CgroupTree { dir };
        // Prove a leaf can be made and opened: the tree is useless otherwise.
        tree.leaf("probe")
            .and_then(|leaf| leaf.remove())
            .map_err(|source| CgroupError::Create {
                path: tree.dir.clone(),
                source,
            })?;
        Ok(tree)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Creates the leaf `name`, ready for a child to join.
    pub fn leaf(&self, name: &str) -> io::Result<Leaf> {
        let dir = self.dir.join(name);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))?;
        Ok(Leaf {
            dir,
            procs: procs.into(),
        })
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                if entry.path().is_dir() {
                    kill_and_remove(&entry.path());
                }
            }
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

impl Leaf {
    /// The fd of `cgroup.procs`, for [`herd_protocol::fdpass::prepare_child`].
    pub fn procs_fd(&self) -> RawFd {
        self.procs.as_raw_fd()
    }

    /// SIGKILLs every process in the leaf.
    pub fn kill(&self) {
        kill_cgroup(&self.dir);
    }

    /// No process is left in it.
    pub fn is_empty(&self) -> bool {
        is_empty(&self.dir)
    }

    /// Removes the (empty) leaf.
    pub fn remove(&self) -> io::Result<()> {
        fs::remove_dir(&self.dir)
    }
}

/// SIGKILLs every process in the cgroup at `dir` and its descendants:
/// `cgroup.kill` (Linux 5.14) or, before it, each pid in `cgroup.procs`.
fn kill_cgroup(dir: &Path) {
    let killed = fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.kill"))
        .and_then(|mut file| file.write_all(b"1"));
    if killed.is_ok() {
        return;
    }
    for pid in pids(dir) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.path().is_dir() {
                kill_cgroup(&entry.path());
            }
        }
    }
}

/// The processes directly in the cgroup at `dir`.
fn pids(dir: &Path) -> Vec<u32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

fn is_empty(dir: &Path) -> bool {
    match fs::read_to_string(dir.join("cgroup.events")) {
        Ok(events) => events.lines().any(|line| line == "populated 0"),
        // Without cgroup.events (an old kernel), an empty cgroup.procs.
        Err(_) => pids(dir).is_empty(),
    }
}

/// Kills what is in `dir`, waits (bounded) for it to empty, removes it and
/// its leaves. Returns how many processes it held.
fn kill_and_remove(dir: &Path) -> usize {
    let mut held = pids(dir).len();
    let leaves: Vec<PathBuf> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    held += leaves.iter().map(|leaf| pids(leaf).len()).sum::<usize>();
    kill_cgroup(dir);
    let deadline = Instant::now() + EMPTY_WAIT;
    while !is_empty(dir) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    for leaf in &leaves {
        let _ = fs::remove_dir(leaf);
    }
    let _ = fs::remove_dir(dir);
    held
}

/// The tree's directory name: `herd.<pid>`, with `.ns<inode>` when herd
/// knows its PID namespace.
fn tree_name(pid: u32, namespace: Option<u64>) -> String {
    match namespace {
        Some(ns) => format!("herd.{pid}.ns{ns}"),
        None => format!("herd.{pid}"),
    }
}

/// The herd pid and PID namespace a tree's name says (`None` for a name
/// that is not a herd tree's; a namespace of `None` for the old
/// `herd.<pid>`, taken as this namespace's).
fn parse_tree_name(name: &str) -> Option<(u32, Option<u64>)> {
    let rest = name.strip_prefix("herd.")?;
    match rest.split_once(".ns") {
        Some((pid, ns)) => Some((pid.parse().ok()?, Some(ns.parse().ok()?))),
        None => Some((rest.parse().ok()?, None)),
    }
}

/// The inode of herd's PID namespace (`/proc/self/ns/pid`).
fn pid_namespace() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino())
}

/// Kills and removes every herd tree under `own` whose herd, in this PID
/// namespace, is gone; trees of other namespaces are not this herd's to judge.
fn clean_leftovers(own: &Path) -> Vec<Leftover> {
    let Ok(entries) = fs::read_dir(own) else {
        return Vec::new();
    };
    let mine = pid_namespace();
    let mut cleaned = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some((herd_pid, namespace)) = name.to_str().and_then(parse_tree_name) else {
            continue;
        };
        if namespace.is_some_and(|ns| Some(ns) != mine) {
            continue;
        }
        if herd_pid == std::process::id() || Path::new(&format!("/proc/{herd_pid}")).exists() {
            continue;
        }
        let killed = kill_and_remove(&entry.path());
        cleaned.push(Leftover { herd_pid, killed });
    }
    cleaned
}

/// herd's own cgroup directory: the cgroup2 mount point joined with the
/// `0::` path of /proc/self/cgroup (relative to the mount's root, for a
/// cgroup namespace).
fn own_cgroup_dir() -> Result<PathBuf, CgroupError> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let (root, mount) = mountinfo
        .lines()
        .find_map(cgroup2_mount)
        .ok_or(CgroupError::NoHierarchy)?;
    let cgroup = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let own = cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or(CgroupError::NoOwnCgroup)?;
    let relative = own.strip_prefix(root.as_str()).unwrap_or(own);
    Ok(mount.join(relative.trim_start_matches('/')))
}

/// (root, mount point) of a mountinfo line for a cgroup2 file system.
fn cgroup2_mount(line: &str) -> Option<(String, PathBuf)> {
    let (mount, fs_part) = line.split_once(" - ")?;
    if fs_part.split_whitespace().next()? != "cgroup2" {
        return None;
    }
    let fields: Vec<&str> = mount.split_whitespace().collect();
    Some((fields.get(3)?.to_string(), PathBuf::from(fields.get(4)?)))
}

/// Where a worker's processes are: a cgroup per worker where herd can,
/// else process groups (an error only for `kill_mode = "control-group"`). Killing what a SIGKILLed herd left in its cgroups
/// comes first, as it may still hold the port herd is about to bind.
pub fn for_workers(mode: KillMode) -> Result<Option<CgroupTree>, CgroupError> {
    if mode == KillMode::ProcessGroup {
        return Ok(None);
    }
    match CgroupTree::create() {
        Ok((tree, leftovers)) => {
            for left in leftovers {
                warn!(
                    killed = left.killed,
                    herd_pid = left.herd_pid,
                    event = "previous_run_killed",
                    "killed the processes left behind by herd pid {} (it did not stop cleanly, e.g. it was SIGKILLed)",
                    left.herd_pid
                );
            }
            info!(path = %tree.path().display(), event = "cgroups", "a cgroup per worker");
            Ok(Some(tree))
        }
        Err(e) if mode == KillMode::ControlGroup => Err(e),
        Err(e) => {
            info!(
                event = "no_cgroups",
                "workers' processes are their process groups (no cgroup: {e})"
            );
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_names_round_trip_and_old_ones_are_read() {
        assert_eq!(
            parse_tree_name(&tree_name(42, Some(4026531836))),
            Some((42, Some(4026531836)))
        );
        assert_eq!(parse_tree_name(&tree_name(42, None)), Some((42, None)));
        assert_eq!(parse_tree_name("herd.7"), Some((7, None)));
        for other in [
            "herd-test-1",
            "herd.",
            "herd.x",
            "herd.7.ns",
            "herd.7.nsx",
            "slot0.w1",
        ] {
            assert_eq!(parse_tree_name(other), None, "{other}");
        }
    }

    #[test]
    fn finds_the_cgroup2_mount_in_mountinfo() {
        let hybrid = "35 24 0:30 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(("/".into(), PathBuf::from("/sys/fs/cgroup/unified")))
        );
        let v1 = "36 24 0:31 / /sys/fs/cgroup/cpu rw,relatime shared:11 - cgroup cgroup rw,cpu";
        assert_eq!(cgroup2_mount(v1), None);
        let namespaced = "40 30 0:26 /kubepods/pod1 /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw";
        assert_eq!(
            cgroup2_mount(namespaced),
            Some(("/kubepods/pod1".into(), PathBuf::from("/sys/fs/cgroup")))
        );
    }

    /// Needs a writable cgroup v2 hierarchy (root here); says so and skips elsewhere.
    #[test]
    fn a_leaf_holds_a_child_and_kills_what_it_holds() {
        let (tree, _) = match CgroupTree::create() {
            Ok(created) => created,
            Err(e) => {
                eprintln!("skipped: no cgroup for this test ({e})");
                return;
            }
        };
        let leaf = tree.leaf("test-leaf").unwrap();
        let mut command = std::process::Command::new("sleep");
        command.arg("60");
        herd_protocol::fdpass::prepare_child(&mut command, Vec::new(), Some(leaf.procs_fd()), None);
        let mut child = command.spawn().unwrap();
        assert_eq!(pids(&leaf.dir), [child.id()]);
        assert!(!leaf.is_empty());
        leaf.kill();
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        let deadline = Instant::now() + EMPTY_WAIT;
        while !leaf.is_empty() {
            assert!(Instant::now() < deadline, "the leaf never emptied");
            std::thread::sleep(Duration::from_millis(5));
        }
        leaf.remove().unwrap();
        let dir = tree.path().to_owned();
        drop(tree);
        assert!(!dir.exists());
    }

    /// What a SIGKILLed herd leaves: `herd.<pid>` with a live process in a
    /// leaf. Cleaning kills it and removes the tree; a live herd's tree is
    /// left alone. Runs in a parent of its own, so no herd starting
    /// meanwhile (they clean their own cgroup's children) can get there first.
    #[test]
    fn leftovers_of_a_dead_herd_are_killed_and_removed_and_a_live_ones_kept() {
        let Ok(own) = own_cgroup_dir() else {
            eprintln!("skipped: no cgroup v2 hierarchy");
            return;
        };
        let parent = own.join(format!("herd-test-{}", std::process::id()));
        if let Err(e) = fs::create_dir(&parent) {
            eprintln!("skipped: cannot create cgroups here ({e})");
            return;
        }
        // Above the kernel's largest pid_max: no such process can exist.
        let dead = parent.join(tree_name(4_194_305, pid_namespace()));
        let alive = parent.join(tree_name(std::process::id(), pid_namespace()));
        // Another namespace's: its pid says nothing here, so it is kept.
        let foreign = parent.join(tree_name(4_194_306, Some(1)));
        for dir in [&dead, &alive, &foreign] {
            fs::create_dir(dir).unwrap();
            fs::create_dir(dir.join("slot0.w1")).unwrap();
        }
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(dead.join("slot0.w1/cgroup.procs"))
            .unwrap();
        let mut command = std::process::Command::new("sleep");
        command.arg("60");
        herd_protocol::fdpass::prepare_child(
            &mut command,
            Vec::new(),
            Some(procs.as_raw_fd()),
            None,
        );
        let mut child = command.spawn().unwrap();
        let cleaned = clean_leftovers(&parent);
        assert_eq!(
            cleaned,
            [Leftover {
                herd_pid: 4_194_305,
                killed: 1
            }]
        );
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        assert!(!dead.exists(), "the dead herd's tree is removed");
        assert!(
            alive.join("slot0.w1").exists(),
            "a live herd's tree is kept"
        );
        assert!(
            foreign.join("slot0.w1").exists(),
            "another namespace's tree is kept"
        );
        for dir in [
            alive.join("slot0.w1"),
            alive,
            foreign.join("slot0.w1"),
            foreign,
            parent,
        ] {
            fs::remove_dir(dir).unwrap();
        }
    }
}
