//! Each key's own rule, written once: how its value is read from what the
//! file or a flag wrote (a TOML value), and why it is refused. A refusal
//! names the key, the value as written and the reason, e.g.
//! ``invalid `workers` = 0: must be between 1 and 1024``.
//!
//! The file's fields read through these (`#[serde(deserialize_with =
//! "keys::de::workers")]`), so a refusal from the file also says where in
//! it the value is; [`Overrides`] go through the same readers. A key read
//! here is refused for its own value only: rules that span several keys
//! are `validate`'s, and what the host says (users, paths) is `resolve`'s.

use super::*;

use std::str::FromStr;

use toml::Value;

/// Declares, per key, its reader `keys::NAME(value)` (from the key's name
/// and a `fn(key, value)`) and the same reader for serde, `keys::de::NAME`.
macro_rules! keys {
    ($($name:ident: $ty:ty = $key:literal, $read:expr;)*) => {
        $(
            #[doc = concat!("Reads `", $key, "`.")]
            pub(super) fn $name(value: Value) -> Result<$ty, ConfigError> {
                let read: fn(&str, Value) -> Result<$ty, ConfigError> = $read;
                read($key, value)
            }
        )*

        /// The readers above, as serde's `deserialize_with`: the file's
        /// value is read as any TOML value, so a wrong type is refused by
        /// the key's reader too, naming the key.
        pub(super) mod de {
            use super::*;
            use serde::de::Error as _;

            $(
                pub(in crate::config) fn $name<'de, D>(deserializer: D) -> Result<$ty, D::Error>
                where
                    D: serde::Deserializer<'de>,
                {
                    super::$name(Value::deserialize(deserializer)?).map_err(D::Error::custom)
                }
            )*
        }
    };
}

keys! {
    listen: Vec<SocketAddr> = "listen", addresses;
    backlog: u32 = "backlog", |key, value| Ok(int(key, value, 1, 65535)? as u32);
    workers: WorkerCount = "workers", worker_count;
    handoff_threads: HandoffThreadCount = "handoff_threads", thread_count;
    mode: Mode = "mode", named;
    command: Vec<String> = "command", argv;
    protocol: ProtocolChoice = "protocol", named;
    rotation: Rotation = "rotation", named;
    env: BTreeMap<String, String> = "env", environment;
    cwd: Option<PathBuf> = "cwd", |key, value| directory(key, value).map(Some);
    shutdown_timeout: ConfigDuration = "shutdown_timeout", duration;
    shutdown_delay: ConfigDuration = "shutdown_delay", duration;
    log_lines: LineFormat = "log_lines", named;
    log_timestamps: bool = "log_timestamps", boolean;
    log_dir: Option<PathBuf> = "log_dir",
        |key, value| text(key, value, "a directory path in quotes").map(|t| Some(PathBuf::from(t)));
    log_file_size: ByteSize = "log_file_size", size;
    log_file_keep: u32 = "log_file_keep", |key, value| Ok(int(key, value, 0, 1000)? as u32);
    ready_min: usize = "ready_min",
        |key, value| Ok(int(key, value, 1, MAX_WORKERS as i64)? as usize);
    stop_signal: Option<StopSignal> = "stop_signal", |key, value| named(key, value).map(Some);
    ready_timeout: ConfigDuration = "ready_timeout",
        |key, value| more_than_zero(key, value, "every worker would be killed as it starts");
    ready_delay: Option<ConfigDuration> = "ready_delay", |key, value| duration(key, value).map(Some);
    ready: Option<Readiness> = "ready", |key, value| named(key, value).map(Some);
    hang_timeout: ConfigDuration = "hang_timeout", duration;
    kill_mode: KillMode = "kill_mode", named;
    reload_batch: usize = "reload_batch",
        |key, value| Ok(int(key, value, 1, MAX_WORKERS as i64)? as usize);
    max_memory: Option<ByteSize> = "max_memory", |key, value| size(key, value).map(Some);
    max_connections_per_worker: Option<u64> = "max_connections_per_worker",
        |key, value| Ok(Some(int(key, value, 1, i64::MAX)? as u64));
    max_connections_jitter: u64 = "max_connections_jitter",
        |key, value| Ok(int(key, value, 0, i64::MAX)? as u64);
    user: Option<String> = "user",
        |key, value| text(key, value, "a user name or numeric id in quotes").map(Some);
    group: Option<String> = "group",
        |key, value| text(key, value, "a group name or numeric id in quotes").map(Some);
    control: PathBuf = "control", socket_path;
    monitor_interval: ConfigDuration = "monitor_interval", sampling_interval;
    handoff_max_unacked: usize = "handoff.max_unacked",
        |key, value| Ok(int(key, value, 1, 4096)? as usize);
    handoff_ack_timeout: ConfigDuration = "handoff.ack_timeout", duration;
    handoff_queue_limit: usize = "handoff.queue_limit",
        |key, value| Ok(int(key, value, 0, 1 << 20)? as usize);
    handoff_queue_timeout: ConfigDuration = "handoff.queue_timeout", duration;
    restart_backoff_base: ConfigDuration = "restart.backoff_base",
        |key, value| more_than_zero(
            key, value, "a crash-looping worker would be restarted without a pause",
        );
    restart_backoff_max: ConfigDuration = "restart.backoff_max", duration;
    restart_min_uptime: ConfigDuration = "restart.min_uptime", duration;
    restart_max_restarts: u32 = "restart.max_restarts",
        |key, value| Ok(int(key, value, 1, 1_000_000)? as u32);
    restart_window: ConfigDuration = "restart.window", duration;
    metrics_address: Option<SocketAddr> = "metrics.address",
        |key, value| endpoint(key, value).map(Some);
    node_primary: NodePrimary = "node.primary", named;
}

