//! Configuration: the TOML file, command-line overrides, and validation.
//!
//! Owns turning what the user wrote into [`Settings`], the typed values the
//! rest of herd runs on. The file is parsed into [`Config`] (serde, unknown
//! keys refused), command-line flags are merged over it ([`Overrides`]), and
//! [`Config::validate`] checks every value, naming the key, the value and the
//! reason for anything it refuses. The repository's `config.toml` documents
//! every key.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::dispatch::Mode;

/// The most worker slots herd runs; fixed so per-slot state can live in arrays.
pub const MAX_WORKERS: usize = 1024;

/// Where the control socket lives unless configured.
pub const DEFAULT_CONTROL_PATH: &str = "herd.sock";

/// The config file `herd run` reads when no `-c` is given.
pub const DEFAULT_CONFIG_PATH: &str = "config.toml";

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid `{key}` = {value}: {reason}")]
    Invalid {
        key: String,
        value: String,
        reason: String,
    },
}

fn invalid(key: &str, value: impl fmt::Display, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// `workers = 4` or `workers = "max"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum WorkerCount {
    Count(i64),
    Named(String),
}

/// The config file as written. Values stay loosely typed here so that
/// [`Config::validate`] can say exactly what is wrong with them.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Addresses to accept connections on, e.g. `127.0.0.1:3000`, `[::]:8080`.
    pub listen: Vec<String>,
    /// Kernel accept-queue length per listener.
    pub backlog: i64,
    /// Number of worker processes, or "max" for one per available core.
    pub workers: WorkerCount,
    /// Dispatch policy: "round-robin", "sticky" or "least-conn".
    pub mode: String,
    /// The worker program and its arguments.
    pub command: Vec<String>,
    /// What workers speak on their channel: "herd", "node-cluster", or
    /// "auto" (node-cluster when the program is `node` or `nodejs`).
    pub protocol: String,
    /// How round-robin deals connections to Node cluster workers: "kernel"
    /// (an eBPF program deals them over per-worker sockets), "handoff" (herd
    /// accepts each and sends it over the cluster channel), or "auto"
    /// (kernel for Node workers, falling back to handoff where the kernel
    /// refuses the program).
    pub rotation: String,
    /// Extra environment for workers.
    pub env: BTreeMap<String, String>,
    /// Working directory for workers (default: herd's).
    pub cwd: Option<String>,
    /// How long workers get to finish when herd stops, before SIGKILL.
    pub shutdown_timeout: String,
    /// A worker that is not ready this long after it started is killed (a failed start).
    pub ready_timeout: String,
    /// For workers that never send READY: count them ready this long after start.
    pub ready_delay: Option<String>,
    /// A worker whose oldest unacknowledged hand-off is older than this is
    /// hung: its connections go to other workers, it is killed and
    /// replaced. "0s" turns it off.
    pub hang_timeout: String,
    /// What a worker's processes are: "control-group" (a cgroup v2 leaf per
    /// worker, which also holds helpers that left its process group),
    /// "process-group", or "auto" (control-group where herd can create
    /// cgroups, else process-group).
    pub kill_mode: String,
    /// Slots replaced at a time during a rolling reload.
    pub reload_batch: i64,
    /// Replace a worker (gracefully) once its resident memory exceeds this, e.g. "512MiB".
    pub max_memory: Option<String>,
    /// Replace a worker (gracefully) after it has taken this many connections.
    pub max_connections_per_worker: Option<i64>,
    /// Up to this many extra connections, chosen at random per worker, so recycles don't align.
    pub max_connections_jitter: i64,
    /// Run workers as this user (herd itself binds as the user that started it).
    pub user: Option<String>,
    /// Run workers as this group (default: the user's primary group).
    pub group: Option<String>,
    /// Path of the control socket that `herd status`, `reload`, `scale` and `stop` talk to.
    pub control: String,
    /// How often worker memory and CPU are sampled.
    pub monitor_interval: String,
    pub handoff: HandoffConfig,
    pub restart: RestartConfig,
    pub metrics: MetricsConfig,
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics` here: "IP:PORT", or just "PORT" for 127.0.0.1. Unset: no endpoint.
    pub address: Option<String>,
}

/// `[handoff]`: bounds on the accept → worker path.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HandoffConfig {
    /// Connections sent to one worker and not yet acknowledged, before it is skipped.
    pub max_unacked: i64,
    /// A worker whose oldest unacknowledged connection is older than this is skipped.
    pub ack_timeout: String,
    /// Accepted connections waiting for a worker, before new ones are closed.
    pub queue_limit: i64,
    /// A connection that waited this long for a worker is closed.
    pub queue_timeout: String,
}

/// `[restart]`: how a slot whose worker exited is refilled.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RestartConfig {
    /// Delay before the first restart; doubles per consecutive failed start.
    pub backoff_base: String,
    /// Upper bound of the restart delay.
    pub backoff_max: String,
    /// A worker that ran this long counts as a good start and resets the backoff.
    pub min_uptime: String,
    /// More failed starts than this within `window` mark the slot crash-looping.
    pub max_restarts: i64,
    pub window: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: Vec::new(),
            backlog: 511,
            workers: WorkerCount::Named("max".into()),
            mode: Mode::RoundRobin.name().into(),
            protocol: "auto".into(),
            rotation: "auto".into(),
            command: Vec::new(),
            env: BTreeMap::new(),
            cwd: None,
            shutdown_timeout: "10s".into(),
            ready_timeout: "30s".into(),
            ready_delay: None,
            hang_timeout: "30s".into(),
            kill_mode: "auto".into(),
            reload_batch: 1,
            max_memory: None,
            max_connections_per_worker: None,
            max_connections_jitter: 0,
            user: None,
            group: None,
            control: DEFAULT_CONTROL_PATH.into(),
            monitor_interval: "1s".into(),
            handoff: HandoffConfig::default(),
            restart: RestartConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

impl Default for HandoffConfig {
    fn default() -> Self {
        HandoffConfig {
            max_unacked: 64,
            ack_timeout: "1s".into(),
            queue_limit: 1024,
            queue_timeout: "10s".into(),
        }
    }
}

impl Default for RestartConfig {
    fn default() -> Self {
        RestartConfig {
            backoff_base: "100ms".into(),
            backoff_max: "10s".into(),
            min_uptime: "5s".into(),
            max_restarts: 10,
            window: "60s".into(),
        }
    }
}

/// Values given on the command line; each replaces the file's value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Vec<String>,
    pub workers: Option<String>,
    pub mode: Option<String>,
    pub rotation: Option<String>,
    pub backlog: Option<i64>,
    pub command: Vec<String>,
    pub max_unacked: Option<i64>,
    pub queue_limit: Option<i64>,
    pub ready_delay: Option<String>,
    pub control: Option<String>,
    pub metrics: Option<String>,
}

/// Where settings come from: the config file (re-read on every reload) and
/// the command-line flags merged over it.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    pub path: Option<PathBuf>,
    pub overrides: Overrides,
}

impl ConfigSource {
    pub fn load(&self) -> Result<Settings, ConfigError> {
        let mut config = Config::load(self.path.as_deref())?;
        config.apply(self.overrides.clone());
        config.validate()
    }
}

/// Validated, typed settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: Vec<SocketAddr>,
    pub backlog: u32,
    pub workers: usize,
    pub mode: Mode,
    /// The worker program, resolved (PATH searched) and checked executable.
    pub program: PathBuf,
    /// Arguments after the program.
    pub args: Vec<String>,
    pub protocol: WorkerProtocol,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<PathBuf>,
    pub shutdown_timeout: Duration,
    pub ready_timeout: Duration,
    pub ready_delay: Option<Duration>,
    /// `None`: hung workers are not looked for.
    pub hang_timeout: Option<Duration>,
    pub kill_mode: KillMode,
    pub reload_batch: usize,
    /// Bytes.
    pub max_memory: Option<u64>,
    pub max_connections_per_worker: Option<u64>,
    pub max_connections_jitter: u64,
    /// (uid, gid) workers run as; `None` = herd's own.
    pub run_as: Option<(u32, u32)>,
    pub control: PathBuf,
    pub monitor_interval: Duration,
    /// Where `/metrics` is served; `None`: not served.
    pub metrics: Option<SocketAddr>,
    pub handoff: HandoffSettings,
    pub restart: RestartSettings,
}

#[derive(Debug, Clone, Copy)]
pub struct HandoffSettings {
    pub max_unacked: usize,
    pub ack_timeout: Duration,
    pub queue_limit: usize,
    pub queue_timeout: Duration,
    /// Round-robin over Node workers is dealt by the kernel (see `rotation`).
    pub kernel_rotation: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct RestartSettings {
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub min_uptime: Duration,
    pub max_restarts: u32,
    pub window: Duration,
}

impl Config {
    /// Reads `path`, or `./config.toml` if `path` is `None` and it exists,
    /// or the built-in defaults otherwise.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let path = match path {
            Some(path) => path,
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => Path::new(DEFAULT_CONFIG_PATH),
            None => return Ok(Config::default()),
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses TOML text; the error names the key and line.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    /// Replaces file values with the ones given on the command line.
    pub fn apply(&mut self, overrides: Overrides) {
        if !overrides.listen.is_empty() {
            self.listen = overrides.listen;
        }
        if let Some(workers) = overrides.workers {
            self.workers = match workers.parse() {
                Ok(n) => WorkerCount::Count(n),
                Err(_) => WorkerCount::Named(workers),
            };
        }
        if let Some(mode) = overrides.mode {
            self.mode = mode;
        }
        if let Some(rotation) = overrides.rotation {
            self.rotation = rotation;
        }
        if let Some(backlog) = overrides.backlog {
            self.backlog = backlog;
        }
        if !overrides.command.is_empty() {
            self.command = overrides.command;
        }
        if let Some(n) = overrides.max_unacked {
            self.handoff.max_unacked = n;
        }
        if let Some(n) = overrides.queue_limit {
            self.handoff.queue_limit = n;
        }
        if let Some(delay) = overrides.ready_delay {
            self.ready_delay = Some(delay);
        }
        if let Some(path) = overrides.control {
            self.control = path;
        }
        if let Some(address) = overrides.metrics {
            self.metrics.address = Some(address);
        }
    }

    /// Checks every value and resolves the worker program.
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        let backlog = in_range("backlog", self.backlog, 1, 65535)? as u32;
        let workers = match &self.workers {
            WorkerCount::Named(name) if name == "max" => available_cores(),
            WorkerCount::Named(name) => {
                return Err(invalid(
                    "workers",
                    format!("{name:?}"),
                    "expected a number from 1 to 1024 or \"max\"",
                ))
            }
            WorkerCount::Count(n) => in_range("workers", *n, 1, MAX_WORKERS as i64)? as usize,
        };
        let mode = self
            .mode
            .parse::<Mode>()
            .map_err(|reason| invalid("mode", format!("{:?}", self.mode), reason))?;
        let cwd = self.cwd.as_ref().map(PathBuf::from);
        if let Some(dir) = &cwd {
            if !dir.is_dir() {
                return Err(invalid("cwd", format!("{dir:?}"), "not a directory"));
            }
        }
        let (program, args) = match self.command.split_first() {
            Some((program, args)) if !program.is_empty() => (program, args.to_vec()),
            _ => return Err(invalid(
                "command",
                format!("{:?}", self.command),
                "no worker program: give `-- PROGRAM ARGS...` or `command = [\"PROGRAM\", ...]`",
            )),
        };
        let program = resolve_program(program, cwd.as_deref())?;
        let protocol = match self.protocol.as_str() {
            "herd" => WorkerProtocol::Herd,
            "node-cluster" => WorkerProtocol::NodeCluster,
            "auto" if is_node(&program) => WorkerProtocol::NodeCluster,
            "auto" => WorkerProtocol::Herd,
            other => {
                return Err(invalid(
                    "protocol",
                    format!("{other:?}"),
                    "expected one of: auto, herd, node-cluster",
                ))
            }
        };
        if protocol == WorkerProtocol::NodeCluster && mode == Mode::ReusePort {
            return Err(invalid(
                "mode",
                format!("{:?}", mode.name()),
                "Node cluster workers run in round-robin, sticky, least-conn or shared mode (Node's cluster protocol has no per-worker sockets)",
            ));
        }
        let kernel_rotation = match self.rotation.as_str() {
            "auto" => protocol == WorkerProtocol::NodeCluster && mode == Mode::RoundRobin,
            "handoff" => false,
            "kernel" if protocol != WorkerProtocol::NodeCluster => {
                return Err(invalid(
                    "rotation",
                    "\"kernel\"",
                    "kernel rotation is for Node cluster workers; herd workers take hand-offs (or run OS-scheduled with --mode reuseport)",
                ))
            }
            "kernel" => mode == Mode::RoundRobin,
            other => {
                return Err(invalid(
                    "rotation",
                    format!("{other:?}"),
                    "expected one of: auto, kernel, handoff",
                ))
            }
        };
        // Node cluster apps say what they listen on, as with Node's primary.
        if self.listen.is_empty() && protocol != WorkerProtocol::NodeCluster {
            return Err(invalid(
                "listen",
                "[]",
                "no address to listen on: give --listen ADDR or `listen = [\"127.0.0.1:3000\"]` (only Node cluster apps may leave it out: herd then binds what they listen on)",
            ));
        }
        let listen = self
            .listen
            .iter()
            .map(|text| {
                text.parse::<SocketAddr>().map_err(|_| {
                    invalid(
                        "listen",
                        format!("{text:?}"),
                        "expected IP:PORT, e.g. 127.0.0.1:3000 or [::1]:3000",
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        for key in self.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(invalid(
                    "env",
                    format!("{key:?}"),
                    "not a valid environment variable name",
                ));
            }
        }
        let handoff = HandoffSettings {
            max_unacked: in_range("handoff.max_unacked", self.handoff.max_unacked, 1, 4096)?
                as usize,
            ack_timeout: duration("handoff.ack_timeout", &self.handoff.ack_timeout)?,
            queue_limit: in_range("handoff.queue_limit", self.handoff.queue_limit, 0, 1 << 20)?
                as usize,
            queue_timeout: duration("handoff.queue_timeout", &self.handoff.queue_timeout)?,
            kernel_rotation,
        };
        let restart = RestartSettings {
            backoff_base: duration("restart.backoff_base", &self.restart.backoff_base)?,
            backoff_max: duration("restart.backoff_max", &self.restart.backoff_max)?,
            min_uptime: duration("restart.min_uptime", &self.restart.min_uptime)?,
            max_restarts: in_range(
                "restart.max_restarts",
                self.restart.max_restarts,
                1,
                1_000_000,
            )? as u32,
            window: duration("restart.window", &self.restart.window)?,
        };
        if restart.backoff_max < restart.backoff_base {
            return Err(invalid(
                "restart.backoff_max",
                format!("{:?}", self.restart.backoff_max),
                format!(
                    "must not be less than restart.backoff_base ({})",
                    self.restart.backoff_base
                ),
            ));
        }
        Ok(Settings {
            listen,
            backlog,
            workers,
            mode,
            program,
            protocol,
            args,
            env: self.env.clone(),
            cwd,
            shutdown_timeout: duration("shutdown_timeout", &self.shutdown_timeout)?,
            ready_timeout: duration("ready_timeout", &self.ready_timeout)?,
            ready_delay: match &self.ready_delay {
                Some(text) => Some(duration("ready_delay", text)?),
                None => None,
            },
            hang_timeout: Some(duration("hang_timeout", &self.hang_timeout)?)
                .filter(|timeout| !timeout.is_zero()),
            kill_mode: match self.kill_mode.as_str() {
                "auto" => KillMode::Auto,
                "control-group" => KillMode::ControlGroup,
                "process-group" => KillMode::ProcessGroup,
                other => {
                    return Err(invalid(
                        "kill_mode",
                        format!("{other:?}"),
                        "expected one of: auto, control-group, process-group",
                    ))
                }
            },
            reload_batch: in_range("reload_batch", self.reload_batch, 1, MAX_WORKERS as i64)?
                as usize,
            max_memory: match &self.max_memory {
                Some(text) => Some(
                    parse_size(text)
                        .map_err(|reason| invalid("max_memory", format!("{text:?}"), reason))?,
                ),
                None => None,
            },
            max_connections_per_worker: match self.max_connections_per_worker {
                Some(n) => Some(in_range("max_connections_per_worker", n, 1, i64::MAX)? as u64),
                None => None,
            },
            max_connections_jitter: in_range(
                "max_connections_jitter",
                self.max_connections_jitter,
                0,
                i64::MAX,
            )? as u64,
            run_as: resolve_user(self.user.as_deref(), self.group.as_deref())?,
            control: PathBuf::from(&self.control),
            monitor_interval: duration("monitor_interval", &self.monitor_interval)?,
            metrics: match &self.metrics.address {
                Some(text) => Some(parse_metrics_address(text)?),
                None => None,
            },
            handoff,
            restart,
        })
    }
}

/// The number of cores herd may use (honours CPU affinity and cgroup limits).
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn in_range(key: &str, value: i64, min: i64, max: i64) -> Result<i64, ConfigError> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(invalid(
            key,
            value,
            format!("must be between {min} and {max}"),
        ))
    }
}

