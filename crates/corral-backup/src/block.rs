//! Backup blocks: 64 KiB of a volume, named by the BLAKE3-256 of their
//! bytes and stored lz4-compressed, or as they are when lz4 would not make
//! them smaller (decision 70). A block of zeroes is never stored.

use crate::FormatError;

/// Bytes per backup block (docs/backups.md, "Why these units").
pub const BLOCK_SIZE: usize = 64 * 1024;

/// The BLAKE3-256 of a block's uncompressed bytes (also names packs and
/// pages: the hash of the whole object).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub [u8; 32]);

impl BlockHash {
    pub fn of(bytes: &[u8]) -> Self {
        BlockHash(*blake3::hash(bytes).as_bytes())
    }

    /// Lowercase hex, as in object names.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(s: &str) -> Result<Self, FormatError> {
        let bad = || FormatError::Invalid {
            what: "hash",
            why: format!("{s:?} is not 64 hex digits"),
        };
        if s.len() != 64 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(BlockHash(out))
    }
}

impl std::fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockHash({})", &self.to_hex()[..16])
    }
}

/// True for a block of zeroes (not stored; a page says "zero").
pub fn is_zero(block: &[u8]) -> bool {
    block.iter().all(|&b| b == 0)
}

/// How much of a block lz4 compresses first, to learn whether compressing
/// the whole block can pay: random or already compressed data gains
/// nothing, and lz4 spends as long failing on it as it does succeeding.
const PROBE: usize = 4096;

/// A block as a pack stores it: lz4-compressed, or (`None`) the block's
/// own [`BLOCK_SIZE`] bytes when lz4 gains nothing on its first [`PROBE`]
/// bytes or would not make the whole block smaller. A stored block of
/// exactly [`BLOCK_SIZE`] bytes is read as the block itself when its hash
/// says so ([`open_stored`]).
pub fn compress(block: &[u8]) -> Option<Vec<u8>> {
    if block.len() == BLOCK_SIZE && lz4_flex::block::compress(&block[..PROBE]).len() >= PROBE {
        return None;
    }
    let compressed = lz4_flex::block::compress(block);
    if block.len() == BLOCK_SIZE && compressed.len() >= BLOCK_SIZE {
        return None;
    }
    Some(compressed)
}

/// The block a pack stored (see [`compress`]), checked against `hash`:
/// exactly [`BLOCK_SIZE`] bytes whose BLAKE3 is `hash`. Stored bytes of
/// exactly that size that hash to `hash` are the block, returned as a view
/// of `stored` (a pack's bytes as a GET returned them), not a copy; any
/// others are lz4 (a writer before decision 70 compressed every block, and
/// an lz4 stream can be 64 KiB long).
pub fn open_stored(stored: bytes::Bytes, hash: &BlockHash) -> Result<bytes::Bytes, FormatError> {
    if stored.len() == BLOCK_SIZE && BlockHash::of(&stored) == *hash {
        return Ok(stored);
    }
    decompress_lz4(&stored, hash).map(bytes::Bytes::from)
}

fn decompress_lz4(compressed: &[u8], hash: &BlockHash) -> Result<Vec<u8>, FormatError> {
    let block =
        lz4_flex::block::decompress(compressed, BLOCK_SIZE).map_err(|e| FormatError::Invalid {
            what: "block",
            why: format!("lz4: {e}"),
        })?;
    if block.len() != BLOCK_SIZE {
        return Err(FormatError::Invalid {
            what: "block",
            why: format!("{} bytes, {BLOCK_SIZE} expected", block.len()),
        });
    }
    if BlockHash::of(&block) != *hash {
        return Err(FormatError::Checksum { what: "block" });
    }
    Ok(block)
}

/// Test helpers: a block's stored bytes, and the block read back from them.
#[cfg(test)]
pub(crate) fn stored(block: &[u8]) -> Vec<u8> {
    compress(block).unwrap_or_else(|| block.to_vec())
}

