//! herd's output as the tests read it: its log events (herd runs with
//! `--log-format json`), its workers' output (the lines herd forwards
//! prefixed `[worker N] `), and the plain `herd: ...` message it prints
//! when it cannot run.
//!
//! Tests wait on an event's stable name (its `event` field) and its
//! fields, never on the sentence a human reads (`message`).

use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use serde_json::{Map, Value};

use super::DEADLINE;

/// Every line herd wrote to stdout and stderr, shared with the reader threads.
#[derive(Default)]
pub struct Log {
    state: Mutex<Lines>,
    /// Wakes the waits whenever a line arrives.
    changed: Condvar,
}

/// What has been read so far.
#[derive(Default)]
pub struct Lines {
    /// Every line, as written, in the order read (for diagnostics).
    pub raw: Vec<String>,
    /// The lines that are herd's log events, parsed by [`parse_event`].
    pub events: Vec<Value>,
}

impl Log {
    /// Reads `stream` line by line into the log, on a thread of its own.
    pub fn follow(self: &Arc<Self>, stream: impl Read + Send + 'static) {
        let log = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let mut state = log.state.lock().unwrap();
                if let Some(event) = parse_event(&line) {
                    state.events.push(event);
                }
                state.raw.push(line);
                drop(state);
                log.changed.notify_all();
            }
        });
    }

    /// What `look` finds in the log now.
    pub fn read<T>(&self, look: impl FnOnce(&Lines) -> T) -> T {
        look(&self.state.lock().unwrap())
    }

    /// Waits, at most [`DEADLINE`], until `find` picks `count` items out of
    /// the log; returns them all. `what` names them when the wait times out.
    pub fn wait_for<T>(&self, what: &str, count: usize, find: impl Fn(&Lines) -> Vec<T>) -> Vec<T> {
        let deadline = Instant::now() + DEADLINE;
        let mut state = self.state.lock().unwrap();
        loop {
            let found = find(&state);
            if found.len() >= count {
                return found;
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "timed out waiting for {count} of {what}; found {}; log so far:\n{}",
                found.len(),
                state.raw.join("\n")
            );
            state = self.changed.wait_timeout(state, deadline - now).unwrap().0;
        }
    }
}

impl Lines {
    /// The events named `event` whose fields have every value in `fields`.
    pub fn events(&self, event: &str, fields: &[(&str, Value)]) -> Vec<Value> {
        self.events
            .iter()
            .filter(|e| is_event(e, event, fields))
            .cloned()
            .collect()
    }

    /// The lines of workers' output (herd prefixes them `[worker N] `)
    /// that contain `needle`.
    pub fn worker_output(&self, needle: &str) -> Vec<String> {
        self.raw
            .iter()
            .filter(|l| l.starts_with("[worker ") && l.contains(needle))
            .cloned()
            .collect()
    }

    /// herd's plain-text messages (`herd: ...`, printed when it cannot
    /// run) that contain `needle`.
    pub fn error_messages(&self, needle: &str) -> Vec<String> {
        self.raw
            .iter()
            .filter(|l| l.starts_with("herd: ") && l.contains(needle))
            .cloned()
            .collect()
    }
}

/// Whether `event` is named `name` and has every value in `fields`.
pub fn is_event(event: &Value, name: &str, fields: &[(&str, Value)]) -> bool {
    event["event"] == name && fields.iter().all(|(field, value)| event[*field] == *value)
}

/// One of herd's JSON log lines as one flat object: the event's own fields
/// (`event`, `message`, `slot`, `pid`, ...) over the fields of its spans
/// (the `worker` span's `slot`), with its `timestamp`, `level` and
/// `target`. None for any other line (a worker's output, a plain message).
pub fn parse_event(line: &str) -> Option<Value> {
    if !line.starts_with('{') {
        return None;
    }
    let Ok(Value::Object(mut line)) = serde_json::from_str::<Value>(line) else {
        return None;
    };
    let mut flat = Map::new();
    if let Some(Value::Array(spans)) = line.remove("spans") {
        for span in spans {
            if let Value::Object(fields) = span {
                flat.extend(fields.into_iter().filter(|(name, _)| name != "name"));
            }
        }
    }
    if let Some(Value::Object(fields)) = line.remove("fields") {
        flat.extend(fields);
    }
    for key in ["timestamp", "level", "target"] {
        if let Some(value) = line.remove(key) {
            flat.insert(key.to_string(), value);
        }
    }
    Some(Value::Object(flat))
}

/// `name` with the fields it must have, for messages: `worker_ready {"slot":1}`.
pub fn describe(name: &str, fields: &[(&str, Value)]) -> String {
    let fields: Map<String, Value> = fields
        .iter()
        .map(|(field, value)| (field.to_string(), value.clone()))
        .collect();
    format!("event {name:?} with {}", Value::Object(fields))
}
