//! `herd compare`: the same load against each dispatch mode, side by side.
//!
//! Owns the comparison runs and what they produce. For every scenario and
//! mode it starts `herd run` as a child process (on 127.0.0.1 port 0, with a
//! private control socket), waits through the control socket until every
//! worker is ready, drives one [`mod@bench`] load at the bound address, samples
//! the primary's memory, and stops herd through the control socket again.
//! A mode whose herd does not start, or not in time, becomes a row with a
//! note instead of ending the comparison. The rows render as a text table,
//! Markdown, CSV and a hand-written SVG bar chart.
//!
//! Every wait is bounded: herd's readiness by [`READY_DEADLINE`], its stop by
//! [`STOP_DEADLINE`] (then SIGKILL), each load by the [`mod@bench`] limits.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::time::Instant;

use crate::bench::{self, BenchError, BenchOptions, BenchReport, Limit, SourceRange, Target};
use herd::config::MAX_WORKERS;
use herd::control::{self, ControlError, ControlRequest as Request, Response};
use herd::procstat;
use herd::status::{self, SlotState, StatusReport};
use herd::status::{fairness, Fairness};

/// Every mode name `--modes` accepts. A mode whose herd fails to start
/// becomes a row with a note, not the end of the comparison.
pub const MODES: &[&str] = herd::dispatch::Mode::NAMES;

/// How long herd gets to bind, start its workers and see them all ready.
/// herd's own default `ready_timeout` is 30 s: a slower worker fails anyway.
pub const READY_DEADLINE: Duration = Duration::from_secs(30);
/// How long herd gets to stop after `Request::Stop` before it is SIGKILLed:
/// above herd's default `shutdown_timeout` (10 s), so a clean drain fits.
pub const STOP_DEADLINE: Duration = Duration::from_secs(20);
/// Longest wait for one control-socket answer while polling for readiness.
const STATUS_ANSWER: Duration = Duration::from_secs(5);
/// SIGSTOP takes effect in microseconds; this only bounds a wait that should not happen.
const STOP_SIGNAL_DEADLINE: Duration = Duration::from_secs(2);
/// Between two readiness polls: short next to a worker's start-up.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// The default per-request timeout is a quarter of the run, at most this.
const MAX_DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// Bad options: nothing was started.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("{0}")]
    Options(String),
    #[error(transparent)]
    Bench(#[from] BenchError),
    #[error("cannot create a scratch directory at {path}: {source}")]
    Scratch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

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

/// What the load looks like and what happens to the workers meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Keep-alive connections, every worker healthy.
    Uniform,
    /// A new connection per request, and the worker in slot 0 SIGSTOPped
    /// for the whole load: every request is a dispatch decision, and those
    /// sent to the stopped worker time out. How each policy routes around a
    /// worker that stopped answering.
    Stalled,
    /// A new connection per request, every worker healthy: every request is
    /// a hand-off.
    Connect,
}

impl Scenario {
    pub const NAMES: &'static [&'static str] = &["uniform", "stalled", "connect"];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Uniform => "uniform",
            Scenario::Stalled => "stalled",
            Scenario::Connect => "connect",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Scenario::Uniform => "keep-alive connections, every worker healthy",
            Scenario::Stalled => {
                "a new connection per request, the worker in slot 0 SIGSTOPped during \
                 the load (requests sent to it time out)"
            }
            Scenario::Connect => "a new connection per request, every worker healthy",
        }
    }

    pub fn parse(text: &str) -> Result<Scenario, CompareError> {
        match text.trim() {
            "uniform" => Ok(Scenario::Uniform),
            "stalled" => Ok(Scenario::Stalled),
            "connect" => Ok(Scenario::Connect),
            other => Err(CompareError::Options(format!(
                "unknown scenario {other:?} in --scenarios: expected some of {}",
                Scenario::NAMES.join(", ")
            ))),
        }
    }
}