/// Parses "250ms", "10s", "1.5s", "2m", "1h".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or("missing unit: write e.g. \"500ms\", \"10s\", \"2m\"")?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| "expected a number followed by ms, s, m or h".to_string())?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(format!("unknown unit {unit:?}: use ms, s, m or h")),
    };
    if !(0.0..=86_400.0 * 365.0).contains(&seconds) {
        return Err("out of range".into());
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// "IP:PORT", or "PORT" alone for 127.0.0.1: metrics stay on loopback unless asked.
fn parse_metrics_address(text: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse().map_err(|_| {
        invalid(
            "metrics.address",
            format!("{text:?}"),
            "expected IP:PORT (e.g. 127.0.0.1:9464) or a port for 127.0.0.1",
        )
    })
}

/// Parses "512MiB", "1G", "100M", "64KiB" or a plain number of bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| {
        "expected a number of bytes, optionally with K, M, G (or KiB, MiB, GiB)".to_string()
    })?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" | "KiB" => 1 << 10,
        "M" | "MB" | "MiB" => 1 << 20,
        "G" | "GB" | "GiB" => 1 << 30,
        other => return Err(format!("unknown unit {other:?}: use K, M or G")),
    };
    number
        .checked_mul(scale)
        .filter(|&n| n > 0)
        .ok_or_else(|| "out of range".to_string())
}

