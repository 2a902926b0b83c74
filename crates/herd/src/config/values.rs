//! The value syntaxes of the config: durations, sizes, ranges, the metrics
//! and control addresses, and which addresses overlap.

use super::*;

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

/// The control socket's path, which must fit a `sockaddr_un`.
pub(super) fn control_path(text: &str) -> Result<PathBuf, ConfigError> {
    let refuse = |reason: String| invalid("control", format!("{text:?}"), reason);
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

/// The number of cores herd may use (honours CPU affinity and cgroup limits).
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub(super) fn in_range(key: &str, value: i64, min: i64, max: i64) -> Result<i64, ConfigError> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(invalid(
            key,
            value,
            format!("must be between {min} and {max}"),
        ))
    }
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

/// "IP:PORT", or "PORT" alone for 127.0.0.1: metrics stay on loopback unless asked.
pub(super) fn parse_metrics_address(text: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse().map_err(|_| {
        invalid(
            "metrics.address",
            format!("{text:?}"),
            "expected IP:PORT (e.g. 127.0.0.1:9464) or a port for 127.0.0.1",
        )
    })
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

pub(super) fn duration(key: &str, text: &str) -> Result<Duration, ConfigError> {
    parse_duration(text).map_err(|reason| invalid(key, format!("{text:?}"), reason))
}
