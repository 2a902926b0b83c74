//! The config file, typed as it is read: [`Config`] and its tables,
//! deserialized with serde (unknown keys refused, each value read by its
//! key's reader in `keys`, so a bad value is refused with its line and
//! column), their defaults, and where a refusal points ([`ParseError`]).

use super::*;

/// The config file (and the flags merged over it), every value typed and
/// checked on its own. What several keys decide together is
/// [`Config::validate`]'s.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Addresses to accept connections on, e.g. `127.0.0.1:3000`, `[::]:8080`.
    #[serde(deserialize_with = "keys::de::listen")]
    pub listen: Vec<SocketAddr>,
    /// Kernel accept-queue length per listener.
    #[serde(deserialize_with = "keys::de::backlog")]
    pub backlog: u32,
    /// Number of worker processes, or "max" for one per available core.
    #[serde(deserialize_with = "keys::de::workers")]
    pub workers: WorkerCount,
    /// Threads that accept and hand off (each its own SO_REUSEPORT copy
    /// of every listener), or "auto" for one per 8 cores.
    #[serde(deserialize_with = "keys::de::handoff_threads")]
    pub handoff_threads: HandoffThreadCount,
    /// Dispatch policy: "round-robin", "sticky", "least-conn", ...
    #[serde(deserialize_with = "keys::de::mode")]
    pub mode: Mode,
    /// The worker program and its arguments.
    #[serde(deserialize_with = "keys::de::command")]
    pub command: Vec<String>,
    /// What workers speak on their channel: "herd", "node-cluster", or
    /// "auto" (node-cluster when the program is `node` or `nodejs`).
    #[serde(deserialize_with = "keys::de::protocol")]
    pub protocol: ProtocolChoice,
    /// How round-robin deals connections to Node cluster workers: "kernel"
    /// (an eBPF program deals them over per-worker sockets), "handoff" (herd
    /// accepts each and sends it over the cluster channel), or "auto"
    /// (kernel for Node workers, falling back to handoff where the kernel
    /// refuses the program).
    #[serde(deserialize_with = "keys::de::rotation")]
    pub rotation: Rotation,
    /// Extra environment for workers.
    #[serde(deserialize_with = "keys::de::env")]
    pub env: BTreeMap<String, String>,
    /// Working directory for workers (default: herd's).
    #[serde(deserialize_with = "keys::de::cwd")]
    pub cwd: Option<PathBuf>,
    /// How long workers get to finish when herd stops, before SIGKILL.
    #[serde(deserialize_with = "keys::de::shutdown_timeout")]
    pub shutdown_timeout: ConfigDuration,
    /// On SIGTERM (and `herd stop`), how long herd keeps accepting and
    /// serving with `/readyz` failing, before it closes the listeners, so
    /// a load balancer stops sending first.
    #[serde(deserialize_with = "keys::de::shutdown_delay")]
    pub shutdown_delay: ConfigDuration,
    /// How workers' lines are framed on herd's output: "prefix"
    /// (`[worker N] `), "raw" (untouched) or "json" (one object each).
    #[serde(deserialize_with = "keys::de::log_lines")]
    pub log_lines: LineFormat,
    /// In "prefix" mode, an RFC 3339 UTC time before each worker line.
    #[serde(deserialize_with = "keys::de::log_timestamps")]
    pub log_timestamps: bool,
    /// Per-slot log files here (`worker-N.out.log`, `worker-N.err.log`),
    /// read by `herd logs`; unset: none.
    #[serde(deserialize_with = "keys::de::log_dir")]
    pub log_dir: Option<PathBuf>,
    /// A log file is rotated before it passes this size.
    #[serde(deserialize_with = "keys::de::log_file_size")]
    pub log_file_size: ByteSize,
    /// Rotated log files kept per stream (`.log.1` ... `.log.N`).
    #[serde(deserialize_with = "keys::de::log_file_keep")]
    pub log_file_keep: u32,
    /// `/readyz` answers 200 once at least this many workers are ready.
    #[serde(deserialize_with = "keys::de::ready_min")]
    pub ready_min: usize,
    /// The signal a draining worker is sent, by its server's convention
    /// ("SIGQUIT" for nginx); unset: SIGTERM where DRAIN may not be read.
    #[serde(deserialize_with = "keys::de::stop_signal")]
    pub stop_signal: Option<StopSignal>,
    /// A worker that is not ready this long after it started is killed (a failed start).
    #[serde(deserialize_with = "keys::de::ready_timeout")]
    pub ready_timeout: ConfigDuration,
    /// For workers that never send READY: count them ready this long after start.
    #[serde(deserialize_with = "keys::de::ready_delay")]
    pub ready_delay: Option<ConfigDuration>,
    /// How a worker says it is ready: "herd" (READY on its channel, the
    /// default), "notify" (sd_notify's READY=1) or "delay:DUR".
    #[serde(deserialize_with = "keys::de::ready")]
    pub ready: Option<Readiness>,
    /// A worker whose oldest unacknowledged hand-off is older than this is
    /// hung: its connections go to other workers, it is killed and
    /// replaced. "0s" turns it off.
    #[serde(deserialize_with = "keys::de::hang_timeout")]
    pub hang_timeout: ConfigDuration,
    /// What a worker's processes are: "control-group" (a cgroup v2 leaf per
    /// worker, which also holds helpers that left its process group),
    /// "process-group", or "auto" (control-group where herd can create
    /// cgroups, else process-group).
    #[serde(deserialize_with = "keys::de::kill_mode")]
    pub kill_mode: KillMode,
    /// Slots replaced at a time during a rolling reload.
    #[serde(deserialize_with = "keys::de::reload_batch")]
    pub reload_batch: usize,
    /// Replace a worker (gracefully) once its resident memory exceeds this, e.g. "512MiB".
    #[serde(deserialize_with = "keys::de::max_memory")]
    pub max_memory: Option<ByteSize>,
    /// Replace a worker (gracefully) after it has taken this many connections.
    #[serde(deserialize_with = "keys::de::max_connections_per_worker")]
    pub max_connections_per_worker: Option<u64>,
    /// Up to this many extra connections, chosen at random per worker, so recycles don't align.
    #[serde(deserialize_with = "keys::de::max_connections_jitter")]
    pub max_connections_jitter: u64,
    /// Run workers as this user (herd itself binds as the user that started it).
    #[serde(deserialize_with = "keys::de::user")]
    pub user: Option<String>,
    /// Run workers as this group (default: the user's primary group).
    #[serde(deserialize_with = "keys::de::group")]
    pub group: Option<String>,
    /// Path of the control socket that `herd status`, `reload`, `scale` and `stop` talk to.
    #[serde(deserialize_with = "keys::de::control")]
    pub control: PathBuf,
    /// How often worker memory and CPU are sampled.
    #[serde(deserialize_with = "keys::de::monitor_interval")]
    pub monitor_interval: ConfigDuration,
    pub handoff: HandoffConfig,
    pub restart: RestartConfig,
    pub metrics: MetricsConfig,
    pub node: NodeConfig,
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "the `[metrics]` table")]
pub struct MetricsConfig {
    /// Serve `/metrics` here ("IP:PORT", or just "PORT" for 127.0.0.1). Unset: no endpoint.
    #[serde(deserialize_with = "keys::de::metrics_address")]
    pub address: Option<SocketAddr>,
}

