//! The value syntaxes of the config, as types: durations ([`ConfigDuration`])
//! and sizes ([`ByteSize`]) with their parsers, the named choices
//! ([`WorkerCount`], [`ProtocolChoice`], [`Rotation`], [`KillMode`],
//! [`WorkerProtocol`], [`StopSignal`], [`Readiness`]) with the names they accept, and which addresses
//! overlap. Each parses with `FromStr`, whose error is the reason a value is
//! refused; `keys` adds the key and the value.

use super::*;

use std::str::FromStr;

use nix::sys::signal::Signal;

/// A duration as written in the config ("250ms", "10s", "1.5m", "1h"):
/// its value, and its text for the messages that quote it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigDuration {
    duration: Duration,
    /// As written, so a refusal quotes what the user wrote ("2m", not "120s").
    written: String,
}

impl ConfigDuration {
    pub fn get(&self) -> Duration {
        self.duration
    }

    pub fn written(&self) -> &str {
        &self.written
    }

    /// A built-in default, written as the docs write it.
    pub(super) fn default_of(text: &'static str) -> ConfigDuration {
        text.parse()
            .unwrap_or_else(|why| panic!("the default {text:?} is no duration: {why}"))
    }
}

impl FromStr for ConfigDuration {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(ConfigDuration {
            duration: parse_duration(text)?,
            written: text.to_string(),
        })
    }
}

impl fmt::Display for ConfigDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.written)
    }
}

/// A size in bytes, written "512MiB", "1G", "100M", "64KiB" or a plain number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(u64);

impl ByteSize {
    pub fn bytes(self) -> u64 {
        self.0
    }

    /// A default written as a config file would write it.
    pub(super) fn default_of(text: &'static str) -> ByteSize {
        text.parse().expect("a valid default size")
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_size(text).map(ByteSize)
    }
}

/// `workers = 4` or `workers = "max"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerCount {
    /// One per available core, counted when the config is resolved.
    Max,
    /// From 1 to [`MAX_WORKERS`].
    Count(usize),
}

/// `handoff_threads = 2` or `handoff_threads = "auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoffThreadCount {
    /// One per [`CORES_PER_HANDOFF_THREAD`] available cores, at least one
    /// (and one in the modes that hand nothing off).
    Auto,
    /// From 1 to [`herd_protocol::page::MAX_HANDOFF_THREADS`].
    Count(usize),
}

/// `handoff_threads = "auto"` runs a hand-off thread per this many cores:
/// one thread hands off about 70k connections/s (BENCHMARKS.md), about
/// what eight cores of small workers serve.
pub const CORES_PER_HANDOFF_THREAD: usize = 8;

/// `protocol`: what workers speak, as the config chooses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolChoice {
    /// Node cluster when the program is `node` or `nodejs`, else herd's.
    Auto,
    Herd,
    NodeCluster,
    /// A program that binds its own port, with herd's preload library.
    Preload,
}

impl ProtocolChoice {
    pub const NAMES: &'static [&'static str] = &["auto", "herd", "node-cluster", "preload"];
}

impl FromStr for ProtocolChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(ProtocolChoice::Auto),
            "herd" => Ok(ProtocolChoice::Herd),
            "node-cluster" => Ok(ProtocolChoice::NodeCluster),
            "preload" => Ok(ProtocolChoice::Preload),
            _ => Err(expected_one_of(Self::NAMES)),
        }
    }
}

/// `rotation`: how round-robin deals connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// The kernel for Node workers and for servers ready by `notify`,
    /// hand-offs for the others.
    Auto,
    /// An eBPF program deals them over per-slot sockets: Node workers get
    /// theirs over the cluster channel, the others inherit it as fd 3.
    Kernel,
    /// herd accepts each one and hands it over the worker's channel.
    Handoff,
}

impl Rotation {
    pub const NAMES: &'static [&'static str] = &["auto", "kernel", "handoff"];
}

impl FromStr for Rotation {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(Rotation::Auto),
            "kernel" => Ok(Rotation::Kernel),
            "handoff" => Ok(Rotation::Handoff),
            _ => Err(expected_one_of(Self::NAMES)),
        }
    }
}

/// `ready` (or `--ready`): how herd learns that a starting worker is ready,
/// by the convention its server already follows.
#[derive(Debug, Clone, PartialEq)]
pub enum Readiness {
    /// READY on herd's channel: herd-protocol and Node cluster workers.
    Herd,
    /// `READY=1` on the worker's own `NOTIFY_SOCKET` (systemd's
    /// `sd_notify(3)`), e.g. gunicorn.
    Notify,
    /// Counted ready this long after it starts (`ready_delay`), for
    /// servers that say nothing.
    Delay(ConfigDuration),
    /// Ready once a connection herd makes to the worker's own socket is
    /// accepted by it.
    Tcp,
    /// Ready once `GET path` on the worker's own socket is answered 2xx.
    Http(HttpPath),
}

/// The path of `ready = "http:/path"`: starts with `/`, printable ASCII
/// without spaces, at most [`HttpPath::MAX_LEN`] bytes, so it goes into a
/// request line as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpPath(String);

impl HttpPath {
    pub const MAX_LEN: usize = 1024;

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for HttpPath {
    type Err = String;

    fn from_str(path: &str) -> Result<Self, Self::Err> {
        if !path.starts_with('/') {
            return Err(format!("the path {path:?} must start with /"));
        }
        if path.len() > Self::MAX_LEN {
            return Err(format!("the path is over {} bytes", Self::MAX_LEN));
        }
        if !path.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "the path {path:?} must be printable ASCII without spaces (percent-encode the rest)"
            ));
        }
        Ok(HttpPath(path.to_string()))
    }
}

