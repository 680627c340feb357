//! The write-intent (dirty-region) bitmap, as in MD RAID.
//!
//! Owns the in-memory view of which regions are persisted dirty, the *flush gate* and the
//! flush sequence, and the rules for setting and clearing bits:
//!
//! - **Set before write.** A write first makes sure every region it touches is recorded dirty
//!   in `meta.redb` (a durable commit). Regions already dirty cost a mutex and a map lookup.
//!   Writers that need a commit at the same time share one (group commit).
//! - **Clear lazily after a flush.** Each write is tagged with the flush sequence current
//!   when it started, and each dirty region remembers the largest tag written to it. A flush
//!   bumps the sequence from `f` to `f + 1` under the gate held exclusively (writes hold it
//!   shared for their whole duration, so every write tagged `<= f` has completed), releases
//!   the gate, `fdatasync`s, and then may clear regions ([`WriteIntent::clear_threshold`]):
//!   a flush that finds nothing written since the previous one, a second or more ago,
//!   clears every region whose last tag is `< f` (an idle volume's bitmap empties at its
//!   second flush); otherwise, at
//!   most once per *clear interval*, those not written since the last clear. Regions written
//!   within an interval stay dirty and cost nothing per flush: a flush of a busy volume
//!   commits no metadata and syncs only the data.
//!
//! Ordering between a clear and a concurrent writer is kept by removing a region from the
//! in-memory map *before* committing its clear, both under the `persist` mutex that every
//! mark commit also holds: a writer that finds the region gone must commit a new mark, and
//! that commit lands after the clear.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::meta::MetaDb;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Default)]
struct State {
    /// Regions recorded dirty in the database, with the largest write tag seen.
    dirty: HashMap<u64, u64>,
    /// Regions some writer needs marked, not yet committed, with their tags.
    pending: HashMap<u64, u64>,
}

/// The write-intent bitmap of one store.
#[derive(Debug)]
pub(crate) struct WriteIntent {
    region_shift: u32,
    gate: RwLock<()>,
    flush_seq: AtomicU64,
    state: Mutex<State>,
    /// Serialises commits to the `dirty` table.
    persist: Mutex<()>,
    /// How often a busy volume's flushes clear regions (zero: at every flush).
    clear_interval: Mutex<Duration>,
    /// When the current clear interval began, and the tag below which a region written
    /// since is not: the first flush of the interval's sequence, plus one.
    interval_start: Mutex<Option<(Instant, u64)>>,
    /// When the previous flush made the data durable.
    last_flush: Mutex<Option<Instant>>,
}

/// How often, by default, the flushes of a volume under writes clear regions.
pub const DEFAULT_CLEAR_INTERVAL: Duration = Duration::from_secs(5);

/// A volume is idle when nothing was written since a flush at least this long ago (or
/// the clear interval, if shorter). Flushes that follow each other closely (an engine's
/// group commit sends rounds back to back) say nothing about idleness.
const IDLE_GAP: Duration = Duration::from_secs(1);

/// Held by a write for its whole duration; flush waits for it to be dropped.
pub(crate) struct WriteTicket<'a> {
    _gate: RwLockReadGuard<'a, ()>,
}

impl WriteIntent {
    /// A bitmap whose regions are `1 << region_shift` bytes, with `dirty` already recorded in
    /// the database (they get tag 0, so the second flush after open clears them if untouched).
    pub(crate) fn new(region_shift: u32, dirty: &[u64]) -> Self {
        WriteIntent {
            region_shift,
            gate: RwLock::new(()),
            flush_seq: AtomicU64::new(0),
            state: Mutex::new(State {
                dirty: dirty.iter().map(|&r| (r, 0)).collect(),
                pending: HashMap::new(),
            }),
            persist: Mutex::new(()),
            clear_interval: Mutex::new(DEFAULT_CLEAR_INTERVAL),
            interval_start: Mutex::new(None),
            last_flush: Mutex::new(None),
        }
    }

    /// Sets how often the flushes of a volume under writes clear regions (zero: at every
    /// flush, regions not written since the previous one).
    pub(crate) fn set_clear_interval(&self, interval: Duration) {
        *lock(&self.clear_interval) = interval;
    }