/// Looks up `user` and `group` (names or numeric ids) for the privilege drop.
fn resolve_user(
    user: Option<&str>,
    group: Option<&str>,
) -> Result<Option<(u32, u32)>, ConfigError> {
    use nix::unistd::{Gid, Group, Uid, User};
    let Some(user_name) = user else {
        return match group {
            Some(group) => Err(invalid(
                "group",
                format!("{group:?}"),
                "set `user` too: herd drops privileges to a user",
            )),
            None => Ok(None),
        };
    };
    let found = match user_name.parse::<u32>() {
        Ok(id) => User::from_uid(Uid::from_raw(id)),
        Err(_) => User::from_name(user_name),
    };
    let user = found.ok().flatten().ok_or_else(|| {
        invalid(
            "user",
            format!("{user_name:?}"),
            "no such user on this host",
        )
    })?;
    let gid = match group {
        None => user.gid,
        Some(group_name) => {
            let found = match group_name.parse::<u32>() {
                Ok(id) => Group::from_gid(Gid::from_raw(id)),
                Err(_) => Group::from_name(group_name),
            };
            found
                .ok()
                .flatten()
                .ok_or_else(|| {
                    invalid(
                        "group",
                        format!("{group_name:?}"),
                        "no such group on this host",
                    )
                })?
                .gid
        }
    };
    Ok(Some((user.uid.as_raw(), gid.as_raw())))
}

