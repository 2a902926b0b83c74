//! The decision core driven through every (stage, event) pair that
//! docs/lifecycle.md lists, one worker stage at a time (scaling, reloads,
//! stopping and slots: `scenario_tests`).

use std::time::Duration;

use nix::sys::signal::Signal;

use super::world::*;
use super::*;

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
fn notified_ready_serves_unannounced_and_is_later_stopped_with_sigterm() {
    let mut world = World::new(1, policy());
    let id = world.worker(0, Role::Starting);
    // Nothing before READY=1, however long it takes within ready_timeout.
    assert!(world.advance(Duration::from_millis(900)).is_empty());
    let actions = world.handle(Event::Notified { worker: id });
    assert!(has(&actions, &Action::Serve { worker: id }));
    assert_eq!(world.state(0), SlotState::Ready);
    assert!(!world.core.worker(id).unwrap().announced);
    // It may not read DRAIN: SIGTERM too.
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
            slot: SlotIx(0),
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
            slot: SlotIx(0),
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
            slot: SlotIx(0),
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
            slot: SlotIx(0),
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
            slot: SlotIx(0),
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
            slot: SlotIx(0),
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
            slot: SlotIx(0),
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