/// Everything `herd compare` was asked to do.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// The herd binary started for each run (`herd compare` passes its own).
    pub herd: PathBuf,
    /// Mode names from [`MODES`], in the order the table shows them.
    pub modes: Vec<String>,
    pub scenarios: Vec<Scenario>,
    pub workers: usize,
    /// Concurrent client tasks of each load.
    pub connections: usize,
    /// Each run's bound; every mode and scenario gets the same.
    pub limit: Limit,
    /// Per request: a stalled request fails after this instead of being
    /// abandoned uncounted when a duration run ends.
    pub timeout: Duration,
    /// Client source addresses, so that sticky mode sees more than one client.
    pub source_range: Option<SourceRange>,
    /// The worker program and its arguments.
    pub command: Vec<String>,
}

/// The per-request timeout when none is given: a quarter of a duration run
/// (so stalled requests fail and are counted within the run), at most 1 s.
pub fn default_timeout(limit: Limit) -> Duration {
    match limit {
        Limit::Duration(d) => (d / 4).clamp(Duration::from_millis(1), MAX_DEFAULT_TIMEOUT),
        Limit::Requests(_) => MAX_DEFAULT_TIMEOUT,
    }
}

impl CompareOptions {
    /// Checks names, counts and the load's bounds before anything starts.
    pub fn validate(&self) -> Result<(), CompareError> {
        let bad = |s: String| Err(CompareError::Options(s));
        if self.modes.is_empty() {
            return bad("--modes is empty".into());
        }
        for (i, mode) in self.modes.iter().enumerate() {
            if !MODES.contains(&mode.as_str()) {
                return bad(format!(
                    "unknown mode {mode:?} in --modes: expected some of {}",
                    MODES.join(", ")
                ));
            }
            if self.modes[..i].contains(mode) {
                return bad(format!("mode {mode:?} is listed twice in --modes"));
            }
        }
        if self.scenarios.is_empty() {
            return bad("--scenarios is empty".into());
        }
        for (i, scenario) in self.scenarios.iter().enumerate() {
            if self.scenarios[..i].contains(scenario) {
                return bad(format!(
                    "scenario {:?} is listed twice in --scenarios",
                    scenario.name()
                ));
            }
        }
        if self.workers == 0 || self.workers > MAX_WORKERS {
            return bad(format!(
                "--workers must be from 1 to {MAX_WORKERS}, not {}",
                self.workers
            ));
        }
        if self.scenarios.contains(&Scenario::Stalled) {
            if self.workers < 2 {
                return bad("the stalled scenario needs --workers 2 or more".into());
            }
            if let Limit::Duration(d) = self.limit {
                if self.timeout >= d {
                    return bad(format!(
                        "--timeout ({:?}) must be shorter than --duration ({d:?}) for the \
                         stalled scenario, or stalled requests are never counted",
                        self.timeout
                    ));
                }
            }
        }
        if self.command.is_empty() {
            return bad("no worker command: give it after --, e.g. -- ./my-worker".into());
        }
        let placeholder = Target {
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            path: "/".into(),
        };
        for &scenario in &self.scenarios {
            self.bench_options(placeholder.clone(), scenario)
                .validate()?;
        }
        Ok(())
    }

    /// The load for one run: the same for every mode of a scenario.
    fn bench_options(&self, target: Target, scenario: Scenario) -> BenchOptions {
        BenchOptions {
            target,
            connections: self.connections,
            limit: self.limit,
            new_connection_per_request: matches!(scenario, Scenario::Connect | Scenario::Stalled),
            source_range: self.source_range,
            timeout: self.timeout,
        }
    }
}

/// One scenario under one mode.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: Scenario,
    pub mode: String,
    /// The load's report; `None` when herd could not be run in this mode.
    pub bench: Option<BenchReport>,
    /// Spread of successful answers over every worker herd had when the load
    /// began (one that answered nothing counts as 0, unlike the bench's own
    /// fairness over the pids that answered).
    pub fairness: Option<Fairness>,
    /// Resident memory of herd's primary right after the load, in bytes.
    pub primary_rss_bytes: Option<u64>,
    /// Why there is no measurement, or what went wrong around it.
    pub note: Option<String>,
}

impl Row {
    fn failed(scenario: Scenario, mode: &str, note: String) -> Row {
        Row {
            scenario,
            mode: mode.to_string(),
            bench: None,
            fairness: None,
            primary_rss_bytes: None,
            note: Some(one_line(&note)),
        }
    }