/// `value` as written, for a refusal: a string quoted as Rust quotes it
/// (`"a\0b"`), a list item by item, anything else as TOML writes it.
fn shown(value: &Value) -> String {
    match value {
        Value::String(text) => format!("{text:?}"),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(shown).collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    }
}

/// A whole number from `min` to `max`.
fn int(key: &str, value: Value, min: i64, max: i64) -> Result<i64, ConfigError> {
    match value {
        Value::Integer(n) if (min..=max).contains(&n) => Ok(n),
        Value::Integer(n) => Err(invalid(key, n, format!("must be between {min} and {max}"))),
        other => Err(invalid(
            key,
            shown(&other),
            format!("expected a number from {min} to {max}"),
        )),
    }
}

/// A string; anything else is refused as not `what`.
fn text(key: &str, value: Value, what: &str) -> Result<String, ConfigError> {
    match value {
        Value::String(text) => Ok(text),
        other => Err(invalid(key, shown(&other), format!("expected {what}"))),
    }
}

/// A list of strings; anything else is refused as not `what`.
fn strings(key: &str, value: Value, what: &str) -> Result<Vec<String>, ConfigError> {
    let refuse = |value: &Value| invalid(key, shown(value), format!("expected {what}"));
    let Value::Array(items) = value else {
        return Err(refuse(&value));
    };
    items
        .into_iter()
        .map(|item| match item {
            Value::String(text) => Ok(text),
            other => Err(refuse(&other)),
        })
        .collect()
}

/// One of a choice's names (`mode`, `protocol`, `rotation`, `kill_mode`,
/// `stop_signal`).
/// TOML's text of anything but a string names none, so the choice's own
/// refusal ("expected one of: ...") serves every value.
fn named<T: FromStr<Err = String>>(key: &str, value: Value) -> Result<T, ConfigError> {
    let name = match &value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    name.parse()
        .map_err(|reason: String| invalid(key, shown(&value), reason))
}

fn boolean(key: &str, value: Value) -> Result<bool, ConfigError> {
    match value {
        Value::Boolean(b) => Ok(b),
        other => Err(invalid(key, shown(&other), "expected true or false")),
    }
}

fn duration(key: &str, value: Value) -> Result<ConfigDuration, ConfigError> {
    let text = text(
        key,
        value,
        "a duration in quotes, e.g. \"500ms\", \"10s\", \"2m\"",
    )?;
    text.parse()
        .map_err(|reason: String| invalid(key, format!("{text:?}"), reason))
}

/// A duration that must not be zero, because of `why`.
fn more_than_zero(key: &str, value: Value, why: &str) -> Result<ConfigDuration, ConfigError> {
    let duration = duration(key, value)?;
    if duration.get().is_zero() {
        return Err(invalid(
            key,
            format!("{:?}", duration.written()),
            format!("must be more than 0s: {why}"),
        ));
    }
    Ok(duration)
}

fn sampling_interval(key: &str, value: Value) -> Result<ConfigDuration, ConfigError> {
    let interval = duration(key, value)?;
    if interval.get() < MIN_MONITOR_INTERVAL {
        return Err(invalid(
            key,
            format!("{:?}", interval.written()),
            format!(
                "must be at least {MIN_MONITOR_INTERVAL:?}: each tick reads /proc for every worker on herd's main thread"
            ),
        ));
    }
    Ok(interval)
}

fn size(key: &str, value: Value) -> Result<ByteSize, ConfigError> {
    let text = text(
        key,
        value,
        "a size in quotes, e.g. \"64KiB\", \"512MiB\", \"1G\"",
    )?;
    text.parse()
        .map_err(|reason: String| invalid(key, format!("{text:?}"), reason))
}

