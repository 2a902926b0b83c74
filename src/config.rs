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
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::dispatch::Mode;
use crate::handoff::MAX_LISTENERS;

/// The most worker slots herd runs; fixed so per-slot state can live in arrays.
pub const MAX_WORKERS: usize = 1024;

/// Where the control socket lives unless configured.
pub const DEFAULT_CONTROL_PATH: &str = "herd.sock";

/// The config file `herd run` reads when no `-c` is given.
pub const DEFAULT_CONFIG_PATH: &str = "config.toml";

/// The longest control socket path: `sockaddr_un.sun_path` is 108 bytes on
/// Linux, the last one the closing NUL.
pub const MAX_CONTROL_PATH_LEN: usize = 107;

/// The shortest `monitor_interval`: each tick reads `/proc` for every
/// worker (and reaps) on the main thread, which also decides every
/// supervision step; tokio's interval panics on zero.
pub const MIN_MONITOR_INTERVAL: Duration = Duration::from_millis(10);

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
    /// Who workers run as; `None` = as herd.
    pub run_as: Option<RunAs>,
    pub control: PathBuf,
    pub monitor_interval: Duration,
    /// Where `/metrics` is served; `None`: not served.
    pub metrics: Option<SocketAddr>,
    pub handoff: HandoffSettings,
    pub restart: RestartSettings,
}

