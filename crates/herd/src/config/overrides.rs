//! The command-line flags merged over the file: [`Overrides`], each read by
//! the same key reader as the file's value (`keys`), so a flag is refused
//! with the same words as the key in the file.

use super::*;

use toml::Value;

/// Values given on the command line; each replaces the file's value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Vec<String>,
    pub workers: Option<String>,
    pub handoff_threads: Option<String>,
    pub mode: Option<String>,
    pub rotation: Option<String>,
    pub protocol: Option<String>,
    pub backlog: Option<i64>,
    pub command: Vec<String>,
    pub max_unacked: Option<i64>,
    pub queue_limit: Option<i64>,
    pub ready_delay: Option<String>,
    pub stop_signal: Option<String>,
    pub ready: Option<String>,
    pub control: Option<String>,
    pub metrics: Option<String>,
    pub node_primary: Option<String>,
}

/// A list of strings as TOML holds it.
fn list(items: Vec<String>) -> Value {
    Value::Array(items.into_iter().map(Value::String).collect())
}

impl Config {
    /// Replaces file values with the ones given on the command line,
    /// refusing a flag's value as the file's would be.
    pub fn apply(&mut self, overrides: Overrides) -> Result<(), ConfigError> {
        if !overrides.listen.is_empty() {
            self.listen = keys::listen(list(overrides.listen))?;
        }
        if let Some(workers) = overrides.workers {
            // `--workers 4` is the number 4, as `workers = 4` is.
            let value = match workers.parse() {
                Ok(n) => Value::Integer(n),
                Err(_) => Value::String(workers),
            };
            self.workers = keys::workers(value)?;
        }
        if let Some(threads) = overrides.handoff_threads {
            let value = match threads.parse() {
                Ok(n) => Value::Integer(n),
                Err(_) => Value::String(threads),
            };
            self.handoff_threads = keys::handoff_threads(value)?;
        }
        if let Some(mode) = overrides.mode {
            self.mode = keys::mode(Value::String(mode))?;
        }
        if let Some(rotation) = overrides.rotation {
            self.rotation = keys::rotation(Value::String(rotation))?;
        }
        if let Some(protocol) = overrides.protocol {
            self.protocol = keys::protocol(Value::String(protocol))?;
        }
        if let Some(backlog) = overrides.backlog {
            self.backlog = keys::backlog(Value::Integer(backlog))?;
        }
        if !overrides.command.is_empty() {
            self.command = keys::command(list(overrides.command))?;
        }
        if let Some(n) = overrides.max_unacked {
            self.handoff.max_unacked = keys::handoff_max_unacked(Value::Integer(n))?;
        }
        if let Some(n) = overrides.queue_limit {
            self.handoff.queue_limit = keys::handoff_queue_limit(Value::Integer(n))?;
        }
        if let Some(delay) = overrides.ready_delay {
            self.ready_delay = keys::ready_delay(Value::String(delay))?;
        }
        if let Some(signal) = overrides.stop_signal {
            self.stop_signal = keys::stop_signal(Value::String(signal))?;
        }
        if let Some(ready) = overrides.ready {
            self.ready = keys::ready(Value::String(ready))?;
        }
        if let Some(path) = overrides.control {
            self.control = keys::control(Value::String(path))?;
        }
        if let Some(address) = overrides.metrics {
            self.metrics.address = keys::metrics_address(Value::String(address))?;
        }
        if let Some(primary) = overrides.node_primary {
            self.node.primary = keys::node_primary(Value::String(primary))?;
        }
        Ok(())
    }
}
