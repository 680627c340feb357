//! The layer chain: read-only snapshot layers under the writable head,
//! oldest first, and how a block is found in it.
//!
//! Reading block `b` walks from the head down: the first layer whose entry
//! for `b` is not "never written" decides — written: that layer's data;
//! discarded: zeroes, whatever the layers below hold. A block no layer has
//! written reads from the bottom layer (a hole: zeroes). Writes, discards
//! and flushes go to the head only.
//!
//! Today a store's chain is its head alone (snapshots are the next issue);
//! the resolution rule is here, and tested on longer chains, so that they
//! need no change to the read path.

use crate::entry::{self, BlockState};
use crate::error::Result;
use crate::layer::Layer;

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

/// Layers oldest first; the last is the writable head.
#[derive(Debug)]
pub(crate) struct LayerChain {
    layers: Vec<Layer>,
}

impl LayerChain {
    /// A chain of `layers`, oldest first (at least one: the head).
    pub(crate) fn new(layers: Vec<Layer>) -> Option<Self> {
        (!layers.is_empty()).then_some(LayerChain { layers })
    }

    /// The writable head.
    pub(crate) fn head(&self) -> &Layer {
        // `new` refuses an empty chain.
        &self.layers[self.layers.len() - 1]
    }

    /// Every layer, oldest first.
    #[cfg(test)]
    pub(crate) fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Where blocks `first..first + count` read from, as runs in block order.
    /// Each layer's entries for the window are read once.
    pub(crate) fn runs(&self, first: u64, count: usize) -> Result<Vec<Run<'_>>> {
        // Entries of every layer for the window, head first.
        let mut entries: Vec<Vec<u32>> = Vec::with_capacity(self.layers.len());
        for layer in self.layers.iter().rev() {
            entries.push(layer.read_crcs(first, count)?);
        }
        // Which layer (depth from the head) decides block `i`; None: zeroes.
        let decide = |i: usize| -> Option<usize> {
            for (depth, e) in entries.iter().enumerate() {
                match entry::state(e[i]) {
                    BlockState::Unwritten => continue,
                    BlockState::Discarded => return None,
                    BlockState::Written => return Some(depth),
                }
            }
            // Never written anywhere: the bottom layer's own data (a hole).
            Some(entries.len() - 1)
        };
        let mut runs = Vec::new();
        let mut i = 0;
        while i < count {
            let owner = decide(i);
            let start = i;
            i += 1;
            while i < count && decide(i) == owner {
                i += 1;
            }
            let source = match owner {
                Some(depth) => Source::Layer(
                    &self.layers[self.layers.len() - 1 - depth],
                    entries[depth][start..i].to_vec(),
                ),
                None => Source::Zeroes,
            };
            runs.push(Run {
                first: first + start as u64,
                len: (i - start) as u64,
                source,
            });
        }
        Ok(runs)
    }

    /// What [`crate::ReplicaStore::block_checksums`] reports for `count`
    /// blocks from `first`: the entry of the layer that decides each block,
    /// or the zero block's CRC32C.
    pub(crate) fn reported(&self, first: u64, count: usize) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(count);
        for run in self.runs(first, count)? {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{DISCARDED, written};
    use crate::layer::BLOCK;

    /// A chain of `n` layers of 8 blocks in a temporary directory.
    fn chain(n: usize) -> (tempfile::TempDir, LayerChain) {
        let dir = tempfile::tempdir().unwrap();
        let layers = (0..n)
            .map(|i| Layer::create(dir.path(), &format!("l{i}"), 8 * BLOCK).unwrap())
            .collect();
        (dir, LayerChain::new(layers).unwrap())
    }

    fn write(layer: &Layer, block: u64, byte: u8) {
        let data = vec![byte; BLOCK as usize];
        layer.write_data(block * BLOCK, &data).unwrap();
        layer
            .write_crcs(block, &[written(entry::block_crc(&data))])
            .unwrap();
    }

    fn owner(c: &LayerChain, block: u64) -> Option<String> {
        match c.runs(block, 1).unwrap().remove(0).source {
            Source::Layer(l, _) => Some(l.data_name().to_string()),
            Source::Zeroes => None,
        }
    }

    #[test]
    fn the_newest_layer_that_wrote_a_block_holds_it() {
        let (_d, c) = chain(3);
        let [base, mid, head] = c.layers() else {
            panic!("three layers")
        };
        write(base, 0, 1);
        write(base, 1, 1);
        write(mid, 1, 2);
        write(head, 2, 3);
        assert_eq!(owner(&c, 0), Some("l0.img".into()));
        assert_eq!(owner(&c, 1), Some("l1.img".into()));
        assert_eq!(owner(&c, 2), Some("l2.img".into()));
        // Never written anywhere: the bottom layer's hole.
        assert_eq!(owner(&c, 5), Some("l0.img".into()));
    }

    #[test]
    fn a_discard_hides_the_parents_but_never_written_falls_through() {
        let (_d, c) = chain(2);
        let [base, head] = c.layers() else {
            panic!("two layers")
        };
        write(base, 0, 1);
        write(base, 1, 1);
        head.write_crcs(0, &[DISCARDED]).unwrap();
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
        let (_d, c) = chain(2);
        let [base, head] = c.layers() else {
            panic!("two layers")
        };
        for b in 0..4 {
            write(base, b, 1);
        }
        write(head, 2, 2);
        head.write_crcs(5, &[DISCARDED, DISCARDED]).unwrap();
        let runs = c.runs(0, 8).unwrap();
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
}