    /// Requests that failed by timing out.
    pub fn timeouts(&self) -> Option<u64> {
        let bench = self.bench.as_ref()?;
        Some(bench.errors_by_kind.get("timeout").copied().unwrap_or(0))
    }
}

/// The whole comparison: what was run and one row per scenario and mode.
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    pub command: Vec<String>,
    pub workers: usize,
    pub connections: usize,
    /// Each run's duration in seconds, when runs were bounded by one.
    pub duration_secs: Option<f64>,
    /// Each run's request budget, when runs were bounded by one.
    pub requests: Option<u64>,
    pub timeout_secs: f64,
    pub scenarios: Vec<Scenario>,
    pub modes: Vec<String>,
    /// Scenario by scenario, modes in the order given.
    pub rows: Vec<Row>,
}

impl CompareReport {
    /// At least one row has a measurement.
    pub fn measured_any(&self) -> bool {
        self.rows.iter().any(|r| r.bench.is_some())
    }

    /// One line saying what every run was.
    pub fn summary(&self) -> String {
        let bound = match (self.requests, self.duration_secs) {
            (Some(n), _) => format!("{n} requests per run"),
            (None, Some(secs)) => format!("{} per run", human_secs(secs)),
            (None, None) => String::new(),
        };
        format!(
            "{} worker(s) of `{}`, {} connections, {bound}, timeout {}",
            self.workers,
            self.command.join(" "),
            self.connections,
            human_secs(self.timeout_secs)
        )
    }
}

/// Runs every scenario under every mode, one herd at a time, and calls
/// `on_row` as each row is done. Fails only on invalid options or when no
/// scratch directory can be made; a mode that fails is a row with a note.
pub async fn run(
    options: &CompareOptions,
    mut on_row: impl FnMut(&Row),
) -> Result<CompareReport, CompareError> {
    options.validate()?;
    let scratch = Scratch::create()?;
    let mut rows = Vec::new();
    for &scenario in &options.scenarios {
        for mode in &options.modes {
            let row = run_one(options, scenario, mode, &scratch.path).await;
            on_row(&row);
            rows.push(row);
        }
    }
    Ok(CompareReport {
        command: options.command.clone(),
        workers: options.workers,
        connections: options.connections,
        duration_secs: match options.limit {
            Limit::Duration(d) => Some(d.as_secs_f64()),
            Limit::Requests(_) => None,
        },
        requests: match options.limit {
            Limit::Requests(n) => Some(n),
            Limit::Duration(_) => None,
        },
        timeout_secs: options.timeout.as_secs_f64(),
        scenarios: options.scenarios.clone(),
        modes: options.modes.clone(),
        rows,
    })
}

