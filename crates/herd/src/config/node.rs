//! `[node]`: what herd does for Node cluster apps beyond being their
//! primary. One key so far, `node.primary`: whether the app's own primary
//! branch runs (docs/lifecycle.md, "The app's primary"). Its own file, so
//! the choice, its reader and its refusal live together.

use super::*;

use std::str::FromStr;

/// `[node]`: Node cluster apps.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "the `[node]` table")]
pub struct NodeConfig {
    /// "herd" (herd is the cluster primary; the app's primary branch does
    /// not run) or "run" (it runs too, in a process of its own, with
    /// `cluster` standing in for herd's workers).
    #[serde(deserialize_with = "keys::de::node_primary")]
    pub primary: NodePrimary,
}

/// `node.primary`: who runs the app's `if (cluster.isPrimary)` branch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NodePrimary {
    /// herd is the primary; the app's primary branch never runs.
    #[default]
    Herd,
    /// herd starts `command` once more as the app's primary, with a
    /// preloaded `cluster` that speaks to herd (crate::node_primary).
    Run,
}

impl NodePrimary {
    pub const NAMES: &'static [&'static str] = &["herd", "run"];

    pub fn name(self) -> &'static str {
        match self {
            NodePrimary::Herd => "herd",
            NodePrimary::Run => "run",
        }
    }
}

impl FromStr for NodePrimary {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "herd" => Ok(NodePrimary::Herd),
            "run" => Ok(NodePrimary::Run),
            _ => Err(format!("expected one of: {}", Self::NAMES.join(", "))),
        }
    }
}

/// `node.primary = "run"` needs a Node cluster app: anything else has no
/// primary branch to run. Checked once the protocol is final (a `#!` line
/// can make an app Node's), so `herd check` and `herd run` refuse alike.
pub(super) fn primary_fits(
    primary: NodePrimary,
    protocol: WorkerProtocol,
) -> Result<(), ConfigError> {
    if primary == NodePrimary::Run && protocol != WorkerProtocol::NodeCluster {
        return Err(invalid(
            "node.primary",
            "\"run\"",
            format!(
                "runs a Node cluster app's primary branch, but the workers speak protocol {:?}: use a Node cluster app (`node app.js`, or protocol = \"node-cluster\")",
                protocol.name()
            ),
        ));
    }
    Ok(())
}
