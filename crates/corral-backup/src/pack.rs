//! Packs: many compressed blocks in one object, so that a backup writes a
//! few large objects rather than one per block.
//!
//! ```text
//! block 0 (lz4) | block 1 (lz4) | ... | footer | trailer
//! footer:  per block: BLAKE3 (32) | offset (u64) | length (u32)    44 bytes each
//! trailer: footer offset (u64) | block count (u32) | "CRLPACK1" | BLAKE3 of the footer (32)
//! ```
//!
//! All integers big-endian. A reader fetches the trailer (the last
//! [`PackTrailer::LEN`] bytes), then the footer, which the trailer's hash
//! checks, then any block by its range; a block is checked by its own hash
//! when read ([`crate::block::open_stored`]). A backup names a pack
//! when it starts it (docs/backups.md), so that pages can refer to it
//! while it fills; nothing hashes the whole object.

use bytes::{Bytes, BytesMut};

use crate::{BlockHash, FormatError, hash_at, slice, u32_at, u64_at};

const MAGIC: &[u8; 8] = b"CRLPACK1";
const ENTRY_LEN: usize = 44;

/// Where one block lies in its pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    pub hash: BlockHash,
    pub offset: u64,
    pub len: u32,
}

/// Builds one pack in memory, as the parts a PUT sends one after the
/// other: the blocks' own buffers (views of what was read, or their lz4
/// output), then one part with the footer and trailer. A block's bytes are
/// never copied into a pack buffer.
#[derive(Default)]
pub struct PackBuilder {
    parts: Vec<Bytes>,
    len: usize,
    entries: Vec<PackEntry>,
}

impl PackBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a block as stored (see [`crate::block::compress`]); where
    /// it will lie.
    pub fn add(&mut self, hash: BlockHash, stored: Bytes) -> PackEntry {
        let entry = PackEntry {
            hash,
            offset: self.len as u64,
            len: stored.len() as u32,
        };
        self.len += stored.len();
        self.parts.push(stored);
        self.entries.push(entry);
        entry
    }

    /// Bytes of block data so far.
    pub fn data_len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The finished object, as its parts in order, and its entries.
    pub fn finish(mut self) -> (Vec<Bytes>, Vec<PackEntry>) {
        let footer_offset = self.len as u64;
        let mut tail = BytesMut::with_capacity(self.entries.len() * ENTRY_LEN + PackTrailer::LEN);
        for e in &self.entries {
            tail.extend_from_slice(&e.hash.0);
            tail.extend_from_slice(&e.offset.to_be_bytes());
            tail.extend_from_slice(&e.len.to_be_bytes());
        }
        let footer_hash = BlockHash::of(&tail);
        tail.extend_from_slice(&footer_offset.to_be_bytes());
        tail.extend_from_slice(&(self.entries.len() as u32).to_be_bytes());
        tail.extend_from_slice(MAGIC);
        tail.extend_from_slice(&footer_hash.0);
        self.parts.push(tail.freeze());
        (self.parts, self.entries)
    }
}

/// A pack's trailer: where its footer is, and the footer's hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackTrailer {
    pub footer_offset: u64,
    pub count: u32,
    pub footer_hash: BlockHash,
}

impl PackTrailer {
    /// Bytes of the trailer, at the end of every pack.
    pub const LEN: usize = 8 + 4 + 8 + 32;

    /// Parses the trailer from the last [`Self::LEN`] bytes of a pack of
    /// `pack_len` bytes.
    pub fn parse(tail: &[u8], pack_len: u64) -> Result<Self, FormatError> {
        const WHAT: &str = "pack trailer";
        if tail.len() != Self::LEN {
            return Err(FormatError::Truncated {
                what: WHAT,
                len: tail.len(),
                need: Self::LEN,
            });
        }
        if slice(tail, 12, 8, WHAT)? != MAGIC {
            return Err(FormatError::BadMagic { what: WHAT });
        }
        let t = PackTrailer {
            footer_offset: u64_at(tail, 0, WHAT)?,
            count: u32_at(tail, 8, WHAT)?,
            footer_hash: BlockHash(hash_at(tail, 20, WHAT)?),
        };
        let footer_end = t
            .footer_offset
            .checked_add(u64::from(t.count) * ENTRY_LEN as u64)
            .and_then(|end| end.checked_add(Self::LEN as u64));
        if footer_end != Some(pack_len) {
            return Err(FormatError::Invalid {
                what: WHAT,
                why: format!(
                    "footer at {} with {} entries does not end a pack of {pack_len} bytes",
                    t.footer_offset, t.count
                ),
            });
        }
        Ok(t)
    }

    /// The footer's byte range in the pack: (offset, length).
    pub fn footer_range(&self) -> (u64, u64) {
        (self.footer_offset, u64::from(self.count) * ENTRY_LEN as u64)
    }

