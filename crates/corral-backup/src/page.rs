//! Pages: the block map of one GiB of a volume ([`PAGE_BLOCKS`] blocks;
//! the last page of a volume may hold fewer). Per block, either zero (not
//! stored) or where its compressed bytes lie and the hash they must have.
//!
//! ```text
//! object:  uncompressed length (u32) | lz4 block of:
//!   "CRLPAGE1" | block count (u32) | per block: 0 (zero)
//!                                             | 1, pack (32), offset (u64), length (u32), BLAKE3 (32)
//! ```
//!
//! A page is named by the BLAKE3 of its object, so a GiB that did not
//! change since the parent backup keeps the parent's page and nothing is
//! written for it.

use crate::{BlockHash, FormatError, hash_at, slice, u32_at, u64_at};

/// Blocks per page: one GiB of 64 KiB blocks.
pub const PAGE_BLOCKS: usize = 16 * 1024;

const MAGIC: &[u8; 8] = b"CRLPAGE1";
const REF_LEN: usize = 1 + 32 + 8 + 4 + 32;
/// The largest uncompressed page a reader accepts.
const MAX_LEN: usize = 12 + PAGE_BLOCKS * REF_LEN;

/// Where a stored block lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRef {
    /// The pack (its name).
    pub pack: BlockHash,
    pub offset: u64,
    pub len: u32,
    /// The BLAKE3 of the uncompressed block.
    pub hash: BlockHash,
}

/// The map of up to [`PAGE_BLOCKS`] consecutive blocks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    /// `None`: a block of zeroes.
    pub blocks: Vec<Option<BlockRef>>,
}

impl Page {
    /// A page of `blocks` zero blocks.
    pub fn zeroes(blocks: usize) -> Self {
        Page {
            blocks: vec![None; blocks],
        }
    }

    /// The stored object and its name.
    pub fn encode(&self) -> (BlockHash, Vec<u8>) {
        let mut raw = Vec::with_capacity(12 + self.blocks.len() * REF_LEN);
        raw.extend_from_slice(MAGIC);
        raw.extend_from_slice(&(self.blocks.len() as u32).to_be_bytes());
        for b in &self.blocks {
            match b {
                None => raw.push(0),
                Some(r) => {
                    raw.push(1);
                    raw.extend_from_slice(&r.pack.0);
                    raw.extend_from_slice(&r.offset.to_be_bytes());
                    raw.extend_from_slice(&r.len.to_be_bytes());
                    raw.extend_from_slice(&r.hash.0);
                }
            }
        }
        let mut object = (raw.len() as u32).to_be_bytes().to_vec();
        object.extend_from_slice(&lz4_flex::block::compress(&raw));
        (BlockHash::of(&object), object)
    }

    /// The page in `object`, which must be named `id`.
    pub fn decode(object: &[u8], id: &BlockHash) -> Result<Self, FormatError> {
        const WHAT: &str = "page";
        if BlockHash::of(object) != *id {
            return Err(FormatError::Checksum { what: WHAT });
        }
        let len = u32_at(object, 0, WHAT)? as usize;
        if len > MAX_LEN {
            return Err(FormatError::Invalid {
                what: WHAT,
                why: format!("{len} bytes uncompressed, at most {MAX_LEN}"),
            });
        }
        let raw =
            lz4_flex::block::decompress(&object[4..], len).map_err(|e| FormatError::Invalid {
                what: WHAT,
                why: format!("lz4: {e}"),
            })?;
        if raw.len() != len {
            return Err(FormatError::Truncated {
                what: WHAT,
                len: raw.len(),
                need: len,
            });
        }
        Self::parse(&raw)
    }

    fn parse(raw: &[u8]) -> Result<Self, FormatError> {
        const WHAT: &str = "page";
        if slice(raw, 0, 8, WHAT)? != MAGIC {
            return Err(FormatError::BadMagic { what: WHAT });
        }
        let count = u32_at(raw, 8, WHAT)? as usize;
        if count > PAGE_BLOCKS {
            return Err(FormatError::Invalid {
                what: WHAT,
                why: format!("{count} blocks, at most {PAGE_BLOCKS}"),
            });
        }
        let mut blocks = Vec::with_capacity(count);
        let mut at = 12;
        for _ in 0..count {
            match slice(raw, at, 1, WHAT)?[0] {
                0 => {
                    blocks.push(None);
                    at += 1;
                }
                1 => {
                    blocks.push(Some(BlockRef {
                        pack: BlockHash(hash_at(raw, at + 1, WHAT)?),
                        offset: u64_at(raw, at + 33, WHAT)?,
                        len: u32_at(raw, at + 41, WHAT)?,
                        hash: BlockHash(hash_at(raw, at + 45, WHAT)?),
                    }));
                    at += REF_LEN;
                }
                t => {
                    return Err(FormatError::Invalid {
                        what: WHAT,
                        why: format!("block tag {t}"),
                    });
                }
            }
        }
        if at != raw.len() {
            return Err(FormatError::Invalid {
                what: WHAT,
                why: format!("{} bytes after the last block", raw.len() - at),
            });
        }
        Ok(Page { blocks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reference(i: u64) -> BlockRef {
        BlockRef {
            pack: BlockHash::of(&(i / 100).to_be_bytes()),
            offset: i.wrapping_mul(1000),
            len: (i as u32).wrapping_add(40_000),
            hash: BlockHash::of(&i.to_be_bytes()),
        }
    }

    #[test]
    fn a_page_round_trips_and_unchanged_pages_keep_their_name() {
        let mut page = Page::zeroes(PAGE_BLOCKS);
        for i in (0..PAGE_BLOCKS).step_by(7) {
            page.blocks[i] = Some(reference(i as u64));
        }
        let (id, object) = page.encode();
        assert_eq!(Page::decode(&object, &id).unwrap(), page);
        assert_eq!(page.clone().encode().0, id, "same map, same name");
        page.blocks[3] = Some(reference(99_999));
        assert_ne!(page.encode().0, id, "a changed block, a new name");
        // A whole-zero GiB compresses to almost nothing.
        let (_, zero) = Page::zeroes(PAGE_BLOCKS).encode();
        assert!(zero.len() < 200, "{} bytes", zero.len());
    }

    #[test]
    fn a_page_under_another_name_or_changed_is_refused() {
        let mut page = Page::zeroes(10);
        page.blocks[2] = Some(reference(2));
        let (id, object) = page.encode();
        let mut bad = object.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(
            Page::decode(&bad, &id),
            Err(FormatError::Checksum { what: "page" })
        );
        let other = Page::zeroes(10).encode().0;
        assert!(Page::decode(&object, &other).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_pages_never_panic_the_decoder(
            bytes in proptest::collection::vec(any::<u8>(), 0..600)
        ) {
            // Under its own name, so that the checks past the hash run.
            let id = BlockHash::of(&bytes);
            let _ = Page::decode(&bytes, &id);
            let _ = Page::parse(&bytes);
        }

        #[test]
        fn any_map_round_trips(refs in proptest::collection::vec(
            proptest::option::of(any::<u64>()), 0..64)
        ) {
            let page = Page { blocks: refs.iter().map(|r| r.map(reference)).collect() };
            let (id, object) = page.encode();
            prop_assert_eq!(Page::decode(&object, &id).unwrap(), page);
        }
    }
}
