//! The supervision of one engine process, as a pure state machine: events
//! go in (a process was started or adopted, it serves, it exited, a stop
//! was requested, a timer fired), actions come out (spawn a process, wake
//! me at, signal the process, forget the engine). No I/O and no clock of
//! its own: time is passed in. `supervisor::EngineSupervisor` is the async
//! shell that runs the processes and feeds it.
//!
//! The rules:
//! - a process that exits on its own is restarted after a back-off delay
//!   that starts at [`RestartPolicy::first_delay`] and doubles up to
//!   [`RestartPolicy::max_delay`]; a process that ran at least
//!   [`RestartPolicy::reset_after`] before exiting starts the series again;
//! - a process that cannot even be spawned counts as one that exited;
//! - a stop request signals SIGTERM, then SIGKILL after
//!   [`RestartPolicy::stop_timeout`]; once the process is gone (or at once
//!   when none runs) the engine is forgotten, and nothing is spawned again;
//! - an event that does not fit the phase (a late timer, a readiness answer
//!   from a process that has exited) changes nothing — except a process that
//!   appears after the stop, which is killed.

use std::time::{Duration, Instant};

/// How restarts and stops are paced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Delay before the first restart of a series.
    pub first_delay: Duration,
    /// The delay doubles up to this.
    pub max_delay: Duration,
    /// A process that ran this long before exiting starts a new series.
    pub reset_after: Duration,
    /// SIGKILL this long after SIGTERM.
    pub stop_timeout: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            reset_after: Duration::from_secs(60),
            stop_timeout: Duration::from_secs(30),
        }
    }
}

/// Where the engine is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// A process is to be spawned ([`Action::Spawn`] was issued).
    Spawning,
    /// A process runs (pid known) but does not serve yet.
    Starting,
    /// The process serves.
    Running,
    /// No process; the next one is spawned at `until`.
    Backoff { until: Instant },
    /// SIGTERM was sent; SIGKILL follows at `kill_at` (`None`: sent).
    Stopping { kill_at: Option<Instant> },
    /// Stopped and forgotten: the machine issues nothing more.
    Stopped,
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A process was spawned for [`Action::Spawn`].
    Spawned { pid: u32 },
    /// [`Action::Spawn`] failed (the binary is missing, ...).
    SpawnFailed { reason: String },
    /// The process answers on its control port and serves.
    Serving,
    /// The process is gone; `how` describes its end ("exit status 1").
    Exited { how: String },
    /// Stop the engine for good.
    StopRequested,
    /// The time asked for with [`Action::WakeAt`] has come (or any time).
    Tick,
}

/// A signal to the engine process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopSignal {
    /// SIGTERM: the engine flushes and stops in order.
    Term,
    /// SIGKILL.
    Kill,
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start an engine process, then report [`Event::Spawned`] or
    /// [`Event::SpawnFailed`].
    Spawn,
    /// Deliver [`Event::Tick`] at this time (replaces an earlier request).
    WakeAt(Instant),
    /// Send this signal to process `pid`.
    Signal { pid: u32, signal: StopSignal },
    /// The engine is stopped: drop it (its record and its task).
    Forget,
}

/// One engine's supervision.
#[derive(Clone, Debug)]
pub struct Supervision {
    policy: RestartPolicy,
    phase: Phase,
    pid: Option<u32>,
    /// When the current process started (or was adopted).
    since: Option<Instant>,
    /// The delay the next restart waits.
    next_delay: Duration,
    restarts: u32,
    exits: u64,
    last_exit: Option<String>,
}

impl Supervision {
    /// A new engine: spawn its first process.
    pub fn start(policy: RestartPolicy) -> (Self, Vec<Action>) {
        (
            Self::new(policy, Phase::Spawning, None, None),
            vec![Action::Spawn],
        )
    }

    /// An engine whose process `pid` already runs (a restarted daemon found
    /// it alive): supervise it as starting until it is seen serving.
    pub fn adopt(policy: RestartPolicy, pid: u32, now: Instant) -> Self {
        Self::new(policy, Phase::Starting, Some(pid), Some(now))
    }

    fn new(policy: RestartPolicy, phase: Phase, pid: Option<u32>, since: Option<Instant>) -> Self {
        Supervision {
            policy,
            phase,
            pid,
            since,
            next_delay: policy.first_delay,
            restarts: 0,
            exits: 0,
            last_exit: None,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The process that runs now, if any.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Processes started after the first one.
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// Processes seen ending (or failing to spawn), in total.
    pub fn exits(&self) -> u64 {
        self.exits
    }

    /// How the last process ended.
    pub fn last_exit(&self) -> Option<&str> {
        self.last_exit.as_deref()
    }

    /// Feed one event that happened at `now`; the actions to take, in order.
    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        match (self.phase, event) {
            (Phase::Spawning, Event::Spawned { pid }) => {
                self.phase = Phase::Starting;
                self.pid = Some(pid);
                self.since = Some(now);
                vec![]
            }
            (Phase::Spawning, Event::SpawnFailed { reason }) => {
                self.ended(format!("could not start: {reason}"), now)
            }
            (Phase::Starting, Event::Serving) => {
                self.phase = Phase::Running;
                vec![]
            }
            (Phase::Starting | Phase::Running, Event::Exited { how }) => self.ended(how, now),
            (Phase::Backoff { until }, Event::Tick) if now >= until => {
                self.restarts += 1;
                self.phase = Phase::Spawning;
                vec![Action::Spawn]
            }
            (Phase::Starting | Phase::Running, Event::StopRequested) => {
                let kill_at = now + self.policy.stop_timeout;
                self.phase = Phase::Stopping {
                    kill_at: Some(kill_at),
                };
                match self.pid {
                    Some(pid) => vec![
                        Action::Signal {
                            pid,
                            signal: StopSignal::Term,
                        },
                        Action::WakeAt(kill_at),
                    ],
                    None => self.forget(),
                }
            }
            (Phase::Spawning | Phase::Backoff { .. }, Event::StopRequested) => self.forget(),
            (Phase::Stopping { kill_at: Some(at) }, Event::Tick) if now >= at => {
                self.phase = Phase::Stopping { kill_at: None };
                self.pid
                    .map(|pid| Action::Signal {
                        pid,
                        signal: StopSignal::Kill,
                    })
                    .into_iter()
                    .collect()
            }
            (Phase::Stopping { .. }, Event::Exited { how }) => {
                self.exits += 1;
                self.last_exit = Some(how);
                self.forget()
            }
            (Phase::Stopped, Event::Spawned { pid }) => vec![Action::Signal {
                pid,
                signal: StopSignal::Kill,
            }],
            // Anything else is late or does not apply: nothing changes.
            _ => vec![],
        }
    }

    /// The process ended on its own (or never started): back off.
    fn ended(&mut self, how: String, now: Instant) -> Vec<Action> {
        let ran = self
            .since
            .map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
        if ran >= self.policy.reset_after {
            self.next_delay = self.policy.first_delay;
        }
        let delay = self.next_delay;
        self.next_delay = (delay * 2)
            .min(self.policy.max_delay)
            .max(self.policy.first_delay);
        self.exits += 1;
        self.last_exit = Some(how);
        self.pid = None;
        self.since = None;
        let until = now + delay;
        self.phase = Phase::Backoff { until };
        vec![Action::WakeAt(until)]
    }

    fn forget(&mut self) -> Vec<Action> {
        self.phase = Phase::Stopped;
        self.pid = None;
        self.since = None;
        vec![Action::Forget]
    }
}

#[cfg(test)]
#[path = "supervision_tests.rs"]
mod tests;
