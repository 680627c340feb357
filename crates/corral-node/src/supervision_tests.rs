//! The supervision rules, one by one, and properties over random event
//! sequences.

use super::*;
use proptest::prelude::*;

const S: Duration = Duration::from_secs(1);

fn policy() -> RestartPolicy {
    RestartPolicy {
        first_delay: S,
        max_delay: 8 * S,
        reset_after: 60 * S,
        stop_timeout: 10 * S,
    }
}

fn exited() -> Event {
    Event::Exited {
        how: "killed by signal 9".into(),
    }
}

/// A machine whose first process (pid 100) runs and serves since `t0`.
fn running(t0: Instant) -> Supervision {
    let (mut m, actions) = Supervision::start(policy());
    assert_eq!(actions, vec![Action::Spawn]);
    assert_eq!(m.handle(Event::Spawned { pid: 100 }, t0), vec![]);
    assert_eq!(m.handle(Event::Serving, t0), vec![]);
    assert_eq!(m.phase(), Phase::Running);
    m
}

#[test]
fn a_new_engine_is_spawned_and_starts_then_serves() {
    let t0 = Instant::now();
    let (mut m, actions) = Supervision::start(policy());
    assert_eq!((m.phase(), actions), (Phase::Spawning, vec![Action::Spawn]));
    m.handle(Event::Spawned { pid: 7 }, t0);
    assert_eq!((m.phase(), m.pid()), (Phase::Starting, Some(7)));
    m.handle(Event::Serving, t0);
    assert_eq!(
        (m.phase(), m.restarts(), m.last_exit()),
        (Phase::Running, 0, None)
    );
}

#[test]
fn an_exit_backs_off_then_respawns_counting_a_restart() {
    let t0 = Instant::now();
    let mut m = running(t0);
    let t1 = t0 + 5 * S;
    assert_eq!(m.handle(exited(), t1), vec![Action::WakeAt(t1 + S)]);
    assert_eq!(m.phase(), Phase::Backoff { until: t1 + S });
    assert_eq!(
        (m.pid(), m.exits(), m.last_exit()),
        (None, 1, Some("killed by signal 9"))
    );
    assert_eq!(m.handle(Event::Tick, t1 + S), vec![Action::Spawn]);
    assert_eq!((m.phase(), m.restarts()), (Phase::Spawning, 1));
    m.handle(Event::Spawned { pid: 101 }, t1 + S);
    assert_eq!((m.phase(), m.pid()), (Phase::Starting, Some(101)));
}

#[test]
fn an_early_tick_does_not_respawn() {
    let t0 = Instant::now();
    let mut m = running(t0);
    m.handle(exited(), t0);
    assert_eq!(m.handle(Event::Tick, t0 + S / 2), vec![]);
    assert_eq!(m.phase(), Phase::Backoff { until: t0 + S });
}

#[test]
fn an_exit_before_serving_backs_off_too() {
    let t0 = Instant::now();
    let (mut m, _) = Supervision::start(policy());
    m.handle(Event::Spawned { pid: 7 }, t0);
    assert_eq!(m.handle(exited(), t0), vec![Action::WakeAt(t0 + S)]);
    assert_eq!(m.exits(), 1);
}

#[test]
fn delays_double_up_to_the_maximum() {
    let mut t = Instant::now();
    let mut m = running(t);
    let mut delays = Vec::new();
    for pid in 200..206 {
        let Action::WakeAt(until) = m.handle(exited(), t)[0] else {
            panic!("no wake-up");
        };
        delays.push(until - t);
        t = until;
        assert_eq!(m.handle(Event::Tick, t), vec![Action::Spawn]);
        m.handle(Event::Spawned { pid }, t);
    }
    assert_eq!(delays, vec![S, 2 * S, 4 * S, 8 * S, 8 * S, 8 * S]);
    assert_eq!(m.restarts(), 6);
}