impl Readiness {
    pub const NAMES: &'static [&'static str] = &[
        "herd",
        "notify",
        "tcp",
        "http:/PATH (e.g. \"http:/health\")",
        "delay:DUR (e.g. \"delay:1s\")",
    ];

    /// herd finds out by connecting to the worker's own socket.
    pub fn probes(&self) -> bool {
        matches!(self, Readiness::Tcp | Readiness::Http(_))
    }

    /// The delay after which a worker counts as ready unasked, if any.
    pub fn delay(&self) -> Option<Duration> {
        match self {
            Readiness::Delay(delay) => Some(delay.get()),
            _ => None,
        }
    }

    /// How `ready` writes it: `herd`, `notify`, `delay:1s`.
    pub fn name(&self) -> String {
        match self {
            Readiness::Herd => "herd".into(),
            Readiness::Notify => "notify".into(),
            Readiness::Delay(delay) => format!("delay:{delay}"),
            Readiness::Tcp => "tcp".into(),
            Readiness::Http(path) => format!("http:{}", path.as_str()),
        }
    }

    /// What herd waits for before a worker gets connections, for `herd check`.
    pub fn describe(&self) -> String {
        match self {
            Readiness::Herd => "READY on the worker's herd channel".into(),
            Readiness::Notify => {
                "READY=1 from the worker's main process on its own NOTIFY_SOCKET (sd_notify)".into()
            }
            Readiness::Delay(delay) => format!("{delay} after it starts, unasked"),
            Readiness::Tcp => {
                "a connection herd makes to the worker's own socket, accepted by it".into()
            }
            Readiness::Http(path) => format!(
                "GET {} on the worker's own socket, answered 2xx",
                path.as_str()
            ),
        }
    }
}

impl FromStr for Readiness {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "herd" => Ok(Readiness::Herd),
            "notify" => Ok(Readiness::Notify),
            "tcp" => Ok(Readiness::Tcp),
            _ if text.starts_with("http:") => text["http:".len()..].parse().map(Readiness::Http),
            _ => match text.strip_prefix("delay:") {
                Some(delay) => delay
                    .parse()
                    .map(Readiness::Delay)
                    .map_err(|why| format!("the delay {delay:?}: {why}")),
                None => Err(expected_one_of(Self::NAMES)),
            },
        }
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
    pub const NAMES: &'static [&'static str] = &["auto", "control-group", "process-group"];

    pub fn name(self) -> &'static str {
        match self {
            KillMode::Auto => "auto",
            KillMode::ControlGroup => "control-group",
            KillMode::ProcessGroup => "process-group",
        }
    }
}

impl FromStr for crate::line_format::LineFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::of(text).ok_or_else(|| expected_one_of(Self::NAMES))
    }
}

impl FromStr for KillMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(KillMode::Auto),
            "control-group" => Ok(KillMode::ControlGroup),
            "process-group" => Ok(KillMode::ProcessGroup),
            _ => Err(expected_one_of(Self::NAMES)),
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
    /// herd's protocol, spoken for an unmodified program that binds its own
    /// port by herd's preload library (`crates/herd-preload`), which
    /// captures that bind.
    Preload,
}

impl WorkerProtocol {
    pub fn name(self) -> &'static str {
        match self {
            WorkerProtocol::Herd => "herd",
            WorkerProtocol::NodeCluster => "node-cluster",
            WorkerProtocol::Preload => "preload",
        }
    }
}

/// `stop_signal`: the signal a server stops gracefully on, by its own
/// convention (nginx: SIGQUIT, lighttpd: SIGINT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopSignal(Signal);

impl StopSignal {
    /// The signals a server may take as "finish what you have and exit".
    pub const NAMES: &'static [(&'static str, Signal)] = &[
        ("SIGTERM", Signal::SIGTERM),
        ("SIGQUIT", Signal::SIGQUIT),
        ("SIGINT", Signal::SIGINT),
        ("SIGHUP", Signal::SIGHUP),
        ("SIGUSR1", Signal::SIGUSR1),
        ("SIGUSR2", Signal::SIGUSR2),
        ("SIGWINCH", Signal::SIGWINCH),
    ];

    pub fn get(self) -> Signal {
        self.0
    }
}

impl FromStr for StopSignal {
    type Err = String;

    /// `"SIGQUIT"` or `"QUIT"`, in any case.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let upper = text.to_ascii_uppercase();
        let name = match upper.strip_prefix("SIG") {
            Some(_) => upper.clone(),
            None => format!("SIG{upper}"),
        };
        match name.as_str() {
            "SIGKILL" => {
                return Err(
                    "SIGKILL cannot be caught, so no server can stop gracefully on it; \
                            herd sends it itself after `shutdown_timeout`"
                        .into(),
                )
            }
            "SIGSTOP" => {
                return Err("SIGSTOP cannot be caught and only freezes the worker, \
                            which would then be SIGKILLed at `shutdown_timeout`"
                    .into())
            }
            _ => {}
        }
        Self::NAMES
            .iter()
            .find(|(known, _)| *known == name)
            .map(|&(_, signal)| StopSignal(signal))
            .ok_or_else(|| {
                let names: Vec<&str> = Self::NAMES.iter().map(|(name, _)| *name).collect();
                format!(
                    "expected one of: {} (the SIG prefix may be left out)",
                    names.join(", ")
                )
            })
    }
}

fn expected_one_of(names: &[&str]) -> String {
    format!("expected one of: {}", names.join(", "))
}

/// Two listening sockets on these addresses cannot both be bound: the same
/// port (not 0, which picks a free one each time) on the same address, or
/// on a wildcard and any address of its family. IPv6 listeners are
/// IPv6-only, so the families never collide.
pub(super) fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// The number of cores herd may use (honours CPU affinity and cgroup limits).
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
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
