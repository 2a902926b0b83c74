//! The per-slot sockets across `herd upgrade`: every generation's sockets
//! (by fd) and who holds them, carried; the programs loaded afresh in the
//! new herd and attached to the same groups, then dealt to the slots whose
//! worker serves, as before.
//!
//! The groups outlive the exec: each socket stays open (held by herd and by
//! its workers), and the program the old herd attached goes on dealing
//! until the new herd's replaces it. What the kernel counted per slot
//! starts again from zero with the new program (herd's own totals are
//! carried by the counters).

use std::net::SocketAddr;
use std::os::fd::RawFd;

use serde::{Deserialize, Serialize};

use super::*;

/// What `herd upgrade` carries of the groups.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CarriedGroups {
    pub addrs: Vec<SocketAddr>,
    pub backlog: u32,
    /// Strict turns (kernel rotation), else the hash (`reuseport`).
    pub turns: bool,
    /// By slot, its generations, oldest first.
    pub slots: Vec<Vec<CarriedGeneration>>,
    pub next_generation: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CarriedGeneration {
    pub id: u64,
    /// One per listener, in listener order.
    pub sockets: Vec<RawFd>,
    /// (worker id, ready and not draining).
    pub holders: Vec<(u64, bool)>,
}

impl CarriedGroups {
    /// Every socket's fd.
    pub fn fds(&self) -> Vec<RawFd> {
        self.slots
            .iter()
            .flatten()
            .flat_map(|g| g.sockets.iter().copied())
            .collect()
    }
}

impl SlotGroups {
    pub fn carried(&self) -> CarriedGroups {
        CarriedGroups {
            addrs: self.addrs.clone(),
            backlog: self.backlog,
            turns: self.dealing == Dealing::Turns,
            slots: self
                .slots
                .iter()
                .map(|slot| {
                    slot.generations
                        .iter()
                        .map(|g| CarriedGeneration {
                            id: g.id,
                            sockets: g.sockets.iter().map(AsRawFd::as_raw_fd).collect(),
                            holders: g
                                .holders
                                .iter()
                                .map(|&(id, serving)| (id.0, serving))
                                .collect(),
                        })
                        .collect()
                })
                .collect(),
            next_generation: self.next_generation,
        }
    }

    /// The groups again in the new herd, dealing as before.
    pub fn adopt(carried: CarriedGroups) -> std::io::Result<SlotGroups> {
        let dealing = if carried.turns {
            Dealing::Turns
        } else {
            Dealing::Hash
        };
        let mut groups = SlotGroups {
            counted: vec![Vec::new(); carried.addrs.len()],
            addrs: carried.addrs,
            backlog: carried.backlog,
            dealing,
            slots: Table::new(),
            programs: Vec::new(),
            dealt_to: Vec::new(),
            dealt_generations: Vec::new(),
            next_generation: carried.next_generation,
            moved: 0,
            failures: Occurrences::default(),
        };
        for generations in carried.slots {
            let mut adopted = Vec::with_capacity(generations.len());
            for generation in generations {
                let sockets = generation
                    .sockets
                    .iter()
                    .map(|&fd| herd_protocol::fdpass::adopt_inherited_fd(fd).map(TcpListener::from))
                    .collect::<std::io::Result<_>>()?;
                adopted.push(Generation {
                    id: generation.id,
                    sockets,
                    holders: generation
                        .holders
                        .iter()
                        .map(|&(id, serving)| (WorkerId(id), serving))
                        .collect(),
                });
            }
            if adopted.is_empty() {
                return Err(std::io::Error::other("a carried slot has no sockets"));
            }
            groups.slots.push(Slot {
                generations: adopted,
                watch: Watch::FRESH,
                stalled_since: None,
            });
        }
        if let Some(first) = groups.slots.iter().next() {
            groups.programs = first.generations[0]
                .sockets
                .iter()
                .map(|socket| attach_program(socket, dealing))
                .collect();
        }
        groups.apply();
        Ok(groups)
    }
}
