//! Write-through for a client that flushes after every write (decision 76).
//!
//! A database writes, waits, flushes, waits: two round trips through the
//! engine to every replica for one durable write, the second only to make
//! the first durable. When one client flushes after each write, the engine
//! sends its writes as FUA instead: each replica makes the write durable
//! (one `fdatasync`, as the flush would have) before it answers. The flush
//! that follows then finds nothing a flush round would add — every write
//! finished so far is durable on every replica — and is answered at once,
//! without a round trip to the replicas.
//!
//! [`WriteThrough`] holds only the decisions (no I/O): whether a write goes
//! FUA, and whether a frontend flush needs a round.
//!
//! - **The pattern** is judged over windows of [`WINDOW`] frontend
//!   operations (writes, zero writes, discards and flushes): write-through
//!   turns on after a window with at least three flushes for every four
//!   writes and never two operations in flight at once, and off after a
//!   window with fewer than one flush for every two writes or any two
//!   operations at once. Many clients flushing after each of their writes
//!   are better served by flush rounds, which each cover the flushes of
//!   several clients (group commit), than by a sync per write; a client
//!   that flushes every few writes likewise.
//! - **The rule for a flush** is counted, not guessed: every write that
//!   finished without being made durable on every write target (not FUA,
//!   a target failed it, or it ended early) counts one *unsynced* write; a
//!   flush round that succeeds covers every write counted before it began
//!   (the volume drains writes in flight before it sends the round, so
//!   those are on the replicas when they sync). A flush needs no round
//!   exactly when the rounds cover every unsynced write. A write is counted
//!   when it finishes, never when it begins, so a write that overtakes a
//!   round (begun before it, sent after its drain) is never taken for
//!   covered. A wrong guess about the pattern costs time, never durability.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Frontend operations in one window of the pattern.
pub const WINDOW: u32 = 32;

/// What the current window has seen.
#[derive(Debug, Default)]
struct Window {
    writes: u32,
    flushes: u32,
    /// Two frontend operations were in flight at once.
    overlapped: bool,
}

/// The write-through decisions of one volume.
#[derive(Debug)]
pub struct WriteThrough {
    enabled: AtomicBool,
    window: Mutex<Window>,
    /// Frontend writes and flushes in flight.
    in_flight: AtomicU64,
    /// Whether the windows say one client flushes after each write.
    through: AtomicBool,
    /// Writes finished that were not made durable on every write target.
    /// Starts at 1: the first flush of an engine always runs a round (a
    /// previous engine may have left acknowledged writes unsynced).
    unsynced: AtomicU64,
    /// How many of `unsynced` a successful flush round has covered.
    covered: AtomicU64,
    /// Frontend flushes answered without a round.
    answered_without_round: AtomicU64,
}

impl Default for WriteThrough {
    fn default() -> Self {
        WriteThrough {
            enabled: AtomicBool::new(true),
            window: Mutex::new(Window::default()),
            in_flight: AtomicU64::new(0),
            through: AtomicBool::new(false),
            unsynced: AtomicU64::new(1),
            covered: AtomicU64::new(0),
            answered_without_round: AtomicU64::new(0),
        }
    }
}

/// A frontend write in flight: counted finished, and unsynced unless
/// [`PendingWrite::durable_everywhere`] was called, when dropped.
#[derive(Debug)]
pub struct PendingWrite<'a> {
    wt: &'a WriteThrough,
    /// Send it FUA (the client asked, or write-through says so).
    pub fua: bool,
    durable: bool,
}

impl PendingWrite<'_> {
    /// It went FUA and every write target acknowledged every piece of it.
    pub fn durable_everywhere(&mut self) {
        self.durable = self.fua;
    }
}

impl Drop for PendingWrite<'_> {
    fn drop(&mut self) {
        if !self.durable {
            self.wt.unsynced.fetch_add(1, Ordering::SeqCst);
        }
        self.wt.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A frontend flush in flight (counted finished when dropped).
#[derive(Debug)]
pub struct PendingFlush<'a> {
    wt: &'a WriteThrough,
    /// It needs a flush round; no when every write finished before it is
    /// durable on every replica already.
    pub needs_round: bool,
}

