//! The test harness of the decision core: a fake clock and a fake spawner.
//! The [`World`] answers every spawn as the supervisor would and checks the
//! invariant (and that no timer is left due) after every event.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::*;
use crate::config::RestartSettings;

pub(super) fn policy() -> Policy {
    Policy {
        ready_timeout: Duration::from_secs(1),
        ready_delay: None,
        shutdown_timeout: Duration::from_secs(10),
        stop_signal: None,
        restart: RestartSettings {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            min_uptime: Duration::from_secs(5),
            max_restarts: 3,
            window: Duration::from_secs(60),
        },
        reload_batch: 1,
        max_memory: Some(100 << 20),
        node: false,
    }
}

pub(super) fn exit(code: i32) -> ExitStatus {
    ExitStatus::from_raw(code << 8)
}

pub(super) fn killed_by(signal: Signal) -> ExitStatus {
    ExitStatus::from_raw(signal as i32)
}

/// The core plus what the supervisor would do around it.
pub(super) struct World {
    pub core: Lifecycle,
    pub now: Instant,
    next_pid: u32,
    /// When false, spawns fail (fork refused).
    pub spawns_succeed: bool,
}

impl World {
    pub fn new(workers: usize, policy: Policy) -> World {
        let mut world = World {
            core: Lifecycle::new(policy, workers),
            now: Instant::now(),
            next_pid: 100,
            spawns_succeed: true,
        };
        world.tick();
        world
    }

    /// A world around a core made elsewhere (as `herd upgrade` makes one).
    pub fn around(core: Lifecycle) -> World {
        World {
            core,
            now: Instant::now(),
            next_pid: 1000,
            spawns_succeed: true,
        }
    }

    /// Hands `event` to the core, answers its spawns the way the supervisor
    /// does, checks the invariant; returns every action that followed.
    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        let mut pending = vec![event];
        let mut all = Vec::new();
        while let Some(event) = pending.pop() {
            let actions = self.core.handle(self.now, event);
            if let Err(broken) = self
                .core
                .check_invariants()
                .and_then(|()| self.core.check_timers(self.now))
            {
                panic!(
                    "invariant broken: {broken}\nactions: {actions:?}\nstate: {:#?}",
                    self.core
                );
            }
            for action in &actions {
                if let Action::Spawn { worker, .. } = action {
                    pending.push(if self.spawns_succeed {
                        self.next_pid += 1;
                        Event::Started {
                            worker: *worker,
                            pid: self.next_pid,
                        }
                    } else {
                        Event::StartFailed {
                            worker: *worker,
                            error: "fork refused".into(),
                        }
                    });
                }
            }
            all.extend(actions);
        }
        all
    }

    pub fn tick(&mut self) -> Vec<Action> {
        self.handle(Event::Tick)
    }

    pub fn advance(&mut self, by: Duration) -> Vec<Action> {
        self.now += by;
        self.tick()
    }

    /// The worker in `slot` with `role`.
    pub fn worker(&self, slot: usize, role: Role) -> WorkerId {
        self.try_worker(slot, role)
            .unwrap_or_else(|| panic!("no {role:?} worker in slot {slot}: {:#?}", self.core))
    }

    pub fn try_worker(&self, slot: usize, role: Role) -> Option<WorkerId> {
        self.core
            .workers()
            .filter(|w| w.slot == SlotIx(slot) && w.role() == role)
            .map(|w| w.id)
            .max()
    }

    pub fn stage(&self, id: WorkerId) -> Option<Stage> {
        self.core.worker(id).map(|w| w.stage)
    }

    /// Makes every starting worker ready.
    pub fn all_ready(&mut self) {
        let starting: Vec<WorkerId> = self
            .core
            .workers()
            .filter(|w| w.is_starting())
            .map(|w| w.id)
            .collect();
        for id in starting {
            self.handle(Event::Ready { worker: id });
        }
    }

    pub fn state(&self, slot: usize) -> SlotState {
        self.core.slots()[slot].state
    }

    pub fn exit(&mut self, id: WorkerId, status: ExitStatus) -> Vec<Action> {
        self.handle(Event::Exited { worker: id, status })
    }
}

pub(super) fn spawns(actions: &[Action]) -> Vec<usize> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Spawn { slot, .. } => Some(slot.get()),
            _ => None,
        })
        .collect()
}

pub(super) fn signals(actions: &[Action], id: WorkerId) -> Vec<Signal> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Signal { worker, signal } if *worker == id => Some(*signal),
            _ => None,
        })
        .collect()
}

/// The slots started while the clock moves on by `limit`, 10 ms at a time.
pub(super) fn spawns_within(world: &mut World, limit: Duration) -> Vec<usize> {
    let mut waited = Duration::ZERO;
    while waited < limit {
        let started = spawns(&world.advance(Duration::from_millis(10)));
        if !started.is_empty() {
            return started;
        }
        waited += Duration::from_millis(10);
    }
    Vec::new()
}

/// How many SIGKILLs `actions` send.
pub(super) fn kills(actions: &[Action]) -> usize {
    actions
        .iter()
        .filter(|a| {
            matches!(
                a,
                Action::Signal {
                    signal: Signal::SIGKILL,
                    ..
                }
            )
        })
        .count()
}

pub(super) fn has(actions: &[Action], wanted: &Action) -> bool {
    actions.contains(wanted)
}

pub(super) fn reload_answer(actions: &[Action]) -> Option<(bool, String)> {
    actions.iter().find_map(|a| match a {
        Action::ReloadFinished { result, .. } => Some(match result {
            Ok(message) => (true, message.clone()),
            Err(message) => (false, message.clone()),
        }),
        _ => None,
    })
}

pub(super) fn serving_world(workers: usize) -> World {
    let mut world = World::new(workers, policy());
    world.all_ready();
    world
}
