//! The decision core driven through every (stage, event) pair that
//! docs/lifecycle.md lists, with a fake clock and a fake spawner: the
//! [`World`] answers every spawn as the supervisor would and checks the
//! invariant after every event.

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
            .filter(|w| w.slot == slot && w.role() == role)
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
            Action::Spawn { slot, .. } => Some(*slot),
            _ => None,
        })
        .collect()
}

fn signals(actions: &[Action], id: WorkerId) -> Vec<Signal> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Signal { worker, signal } if *worker == id => Some(*signal),
            _ => None,
        })
        .collect()
}

/// The slots started while the clock moves on by `limit`, 10 ms at a time.
fn spawns_within(world: &mut World, limit: Duration) -> Vec<usize> {
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
fn kills(actions: &[Action]) -> usize {
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

fn has(actions: &[Action], wanted: &Action) -> bool {
    actions.contains(wanted)
}

fn reload_answer(actions: &[Action]) -> Option<(bool, String)> {
    actions.iter().find_map(|a| match a {
        Action::ReloadFinished { result, .. } => Some(match result {
            Ok(message) => (true, message.clone()),
            Err(message) => (false, message.clone()),
        }),
        _ => None,
    })
}

fn serving_world(workers: usize) -> World {
    let mut world = World::new(workers, policy());
    world.all_ready();
    world
}

// ---- start ----

#[test]
fn the_first_event_fills_every_slot() {
    let world = World::new(3, policy());
    for slot in 0..3 {
        assert_eq!(world.state(slot), SlotState::Starting);
    }
    assert_eq!(world.core.workers().count(), 3);
}

// ---- a starting worker ----

#[test]
fn starting_then_ready_serves() {
    let mut world = World::new(1, policy());
    let id = world.worker(0, Role::Starting);
    let actions = world.handle(Event::Ready { worker: id });
    assert!(has(&actions, &Action::Serve { worker: id }));
    assert_eq!(world.state(0), SlotState::Ready);
    assert!(world.core.worker(id).unwrap().announced);
}

#[test]
fn starting_then_ready_delay_serves_unannounced_and_is_later_stopped_with_sigterm() {
    let mut world = World::new(
        1,
        Policy {
            ready_delay: Some(Duration::from_millis(200)),
            ..policy()
        },
    );
    let id = world.worker(0, Role::Starting);
    let actions = world.advance(Duration::from_millis(200));
    assert!(has(&actions, &Action::Serve { worker: id }));
    assert!(!world.core.worker(id).unwrap().announced);
    let actions = world.handle(Event::Stop);
    assert!(has(&actions, &Action::Drain { worker: id }));
    assert_eq!(signals(&actions, id), [Signal::SIGTERM]);
}

#[test]
fn starting_past_ready_timeout_is_killed_and_the_slot_backs_off() {
    let mut world = World::new(1, policy());
    let id = world.worker(0, Role::Starting);
    let actions = world.advance(Duration::from_secs(1));
    assert_eq!(signals(&actions, id), [Signal::SIGKILL]);
    assert!(has(
        &actions,
        &Action::Restarted {
            slot: 0,
            reason: RestartReason::ReadyTimeout
        }
    ));
    assert_eq!(world.state(0), SlotState::Waiting);
    assert!(spawns(&world.exit(id, killed_by(Signal::SIGKILL))).is_empty());
    assert_eq!(spawns(&world.advance(Duration::from_millis(100))), [0]);
}

#[test]
fn starting_then_exit_is_a_failed_start_retried_with_doubling_backoff() {
    let mut world = World::new(1, policy());
    let mut delays = Vec::new();
    for _ in 0..4 {
        let id = world.worker(0, Role::Starting);
        assert!(spawns(&world.exit(id, exit(1))).is_empty());
        let mut waited = Duration::ZERO;
        while spawns(&world.advance(Duration::from_millis(50))).is_empty() {
            waited += Duration::from_millis(50);
        }
        delays.push((waited + Duration::from_millis(50)).as_millis());
    }
    assert_eq!(delays, [100, 200, 400, 800]);
}

#[test]
fn starting_then_spawn_failure_backs_off_and_never_spins() {
    let mut world = World::new(1, policy());
    world.spawns_succeed = false;
    let id = world.worker(0, Role::Starting);
    world.exit(id, exit(1));
    // Every failure doubles the wait: bounded starts over ten seconds.
    let mut attempts = 0;
    for _ in 0..100 {
        attempts += spawns(&world.advance(Duration::from_millis(100))).len();
    }
    assert!((5..=15).contains(&attempts), "{attempts} attempts");
    assert_eq!(world.state(0), SlotState::CrashLooping);
}

#[test]
fn starting_whose_channel_closed_is_stopped_if_it_outlives_the_grace() {
    let mut world = World::new(1, policy());
    let id = world.worker(0, Role::Starting);
    assert!(world.handle(Event::ChannelClosed { worker: id }).is_empty());
    let actions = world.advance(CHANNEL_LOSS_GRACE);
    assert!(has(&actions, &Action::Drain { worker: id }));
    assert_eq!(signals(&actions, id), [Signal::SIGTERM]);
    assert_eq!(
        spawns(&actions),
        Vec::<usize>::new(),
        "a failed start backs off"
    );
    assert_eq!(spawns(&world.advance(Duration::from_millis(100))), [0]);
}

#[test]
fn starting_ignores_recycle_memory_and_hung() {
    let mut world = World::new(1, policy());
    let id = world.worker(0, Role::Starting);
    world.handle(Event::RecycleDue { worker: id });
    world.handle(Event::Memory {
        samples: vec![(id, 1 << 40)],
    });
    assert_eq!(
        world.stage(id).map(|s| matches!(s, Stage::Starting { .. })),
        Some(true)
    );
}

// ---- a serving worker ----

#[test]
fn serving_ignores_a_second_ready() {
    let mut world = serving_world(1);
    let id = world.worker(0, Role::Serving);
    assert!(world.handle(Event::Ready { worker: id }).is_empty());
}

#[test]
fn serving_exit_after_a_good_run_restarts_at_once() {
    let mut world = serving_world(1);
    let id = world.worker(0, Role::Serving);
    world.now += Duration::from_secs(5);
    let actions = world.exit(id, killed_by(Signal::SIGKILL));
    assert!(has(&actions, &Action::Forget { worker: id }));
    assert!(has(
        &actions,
        &Action::Restarted {
            slot: 0,
            reason: RestartReason::Signal
        }
    ));
    assert_eq!(spawns(&actions), [0]);
    assert_eq!(world.core.slots()[0].restarts, 1);
}

#[test]
fn serving_exit_before_min_uptime_is_a_failed_start() {
    let mut world = serving_world(1);
    let id = world.worker(0, Role::Serving);
    let actions = world.exit(id, exit(0));
    assert!(spawns(&actions).is_empty());
    assert_eq!(world.state(0), SlotState::Waiting);
    assert_eq!(spawns(&world.advance(Duration::from_millis(100))), [0]);
}

#[test]
fn serving_whose_channel_closed_and_exits_restarts_as_an_exit() {
    let mut world = serving_world(1);
    let id = world.worker(0, Role::Serving);
    world.now += Duration::from_secs(6);
    world.handle(Event::ChannelClosed { worker: id });
    let actions = world.exit(id, exit(1));
    assert!(has(
        &actions,
        &Action::Restarted {
            slot: 0,
            reason: RestartReason::Exit
        }
    ));
    assert_eq!(spawns(&actions), [0]);
}

#[test]
fn serving_whose_channel_closed_but_lives_on_is_stopped_and_replaced() {
    let mut world = serving_world(1);
    let id = world.worker(0, Role::Serving);
    world.now += Duration::from_secs(6);
    world.handle(Event::ChannelClosed { worker: id });
    let actions = world.advance(CHANNEL_LOSS_GRACE);
    assert_eq!(signals(&actions, id), [Signal::SIGTERM]);
    assert!(has(
        &actions,
        &Action::Restarted {
            slot: 0,
            reason: RestartReason::ChannelClosed
        }
    ));
    assert_eq!(spawns(&actions), [0]);
    assert!(matches!(world.stage(id), Some(Stage::Draining { .. })));
}

#[test]
fn serving_recycle_starts_a_replacement_that_takes_over_when_ready() {
    let mut world = serving_world(1);
    let old = world.worker(0, Role::Serving);
    let actions = world.handle(Event::RecycleDue { worker: old });
    assert!(has(
        &actions,
        &Action::Restarted {
            slot: 0,
            reason: RestartReason::Recycle
        }
    ));
    assert_eq!(spawns(&actions), [0]);
    assert_eq!(world.state(0), SlotState::Replacing);
    // Asking again starts nothing more.
    assert!(spawns(&world.handle(Event::RecycleDue { worker: old })).is_empty());
    let new = world.worker(0, Role::Starting);
    let actions = world.handle(Event::Ready { worker: new });
    let serve = actions
        .iter()
        .position(|a| *a == Action::Serve { worker: new });
    let drain = actions
        .iter()
        .position(|a| *a == Action::Drain { worker: old });
    assert!(serve < drain && drain.is_some(), "{actions:?}");
    assert!(
        signals(&actions, old).is_empty(),
        "DRAIN is enough for a worker that reads it"
    );
}

#[test]
fn serving_memory_over_the_limit_is_replaced_and_under_it_is_not() {
    let mut world = serving_world(1);
    let id = world.worker(0, Role::Serving);
    assert!(spawns(&world.handle(Event::Memory {
        samples: vec![(id, 100 << 20)]
    }))
    .is_empty());
    let actions = world.handle(Event::Memory {
        samples: vec![(id, (100 << 20) + 1)],
    });
    assert!(has(
        &actions,
        &Action::Restarted {
            slot: 0,
            reason: RestartReason::Memory
        }
    ));
    assert_eq!(spawns(&actions), [0]);
}

#[test]
fn a_failed_replacement_is_retried_with_backoff_while_the_old_worker_serves() {
    let mut world = serving_world(1);
    let old = world.worker(0, Role::Serving);
    world.handle(Event::RecycleDue { worker: old });
    let new = world.worker(0, Role::Starting);
    assert!(spawns(&world.exit(new, exit(1))).is_empty());
    assert_eq!(world.state(0), SlotState::Ready);
    assert_eq!(spawns(&world.advance(Duration::from_millis(100))), [0]);
}

/// The case: the replacement never becomes ready and the worker it
/// was to replace is SIGKILLed meanwhile. The slot must get a worker again.
#[test]
fn a_failed_replacement_whose_old_worker_died_meanwhile_refills_the_slot() {
    for cause in [
        Event::RecycleDue {
            worker: WorkerId(1),
        },
        Event::Memory {
            samples: vec![(WorkerId(1), u64::MAX)],
        },
    ] {
        let mut world = serving_world(1);
        let old = world.worker(0, Role::Serving);
        assert_eq!(old, WorkerId(1));
        world.handle(cause);
        let new = world.worker(0, Role::Starting);
        world.now += Duration::from_millis(500);
        assert!(
            spawns(&world.exit(old, killed_by(Signal::SIGKILL))).is_empty(),
            "the replacement is starting"
        );
        assert_eq!(world.state(0), SlotState::Starting);
        let actions = world.advance(Duration::from_millis(500));
        assert_eq!(signals(&actions, new), [Signal::SIGKILL], "ready_timeout");
        world.exit(new, killed_by(Signal::SIGKILL));
        assert_eq!(world.state(0), SlotState::Waiting);
        assert_eq!(spawns_within(&mut world, Duration::from_secs(1)), [0]);
    }
}

#[test]
fn serving_hung_is_killed_and_its_slot_shows_hung_until_a_worker_is_ready() {
    let mut world = serving_world(2);
    let id = world.worker(0, Role::Serving);
    world.now += Duration::from_secs(10);
    let actions = world.handle(Event::Hung { worker: id });
    assert_eq!(signals(&actions, id), [Signal::SIGKILL]);
    assert!(
        has(&actions, &Action::Drain { worker: id }),
        "no more connections while the kill lands"
    );
    assert!(has(
        &actions,
        &Action::Restarted {
            slot: 0,
            reason: RestartReason::Hung
        }
    ));
    assert_eq!(spawns(&actions), [0], "replaced at once after a good run");
    assert_eq!(world.state(0), SlotState::Hung);
    world.exit(id, killed_by(Signal::SIGKILL));
    assert_eq!(world.state(0), SlotState::Hung);
    world.all_ready();
    assert_eq!(world.state(0), SlotState::Ready);
    assert_eq!(world.state(1), SlotState::Ready);
}

// ---- a draining worker ----

#[test]
fn draining_never_serves_again() {
    let mut world = serving_world(1);
    let old = world.worker(0, Role::Serving);
    world.handle(Event::RecycleDue { worker: old });
    world.all_ready();
    assert_eq!(world.core.worker(old).unwrap().role(), Role::Draining);
    let actions = world.handle(Event::Ready { worker: old });
    assert!(actions.is_empty(), "{actions:?}");
    assert_eq!(world.core.worker(old).unwrap().role(), Role::Draining);
}

#[test]
fn draining_exit_restarts_nothing() {
    let mut world = serving_world(1);
    let old = world.worker(0, Role::Serving);
    world.handle(Event::RecycleDue { worker: old });
    world.all_ready();
    let actions = world.exit(old, exit(0));
    assert_eq!(actions, [Action::Forget { worker: old }]);
}

#[test]
fn draining_past_shutdown_timeout_is_killed() {
    let mut world = serving_world(1);
    let old = world.worker(0, Role::Serving);
    world.handle(Event::RecycleDue { worker: old });
    world.all_ready();
    assert!(signals(&world.advance(Duration::from_secs(9)), old).is_empty());
    assert_eq!(
        signals(&world.advance(Duration::from_secs(1)), old),
        [Signal::SIGKILL]
    );
}

#[test]
fn draining_node_worker_whose_channel_closed_gets_sigterm_like_worker_kill() {
    let mut world = World::new(
        1,
        Policy {
            node: true,
            ..policy()
        },
    );
    world.all_ready();
    let id = world.worker(0, Role::Serving);
    let actions = world.handle(Event::Stop);
    assert!(has(&actions, &Action::Drain { worker: id }));
    assert!(signals(&actions, id).is_empty(), "disconnect first");
    let actions = world.handle(Event::ChannelClosed { worker: id });
    assert_eq!(signals(&actions, id), [Signal::SIGTERM]);
    world.exit(id, killed_by(Signal::SIGTERM));
    assert!(world.core.finished());
    assert!(
        !world.core.forced(),
        "a Node worker stopped by its convention is no forced stop"
    );
}

#[test]
fn draining_herd_worker_whose_channel_closed_is_left_to_exit() {
    let mut world = serving_world(1);
    let id = world.worker(0, Role::Serving);
    world.handle(Event::Stop);
    assert!(world.handle(Event::ChannelClosed { worker: id }).is_empty());
}

#[test]
fn draining_hung_is_killed_without_a_restart() {
    let mut world = serving_world(1);
    let old = world.worker(0, Role::Serving);
    world.handle(Event::RecycleDue { worker: old });
    world.all_ready();
    let actions = world.handle(Event::Hung { worker: old });
    assert_eq!(signals(&actions, old), [Signal::SIGKILL]);
    assert!(spawns(&actions).is_empty());
    assert_eq!(world.state(0), SlotState::Ready);
}

// ---- a killed worker ----

#[test]
fn killed_ignores_everything_but_its_exit() {
    let mut world = World::new(1, policy());
    let id = world.worker(0, Role::Starting);
    world.advance(Duration::from_secs(1));
    for event in [
        Event::Ready { worker: id },
        Event::ChannelClosed { worker: id },
        Event::Hung { worker: id },
        Event::RecycleDue { worker: id },
    ] {
        let actions = world.handle(event);
        assert!(signals(&actions, id).is_empty() && !has(&actions, &Action::Serve { worker: id }));
    }
    assert!(has(
        &world.exit(id, killed_by(Signal::SIGKILL)),
        &Action::Forget { worker: id }
    ));
    assert!(world.core.worker(id).is_none());
}

// ---- scaling ----

#[test]
fn scaling_up_starts_new_slots_and_down_drains_the_highest() {
    let mut world = serving_world(2);
    assert_eq!(spawns(&world.handle(Event::Scale { workers: 4 })), [2, 3]);
    world.all_ready();
    let (two, three) = (
        world.worker(2, Role::Serving),
        world.worker(3, Role::Serving),
    );
    let actions = world.handle(Event::Scale { workers: 2 });
    assert!(has(&actions, &Action::SetSlots { count: 2 }));
    assert!(
        has(&actions, &Action::Drain { worker: two })
            && has(&actions, &Action::Drain { worker: three })
    );
    assert_eq!(world.core.slot_count(), 2);
    // Their exits restart nothing.
    assert!(spawns(&world.exit(two, exit(0))).is_empty());
}

/// The race that crashed herd: the scale-down is decided while the new
/// worker's READY is on its way. READY then finds it draining.
#[test]
fn scale_down_racing_ready_never_serves_the_drained_worker() {
    let mut world = serving_world(1);
    world.handle(Event::Scale { workers: 2 });
    let newcomer = world.worker(1, Role::Starting);
    let actions = world.handle(Event::Scale { workers: 1 });
    assert!(has(&actions, &Action::Drain { worker: newcomer }));
    assert!(world.handle(Event::Ready { worker: newcomer }).is_empty());
    world.handle(Event::ChannelClosed { worker: newcomer });
    world.advance(CHANNEL_LOSS_GRACE * 3);
    world.handle(Event::RecycleDue { worker: newcomer });
    assert_eq!(world.core.worker(newcomer).unwrap().role(), Role::Draining);
    world.exit(newcomer, exit(0));
    assert_eq!(world.core.slot_count(), 1);
}

#[test]
fn scale_is_clamped_to_one_and_max_workers() {
    let mut world = serving_world(1);
    world.handle(Event::Scale { workers: 0 });
    assert_eq!(world.core.slot_count(), 1);
    world.handle(Event::Scale {
        workers: MAX_WORKERS + 5,
    });
    assert_eq!(world.core.slot_count(), MAX_WORKERS);
}

// ---- reload ----

fn reload(
    world: &mut World,
    ticket: u64,
    version: u32,
    policy: Policy,
    workers: usize,
) -> Vec<Action> {
    world.handle(Event::Reload {
        ticket,
        version: Version(version),
        policy,
        workers,
    })
}

#[test]
fn a_reload_replaces_every_slot_one_batch_at_a_time() {
    let mut world = serving_world(3);
    let actions = reload(&mut world, 7, 1, policy(), 3);
    assert_eq!(spawns(&actions), [0], "reload_batch = 1");
    assert_eq!(world.core.phase(), Phase::Reloading);
    for next in [1, 2] {
        let new = world.worker(next - 1, Role::Starting);
        let actions = world.handle(Event::Ready { worker: new });
        assert_eq!(spawns(&actions), [next]);
    }
    let new = world.worker(2, Role::Starting);
    let actions = world.handle(Event::Ready { worker: new });
    let (ok, message) = reload_answer(&actions).unwrap();
    assert!(
        ok && message.starts_with("reloaded 3 worker(s)"),
        "{message}"
    );
    assert_eq!(world.core.phase(), Phase::Running);
    assert!(world
        .core
        .workers()
        .filter(|w| w.is_live())
        .all(|w| w.version == Version(1)));
    assert_eq!(
        world.core.versions_in_use().len(),
        2,
        "the old version lives while old workers drain"
    );
    for old in [WorkerId(1), WorkerId(2), WorkerId(3)] {
        world.exit(old, exit(0));
    }
    assert_eq!(
        world.core.versions_in_use().into_iter().collect::<Vec<_>>(),
        [Version(1)]
    );
}

#[test]
fn a_reload_batch_replaces_several_slots_at_once() {
    let mut world = serving_world(4);
    let actions = reload(
        &mut world,
        1,
        1,
        Policy {
            reload_batch: 3,
            ..policy()
        },
        4,
    );
    assert_eq!(spawns(&actions), [0, 1, 2]);
}

#[test]
fn a_reload_whose_new_worker_fails_keeps_the_old_workers() {
    let mut world = serving_world(2);
    reload(&mut world, 1, 1, policy(), 2);
    let new = world.worker(0, Role::Starting);
    let actions = world.exit(new, exit(3));
    let (ok, message) = reload_answer(&actions).unwrap();
    assert!(!ok);
    assert!(
        message.contains("slot 0 worker exited with code 3"),
        "{message}"
    );
    assert!(!message.contains("gone"), "{message}");
    assert_eq!(world.core.phase(), Phase::Running);
    assert_eq!(world.state(0), SlotState::Ready);
    assert!(world.core.workers().all(|w| w.version == Version(0)));
    // The failure counts for the slot: the next new worker would wait.
    assert!(
        spawns(&world.advance(Duration::from_secs(1))).is_empty(),
        "nothing to replace any more"
    );
}

/// The reload case: the new worker never becomes ready and the
/// serving worker is SIGKILLed meanwhile.
#[test]
fn a_failed_reload_whose_old_worker_died_says_so_and_refills_on_the_running_version() {
    let mut world = serving_world(1);
    let old = world.worker(0, Role::Serving);
    reload(&mut world, 1, 1, policy(), 1);
    let new = world.worker(0, Role::Starting);
    world.now += Duration::from_millis(300);
    assert!(spawns(&world.exit(old, killed_by(Signal::SIGKILL))).is_empty());
    let actions = world.advance(Duration::from_millis(700));
    assert_eq!(signals(&actions, new), [Signal::SIGKILL]);
    let (ok, message) = reload_answer(&actions).unwrap();
    assert!(!ok);
    assert!(
        message.contains("restarts on the running version"),
        "{message}"
    );
    world.exit(new, killed_by(Signal::SIGKILL));
    assert_eq!(spawns_within(&mut world, Duration::from_secs(1)), [0]);
    assert_eq!(
        world
            .core
            .worker(world.worker(0, Role::Starting))
            .unwrap()
            .version,
        Version(0)
    );
}

#[test]
fn a_reload_while_one_runs_is_refused_and_the_first_goes_on() {
    let mut world = serving_world(2);
    reload(&mut world, 1, 1, policy(), 2);
    let actions = reload(&mut world, 2, 2, policy(), 2);
    assert_eq!(
        reload_answer(&actions),
        Some((false, "a reload is already in progress".into()))
    );
    world.all_ready();
    world.all_ready();
    assert_eq!(world.core.phase(), Phase::Running);
}

#[test]
fn a_reload_keeps_a_runtime_count_unless_the_config_changes_it() {
    let mut world = serving_world(2);
    world.handle(Event::Scale { workers: 3 });
    world.all_ready();
    reload(&mut world, 1, 1, policy(), 2);
    assert_eq!(
        world.core.slot_count(),
        3,
        "workers unchanged in the file: keep 3"
    );
    for _ in 0..3 {
        world.all_ready();
    }
    reload(&mut world, 2, 2, policy(), 5);
    assert_eq!(world.core.slot_count(), 5);
}

#[test]
fn a_reload_that_grows_the_count_starts_the_new_slots_on_the_new_version() {
    let mut world = serving_world(1);
    let actions = reload(&mut world, 1, 1, policy(), 3);
    let spawned: Vec<(usize, Version)> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Spawn { slot, version, .. } => Some((*slot, *version)),
            _ => None,
        })
        .collect();
    assert_eq!(spawned, [(0, Version(1)), (1, Version(1)), (2, Version(1))]);
}

