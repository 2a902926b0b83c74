//! The decision core across `herd upgrade`: what of its slots and workers
//! the old herd carries, and the core the new herd starts from.
//!
//! Only a settled core is carried: no reload rolling, no stop, and every
//! worker serving (none starting, draining, being replaced or killed).
//! That is all the new herd needs to know to go on: a serving worker has
//! no timer running, so nothing is lost by starting its clock afresh. A
//! slot waiting out a restart backoff has no worker; the new herd fills it
//! at once (its backoff is not carried).

use super::*;

/// A serving worker carried over `herd upgrade`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adopted {
    pub id: WorkerId,
    pub slot: SlotIx,
    pub pid: u32,
    pub started: Instant,
    /// It said READY itself (see [`Worker::announced`]).
    pub announced: bool,
}

/// A slot's counts carried over `herd upgrade`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CarriedSlot {
    pub restarts: u64,
    pub filled_before: bool,
}

/// The carried core: its slots, its workers, the next worker id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarriedCore {
    pub slots: Vec<CarriedSlot>,
    pub workers: Vec<Adopted>,
    pub next_worker: u64,
}

impl Lifecycle {
    /// What `herd upgrade` carries, or why the core is not settled enough.
    pub fn carried(&self) -> Result<CarriedCore, String> {
        match self.phase() {
            Phase::Running => {}
            Phase::Reloading => return Err("a reload is rolling; upgrade once it is done".into()),
            Phase::Stopping => return Err("herd is stopping".into()),
        }
        let mut workers = Vec::with_capacity(self.workers.len());
        for worker in self.workers.values() {
            let pid = match (worker.stage, worker.pid) {
                (Stage::Serving { replace: None }, Some(pid)) => pid,
                (stage, _) => {
                    return Err(format!(
                        "the worker in slot {} is {}; upgrade once every worker is serving",
                        worker.slot,
                        stage_words(stage)
                    ))
                }
            };
            workers.push(Adopted {
                id: worker.id,
                slot: worker.slot,
                pid,
                started: worker.started,
                announced: worker.announced,
            });
        }
        let slots = self
            .slots
            .iter()
            .map(|slot| CarriedSlot {
                restarts: slot.restarts,
                filled_before: slot.filled_before,
            })
            .collect();
        Ok(CarriedCore {
            slots,
            workers,
            next_worker: self.next_worker,
        })
    }

    /// The core of the new herd: the carried slots and serving workers, on
    /// `policy` as version 0; `configured` is the config's `workers`.
    pub fn adopted(policy: Policy, carried: CarriedCore, configured: usize) -> Lifecycle {
        let mut core = Lifecycle::new(policy, carried.slots.len());
        core.configured_workers = configured;
        for (slot, was) in core.slots.iter_mut().zip(&carried.slots) {
            slot.restarts = was.restarts;
            slot.filled_before = was.filled_before;
        }
        for adopted in carried.workers {
            if adopted.slot.get() >= core.slots.len() {
                continue;
            }
            core.insert_worker(Worker {
                id: adopted.id,
                slot: adopted.slot,
                version: Version(0),
                pid: Some(adopted.pid),
                started: adopted.started,
                stage: Stage::Serving { replace: None },
                announced: adopted.announced,
                channel_check_at: None,
            });
        }
        core.next_worker = carried.next_worker;
        core
    }
}

fn stage_words(stage: Stage) -> &'static str {
    match stage {
        Stage::Starting { .. } => "starting",
        Stage::Serving { replace: Some(_) } => "being replaced",
        Stage::Serving { replace: None } => "serving",
        Stage::Draining { .. } => "draining",
        Stage::Killed { .. } => "being killed",
    }
}

#[cfg(test)]
mod tests {
    use super::super::world::*;
    use super::*;

    #[test]
    fn a_settled_core_comes_back_with_the_same_workers_and_counts() {
        let mut world = World::new(3, policy());
        world.all_ready();
        let crashed = world.worker(1, Role::Serving);
        world.exit(crashed, exit(1));
        world.advance(Duration::from_secs(2));
        world.all_ready();
        let carried = world.core.carried().expect("settled");
        assert_eq!(carried.workers.len(), 3);
        assert_eq!(carried.slots[1].restarts, 1);
        let mut adopted = World::around(Lifecycle::adopted(policy(), carried.clone(), 3));
        adopted.now = world.now;
        assert_eq!(adopted.core.carried(), Ok(carried.clone()));
        // Nothing to start: every slot is served.
        assert!(spawns(&adopted.tick()).is_empty());
        // A new worker gets an id never used before.
        let victim = adopted.worker(0, Role::Serving);
        adopted.exit(victim, exit(1));
        let actions = adopted.advance(Duration::from_secs(2));
        let started = actions.iter().find_map(|a| match a {
            Action::Spawn { worker, .. } => Some(*worker),
            _ => None,
        });
        assert!(started.is_some_and(|id| id.0 > carried.next_worker - 1));
    }

    #[test]
    fn an_unsettled_core_is_not_carried_and_says_why() {
        let mut world = World::new(2, policy());
        let why = world.core.carried().unwrap_err();
        assert!(why.contains("slot 0 is starting"), "{why}");
        world.all_ready();
        world.handle(Event::Stop);
        assert_eq!(world.core.carried().unwrap_err(), "herd is stopping");
    }

    #[test]
    fn an_adopted_slot_beyond_the_count_is_left_out_and_an_empty_one_filled() {
        let carried = CarriedCore {
            slots: vec![
                CarriedSlot {
                    restarts: 0,
                    filled_before: true
                };
                2
            ],
            workers: vec![Adopted {
                id: WorkerId(5),
                slot: SlotIx(3),
                pid: 77,
                started: Instant::now(),
                announced: true,
            }],
            next_worker: 6,
        };
        let mut world = World::around(Lifecycle::adopted(policy(), carried, 2));
        assert_eq!(spawns(&world.tick()), vec![0, 1]);
    }
}