    /// For a flush that began sequence `seq` (what [`Self::begin_flush`] returned) and made
    /// the data durable: the tag below which regions may be cleared now, if any. Every
    /// region not written since the previous flush when nothing was written since and that
    /// flush is a while ago ([`IDLE_GAP`]: an idle volume), or with a clear interval of
    /// zero; otherwise, once a clear interval has passed
    /// since the flush that began it, those not written since that flush began. Either way
    /// a cleared region's last write completed before an earlier flush synced it, and this
    /// flush synced it again.
    pub(crate) fn clear_threshold(&self, seq: u64, now: Instant) -> Option<u64> {
        let interval = *lock(&self.clear_interval);
        let quiet = lock(&self.last_flush)
            .replace(now)
            .is_some_and(|t| now.saturating_duration_since(t) >= IDLE_GAP.min(interval));
        let idle = quiet && {
            let st = lock(&self.state);
            st.pending.is_empty() && st.dirty.values().all(|t| *t < seq)
        };
        let mut start = lock(&self.interval_start);
        let below = match *start {
            _ if idle || interval.is_zero() => seq,
            Some((began, below)) if now.saturating_duration_since(began) >= interval => {
                below.min(seq)
            }
            Some(_) => return None,
            None => {
                *start = Some((now, seq + 1));
                return None;
            }
        };
        *start = Some((now, seq + 1));
        Some(below)
    }

    pub(crate) fn region_size(&self) -> u64 {
        1u64 << self.region_shift
    }

    /// The regions touched by the non-empty byte range `offset..end`.
    fn regions(&self, offset: u64, end: u64) -> std::ops::RangeInclusive<u64> {
        (offset >> self.region_shift)..=((end - 1) >> self.region_shift)
    }

    /// True when every region touched by the non-empty range `offset..end`
    /// is already durably marked dirty, so a write there commits no metadata.
    pub(crate) fn covers(&self, offset: u64, end: u64) -> bool {
        let st = lock(&self.state);
        self.regions(offset, end).all(|r| st.dirty.contains_key(&r))
    }

