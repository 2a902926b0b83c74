//! `herd compare`: the same load against each dispatch mode, side by side.
//!
//! For every scenario and mode it starts `herd run` as a child process (on
//! 127.0.0.1 port 0 unless given a fixed address, with a private control
//! socket, and the `--ready`, `--stop-signal` and config file it was given),
//! waits through the control socket until every worker is ready, drives one
//! [`bench`](crate::bench) load at the bound address, reads herd's per-slot
//! counts, samples the primary's memory, and stops herd through the control
//! socket again. A mode whose herd does not start, or not in time, becomes a
//! row with a note instead of ending the comparison. The rows render as a
//! text table, Markdown, CSV and a hand-written SVG bar chart.
//!
//! Every wait is bounded: herd's readiness by [`READY_DEADLINE`], its stop by
//! [`STOP_DEADLINE`] (then SIGKILL), each load by the
//! [`bench`](crate::bench) limits.
//!
//! This module owns what a comparison is asked to do ([`CompareOptions`]),
//! what it produces ([`Row`], [`CompareReport`]) and [`run`].
//!
//! # Layout
//! - `scenario`: the [`Scenario`]s, what each load is and does to the workers.
//! - `flags`: what every `herd run` is given, checked up front by herd's own
//!   config readers; the default modes for the worker.
//! - `spread`: a row's spread from the bodies or from herd's per-slot counts.
//! - `run`: one row: starting herd in a mode, polling its status until every
//!   worker is ready, stalling a worker, the load, stopping herd.
//! - `report`: the text table, Markdown, CSV and the files they go to.
//! - `svg`: the bar chart.
//! - `sample` (tests only): a report for the rendering tests.

mod flags;
mod report;
mod run;
#[cfg(test)]
mod sample;
mod scenario;
mod spread;
mod svg;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::bench::{BenchError, BenchOptions, BenchReport, Limit, SourceRange, Target};
use herd::config::MAX_WORKERS;
use herd::status::Fairness;

pub use flags::{PassedOn, DEFAULT_LISTEN, KERNEL};
pub use report::{
    command_line, render_csv, render_markdown, render_table, write_files, CSV_HEADER,
};
pub use run::{READY_DEADLINE, STOP_DEADLINE};
pub use scenario::Scenario;
pub use spread::{spread, SpreadSource, NO_SPREAD};
pub use svg::render_svg;

/// Every mode name `--modes` accepts: herd's modes, then [`KERNEL`]
/// (round-robin dealt by the kernel). A mode whose herd fails to start
/// becomes a row with a note, not the end of the comparison.
pub const MODES: &[&str] = &[
    "round-robin",
    "sticky",
    "least-conn",
    "shared",
    "reuseport",
    KERNEL,
];

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
    /// The worker program and its arguments; empty when the config file
    /// (`passed_on.config`) has the `command`.
    pub command: Vec<String>,
    /// What every `herd run` is given as it was given to `herd compare`.
    pub passed_on: PassedOn,
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
        flags::check(self)?;
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

    /// The modes that can run this worker (see [`MODES`]): every one for
    /// herd-protocol workers; for a server ready by `notify` or a delay,
    /// which cannot take hand-offs, shared, reuseport and kernel; for Node
    /// cluster apps all but reuseport.
    pub fn default_modes(&self) -> Result<Vec<String>, CompareError> {
        Ok(flags::check(self)?.default_modes())
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
    /// Spread over every worker herd had when the load began (one that got
    /// nothing counts as 0, unlike the bench's own fairness over the pids
    /// that answered): of the answers when the bodies name their worker,
    /// else of the connections herd counted per slot.
    pub fairness: Option<Fairness>,
    /// What `fairness` was computed from; `None` when nothing said.
    pub spread_from: Option<SpreadSource>,
    /// Per slot, the connections herd counted during the load (hand-offs,
    /// or what the workers reported accepting); empty when not read.
    pub herd_counts: Vec<u64>,
    /// Resident memory of herd's primary right after the load, in bytes.
    pub primary_rss_bytes: Option<u64>,
    /// CPU time herd's primary used during the load (every thread: user and
    /// system, from /proc at the kernel's 10 ms tick), per connection the
    /// load opened, in microseconds.
    pub primary_cpu_us_per_connection: Option<f64>,
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
            spread_from: None,
            herd_counts: Vec::new(),
            primary_rss_bytes: None,
            primary_cpu_us_per_connection: None,
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
    let checked = flags::check(options)?;
    let scratch = run::Scratch::create()?;
    let mut rows = Vec::new();
    for &scenario in &options.scenarios {
        for mode in &options.modes {
            let row = run::one_row(options, &checked, scenario, mode, &scratch.path).await;
            on_row(&row);
            rows.push(row);
        }
    }
    Ok(CompareReport {
        command: checked.command,
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
            passed_on: PassedOn::default(),
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
        let e = error(&|o| o.passed_on.ready = Some("soon".into()));
        assert!(e.contains("--ready \"soon\""), "{e}");
        let e = error(&|o| o.passed_on.stop_signal = Some("SIGKILL".into()));
        assert!(e.contains("--stop-signal \"SIGKILL\""), "{e}");
        let e = error(&|o| o.passed_on.listen = Some("localhost:80".into()));
        assert!(e.contains("--listen \"localhost:80\""), "{e}");
        let e = error(&|o| o.passed_on.config = Some("/no/such/herd.toml".into()));
        assert!(e.contains("--config /no/such/herd.toml"), "{e}");
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
    fn default_timeout_is_a_quarter_of_the_run_at_most_a_second() {
        let d = |ms| default_timeout(Limit::Duration(Duration::from_millis(ms)));
        assert_eq!(d(500), Duration::from_millis(125));
        assert_eq!(d(3000), Duration::from_millis(750));
        assert_eq!(d(60_000), Duration::from_secs(1));
        assert_eq!(default_timeout(Limit::Requests(10)), Duration::from_secs(1));
    }

    #[test]
    fn notes_are_one_bounded_line() {
        assert_eq!(one_line(&"a\n  b\tc"), "a b c");
        let long = "x".repeat(1000);
        assert_eq!(one_line(&long).chars().count(), 301);
    }
}
