//! What `herd reload` can change, per key, in one table ([`RELOAD`]): the
//! reload decides with it which changes it refuses, and words the refusal
//! from it. README's configuration reference and `config.toml` state the
//! same per key; a test holds the three together.
//!
//! A reload starts new workers, so everything herd reads when it starts a
//! worker applies, and the `[handoff]` limits are handed to the hand-off
//! loop. What herd set up once at start does not: the listeners, how they
//! are served, where workers' processes are kept, the control socket, the
//! metrics endpoint and the monitor's timer.

use super::*;

/// What a reload does with a changed key.
#[derive(Debug, Clone, Copy)]
pub enum Reload {
    /// Applied: new workers start with it, or the hand-off loop takes it.
    Live,
    /// Set up once when herd starts: a reload that changes it is refused.
    /// The function shows the key's value in the refusal.
    Restart(fn(&Settings) -> String),
}

impl Reload {
    /// How README and `config.toml` say it: `live` or `restart`.
    pub fn word(self) -> &'static str {
        match self {
            Reload::Live => "live",
            Reload::Restart(_) => "restart",
        }
    }
}

/// Every config key (dotted below its table: `handoff.max_unacked`), and
/// what a reload does when it changes.
pub const RELOAD: &[(&str, Reload)] = &[
    ("listen", Reload::Restart(|s| addresses(&s.listen))),
    ("backlog", Reload::Restart(|s| s.backlog.to_string())),
    ("workers", Reload::Live),
    ("mode", Reload::Restart(|s| s.mode.name().into())),
    (
        "handoff_threads",
        Reload::Restart(|s| s.handoff_threads.to_string()),
    ),
    ("command", Reload::Live),
    ("protocol", Reload::Restart(|s| s.protocol.name().into())),
    ("rotation", Reload::Restart(rotation)),
    ("env", Reload::Live),
    ("cwd", Reload::Live),
    ("shutdown_timeout", Reload::Live),
    ("shutdown_delay", Reload::Live),
    ("ready_min", Reload::Live),
    ("log_lines", Reload::Live),
    ("log_timestamps", Reload::Live),
    (
        "log_dir",
        Reload::Restart(|s| {
            format!(
                "{:?}",
                s.log_files.as_ref().map(|f| f.dir.display().to_string())
            )
        }),
    ),
    (
        "log_file_size",
        Reload::Restart(|s| format!("{:?}", s.log_files.as_ref().map(|f| f.max_size))),
    ),
    (
        "log_file_keep",
        Reload::Restart(|s| format!("{:?}", s.log_files.as_ref().map(|f| f.keep))),
    ),
    ("stop_signal", Reload::Live),
    ("ready_timeout", Reload::Live),
    ("ready_delay", Reload::Live),
    ("ready", Reload::Live),
    ("hang_timeout", Reload::Live),
    ("kill_mode", Reload::Restart(|s| s.kill_mode.name().into())),
    ("reload_batch", Reload::Live),
    ("max_memory", Reload::Live),
    ("max_connections_per_worker", Reload::Live),
    ("max_connections_jitter", Reload::Live),
    ("user", Reload::Live),
    ("group", Reload::Live),
    (
        "control",
        Reload::Restart(|s| s.control.display().to_string()),
    ),
    (
        "monitor_interval",
        Reload::Restart(|s| format!("{:?}", s.monitor_interval)),
    ),
    (
        "metrics.address",
        Reload::Restart(|s| s.metrics.map_or("none".into(), |a| a.to_string())),
    ),
    ("handoff.max_unacked", Reload::Live),
    ("handoff.ack_timeout", Reload::Live),
    ("handoff.queue_limit", Reload::Live),
    ("handoff.queue_timeout", Reload::Live),
    ("restart.backoff_base", Reload::Live),
    ("restart.backoff_max", Reload::Live),
    ("restart.min_uptime", Reload::Live),
    ("restart.max_restarts", Reload::Live),
    ("restart.window", Reload::Live),
    (
        "node.primary",
        Reload::Restart(|s| s.node_primary.name().into()),
    ),
];

/// Keys whose value follows from others too: named only when it is the
/// change, not again beside the key that changed it.
const FOLLOWS: &[(&str, &[&str])] = &[("rotation", &["mode", "protocol"])];

fn addresses(list: &[SocketAddr]) -> String {
    let list: Vec<String> = list.iter().map(ToString::to_string).collect();
    format!("[{}]", list.join(", "))
}

fn rotation(settings: &Settings) -> String {
    match settings.handoff.kernel_rotation {
        true => "kernel".into(),
        false => "handoff".into(),
    }
}

impl Settings {
    /// The keys `new` changes that only a restart of herd can apply, each as
    /// ``"`key` (old -> new)"``; empty when a reload can apply all of `new`.
    pub fn restart_needed(&self, new: &Settings) -> Vec<String> {
        let changed: Vec<(&str, String, String)> = RELOAD
            .iter()
            .filter_map(|&(key, reload)| match reload {
                Reload::Live => None,
                Reload::Restart(show) => Some((key, show(self), show(new))),
            })
            .filter(|(_, old, new)| old != new)
            .collect();
        let named = |key: &str| changed.iter().any(|(changed, ..)| *changed == key);
        changed
            .iter()
            .filter(|(key, ..)| {
                !FOLLOWS
                    .iter()
                    .any(|(follower, from)| follower == key && from.iter().any(|k| named(k)))
            })
            .map(|(key, old, new)| format!("`{key}` ({old} -> {new})"))
            .collect()
    }

    /// Why a reload to `new` is refused as a whole, naming each key only a
    /// restart can change; `None` when a reload can apply all of it.
    pub fn reload_refusal(&self, new: &Settings) -> Option<String> {
        let changed = self.restart_needed(new);
        let (them, changes) = match changed.as_slice() {
            [] => return None,
            [one] => ("it", one.clone()),
            [first @ .., last] => ("them", format!("{} and {last}", first.join(", "))),
        };
        Some(format!(
            "reload refused, keeping the running config: {changes} cannot change by reload: restart herd to change {them}"
        ))
    }
}