/// `[handoff]`: bounds on the accept → worker path.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "the `[handoff]` table")]
pub struct HandoffConfig {
    /// Connections sent to one worker and not yet acknowledged, before it is skipped.
    #[serde(deserialize_with = "keys::de::handoff_max_unacked")]
    pub max_unacked: usize,
    /// A worker whose oldest unacknowledged connection is older than this is skipped.
    #[serde(deserialize_with = "keys::de::handoff_ack_timeout")]
    pub ack_timeout: ConfigDuration,
    /// Accepted connections waiting for a worker, before new ones are closed.
    #[serde(deserialize_with = "keys::de::handoff_queue_limit")]
    pub queue_limit: usize,
    /// A connection that waited this long for a worker is closed.
    #[serde(deserialize_with = "keys::de::handoff_queue_timeout")]
    pub queue_timeout: ConfigDuration,
}

/// `[restart]`: how a slot whose worker exited is refilled.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "the `[restart]` table")]
pub struct RestartConfig {
    /// Delay before the first restart; doubles per consecutive failed start.
    #[serde(deserialize_with = "keys::de::restart_backoff_base")]
    pub backoff_base: ConfigDuration,
    /// Upper bound of the restart delay.
    #[serde(deserialize_with = "keys::de::restart_backoff_max")]
    pub backoff_max: ConfigDuration,
    /// A worker that ran this long counts as a good start and resets the backoff.
    #[serde(deserialize_with = "keys::de::restart_min_uptime")]
    pub min_uptime: ConfigDuration,
    /// More failed starts than this within `window` mark the slot crash-looping.
    #[serde(deserialize_with = "keys::de::restart_max_restarts")]
    pub max_restarts: u32,
    #[serde(deserialize_with = "keys::de::restart_window")]
    pub window: ConfigDuration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: Vec::new(),
            backlog: 511,
            workers: WorkerCount::Max,
            handoff_threads: HandoffThreadCount::Auto,
            mode: Mode::RoundRobin,
            protocol: ProtocolChoice::Auto,
            rotation: Rotation::Auto,
            command: Vec::new(),
            env: BTreeMap::new(),
            cwd: None,
            shutdown_timeout: ConfigDuration::default_of("10s"),
            shutdown_delay: ConfigDuration::default_of("0s"),
            ready_min: 1,
            log_lines: LineFormat::Prefix,
            log_timestamps: false,
            log_dir: None,
            log_file_size: ByteSize::default_of("10MiB"),
            log_file_keep: 5,
            stop_signal: None,
            ready_timeout: ConfigDuration::default_of("30s"),
            ready_delay: None,
            ready: None,
            hang_timeout: ConfigDuration::default_of("30s"),
            kill_mode: KillMode::Auto,
            reload_batch: 1,
            max_memory: None,
            max_connections_per_worker: None,
            max_connections_jitter: 0,
            user: None,
            group: None,
            control: PathBuf::from(DEFAULT_CONTROL_PATH),
            monitor_interval: ConfigDuration::default_of("1s"),
            handoff: HandoffConfig::default(),
            restart: RestartConfig::default(),
            metrics: MetricsConfig::default(),
            node: NodeConfig::default(),
        }
    }
}