impl Drop for PendingFlush<'_> {
    fn drop(&mut self) {
        self.wt.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl WriteThrough {
    /// Turn write-through on or off (off: every write as the client sent
    /// it, every flush a round).
    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::SeqCst);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    /// Count one frontend operation begun; at the window's end, judge it.
    fn begin(&self, flush: bool) {
        let others = self.in_flight.fetch_add(1, Ordering::SeqCst);
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        match flush {
            true => w.flushes += 1,
            false => w.writes += 1,
        }
        w.overlapped |= others > 0;
        if w.writes + w.flushes >= WINDOW {
            let (writes, flushes) = (u64::from(w.writes), u64::from(w.flushes));
            if w.overlapped || 2 * flushes < writes {
                self.through.store(false, Ordering::SeqCst);
            } else if 4 * flushes >= 3 * writes {
                self.through.store(true, Ordering::SeqCst);
            }
            *w = Window::default();
        }
    }

    /// A frontend write (or zero write, or discard) begins; `fua`: the
    /// client asked for it. Whether to send it FUA is decided here.
    pub fn write_begins(&self, fua: bool) -> PendingWrite<'_> {
        self.begin(false);
        let through = self.enabled() && self.through.load(Ordering::SeqCst);
        PendingWrite {
            wt: self,
            fua: fua || through,
            durable: false,
        }
    }

    /// A frontend flush arrives: whether it needs a flush round. No when
    /// write-through is on, every write finished so far is durable on
    /// every replica already, and the caller has no reason of its own to
    /// require one (`round_required`: a clone still filling, whose fills
    /// only flush rounds make durable).
    pub fn flush_begins(&self, round_required: bool) -> PendingFlush<'_> {
        self.begin(true);
        let needs_round = round_required
            || !self.enabled()
            || self.unsynced.load(Ordering::SeqCst) != self.covered.load(Ordering::SeqCst);
        if !needs_round {
            self.answered_without_round.fetch_add(1, Ordering::Relaxed);
        }
        PendingFlush {
            wt: self,
            needs_round,
        }
    }

    /// A flush round is about to drain writes and send: the mark to give
    /// [`WriteThrough::round_succeeded`] if it does.
    pub fn round_begins(&self) -> u64 {
        self.unsynced.load(Ordering::SeqCst)
    }

    /// The round begun at `mark` succeeded on every write target.
    pub fn round_succeeded(&self, mark: u64) {
        self.covered.fetch_max(mark, Ordering::SeqCst);
    }

    /// Frontend flushes answered without a round so far.
    pub fn flushes_answered_without_round(&self) -> u64 {
        self.answered_without_round.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` times: `writes` writes, then a flush (one client, one at a
    /// time); how many writes went FUA and how many flushes needed a round.
    fn pattern(wt: &WriteThrough, n: usize, writes: usize) -> (usize, usize) {
        let (mut fua, mut rounds) = (0, 0);
        for _ in 0..n {
            for _ in 0..writes {
                let mut w = wt.write_begins(false);
                fua += usize::from(w.fua);
                w.durable_everywhere();
            }
            let f = wt.flush_begins(false);
            if f.needs_round {
                rounds += 1;
                wt.round_succeeded(wt.round_begins());
            }
        }
        (fua, rounds)
    }

    /// Half a window of write-then-flush: the pattern is judged at its end.
    const HALF: usize = WINDOW as usize / 2;

    #[test]
    fn a_client_that_flushes_after_each_write_gets_fua_writes_and_flushes_without_rounds() {
        let wt = WriteThrough::default();
        // The first window: writes as sent, a round for every flush.
        assert_eq!(pattern(&wt, HALF, 1), (0, HALF));
        // Then every write goes FUA and no flush needs a round.
        assert_eq!(pattern(&wt, 100, 1), (100, 0));
        assert_eq!(wt.flushes_answered_without_round(), 100);
    }

    #[test]
    fn the_first_flush_of_an_engine_runs_a_round_even_with_no_write() {
        let wt = WriteThrough::default();
        assert!(wt.flush_begins(false).needs_round);
    }

    #[test]
    fn a_flush_the_caller_requires_a_round_for_runs_one() {
        let wt = WriteThrough::default();
        pattern(&wt, HALF, 1);
        assert!(wt.flush_begins(true).needs_round);
        assert_eq!(wt.flushes_answered_without_round(), 0);
    }

    #[test]
    fn switched_off_every_write_goes_as_sent_and_every_flush_runs_a_round() {
        let wt = WriteThrough::default();
        wt.set_enabled(false);
        assert_eq!(pattern(&wt, 100, 1), (0, 100));
    }

    #[test]
    fn a_client_that_flushes_every_few_writes_keeps_its_writes_as_sent() {
        let wt = WriteThrough::default();
        assert_eq!(pattern(&wt, 100, 4), (0, 100));
        assert_eq!(pattern(&wt, 100, 2), (0, 100));
        // A client that never flushes: no write goes FUA.
        for _ in 0..100 {
            assert!(!wt.write_begins(false).fua);
        }
    }

    #[test]
    fn a_pattern_that_changes_is_followed_within_two_windows() {
        let wt = WriteThrough::default();
        pattern(&wt, HALF, 1);
        assert_eq!(pattern(&wt, 10, 1).0, 10);
        // The client starts flushing every 4 writes: FUA writes for at
        // most two windows (the one it changed in may be judged either
        // way), then none.
        let (fua, _) = pattern(&wt, 100, 4);
        assert!(fua <= 2 * WINDOW as usize, "{fua}");
        assert_eq!(pattern(&wt, 100, 4).0, 0);
    }

    #[test]
    fn clients_whose_operations_overlap_get_flush_rounds() {
        let wt = WriteThrough::default();
        pattern(&wt, HALF, 1);
        assert!(wt.write_begins(false).fua);
        // Two clients, each writing then flushing, their operations
        // overlapping: after one window, writes go as sent again.
        for _ in 0..WINDOW {
            let a = wt.write_begins(false);
            let b = wt.flush_begins(false);
            drop((a, b));
        }
        let (fua, rounds) = pattern(&wt, 10, 1);
        assert_eq!(fua, 0);
        assert_eq!(rounds, 10);
    }

    #[test]
    fn a_client_fua_write_stays_fua_whatever_the_pattern() {
        let wt = WriteThrough::default();
        wt.set_enabled(false);
        assert!(wt.write_begins(true).fua);
    }

    #[test]
    fn a_write_not_durable_everywhere_makes_the_next_flush_run_a_round() {
        let wt = WriteThrough::default();
        pattern(&wt, HALF, 1);
        let mut w = wt.write_begins(false);
        assert!(w.fua);
        w.durable_everywhere();
        drop(w);
        assert!(!wt.flush_begins(false).needs_round);
        // A FUA write that one target failed (or that ended early).
        let w = wt.write_begins(false);
        assert!(w.fua);
        drop(w);
        assert!(wt.flush_begins(false).needs_round);
        wt.round_succeeded(wt.round_begins());
        assert!(!wt.flush_begins(false).needs_round);
    }

    #[test]
    fn a_write_that_finishes_after_a_round_began_is_not_covered_by_it() {
        let wt = WriteThrough::default();
        let first = wt.write_begins(false);
        let second = wt.write_begins(false);
        drop(first);
        assert!(wt.flush_begins(false).needs_round);
        let mark = wt.round_begins();
        // The second write finishes while the round is under way.
        drop(second);
        wt.round_succeeded(mark);
        assert!(wt.flush_begins(false).needs_round);
    }

    #[test]
    fn a_failed_round_covers_nothing() {
        let wt = WriteThrough::default();
        pattern(&wt, HALF, 1);
        drop(wt.write_begins(false));
        assert!(wt.flush_begins(false).needs_round);
        let _mark = wt.round_begins();
        // The round fails: no round_succeeded.
        assert!(wt.flush_begins(false).needs_round);
    }
}