#[test]
fn a_reload_over_a_restarting_slot_restarts_it_on_the_new_version() {
    let mut world = serving_world(2);
    let victim = world.worker(1, Role::Serving);
    world.exit(victim, exit(1)); // failed start: slot 1 waits 100 ms
    assert_eq!(world.state(1), SlotState::Waiting);
    let mut actions = reload(
        &mut world,
        1,
        1,
        Policy {
            reload_batch: 2,
            ..policy()
        },
        2,
    );
    actions.extend(world.advance(Duration::from_millis(100)));
    let versions: Vec<Version> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Spawn {
                slot: 1, version, ..
            } => Some(*version),
            _ => None,
        })
        .collect();
    assert_eq!(versions, [Version(1)]);
}

#[test]
fn a_reload_cuts_short_a_start_of_the_old_version() {
    let mut world = World::new(1, policy());
    let old_start = world.worker(0, Role::Starting);
    let actions = reload(&mut world, 1, 1, policy(), 1);
    assert_eq!(signals(&actions, old_start), [Signal::SIGKILL]);
    assert_eq!(spawns(&actions), [0]);
    world.exit(old_start, killed_by(Signal::SIGKILL));
    world.all_ready();
    assert_eq!(world.core.phase(), Phase::Running);
}

#[test]
fn scaling_down_during_a_reload_forgets_the_removed_slots() {
    let mut world = serving_world(3);
    reload(&mut world, 1, 1, policy(), 3);
    world.handle(Event::Scale { workers: 1 });
    let new = world.worker(0, Role::Starting);
    let actions = world.handle(Event::Ready { worker: new });
    assert!(reload_answer(&actions).unwrap().0);
}

