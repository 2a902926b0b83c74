//! What every `herd run` of a comparison is given: the mode's own flags,
//! the settings passed through from `herd compare` (`--ready`,
//! `--stop-signal`, `--listen`, `--config`), and what compare sets itself
//! (workers, listen address, control socket, metrics). The passed-through
//! settings are checked up front by herd's own config readers, so a value
//! `herd run` would refuse is refused before anything starts, in herd's
//! words.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use herd::config::{Config, ConfigError, Overrides, ProtocolChoice, Readiness};

use super::{CompareError, CompareOptions};

/// The listen address when `--listen` is not given: a free port per run,
/// so runs never wait for one another's port.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:0";

/// The `kernel` entry of `--modes`: round-robin whose turns the kernel
/// deals (`--rotation kernel`), not a mode of herd's own.
pub const KERNEL: &str = "kernel";

/// The settings `herd compare` passes to every `herd run` unchanged.
#[derive(Debug, Clone, Default)]
pub struct PassedOn {
    /// `--ready`: how the worker says it is ready (herd, notify, delay:DUR).
    pub ready: Option<String>,
    /// `--stop-signal`: the signal that stops the worker gracefully.
    pub stop_signal: Option<String>,
    /// `--listen`: a fixed address, for servers that need one; every run
    /// binds it in turn.
    pub listen: Option<String>,
    /// `--config`: a config file whose settings every run starts from; the
    /// flags compare gives win over it, as they do for `herd run -c`.
    pub config: Option<PathBuf>,
}

/// What the flags and the config file say together, once checked.
#[derive(Debug, Clone)]
pub(super) struct Checked {
    /// The worker command: after `--`, else the config file's.
    pub(super) command: Vec<String>,
    /// `--ready`, else the file's `ready` or `ready_delay`; `None`: herd's channel.
    readiness: Option<Readiness>,
    /// The workers speak Node's cluster protocol (as herd decides it).
    node: bool,
    /// The file serves metrics: each run gets a port of its own instead.
    metrics_in_file: bool,
    /// The address every run listens on.
    pub(super) listen: SocketAddr,
}

impl Checked {
    /// The modes that can run this worker, in [`super::MODES`] order.
    /// A server that does not speak herd's protocol (ready by notify or a
    /// delay) cannot take hand-offs, so round-robin, sticky and least-conn
    /// would only hang it: it gets the modes where it accepts by itself
    /// (shared, reuseport) and the kernel's rotation. Node cluster apps
    /// cannot run in reuseport (their protocol has no per-worker sockets).
    pub(super) fn default_modes(&self) -> Vec<String> {
        let plain = matches!(
            self.readiness,
            Some(Readiness::Notify | Readiness::Delay(_))
        );
        super::MODES
            .iter()
            .filter(|&&mode| match mode {
                "round-robin" | "sticky" | "least-conn" => !plain,
                "reuseport" => !self.node,
                _ => true,
            })
            .map(|mode| mode.to_string())
            .collect()
    }

    /// The fixed address a run must find free before it starts, if any.
    pub(super) fn fixed_listen(&self) -> Option<SocketAddr> {
        (self.listen.port() != 0).then_some(self.listen)
    }
}

/// Checks each passed-on flag on its own (so its refusal names it), then
/// the config file with every flag merged over it, as `herd run` would.
/// The host is not asked (the program may be missing: every row then says
/// so), nor is the mode, which is each run's own.
pub(super) fn check(options: &CompareOptions) -> Result<Checked, CompareError> {
    let passed = &options.passed_on;
    let flags = [
        (
            "--ready",
            &passed.ready,
            overrides_ready as fn(String) -> Overrides,
        ),
        ("--stop-signal", &passed.stop_signal, overrides_stop_signal),
        ("--listen", &passed.listen, overrides_listen),
    ];
    for (flag, value, overrides) in flags {
        if let Some(value) = value {
            Config::default()
                .apply(overrides(value.clone()))
                .map_err(|e| refused(flag, value, e))?;
        }
    }
    let in_file = |e: ConfigError| match &passed.config {
        Some(path) => CompareError::Options(format!("--config {}: {e}", path.display())),
        None => CompareError::Options(e.to_string()),
    };
    let mut config = Config::load(Some(config_path(passed))).map_err(in_file)?;
    let metrics_in_file = config.metrics.address.is_some();
    config
        .apply(Overrides {
            listen: vec![listen_of(passed).to_string()],
            workers: Some(options.workers.to_string()),
            mode: Some("round-robin".into()),
            rotation: Some("handoff".into()),
            command: options.command.clone(),
            ready: passed.ready.clone(),
            stop_signal: passed.stop_signal.clone(),
            ..Overrides::default()
        })
        .map_err(in_file)?;
    if config.command.is_empty() {
        return Err(CompareError::Options(
            "no worker command: give it after --, e.g. -- ./my-worker".into(),
        ));
    }
    let checked = Checked {
        command: config.command.clone(),
        readiness: config
            .ready
            .clone()
            .or_else(|| config.ready_delay.clone().map(Readiness::Delay)),
        node: is_node(&config),
        metrics_in_file,
        listen: config.listen[0],
    };
    config.validate().map_err(in_file)?;
    Ok(checked)
}