fn duration(key: &str, text: &str) -> Result<Duration, ConfigError> {
    parse_duration(text).map_err(|reason| invalid(key, format!("{text:?}"), reason))
}

/// How herd finds every process of a worker, to kill them with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillMode {
    /// A cgroup per worker where herd can create one, else process groups.
    Auto,
    /// A cgroup v2 leaf per worker; herd refuses to start without one.
    ControlGroup,
    /// The worker's process group (and, at stop, everything herd adopted
    /// as the subreaper of its workers' orphans).
    ProcessGroup,
}

impl KillMode {
    pub fn name(self) -> &'static str {
        match self {
            KillMode::Auto => "auto",
            KillMode::ControlGroup => "control-group",
            KillMode::ProcessGroup => "process-group",
        }
    }
}

/// What a worker speaks on its channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerProtocol {
    /// herd's own binary protocol (docs/protocol.md).
    Herd,
    /// Node.js `cluster` IPC: the worker is an unmodified Node cluster app.
    NodeCluster,
}

/// `node` or `nodejs`, however it was found.
fn is_node(program: &Path) -> bool {
    program
        .file_name()
        .is_some_and(|name| name == "node" || name == "nodejs")
}

/// Finds the worker program the way a shell would and checks it can be run.
fn resolve_program(program: &str, cwd: Option<&Path>) -> Result<PathBuf, ConfigError> {
    let not_runnable = |reason: String| invalid("command", format!("{program:?}"), reason);
    let candidate = if program.contains('/') {
        let path = PathBuf::from(program);
        match cwd {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path,
        }
    } else {
        let path_var = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path_var)
            .map(|dir| dir.join(program))
            .find(|path| is_executable_file(path))
            .ok_or_else(|| not_runnable("not found in PATH".into()))?
    };
    match std::fs::metadata(&candidate) {
        Err(e) => Err(not_runnable(format!("{}: {e}", candidate.display()))),
        Ok(meta) if !meta.is_file() => Err(not_runnable(format!(
            "{} is not a file",
            candidate.display()
        ))),
        Ok(_) if !is_executable_file(&candidate) => Err(not_runnable(format!(
            "{} is not executable",
            candidate.display()
        ))),
        Ok(_) => Ok(candidate),
    }
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path)
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> Config {
        Config::parse("listen = [\"127.0.0.1:0\"]\ncommand = [\"true\"]\n").unwrap()
    }

    fn error_of(config: &Config) -> String {
        config.validate().unwrap_err().to_string()
    }

    #[test]
    fn the_repository_config_parses() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml")).unwrap();
        let config = Config::parse(&text).unwrap();
        assert_eq!(config.workers, WorkerCount::Named("max".into()));
        assert_eq!(config.listen, ["127.0.0.1:3000"]);
    }

    #[test]
    fn defaults_fill_what_is_not_written() {
        let settings = minimal().validate().unwrap();
        assert_eq!(settings.workers, available_cores());
        assert_eq!(settings.mode, Mode::RoundRobin);
        assert_eq!(settings.backlog, 511);
        assert_eq!(settings.handoff.max_unacked, 64);
        assert!(settings.program.ends_with("true"));
    }

    #[test]
    fn kernel_rotation_is_for_node_round_robin_and_named_when_misused() {
        let mut config = minimal();
        assert!(!config.validate().unwrap().handoff.kernel_rotation);
        config.protocol = "node-cluster".into();
        assert!(config.validate().unwrap().handoff.kernel_rotation);
        config.mode = "sticky".into();
        assert!(!config.validate().unwrap().handoff.kernel_rotation);
        config.mode = "round-robin".into();
        config.rotation = "handoff".into();
        assert!(!config.validate().unwrap().handoff.kernel_rotation);
        config.rotation = "sideways".into();
        assert_eq!(
            error_of(&config),
            "invalid `rotation` = \"sideways\": expected one of: auto, kernel, handoff"
        );
        config.rotation = "kernel".into();
        config.protocol = "herd".into();
        assert!(error_of(&config).starts_with(
            "invalid `rotation` = \"kernel\": kernel rotation is for Node cluster workers"
        ));
    }

    #[test]
    fn the_worker_protocol_is_detected_or_named() {
        assert_eq!(minimal().validate().unwrap().protocol, WorkerProtocol::Herd);
        let mut config = minimal();
        config.command = vec!["node".into(), "app.js".into()];
        if which_node().is_some() {
            assert_eq!(
                config.validate().unwrap().protocol,
                WorkerProtocol::NodeCluster
            );
            config.mode = "shared".into();
            assert_eq!(config.validate().unwrap().mode, Mode::Shared);
            config.mode = "reuseport".into();
            assert!(error_of(&config).starts_with("invalid `mode` = \"reuseport\": Node cluster"));
        }
        let mut config = minimal();
        config.protocol = "node-cluster".into();
        assert_eq!(
            config.validate().unwrap().protocol,
            WorkerProtocol::NodeCluster
        );
        // Node apps say what they listen on; herd workers must be told.
        config.listen.clear();
        assert!(config.validate().unwrap().listen.is_empty());
        config.protocol = "herd".into();
        assert!(error_of(&config).starts_with("invalid `listen` = []: no address"));
        config.protocol = "grpc".into();
        assert_eq!(
            error_of(&config),
            "invalid `protocol` = \"grpc\": expected one of: auto, herd, node-cluster"
        );
    }

    fn which_node() -> Option<PathBuf> {
        resolve_program("node", None).ok()
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let error = Config::parse("wrokers = 4\n").unwrap_err();
        assert!(error.contains("unknown field `wrokers`"), "{error}");
        let error = Config::parse("[handoff]\nmax_unaked = 4\n").unwrap_err();
        assert!(error.contains("max_unaked"), "{error}");
    }

    #[test]
    fn wrong_types_name_the_key() {
        let error = Config::parse("backlog = \"lots\"\n").unwrap_err();
        assert!(error.contains("backlog"), "{error}");
    }

    #[test]
    fn bad_values_name_key_value_and_reason() {
        let mut config = minimal();
        config.workers = WorkerCount::Count(0);
        assert_eq!(
            error_of(&config),
            "invalid `workers` = 0: must be between 1 and 1024"
        );
        config.workers = WorkerCount::Named("many".into());
        assert!(error_of(&config).starts_with("invalid `workers` = \"many\""));

        let mut config = minimal();
        config.listen = vec!["localhost:80".into()];
        assert!(
            error_of(&config).starts_with("invalid `listen` = \"localhost:80\": expected IP:PORT")
        );

        let mut config = minimal();
        config.mode = "fastest".into();
        assert_eq!(
            error_of(&config),
            "invalid `mode` = \"fastest\": expected one of: round-robin, sticky, least-conn, shared, reuseport"
        );

        let mut config = minimal();
        config.handoff.ack_timeout = "10".into();
        assert!(
            error_of(&config).starts_with("invalid `handoff.ack_timeout` = \"10\": missing unit")
        );
    }

    #[test]
    fn worker_program_must_exist_and_be_executable() {
        let mut config = minimal();
        config.command = vec!["no-such-herd-worker".into()];
        assert_eq!(
            error_of(&config),
            "invalid `command` = \"no-such-herd-worker\": not found in PATH"
        );
        let plain = std::env::temp_dir().join(format!("herd-config-test-{}", std::process::id()));
        std::fs::write(&plain, "not a program").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        config.command = vec![plain.display().to_string()];
        let error = error_of(&config);
        std::fs::remove_file(&plain).unwrap();
        assert!(error.ends_with("is not executable"), "{error}");
        config.command = vec![std::env::temp_dir().display().to_string()];
        assert!(error_of(&config).ends_with("is not a file"));
        config.command = vec![];
        assert!(error_of(&config).starts_with("invalid `command` = []: no worker program"));
    }

    #[test]
    fn overrides_replace_file_values() {
        let mut config = minimal();
        config.apply(Overrides {
            listen: vec!["[::1]:0".into()],
            workers: Some("3".into()),
            mode: Some("sticky".into()),
            command: vec!["sh".into(), "-c".into(), "exit".into()],
            ..Overrides::default()
        });
        let settings = config.validate().unwrap();
        assert_eq!(settings.listen, ["[::1]:0".parse().unwrap()]);
        assert_eq!(settings.workers, 3);
        assert_eq!(settings.mode, Mode::Sticky);
        assert_eq!(settings.args, ["-c", "exit"]);
    }

    #[test]
    fn metrics_address_defaults_to_loopback() {
        let mut config = minimal();
        assert_eq!(config.validate().unwrap().metrics, None);
        config.metrics.address = Some("9464".into());
        assert_eq!(
            config.validate().unwrap().metrics,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        config.metrics.address = Some("[::1]:9000".into());
        assert_eq!(
            config.validate().unwrap().metrics,
            Some("[::1]:9000".parse().unwrap())
        );
        config.metrics.address = Some("everywhere".into());
        assert!(error_of(&config).starts_with("invalid `metrics.address` = \"everywhere\""));
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn users_and_groups_resolve_or_are_refused() {
        let mut config = minimal();
        config.user = Some("root".into());
        assert_eq!(config.validate().unwrap().run_as, Some((0, 0)));
        config.user = Some("no-such-user-herd".into());
        assert_eq!(
            error_of(&config),
            "invalid `user` = \"no-such-user-herd\": no such user on this host"
        );
        config.user = None;
        config.group = Some("root".into());
        assert!(error_of(&config).starts_with("invalid `group`"));
    }

    #[test]
    fn hang_timeout_defaults_to_30s_and_0s_turns_it_off() {
        let mut config = minimal();
        assert_eq!(
            config.validate().unwrap().hang_timeout,
            Some(Duration::from_secs(30))
        );
        config.hang_timeout = "0s".into();
        assert_eq!(config.validate().unwrap().hang_timeout, None);
        config.hang_timeout = "soon".into();
        assert!(error_of(&config).starts_with("invalid `hang_timeout` = \"soon\""));
    }

    #[test]
    fn kill_mode_is_one_of_three_or_named() {
        let mut config = minimal();
        assert_eq!(config.validate().unwrap().kill_mode, KillMode::Auto);
        config.kill_mode = "process-group".into();
        assert_eq!(config.validate().unwrap().kill_mode, KillMode::ProcessGroup);
        config.kill_mode = "control-group".into();
        assert_eq!(config.validate().unwrap().kill_mode, KillMode::ControlGroup);
        config.kill_mode = "process".into();
        assert_eq!(
            error_of(&config),
            "invalid `kill_mode` = \"process\": expected one of: auto, control-group, process-group"
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("s").is_err());
    }
}
