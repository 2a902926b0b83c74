//! What of a Node worker's channel survives `herd upgrade`: the servers it
//! listens on, herd's `seq`, the handles it has not acknowledged and the
//! part of a line read before the exec. What is queued to be written is
//! not carried: a channel with something unwritten is not carried at all
//! ([`NodeChannel::carried`] refuses it), so no line is lost or doubled.

use serde::{Deserialize, Serialize};

use super::*;

/// A Node channel's state, as the new herd takes it over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedNodeChannel {
    pub inbox: Vec<u8>,
    /// Unacknowledged handles, oldest first: a connection id, or `None`
    /// for a listening socket (`shared` mode's `queryServer` reply).
    pub handles_in_flight: Vec<Option<u64>>,
    /// (listener index, the worker's key for it).
    pub servers: Vec<(u16, String)>,
    pub seq: u64,
    pub relay_app: bool,
}

impl NodeChannel {
    /// The state to carry, or why the channel cannot be carried now.
    pub fn carried(&self) -> Result<CarriedNodeChannel, String> {
        if !self.outbox.is_empty() || !self.queued.is_empty() || self.relayed_handle.is_some() {
            return Err("its channel has messages not yet written".into());
        }
        let handles_in_flight = self
            .handles_in_flight
            .iter()
            .map(|handle| match handle {
                SentHandle::Connection(id) => Ok(Some(*id)),
                SentHandle::Server => Ok(None),
                SentHandle::Relayed => Err("a relayed handle is not yet acknowledged".to_string()),
            })
            .collect::<Result<_, _>>()?;
        Ok(CarriedNodeChannel {
            inbox: self.inbox.clone(),
            handles_in_flight,
            servers: self
                .servers
                .iter()
                .map(|(listener, key)| (u16::from(*listener), key.clone()))
                .collect(),
            seq: self.seq,
            relay_app: self.relay_app,
        })
    }

    /// The channel as it was carried.
    pub fn from_carried(carried: CarriedNodeChannel) -> NodeChannel {
        NodeChannel {
            inbox: carried.inbox,
            handles_in_flight: carried
                .handles_in_flight
                .into_iter()
                .map(|id| id.map_or(SentHandle::Server, SentHandle::Connection))
                .collect(),
            servers: carried
                .servers
                .into_iter()
                .map(|(listener, key)| (ListenerIx::from(listener), key))
                .collect(),
            seq: carried.seq,
            relay_app: carried.relay_app,
            ..NodeChannel::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_carried_channel_comes_back_the_same() {
        let mut channel = NodeChannel::default();
        channel.add_server(ListenerIx(1), "127.0.0.1:3000:4".into());
        channel.inbox = b"{\"cmd\":\"NODE_HANDLE_A".to_vec();
        channel.seq = 7;
        channel
            .handles_in_flight
            .push_back(SentHandle::Connection(42));
        channel.handles_in_flight.push_back(SentHandle::Server);
        let carried = channel.carried().unwrap();
        let back = NodeChannel::from_carried(carried.clone());
        assert_eq!(back.carried().unwrap(), carried);
        assert!(back.serves(ListenerIx(1)));
    }

    #[test]
    fn a_channel_with_unwritten_lines_is_not_carried() {
        let channel = NodeChannel {
            outbox: b"half a line".to_vec(),
            ..NodeChannel::default()
        };
        assert!(channel.carried().is_err());
        let mut channel = NodeChannel::default();
        channel.handles_in_flight.push_back(SentHandle::Relayed);
        assert!(channel.carried().is_err());
    }
}
