//! The decision core through scaling, rolling reloads, stopping, a slot's
//! backoff, and the whole (stage, event) table at once.

use std::time::Duration;

use nix::sys::signal::Signal;

use super::world::*;
use super::*;

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
    assert!(message.contains("slot 0 exited with code 3"), "{message}");
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
            Action::Spawn { slot, version, .. } => Some((slot.get(), *version)),
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
                slot: SlotIx(1),
                version,
                ..
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