impl Settings {
    /// The keys `new` changes that only a restart of herd can apply, each as
    /// ``"`key` (old -> new)"``; empty when a reload can apply all of `new`.
    ///
    /// A reload starts new workers, so everything herd reads when it starts
    /// a worker applies (`command`, `env`, `cwd`, `user`, `group`, the
    /// timeouts, `max_*`, `restart.*`, `workers`, `reload_batch`), and the
    /// `[handoff]` limits are handed to the hand-off loop. What herd set up
    /// once at start does not: the listeners (`listen`, `backlog`), how they
    /// are served (`mode`, `protocol`, `rotation`), where workers' processes
    /// are kept (`kill_mode`), the control socket, the metrics endpoint, and
    /// the monitor's timer.
    pub fn restart_needed(&self, new: &Settings) -> Vec<String> {
        fn addrs(list: &[SocketAddr]) -> String {
            let list: Vec<String> = list.iter().map(ToString::to_string).collect();
            format!("[{}]", list.join(", "))
        }
        fn rotation(kernel: bool) -> &'static str {
            if kernel {
                "kernel"
            } else {
                "handoff"
            }
        }
        let metrics = |addr: Option<SocketAddr>| addr.map_or("none".to_string(), |a| a.to_string());
        let mut changed = Vec::new();
        let mut compare = |key: &str, old: String, new: String| {
            if old != new {
                changed.push(format!("`{key}` ({old} -> {new})"));
            }
        };
        compare("listen", addrs(&self.listen), addrs(&new.listen));
        compare("backlog", self.backlog.to_string(), new.backlog.to_string());
        compare("mode", self.mode.name().into(), new.mode.name().into());
        compare(
            "protocol",
            self.protocol.name().into(),
            new.protocol.name().into(),
        );
        // `rotation` follows from mode and protocol too: named only when it is the change.
        if self.mode == new.mode && self.protocol == new.protocol {
            compare(
                "rotation",
                rotation(self.handoff.kernel_rotation).into(),
                rotation(new.handoff.kernel_rotation).into(),
            );
        }
        compare(
            "kill_mode",
            self.kill_mode.name().into(),
            new.kill_mode.name().into(),
        );
        compare(
            "control",
            self.control.display().to_string(),
            new.control.display().to_string(),
        );
        compare(
            "metrics.address",
            metrics(self.metrics),
            metrics(new.metrics),
        );
        compare(
            "monitor_interval",
            format!("{:?}", self.monitor_interval),
            format!("{:?}", new.monitor_interval),
        );
        changed
    }
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
        let run_as = resolve_user(self.user.as_deref(), self.group.as_deref())?;
        // Paths are checked as the workers will use them: as their user.
        let identity = match &run_as {
            Some(user) => user.identity(),
            None => herds_identity(),
        };
        let cwd = self.cwd.as_ref().map(PathBuf::from);
        if let Some(dir) = &cwd {
            let value = format!("{:?}", dir.display().to_string());
            if dir.as_os_str().as_encoded_bytes().contains(&0) {
                return Err(invalid("cwd", value, "contains a NUL byte"));
            }
            if !dir.is_dir() {
                return Err(invalid("cwd", value, "not a directory"));
            }
            // The worker must be able to stay in it: search on the way and on it.
            identity
                .can_enter(dir)
                .map_err(|reason| invalid("cwd", value, reason))?;
        }
        let (program, args) = match self.command.split_first() {
            Some((program, args)) if !program.is_empty() => (program, args.to_vec()),
            _ => return Err(invalid(
                "command",
                format!("{:?}", self.command),
                "no worker program: give `-- PROGRAM ARGS...` or `command = [\"PROGRAM\", ...]`",
            )),
        };
        if let Some(index) = self.command.iter().position(|arg| arg.contains('\0')) {
            return Err(invalid(
                "command",
                format!("{:?}", self.command),
                format!("argument {index} contains a NUL byte"),
            ));
        }
        let program = resolve_program(program, cwd.as_deref(), &identity)?;
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
        if !mode.hands_off() && protocol == WorkerProtocol::Herd {
            if let Some(user) = run_as.as_ref().filter(|user| !user.is_herds_own()) {
                shim_runnable_by(user, mode)?;
            }
        }
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
        if listen.len() > MAX_LISTENERS {
            return Err(invalid(
                "listen",
                format!("[{} addresses]", listen.len()),
                format!("herd holds at most {MAX_LISTENERS} listeners"),
            ));
        }
        for (index, addr) in listen.iter().enumerate() {
            if let Some(earlier) = listen[..index].iter().find(|a| overlaps(**a, *addr)) {
                return Err(invalid(
                    "listen",
                    format!("{:?}", addr.to_string()),
                    format!(
                        "overlaps {:?}: the second bind would fail as a busy port",
                        earlier.to_string()
                    ),
                ));
            }
        }
        for (key, value) in &self.env {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(invalid(
                    "env",
                    format!("{key:?}"),
                    "not a valid environment variable name",
                ));
            }
            if value.contains('\0') {
                return Err(invalid(
                    &format!("env.{key}"),
                    format!("{value:?}"),
                    "contains a NUL byte, which no environment variable can hold",
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
        if restart.backoff_base.is_zero() {
            return Err(invalid(
                "restart.backoff_base",
                format!("{:?}", self.restart.backoff_base),
                "must be more than 0s: a crash-looping worker would be restarted without a pause",
            ));
        }
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
        let ready_timeout = duration("ready_timeout", &self.ready_timeout)?;
        if ready_timeout.is_zero() {
            return Err(invalid(
                "ready_timeout",
                format!("{:?}", self.ready_timeout),
                "must be more than 0s: every worker would be killed as it starts",
            ));
        }
        let ready_delay = match &self.ready_delay {
            Some(text) => Some(duration("ready_delay", text)?),
            None => None,
        };
        if let (Some(delay), Some(text)) = (ready_delay, &self.ready_delay) {
            if delay >= ready_timeout {
                return Err(invalid(
                    "ready_delay",
                    format!("{text:?}"),
                    format!(
                        "must be shorter than `ready_timeout` ({}): a worker that never says READY would be killed before it counts as ready",
                        self.ready_timeout
                    ),
                ));
            }
        }
        let monitor_interval = duration("monitor_interval", &self.monitor_interval)?;
        if monitor_interval < MIN_MONITOR_INTERVAL {
            return Err(invalid(
                "monitor_interval",
                format!("{:?}", self.monitor_interval),
                format!(
                    "must be at least {MIN_MONITOR_INTERVAL:?}: each tick reads /proc for every worker on herd's main thread"
                ),
            ));
        }
        let control = control_path(&self.control)?;
        let metrics = match &self.metrics.address {
            Some(text) => Some(parse_metrics_address(text)?),
            None => None,
        };
        if let Some(addr) = metrics {
            if let Some(taken) = listen.iter().find(|a| overlaps(**a, addr)) {
                return Err(invalid(
                    "metrics.address",
                    format!("{:?}", addr.to_string()),
                    format!(
                        "overlaps `listen` {:?}: herd would fail to bind it",
                        taken.to_string()
                    ),
                ));
            }
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
            ready_timeout,
            ready_delay,
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
            run_as,
            control,
            monitor_interval,
            metrics,
            handoff,
            restart,
        })
    }
}

