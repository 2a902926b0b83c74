//! Processes as /proc shows them: a process's parent, group, state and
//! start time, the tree below a process, and a process's fds and memory.

use std::collections::BTreeSet;

/// One process, from `/proc/<pid>/stat` (and its command line).
#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: u32,
    pub ppid: u32,
    pub pgrp: u32,
    pub state: char,
    /// When it started, in clock ticks since boot: with the pid, it names
    /// one process for good.
    pub started: u64,
}

impl std::fmt::Display for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.pid))
            .map(|bytes| String::from_utf8_lossy(&bytes).replace('\0', " "))
            .unwrap_or_default();
        write!(
            f,
            "pid {} ppid {} state {}: {}",
            self.pid,
            self.ppid,
            self.state,
            cmdline.trim()
        )
    }
}

/// Parses `pid (comm) state ppid pgrp ...`; comm may hold spaces and parens.
pub fn parse_stat(stat: &str) -> Option<Proc> {
    let (head, rest) = stat.rsplit_once(')')?;
    let pid = head.split_whitespace().next()?.parse().ok()?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    // Field 22 of stat(5); we have read fields 3 to 5.
    let started = fields.nth(16)?.parse().ok()?;
    Some(Proc {
        pid,
        ppid,
        pgrp,
        state,
        started,
    })
}

/// Every process (not thread: /proc lists thread-group leaders only, and
/// the Tgid check makes sure).
pub fn processes() -> Vec<Proc> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let proc = parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let tgid = status_field(&status, "Tgid:")?;
            (tgid == u64::from(pid)).then_some(proc)
        })
        .collect()
}

/// Every process descending from `root` (not `root` itself).
pub fn descendants(root: u32) -> Vec<Proc> {
    let all = processes();
    let mut found = Vec::new();
    let mut parents = BTreeSet::from([root]);
    // A tree no deeper than the number of processes.
    for _ in 0..=all.len() {
        let next: Vec<&Proc> = all
            .iter()
            .filter(|p| parents.contains(&p.ppid) && !parents.contains(&p.pid))
            .collect();
        if next.is_empty() {
            break;
        }
        for p in next {
            parents.insert(p.pid);
            found.push(p.clone());
        }
    }
    found
}

pub fn proc_of(pid: u32) -> Option<Proc> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// `pid` is alive (not a zombie) and `ancestor` is its parent, or its
/// parent's parent...: herd's worker, even if herd starts it through a
/// helper process of its own.
pub fn descends_from(pid: u32, ancestor: u32) -> bool {
    let Some(first) = proc_of(pid) else {
        return false;
    };
    if matches!(first.state, 'Z' | 'X') {
        return false;
    }
    let mut parent = first.ppid;
    // Bounded: a chain of ppid links cannot be longer than a few dozen.
    for _ in 0..64 {
        if parent == ancestor {
            return true;
        }
        match proc_of(parent) {
            Some(p) if parent > 1 => parent = p.ppid,
            _ => return false,
        }
    }
    false
}

/// Alive and not a zombie.
pub fn process_running(pid: u32) -> bool {
    proc_of(pid).is_some_and(|p| !matches!(p.state, 'Z' | 'X'))
}

pub fn status_field(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// herd's open fds and resident memory.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub fds: usize,
    /// Bytes.
    pub rss: u64,
}

impl Usage {
    pub fn of(pid: u32) -> Option<Usage> {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rss = status_field(&status, "VmRSS:")? << 10;
        Some(Usage { fds, rss })
    }
}