// ---- stopping ----

#[test]
fn stop_drains_everyone_once_and_finishes_when_all_exited() {
    let mut world = serving_world(2);
    world.handle(Event::Scale { workers: 3 });
    let actions = world.handle(Event::Stop);
    assert_eq!(actions.first(), Some(&Action::StopAccepting));
    assert_eq!(
        actions
            .iter()
            .filter(|a| matches!(a, Action::Drain { .. }))
            .count(),
        3
    );
    assert_eq!(world.core.phase(), Phase::Stopping);
    assert!(
        world.handle(Event::Stop).is_empty(),
        "a second stop changes nothing"
    );
    assert!(spawns(&world.handle(Event::Scale { workers: 5 })).is_empty());
    let ids: Vec<WorkerId> = world.core.workers().map(|w| w.id).collect();
    for id in ids {
        assert!(!world.core.finished());
        assert!(
            spawns(&world.exit(id, exit(0))).is_empty(),
            "no restarts while stopping"
        );
    }
    assert!(world.core.finished() && !world.core.forced());
}

#[test]
fn stop_kills_at_shutdown_timeout_and_is_then_forced() {
    let mut world = serving_world(2);
    world.handle(Event::Stop);
    let actions = world.advance(Duration::from_secs(10));
    assert_eq!(kills(&actions), 2);
    assert!(world.core.forced());
}

