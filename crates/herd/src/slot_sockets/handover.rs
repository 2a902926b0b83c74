//! The per-slot sockets across `herd upgrade`: every generation's sockets
//! (by fd) and who holds them, and each listener's program with its maps,
//! carried. The groups and the programs outlive the exec (the sockets are
//! held by herd and by its workers, a program by the group it is attached
//! to), so the kernel deals on through it; the new herd takes the same
//! program back, with what it counted. (A fresh program could not take the
//! sockets over: a socket sits in one socket array at a time.)

use std::net::SocketAddr;
use std::os::fd::RawFd;

use serde::{Deserialize, Serialize};

use super::*;
use crate::rotation::ProgramFds;

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
    /// Per listener, its program (still attached), what it had counted at
    /// the last read, and whom it deals to.
    pub programs: Vec<Option<ProgramFds>>,
    pub counted: Vec<Vec<u64>>,
    pub dealt_to: Vec<usize>,
    pub dealt_generations: Vec<u64>,
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
        let programs = self.programs.iter().flatten().flat_map(ProgramFds::fds);
        self.slots
            .iter()
            .flatten()
            .flat_map(|g| g.sockets.iter().copied())
            .chain(programs)
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
            programs: self
                .programs
                .iter()
                .map(|p| p.as_ref().map(|p| p.carried().into()))
                .collect(),
            counted: self.counted.clone(),
            dealt_to: self.dealt_to.iter().map(|s| s.get()).collect(),
            dealt_generations: self.dealt_generations.clone(),
        }
    }

    /// The groups again in the new herd, dealing as before.
    pub fn adopt(carried: CarriedGroups) -> std::io::Result<SlotGroups> {
        let dealing = if carried.turns {
            Dealing::Turns
        } else {
            Dealing::Hash
        };
        let programs = carried
            .programs
            .iter()
            .map(|p| p.map(|p| RotationProgram::adopt(p.into())).transpose())
            .collect::<std::io::Result<_>>()?;
        let mut groups = SlotGroups {
            counted: carried.counted,
            addrs: carried.addrs,
            backlog: carried.backlog,
            dealing,
            slots: Table::new(),
            programs,
            dealt_to: carried.dealt_to.into_iter().map(SlotIx).collect(),
            dealt_generations: carried.dealt_generations,
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
        // The same programs deal on, to the same sockets: nothing changes
        // unless a worker changed meanwhile.
        groups.apply();
        Ok(groups)
    }
}
