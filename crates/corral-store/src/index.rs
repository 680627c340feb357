//! The extent index: for every block, the newest read-only layer that holds
//! an entry for it (written or discarded), as non-overlapping extents.
//!
//! A read looks at the head's own entries first; only for blocks the head has
//! never written does it ask this index, so a read touches at most two layers
//! however long the chain is. Memory is one map entry per run of blocks that
//! share an owner: it grows with how fragmented the written data is, not with
//! the number of snapshots (a block has one owner whatever the chain length),
//! and not with the volume size (never-written space costs nothing).
//!
//! Durability: each read-only layer's own extent list (the blocks it holds,
//! found when it was frozen) is stored in `meta.redb` (table `extents`, module
//! `meta`); [`crate::ReplicaStore::open`] folds the lists oldest first into
//! this index. The index itself is never written: it is a function of the
//! lists and the merge cursors.

use std::collections::BTreeMap;

/// Identifies a layer for the life of the store (never reused).
pub(crate) type LayerId = u32;

/// A half-open run of blocks `start..end`.
pub(crate) type Extent = (u64, u64);

/// Block → newest read-only owner, as extents.
#[derive(Clone, Debug, Default)]
pub(crate) struct ExtentIndex {
    /// start → (end, owner); extents never overlap.
    map: BTreeMap<u64, (u64, LayerId)>,
}

impl ExtentIndex {
    /// Number of extents held (the index's size).
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Makes `owner` the owner of blocks `start..end`, replacing whatever
    /// owned them, and merges with neighbours of the same owner.
    pub(crate) fn assign(&mut self, start: u64, end: u64, owner: LayerId) {
        if start >= end {
            return;
        }
        self.remove(start, end);
        let mut s = start;
        let mut e = end;
        // Merge with the extent ending at `start`.
        if let Some((&ps, &(pe, po))) = self.map.range(..start).next_back()
            && pe == start
            && po == owner
        {
            self.map.remove(&ps);
            s = ps;
        }
        // Merge with the extent starting at `end`.
        if let Some(&(ne, no)) = self.map.get(&end)
            && no == owner
        {
            self.map.remove(&end);
            e = ne;
        }
        self.map.insert(s, (e, owner));
    }

    /// [`ExtentIndex::assign`] of every extent of `extents` to `owner`, in
    /// one pass over the index and the list (a layer frozen by a snapshot
    /// may hold tens of thousands of extents). `extents` is expected sorted
    /// and disjoint, as `Layer::written_extents` and [`decode`] give it; any
    /// other list is taken one extent at a time.
    pub(crate) fn assign_sorted(&mut self, extents: &[Extent], owner: LayerId) {
        let sorted =
            extents.iter().all(|&(s, e)| s < e) && extents.windows(2).all(|w| w[0].1 <= w[1].0);
        if !sorted {
            for &(s, e) in extents {
                self.assign(s, e, owner);
            }
            return;
        }
        if extents.is_empty() {
            return;
        }
        let mut out: Vec<(u64, (u64, LayerId))> =
            Vec::with_capacity(self.map.len() + 2 * extents.len());
        // Appends an extent, merged with the last one if they touch and share an owner.
        let push = |out: &mut Vec<(u64, (u64, LayerId))>, s: u64, e: u64, o: LayerId| {
            if s >= e {
                return;
            }
            match out.last_mut() {
                Some((_, (le, lo))) if *le == s && *lo == o => *le = e,
                _ => out.push((s, (e, o))),
            }
        };
        let mut olds = std::mem::take(&mut self.map).into_iter();
        let mut old = olds.next();
        for &(ns, ne) in extents {
            // What the index holds before the new extent.
            while let Some((os, (oe, oo))) = old {
                if os >= ns {
                    break;
                }
                push(&mut out, os, oe.min(ns), oo);
                if oe > ns {
                    old = Some((ns, (oe, oo)));
                    break;
                }
                old = olds.next();
            }
            push(&mut out, ns, ne, owner);
            // What the new extent replaces; a tail past its end stays.
            while let Some((os, (oe, oo))) = old {
                if os >= ne {
                    break;
                }
                if oe > ne {
                    old = Some((ne, (oe, oo)));
                    break;
                }
                old = olds.next();
            }
        }
        while let Some((os, (oe, oo))) = old {
            push(&mut out, os, oe, oo);
            old = olds.next();
        }
        // Sorted input: the map is built in one pass.
        self.map = out.into_iter().collect();
    }