#[test]
fn a_process_that_ran_long_enough_starts_a_new_series() {
    let mut t = Instant::now();
    let mut m = running(t);
    for pid in 300..303 {
        let Action::WakeAt(until) = m.handle(exited(), t)[0] else {
            panic!("no wake-up");
        };
        t = until;
        m.handle(Event::Tick, t);
        m.handle(Event::Spawned { pid }, t);
    }
    // Ran 60 s: the next delay is the first one again.
    t += 60 * S;
    assert_eq!(m.handle(exited(), t), vec![Action::WakeAt(t + S)]);
}

#[test]
fn a_failed_spawn_counts_as_an_exit() {
    let t0 = Instant::now();
    let (mut m, _) = Supervision::start(policy());
    let actions = m.handle(
        Event::SpawnFailed {
            reason: "No such file".into(),
        },
        t0,
    );
    assert_eq!(actions, vec![Action::WakeAt(t0 + S)]);
    assert_eq!(m.last_exit(), Some("could not start: No such file"));
    assert_eq!(m.handle(Event::Tick, t0 + S), vec![Action::Spawn]);
    assert_eq!(m.restarts(), 1);
}

#[test]
fn a_stop_sends_sigterm_then_sigkill_at_the_timeout() {
    let t0 = Instant::now();
    let mut m = running(t0);
    let actions = m.handle(Event::StopRequested, t0);
    let term = Action::Signal {
        pid: 100,
        signal: StopSignal::Term,
    };
    assert_eq!(actions, vec![term, Action::WakeAt(t0 + 10 * S)]);
    assert_eq!(m.handle(Event::Tick, t0 + 9 * S), vec![], "not yet");
    let kill = Action::Signal {
        pid: 100,
        signal: StopSignal::Kill,
    };
    assert_eq!(m.handle(Event::Tick, t0 + 10 * S), vec![kill]);
    assert_eq!(m.handle(Event::Tick, t0 + 11 * S), vec![], "killed once");
    assert_eq!(m.handle(exited(), t0 + 11 * S), vec![Action::Forget]);
    assert_eq!((m.phase(), m.pid()), (Phase::Stopped, None));
}

#[test]
fn a_stop_of_a_starting_engine_signals_it_too() {
    let t0 = Instant::now();
    let (mut m, _) = Supervision::start(policy());
    m.handle(Event::Spawned { pid: 9 }, t0);
    let actions = m.handle(Event::StopRequested, t0);
    assert!(actions.contains(&Action::Signal {
        pid: 9,
        signal: StopSignal::Term
    }));
    assert_eq!(m.handle(Event::Serving, t0), vec![], "no longer starting");
}

#[test]
fn a_process_that_exits_while_stopping_is_not_restarted() {
    let t0 = Instant::now();
    let mut m = running(t0);
    m.handle(Event::StopRequested, t0);
    assert_eq!(m.handle(exited(), t0 + S), vec![Action::Forget]);
    assert_eq!(m.handle(Event::Tick, t0 + 100 * S), vec![]);
    assert_eq!(m.phase(), Phase::Stopped);
}

#[test]
fn a_stop_while_backing_off_forgets_at_once() {
    let t0 = Instant::now();
    let mut m = running(t0);
    m.handle(exited(), t0);
    assert_eq!(m.handle(Event::StopRequested, t0), vec![Action::Forget]);
    assert_eq!(m.handle(Event::Tick, t0 + 10 * S), vec![], "no respawn");
}

#[test]
fn a_second_stop_request_changes_nothing() {
    let t0 = Instant::now();
    let mut m = running(t0);
    m.handle(Event::StopRequested, t0);
    assert_eq!(m.handle(Event::StopRequested, t0 + S), vec![]);
    assert_eq!(
        m.phase(),
        Phase::Stopping {
            kill_at: Some(t0 + 10 * S)
        }
    );
}

#[test]
fn a_process_spawned_after_the_stop_is_killed() {
    let t0 = Instant::now();
    let (mut m, _) = Supervision::start(policy());
    assert_eq!(m.handle(Event::StopRequested, t0), vec![Action::Forget]);
    assert_eq!(
        m.handle(Event::Spawned { pid: 5 }, t0),
        vec![Action::Signal {
            pid: 5,
            signal: StopSignal::Kill
        }]
    );
}

