//! Resource use of worker processes, read from `/proc`.
//!
//! Owns parsing `/proc/<pid>/stat` and `/proc/<pid>/statm` into resident
//! memory and CPU time, and turning two samples into a CPU percentage. The
//! supervisor samples every `monitor_interval` for `herd status` and the
//! `max_memory` limit.

use std::time::Instant;

/// One reading of a process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Instant,
    /// Resident set size in bytes.
    pub rss: u64,
    /// User + system CPU time in clock ticks.
    pub cpu_ticks: u64,
}

/// Reads a process's current resident memory and CPU time; `None` if it is gone.
pub fn sample(pid: u32) -> Option<Sample> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(Sample {
        at: Instant::now(),
        rss: parse_statm_rss(&statm)? * page_size(),
        cpu_ticks: parse_stat_cpu_ticks(&stat)?,
    })
}

/// CPU use between two samples, in percent of one core.
pub fn cpu_percent(earlier: &Sample, later: &Sample) -> f64 {
    let wall = later.at.duration_since(earlier.at).as_secs_f64();
    if wall <= 0.0 {
        return 0.0;
    }
    let ticks = later.cpu_ticks.saturating_sub(earlier.cpu_ticks) as f64;
    100.0 * ticks / ticks_per_second() / wall
}

/// Clock ticks (as in `/proc/<pid>/stat`) in seconds.
pub fn ticks_to_seconds(ticks: u64) -> f64 {
    ticks as f64 / ticks_per_second()
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |n| n as u64)
}

fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |n| n as f64)
}

/// Second field of statm: resident pages.
fn parse_statm_rss(statm: &str) -> Option<u64> {
    statm.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime (fields 14 and 15). The command name (field 2) may hold
/// spaces and parentheses, so fields are counted after the last ')'.
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_command_names() {
        let stat = "1234 (my (odd) worker) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 100 1000 200";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(300));
        assert_eq!(parse_statm_rss("1000 250 100 10 0 300 0"), Some(250));
    }

    #[test]
    fn samples_this_process() {
        let own = sample(std::process::id()).unwrap();
        assert!(own.rss > 1 << 20);
        assert!(sample("4294967295".parse().unwrap()).is_none());
    }
}
