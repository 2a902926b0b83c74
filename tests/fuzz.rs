//! Property tests of what herd parses from others: the herd protocol
//! decoder, the Node cluster IPC reader (arbitrary byte streams split at
//! arbitrary points, with and without fds), what a Node app's own primary
//! sends herd, and the config parser
//! (arbitrary TOML). Nothing panics, memory stays bounded, and every
//! refusal names what it refused. A fixed case budget keeps the suite fast.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use herd::config::{resolve, Config, ConfigError};
use herd::node_ipc::{self, NodeChannel, Read};
use herd_protocol::wire::{ReadyFlags, WorkerMessage, WORKER_MESSAGE_MAX_LEN};
use proptest::prelude::*;

fn budget() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn worker_message() -> impl Strategy<Value = WorkerMessage> {
    prop_oneof![
        any::<u64>().prop_map(WorkerMessage::Ack),
        any::<u64>().prop_map(WorkerMessage::Nack),
        any::<u64>().prop_map(WorkerMessage::Closed),
        (0u16..8).prop_map(|flags| WorkerMessage::Ready(ReadyFlags(flags))),
        (any::<u16>(), any::<u64>())
            .prop_map(|(listener, id)| WorkerMessage::Accepted { listener, id }),
    ]
}

proptest! {
    #![proptest_config(budget())]

    /// Any bytes decode to a message or to an error that says what is wrong.
    #[test]
    fn the_protocol_decoder_takes_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        match WorkerMessage::decode(&bytes) {
            Ok(message) => {
                let mut buf = [0u8; WORKER_MESSAGE_MAX_LEN];
                // What decodes encodes back to the bytes that matter.
                let again = WorkerMessage::decode(message.encode(&mut buf)).unwrap();
                prop_assert_eq!(again, message);
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    /// Every message round-trips, and a truncated one is refused.
    #[test]
    fn every_worker_message_round_trips(message in worker_message(), cut in 0usize..12) {
        let mut buf = [0u8; WORKER_MESSAGE_MAX_LEN];
        let encoded = message.encode(&mut buf).to_vec();
        prop_assert_eq!(WorkerMessage::decode(&encoded).unwrap(), message);
        if cut < encoded.len() {
            prop_assert!(WorkerMessage::decode(&encoded[..cut]).is_err());
        }
    }

    /// A Node channel fed any bytes, in any chunks, some with an fd
    /// attached: no panic, no line kept longer than the limit, every line
    /// herd acts on counted once.
    #[test]
    fn the_node_channel_reads_any_stream(
        chunks in prop::collection::vec(
            (prop::collection::vec(prop_oneof![Just(b'\n'), any::<u8>(), Just(b'{')], 0..256), any::<bool>()),
            0..12,
        )
    ) {
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        theirs.set_nonblocking(true).unwrap();
        let mut channel = NodeChannel::default();
        let mut messages = Vec::new();
        let mut sent_lines = 0;
        for (chunk, with_fd) in &chunks {
            sent_lines += chunk.iter().filter(|&&b| b == b'\n').count();
            if *with_fd && !chunk.is_empty() {
                let (spare, _) = UnixStream::pair().unwrap();
                herd_protocol::fdpass::sendmsg_with_fd(ours.as_fd(), chunk, spare.as_fd()).unwrap();
            } else {
                ours.write_all(chunk).unwrap();
            }
            // Read as herd does: turn by turn until the channel is drained.
            for _ in 0..64 {
                match channel.read(theirs.as_fd(), &mut messages) {
                    Ok(Read::Drained) => break,
                    Ok(Read::More) => continue,
                    Ok(Read::Closed) => prop_assert!(false, "closed while open"),
                    // Only a line over the limit is refused; these are short.
                    Err(e) => prop_assert!(false, "refused: {e}"),
                }
            }
        }
        prop_assert!(messages.len() <= sent_lines);
        drop(ours);
        let mut closed = false;
        for _ in 0..64 {
            if matches!(channel.read(theirs.as_fd(), &mut messages), Ok(Read::Closed)) {
                closed = true;
                break;
            }
        }
        prop_assert!(closed, "EOF is seen");
    }

    /// Any line parses to a message or to an error; neither panics.
    #[test]
    fn node_lines_parse_or_are_refused(line in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = node_ipc::parse(&line);
    }

    /// Any line from a Node app's own primary (`node.primary = "run"`),
    /// or one that looks like its envelope with anything in it: a request
    /// or an error, never a panic; a relayed message ends its line.
    #[test]
    fn node_primary_lines_parse_or_are_refused(
        line in prop::collection::vec(any::<u8>(), 0..256),
        msg in "\\PC{0,40}",
        id in any::<u64>(),
    ) {
        let _ = herd::node_primary::parse(&line);
        let envelope = format!("{{\"herd\":\"send\",\"id\":{id},\"msg\":{msg}}}");
        if let Ok(herd::node_primary::Request::Send { line, .. }) =
            herd::node_primary::parse(envelope.as_bytes())
        {
            prop_assert!(line.ends_with(b"\n"));
            prop_assert!(serde_json::from_slice::<serde_json::Value>(&line).is_ok());
        }
    }

    /// Arbitrary text as a config file: parsed or refused, never a panic.
    #[test]
    fn any_text_is_parsed_or_refused(text in "\\PC{0,200}") {
        if let Err(e) = Config::parse(&text) {
            prop_assert!(!e.message.is_empty());
        }
    }

    /// Known keys with values of any type: every refusal names the key, a
    /// value of the wrong type too (``invalid `backlog` = "lots": ...``).
    #[test]
    fn every_refusal_names_the_key(
        entries in prop::collection::vec((0usize..KEYS.len(), value()), 1..6)
    ) {
        let mut text = String::new();
        let mut seen = std::collections::BTreeSet::new();
        for (key, value) in &entries {
            if seen.insert(*key) {
                text.push_str(&format!("{} = {value}\n", KEYS[*key]));
            }
        }
        match Config::parse(&text).map_err(|e| e.to_string()) {
            Err(e) => prop_assert!(
                seen.iter().any(|&k| e.contains(&format!("invalid `{}`", KEYS[k]))),
                "{e} names none of {:?}", seen.iter().map(|&k| KEYS[k]).collect::<Vec<_>>()
            ),
            Ok(config) => match config.validate().and_then(resolve) {
                Ok(_) => {}
                Err(ConfigError::Invalid { key, .. }) => prop_assert!(
                    seen.iter().any(|&k| KEYS[k] == key) || ["command", "listen"].contains(&key.as_str()),
                    "refused `{key}`, which the file did not set: {text}"
                ),
                Err(other) => prop_assert!(false, "{other}"),
            },
        }
    }
}

/// Top-level keys whose values are plain (no table).
const KEYS: &[&str] = &[
    "workers",
    "backlog",
    "mode",
    "protocol",
    "rotation",
    "shutdown_timeout",
    "stop_signal",
    "ready_timeout",
    "ready_delay",
    "ready",
    "hang_timeout",
    "kill_mode",
    "reload_batch",
    "max_memory",
    "max_connections_per_worker",
    "max_connections_jitter",
    "monitor_interval",
    "listen",
    "command",
];

/// A TOML value of some type: numbers (huge and negative too), strings
/// (durations, sizes, names, junk), booleans, arrays.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        (0i64..5000).prop_map(|n| n.to_string()),
        prop_oneof![
            Just("0s"),
            Just("1ms"),
            Just("30s"),
            Just("max"),
            Just("auto"),
            Just("round-robin"),
            Just("-1s"),
            Just("1e9h"),
            Just("512MiB"),
            Just("0"),
            Just(""),
            Just("true"),
            Just("SIGQUIT"),
            Just("KILL"),
        ]
        .prop_map(|s| format!("{s:?}")),
        "[a-z0-9:.]{0,12}".prop_map(|s| format!("{s:?}")),
        any::<bool>().prop_map(|b| b.to_string()),
        Just("[\"127.0.0.1:0\"]".to_string()),
        Just("[\"true\"]".to_string()),
        Just("[1, 2]".to_string()),
    ]
}