/// Two listening sockets on these addresses cannot both be bound: the same
/// port (not 0, which picks a free one each time) on the same address, or
/// on a wildcard and any address of its family. IPv6 listeners are
/// IPv6-only, so the families never collide.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// The control socket's path, which must fit a `sockaddr_un`.
fn control_path(text: &str) -> Result<PathBuf, ConfigError> {
    let refuse = |reason: String| invalid("control", format!("{text:?}"), reason);
    if text.is_empty() {
        return Err(refuse("empty: give a path such as \"herd.sock\"".into()));
    }
    if text.contains('\0') {
        return Err(refuse("contains a NUL byte".into()));
    }
    // Bound as written (relative to herd's directory), so its own length counts.
    if text.len() > MAX_CONTROL_PATH_LEN {
        return Err(refuse(format!(
            "{} bytes long; a Unix socket path holds at most {MAX_CONTROL_PATH_LEN} (sun_path is {} bytes with the closing NUL): use a shorter or relative path",
            text.len(),
            MAX_CONTROL_PATH_LEN + 1
        )));
    }
    Ok(PathBuf::from(text))
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

/// Who workers run as (`user`, `group`): resolved when the config is
/// loaded, so starting a worker needs no lookup between `fork` and `exec`
/// (the group database is read through NSS, which is not async-signal-safe).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// The passwd name, as `USER` and `LOGNAME`.
    pub name: String,
    pub uid: u32,
    /// `group`, or the user's primary group.
    pub gid: u32,
    /// The supplementary groups, as `initgroups(3)` (and so `su -` and
    /// systemd's `User=`) sets them: `gid` and every group the group
    /// database lists the user in. Without them a worker would lose the
    /// access its user has through a group (e.g. `ssl-cert` for keys).
    pub groups: Vec<u32>,
    /// The passwd home directory, as `HOME`.
    pub home: PathBuf,
}

impl RunAs {
    /// herd already runs with exactly these ids: there is nothing to switch
    /// (and an unprivileged herd could not call setgroups).
    pub fn is_herds_own(&self) -> bool {
        let own = herds_identity();
        own.uid == self.uid && own.gid == self.gid && own.groups == sorted(&self.groups)
    }

    fn identity(&self) -> Identity {
        Identity {
            uid: self.uid,
            gid: self.gid,
            groups: sorted(&self.groups),
            who: format!(" by user {:?} (uid {})", self.name, self.uid),
        }
    }
}

fn sorted(groups: &[u32]) -> Vec<u32> {
    let mut groups = groups.to_vec();
    groups.sort_unstable();
    groups.dedup();
    groups
}

/// Looks up `user` and `group` (names or numeric ids) for the privilege drop.
fn resolve_user(user: Option<&str>, group: Option<&str>) -> Result<Option<RunAs>, ConfigError> {
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
    let groups = std::ffi::CString::new(user.name.as_str())
        .ok()
        .and_then(|name| nix::unistd::getgrouplist(&name, gid).ok())
        .ok_or_else(|| {
            invalid(
                "user",
                format!("{user_name:?}"),
                "cannot read its groups from the group database",
            )
        })?;
    let run_as = RunAs {
        name: user.name,
        uid: user.uid.as_raw(),
        gid: gid.as_raw(),
        groups: groups.into_iter().map(Gid::as_raw).collect(),
        home: user.dir,
    };
    if !run_as.is_herds_own() && !can_switch_user() {
        return Err(invalid(
            "user",
            format!("{user_name:?}"),
            format!(
                "herd runs as uid {} without CAP_SETUID and CAP_SETGID, so it cannot start workers as another user or group: run herd as root, or leave `user` out",
                nix::unistd::geteuid()
            ),
        ));
    }
    Ok(Some(run_as))
}

/// herd has CAP_SETUID and CAP_SETGID (root normally has every capability).
fn can_switch_user() -> bool {
    const CAP_SETGID: u32 = 6;
    const CAP_SETUID: u32 = 7;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return nix::unistd::geteuid().is_root();
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SETGID) != 0 && caps & (1 << CAP_SETUID) != 0)
}

