//! The rules that span several keys, checked once every key has been read
//! on its own (`keys`) and the flags merged: what a worker speaks and how
//! its connections are dealt, which addresses may be left out or must not
//! meet, and the durations that must stay in order. No I/O: what the host
//! says is `resolve`'s.

use super::*;

/// A [`Config`] whose keys agree with each other, and what they decide
/// together; [`resolve`] turns it into [`Settings`].
#[derive(Debug, Clone)]
pub struct ValidConfig {
    pub(super) config: Config,
    /// `protocol`, with "auto" decided by the program's name.
    pub(super) protocol: WorkerProtocol,
    /// `rotation`, decided for this mode and protocol.
    pub(super) kernel_rotation: bool,
}

impl Config {
    /// Checks the rules that span several keys.
    pub fn validate(self) -> Result<ValidConfig, ConfigError> {
        if let (None, Some(group)) = (&self.user, &self.group) {
            return Err(invalid(
                "group",
                format!("{group:?}"),
                "set `user` too: herd drops privileges to a user",
            ));
        }
        program_of(&self.command)?;
        let protocol = match self.protocol {
            ProtocolChoice::Herd => WorkerProtocol::Herd,
            ProtocolChoice::NodeCluster => WorkerProtocol::NodeCluster,
            ProtocolChoice::Preload => WorkerProtocol::Preload,
            // The name decides, as it will of the program found in PATH.
            ProtocolChoice::Auto if names_node(&self.command) => WorkerProtocol::NodeCluster,
            ProtocolChoice::Auto => WorkerProtocol::Herd,
        };
        let kernel_rotation = self.dealing(protocol)?;
        // Node cluster apps say what they listen on, as with Node's primary.
        if self.listen.is_empty() && protocol != WorkerProtocol::NodeCluster {
            return Err(invalid(
                "listen",
                "[]",
                "no address to listen on: give --listen ADDR or `listen = [\"127.0.0.1:3000\"]` (only Node cluster apps may leave it out: herd then binds what they listen on)",
            ));
        }
        self.durations_in_order()?;
        if let Some(addr) = self.metrics.address {
            if let Some(taken) = self.listen.iter().find(|a| overlaps(**a, addr)) {
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
        Ok(ValidConfig {
            config: self,
            protocol,
            kernel_rotation,
        })
    }

    /// Why more than one hand-off thread cannot be had with this config
    /// (`None`: it can): only herd-protocol workers count per thread,
    /// and only the hand-off modes have herd accept.
    pub(super) fn threads_refusal(
        &self,
        protocol: WorkerProtocol,
        kernel_rotation: bool,
    ) -> Option<String> {
        if !self.mode.hands_off() {
            return Some(format!(
                "mode {:?} has the kernel deal connections to the workers: herd accepts none (hand-off threads are for round-robin, sticky and least-conn)",
                self.mode.name()
            ));
        }
        if kernel_rotation {
            return Some(
                "round-robin is dealt by the kernel here (`rotation`): herd accepts none".into(),
            );
        }
        match protocol {
            WorkerProtocol::Herd => None,
            WorkerProtocol::NodeCluster => Some(
                "Node cluster workers take connections from one thread (Node's channel is one stream of lines)".into(),
            ),
            WorkerProtocol::Preload => Some(
                "preloaded programs take one hand-off at a time, from one thread".into(),
            ),
        }
    }

    /// Whether round-robin is dealt by the kernel (`rotation`), for this
    /// mode and `protocol`; refused where the two cannot go together.
    /// `auto` picks the kernel for Node cluster workers and for servers
    /// that take only an inherited socket, known by `ready = "notify"`
    /// (systemd's convention, which comes with systemd's socket passing);
    /// herd-protocol workers keep the hand-off, with its queue, limits and
    /// least-conn, and so do workers made ready by a delay, which may be
    /// either (`rotation = "kernel"` says which).
    pub(super) fn dealing(&self, protocol: WorkerProtocol) -> Result<bool, ConfigError> {
        let node = protocol == WorkerProtocol::NodeCluster;
        if node && self.mode == Mode::ReusePort {
            return Err(invalid(
                "mode",
                format!("{:?}", self.mode.name()),
                "Node cluster workers run in round-robin, sticky, least-conn or shared mode (Node's cluster protocol has no per-worker sockets)",
            ));
        }
        let ready = self.readiness()?;
        let probes = ready.as_ref().is_some_and(Readiness::probes);
        if probes {
            self.probed_on_own_sockets(node)?;
        }
        let socket_only = !node && (probes || matches!(ready, Some(Readiness::Notify)));
        match self.rotation {
            Rotation::Auto => Ok((node || socket_only) && self.mode == Mode::RoundRobin),
            Rotation::Handoff => Ok(false),
            Rotation::Kernel if self.mode != Mode::RoundRobin => Err(invalid(
                "rotation",
                "\"kernel\"",
                format!(
                    "kernel rotation is round-robin's; mode {:?} has its own way of dealing",
                    self.mode.name()
                ),
            )),
            Rotation::Kernel => Ok(true),
        }
    }

    /// A probe (`ready = "tcp"` or `"http:/path"`) must reach the starting
    /// worker's own socket: `reuseport`, or round-robin by the kernel.
    fn probed_on_own_sockets(&self, node: bool) -> Result<(), ConfigError> {
        let why = if node {
            "Node cluster workers say they listen on herd's channel: use ready = \"herd\""
        } else if self.mode == Mode::ReusePort
            || (self.mode == Mode::RoundRobin && self.rotation != Rotation::Handoff)
        {
            return Ok(());
        } else if self.mode == Mode::Shared {
            "in mode \"shared\" every worker accepts from one queue, so a probe cannot tell which one answered: use mode \"reuseport\" or round-robin with rotation \"kernel\", where each worker has a socket of its own"
        } else {
            "a probe needs the worker's own socket: use mode \"reuseport\" or round-robin with rotation \"kernel\" (hand-offs reach only herd-protocol workers, which say READY)"
        };
        let ready = self.readiness()?.map(|r| r.name()).unwrap_or_default();
        Err(invalid("ready", format!("{ready:?}"), why))
    }

    /// `restart.backoff_max` is not below `restart.backoff_base`, `ready`
    /// and `ready_delay` are not both set, and a delay (`ready_delay` or
    /// `ready = "delay:DUR"`) makes a worker ready before `ready_timeout` kills it.
    fn durations_in_order(&self) -> Result<(), ConfigError> {
        let restart = &self.restart;
        if restart.backoff_max.get() < restart.backoff_base.get() {
            return Err(invalid(
                "restart.backoff_max",
                format!("{:?}", restart.backoff_max.written()),
                format!(
                    "must not be less than restart.backoff_base ({})",
                    restart.backoff_base
                ),
            ));
        }
        if let Some(Readiness::Delay(delay)) = self.readiness()? {
            if delay.get() >= self.ready_timeout.get() {
                let (key, value) = match &self.ready {
                    Some(ready) => ("ready", format!("{:?}", ready.name())),
                    None => ("ready_delay", format!("{:?}", delay.written())),
                };
                return Err(invalid(
                    key,
                    value,
                    format!(
                        "must be shorter than `ready_timeout` ({}): a worker that never says READY would be killed before it counts as ready",
                        self.ready_timeout
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl Config {
    /// `ready`, or `ready_delay` as its alias `delay:DUR`; `None` when
    /// neither is set (READY on herd's channel). Both set is refused.
    pub(super) fn readiness(&self) -> Result<Option<Readiness>, ConfigError> {
        match (&self.ready, &self.ready_delay) {
            (Some(ready), Some(delay)) => Err(invalid(
                "ready_delay",
                format!("{:?}", delay.written()),
                format!(
                    "`ready` = {:?} is set too: `ready_delay` is the old name of `ready = \"delay:DUR\"`, so set one of them",
                    ready.name()
                ),
            )),
            (Some(ready), None) => Ok(Some(ready.clone())),
            (None, Some(delay)) => Ok(Some(Readiness::Delay(delay.clone()))),
            (None, None) => Ok(None),
        }
    }
}

/// The worker program and its arguments; an empty `command` (the default,
/// when neither the file nor the flags give one) is refused.
pub(super) fn program_of(command: &[String]) -> Result<(&str, &[String]), ConfigError> {
    match command.split_first() {
        Some((program, args)) if !program.is_empty() => Ok((program, args)),
        _ => Err(invalid(
            "command",
            format!("{command:?}"),
            "no worker program: give `-- PROGRAM ARGS...` or `command = [\"PROGRAM\", ...]`",
        )),
    }
}