#[test]
fn kill_all_kills_at_once_and_stops() {
    let mut world = serving_world(2);
    let actions = world.handle(Event::KillAll);
    assert!(has(&actions, &Action::StopAccepting));
    assert_eq!(kills(&actions), 2);
    assert!(world.core.forced());
}

#[test]
fn stop_during_a_reload_answers_the_reload() {
    let mut world = serving_world(2);
    reload(&mut world, 9, 1, policy(), 2);
    let actions = world.handle(Event::Stop);
    assert_eq!(
        reload_answer(&actions),
        Some((false, "herd is stopping".into()))
    );
    assert_eq!(
        reload_answer(&reload(&mut world, 10, 2, policy(), 2)),
        Some((false, "herd is stopping".into()))
    );
}

// ---- a slot ----

#[test]
fn a_crash_looping_slot_keeps_retrying_at_the_capped_delay() {
    let mut world = World::new(1, policy());
    for _ in 0..8 {
        let id = world.worker(0, Role::Starting);
        world.exit(id, exit(1));
        let mut waited = 0;
        while world.try_worker(0, Role::Starting).is_none() {
            world.advance(Duration::from_millis(100));
            waited += 1;
            assert!(
                waited <= 10,
                "retries never stop, and never wait past backoff_max"
            );
        }
    }
    assert_eq!(world.core.slots()[0].restarts, 8);
    let id = world.worker(0, Role::Starting);
    assert_eq!(world.state(0), SlotState::Starting);
    world.handle(Event::Ready { worker: id });
    assert_eq!(world.state(0), SlotState::Ready);
    world.now += Duration::from_secs(6);
    world.exit(id, exit(1));
    assert_eq!(
        world.state(0),
        SlotState::Starting,
        "a good run clears the crash loop"
    );
}

