//! Configuration: the TOML file, command-line overrides, and validation.
//!
//! Owns turning what the user wrote into [`Settings`], the typed values the
//! rest of herd runs on, in three steps:
//! 1. read: the file is deserialized straight into typed values
//!    ([`Config`]; unknown keys refused) and the command-line flags are
//!    merged over it ([`Overrides`]); each key's own rule is checked as it
//!    is read, so a refusal from the file says where it is;
//! 2. [`Config::validate`]: the rules that span several keys, giving a
//!    [`ValidConfig`];
//! 3. [`resolve`]: what the host says (the workers' user, whether they can
//!    run the program and enter `cwd`, the number of cores), the only step
//!    with I/O.
//!
//! Every refusal names the key, the value and the reason. [`ConfigSource`]
//! runs all three for `herd run`, `herd check` and every reload, so `check`
//! refuses exactly what `run` would. [`RELOAD`] says per key whether a
//! reload applies it. The repository's `config.toml` documents every key.
//!
//! # Layout
//! - this module: errors, [`Settings`], [`ConfigSource`].
//! - `file`: the file's typed form ([`Config`] and its tables), defaults, parsing.
//! - `keys`: each key's reader: its type, range and refusals.
//! - `overrides`: the command-line flags ([`Overrides`]), read by the same readers.
//! - `node`: `[node]`, and `node.primary = "run"` refused without a Node app.
//! - `values`: durations, sizes and the named choices, as types.
//! - `validate`: the rules that span several keys.
//! - `resolve`: users, paths and the program, on this host.
//! - `users`: who workers run as and what they may reach.
//! - `reload`: what a reload does with each key ([`RELOAD`]).

mod file;
mod keys;
mod node;
mod overrides;
pub mod preload;
mod reload;
mod resolve;
mod users;
mod validate;
mod values;

pub use file::{Config, HandoffConfig, MetricsConfig, ParseError, RestartConfig};
pub use node::{NodeConfig, NodePrimary};
pub use overrides::Overrides;
pub use reload::{Reload, RELOAD};
pub use resolve::resolve;
use users::*;
pub use users::{names_node, RunAs};
pub use validate::ValidConfig;
use validate::*;
use values::*;
pub use values::{
    available_cores, parse_duration, parse_size, ByteSize, ConfigDuration, HandoffThreadCount,
    KillMode, ProtocolChoice, Readiness, Rotation, StopSignal, WorkerCount, WorkerProtocol,
    CORES_PER_HANDOFF_THREAD,
};

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::line_format::LineFormat;

use nix::sys::signal::Signal;
use serde::Deserialize;

use crate::dispatch::Mode;

/// The most worker slots herd runs; fixed so per-slot state can live in arrays.
pub const MAX_WORKERS: usize = 1024;

/// Listeners herd may hold: configured, plus those Node apps ask for;
/// fixed so per-listener counters can live in arrays.
pub const MAX_LISTENERS: usize = 256;

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
    /// Not TOML, a key herd does not know, or a value its key refuses.
    #[error("{}{}", .error.message, place(.path, .error))]
    Parse { path: PathBuf, error: ParseError },
    #[error("invalid `{key}` = {value}: {reason}")]
    Invalid {
        key: String,
        value: String,
        reason: String,
    },
}

/// ` (config file herd.toml, line 3, column 11)`.
fn place(path: &Path, error: &ParseError) -> String {
    match error.position {
        Some((line, column)) => format!(
            " (config file {}, line {line}, column {column})",
            path.display()
        ),
        None => format!(" (config file {})", path.display()),
    }
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
        config.apply(self.overrides.clone())?;
        resolve(config.validate()?)
    }
}

/// Validated, typed settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: Vec<SocketAddr>,
    pub backlog: u32,
    pub workers: usize,
    /// Hand-off threads (`handoff_threads` resolved): 1 in the modes that
    /// hand nothing off and for workers that cannot take from several.
    pub handoff_threads: usize,
    pub mode: Mode,
    /// The worker program, resolved (PATH searched) and checked executable.
    pub program: PathBuf,
    /// Arguments after the program.
    pub args: Vec<String>,
    pub protocol: WorkerProtocol,
    /// `protocol = "preload"`: the library put in the workers' `LD_PRELOAD`.
    pub preload: Option<PathBuf>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<PathBuf>,
    pub shutdown_timeout: Duration,
    /// See `shutdown_delay`: `/readyz` fails this long before the stop.
    pub shutdown_delay: Duration,
    /// `/readyz` is 200 with at least this many workers ready.
    pub ready_min: usize,
    /// How workers' output lines are framed (`log_lines`, `log_timestamps`).
    pub framing: crate::line_format::Framing,
    /// Per-slot log files (`log_dir`), if any.
    pub log_files: Option<crate::log_files::LogFileSettings>,
    /// What a draining worker is sent beside DRAIN; `None`: herd's own
    /// choice (SIGTERM to workers that may not read DRAIN).
    pub stop_signal: Option<Signal>,
    pub ready_timeout: Duration,
    /// How a starting worker says it is ready (`ready`, or `ready_delay`).
    pub ready: Readiness,
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
    /// `node.primary`: whether the app's own primary branch runs too.
    pub node_primary: NodePrimary,
}

impl Settings {
    /// After how many connections worker `id` is recycled: the limit plus
    /// a per-worker offset up to the jitter, so recycles don't align.
    pub fn recycle_after(&self, id: u64) -> Option<u64> {
        let limit = self.max_connections_per_worker?;
        Some(limit + jitter(self.max_connections_jitter, id))
    }
}

/// A per-worker random-looking offset in `0..=max`.
fn jitter(max: u64, id: u64) -> u64 {
    if max == 0 {
        return 0;
    }
    let seed = id
        ^ u64::from(std::process::id()) << 32
        ^ std::time::Instant::now().elapsed().subsec_nanos() as u64;
    let mixed = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
    mixed % (max + 1)
}

#[cfg(test)]
#[test]
fn jitter_stays_in_range() {
    assert_eq!(jitter(0, 7), 0);
    for id in 0..100 {
        assert!(jitter(10, id) <= 10);
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

#[cfg(test)]
mod reload_tests;
#[cfg(test)]
mod tests;
