//! The layer chain: read-only snapshot layers under the writable head,
//! oldest first, and how a block is found in it.
//!
//! Reading block `b` of the volume: the head's entry for `b` decides if it is
//! not "never written" — written: the head's data; discarded: zeroes. Else
//! the extent index (module `index`) names the newest read-only layer that
//! holds an entry for `b`, and that entry decides the same way. A block no
//! layer holds reads from the bottom layer (a hole: zeroes). So a read costs
//! the head's entries plus one owner's, however long the chain — and, for
//! the moment between a snapshot's switch of heads and its commit, the
//! entries of the layer it froze, which the index takes only in the commit
//! (so that the switch, during which writes are held, does not wait for it).
//!
//! Reading a snapshot (the chain as it was when that layer was frozen) walks
//! the layers from the snapshot down, newest first, and takes the first entry
//! that is not "never written" — the same rule, without the index, which
//! only knows the newest owner. Writes, discards and flushes go to the head.
//!
//! Layers may be shorter than the volume (it grew after they were frozen):
//! past a layer's end, its blocks are "never written".

use crate::LayerInfo;
use crate::entry::{self, BlockState, UNWRITTEN};
use crate::error::Result;
use crate::index::{ExtentIndex, LayerId};
use crate::layer::{Fetch, Layer};

/// Where a run of blocks reads from.
#[derive(Debug)]
pub(crate) enum Source<'a> {
    /// This layer's data, checked against these entries (one per block).
    Layer(&'a Layer, Vec<u32>),
    /// Zeroes: discarded in the newest layer that has an entry for them.
    Zeroes,
}

/// A run of consecutive blocks that read from one place.
#[derive(Debug)]
pub(crate) struct Run<'a> {
    /// First block of the run.
    pub(crate) first: u64,
    /// Number of blocks.
    pub(crate) len: u64,
    pub(crate) source: Source<'a>,
}

/// One layer of the chain: its record and its files.
#[derive(Debug)]
pub(crate) struct ChainLayer {
    pub(crate) info: LayerInfo,
    pub(crate) layer: Layer,
    /// The layer's length in blocks.
    pub(crate) blocks: u64,
}

impl ChainLayer {
    /// Entries of blocks `first..first + count`, "never written" past the layer's end.
    pub(crate) fn entries(&self, first: u64, count: usize) -> Result<Vec<u32>> {
        self.entries_with(first, count, Fetch::MayWait)
    }

    /// [`ChainLayer::entries`], from the page cache only if `fetch` says so.
    pub(crate) fn entries_with(&self, first: u64, count: usize, fetch: Fetch) -> Result<Vec<u32>> {
        let inside = self.blocks.saturating_sub(first).min(count as u64) as usize;
        let mut out = if inside > 0 {
            self.layer.read_crcs_with(first, inside, fetch)?
        } else {
            Vec::with_capacity(count)
        };
        out.resize(count, UNWRITTEN);
        Ok(out)
    }
}

/// What decides one block: a layer (by position in the chain) or zeroes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Decider {
    Layer(usize),
    Zeroes,
}

/// A block's decider and the entry it decided with.
type Decision = (Decider, u32);

/// Layers oldest first; the last is the writable head.
#[derive(Debug)]
pub(crate) struct LayerChain {
    layers: Vec<ChainLayer>,
    /// Newest read-only owner of each block, for every read-only layer but
    /// [`LayerChain::unindexed`].
    pub(crate) index: ExtentIndex,
    /// The layer just frozen by a snapshot whose extents the index has not
    /// taken yet (always the newest read-only layer): reads ask its own
    /// entries between the head's and the index's. The switch to a new head
    /// sets it, so that writes are held only for the switch itself; the
    /// snapshot's commit clears it with the updated index
    /// (`ReplicaStore::commit_pending`). Nothing else changes the index
    /// while it is set: every change of the chain commits the snapshot first.
    pub(crate) unindexed: Option<LayerId>,
}

