//! Which of the program's binds herd captures: the served addresses herd
//! passes in `HERD_PRELOAD_LISTEN`, and the rule that matches a `bind()` to
//! one of them. Pure, so tested exhaustively below.
//!
//! A bind is captured when its port is a served port and its address is
//! the served address, or a wildcard (`0.0.0.0`, `::`: what
//! `python3 -m http.server PORT` binds), or any address when herd serves
//! the wildcard itself. An exact address wins over a wildcard when herd
//! serves one port on several addresses. Port 0 is never captured: herd's
//! listeners always have their real port.

use std::net::{IpAddr, SocketAddr};

/// Parses `HERD_PRELOAD_LISTEN`: served addresses, comma-separated, in
/// `listen` order (the index is the listener's).
pub fn parse(text: &str) -> Result<Vec<SocketAddr>, String> {
    text.split(',')
        .map(|part| {
            part.trim()
                .parse::<SocketAddr>()
                .map_err(|_| format!("{part:?} is not IP:PORT"))
        })
        .collect()
}

/// The served listener a bind to `asked` is captured for, if any.
pub fn captured_by(served: &[SocketAddr], asked: SocketAddr) -> Option<usize> {
    if asked.port() == 0 {
        return None;
    }
    let same_port = |s: &&SocketAddr| s.port() == asked.port();
    let exact = served
        .iter()
        .position(|s| same_port(&s) && same_ip(s.ip(), asked.ip()));
    exact.or_else(|| {
        served
            .iter()
            .position(|s| same_port(&s) && (asked.ip().is_unspecified() || s.ip().is_unspecified()))
    })
}

/// Equal, counting `::ffff:a.b.c.d` as `a.b.c.d`.
fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn parses_listen_order_and_refuses_nonsense() {
        assert_eq!(
            parse("127.0.0.1:3000,[::1]:3001").unwrap(),
            addrs(&["127.0.0.1:3000", "[::1]:3001"])
        );
        assert!(parse("").is_err());
        assert!(parse("127.0.0.1").is_err());
        assert!(parse("127.0.0.1:3000,,").is_err());
    }

    #[test]
    fn captures_the_served_address_and_wildcards_on_its_port() {
        let served = addrs(&["127.0.0.1:3000"]);
        for (asked, expect) in [
            ("127.0.0.1:3000", Some(0)),
            ("0.0.0.0:3000", Some(0)),
            ("[::]:3000", Some(0)),
            ("[::ffff:127.0.0.1]:3000", Some(0)),
            ("127.0.0.2:3000", None),
            ("[::1]:3000", None),
            ("127.0.0.1:3001", None),
            ("0.0.0.0:3001", None),
            ("0.0.0.0:0", None),
        ] {
            assert_eq!(
                captured_by(&served, asked.parse().unwrap()),
                expect,
                "{asked}"
            );
        }
    }

    #[test]
    fn a_served_wildcard_takes_any_address_on_its_port() {
        let served = addrs(&["0.0.0.0:8080"]);
        assert_eq!(
            captured_by(&served, "127.0.0.1:8080".parse().unwrap()),
            Some(0)
        );
        assert_eq!(captured_by(&served, "[::1]:8080".parse().unwrap()), Some(0));
        assert_eq!(
            captured_by(&served, "127.0.0.1:8081".parse().unwrap()),
            None
        );
    }

    #[test]
    fn an_exact_address_wins_over_a_wildcard() {
        let served = addrs(&["0.0.0.0:3000", "[::1]:3000", "127.0.0.1:4000"]);
        assert_eq!(captured_by(&served, "[::1]:3000".parse().unwrap()), Some(1));
        assert_eq!(
            captured_by(&served, "127.0.0.1:3000".parse().unwrap()),
            Some(0)
        );
        assert_eq!(captured_by(&served, "[::]:3000".parse().unwrap()), Some(0));
        assert_eq!(captured_by(&served, "[::]:4000".parse().unwrap()), Some(2));
        assert_eq!(captured_by(&served, "0.0.0.0:4001".parse().unwrap()), None);
    }
}