    /// Forgets any owner of blocks `start..end`.
    pub(crate) fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        // An extent that starts before `start` and reaches into the range.
        if let Some((&ps, &(pe, po))) = self.map.range(..start).next_back()
            && pe > start
        {
            self.map.insert(ps, (start, po));
            if pe > end {
                self.map.insert(end, (pe, po));
            }
        }
        // Extents that start inside the range.
        let inside: Vec<u64> = self.map.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            if let Some((e, o)) = self.map.remove(&s)
                && e > end
            {
                self.map.insert(end, (e, o));
            }
        }
    }

    /// Replaces owner `from` by `to` (None: forgets it) on blocks `start..end`.
    pub(crate) fn reassign(&mut self, start: u64, end: u64, from: LayerId, to: Option<LayerId>) {
        let hits: Vec<Extent> = self
            .segments(start, end)
            .into_iter()
            .filter(|&(_, _, o)| o == Some(from))
            .map(|(s, e, _)| (s, e))
            .collect();
        for (s, e) in hits {
            match to {
                Some(t) => self.assign(s, e, t),
                None => self.remove(s, e),
            }
        }
    }

    /// Blocks `start..end` cut into segments by owner, in order, covering the
    /// whole range (None: no read-only layer holds them).
    pub(crate) fn segments(&self, start: u64, end: u64) -> Vec<(u64, u64, Option<LayerId>)> {
        let mut out = Vec::new();
        if start >= end {
            return out;
        }
        // The extents that start before `end`, walked back to the one that
        // covers `start`: one search of the map per read (a read of one
        // block, the common case, visits one extent).
        let mut hits: Vec<(u64, u64, LayerId)> = Vec::new();
        for (&s, &(e, o)) in self.map.range(..end).rev() {
            if e <= start {
                break;
            }
            hits.push((s.max(start), e.min(end), o));
        }
        let mut pos = start;
        for &(s, e, o) in hits.iter().rev() {
            if s > pos {
                out.push((pos, s, None));
            }
            out.push((s, e, Some(o)));
            pos = e;
        }
        if pos < end {
            out.push((pos, end, None));
        }
        out
    }
}

/// Encodes an extent list for `meta.redb`: 16 bytes per extent (start, end; little-endian).
pub(crate) fn encode(extents: &[Extent]) -> Vec<u8> {
    let mut out = Vec::with_capacity(extents.len() * 16);
    for &(s, e) in extents {
        out.extend_from_slice(&s.to_le_bytes());
        out.extend_from_slice(&e.to_le_bytes());
    }
    out
}

/// Decodes [`encode`]'s output; None if it is malformed (not whole extents,
/// an empty or reversed extent, or extents out of order).
pub(crate) fn decode(raw: &[u8]) -> Option<Vec<Extent>> {
    if !raw.len().is_multiple_of(16) {
        return None;
    }
    let mut out: Vec<Extent> = Vec::with_capacity(raw.len() / 16);
    for c in raw.chunks_exact(16) {
        let s = u64::from_le_bytes(c[..8].try_into().ok()?);
        let e = u64::from_le_bytes(c[8..].try_into().ok()?);
        if s >= e || out.last().is_some_and(|&(_, pe)| pe > s) {
            return None;
        }
        out.push((s, e));
    }
    Some(out)
}

