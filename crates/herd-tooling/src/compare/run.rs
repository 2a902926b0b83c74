//! One row of a comparison: `herd run` started as a child in one mode (on
//! 127.0.0.1 port 0 or the fixed `--listen` address once it is free, with a
//! private control socket and log), its status polled until every worker is
//! ready, the worker in slot 0 (its whole process group) SIGSTOPped for the
//! stalled scenario, one [`mod@bench`] load, herd's per-slot counts read
//! again, herd's memory sampled, and herd stopped again; every wait
//! bounded. What goes wrong becomes the row's note.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::{getpgid, Pid};
use tokio::time::Instant;

use super::flags::{self, Checked};
use super::spread::{HerdCounts, Spread, NO_SPREAD};
use super::{one_line, CompareError, CompareOptions, Row, Scenario};
use crate::bench::{self, BenchError, BenchReport, Target};
use herd::control::{self, ControlError, ControlRequest, Response};
use herd::procstat;
use herd::status::{self, SlotState, StatusReport};

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
/// How long herd's counts may lag the load: what workers report accepting
/// arrives after the answer, and herd reads the kernel's per-slot counts
/// every 500 ms (`TALLY_INTERVAL` in herd's hand-off thread), so twice that.
const COUNTS_SETTLE: Duration = Duration::from_secs(1);
/// The note of a `kernel` row in which the kernel dealt nothing.
const KERNEL_UNUSED: &str = "the kernel dealt none of these connections (herd's \
     kernel_dealt stayed 0): herd handed them off itself";
/// How long a fixed `--listen` address may stay taken after the previous
/// run's herd exited (its workers' last sockets closing) before a run gives up.
const ADDRESS_FREE_DEADLINE: Duration = Duration::from_secs(5);

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
    #[error("{addr} is still in use {ADDRESS_FREE_DEADLINE:?} after the previous run: {source}")]
    AddressTaken {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
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
    spread: Spread,
    herd_counts: Vec<u64>,
    /// A `kernel` row whose herd dealt by hand-offs (it falls back to them
    /// where the kernel refuses the program, and for Node apps it deals
    /// only on listeners it binds for the app): the row must say so.
    kernel_unused: bool,
    primary_rss_bytes: Option<u64>,
    primary_cpu_us_per_connection: Option<f64>,
}

/// Starts herd in `mode`, measures `scenario` against it and stops it again
/// (waiting until it exited, so the next run may bind the same address).
pub(super) async fn one_row(
    options: &CompareOptions,
    checked: &Checked,
    scenario: Scenario,
    mode: &str,
    scratch: &Path,
) -> Row {
    let name = format!("{}-{mode}", scenario.name());
    if let Some(addr) = checked.fixed_listen() {
        if let Err(e) = address_free(addr).await {
            return Row::failed(scenario, mode, e.to_string());
        }
    }
    let mut herd = match RunningHerd::start(options, checked, mode, scratch, &name) {
        Ok(herd) => herd,
        Err(e) => return Row::failed(scenario, mode, e.to_string()),
    };
    let measured = measure(options, scenario, mode, &mut herd).await;
    let stopped = herd.stop().await;
    match measured {
        Ok(m) => {
            let notes: Vec<String> = [
                m.kernel_unused.then(|| KERNEL_UNUSED.to_string()),
                m.spread.fairness.is_none().then(|| NO_SPREAD.to_string()),
                stopped.err(),
            ]
            .into_iter()
            .flatten()
            .collect();
            Row {
                scenario,
                mode: mode.to_string(),
                bench: Some(m.bench),
                fairness: m.spread.fairness,
                spread_from: m.spread.source,
                herd_counts: m.herd_counts,
                primary_rss_bytes: m.primary_rss_bytes,
                primary_cpu_us_per_connection: m.primary_cpu_us_per_connection,
                note: (!notes.is_empty()).then(|| one_line(&notes.join("; "))),
            }
        }
        Err(e) => Row::failed(scenario, mode, e.to_string()),
    }
}

/// Waits until `addr` can be bound (at most [`ADDRESS_FREE_DEADLINE`]):
/// the previous run's herd has exited, but a socket its workers held may
/// close a moment later, and in reuseport a leftover one would even share
/// the port with the next run's.
async fn address_free(addr: SocketAddr) -> Result<(), RunError> {
    let deadline = Instant::now() + ADDRESS_FREE_DEADLINE;
    loop {
        // std sets SO_REUSEADDR, as herd does: connections in TIME_WAIT do not count.
        match std::net::TcpListener::bind(addr) {
            Ok(_probe) => return Ok(()),
            Err(source) if Instant::now() >= deadline => {
                return Err(RunError::AddressTaken { addr, source })
            }
            Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
        }
    }
}

/// Where the load goes: herd's first listener, its loopback address when
/// herd listens on every address.
fn target_of(status: &StatusReport) -> Result<Target, RunError> {
    let mut addr: SocketAddr = status
        .listen
        .first()
        .and_then(|a| a.parse().ok())
        .ok_or(RunError::NoListener)?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Ok(Target {
        addr,
        path: "/".into(),
    })
}

