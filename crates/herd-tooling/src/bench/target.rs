//! Where the load goes: the [`Target`] address and path, and the
//! [`SourceRange`] of client addresses, each parsed from one command-line
//! argument and refused with a [`BenchError`] that says why.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::BenchError;

/// Where the load goes: one explicit address and a request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    pub path: String,
}

impl Target {
    /// Parses `http://IP:PORT/path`, `IP:PORT` (path `/`) or the same with
    /// `localhost` (127.0.0.1). Other host names are refused: the load must
    /// only go to an address given explicitly.
    pub fn parse(text: &str) -> Result<Target, BenchError> {
        let bad = |reason: &str| BenchError::Target {
            target: text.to_string(),
            reason: reason.to_string(),
        };
        let rest = text.trim();
        if rest.starts_with("https://") {
            return Err(bad("https is not supported; use http://IP:PORT/path"));
        }
        let rest = rest.strip_prefix("http://").unwrap_or(rest);
        if rest.contains("://") {
            return Err(bad("only http:// targets are supported"));
        }
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad(
                "the path must not contain spaces or control characters",
            ));
        }
        if authority.is_empty() {
            return Err(bad(
                "missing address: expected http://IP:PORT/path or IP:PORT",
            ));
        }
        if authority.contains('@') {
            return Err(bad("credentials in the target are not supported"));
        }
        let addr = match authority.parse::<SocketAddr>() {
            Ok(addr) => addr,
            Err(_) => {
                let Some((host, port)) = authority.rsplit_once(':') else {
                    return Err(bad("missing port: expected IP:PORT"));
                };
                let port: u16 = port
                    .parse()
                    .map_err(|_| bad("the port must be a number from 1 to 65535"))?;
                if host.eq_ignore_ascii_case("localhost") {
                    SocketAddr::from(([127, 0, 0, 1], port))
                } else if host.parse::<IpAddr>().is_ok() || host.starts_with('[') {
                    return Err(bad("malformed address (IPv6 addresses go in brackets)"));
                } else {
                    return Err(bad(&format!(
                        "host names are refused (only localhost is): \
                         give the IP address of {host:?} explicitly"
                    )));
                }
            }
        };
        if addr.port() == 0 {
            return Err(bad("port 0 is not a destination"));
        }
        if addr.ip().is_unspecified() || addr.ip().is_multicast() {
            return Err(bad("not a unicast destination address"));
        }
        Ok(Target { addr, path })
    }

    pub(super) fn url(&self) -> String {
        format!("http://{}{}", self.addr, self.path)
    }
}

/// An inclusive range of IPv4 source addresses, used round-robin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceRange {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
}

impl SourceRange {
    /// Parses `A-B` (e.g. `127.0.0.2-127.0.0.51`) or a single address `A`.
    pub fn parse(text: &str) -> Result<SourceRange, BenchError> {
        let bad = |reason: &str| BenchError::SourceRange {
            range: text.to_string(),
            reason: reason.to_string(),
        };
        let (first, last) = text.trim().split_once('-').unwrap_or((text, text));
        let parse = |s: &str| {
            s.trim()
                .parse::<Ipv4Addr>()
                .map_err(|_| bad(&format!("{:?} is not an IPv4 address", s.trim())))
        };
        let (first, last) = (parse(first)?, parse(last)?);
        if u32::from(first) > u32::from(last) {
            return Err(bad("the first address is above the last"));
        }
        if first.is_unspecified() || first.is_broadcast() || last.is_broadcast() {
            return Err(bad(
                "0.0.0.0 and 255.255.255.255 cannot be source addresses",
            ));
        }
        Ok(SourceRange { first, last })
    }

    pub fn len(&self) -> u64 {
        u64::from(u32::from(self.last) - u32::from(self.first)) + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The `index`-th address, wrapping around.
    pub fn nth(&self, index: u64) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.first) + (index % self.len()) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(text: &str) -> Result<Target, BenchError> {
        Target::parse(text)
    }

    #[test]
    fn targets_with_and_without_scheme_and_path() {
        let t = target("http://127.0.0.1:3000/hello?x=1").unwrap();
        assert_eq!(t.addr, "127.0.0.1:3000".parse().unwrap());
        assert_eq!(t.path, "/hello?x=1");
        let t = target("127.0.0.1:3000").unwrap();
        assert_eq!(t.path, "/");
        let t = target("http://127.0.0.1:3000").unwrap();
        assert_eq!(t.path, "/");
        let t = target("http://[::1]:8080/x").unwrap();
        assert_eq!(t.addr, "[::1]:8080".parse().unwrap());
        assert_eq!(t.url(), "http://[::1]:8080/x");
        let t = target("localhost:80").unwrap();
        assert_eq!(t.addr, "127.0.0.1:80".parse().unwrap());
        let t = target("http://LOCALHOST:80/a").unwrap();
        assert_eq!(t.addr, "127.0.0.1:80".parse().unwrap());
    }

    #[test]
    fn host_names_and_malformed_targets_are_refused() {
        let reason = |text: &str| match target(text) {
            Err(BenchError::Target { reason, .. }) => reason,
            other => panic!("{text:?} gave {other:?}"),
        };
        assert!(reason("example.com:80").contains("host names are refused"));
        assert!(reason("http://example.com/").contains("missing port"));
        assert!(reason("http://").contains("missing address"));
        assert!(reason("").contains("missing address"));
        assert!(reason("127.0.0.1").contains("missing port"));
        assert!(reason("127.0.0.1:0").contains("port 0"));
        assert!(reason("127.0.0.1:99999").contains("port"));
        assert!(reason("0.0.0.0:80").contains("unicast"));
        assert!(reason("https://127.0.0.1:443/").contains("https"));
        assert!(reason("ftp://127.0.0.1:21/").contains("only http"));
        assert!(reason("::1:80").contains("brackets"));
        assert!(reason("http://127.0.0.1:80/a b").contains("spaces"));
    }

    #[test]
    fn source_ranges() {
        let r = SourceRange::parse("127.0.0.2-127.0.0.51").unwrap();
        assert_eq!(r.len(), 50);
        assert_eq!(r.nth(0), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(r.nth(49), Ipv4Addr::new(127, 0, 0, 51));
        assert_eq!(r.nth(50), Ipv4Addr::new(127, 0, 0, 2));
        let one = SourceRange::parse("127.0.0.9").unwrap();
        assert_eq!((one.len(), one.nth(7)), (1, Ipv4Addr::new(127, 0, 0, 9)));
        let wide = SourceRange::parse("10.0.0.250-10.0.1.4").unwrap();
        assert_eq!(wide.len(), 11);
        assert_eq!(wide.nth(6), Ipv4Addr::new(10, 0, 1, 0));
        for bad in [
            "127.0.0.5-127.0.0.2",
            "127.0.0.1-x",
            "::1-::2",
            "",
            "0.0.0.0-1.0.0.0",
        ] {
            assert!(
                matches!(SourceRange::parse(bad), Err(BenchError::SourceRange { .. })),
                "{bad:?}"
            );
        }
    }
}
