//! Configuration: the TOML file, command-line overrides, and validation.
//!
//! Owns turning what the user wrote into [`Settings`], the typed values the
//! rest of herd runs on. The file is parsed into [`Config`] (serde, unknown
//! keys refused), command-line flags are merged over it ([`Overrides`]), and
//! [`Config::validate`] checks every value, naming the key, the value and the
//! reason for anything it refuses. The repository's `config.toml` documents
//! every key.

//!
//! # Layout
//! - this module: errors, [`Settings`] and validation into them.
//! - `file`: the file as written ([`Config`]) and [`Overrides`].
//! - `values`: durations, sizes, ranges, addresses.
//! - `users`: who workers run as and what they may reach.

mod file;
mod users;
mod values;

pub use file::{Config, HandoffConfig, MetricsConfig, Overrides, RestartConfig, WorkerCount};
pub use users::RunAs;
use users::*;
use values::*;
pub use values::{available_cores, parse_duration, parse_size};

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::dispatch::Mode;
use crate::listener::MAX_LISTENERS;

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

#[cfg(test)]
mod tests;