#[cfg(test)]
pub(crate) fn decompress(stored: &[u8], hash: &BlockHash) -> Result<Vec<u8>, FormatError> {
    open_stored(bytes::Bytes::copy_from_slice(stored), hash).map(|b| b.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A block of bytes lz4 cannot shrink (xorshift from `seed`).
    fn random_block(mut seed: u64) -> Vec<u8> {
        (0..BLOCK_SIZE)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn a_block_round_trips_and_a_changed_byte_is_caught() {
        let mut block = vec![0u8; BLOCK_SIZE];
        for (i, b) in block.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let hash = BlockHash::of(&block);
        let c = stored(&block);
        assert!(c.len() < BLOCK_SIZE, "a patterned block compresses");
        assert_eq!(decompress(&c, &hash).unwrap(), block);
        let mut other = block.clone();
        other[100] ^= 1;
        let c2 = stored(&other);
        assert_eq!(
            decompress(&c2, &hash),
            Err(FormatError::Checksum { what: "block" })
        );
        assert!(!is_zero(&block) && is_zero(&vec![0u8; BLOCK_SIZE]));
    }

    /// Bytes lz4 cannot shrink (random, as from an encrypted or compressed
    /// file) are stored as they are, without compressing the whole block,
    /// and read back as the block; stored raw bytes that are not the block
    /// named are refused like any other wrong block.
    #[test]
    fn a_block_lz4_cannot_shrink_is_stored_as_it_is() {
        let random = random_block(0x9E37_79B9_7F4A_7C15);
        let hash = BlockHash::of(&random);
        let kept = stored(&random);
        assert!(kept == random, "stored as it is");
        assert_eq!(decompress(&kept, &hash).unwrap(), random);
        let shared = bytes::Bytes::from(kept.clone());
        let opened = open_stored(shared.clone(), &hash).unwrap();
        assert_eq!(opened.as_ptr(), shared.as_ptr(), "a view, not a copy");
        let mut other = random.clone();
        other[7] ^= 1;
        assert!(decompress(&other, &hash).is_err());
        // Random first 4 KiB, compressible after: still stored whole, raw.
        let mut mixed = random.clone();
        mixed[PROBE..].fill(7);
        assert!(stored(&mixed) == mixed);
        // A first 4 KiB lz4 shrinks a little, random after: lz4 tries the
        // whole block, cannot make it smaller, and it is stored as it is.
        let mut late = random.clone();
        late[..64].fill(7);
        assert!(lz4_flex::block::compress(&late[..PROBE]).len() < PROBE);
        assert!(stored(&late) == late);
        // A first 4 KiB that shrinks a lot: the whole block is smaller
        // compressed, and stored so.
        late[..PROBE].fill(7);
        let kept = stored(&late);
        assert!(kept.len() < BLOCK_SIZE);
        assert_eq!(decompress(&kept, &BlockHash::of(&late)).unwrap(), late);
        let opened = open_stored(kept.into(), &BlockHash::of(&late)).unwrap();
        assert!(opened[..] == late[..]);
    }

    /// lz4 output of exactly 64 KiB, as a writer before decision 70 could
    /// store, still reads back as the block it compressed.
    #[test]
    fn an_lz4_stream_of_a_whole_block_s_length_still_decompresses() {
        // Random bytes with a run of zeroes whose length makes lz4's output
        // exactly BLOCK_SIZE: found by search below, the run's length moving
        // the output a few bytes at a time.
        let random = random_block(0x2545_F491_4F6C_DD1D);
        let found = (0..2048).find_map(|run| {
            let mut block = random.clone();
            block[..run].fill(0);
            let out = lz4_flex::block::compress(&block);
            (out.len() == BLOCK_SIZE).then_some((block, out))
        });
        let Some((block, out)) = found else {
            panic!("no run of zeroes made lz4's output exactly {BLOCK_SIZE} bytes");
        };
        assert_eq!(decompress(&out, &BlockHash::of(&block)).unwrap(), block);
    }

    #[test]
    fn hashes_print_and_parse_as_hex() {
        let h = BlockHash::of(b"corral");
        assert_eq!(BlockHash::from_hex(&h.to_hex()).unwrap(), h);
        for bad in ["", "zz", &"g".repeat(64), &"é".repeat(32)] {
            assert!(BlockHash::from_hex(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_decompress_into_a_wrong_block(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048)
        ) {
            let hash = BlockHash::of(&[1u8; BLOCK_SIZE]);
            // Any outcome but a panic; a success only with the right block.
            if let Ok(b) = decompress(&bytes, &hash) {
                prop_assert_eq!(BlockHash::of(&b), hash);
            }
        }
    }
}