impl Default for HandoffConfig {
    fn default() -> Self {
        HandoffConfig {
            max_unacked: 64,
            ack_timeout: ConfigDuration::default_of("1s"),
            queue_limit: 1024,
            queue_timeout: ConfigDuration::default_of("10s"),
        }
    }
}

impl Default for RestartConfig {
    fn default() -> Self {
        RestartConfig {
            backoff_base: ConfigDuration::default_of("100ms"),
            backoff_max: ConfigDuration::default_of("10s"),
            min_uptime: ConfigDuration::default_of("5s"),
            max_restarts: 10,
            window: ConfigDuration::default_of("60s"),
        }
    }
}

/// Why a config file's text was refused, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// A key's refusal (``invalid `workers` = 0: ...``), an unknown key, or
    /// what is not TOML.
    pub message: String,
    /// Line and column, from 1, of what was refused (when TOML says).
    pub position: Option<(usize, usize)>,
}

impl std::error::Error for ParseError {}

/// `invalid ... (line 3, column 11)`.
impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        match self.position {
            Some((line, column)) => write!(f, " (line {line}, column {column})"),
            None => Ok(()),
        }
    }
}

impl ParseError {
    fn of(text: &str, error: &toml::de::Error) -> ParseError {
        let position = error.span().map(|span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            (line, column)
        });
        let mut message = error.message().trim_end().replace('\n', "; ");
        // A key written twice: TOML says "duplicate key" and points at it.
        let pointed = error.span().and_then(|span| text.get(span));
        if let Some(pointed) = pointed.filter(|_| message.starts_with("duplicate")) {
            message.push_str(&format!(" `{pointed}`"));
        }
        ParseError { message, position }
    }
}

impl Config {
    /// Reads `path`, or `./config.toml` if `path` is `None` and it exists,
    /// or the built-in defaults otherwise.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        match read(path)? {
            Some((path, text)) => Config::parse(&text).map_err(|error| ConfigError::Parse {
                path: path.to_owned(),
                error,
            }),
            None => Ok(Config::default()),
        }
    }

    /// Parses TOML text; a refusal names the key and says where it is.
    pub fn parse(text: &str) -> Result<Config, ParseError> {
        toml::from_str(text).map_err(|e| ParseError::of(text, &e))
    }

    /// The `control` path of the file [`Config::load`] would read, and
    /// nothing else of it: what `herd status`, `reload`, `scale` and `stop`
    /// need, so they reach a running herd (which judges the rest of the
    /// file when it reloads) whatever other keys say.
    pub fn control_of(path: Option<&Path>) -> Result<PathBuf, ConfigError> {
        /// The one key the control commands read.
        #[derive(Deserialize)]
        struct ControlOnly {
            #[serde(default = "default_control", deserialize_with = "keys::de::control")]
            control: PathBuf,
        }
        fn default_control() -> PathBuf {
            PathBuf::from(DEFAULT_CONTROL_PATH)
        }
        let Some((path, text)) = read(path)? else {
            return Ok(default_control());
        };
        toml::from_str::<ControlOnly>(&text)
            .map(|only| only.control)
            .map_err(|e| ConfigError::Parse {
                path: path.to_owned(),
                error: ParseError::of(&text, &e),
            })
    }
}

/// The file to read (`path`, else `./config.toml` if it exists) and its
/// text; `None` when there is none.
fn read(path: Option<&Path>) -> Result<Option<(&Path, String)>, ConfigError> {
    let path = match path {
        Some(path) => path,
        None if Path::new(DEFAULT_CONFIG_PATH).exists() => Path::new(DEFAULT_CONFIG_PATH),
        None => return Ok(None),
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(Some((path, text)))
}
