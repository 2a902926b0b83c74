//! `stop_signal`: the decision itself for every combination of what herd
//! knows of a draining worker, then every path that drains one (stop,
//! reload, scale-down, recycling, memory, a lost channel, a start
//! abandoned), each sending the configured signal and nothing else before
//! SIGKILL at `shutdown_timeout`.

use std::time::Duration;

use nix::sys::signal::Signal;

use super::stop_signal::{after_disconnect, at_drain, Drained};
use super::worker::DrainCause;
use super::world::*;
use super::*;

const CAUSES: [DrainCause; 4] = [
    DrainCause::Replaced,
    DrainCause::ScaledDown,
    DrainCause::Stopping,
    DrainCause::ChannelLost,
];

const DELAY: Duration = Duration::from_millis(200);

/// Every policy shape the decision reads: `stop_signal`, `ready_delay`, Node.
fn policies(stop_signal: Option<Signal>) -> Vec<Policy> {
    let mut all = Vec::new();
    for ready_delay in [None, Some(DELAY)] {
        for node in [false, true] {
            all.push(Policy {
                stop_signal,
                ready_delay,
                node,
                ..policy()
            });
        }
    }
    all
}

/// Every worker shape the decision reads.
fn drained_workers() -> Vec<Drained> {
    let mut all = Vec::new();
    for announced in [false, true] {
        for was_starting in [false, true] {
            for cause in CAUSES {
                all.push(Drained {
                    announced,
                    was_starting,
                    cause,
                });
            }
        }
    }
    all
}

// ---- the decision ----

#[test]
fn a_set_stop_signal_is_sent_to_every_draining_worker_whatever_it_speaks() {
    for signal in [Signal::SIGQUIT, Signal::SIGINT, Signal::SIGTERM] {
        for policy in policies(Some(signal)) {
            for worker in drained_workers() {
                assert_eq!(
                    at_drain(&policy, worker),
                    Some(signal),
                    "{policy:?} {worker:?}"
                );
            }
        }
    }
}

#[test]
fn without_stop_signal_only_a_worker_that_reads_drain_gets_no_signal() {
    for policy in policies(None) {
        for worker in drained_workers() {
            // It reads DRAIN: it said READY on its channel (not made ready
            // by `ready_delay` or NOTIFY_SOCKET); it was serving, so it has
            // connections to finish; its channel is open.
            let reads_drain =
                worker.announced && !worker.was_starting && worker.cause != DrainCause::ChannelLost;
            let expected = if reads_drain {
                None
            } else {
                Some(Signal::SIGTERM)
            };
            assert_eq!(at_drain(&policy, worker), expected, "{policy:?} {worker:?}");
        }
    }
}

#[test]
fn a_node_worker_that_disconnected_gets_sigterm_unless_stop_signal_was_sent() {
    let cases = [
        (false, None, None),
        (false, Some(Signal::SIGINT), None),
        (true, None, Some(Signal::SIGTERM)),
        (true, Some(Signal::SIGINT), None),
    ];
    for (node, stop_signal, expected) in cases {
        let policy = Policy {
            node,
            stop_signal,
            ..policy()
        };
        assert_eq!(after_disconnect(&policy), expected, "{policy:?}");
    }
}

// ---- every path that drains a worker ----

/// A plain server that never says READY and stops on SIGQUIT (nginx).
fn quits() -> Policy {
    Policy {
        ready_delay: Some(DELAY),
        stop_signal: Some(Signal::SIGQUIT),
        ..policy()
    }
}

/// `workers` such servers, every one serving by `ready_delay`.
fn quitting_world(workers: usize, policy: Policy) -> World {
    let mut world = World::new(workers, policy);
    world.advance(DELAY);
    for slot in 0..workers {
        world.worker(slot, Role::Serving);
    }
    world
}

/// `id` was told to drain in `actions` and sent exactly `signal`.
fn drained_with(actions: &[Action], id: WorkerId, signal: Signal) {
    assert!(has(actions, &Action::Drain { worker: id }), "{actions:?}");
    assert_eq!(signals(actions, id), [signal], "{actions:?}");
}

#[test]
fn stop_sends_the_stop_signal_then_sigkill_at_shutdown_timeout() {
    let mut world = quitting_world(2, quits());
    let (a, b) = (
        world.worker(0, Role::Serving),
        world.worker(1, Role::Serving),
    );
    let actions = world.handle(Event::Stop);
    drained_with(&actions, a, Signal::SIGQUIT);
    drained_with(&actions, b, Signal::SIGQUIT);
    // One exits on it; the other ignores it and is killed at the deadline.
    world.exit(a, exit(0));
    let actions = world.advance(Duration::from_secs(10) - Duration::from_millis(1));
    assert!(signals(&actions, b).is_empty(), "{actions:?}");
    let actions = world.advance(Duration::from_millis(1));
    assert_eq!(signals(&actions, b), [Signal::SIGKILL]);
}