#[test]
fn the_next_deadline_is_the_earliest_timer() {
    let mut world = World::new(1, policy());
    assert_eq!(
        world.core.next_deadline(),
        Some(world.now + Duration::from_secs(1))
    );
    world.all_ready();
    assert_eq!(
        world.core.next_deadline(),
        None,
        "a serving worker runs no timer"
    );
}

// ---- the whole table at once ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Starting,
    Serving,
    Draining,
    Killed,
    Gone,
}

fn kind(stage: Option<Stage>) -> Kind {
    match stage {
        Some(Stage::Starting { .. }) => Kind::Starting,
        Some(Stage::Serving { .. }) => Kind::Serving,
        Some(Stage::Draining { .. }) => Kind::Draining,
        Some(Stage::Killed { .. }) => Kind::Killed,
        None => Kind::Gone,
    }
}

/// A world with one worker (slot 0) in `wanted`; returns it.
fn worker_in(wanted: Kind) -> (World, WorkerId) {
    let mut world = World::new(1, policy());
    let first = world.worker(0, Role::Starting);
    match wanted {
        Kind::Starting => {}
        Kind::Serving => {
            world.all_ready();
        }
        Kind::Draining => {
            world.all_ready();
            world.handle(Event::RecycleDue { worker: first });
            world.all_ready();
        }
        Kind::Killed => {
            world.advance(Duration::from_secs(1));
        }
        Kind::Gone => unreachable!(),
    }
    assert_eq!(kind(world.stage(first)), wanted);
    (world, first)
}

