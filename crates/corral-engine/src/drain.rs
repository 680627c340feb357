//! Writes in flight, by generation: a flush round waits for the writes
//! begun before it without holding up those begun after it (decision 77).
//!
//! A flush round may let replicas clear write-intent bits, so it is sent
//! only once every write begun before it has had its outcome handled (see
//! `Volume::flush_all`). Writes begun after the round began need no such
//! wait: a replica clears at a flush only regions last written before its
//! previous flush began (`corral_store`'s write-intent bitmap), an RW
//! replica's flushes all come from these rounds, and rounds run one after
//! another (each ends when its replies are in), so a write sent after this
//! round began reached every RW replica after its previous flush began:
//! this round leaves its bits set. Letting such writes start keeps a busy
//! volume's writes from stalling behind every flush while it waits, as
//! they did when a flush held `io_gate` exclusively.
//!
//! Each write joins the current generation ([`WriteDrain::enter`]) and
//! leaves it when dropped; [`WriteDrain::wait_for_begun`] starts the next
//! generation and waits until every earlier one is empty.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// The writes in flight of one volume, by generation.
#[derive(Default)]
pub struct WriteDrain {
    state: Mutex<Generations>,
    emptied: tokio::sync::Notify,
}

#[derive(Default)]
struct Generations {
    /// The generation new writes join.
    current: u64,
    /// Writes in flight per generation; only generations that have some.
    in_flight: BTreeMap<u64, u64>,
}

/// One write in flight; it leaves its generation when dropped (also when
/// the write's future is dropped).
pub struct InFlightWrite<'a> {
    drain: &'a WriteDrain,
    generation: u64,
}

impl Drop for InFlightWrite<'_> {
    fn drop(&mut self) {
        self.drain.leave(self.generation);
    }
}

impl WriteDrain {
    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A write begins: it is in flight until the returned value is dropped.
    pub fn enter(&self) -> InFlightWrite<'_> {
        let mut state = self.lock();
        let generation = state.current;
        *state.in_flight.entry(generation).or_default() += 1;
        InFlightWrite {
            drain: self,
            generation,
        }
    }

    fn leave(&self, generation: u64) {
        let emptied = {
            let mut state = self.lock();
            match state.in_flight.get_mut(&generation) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    state.in_flight.remove(&generation);
                    true
                }
                None => false,
            }
        };
        if emptied {
            self.emptied.notify_waiters();
        }
    }

    /// Wait until every write begun before this call has ended; writes
    /// begun meanwhile are not waited for.
    pub async fn wait_for_begun(&self) {
        let before = {
            let mut state = self.lock();
            let generation = state.current;
            state.current += 1;
            generation
        };
        loop {
            let emptied = self.emptied.notified();
            tokio::pin!(emptied);
            // Registered before the check, so an emptying in between wakes it.
            emptied.as_mut().enable();
            if self.lock().in_flight.range(..=before).next().is_none() {
                return;
            }
            emptied.await;
        }
    }

    /// Writes in flight now (all generations).
    pub fn in_flight(&self) -> u64 {
        self.lock().in_flight.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    /// Whether `wait`, polled once more, is still pending.
    async fn pending<F: std::future::Future>(wait: &mut std::pin::Pin<&mut F>) -> bool {
        wait.as_mut().now_or_never().is_none()
    }

    #[tokio::test]
    async fn with_nothing_in_flight_the_wait_ends_at_once() {
        let drain = WriteDrain::default();
        let wait = drain.wait_for_begun();
        tokio::pin!(wait);
        assert!(!pending(&mut wait).await);
        assert_eq!(drain.in_flight(), 0);
    }

    #[tokio::test]
    async fn the_wait_ends_when_the_writes_begun_before_it_end() {
        let drain = WriteDrain::default();
        let first = drain.enter();
        let second = drain.enter();
        let wait = drain.wait_for_begun();
        tokio::pin!(wait);
        assert!(pending(&mut wait).await);
        drop(first);
        assert!(
            pending(&mut wait).await,
            "one earlier write is still in flight"
        );
        drop(second);
        assert!(!pending(&mut wait).await);
    }

    #[tokio::test]
    async fn writes_begun_after_the_wait_began_are_not_waited_for() {
        let drain = WriteDrain::default();
        let earlier = drain.enter();
        let wait = drain.wait_for_begun();
        tokio::pin!(wait);
        assert!(pending(&mut wait).await);
        let later = drain.enter();
        drop(earlier);
        assert!(!pending(&mut wait).await);
        assert_eq!(drain.in_flight(), 1);
        // The next wait does wait for it.
        let next = drain.wait_for_begun();
        tokio::pin!(next);
        assert!(pending(&mut next).await);
        drop(later);
        assert!(!pending(&mut next).await);
    }

    #[tokio::test]
    async fn a_wait_begun_later_also_waits_for_older_generations() {
        let drain = WriteDrain::default();
        let oldest = drain.enter();
        let first = drain.wait_for_begun();
        tokio::pin!(first);
        assert!(pending(&mut first).await);
        // A second wait (a later round) while the oldest write is in flight.
        let second = drain.wait_for_begun();
        tokio::pin!(second);
        assert!(pending(&mut second).await);
        drop(oldest);
        assert!(!pending(&mut first).await);
        assert!(!pending(&mut second).await);
    }
}