/// The union of two sorted extent lists, sorted and coalesced.
pub(crate) fn union(a: &[Extent], b: &[Extent]) -> Vec<Extent> {
    let mut all: Vec<Extent> = a.iter().chain(b).copied().collect();
    all.sort_unstable();
    let mut out: Vec<Extent> = Vec::with_capacity(all.len());
    for (s, e) in all {
        match out.last_mut() {
            Some((_, pe)) if *pe >= s => *pe = (*pe).max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The index as a plain per-block array, for comparison.
    fn flat(ix: &ExtentIndex, n: u64) -> Vec<Option<LayerId>> {
        let mut out = Vec::new();
        for (s, e, o) in ix.segments(0, n) {
            for _ in s..e {
                out.push(o);
            }
        }
        out
    }

    #[derive(Clone, Debug)]
    enum Op {
        Assign(u64, u64, LayerId),
        Remove(u64, u64),
        Reassign(u64, u64, LayerId, Option<LayerId>),
    }

    /// An index after `ops`.
    fn built(ops: Vec<Op>) -> ExtentIndex {
        let mut ix = ExtentIndex::default();
        for op in ops {
            match op {
                Op::Assign(s, e, o) => ix.assign(s, e, o),
                Op::Remove(s, e) => ix.remove(s, e),
                Op::Reassign(s, e, f, t) => ix.reassign(s, e, f, t),
            }
        }
        ix
    }

    fn op() -> impl Strategy<Value = Op> {
        let range = (0u64..64, 0u64..64).prop_map(|(a, b)| (a.min(b), a.max(b)));
        prop_oneof![
            (range.clone(), 1u32..4).prop_map(|((s, e), o)| Op::Assign(s, e, o)),
            range.clone().prop_map(|(s, e)| Op::Remove(s, e)),
            (range, 1u32..4, proptest::option::of(1u32..4))
                .prop_map(|((s, e), f, t)| Op::Reassign(s, e, f, t)),
        ]
    }

    proptest! {
        #[test]
        fn index_matches_a_per_block_model(ops in prop::collection::vec(op(), 1..40)) {
            let mut ix = ExtentIndex::default();
            let mut model: Vec<Option<LayerId>> = vec![None; 64];
            for op in ops {
                match op {
                    Op::Assign(s, e, o) => {
                        ix.assign(s, e, o);
                        for b in s..e { model[b as usize] = Some(o); }
                    }
                    Op::Remove(s, e) => {
                        ix.remove(s, e);
                        for b in s..e { model[b as usize] = None; }
                    }
                    Op::Reassign(s, e, f, t) => {
                        ix.reassign(s, e, f, t);
                        for b in s..e {
                            if model[b as usize] == Some(f) { model[b as usize] = t; }
                        }
                    }
                }
                prop_assert_eq!(flat(&ix, 64), model.clone());
                // Neighbours with one owner are merged: no two adjacent extents share one.
                let segs: Vec<_> = ix.map.iter().map(|(&s, &(e, o))| (s, e, o)).collect();
                for w in segs.windows(2) {
                    prop_assert!(!(w[0].1 == w[1].0 && w[0].2 == w[1].2), "unmerged {:?}", w);
                }
            }
        }

        #[test]
        fn segments_of_any_range_match_the_model(ops in prop::collection::vec(op(), 1..30)) {
            let ix = built(ops);
            let whole = flat(&ix, 64);
            for a in 0..64u64 {
                for b in a..=64u64 {
                    let segs = ix.segments(a, b);
                    let mut pos = a;
                    let mut got = Vec::new();
                    for (s, e, o) in segs {
                        prop_assert_eq!(s, pos, "segments of {}..{} leave a gap or overlap", a, b);
                        prop_assert!(s < e, "an empty segment in {}..{}", a, b);
                        got.extend(std::iter::repeat_n(o, (e - s) as usize));
                        pos = e;
                    }
                    prop_assert_eq!(pos, b);
                    prop_assert_eq!(&got[..], &whole[a as usize..b as usize]);
                }
            }
        }

        #[test]
        fn assign_sorted_matches_one_assign_per_extent(
            before in prop::collection::vec(op(), 0..20),
            list in prop::collection::vec((0u64..6, 1u64..6), 0..12),
            owner in 1u32..4,
            shuffled in any::<bool>(),
        ) {
            let mut one_pass = built(before);
            let mut each = one_pass.clone();
            let mut pos = 0;
            let mut exts = Vec::new();
            for (gap, len) in list {
                exts.push((pos + gap, pos + gap + len));
                pos += gap + len;
            }
            if shuffled {
                exts.reverse();
            }
            for &(s, e) in &exts {
                each.assign(s, e, owner);
            }
            one_pass.assign_sorted(&exts, owner);
            prop_assert_eq!(&one_pass.map, &each.map);
        }

        #[test]
        fn extent_lists_round_trip(list in prop::collection::vec((0u64..1000, 1u64..10), 0..20)) {
            let mut pos = 0;
            let mut exts = Vec::new();
            for (gap, len) in list {
                exts.push((pos + gap, pos + gap + len));
                pos += gap + len;
            }
            prop_assert_eq!(decode(&encode(&exts)), Some(exts));
        }
    }

    #[test]
    fn malformed_lists_are_refused() {
        assert_eq!(decode(&[0u8; 15]), None);
        assert_eq!(decode(&encode(&[(5, 5)])), None);
        assert_eq!(decode(&encode(&[(0, 10), (5, 12)])), None);
        assert_eq!(decode(&[]), Some(vec![]));
    }

    #[test]
    fn union_coalesces() {
        assert_eq!(
            union(&[(0, 4), (10, 12)], &[(3, 6), (12, 14)]),
            vec![(0, 6), (10, 14)]
        );
    }
}