fn worker_count(key: &str, value: Value) -> Result<WorkerCount, ConfigError> {
    let count = count_or_word(key, value, "max", MAX_WORKERS)?;
    Ok(count.map_or(WorkerCount::Max, WorkerCount::Count))
}

fn thread_count(key: &str, value: Value) -> Result<HandoffThreadCount, ConfigError> {
    let count = count_or_word(key, value, "auto", herd_protocol::page::MAX_HANDOFF_THREADS)?;
    Ok(count.map_or(HandoffThreadCount::Auto, HandoffThreadCount::Count))
}

/// A count from 1 to `max`, or `word` (`None`) for the host to decide.
fn count_or_word(
    key: &str,
    value: Value,
    word: &str,
    max: usize,
) -> Result<Option<usize>, ConfigError> {
    match value {
        Value::String(name) if name == word => Ok(None),
        Value::Integer(n) => Ok(Some(int(key, Value::Integer(n), 1, max as i64)? as usize)),
        other => Err(invalid(
            key,
            shown(&other),
            format!("expected a number from 1 to {max} or \"{word}\""),
        )),
    }
}

/// At most [`MAX_LISTENERS`] addresses, no two of which overlap.
fn addresses(key: &str, value: Value) -> Result<Vec<SocketAddr>, ConfigError> {
    let texts = strings(key, value, "a list of addresses, e.g. [\"127.0.0.1:3000\"]")?;
    let listen = texts
        .iter()
        .map(|text| {
            text.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    key,
                    format!("{text:?}"),
                    "expected IP:PORT, e.g. 127.0.0.1:3000 or [::1]:3000",
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if listen.len() > MAX_LISTENERS {
        return Err(invalid(
            key,
            format!("[{} addresses]", listen.len()),
            format!("herd holds at most {MAX_LISTENERS} listeners"),
        ));
    }
    for (index, addr) in listen.iter().enumerate() {
        if let Some(earlier) = listen[..index].iter().find(|a| overlaps(**a, *addr)) {
            return Err(invalid(
                key,
                format!("{:?}", addr.to_string()),
                format!(
                    "overlaps {:?}: the second bind would fail as a busy port",
                    earlier.to_string()
                ),
            ));
        }
    }
    Ok(listen)
}

/// The program and its arguments, none with a NUL byte (`exec` could not
/// pass it). An empty list is the default; `validate` refuses it.
fn argv(key: &str, value: Value) -> Result<Vec<String>, ConfigError> {
    let command = strings(
        key,
        value,
        "a list: the program and its arguments, e.g. [\"./server\", \"--port\", \"0\"]",
    )?;
    if let Some(index) = command.iter().position(|arg| arg.contains('\0')) {
        return Err(invalid(
            key,
            format!("{command:?}"),
            format!("argument {index} contains a NUL byte"),
        ));
    }
    Ok(command)
}

/// Names and values an environment can hold.
fn environment(key: &str, value: Value) -> Result<BTreeMap<String, String>, ConfigError> {
    let Value::Table(table) = value else {
        return Err(invalid(
            key,
            shown(&value),
            "expected a table of NAME = \"value\"",
        ));
    };
    let mut env = BTreeMap::new();
    for (name, value) in table {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(invalid(
                key,
                format!("{name:?}"),
                "not a valid environment variable name",
            ));
        }
        let entry = format!("{key}.{name}");
        let value = text(&entry, value, "a string")?;
        if value.contains('\0') {
            return Err(invalid(
                &entry,
                format!("{value:?}"),
                "contains a NUL byte, which no environment variable can hold",
            ));
        }
        env.insert(name, value);
    }
    Ok(env)
}

/// A path `chdir` can take; whether the workers may enter it is `resolve`'s.
fn directory(key: &str, value: Value) -> Result<PathBuf, ConfigError> {
    let dir = text(key, value, "a directory in quotes")?;
    if dir.contains('\0') {
        return Err(invalid(key, format!("{dir:?}"), "contains a NUL byte"));
    }
    Ok(PathBuf::from(dir))
}

/// The control socket's path, which must fit a `sockaddr_un`.
fn socket_path(key: &str, value: Value) -> Result<PathBuf, ConfigError> {
    let text = text(key, value, "a path in quotes, e.g. \"herd.sock\"")?;
    let refuse = |reason: String| invalid(key, format!("{text:?}"), reason);
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

/// "IP:PORT", or "PORT" alone for 127.0.0.1: metrics stay on loopback unless asked.
fn endpoint(key: &str, value: Value) -> Result<SocketAddr, ConfigError> {
    const EXPECTED: &str = "expected IP:PORT (e.g. 127.0.0.1:9464) or a port for 127.0.0.1";
    let text = text(key, value, "\"IP:PORT\" or \"PORT\" in quotes")?;
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse()
        .map_err(|_| invalid(key, format!("{text:?}"), EXPECTED))
}
