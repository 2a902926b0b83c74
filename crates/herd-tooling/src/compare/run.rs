//! One row of a comparison: `herd run` started as a child in one mode (on
//! 127.0.0.1 port 0, with a private control socket and log), its status
//! polled until every worker is ready, the worker in slot 0 SIGSTOPped for
//! the stalled scenario, one [`mod@bench`] load, herd's memory sampled, and
//! herd stopped again; every wait bounded. What goes wrong becomes the
//! row's note.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::time::Instant;

use super::{one_line, CompareError, CompareOptions, Row, Scenario};
use crate::bench::{self, BenchError, BenchReport, Target};
use herd::control::{self, ControlError, ControlRequest, Response};
use herd::procstat;
use herd::status::{self, SlotState, StatusReport};
use herd::status::{fairness, Fairness};

/// How long herd gets to bind, start its workers and see them all ready.
/// herd's own default `ready_timeout` is 30 s: a slower worker fails anyway.
pub const READY_DEADLINE: Duration = Duration::from_secs(30);
/// How long herd gets to stop after `ControlRequest::Stop` before it is SIGKILLed:
/// above herd's default `shutdown_timeout` (10 s), so a clean drain fits.
pub const STOP_DEADLINE: Duration = Duration::from_secs(20);
/// Longest wait for one control-socket answer while polling for readiness.
const STATUS_ANSWER: Duration = Duration::from_secs(5);
/// SIGSTOP takes effect in microseconds; this only bounds a wait that should not happen.
const STOP_SIGNAL_DEADLINE: Duration = Duration::from_secs(2);
/// Between two readiness polls: short next to a worker's start-up.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Why one mode could not be measured; the text becomes the row's note.
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("cannot start {herd}: {source}")]
    Spawn {
        herd: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the herd log {path}: {source}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("herd exited ({status}) before its workers were ready: {said}")]
    Exited { status: ExitStatus, said: String },
    #[error("workers not all ready within {within:?} (last seen: {states})")]
    NotReady { within: Duration, states: String },
    #[error("herd reports no listen address")]
    NoListener,
    #[error("herd reports no worker in slot 0 to stall")]
    NoWorkerToStall,
    #[error("cannot SIGSTOP worker {pid}: {source}")]
    Stall {
        pid: u32,
        #[source]
        source: nix::Error,
    },
    #[error("worker {pid} did not stop within {STOP_SIGNAL_DEADLINE:?} of SIGSTOP")]
    NotStopped { pid: u32 },
    #[error(transparent)]
    Bench(#[from] BenchError),
    #[error("waiting for herd: {0}")]
    Wait(#[source] std::io::Error),
}

/// A private directory for control sockets and herd logs, removed on drop.
pub(super) struct Scratch {
    pub(super) path: PathBuf,
}

impl Scratch {
    pub(super) fn create() -> Result<Scratch, CompareError> {
        use std::os::unix::fs::DirBuilderExt;
        let path = std::env::temp_dir().join(format!("herd-compare-{}", std::process::id()));
        // Left over from an earlier process with the same pid: ours to replace.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|source| CompareError::Scratch {
                path: path.clone(),
                source,
            })?;
        Ok(Scratch { path })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// What one run measured.
struct Measured {
    bench: BenchReport,
    fairness: Option<Fairness>,
    primary_rss_bytes: Option<u64>,
}

/// Starts herd in `mode`, measures `scenario` against it and stops it again.
pub(super) async fn one_row(
    options: &CompareOptions,
    scenario: Scenario,
    mode: &str,
    scratch: &Path,
) -> Row {
    let name = format!("{}-{mode}", scenario.name());
    let mut herd = match RunningHerd::start(options, mode, scratch, &name) {
        Ok(herd) => herd,
        Err(e) => return Row::failed(scenario, mode, e.to_string()),
    };
    let measured = measure(options, scenario, &mut herd).await;
    let stopped = herd.stop().await;
    match measured {
        Ok(m) => Row {
            scenario,
            mode: mode.to_string(),
            bench: Some(m.bench),
            fairness: m.fairness,
            primary_rss_bytes: m.primary_rss_bytes,
            note: stopped.err().map(|e| one_line(&e)),
        },
        Err(e) => Row::failed(scenario, mode, e.to_string()),
    }
}

async fn measure(
    options: &CompareOptions,
    scenario: Scenario,
    herd: &mut RunningHerd,
) -> Result<Measured, RunError> {
    let status = herd.wait_ready(options.workers).await?;
    let addr: SocketAddr = status
        .listen
        .first()
        .and_then(|a| a.parse().ok())
        .ok_or(RunError::NoListener)?;
    let pids: Vec<u32> = status.workers.iter().filter_map(|w| w.pid).collect();
    let target = Target {
        addr,
        path: "/".into(),
    };
    let paused = match scenario {
        Scenario::Stalled => {
            let pid = status
                .workers
                .iter()
                .find(|w| w.slot == 0)
                .and_then(|w| w.pid)
                .ok_or(RunError::NoWorkerToStall)?;
            Some(Paused::pause(pid).await?)
        }
        Scenario::Uniform | Scenario::Connect => None,
    };
    let report = bench::run(options.bench_options(target, scenario)).await;
    drop(paused);
    let report = report?;
    Ok(Measured {
        fairness: spread(&pids, &report.workers),
        primary_rss_bytes: procstat::sample(herd.pid).map(|s| s.rss),
        bench: report,
    })
}

/// Fairness of the answers over `pids` (herd's workers when the load began;
/// one that answered nothing counts as 0) and any other pid that answered.
pub fn spread(pids: &[u32], shares: &[bench::WorkerShare]) -> Option<Fairness> {
    let mut counts: BTreeMap<u32, u64> = pids.iter().map(|&pid| (pid, 0)).collect();
    for share in shares {
        *counts.entry(share.pid).or_insert(0) += share.count;
    }
    fairness(&counts.into_values().collect::<Vec<_>>())
}

/// A worker stopped with SIGSTOP; continued with SIGCONT when dropped, so it
/// runs again whatever happens during the load.
struct Paused {
    pid: Pid,
}

impl Paused {
    /// Sends SIGSTOP and waits (at most [`STOP_SIGNAL_DEADLINE`]) until the
    /// kernel shows the process stopped, so the load starts against a stall.
    async fn pause(pid: u32) -> Result<Paused, RunError> {
        let raw = Pid::from_raw(pid as i32);
        kill(raw, Signal::SIGSTOP).map_err(|source| RunError::Stall { pid, source })?;
        let paused = Paused { pid: raw };
        let deadline = Instant::now() + STOP_SIGNAL_DEADLINE;
        while process_state(pid) != Some('T') {
            if Instant::now() >= deadline {
                return Err(RunError::NotStopped { pid });
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(paused)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        // The worker may have been replaced meanwhile; then there is nothing to continue.
        let _ = kill(self.pid, Signal::SIGCONT);
    }
}

/// The state letter of `/proc/<pid>/stat` (`T` for stopped by a signal).
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_state(&stat)
}

/// The field after the command name, which may hold spaces and parentheses.
fn parse_state(stat: &str) -> Option<char> {
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// One `herd run` child, its control socket and its log.
struct RunningHerd {
    child: tokio::process::Child,
    pid: u32,
    control: PathBuf,
    /// herd's stdout and stderr (and its workers'), for the note when it fails.
    log: PathBuf,
}

impl RunningHerd {
    fn start(
        options: &CompareOptions,
        mode: &str,
        scratch: &Path,
        name: &str,
    ) -> Result<RunningHerd, RunError> {
        let control = scratch.join(format!("{name}.sock"));
        let log = scratch.join(format!("{name}.log"));
        let log_error = |source| RunError::Log {
            path: log.clone(),
            source,
        };
        let out = std::fs::File::create(&log).map_err(log_error)?;
        let err = out.try_clone().map_err(log_error)?;
        let child = tokio::process::Command::new(&options.herd)
            .arg("run")
            // No config file: only the flags below count, not ./config.toml.
            .args(["-c", "/dev/null", "--listen", "127.0.0.1:0"])
            .args(["--workers", &options.workers.to_string(), "--mode", mode])
            .arg("--control")
            .arg(&control)
            .arg("--")
            .args(&options.command)
            // Warnings and errors only: nothing per worker start to fill the log.
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| RunError::Spawn {
                herd: options.herd.clone(),
                source,
            })?;
        let pid = child.id().unwrap_or_default();
        Ok(RunningHerd {
            child,
            pid,
            control,
            log,
        })
    }

    /// Polls `status` until `workers` slots are all ready; fails when herd
    /// exits first or [`READY_DEADLINE`] passes.
    async fn wait_ready(&mut self, workers: usize) -> Result<StatusReport, RunError> {
        let deadline = Instant::now() + READY_DEADLINE;
        let mut states = String::from("no answer on the control socket");
        loop {
            if let Some(status) = self.child.try_wait().map_err(RunError::Wait)? {
                return Err(RunError::Exited {
                    status,
                    said: last_line(&self.log),
                });
            }
            if let Ok(Response {
                status: Some(report),
                ..
            }) = ask(&self.control, ControlRequest::Status, STATUS_ANSWER).await
            {
                if report.workers.len() == workers
                    && report.workers.iter().all(|w| w.state == SlotState::Ready)
                {
                    return Ok(report);
                }
                states = report
                    .workers
                    .iter()
                    .map(|w| format!("slot {} {}", w.slot, status::kebab(&w.state)))
                    .collect::<Vec<_>>()
                    .join(", ");
            }
            if Instant::now() >= deadline {
                return Err(RunError::NotReady {
                    within: READY_DEADLINE,
                    states,
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Asks herd to stop and waits for it to exit, at most [`STOP_DEADLINE`];
    /// then SIGKILLs it. Ok when herd stopped cleanly (or had exited already).
    async fn stop(mut self) -> Result<(), String> {
        if let Ok(Some(_)) = self.child.try_wait() {
            return Ok(());
        }
        // The answer comes once herd has stopped; its exit is what we wait for.
        let control = self.control.clone();
        let _answer =
            tokio::task::spawn_blocking(move || control::request(&control, &ControlRequest::Stop));
        match tokio::time::timeout(STOP_DEADLINE, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(format!(
                "herd exited ({status}) after stop: {}",
                last_line(&self.log)
            )),
            Ok(Err(e)) => Err(format!("waiting for herd to stop: {e}")),
            Err(_) => {
                let _ = self.child.kill().await;
                Err(format!(
                    "herd did not stop within {STOP_DEADLINE:?}; killed it"
                ))
            }
        }
    }
}

/// One control request, answered within `within` (the blocking client runs
/// on its own thread; one that hangs ends when herd does).
async fn ask(path: &Path, request: ControlRequest, within: Duration) -> Result<Response, String> {
    let path = path.to_owned();
    let asked = tokio::task::spawn_blocking(move || control::request(&path, &request));
    match tokio::time::timeout(within, asked).await {
        Ok(Ok(answer)) => answer.map_err(|e: ControlError| e.to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {within:?}")),
    }
}

/// The last non-empty line of a log file, for a note.
fn last_line(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("(no output)")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::WorkerShare;

    #[test]
    fn spread_counts_silent_workers_as_zero() {
        let share = |pid, count| WorkerShare {
            pid,
            count,
            share_percent: 0.0,
        };
        // Only one of two workers answered: not "perfectly fair".
        let f = spread(&[1, 2], &[share(1, 100)]).unwrap();
        assert_eq!(f.max_min_ratio, None);
        assert!((f.jain_index - 0.5).abs() < 1e-9);
        let f = spread(&[1, 2], &[share(1, 100), share(2, 50)]).unwrap();
        assert_eq!(f.max_min_ratio, Some(2.0));
        // A replacement worker that answered is counted too.
        let f = spread(&[1], &[share(1, 10), share(3, 10)]).unwrap();
        assert_eq!(f.max_min_ratio, Some(1.0));
        assert_eq!(spread(&[1, 2], &[]), None);
    }

    #[test]
    fn process_states_from_stat() {
        assert_eq!(parse_state("42 (a (b) c) T 1 42"), Some('T'));
        assert_eq!(parse_state("42 (w) S 1"), Some('S'));
        assert_eq!(parse_state("garbage"), None);
        assert!(matches!(process_state(std::process::id()), Some('R' | 'S')));
    }
}
