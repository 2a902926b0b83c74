//! Random sequences of spawn, ready, exit, channel, scale, reload, stop and
//! timer events: the invariant holds after every one (the [`World`] checks
//! it), no index goes out of range (a panic fails the test), a draining
//! worker never serves again, and once the faults stop every slot ends up
//! with a ready worker. A failing seed is printed so it can be replayed.

use std::collections::BTreeSet;
use std::time::Duration;

use nix::sys::signal::Signal;

use super::world::{exit, killed_by, policy, World};
use super::*;

/// A small deterministic generator (xorshift64*), so a seed replays exactly.
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> Option<T> {
        (!items.is_empty()).then(|| items[self.below(items.len() as u64) as usize])
    }
}

fn random_policy(dice: &mut Dice) -> Policy {
    Policy {
        ready_delay: (dice.below(4) == 0).then(|| Duration::from_millis(50 + dice.below(400))),
        reload_batch: 1 + dice.below(3) as usize,
        node: dice.below(3) == 0,
        ..policy()
    }
}

/// Plays `steps` random events from `seed`; panics with the seed on a fault.
fn play(seed: u64, steps: usize) {
    let mut dice = Dice(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let first = random_policy(&mut dice);
    let mut world = World::new(1 + dice.below(4) as usize, first);
    let mut ever_ended: BTreeSet<WorkerId> = BTreeSet::new();
    let mut version = 0;
    let mut ticket = 0;
    let mut stopped = false;
    for step in 0..steps {
        world.spawns_succeed = dice.below(8) != 0;
        let ids: Vec<WorkerId> = world.core.workers().map(|w| w.id).collect();
        let any = dice.pick(&ids);
        let event = match dice.below(20) {
            0..=3 => match any {
                Some(worker) => Event::Ready { worker },
                None => Event::Tick,
            },
            4..=6 => match any {
                Some(worker) => Event::Exited {
                    worker,
                    status: if dice.below(2) == 0 {
                        exit(dice.below(3) as i32)
                    } else {
                        killed_by(Signal::SIGKILL)
                    },
                },
                None => Event::Tick,
            },
            7 => match any {
                Some(worker) => Event::ChannelClosed { worker },
                None => Event::Tick,
            },
            8 => match any {
                Some(worker) => Event::RecycleDue { worker },
                None => Event::Tick,
            },
            9 => match any {
                Some(worker) => Event::Memory {
                    samples: vec![(worker, dice.below(2) << 30)],
                },
                None => Event::Tick,
            },
            10 => match any {
                Some(worker) => Event::Hung { worker },
                None => Event::Tick,
            },
            11 | 12 => Event::Scale {
                workers: dice.below(7) as usize,
            },
            13 => {
                version += 1;
                ticket += 1;
                Event::Reload {
                    ticket,
                    version: Version(version),
                    policy: random_policy(&mut dice),
                    workers: 1 + dice.below(5) as usize,
                }
            }
            14 if step > steps * 9 / 10 && !stopped => {
                stopped = true;
                Event::Stop
            }
            15 if stopped => Event::KillAll,
            _ => {
                world.now += Duration::from_millis(dice.below(1500));
                Event::Tick
            }
        };
        let before: BTreeSet<WorkerId> = world
            .core
            .workers()
            .filter(|w| !w.is_live())
            .map(|w| w.id)
            .collect();
        ever_ended.extend(before);
        let described = format!("{event:?}");
        let actions = world.handle(event);
        for action in &actions {
            match action {
                Action::Serve { worker } => assert!(
                    !ever_ended.contains(worker),
                    "seed {seed} step {step} ({described}): draining worker {worker} served again"
                ),
                Action::Spawn { slot, .. } => assert!(
                    slot.get() < world.core.slot_count(),
                    "seed {seed} step {step}: spawn beyond the count"
                ),
                _ => {}
            }
        }
    }
    if stopped {
        // Every worker is on its way out; once all have exited herd is done.
        let ids: Vec<WorkerId> = world.core.workers().map(|w| w.id).collect();
        for worker in ids {
            world.exit(worker, exit(0));
        }
        assert!(
            world.core.finished(),
            "seed {seed}: stopped but not finished"
        );
        return;
    }
    // The faults stop: spawns succeed, workers become ready and stay.
    world.spawns_succeed = true;
    for _ in 0..200 {
        world.all_ready();
        let draining: Vec<WorkerId> = world
            .core
            .workers()
            .filter(|w| !w.is_live())
            .map(|w| w.id)
            .collect();
        for worker in draining {
            world.exit(worker, killed_by(Signal::SIGKILL));
        }
        if world
            .core
            .slots()
            .iter()
            .all(|s| s.state == SlotState::Ready)
            && world.core.phase() == Phase::Running
        {
            return;
        }
        world.advance(Duration::from_millis(500));
    }
    panic!(
        "seed {seed}: the slots never all became ready: {:#?}",
        world.core.slots()
    );
}

#[test]
fn random_event_sequences_keep_the_invariant() {
    for seed in 1..=400 {
        play(seed, 300);
    }
}

#[test]
fn long_random_sequences_keep_the_invariant() {
    for seed in 1000..1004 {
        play(seed, 5000);
    }
}