/// docs/lifecycle.md's table, row by row: the stage each event leaves a
/// worker in.
#[test]
fn every_stage_and_event_pair_does_what_the_lifecycle_table_says() {
    use Kind::*;
    type MakeEvent = fn(WorkerId) -> Event;
    let events: [(&str, MakeEvent); 9] = [
        ("Ready", |w| Event::Ready { worker: w }),
        ("ChannelClosed", |w| Event::ChannelClosed { worker: w }),
        ("Exited", |w| Event::Exited {
            worker: w,
            status: exit(0),
        }),
        ("RecycleDue", |w| Event::RecycleDue { worker: w }),
        ("Memory", |w| Event::Memory {
            samples: vec![(w, u64::MAX)],
        }),
        ("Hung", |w| Event::Hung { worker: w }),
        ("Scale", |_| Event::Scale { workers: 1 }),
        ("Stop", |_| Event::Stop),
        ("KillAll", |_| Event::KillAll),
    ];
    let table = [
        (
            Starting,
            [
                Serving, Starting, Gone, Starting, Starting, Starting, Starting, Draining, Killed,
            ],
        ),
        (
            Serving,
            [
                Serving, Serving, Gone, Serving, Serving, Killed, Serving, Draining, Killed,
            ],
        ),
        (
            Draining,
            [
                Draining, Draining, Gone, Draining, Draining, Killed, Draining, Draining, Killed,
            ],
        ),
        (
            Killed,
            [
                Killed, Killed, Gone, Killed, Killed, Killed, Killed, Killed, Killed,
            ],
        ),
    ];
    for (stage, after) in table {
        for ((name, event), expected) in events.iter().zip(after) {
            let (mut world, id) = worker_in(stage);
            world.handle(event(id));
            assert_eq!(kind(world.stage(id)), expected, "{stage:?} + {name}");
        }
    }
}