    /// The entries from the footer's bytes, checked against the trailer's
    /// hash and against the pack's data area.
    pub fn parse_footer(&self, footer: &[u8]) -> Result<Vec<PackEntry>, FormatError> {
        const WHAT: &str = "pack footer";
        if footer.len() as u64 != self.footer_range().1 {
            return Err(FormatError::Truncated {
                what: WHAT,
                len: footer.len(),
                need: self.footer_range().1 as usize,
            });
        }
        if BlockHash::of(footer) != self.footer_hash {
            return Err(FormatError::Checksum { what: WHAT });
        }
        let mut out = Vec::with_capacity(self.count as usize);
        for i in 0..self.count as usize {
            let at = i * ENTRY_LEN;
            let e = PackEntry {
                hash: BlockHash(hash_at(footer, at, WHAT)?),
                offset: u64_at(footer, at + 32, WHAT)?,
                len: u32_at(footer, at + 40, WHAT)?,
            };
            if e.offset.saturating_add(u64::from(e.len)) > self.footer_offset {
                return Err(FormatError::Invalid {
                    what: WHAT,
                    why: format!("block {i} lies past the data area"),
                });
            }
            out.push(e);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{BLOCK_SIZE, decompress, stored};
    use proptest::prelude::*;

    fn block(seed: u8) -> Vec<u8> {
        (0..BLOCK_SIZE)
            .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
            .collect()
    }

    /// Reads `pack` the way a restore does: trailer, footer, each block.
    fn read_back(pack: &[u8]) -> Result<Vec<Vec<u8>>, FormatError> {
        let len = pack.len();
        let tail = pack
            .get(len.saturating_sub(PackTrailer::LEN)..)
            .unwrap_or(&[]);
        let t = PackTrailer::parse(tail, len as u64)?;
        let (at, n) = t.footer_range();
        let entries = t.parse_footer(&pack[at as usize..(at + n) as usize])?;
        entries
            .iter()
            .map(|e| {
                decompress(
                    &pack[e.offset as usize..(e.offset + u64::from(e.len)) as usize],
                    &e.hash,
                )
            })
            .collect()
    }

    /// A finished pack's parts as the one object a PUT makes of them.
    fn object(b: PackBuilder) -> Vec<u8> {
        b.finish().0.concat()
    }

    #[test]
    fn a_pack_reads_back_block_by_block_and_is_the_same_every_time() {
        let blocks: Vec<Vec<u8>> = (1..=5).map(block).collect();
        let mut b = PackBuilder::new();
        for data in &blocks {
            b.add(BlockHash::of(data), Bytes::from(stored(data)));
        }
        let (parts, entries) = b.finish();
        assert_eq!(entries.len(), 5);
        let pack = parts.concat();
        assert_eq!(read_back(&pack).unwrap(), blocks);
        // The same blocks make the same object.
        let mut again = PackBuilder::new();
        for data in &blocks {
            again.add(BlockHash::of(data), Bytes::from(stored(data)));
        }
        assert_eq!(object(again), pack);
    }

    /// A block stored as it is goes into the PUT as the buffer it was read
    /// into, not a copy of it.
    #[test]
    fn a_block_s_bytes_are_sent_from_its_own_buffer() {
        let read = Bytes::from([block(3), block(4)].concat());
        let mut b = PackBuilder::new();
        let first = read.slice(..BLOCK_SIZE);
        let second = read.slice(BLOCK_SIZE..);
        b.add(BlockHash::of(&first), first.clone());
        let e = b.add(BlockHash::of(&second), second.clone());
        assert_eq!((e.offset, e.len), (BLOCK_SIZE as u64, BLOCK_SIZE as u32));
        assert_eq!(b.data_len(), 2 * BLOCK_SIZE);
        let (parts, _) = b.finish();
        assert_eq!(parts.len(), 3, "two blocks and the footer with the trailer");
        assert_eq!(parts[0].as_ptr(), read.as_ptr());
        assert_eq!(parts[1].as_ptr(), read[BLOCK_SIZE..].as_ptr());
        let pack = parts.concat();
        assert_eq!(read_back(&pack).unwrap(), vec![block(3), block(4)]);
    }

    #[test]
    fn a_changed_byte_anywhere_is_caught() {
        let mut b = PackBuilder::new();
        for s in 1..=3 {
            let data = block(s);
            b.add(BlockHash::of(&data), Bytes::from(stored(&data)));
        }
        let pack = object(b);
        for at in [
            0,
            pack.len() / 3,
            pack.len() - PackTrailer::LEN - 3,
            pack.len() - 1,
        ] {
            let mut bad = pack.clone();
            bad[at] ^= 0x40;
            assert!(read_back(&bad).is_err(), "byte {at} changed, not caught");
        }
        assert!(read_back(&pack[..pack.len() - 1]).is_err(), "truncated");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_pack_reader(
            bytes in proptest::collection::vec(any::<u8>(), 0..400)
        ) {
            let _ = read_back(&bytes);
        }

        #[test]
        fn a_forged_trailer_and_footer_cannot_point_past_the_data(
            count in 0u32..4, offset in any::<u64>(), len in any::<u32>(), data in 0usize..64
        ) {
            let mut footer = Vec::new();
            for _ in 0..count {
                footer.extend_from_slice(&[7u8; 32]);
                footer.extend_from_slice(&offset.to_be_bytes());
                footer.extend_from_slice(&len.to_be_bytes());
            }
            let t = PackTrailer {
                footer_offset: data as u64,
                count,
                footer_hash: BlockHash::of(&footer),
            };
            if let Ok(entries) = t.parse_footer(&footer) {
                for e in entries {
                    prop_assert!(e.offset + u64::from(e.len) <= data as u64);
                }
            }
        }
    }
}