async fn measure(
    options: &CompareOptions,
    scenario: Scenario,
    mode: &str,
    herd: &mut RunningHerd,
) -> Result<Measured, RunError> {
    let status = herd.wait_ready(options.workers).await?;
    let target = target_of(&status)?;
    let pids: Vec<u32> = status.workers.iter().filter_map(|w| w.pid).collect();
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
    let cpu_before = procstat::sample(herd.pid).map(|s| s.cpu_ticks);
    let report = bench::run(options.bench_options(target, scenario)).await;
    let cpu_after = procstat::sample(herd.pid).map(|s| s.cpu_ticks);
    drop(paused);
    let report = report?;
    let primary_cpu_us_per_connection = match (cpu_before, cpu_after) {
        (Some(before), Some(after)) if report.connections_opened > 0 => {
            let seconds = procstat::ticks_to_seconds(after.saturating_sub(before));
            Some(seconds * 1e6 / report.connections_opened as f64)
        }
        _ => None,
    };
    // With bodies that name their worker, herd's counts are only reported:
    // no need to wait for the late ones, unless they say whether the
    // kernel dealt at all.
    let settle = match report.workers.is_empty() || mode == flags::KERNEL {
        true => COUNTS_SETTLE,
        false => Duration::ZERO,
    };
    let counts = herd
        .counts_since(&status, report.connections_opened, settle)
        .await;
    let kernel_unused = mode == flags::KERNEL && report.succeeded > 0 && counts.kernel_dealt == 0;
    Ok(Measured {
        spread: Spread::choose(&pids, &report, &counts.per_slot),
        herd_counts: counts.per_slot,
        kernel_unused,
        primary_rss_bytes: procstat::sample(herd.pid).map(|s| s.rss),
        primary_cpu_us_per_connection,
        bench: report,
    })
}

/// A worker stopped with SIGSTOP; continued with SIGCONT when dropped, so it
/// runs again whatever happens during the load.
struct Paused {
    pid: Pid,
    /// The worker leads its process group (herd starts each worker in its
    /// own): the whole group is stopped, so a server whose children accept
    /// (gunicorn's workers under its arbiter) stalls too.
    group: bool,
}

impl Paused {
    /// Sends SIGSTOP and waits (at most [`STOP_SIGNAL_DEADLINE`]) until the
    /// kernel shows the process stopped, so the load starts against a stall.
    async fn pause(pid: u32) -> Result<Paused, RunError> {
        let raw = Pid::from_raw(pid as i32);
        let group = getpgid(Some(raw)) == Ok(raw);
        let paused = Paused { pid: raw, group };
        paused
            .signal(Signal::SIGSTOP)
            .map_err(|source| RunError::Stall { pid, source })?;
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

impl Paused {
    fn signal(&self, signal: Signal) -> nix::Result<()> {
        match self.group {
            true => killpg(self.pid, signal),
            false => kill(self.pid, signal),
        }
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        // The worker may have been replaced meanwhile; then there is nothing to continue.
        let _ = self.signal(Signal::SIGCONT);
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
        checked: &Checked,
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
            .args(flags::run_args(options, checked, mode, &control))
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

    /// What herd counted since `before` (see [`HerdCounts::since`]),
    /// polled for at most `settle` until it counts `expected` connections:
    /// reports of accepted connections and the kernel's counts come late.
    async fn counts_since(
        &self,
        before: &StatusReport,
        expected: u64,
        settle: Duration,
    ) -> HerdCounts {
        let deadline = Instant::now() + settle;
        let mut counts = HerdCounts::default();
        loop {
            if let Ok(Response {
                status: Some(after),
                ..
            }) = ask(&self.control, ControlRequest::Status, STATUS_ANSWER).await
            {
                counts = HerdCounts::since(before, &after);
            }
            if counts.per_slot.iter().sum::<u64>() >= expected || Instant::now() >= deadline {
                return counts;
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

    #[test]
    fn the_load_goes_to_loopback_when_herd_listens_everywhere() {
        let status = |addr: &str| StatusReport {
            pid: 1,
            phase: "running".into(),
            uptime_secs: 0.0,
            mode: "shared".into(),
            listen: vec![addr.into()],
            workers: vec![],
            fairness: None,
            kernel_dealt: 0,
            upgrades: Default::default(),
            handoff_threads: 1,
        };
        let addr = |a: &str| target_of(&status(a)).unwrap().addr.to_string();
        assert_eq!(addr("0.0.0.0:3000"), "127.0.0.1:3000");
        assert_eq!(addr("[::]:3000"), "[::1]:3000");
        assert_eq!(addr("127.0.0.2:3000"), "127.0.0.2:3000");
        assert!(target_of(&status("nonsense")).is_err());
    }

    #[test]
    fn process_states_from_stat() {
        assert_eq!(parse_state("42 (a (b) c) T 1 42"), Some('T'));
        assert_eq!(parse_state("42 (w) S 1"), Some('S'));
        assert_eq!(parse_state("garbage"), None);
        assert!(matches!(process_state(std::process::id()), Some('R' | 'S')));
    }
}