fn overrides_ready(value: String) -> Overrides {
    Overrides {
        ready: Some(value),
        ..Overrides::default()
    }
}

fn overrides_stop_signal(value: String) -> Overrides {
    Overrides {
        stop_signal: Some(value),
        ..Overrides::default()
    }
}

fn overrides_listen(value: String) -> Overrides {
    Overrides {
        listen: vec![value],
        ..Overrides::default()
    }
}

/// `invalid --ready "soon": expected ...`: the flag, its value and herd's reason.
fn refused(flag: &str, value: &str, error: ConfigError) -> CompareError {
    match error {
        ConfigError::Invalid { reason, .. } => {
            CompareError::Options(format!("invalid {flag} {value:?}: {reason}"))
        }
        other => CompareError::Options(format!("invalid {flag} {value:?}: {other}")),
    }
}

/// `--config`, else no file at all: not `./config.toml`, which belongs to
/// whatever herd the current directory runs, not to the comparison.
fn config_path(passed: &PassedOn) -> &Path {
    passed.config.as_deref().unwrap_or(Path::new("/dev/null"))
}

fn listen_of(passed: &PassedOn) -> &str {
    passed.listen.as_deref().unwrap_or(DEFAULT_LISTEN)
}

/// Whether herd will speak Node's cluster protocol to this command: the
/// file's `protocol`, or for "auto" the program's name, as herd decides it.
fn is_node(config: &Config) -> bool {
    match config.protocol {
        ProtocolChoice::NodeCluster => true,
        ProtocolChoice::Herd | ProtocolChoice::Preload => false,
        ProtocolChoice::Auto => herd::config::names_node(&config.command),
    }
}

/// `herd run` arguments for one row: the passed-on settings, then what
/// compare sets (which win over the file, as flags do).
pub(super) fn run_args(
    options: &CompareOptions,
    checked: &Checked,
    mode: &str,
    control: &Path,
) -> Vec<OsString> {
    let passed = &options.passed_on;
    let mut args: Vec<OsString> = vec!["run".into(), "-c".into()];
    args.push(config_path(passed).into());
    args.extend(["--listen", listen_of(passed)].map(OsString::from));
    args.extend(["--workers".into(), options.workers.to_string().into()]);
    args.extend(mode_args(mode).iter().map(OsString::from));
    args.push("--control".into());
    args.push(control.into());
    if checked.metrics_in_file {
        // The file's metrics port may be taken by the herd it was written for.
        args.extend(["--metrics", "127.0.0.1:0"].map(OsString::from));
    }
    for (flag, value) in [
        ("--ready", &passed.ready),
        ("--stop-signal", &passed.stop_signal),
    ] {
        if let Some(value) = value {
            args.extend([flag, value.as_str()].map(OsString::from));
        }
    }
    if !options.command.is_empty() {
        args.push("--".into());
        args.extend(options.command.iter().map(OsString::from));
    }
    args
}

/// A `--modes` entry as `herd run` flags. Every hand-off mode says
/// `--rotation handoff`, so that `round-robin` is herd's own dealing even
/// for Node workers (whose default is the kernel's) and `kernel` is the
/// only row the kernel deals.
fn mode_args(mode: &str) -> [&str; 4] {
    match mode {
        KERNEL => ["--mode", "round-robin", "--rotation", "kernel"],
        mode => ["--mode", mode, "--rotation", "handoff"],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(readiness: Option<Readiness>, node: bool) -> Checked {
        Checked {
            command: vec!["w".into()],
            readiness,
            node,
            metrics_in_file: false,
            listen: DEFAULT_LISTEN.parse().unwrap(),
        }
    }

    #[test]
    fn default_modes_are_those_that_can_run_the_worker() {
        let herd = checked(None, false).default_modes();
        assert_eq!(herd, super::super::MODES);
        let notify = checked(Some(Readiness::Notify), false).default_modes();
        assert_eq!(notify, ["shared", "reuseport", "kernel"]);
        let node = checked(None, true).default_modes();
        assert_eq!(
            node,
            ["round-robin", "sticky", "least-conn", "shared", "kernel"]
        );
    }

    #[test]
    fn modes_become_herd_flags() {
        assert_eq!(
            mode_args("kernel"),
            ["--mode", "round-robin", "--rotation", "kernel"]
        );
        assert_eq!(
            mode_args("sticky"),
            ["--mode", "sticky", "--rotation", "handoff"]
        );
    }

    #[test]
    fn is_node_as_herd_decides_it() {
        let mut config = Config {
            command: vec!["/usr/bin/node".into(), "app.js".into()],
            ..Config::default()
        };
        assert!(is_node(&config));
        config.protocol = ProtocolChoice::Herd;
        assert!(!is_node(&config));
        config.command = vec!["gunicorn".into()];
        config.protocol = ProtocolChoice::Auto;
        assert!(!is_node(&config));
    }
}