/// The ids a path's permission bits are checked against: the worker's.
#[derive(Debug)]
struct Identity {
    uid: u32,
    gid: u32,
    /// Sorted.
    groups: Vec<u32>,
    /// How a refusal names it: ` by user "nobody" (uid 65534)`, or nothing
    /// for herd itself as root.
    who: String,
}

/// Workers run as herd does when no `user` is set.
fn herds_identity() -> Identity {
    let uid = nix::unistd::geteuid().as_raw();
    let groups = nix::unistd::getgroups()
        .map(|groups| groups.into_iter().map(|g| g.as_raw()).collect::<Vec<_>>())
        .unwrap_or_default();
    Identity {
        uid,
        gid: nix::unistd::getegid().as_raw(),
        groups: sorted(&groups),
        who: if uid == 0 {
            String::new()
        } else {
            format!(" by herd's user (uid {uid})")
        },
    }
}

/// What a process needs on a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Search,
    Read,
    Execute,
}

impl Identity {
    /// The permission bits `meta` grants this identity for `access`, as the
    /// kernel decides (owner class, else group class, else others; root
    /// needs an execute bit on files only). ACLs and LSMs are not looked at.
    fn may(&self, meta: &std::fs::Metadata, access: Access) -> bool {
        use std::os::unix::fs::MetadataExt;
        let bit = match access {
            Access::Read => 0o4,
            Access::Search | Access::Execute => 0o1,
        };
        let mode = meta.mode();
        if self.uid == 0 {
            return access != Access::Execute || mode & 0o111 != 0;
        }
        let class = if meta.uid() == self.uid {
            mode >> 6
        } else if meta.gid() == self.gid || self.groups.binary_search(&meta.gid()).is_ok() {
            mode >> 3
        } else {
            mode
        };
        class & bit != 0
    }

    /// Every directory on the way to `path` (as written, and with symlinks
    /// resolved) can be searched.
    fn can_reach(&self, path: &Path) -> Result<(), String> {
        let absolute = std::env::current_dir()
            .map(|dir| dir.join(path))
            .unwrap_or_else(|_| path.to_owned());
        let resolved = std::fs::canonicalize(&absolute).ok();
        for way in std::iter::once(&absolute).chain(resolved.as_ref()) {
            for dir in way.ancestors().skip(1) {
                let Ok(meta) = std::fs::metadata(dir) else {
                    continue;
                };
                self.may_search(dir, &meta)?;
            }
        }
        Ok(())
    }

    /// `dir` (whose metadata is `meta`) can be searched by this identity.
    fn may_search(&self, dir: &Path, meta: &std::fs::Metadata) -> Result<(), String> {
        if self.may(meta, Access::Search) {
            return Ok(());
        }
        Err(format!(
            "{} is not searchable{} ({})",
            dir.display(),
            self.who,
            describe(meta)
        ))
    }

    /// `dir` can be made the working directory: reached and searched.
    fn can_enter(&self, dir: &Path) -> Result<(), String> {
        self.can_reach(dir)?;
        let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        self.may_search(dir, &meta)?;
        Ok(())
    }

    /// The kernel would `execve` `path` for this identity: directories
    /// searchable, the file executable, and a script also readable (its
    /// interpreter opens it) with an interpreter that can be run in turn.
    fn can_execute(&self, path: &Path, depth: u32) -> Result<(), String> {
        self.can_reach(path)?;
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if !meta.is_file() {
            return Err(format!("{} is not a file", path.display()));
        }
        if !self.may(&meta, Access::Execute) {
            return Err(format!(
                "{} is not executable{} ({})",
                path.display(),
                self.who,
                describe(&meta)
            ));
        }
        let Some(interpreter) = interpreter_of(path) else {
            return Ok(());
        };
        if !self.may(&meta, Access::Read) {
            return Err(format!(
                "{} is a script and not readable{} ({})",
                path.display(),
                self.who,
                describe(&meta)
            ));
        }
        // The kernel follows at most a few interpreters (binfmt_script).
        if depth < 4 {
            self.can_execute(&interpreter, depth + 1)
                .map_err(|e| format!("its interpreter: {e}"))?;
        }
        Ok(())
    }
}