#[test]
fn an_adopted_process_is_supervised_like_a_child() {
    let t0 = Instant::now();
    let mut m = Supervision::adopt(policy(), 55, t0);
    assert_eq!((m.phase(), m.pid()), (Phase::Starting, Some(55)));
    m.handle(Event::Serving, t0);
    assert_eq!(m.phase(), Phase::Running);
    assert_eq!(m.handle(exited(), t0 + S), vec![Action::WakeAt(t0 + 2 * S)]);
    assert_eq!(m.handle(Event::Tick, t0 + 2 * S), vec![Action::Spawn]);
    assert_eq!(m.restarts(), 1);
}

#[test]
fn late_events_change_nothing() {
    let t0 = Instant::now();
    let mut m = running(t0);
    let before = format!("{m:?}");
    assert_eq!(m.handle(Event::Serving, t0), vec![], "already serving");
    assert_eq!(m.handle(Event::Tick, t0 + S), vec![], "no timer pending");
    assert_eq!(format!("{m:?}"), before);
    m.handle(exited(), t0);
    assert_eq!(m.handle(exited(), t0), vec![], "exited twice");
    assert_eq!(
        m.handle(Event::Serving, t0),
        vec![],
        "readiness of a dead process"
    );
    assert_eq!(m.exits(), 1);
}

fn event() -> impl Strategy<Value = (Event, u64)> {
    let e = prop_oneof![
        (1u32..1000).prop_map(|pid| Event::Spawned { pid }),
        Just(Event::SpawnFailed { reason: "x".into() }),
        Just(Event::Serving),
        Just(Event::Exited { how: "x".into() }),
        Just(Event::StopRequested),
        Just(Event::Tick),
        Just(Event::Tick),
    ];
    (e, 0u64..20_000)
}

proptest! {
    #[test]
    fn random_histories_keep_the_rules(events in proptest::collection::vec(event(), 0..80)) {
        let t0 = Instant::now();
        let mut now = t0;
        let (mut m, _) = Supervision::start(policy());
        let mut stop_requested = false;
        let mut forgotten = false;
        let mut restarts = 0;
        for (event, step_ms) in events {
            now += Duration::from_millis(step_ms);
            let was = m.phase();
            stop_requested |= event == Event::StopRequested;
            let actions = m.handle(event.clone(), now);
            prop_assert!(m.restarts() >= restarts);
            prop_assert!(m.restarts() <= restarts + 1);
            restarts = m.restarts();
            for a in &actions {
                match a {
                    Action::Spawn => {
                        prop_assert!(!stop_requested, "spawned after a stop");
                        prop_assert!(matches!(was, Phase::Backoff { .. }), "spawned from {:?}", was);
                    }
                    Action::WakeAt(at) => {
                        prop_assert!(*at >= now);
                        prop_assert!(*at <= now + policy().max_delay.max(policy().stop_timeout));
                    }
                    Action::Forget => {
                        prop_assert!(stop_requested);
                        prop_assert!(!forgotten, "forgotten twice");
                        forgotten = true;
                    }
                    Action::Signal { signal: StopSignal::Term, .. } => {
                        prop_assert_eq!(&event, &Event::StopRequested);
                    }
                    Action::Signal { signal: StopSignal::Kill, .. } => {
                        prop_assert!(stop_requested);
                    }
                }
            }
            if forgotten {
                prop_assert_eq!(m.phase(), Phase::Stopped);
                prop_assert!(m.pid().is_none());
            }
            // A pid is known exactly while a process is believed to run.
            match m.phase() {
                Phase::Starting | Phase::Running => prop_assert!(m.pid().is_some()),
                Phase::Spawning | Phase::Backoff { .. } | Phase::Stopped => {
                    prop_assert!(m.pid().is_none())
                }
                Phase::Stopping { .. } => {}
            }
        }
    }
}
