//! The loads a comparison runs under each mode, by name: what the clients
//! do and what happens to the workers meanwhile.

use serde::Serialize;

use super::CompareError;

/// What the load looks like and what happens to the workers meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Keep-alive connections, every worker healthy.
    Uniform,
    /// A new connection per request, and the worker in slot 0 (its whole
    /// process group, so a server's own children too) SIGSTOPped for the
    /// whole load: every request is a dispatch decision, and those
    /// sent to the stopped worker time out. How each policy routes around a
    /// worker that stopped answering.
    Stalled,
    /// A new connection per request, every worker healthy: every request is
    /// a hand-off.
    Connect,
}

impl Scenario {
    pub const NAMES: &'static [&'static str] = &["uniform", "stalled", "connect"];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Uniform => "uniform",
            Scenario::Stalled => "stalled",
            Scenario::Connect => "connect",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Scenario::Uniform => "keep-alive connections, every worker healthy",
            Scenario::Stalled => {
                "a new connection per request, the worker in slot 0 (with its process \
                 group) SIGSTOPped during the load (requests sent to it time out)"
            }
            Scenario::Connect => "a new connection per request, every worker healthy",
        }
    }

    pub fn parse(text: &str) -> Result<Scenario, CompareError> {
        match text.trim() {
            "uniform" => Ok(Scenario::Uniform),
            "stalled" => Ok(Scenario::Stalled),
            "connect" => Ok(Scenario::Connect),
            other => Err(CompareError::Options(format!(
                "unknown scenario {other:?} in --scenarios: expected some of {}",
                Scenario::NAMES.join(", ")
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_parse_by_name() {
        for name in Scenario::NAMES {
            assert_eq!(Scenario::parse(name).unwrap().name(), *name);
        }
        let e = Scenario::parse("slow").unwrap_err().to_string();
        assert!(e.contains("\"slow\"") && e.contains("uniform"), "{e}");
    }
}