/// A private directory for control sockets and herd logs, removed on drop.
struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn create() -> Result<Scratch, CompareError> {
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

async fn run_one(options: &CompareOptions, scenario: Scenario, mode: &str, scratch: &Path) -> Row {
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
            }) = ask(&self.control, Request::Status, STATUS_ANSWER).await
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
            tokio::task::spawn_blocking(move || control::request(&control, &Request::Stop));
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
async fn ask(path: &Path, request: Request, within: Duration) -> Result<Response, String> {
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

/// Notes are table cells: one line, not endless.
fn one_line(text: &impl ToString) -> String {
    const MAX_CHARS: usize = 300;
    let text = text.to_string();
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > MAX_CHARS {
        let cut: String = flat.chars().take(MAX_CHARS).collect();
        format!("{cut}…")
    } else {
        flat
    }
}

// ---- rendering ----

/// The table's columns, for text and Markdown.
const COLUMNS: &[&str] = &[
    "scenario", "mode", "requests", "req/s", "conn/s", "p50 ms", "p99 ms", "max ms", "errors",
    "timeouts", "max/min", "Jain", "RSS MiB", "note",
];

/// Columns whose cells are words, left-aligned; the others are numbers.
fn is_text_column(index: usize) -> bool {
    matches!(COLUMNS[index], "scenario" | "mode" | "note")
}

/// The human-readable cells of one row, in [`COLUMNS`] order.
fn cells(row: &Row) -> Vec<String> {
    let dash = || "-".to_string();
    let ms = |us: u64| format!("{:.2}", us as f64 / 1000.0);
    let note = row.note.clone().unwrap_or_default();
    let Some(bench) = &row.bench else {
        let mut cells = vec![row.scenario.name().to_string(), row.mode.clone()];
        cells.extend((2..COLUMNS.len() - 1).map(|_| dash()));
        cells.push(note);
        return cells;
    };
    let latency = |pick: fn(&bench::Latency) -> u64| {
        bench.latency.as_ref().map_or_else(dash, |l| ms(pick(l)))
    };
    vec![
        row.scenario.name().to_string(),
        row.mode.clone(),
        bench.requests.to_string(),
        format!("{:.0}", bench.requests_per_sec),
        format!("{:.0}", bench.connections_per_sec),
        latency(|l| l.p50_us),
        latency(|l| l.p99_us),
        latency(|l| l.max_us),
        bench.errors.to_string(),
        row.timeouts().unwrap_or(0).to_string(),
        row.fairness
            .and_then(|f| f.max_min_ratio)
            .map_or_else(dash, |r| format!("{r:.2}")),
        row.fairness
            .map_or_else(dash, |f| format!("{:.3}", f.jain_index)),
        row.primary_rss_bytes
            .map_or_else(dash, |b| format!("{:.1}", b as f64 / 1_048_576.0)),
        note,
    ]
}

/// The side-by-side table for a terminal: aligned columns, one row per
/// scenario and mode, a blank line between scenarios.
pub fn render_table(report: &CompareReport) -> String {
    let rows: Vec<Vec<String>> = report.rows.iter().map(cells).collect();
    let mut widths: Vec<usize> = COLUMNS.iter().map(|c| c.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let last = i == cells.len() - 1;
            let pad = widths[i].saturating_sub(cell.chars().count());
            if last {
                out.push_str(cell);
            } else if is_text_column(i) {
                out.push_str(cell);
                out.push_str(&" ".repeat(pad + 2));
            } else {
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
                out.push_str("  ");
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let header: Vec<String> = COLUMNS.iter().map(|c| c.to_string()).collect();
    let mut out = line(&header);
    let mut previous: Option<Scenario> = None;
    for (row, cells) in report.rows.iter().zip(&rows) {
        if previous.is_some_and(|p| p != row.scenario) {
            out.push('\n');
        }
        previous = Some(row.scenario);
        out.push_str(&line(cells));
    }
    out
}

/// `compare.md`: the command that produced it, the load, the scenarios and
/// the table.
pub fn render_markdown(report: &CompareReport, invocation: &str) -> String {
    let mut out = String::from("# herd compare\n\n");
    let _ = writeln!(out, "```\n{invocation}\n```\n");
    let _ = writeln!(out, "Each run: {}.\n", report.summary());
    for scenario in &report.scenarios {
        let _ = writeln!(out, "- `{}`: {}.", scenario.name(), scenario.describe());
    }
    out.push('\n');
    let escape = |cell: &str| cell.replace('|', "\\|");
    let _ = writeln!(out, "| {} |", COLUMNS.join(" | "));
    let rule: Vec<&str> = (0..COLUMNS.len())
        .map(|i| if is_text_column(i) { "---" } else { "--:" })
        .collect();
    let _ = writeln!(out, "|{}|", rule.join("|"));
    for row in &report.rows {
        let cells: Vec<String> = cells(row).iter().map(|c| escape(c)).collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out.push_str(
        "\nLatency is of successful requests, from writing the request to the full \
         response. Errors include timeouts. max/min and Jain's index are over every \
         worker herd had when the load began. RSS is herd's primary after the load.\n",
    );
    out
}

/// The CSV header: raw units (microseconds, bytes), for spreadsheets.
pub const CSV_HEADER: &str = "scenario,mode,requests,succeeded,errors,timeouts,\
requests_per_sec,connections_per_sec,p50_us,p99_us,max_us,max_min_ratio,jain_index,\
primary_rss_bytes,note";

/// `compare.csv`: one line per row, empty fields where nothing was measured.
pub fn render_csv(report: &CompareReport) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for row in &report.rows {
        let opt = |v: Option<String>| v.unwrap_or_default();
        let bench = row.bench.as_ref();
        let latency = bench.and_then(|b| b.latency);
        let fields = [
            row.scenario.name().to_string(),
            row.mode.clone(),
            opt(bench.map(|b| b.requests.to_string())),
            opt(bench.map(|b| b.succeeded.to_string())),
            opt(bench.map(|b| b.errors.to_string())),
            opt(row.timeouts().map(|n| n.to_string())),
            opt(bench.map(|b| format!("{:.1}", b.requests_per_sec))),
            opt(bench.map(|b| format!("{:.1}", b.connections_per_sec))),
            opt(latency.map(|l| l.p50_us.to_string())),
            opt(latency.map(|l| l.p99_us.to_string())),
            opt(latency.map(|l| l.max_us.to_string())),
            opt(row
                .fairness
                .and_then(|f| f.max_min_ratio)
                .map(|r| format!("{r:.3}"))),
            opt(row.fairness.map(|f| format!("{:.4}", f.jain_index))),
            opt(row.primary_rss_bytes.map(|b| b.to_string())),
            row.note.clone().unwrap_or_default(),
        ];
        let fields: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

/// Quotes a CSV field when it holds a comma, quote or line break (RFC 4180).
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// Bar colours, one per mode in order (repeating past seven).
const PALETTE: &[&str] = &[
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1",
];

/// `compare.svg`: two grouped bar charts, requests/s and p99 latency, with a
/// group per scenario and a bar per mode. Plain SVG text, no dependencies.
pub fn render_svg(report: &CompareReport) -> String {
    const WIDTH: f64 = 760.0;
    const PANEL: f64 = 250.0;
    const LEGEND: f64 = 40.0;
    let height = 2.0 * PANEL + LEGEND;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         viewBox=\"0 0 {WIDTH} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (index, panel) in PANELS.iter().enumerate() {
        bar_panel(&mut svg, report, panel, index as f64 * PANEL, WIDTH, PANEL);
    }
    // Legend: one swatch per mode.
    let mut x = 60.0;
    let y = 2.0 * PANEL + 15.0;
    for (i, mode) in report.modes.iter().enumerate() {
        let _ = writeln!(
            svg,
            "<rect x=\"{x}\" y=\"{y}\" width=\"12\" height=\"12\" fill=\"{}\"/>\
             <text x=\"{}\" y=\"{}\">{}</text>",
            PALETTE[i % PALETTE.len()],
            x + 16.0,
            y + 10.5,
            xml_escape(mode)
        );
        x += 30.0 + 7.0 * mode.chars().count() as f64;
    }
    svg.push_str("</svg>\n");
    svg
}

/// One bar chart of the SVG: which number of a row, and how to print it.
struct Panel {
    title: &'static str,
    value: fn(&Row) -> Option<f64>,
    label: fn(f64) -> String,
}

const PANELS: [Panel; 2] = [
    Panel {
        title: "requests/s (higher is better)",
        value: |row| row.bench.as_ref().map(|b| b.requests_per_sec),
        label: |v| format!("{v:.0}"),
    },
    Panel {
        title: "p99 latency, ms (lower is better)",
        value: |row| {
            row.bench
                .as_ref()
                .and_then(|b| b.latency)
                .map(|l| l.p99_us as f64 / 1000.0)
        },
        label: |v| format!("{v:.2}"),
    },
];

/// One grouped bar chart at vertical offset `top`.
fn bar_panel(
    svg: &mut String,
    report: &CompareReport,
    panel: &Panel,
    top: f64,
    width: f64,
    height: f64,
) {
    let Panel {
        title,
        value,
        label,
    } = *panel;
    let (left, right) = (60.0, width - 20.0);
    let (plot_top, plot_bottom) = (top + 40.0, top + height - 30.0);
    let max = report.rows.iter().filter_map(value).fold(0.0_f64, f64::max);
    let scale = if max > 0.0 { max } else { 1.0 };
    let _ = writeln!(
        svg,
        "<text x=\"{left}\" y=\"{}\" font-size=\"14\" font-weight=\"bold\">{}</text>",
        top + 22.0,
        xml_escape(title)
    );
    let _ = writeln!(
        svg,
        "<line x1=\"{left}\" y1=\"{plot_top}\" x2=\"{left}\" y2=\"{plot_bottom}\" stroke=\"#444\"/>\
         <line x1=\"{left}\" y1=\"{plot_bottom}\" x2=\"{right}\" y2=\"{plot_bottom}\" stroke=\"#444\"/>\
         <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\
         <text x=\"{}\" y=\"{plot_bottom}\" text-anchor=\"end\">0</text>",
        left - 4.0,
        plot_top + 4.0,
        xml_escape(&label(max)),
        left - 4.0,
    );
    let groups = report.scenarios.len().max(1) as f64;
    let bars = report.modes.len().max(1) as f64;
    let group_width = (right - left) / groups;
    let bar_width = group_width * 0.8 / bars;
    for (g, scenario) in report.scenarios.iter().enumerate() {
        let group_left = left + g as f64 * group_width + group_width * 0.1;
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            group_left + group_width * 0.4,
            plot_bottom + 18.0,
            scenario.name()
        );
        for (b, mode) in report.modes.iter().enumerate() {
            let x = group_left + b as f64 * bar_width;
            let center = x + bar_width / 2.0;
            let row = report
                .rows
                .iter()
                .find(|r| r.scenario == *scenario && &r.mode == mode);
            match row.and_then(value) {
                Some(v) => {
                    let h = (v / scale) * (plot_bottom - plot_top);
                    let _ = writeln!(
                        svg,
                        "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\">\
                         <title>{} {}: {}</title></rect>\
                         <text x=\"{center:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{}</text>",
                        plot_bottom - h,
                        (bar_width - 2.0).max(1.0),
                        PALETTE[b % PALETTE.len()],
                        scenario.name(),
                        xml_escape(mode),
                        xml_escape(&label(v)),
                        plot_bottom - h - 3.0,
                        xml_escape(&label(v)),
                    );
                }
                None => {
                    let _ = writeln!(
                        svg,
                        "<text x=\"{center:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\" \
                         fill=\"#888\">n/a</text>",
                        plot_bottom - 3.0
                    );
                }
            }
        }
    }
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The command line as one shell-pasteable string (arguments with spaces or
/// shell characters are single-quoted).
pub fn command_line(args: &[String]) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./:=,@%+".contains(c);
    args.iter()
        .map(|a| {
            if !a.is_empty() && a.chars().all(plain) {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Writes `compare.md`, `compare.csv` and `compare.svg` into `dir` (created
/// if missing); returns their paths.
pub fn write_files(
    report: &CompareReport,
    dir: &Path,
    invocation: &str,
) -> Result<Vec<PathBuf>, CompareError> {
    std::fs::create_dir_all(dir).map_err(|source| CompareError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let files = [
        ("compare.md", render_markdown(report, invocation)),
        ("compare.csv", render_csv(report)),
        ("compare.svg", render_svg(report)),
    ];
    let mut written = Vec::new();
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|source| CompareError::Write {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}

fn human_secs(secs: f64) -> String {
    if secs < 1.0 {
        format!("{:.0} ms", secs * 1000.0)
    } else {
        format!("{secs:.2} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{Latency, WorkerShare};

    fn options() -> CompareOptions {
        CompareOptions {
            herd: PathBuf::from("herd"),
            modes: vec!["round-robin".into(), "sticky".into()],
            scenarios: vec![Scenario::Uniform, Scenario::Stalled],
            workers: 2,
            connections: 4,
            limit: Limit::Duration(Duration::from_secs(1)),
            timeout: Duration::from_millis(250),
            source_range: None,
            command: vec!["worker".into()],
        }
    }

    fn bench_report(requests: u64, timeouts: u64, p99_us: u64) -> BenchReport {
        let mut errors_by_kind = BTreeMap::new();
        if timeouts > 0 {
            errors_by_kind.insert("timeout".to_string(), timeouts);
        }
        BenchReport {
            target: "http://127.0.0.1:1/".into(),
            mode: "keep-alive",
            connections: 4,
            requests_limit: None,
            duration_limit_secs: Some(1.0),
            requests,
            succeeded: requests - timeouts,
            errors: timeouts,
            errors_by_kind,
            duration_secs: 1.0,
            requests_per_sec: requests as f64,
            connections_opened: 4,
            connections_per_sec: 4.0,
            latency: Some(Latency {
                p50_us: 400,
                p90_us: 800,
                p99_us,
                max_us: p99_us * 2,
            }),
            workers: vec![WorkerShare {
                pid: 10,
                count: requests - timeouts,
                share_percent: 100.0,
            }],
            fairness: None,
        }
    }

    fn report() -> CompareReport {
        let measured = |scenario, mode: &str, requests, timeouts, p99| Row {
            scenario,
            mode: mode.into(),
            bench: Some(bench_report(requests, timeouts, p99)),
            fairness: fairness(&[600, 400]),
            primary_rss_bytes: Some(8 << 20),
            note: None,
        };
        CompareReport {
            command: vec!["worker".into(), "--flag".into()],
            workers: 2,
            connections: 4,
            duration_secs: Some(1.0),
            requests: None,
            timeout_secs: 0.25,
            scenarios: vec![Scenario::Uniform, Scenario::Stalled],
            modes: vec!["round-robin".into(), "shared".into()],
            rows: vec![
                measured(Scenario::Uniform, "round-robin", 1000, 0, 1500),
                Row::failed(
                    Scenario::Uniform,
                    "shared",
                    "herd exited (exit status: 2): invalid `mode` = \"shared\", | bad".into(),
                ),
                measured(Scenario::Stalled, "round-robin", 500, 7, 250_000),
                Row::failed(Scenario::Stalled, "shared", "no\nsuch mode".into()),
            ],
        }
    }

    #[test]
    fn options_name_what_is_wrong() {
        assert!(options().validate().is_ok());
        let error = |f: &dyn Fn(&mut CompareOptions)| {
            let mut o = options();
            f(&mut o);
            o.validate().unwrap_err().to_string()
        };
        let e = error(&|o| o.modes = vec!["fastest".into()]);
        assert!(e.contains("\"fastest\"") && e.contains("reuseport"), "{e}");
        assert!(error(&|o| o.modes.push("sticky".into())).contains("twice"));
        assert!(error(&|o| o.modes.clear()).contains("empty"));
        assert!(error(&|o| o.workers = 1).contains("stalled"));
        assert!(error(&|o| o.workers = 0).contains("--workers"));
        assert!(error(&|o| o.timeout = Duration::from_secs(1)).contains("shorter"));
        assert!(error(&|o| o.command.clear()).contains("worker command"));
        assert!(error(&|o| o.connections = 0).contains("--connections"));
        // Shared and reuseport are accepted here even if this build's herd refuses them.
        let mut all = options();
        all.modes = MODES.iter().map(|m| m.to_string()).collect();
        assert!(all.validate().is_ok());
        // Without the stalled scenario, one worker and a long timeout are fine.
        let mut uniform = options();
        uniform.scenarios = vec![Scenario::Uniform];
        uniform.workers = 1;
        uniform.timeout = Duration::from_secs(5);
        assert!(uniform.validate().is_ok());
    }

    #[test]
    fn scenarios_parse_by_name() {
        for name in Scenario::NAMES {
            assert_eq!(Scenario::parse(name).unwrap().name(), *name);
        }
        let e = Scenario::parse("slow").unwrap_err().to_string();
        assert!(e.contains("\"slow\"") && e.contains("uniform"), "{e}");
    }

    #[test]
    fn default_timeout_is_a_quarter_of_the_run_at_most_a_second() {
        let d = |ms| default_timeout(Limit::Duration(Duration::from_millis(ms)));
        assert_eq!(d(500), Duration::from_millis(125));
        assert_eq!(d(3000), Duration::from_millis(750));
        assert_eq!(d(60_000), Duration::from_secs(1));
        assert_eq!(default_timeout(Limit::Requests(10)), Duration::from_secs(1));
    }

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
    fn table_has_a_row_per_scenario_and_mode() {
        let text = render_table(&report());
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("scenario") && lines[0].contains("p99 ms"));
        assert!(lines[1].starts_with("uniform   round-robin"), "{text}");
        assert!(
            lines[1].contains("1.50") && lines[1].contains("0.962"),
            "{text}"
        );
        assert!(lines[2].contains("invalid `mode`"), "{text}");
        assert_eq!(lines[3], "", "a blank line between scenarios: {text}");
        assert!(
            lines[4].contains("250.00") && lines[4].contains(" 7 "),
            "{text}"
        );
        assert!(lines[5].ends_with("no such mode"), "{text}");
        // Numbers line up on the right edge of their column.
        let p99 = |line: &str| line.find("p99 ms").map(|i| i + "p99 ms".len());
        let end = p99(lines[0]).unwrap();
        assert_eq!(&lines[1][end - 4..end], "1.50", "{text}");
    }

    #[test]
    fn markdown_has_the_command_and_an_escaped_table() {
        let md = render_markdown(&report(), "herd compare -- worker");
        assert!(md.contains("```\nherd compare -- worker\n```"));
        assert!(md.contains("- `stalled`: "));
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with('|')).collect();
        assert_eq!(rows.len(), 2 + 4, "{md}");
        let columns = |l: &str| l.replace("\\|", "").matches('|').count();
        assert!(rows.iter().all(|r| columns(r) == COLUMNS.len() + 1), "{md}");
        assert!(rows[3].contains("\\| bad"), "{md}");
    }

    #[test]
    fn csv_quotes_notes_and_leaves_gaps_empty() {
        let csv = render_csv(&report());
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], CSV_HEADER);
        assert_eq!(lines.len(), 5);
        assert!(lines[1].starts_with(
            "uniform,round-robin,1000,1000,0,0,1000.0,4.0,400,1500,3000,1.500,0.9615,8388608,"
        ));
        assert!(
            lines[2].starts_with("uniform,shared,,,,,,,,,,,,,\"herd exited"),
            "{csv}"
        );
        assert!(lines[2].contains("\"\"shared\"\""), "{csv}");
        assert!(
            lines[3].starts_with("stalled,round-robin,500,493,7,7,"),
            "{csv}"
        );
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("plain"), "plain");
    }

    #[test]
    fn svg_is_one_element_with_a_bar_per_measurement() {
        let svg = render_svg(&report());
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        // Two panels × two measured rows; the failed rows show n/a.
        assert_eq!(svg.matches("<title>").count(), 4, "{svg}");
        assert_eq!(svg.matches(">n/a<").count(), 4, "{svg}");
        assert!(svg.contains(">round-robin</text>") && svg.contains(">shared</text>"));
        // Balanced tags.
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
        assert_eq!(
            svg.matches("<title>").count(),
            svg.matches("</title>").count()
        );
        assert_eq!(
            svg.matches("<rect").count(),
            svg.matches("</rect>").count() + svg.matches("\"/>").count()
                - svg.matches("<line").count()
        );
        assert_eq!(xml_escape("a<b & \"c\">"), "a&lt;b &amp; &quot;c&quot;&gt;");
    }

    #[test]
    fn command_lines_quote_what_a_shell_would_split() {
        let args: Vec<String> = [
            "herd",
            "compare",
            "--modes",
            "a,b",
            "--",
            "w",
            "two words",
            "it's",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            command_line(&args),
            "herd compare --modes a,b -- w 'two words' 'it'\\''s'"
        );
        assert_eq!(command_line(&["".to_string()]), "''");
    }

    #[test]
    fn process_states_from_stat() {
        assert_eq!(parse_state("42 (a (b) c) T 1 42"), Some('T'));
        assert_eq!(parse_state("42 (w) S 1"), Some('S'));
        assert_eq!(parse_state("garbage"), None);
        assert!(matches!(process_state(std::process::id()), Some('R' | 'S')));
    }

    #[test]
    fn notes_are_one_bounded_line() {
        assert_eq!(one_line(&"a\n  b\tc"), "a b c");
        let long = "x".repeat(1000);
        assert_eq!(one_line(&long).chars().count(), 301);
    }
}
