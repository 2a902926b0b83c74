//! How a line a worker printed is framed on herd's stdout or stderr
//! (`log_lines`), decided per line, pure.
//!
//! - `prefix` (the default): `[worker N] line`, so interleaved workers stay
//!   readable on a terminal; with `log_timestamps`, an RFC 3339 UTC time
//!   first (`2026-12-01T18:51:00.123456Z [worker N] line`).
//! - `raw`: the line untouched, so a JSON logger's lines stay JSON for a
//!   collector that parses them.
//! - `json`: each line wrapped as one JSON object,
//!   `{"ts":"…","slot":N,"pid":P,"stream":"stdout","line":"…"}`, for a
//!   collector that wants to know who printed it (a Node app's own primary
//!   is `"slot":null,"source":"primary"`). Bytes that are not UTF-8 are
//!   replaced (U+FFFD): JSON strings are text.
//!
//! A line split at herd's bound (`worker_output::MAX_LINE_BYTES`) ends in
//! [`SPLIT_MARKER`] in `prefix` and `raw`, and carries `"split":true` in
//! `json`.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;

/// Ends every piece of a split line but the last (`prefix` and `raw`), so
/// a reader sees that the line goes on in the next line of the same stream.
pub const SPLIT_MARKER: &[u8] = b" [herd: split at 64 KiB]";

/// `log_lines`: how workers' lines are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LineFormat {
    #[default]
    Prefix,
    Raw,
    Json,
}

impl LineFormat {
    pub const NAMES: &'static [&'static str] = &["prefix", "raw", "json"];

    pub fn name(self) -> &'static str {
        match self {
            LineFormat::Prefix => "prefix",
            LineFormat::Raw => "raw",
            LineFormat::Json => "json",
        }
    }

    pub fn of(name: &str) -> Option<LineFormat> {
        match name {
            "prefix" => Some(LineFormat::Prefix),
            "raw" => Some(LineFormat::Raw),
            "json" => Some(LineFormat::Json),
            _ => None,
        }
    }
}

/// Who printed a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The worker's slot; `None` for a Node app's own primary.
    pub slot: Option<usize>,
    pub pid: u32,
    pub stderr: bool,
}

/// How lines are framed: the format, and timestamps in `prefix` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Framing {
    pub format: LineFormat,
    pub timestamps: bool,
}

impl Framing {
    /// The bytes herd writes for one line (`content`, without its newline),
    /// newline included; `split`: the line goes on in the next piece.
    pub fn frame(&self, origin: Origin, content: &[u8], split: bool, now: SystemTime) -> Vec<u8> {
        let mut out = Vec::with_capacity(content.len() + 48);
        match self.format {
            LineFormat::Json => {
                let mut object = json!({
                    "ts": rfc3339(now),
                    "slot": origin.slot,
                    "pid": origin.pid,
                    "stream": if origin.stderr { "stderr" } else { "stdout" },
                    "line": String::from_utf8_lossy(content),
                });
                if origin.slot.is_none() {
                    object["source"] = json!("primary");
                }
                if split {
                    object["split"] = json!(true);
                }
                out.extend_from_slice(object.to_string().as_bytes());
            }
            LineFormat::Raw => {
                out.extend_from_slice(content);
                if split {
                    out.extend_from_slice(SPLIT_MARKER);
                }
            }
            LineFormat::Prefix => {
                if self.timestamps {
                    out.extend_from_slice(rfc3339(now).as_bytes());
                    out.push(b' ');
                }
                match origin.slot {
                    Some(slot) => out.extend_from_slice(format!("[worker {slot}] ").as_bytes()),
                    None => out.extend_from_slice(b"[primary] "),
                }
                out.extend_from_slice(content);
                if split {
                    out.extend_from_slice(SPLIT_MARKER);
                }
            }
        }
        out.push(b'\n');
        out
    }
}

/// `2026-12-01T18:51:00.123456Z`: UTC, microseconds.
pub fn rfc3339(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_micros()
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64, micros: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros)
    }

    const WORKER: Origin = Origin {
        slot: Some(2),
        pid: 77,
        stderr: false,
    };

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn timestamps_are_utc_rfc3339_with_microseconds() {
        assert_eq!(rfc3339(at(0, 0)), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(at(951_782_400, 5)), "2000-02-29T00:00:00.000005Z");
        assert_eq!(
            rfc3339(at(1_796_151_060, 123_456)),
            "2026-12-01T18:51:00.123456Z"
        );
        assert_eq!(
            rfc3339(at(4_107_542_399, 999_999)),
            "2100-02-28T23:59:59.999999Z"
        );
    }

    #[test]
    fn each_format_frames_a_line_as_documented() {
        let now = at(1_796_151_060, 0);
        let prefix = Framing::default();
        assert_eq!(
            text(prefix.frame(WORKER, b"hi", false, now)),
            "[worker 2] hi\n"
        );
        let stamped = Framing {
            timestamps: true,
            ..prefix
        };
        assert_eq!(
            text(stamped.frame(WORKER, b"hi", false, now)),
            "2026-12-01T18:51:00.000000Z [worker 2] hi\n"
        );
        let raw = Framing {
            format: LineFormat::Raw,
            timestamps: true,
        };
        let logged = br#"{"level":"info","msg":"up"}"#;
        assert_eq!(
            raw.frame(WORKER, logged, false, now),
            [&logged[..], b"\n"].concat()
        );
        let json = Framing {
            format: LineFormat::Json,
            timestamps: false,
        };
        let line = text(json.frame(WORKER, "é \"q\" \u{1}".as_bytes(), false, now));
        let parsed: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(parsed["ts"], "2026-12-01T18:51:00.000000Z");
        assert_eq!(
            (parsed["slot"].clone(), parsed["pid"].clone()),
            (json!(2), json!(77))
        );
        assert_eq!(parsed["stream"], "stdout");
        assert_eq!(parsed["line"], "é \"q\" \u{1}");
        assert!(parsed.get("split").is_none() && parsed.get("source").is_none());
    }

    #[test]
    fn split_pieces_and_the_primary_are_marked() {
        let now = at(0, 0);
        let primary = Origin {
            slot: None,
            pid: 9,
            stderr: true,
        };
        let json = Framing {
            format: LineFormat::Json,
            timestamps: false,
        };
        let parsed: serde_json::Value =
            serde_json::from_slice(json.frame(primary, b"x", true, now).trim_ascii_end()).unwrap();
        assert_eq!(parsed["split"], true);
        assert_eq!(parsed["source"], "primary");
        assert_eq!(parsed["slot"], serde_json::Value::Null);
        assert_eq!(parsed["stream"], "stderr");
        let bad: serde_json::Value = serde_json::from_slice(
            json.frame(WORKER, &[0xff, b'a'], false, now)
                .trim_ascii_end(),
        )
        .unwrap();
        assert_eq!(bad["line"], "\u{fffd}a");
        assert_eq!(
            text(Framing::default().frame(primary, b"x", true, now)),
            "[primary] x [herd: split at 64 KiB]\n"
        );
        let raw = Framing {
            format: LineFormat::Raw,
            timestamps: false,
        };
        assert_eq!(
            text(raw.frame(WORKER, b"x", true, now)),
            "x [herd: split at 64 KiB]\n"
        );
        for name in LineFormat::NAMES {
            assert_eq!(LineFormat::of(name).map(LineFormat::name), Some(*name));
        }
        assert_eq!(LineFormat::of("text"), None);
    }
}