/// In the OS-scheduled modes a worker starts as herd's own binary (the shim
/// that sets `LISTEN_PID`), reached through `/proc/self/exe`: only the
/// file's own permission bits count on that path.
fn shim_runnable_by(user: &RunAs, mode: Mode) -> Result<(), ConfigError> {
    let refuse = |reason: String| invalid("user", format!("{:?}", user.name), reason);
    let herd = std::env::current_exe()
        .map_err(|e| refuse(format!("cannot find herd's own binary: {e}")))?;
    let meta = std::fs::metadata(&herd).map_err(|e| refuse(format!("{}: {e}", herd.display())))?;
    let identity = user.identity();
    if identity.may(&meta, Access::Execute) {
        return Ok(());
    }
    Err(refuse(format!(
        "in mode {} workers start through herd's own binary {}, which is not executable{} ({})",
        mode.name(),
        herd.display(),
        identity.who,
        describe(&meta)
    )))
}

/// `mode 0700, owner uid 0 gid 0`.
fn describe(meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "mode {:04o}, owner uid {} gid {}",
        meta.mode() & 0o7777,
        meta.uid(),
        meta.gid()
    )
}

/// The interpreter a `#!` line names, if `path` starts with one.
fn interpreter_of(path: &Path) -> Option<PathBuf> {
    use std::io::Read;
    let mut head = [0u8; 256];
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.read(&mut head).ok()?;
    let line = head[..len].strip_prefix(b"#!")?;
    let line = line.split(|&b| b == b'\n').next()?;
    let interpreter = String::from_utf8_lossy(line)
        .split_whitespace()
        .next()?
        .to_string();
    Some(PathBuf::from(interpreter))
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

impl WorkerProtocol {
    pub fn name(self) -> &'static str {
        match self {
            WorkerProtocol::Herd => "herd",
            WorkerProtocol::NodeCluster => "node-cluster",
        }
    }
}

/// `node` or `nodejs`, however it was found.
fn is_node(program: &Path) -> bool {
    program
        .file_name()
        .is_some_and(|name| name == "node" || name == "nodejs")
}