impl LayerChain {
    /// A chain of `layers`, oldest first (at least one: the head), with the
    /// index of its read-only layers.
    pub(crate) fn new(layers: Vec<ChainLayer>, index: ExtentIndex) -> Option<Self> {
        (!layers.is_empty()).then_some(LayerChain {
            layers,
            index,
            unindexed: None,
        })
    }

    /// For blocks `first..first + count` still `open` (no newer layer
    /// decided them): the decision of the [`LayerChain::unindexed`] layer,
    /// if there is one and it holds an entry for the block (None when there
    /// is none, or no block is open). Each block it decides is closed in
    /// `open`.
    fn unindexed_decisions(
        &self,
        first: u64,
        open: &mut [bool],
        fetch: Fetch,
    ) -> Result<Option<Vec<Option<Decision>>>> {
        let Some(pos) = self.unindexed.and_then(|id| self.position(id)) else {
            return Ok(None);
        };
        if !open.iter().any(|&o| o) {
            return Ok(None);
        }
        let mut out = vec![None; open.len()];
        let entries = self.layers[pos].entries_with(first, open.len(), fetch)?;
        for ((d, o), &e) in out.iter_mut().zip(open.iter_mut()).zip(&entries) {
            if !*o {
                continue;
            }
            *d = match entry::state(e) {
                BlockState::Unwritten => continue,
                BlockState::Discarded => Some((Decider::Zeroes, e)),
                BlockState::Written => Some((Decider::Layer(pos), e)),
            };
            *o = false;
        }
        Ok(Some(out))
    }

    /// The writable head.
    pub(crate) fn head(&self) -> &ChainLayer {
        // `new` refuses an empty chain, and nothing removes the head.
        &self.layers[self.layers.len() - 1]
    }

    /// Every layer, oldest first.
    pub(crate) fn layers(&self) -> &[ChainLayer] {
        &self.layers
    }

    /// Every layer, oldest first, to change.
    pub(crate) fn layers_mut(&mut self) -> &mut Vec<ChainLayer> {
        &mut self.layers
    }

    /// Position of layer `id` in the chain. Ids grow along the chain (a new
    /// layer, frozen or reverted head, always gets a larger id than every
    /// layer under it), so this is a binary search.
    pub(crate) fn position(&self, id: LayerId) -> Option<usize> {
        self.layers.binary_search_by_key(&id, |l| l.info.id).ok()
    }

