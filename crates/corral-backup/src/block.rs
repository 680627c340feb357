//! Backup blocks: 64 KiB of a volume, named by the BLAKE3-256 of their
//! bytes and stored lz4-compressed. A block of zeroes is never stored.

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

/// A block compressed for a pack.
pub fn compress(block: &[u8]) -> Vec<u8> {
    lz4_flex::block::compress(block)
}

/// Decompresses a block read from a pack and checks it against `hash`:
/// exactly [`BLOCK_SIZE`] bytes whose BLAKE3 is `hash`.
pub fn decompress(compressed: &[u8], hash: &BlockHash) -> Result<Vec<u8>, FormatError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_block_round_trips_and_a_changed_byte_is_caught() {
        let mut block = vec![0u8; BLOCK_SIZE];
        for (i, b) in block.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let hash = BlockHash::of(&block);
        let c = compress(&block);
        assert!(c.len() < BLOCK_SIZE, "a patterned block compresses");
        assert_eq!(decompress(&c, &hash).unwrap(), block);
        let mut other = block.clone();
        other[100] ^= 1;
        let c2 = compress(&other);
        assert_eq!(
            decompress(&c2, &hash),
            Err(FormatError::Checksum { what: "block" })
        );
        assert!(!is_zero(&block) && is_zero(&vec![0u8; BLOCK_SIZE]));
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