/// Finds the worker program the way a shell would and checks that the
/// workers' identity can run it.
fn resolve_program(
    program: &str,
    cwd: Option<&Path>,
    identity: &Identity,
) -> Result<PathBuf, ConfigError> {
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
            .find(|path| identity.can_execute(path, 0).is_ok())
            .ok_or_else(|| not_runnable(format!("not found in PATH{}", identity.who)))?
    };
    if let Err(e) = std::fs::metadata(&candidate) {
        return Err(not_runnable(format!("{}: {e}", candidate.display())));
    }
    identity.can_execute(&candidate, 0).map_err(not_runnable)?;
    Ok(candidate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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
        resolve_program("node", None, &herds_identity()).ok()
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
        assert!(
            error.ends_with("is not executable (mode 0644, owner uid 0 gid 0)")
                || !nix::unistd::geteuid().is_root(),
            "{error}"
        );
        assert!(error.contains("is not executable"), "{error}");
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
        let root = config.validate().unwrap().run_as.unwrap();
        assert_eq!((root.uid, root.gid, root.name.as_str()), (0, 0, "root"));
        assert!(root.groups.contains(&0), "{root:?}");
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

    #[test]
    fn values_run_would_crash_or_spin_on_are_refused() {
        let refused = |edit: &dyn Fn(&mut Config)| {
            let mut config = minimal();
            edit(&mut config);
            error_of(&config)
        };
        assert!(refused(&|c| c.monitor_interval = "0s".into())
            .starts_with("invalid `monitor_interval` = \"0s\": must be at least 10ms"));
        assert!(refused(&|c| c.monitor_interval = "0.0000000001s".into())
            .starts_with("invalid `monitor_interval`"));
        assert!(minimal_with(|c| c.monitor_interval = "10ms".into()).is_ok());
        assert!(refused(&|c| c.ready_timeout = "0s".into())
            .starts_with("invalid `ready_timeout` = \"0s\": must be more than 0s"));
        assert!(refused(&|c| {
            c.ready_timeout = "2s".into();
            c.ready_delay = Some("2s".into());
        })
        .starts_with("invalid `ready_delay` = \"2s\": must be shorter than `ready_timeout` (2s)"));
        assert!(minimal_with(|c| c.ready_delay = Some("200ms".into())).is_ok());
        assert!(refused(&|c| c.restart.backoff_base = "0ms".into())
            .starts_with("invalid `restart.backoff_base` = \"0ms\": must be more than 0s"));
        assert!(refused(&|c| {
            c.env.insert("A".into(), "x\0y".into());
        })
        .starts_with("invalid `env.A` = \"x\\0y\": contains a NUL byte"));
        assert!(
            refused(&|c| c.command.push("a\0b".into())).ends_with("argument 1 contains a NUL byte")
        );
    }

    fn minimal_with(edit: impl Fn(&mut Config)) -> Result<Settings, ConfigError> {
        let mut config = minimal();
        edit(&mut config);
        config.validate()
    }

    #[test]
    fn the_control_path_must_fit_sun_path() {
        let fits = "s".repeat(MAX_CONTROL_PATH_LEN);
        assert!(minimal_with(|c| c.control = fits.clone()).is_ok());
        let long = "s".repeat(MAX_CONTROL_PATH_LEN + 1);
        let error = minimal_with(|c| c.control = long.clone())
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with(&format!(
                "invalid `control` = {long:?}: 108 bytes long; a Unix socket path holds at most 107"
            )),
            "{error}"
        );
        let error = minimal_with(|c| c.control = String::new()).unwrap_err();
        assert!(error
            .to_string()
            .starts_with("invalid `control` = \"\": empty"));
    }

    #[test]
    fn listeners_that_cannot_all_be_bound_are_refused() {
        let listen = |addrs: &[&str]| {
            minimal_with(|c| c.listen = addrs.iter().map(|a| a.to_string()).collect())
        };
        assert!(
            listen(&["127.0.0.1:0", "127.0.0.1:0"]).is_ok(),
            "port 0 picks two ports"
        );
        assert!(listen(&["127.0.0.1:3000", "127.0.0.2:3000"]).is_ok());
        assert!(
            listen(&["0.0.0.0:3000", "[::]:3000"]).is_ok(),
            "IPv6 listeners are IPv6-only"
        );
        for pair in [
            ["127.0.0.1:3000", "127.0.0.1:3000"],
            ["127.0.0.1:3000", "0.0.0.0:3000"],
            ["[::]:3000", "[::1]:3000"],
        ] {
            let error = listen(&pair).unwrap_err().to_string();
            assert_eq!(
                error,
                format!(
                    "invalid `listen` = {:?}: overlaps {:?}: the second bind would fail as a busy port",
                    pair[1], pair[0]
                )
            );
        }
        let many = vec!["127.0.0.1:0"; MAX_LISTENERS + 1];
        assert!(listen(&many)
            .unwrap_err()
            .to_string()
            .starts_with("invalid `listen` = [257 addresses]"));
        let error = minimal_with(|c| {
            c.listen = vec!["0.0.0.0:9464".into()];
            c.metrics.address = Some("9464".into());
        })
        .unwrap_err()
        .to_string();
        assert!(
            error.starts_with("invalid `metrics.address` = \"127.0.0.1:9464\": overlaps `listen` \"0.0.0.0:9464\""),
            "{error}"
        );
    }

    #[test]
    fn permission_bits_are_read_as_the_kernel_does() {
        let nobody = Identity {
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
            who: " by user \"nobody\" (uid 65534)".into(),
        };
        let root = Identity {
            uid: 0,
            gid: 0,
            groups: vec![0],
            who: String::new(),
        };
        let dir = std::env::temp_dir().join(format!("herd-perm-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f");
        std::fs::write(&file, "#!/bin/sh\n").unwrap();
        let mode = |m: u32| {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(m)).unwrap();
            std::fs::metadata(&file).unwrap()
        };
        if nix::unistd::geteuid().is_root() {
            // Owned by root: nobody is in the "others" class.
            assert!(!nobody.may(&mode(0o750), Access::Execute));
            assert!(nobody.may(&mode(0o701), Access::Execute));
            assert!(!nobody.may(&mode(0o701), Access::Read));
            assert!(nobody.may(&mode(0o705), Access::Read));
            // Root needs one execute bit on a file, none to search or read.
            assert!(root.may(&mode(0o100), Access::Execute));
            assert!(!root.may(&mode(0o600), Access::Execute));
            assert!(root.may(&mode(0o000), Access::Read));
            // A script needs reading too, and a runnable interpreter.
            mode(0o711);
            assert!(nobody
                .can_execute(&file, 0)
                .unwrap_err()
                .contains("is a script and not readable by user \"nobody\""));
            mode(0o755);
            assert!(nobody.can_execute(&file, 0).is_ok());
            std::fs::write(&file, "#!/nonexistent/interpreter\n").unwrap();
            assert!(nobody
                .can_execute(&file, 0)
                .unwrap_err()
                .starts_with("its interpreter: /nonexistent/interpreter"));
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
            let error = nobody.can_reach(&file).unwrap_err();
            assert!(
                error.starts_with(&format!("{} is not searchable by user", dir.display())),
                "{error}"
            );
        }
        // The owner class wins even when "others" would allow more.
        let owner = Identity {
            uid: nix::unistd::geteuid().as_raw(),
            gid: u32::MAX - 1,
            groups: vec![],
            who: " by its owner".into(),
        };
        if owner.uid != 0 {
            assert!(!owner.may(&mode(0o605), Access::Read));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_reload_names_every_key_only_a_restart_can_change() {
        let running = minimal().validate().unwrap();
        let same = minimal().validate().unwrap();
        assert!(running.restart_needed(&same).is_empty());
        // What a reload applies itself.
        let applied = minimal_with(|c| {
            c.workers = WorkerCount::Count(3);
            c.env.insert("A".into(), "b".into());
            c.command = vec!["sh".into()];
            c.hang_timeout = "1s".into();
            c.ready_timeout = "5s".into();
            c.shutdown_timeout = "1s".into();
            c.handoff.max_unacked = 3;
            c.handoff.queue_limit = 0;
            c.restart.backoff_base = "1s".into();
            c.reload_batch = 2;
            c.user = Some("root".into());
        })
        .unwrap();
        assert_eq!(running.restart_needed(&applied), Vec::<String>::new());
        for (edit, named) in [
            (
                Box::new(|c: &mut Config| c.listen = vec!["127.0.0.2:0".into()])
                    as Box<dyn Fn(&mut Config)>,
                "`listen` ([127.0.0.1:0] -> [127.0.0.2:0])",
            ),
            (Box::new(|c| c.backlog = 64), "`backlog` (511 -> 64)"),
            (
                Box::new(|c| c.mode = "sticky".into()),
                "`mode` (round-robin -> sticky)",
            ),
            (
                Box::new(|c| c.kill_mode = "process-group".into()),
                "`kill_mode` (auto -> process-group)",
            ),
            (
                Box::new(|c| c.protocol = "node-cluster".into()),
                "`protocol` (herd -> node-cluster)",
            ),
            (
                Box::new(|c| c.control = "other.sock".into()),
                "`control` (herd.sock -> other.sock)",
            ),
            (
                Box::new(|c| c.metrics.address = Some("9000".into())),
                "`metrics.address` (none -> 127.0.0.1:9000)",
            ),
            (
                Box::new(|c| c.monitor_interval = "2s".into()),
                "`monitor_interval` (1s -> 2s)",
            ),
        ] {
            let new = minimal_with(edit).unwrap();
            assert_eq!(running.restart_needed(&new), [named]);
        }
        // Node workers: rotation on its own, and not again when mode changes it.
        let node = minimal_with(|c| c.protocol = "node-cluster".into()).unwrap();
        let handoff = minimal_with(|c| {
            c.protocol = "node-cluster".into();
            c.rotation = "handoff".into();
        })
        .unwrap();
        assert_eq!(
            node.restart_needed(&handoff),
            ["`rotation` (kernel -> handoff)"]
        );
        let sticky = minimal_with(|c| {
            c.protocol = "node-cluster".into();
            c.mode = "sticky".into();
        })
        .unwrap();
        assert_eq!(
            node.restart_needed(&sticky),
            ["`mode` (round-robin -> sticky)"]
        );
    }
}