    /// Where blocks `first..first + count` of the volume read from, as runs
    /// in block order, reading entries as `fetch` allows.
    pub(crate) fn runs(&self, first: u64, count: usize, fetch: Fetch) -> Result<Vec<Run<'_>>> {
        let head_pos = self.layers.len() - 1;
        let head = self.head().entries_with(first, count, fetch)?;
        let mut decided: Vec<(Decider, u32)> = Vec::with_capacity(count);
        if self.layers.len() == 1 {
            // No parents: the head decides everything (a hole reads its own zeroes).
            decided.extend(head.into_iter().map(|e| match entry::state(e) {
                BlockState::Discarded => (Decider::Zeroes, e),
                _ => (Decider::Layer(0), e),
            }));
            return Ok(self.group(first, decided));
        }
        decided.extend(head.iter().map(|&e| match entry::state(e) {
            BlockState::Written => (Decider::Layer(head_pos), e),
            BlockState::Discarded => (Decider::Zeroes, e),
            // Filled in below.
            BlockState::Unwritten => (Decider::Zeroes, UNWRITTEN),
        }));
        let mut open: Vec<bool> = head
            .iter()
            .map(|&e| entry::state(e) == BlockState::Unwritten)
            .collect();
        if let Some(found) = self.unindexed_decisions(first, &mut open, fetch)? {
            for (d, u) in decided.iter_mut().zip(found) {
                if let Some(u) = u {
                    *d = u;
                }
            }
        }
        let end = first + count as u64;
        for (s, e, owner) in self.index.segments(first, end) {
            let lo = (s - first) as usize;
            let hi = (e - first) as usize;
            if !open[lo..hi].iter().any(|&o| o) {
                continue;
            }
            // The owner, or the bottom layer's hole if no read-only layer holds them.
            let pos = owner.and_then(|id| self.position(id)).unwrap_or_default();
            let entries = self.layers[pos].entries_with(s, hi - lo, fetch)?;
            for (i, &oe) in entries.iter().enumerate() {
                if !open[lo + i] {
                    continue;
                }
                let beyond = s + i as u64 >= self.layers[pos].blocks;
                decided[lo + i] = match entry::state(oe) {
                    BlockState::Discarded => (Decider::Zeroes, oe),
                    _ if beyond => (Decider::Zeroes, oe),
                    _ => (Decider::Layer(pos), oe),
                };
            }
        }
        Ok(self.group(first, decided))
    }

    /// Where blocks `first..first + count` of the snapshot at chain position
    /// `top` read from: the layers from `top` down decide, newest first.
    pub(crate) fn runs_at(
        &self,
        top: usize,
        first: u64,
        count: usize,
        fetch: Fetch,
    ) -> Result<Vec<Run<'_>>> {
        if top + 1 == self.layers.len() {
            return self.runs(first, count, fetch);
        }
        let mut decided: Vec<Option<(Decider, u32)>> = vec![None; count];
        let mut open = count;
        for pos in (0..=top).rev() {
            if open == 0 {
                break;
            }
            let entries = self.layers[pos].entries_with(first, count, fetch)?;
            for (d, &e) in decided.iter_mut().zip(&entries) {
                if d.is_some() {
                    continue;
                }
                match entry::state(e) {
                    BlockState::Unwritten => {}
                    BlockState::Discarded => *d = Some((Decider::Zeroes, e)),
                    BlockState::Written => *d = Some((Decider::Layer(pos), e)),
                }
                if d.is_some() {
                    open -= 1;
                }
            }
        }
        let bottom = &self.layers[0];
        let decided = decided
            .into_iter()
            .enumerate()
            .map(|(i, d)| {
                d.unwrap_or(if first + (i as u64) < bottom.blocks {
                    (Decider::Layer(0), UNWRITTEN)
                } else {
                    (Decider::Zeroes, UNWRITTEN)
                })
            })
            .collect();
        Ok(self.group(first, decided))
    }

    /// Groups per-block decisions into runs.
    fn group(&self, first: u64, decided: Vec<(Decider, u32)>) -> Vec<Run<'_>> {
        let mut runs = Vec::new();
        let mut i = 0;
        while i < decided.len() {
            let owner = decided[i].0;
            let start = i;
            i += 1;
            while i < decided.len() && decided[i].0 == owner {
                i += 1;
            }
            let source = match owner {
                Decider::Layer(pos) => Source::Layer(
                    &self.layers[pos].layer,
                    decided[start..i].iter().map(|&(_, e)| e).collect(),
                ),
                Decider::Zeroes => Source::Zeroes,
            };
            runs.push(Run {
                first: first + start as u64,
                len: (i - start) as u64,
                source,
            });
        }
        runs
    }

    /// What [`crate::ReplicaStore::block_checksums`] reports for `count`
    /// blocks from `first` of the snapshot at position `top`: the entry of the
    /// layer that decides each block, or the zero block's CRC32C.
    pub(crate) fn reported_at(&self, top: usize, first: u64, count: usize) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(count);
        for run in self.runs_at(top, first, count, Fetch::MayWait)? {
            match run.source {
                Source::Layer(_, entries) => out.extend(entries.into_iter().map(entry::reported)),
                Source::Zeroes => out.extend(std::iter::repeat_n(
                    entry::zero_block_crc(),
                    run.len as usize,
                )),
            }
        }
        Ok(out)
    }

    /// For each of blocks `first..first + count`: true when no layer of the
    /// chain has ever written or discarded it (a clone's fill may write it).
    pub(crate) fn never_written(&self, first: u64, count: usize) -> Result<Vec<bool>> {
        let head = self.head().entries(first, count)?;
        let mut out: Vec<bool> = head
            .iter()
            .map(|&e| entry::state(e) == BlockState::Unwritten)
            .collect();
        if self.layers.len() == 1 || !out.iter().any(|&u| u) {
            return Ok(out);
        }
        // Blocks the unindexed layer holds are closed in `out` by the call.
        self.unindexed_decisions(first, &mut out, Fetch::MayWait)?;
        let end = first + count as u64;
        for (s, e, owner) in self.index.segments(first, end) {
            let Some(pos) = owner.and_then(|id| self.position(id)) else {
                continue;
            };
            let lo = (s - first) as usize;
            let hi = (e - first) as usize;
            if !out[lo..hi].iter().any(|&u| u) {
                continue;
            }
            let entries = self.layers[pos].entries(s, hi - lo)?;
            for (i, &oe) in entries.iter().enumerate() {
                if entry::state(oe) != BlockState::Unwritten {
                    out[lo + i] = false;
                }
            }
        }
        Ok(out)
    }

    /// [`LayerChain::reported_at`] for the volume (the head).
    pub(crate) fn reported(&self, first: u64, count: usize) -> Result<Vec<u32>> {
        self.reported_at(self.layers.len() - 1, first, count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{DISCARDED, written};
    use crate::layer::BLOCK;

    /// A chain of `n` layers of 8 blocks in a temporary directory, indexed.
    fn chain(n: usize, fill: impl Fn(&[&Layer])) -> (tempfile::TempDir, LayerChain) {
        let dir = tempfile::tempdir().unwrap();
        let layers: Vec<Layer> = (0..n)
            .map(|i| Layer::create(dir.path(), &format!("l{i}"), 8 * BLOCK).unwrap())
            .collect();
        fill(&layers.iter().collect::<Vec<_>>());
        let mut index = ExtentIndex::default();
        let mut chained = Vec::new();
        for (i, layer) in layers.into_iter().enumerate() {
            if i + 1 < n {
                for (s, e) in layer.written_extents(8).unwrap() {
                    index.assign(s, e, i as LayerId);
                }
            }
            chained.push(ChainLayer {
                info: LayerInfo::new(format!("l{i}"), i as LayerId, i + 1 < n, 8 * BLOCK),
                layer,
                blocks: 8,
            });
        }
        (dir, LayerChain::new(chained, index).unwrap())
    }

    fn write(layer: &Layer, block: u64, byte: u8) {
        let data = vec![byte; BLOCK as usize];
        layer.write_data(block * BLOCK, &data).unwrap();
        layer
            .write_crcs(block, &[written(entry::block_crc(&data))])
            .unwrap();
    }

    fn owner(c: &LayerChain, block: u64) -> Option<String> {
        match c.runs(block, 1, Fetch::MayWait).unwrap().remove(0).source {
            Source::Layer(l, _) => Some(l.data_name().to_string()),
            Source::Zeroes => None,
        }
    }

    #[test]
    fn the_newest_layer_that_wrote_a_block_holds_it() {
        let (_d, c) = chain(3, |l| {
            write(l[0], 0, 1);
            write(l[0], 1, 1);
            write(l[1], 1, 2);
            write(l[2], 2, 3);
        });
        assert_eq!(owner(&c, 0), Some("l0.img".into()));
        assert_eq!(owner(&c, 1), Some("l1.img".into()));
        assert_eq!(owner(&c, 2), Some("l2.img".into()));
        // Never written anywhere: the bottom layer's hole.
        assert_eq!(owner(&c, 5), Some("l0.img".into()));
        // The snapshot at l1 sees l1's and l0's blocks, not the head's.
        let at = |b: u64| match c.runs_at(1, b, 1, Fetch::MayWait).unwrap().remove(0).source {
            Source::Layer(l, _) => Some(l.data_name().to_string()),
            Source::Zeroes => None,
        };
        assert_eq!(at(1), Some("l1.img".into()));
        assert_eq!(
            at(2),
            Some("l0.img".into()),
            "the head's block is not in the snapshot"
        );
    }

    #[test]
    fn a_discard_hides_the_parents_but_never_written_falls_through() {
        let (_d, c) = chain(2, |l| {
            write(l[0], 0, 1);
            write(l[0], 1, 1);
            l[1].write_crcs(0, &[DISCARDED]).unwrap();
        });
        assert_eq!(owner(&c, 0), None, "discarded in the head: zeroes");
        assert_eq!(
            owner(&c, 1),
            Some("l0.img".into()),
            "untouched in the head: the parent"
        );
        let reported = c.reported(0, 2).unwrap();
        assert_eq!(reported[0], entry::zero_block_crc());
        assert_eq!(reported[1], entry::block_crc(&[1u8; BLOCK as usize]));
    }

    #[test]
    fn runs_end_where_the_owner_changes() {
        let (_d, c) = chain(2, |l| {
            for b in 0..4 {
                write(l[0], b, 1);
            }
            write(l[1], 2, 2);
            l[1].write_crcs(5, &[DISCARDED, DISCARDED]).unwrap();
        });
        let runs = c.runs(0, 8, Fetch::MayWait).unwrap();
        let shape: Vec<(u64, u64, Option<&str>)> = runs
            .iter()
            .map(|r| {
                let owner = match &r.source {
                    Source::Layer(l, e) => {
                        assert_eq!(e.len() as u64, r.len);
                        Some(l.data_name())
                    }
                    Source::Zeroes => None,
                };
                (r.first, r.len, owner)
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                (0, 2, Some("l0.img")),
                (2, 1, Some("l1.img")),
                (3, 2, Some("l0.img")),
                (5, 2, None),
                (7, 1, Some("l0.img")),
            ]
        );
    }

    /// Runs as comparable values: (first, len, file or zeroes, entries).
    fn shape(runs: Vec<Run<'_>>) -> Vec<(u64, u64, Option<String>, Vec<u32>)> {
        runs.into_iter()
            .map(|r| match r.source {
                Source::Layer(l, e) => (r.first, r.len, Some(l.data_name().to_string()), e),
                Source::Zeroes => (r.first, r.len, None, vec![]),
            })
            .collect()
    }

    #[test]
    fn a_frozen_layer_not_yet_indexed_reads_as_if_it_were() {
        let fill = |l: &[&Layer]| {
            write(l[0], 0, 1);
            write(l[0], 1, 1);
            write(l[0], 2, 1);
            write(l[1], 2, 2);
            write(l[1], 3, 2);
            // The newest read-only layer: overwrites, discards, and leaves
            // blocks to the older layers.
            write(l[2], 1, 3);
            l[2].write_crcs(3, &[DISCARDED]).unwrap();
            write(l[2], 6, 3);
            // The head.
            write(l[3], 6, 4);
            l[3].write_crcs(0, &[DISCARDED]).unwrap();
        };
        let (_d, indexed) = chain(4, fill);
        // The same files, with l2 left out of the index.
        let mut index = ExtentIndex::default();
        let mut layers = Vec::new();
        for (i, l) in indexed.layers().iter().enumerate() {
            if i < 2 {
                for (s, e) in l.layer.written_extents(8).unwrap() {
                    index.assign(s, e, i as LayerId);
                }
            }
            layers.push(ChainLayer {
                info: l.info.clone(),
                layer: l.layer.try_clone().unwrap(),
                blocks: l.blocks,
            });
        }
        let mut pending = LayerChain::new(layers, index).unwrap();
        pending.unindexed = Some(2);
        for first in 0..8u64 {
            for count in 1..=(8 - first) as usize {
                assert_eq!(
                    shape(pending.runs(first, count, Fetch::MayWait).unwrap()),
                    shape(indexed.runs(first, count, Fetch::MayWait).unwrap()),
                    "runs of {count} blocks from {first}"
                );
                assert_eq!(
                    pending.never_written(first, count).unwrap(),
                    indexed.never_written(first, count).unwrap(),
                    "never written, {count} blocks from {first}"
                );
            }
        }
        assert_eq!(
            shape(pending.runs(0, 8, Fetch::MayWait).unwrap())
                .iter()
                .map(|r| r.2.clone())
                .collect::<Vec<_>>(),
            vec![
                None,
                Some("l2.img".into()),
                Some("l1.img".into()),
                None,
                Some("l0.img".into()),
                Some("l3.img".into()),
                Some("l0.img".into()),
            ],
            "the head's discard, l2's write, l1, l2's discard, the hole, the head's write, the hole"
        );
    }
}