#[test]
fn a_reload_sends_the_stop_signal_to_each_replaced_worker() {
    let mut world = quitting_world(2, quits());
    let old: Vec<WorkerId> = (0..2).map(|s| world.worker(s, Role::Serving)).collect();
    world.handle(Event::Reload {
        ticket: 1,
        version: Version(1),
        policy: quits(),
        workers: 2,
    });
    for (slot, old) in old.into_iter().enumerate() {
        let actions = world.advance(DELAY);
        world.worker(slot, Role::Serving);
        drained_with(&actions, old, Signal::SIGQUIT);
    }
}

#[test]
fn a_worker_is_stopped_with_the_signal_of_the_config_it_was_started_with() {
    // A reload to another server (lighttpd after nginx): the old worker
    // is still the old server, and stops by its convention.
    let mut world = quitting_world(1, quits());
    let old = world.worker(0, Role::Serving);
    let lighttpd = Policy {
        stop_signal: Some(Signal::SIGINT),
        ..quits()
    };
    world.handle(Event::Reload {
        ticket: 1,
        version: Version(1),
        policy: lighttpd,
        workers: 1,
    });
    let actions = world.advance(DELAY);
    drained_with(&actions, old, Signal::SIGQUIT);
    let new = world.worker(0, Role::Serving);
    drained_with(&world.handle(Event::Stop), new, Signal::SIGINT);
}

#[test]
fn a_scale_down_sends_the_stop_signal_to_serving_and_starting_workers() {
    let mut world = quitting_world(2, quits());
    let serving = world.worker(1, Role::Serving);
    drained_with(
        &world.handle(Event::Scale { workers: 1 }),
        serving,
        Signal::SIGQUIT,
    );
    world.handle(Event::Scale { workers: 2 });
    let starting = world.worker(1, Role::Starting);
    drained_with(
        &world.handle(Event::Scale { workers: 1 }),
        starting,
        Signal::SIGQUIT,
    );
}

#[test]
fn recycling_and_memory_send_the_stop_signal_once_the_successor_is_ready() {
    type Due = fn(WorkerId) -> Event;
    let dues: [Due; 2] = [
        |w| Event::RecycleDue { worker: w },
        |w| Event::Memory {
            samples: vec![(w, u64::MAX)],
        },
    ];
    for due in dues {
        let mut world = quitting_world(1, quits());
        let old = world.worker(0, Role::Serving);
        let actions = world.handle(due(old));
        assert_eq!(spawns(&actions), [0]);
        assert!(signals(&actions, old).is_empty(), "successor first");
        drained_with(&world.advance(DELAY), old, Signal::SIGQUIT);
    }
}

#[test]
fn a_lost_channel_sends_the_stop_signal_instead_of_sigterm() {
    let mut world = quitting_world(1, quits());
    let id = world.worker(0, Role::Serving);
    world.handle(Event::ChannelClosed { worker: id });
    drained_with(&world.advance(CHANNEL_LOSS_GRACE), id, Signal::SIGQUIT);
}

#[test]
fn a_herd_protocol_worker_gets_drain_and_the_stop_signal_when_it_is_set() {
    let explicit = Policy {
        stop_signal: Some(Signal::SIGUSR1),
        ..policy()
    };
    let mut world = World::new(1, explicit);
    world.all_ready();
    let id = world.worker(0, Role::Serving);
    assert!(world.core.worker(id).unwrap().announced);
    drained_with(&world.handle(Event::Stop), id, Signal::SIGUSR1);
    // Without it, DRAIN alone.
    let mut world = serving_world(1);
    let id = world.worker(0, Role::Serving);
    let actions = world.handle(Event::Stop);
    assert!(has(&actions, &Action::Drain { worker: id }));
    assert!(signals(&actions, id).is_empty());
}

#[test]
fn a_node_worker_with_stop_signal_gets_it_with_disconnect_and_not_sigterm_after() {
    for (stop_signal, at_drain, after) in [
        (Some(Signal::SIGINT), vec![Signal::SIGINT], vec![]),
        (None, vec![], vec![Signal::SIGTERM]),
    ] {
        let node = Policy {
            node: true,
            stop_signal,
            ..policy()
        };
        let mut world = World::new(1, node);
        world.all_ready();
        let id = world.worker(0, Role::Serving);
        let actions = world.handle(Event::Stop);
        assert!(has(&actions, &Action::Drain { worker: id }));
        assert_eq!(signals(&actions, id), at_drain);
        let actions = world.handle(Event::ChannelClosed { worker: id });
        assert_eq!(signals(&actions, id), after);
    }
}
