//! The config file as written: [`Config`] and its tables, deserialized with
//! serde (unknown keys refused), their defaults, and the command-line
//! [`Overrides`] merged over them. Values stay loosely typed here so that
//! validation (in the parent module) can say exactly what is wrong.

use super::*;

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
}