    /// Called at the start of a write to `offset..end` (non-empty): enters the flush gate
    /// and makes sure every touched region is durably marked dirty.
    pub(crate) fn begin_write(
        &self,
        db: &MetaDb,
        offset: u64,
        end: u64,
    ) -> Result<WriteTicket<'_>> {
        let gate = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let tag = self.flush_seq.load(Ordering::SeqCst);
        let regions = self.regions(offset, end);
        let mut missing = Vec::new();
        {
            let mut st = lock(&self.state);
            for r in regions {
                if let Some(t) = st.dirty.get_mut(&r) {
                    *t = (*t).max(tag);
                } else {
                    let t = st.pending.entry(r).or_insert(tag);
                    *t = (*t).max(tag);
                    missing.push(r);
                }
            }
        }
        if !missing.is_empty() {
            self.persist_missing(db, &missing, tag)?;
        }
        Ok(WriteTicket { _gate: gate })
    }

    /// Commits every pending mark (ours and those of writers queued behind us) unless an
    /// earlier commit already covered ours.
    fn persist_missing(&self, db: &MetaDb, missing: &[u64], tag: u64) -> Result<()> {
        let _p = lock(&self.persist);
        let batch: Vec<(u64, u64)> = {
            let mut st = lock(&self.state);
            if missing.iter().all(|r| st.dirty.contains_key(r)) {
                return Ok(());
            }
            // Queue ours again in case they are in neither map (defensive: a failed commit
            // puts its batch back into `pending`).
            for r in missing {
                if !st.dirty.contains_key(r) {
                    let t = st.pending.entry(*r).or_insert(tag);
                    *t = (*t).max(tag);
                }
            }
            st.pending.drain().collect()
        };
        let mut regions: Vec<u64> = batch.iter().map(|(r, _)| *r).collect();
        regions.sort_unstable();
        let res = db.update_dirty(&regions, &[], false);
        let mut st = lock(&self.state);
        match res {
            Ok(()) => {
                for (r, t) in batch {
                    let e = st.dirty.entry(r).or_insert(t);
                    *e = (*e).max(t);
                }
                Ok(())
            }
            Err(e) => {
                // Nothing was recorded: leave the marks pending for whoever commits next
                // (each writer retries its own regions).
                for (r, t) in batch {
                    let e = st.pending.entry(r).or_insert(t);
                    *e = (*e).max(t);
                }
                Err(e)
            }
        }
    }

    /// First half of a flush: waits for in-flight writes to finish and starts a new flush
    /// sequence. Returns the previous sequence number, to hand to [`Self::clear_idle`] once
    /// the data is durable.
    pub(crate) fn begin_flush(&self) -> u64 {
        let _g = self.gate.write().unwrap_or_else(|p| p.into_inner());
        self.flush_seq.fetch_add(1, Ordering::SeqCst)
    }

    /// Second half of a flush, after `fdatasync`: clears the regions not written since the
    /// flush before this one (last tag `< seq`).
    pub(crate) fn clear_idle(&self, db: &MetaDb, seq: u64) -> Result<()> {
        let _p = lock(&self.persist);
        let mut idle: Vec<(u64, u64)> = {
            let mut st = lock(&self.state);
            let idle: Vec<(u64, u64)> = st
                .dirty
                .iter()
                .filter(|(_, t)| **t < seq)
                .map(|(r, t)| (*r, *t))
                .collect();
            for (r, _) in &idle {
                st.dirty.remove(r);
            }
            idle
        };
        if idle.is_empty() {
            return Ok(());
        }
        idle.sort_unstable();
        let regions: Vec<u64> = idle.iter().map(|(r, _)| *r).collect();
        match db.update_dirty(&[], &regions, false) {
            Ok(()) => Ok(()),
            Err(e) => {
                // Still recorded dirty: put them back.
                let mut st = lock(&self.state);
                for (r, t) in idle {
                    let e = st.dirty.entry(r).or_insert(t);
                    *e = (*e).max(t);
                }
                Err(e)
            }
        }
    }

    /// Indices of the regions currently recorded dirty, ascending.
    pub(crate) fn dirty_regions(&self) -> Vec<u64> {
        let st = lock(&self.state);
        let mut v: Vec<u64> = st.dirty.keys().copied().collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    use super::*;
    use crate::meta::Record;
    use crate::{LayerInfo, Membership};

    fn db(dir: &std::path::Path) -> MetaDb {
        let rec = Record {
            volume: "v".into(),
            size: 1 << 20,
            block_size: 512,
            chunk_size: 4096,
            region_size: 4096,
            instance_id: "i".into(),
            epoch: corral_types::Epoch(0),
            membership: Membership::default(),
            layers: vec![LayerInfo::new("head".into(), 0, false, 1 << 20)],
            clean: true,
            reservations: None,
            clone: None,
        };
        MetaDb::create(dir, &rec).unwrap()
    }

    fn persisted(db: MetaDb, dir: &std::path::Path) -> Vec<u64> {
        drop(db);
        let (db, _, dirty) = MetaDb::open(dir).unwrap();
        drop(db);
        dirty
    }

    #[test]
    fn flush_waits_for_writes_in_flight() {
        let tmp = tempfile::tempdir().unwrap();
        let db = db(tmp.path());
        let wi = Arc::new(WriteIntent::new(12, &[]));
        let ticket = wi.begin_write(&db, 0, 1).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let h = {
            let (wi, done) = (wi.clone(), done.clone());
            std::thread::spawn(move || {
                let seq = wi.begin_flush();
                done.store(true, Ordering::SeqCst);
                seq
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !done.load(Ordering::SeqCst),
            "flush did not wait for the write"
        );
        drop(ticket);
        assert_eq!(h.join().unwrap(), 0);
        assert_eq!(wi.dirty_regions(), vec![0]);
        assert_eq!(persisted(db, tmp.path()), vec![0]);
    }

    #[test]
    fn a_write_after_the_bump_keeps_its_region_dirty() {
        let tmp = tempfile::tempdir().unwrap();
        let db = db(tmp.path());
        let wi = WriteIntent::new(12, &[]);
        drop(wi.begin_write(&db, 0, 4096 * 3).unwrap()); // regions 0..=2, tag 0
        assert_eq!(wi.begin_flush(), 0);
        wi.clear_idle(&db, 0).unwrap();
        assert_eq!(wi.dirty_regions(), vec![0, 1, 2]);
        let seq = wi.begin_flush(); // 1; writes now get tag 2
        // A write to region 1 starts after the bump, before the clear.
        let ticket = wi.begin_write(&db, 4096, 4097).unwrap();
        wi.clear_idle(&db, seq).unwrap();
        assert_eq!(wi.dirty_regions(), vec![1]);
        drop(ticket);
        assert_eq!(persisted(db, tmp.path()), vec![1]);
    }

    #[test]
    fn concurrent_marks_are_all_persisted() {
        let tmp = tempfile::tempdir().unwrap();
        let db = Arc::new(db(tmp.path()));
        let wi = Arc::new(WriteIntent::new(12, &[]));
        let hs: Vec<_> = (0..8u64)
            .map(|t| {
                let (db, wi) = (db.clone(), wi.clone());
                std::thread::spawn(move || {
                    for i in 0..20u64 {
                        let r = t * 20 + i;
                        drop(wi.begin_write(&db, r << 12, (r << 12) + 1).unwrap());
                        if i % 5 == 0 {
                            let seq = wi.begin_flush();
                            wi.clear_idle(&db, seq).unwrap();
                        }
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let mem = wi.dirty_regions();
        let db = Arc::try_unwrap(db).unwrap();
        assert_eq!(persisted(db, tmp.path()), mem);
    }
}
