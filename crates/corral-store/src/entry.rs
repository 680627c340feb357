//! A block's entry in its layer's checksum file: what state the block is in
//! and, once written, its CRC32C — one little-endian `u32` per 4 KiB block.
//!
//! | entry | state | reads as |
//! | --- | --- | --- |
//! | `0` | never written in this layer | the parent layer's block (zeroes at the bottom) |
//! | `1` | discarded (unmap, write-zeroes) | zeroes, hiding every parent |
//! | anything else | written | this layer's data, whose CRC32C it is |
//!
//! A written block whose CRC32C happens to be 0 or 1 is stored with the top
//! bit set (`0x8000_0000`, `0x8000_0001`); a block stored that way is
//! accepted if its CRC32C is either that value or the one it stands for, so
//! the encoding costs no space and loses no check (a corrupt block slips
//! through only if its CRC32C hits one particular other value, as with any
//! 32-bit checksum).
//!
//! Format version 1 stored 0 for "never written or discarded" and every
//! written block's CRC as is: [`crate::ReplicaStore::open`] upgrades such a
//! store by rewriting the entries that now mean "discarded" (a written block
//! whose CRC was 1) to their escaped form.

/// The entry of a block never written in its layer.
pub(crate) const UNWRITTEN: u32 = 0;
/// The entry of a block discarded in its layer.
pub(crate) const DISCARDED: u32 = 1;
/// Set on the CRC of a written block that would read as a state.
const ESCAPE: u32 = 0x8000_0000;

/// The state of a block in one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockState {
    /// Never written in this layer: look in its parent.
    Unwritten,
    /// Discarded in this layer: zeroes, whatever its parents hold.
    Discarded,
    /// Written in this layer.
    Written,
}

/// CRC32C of a 4 KiB block of zero bytes (checked by a test).
const ZERO_BLOCK_CRC: u32 = 0x98f9_4189;

/// CRC32C of a 4 KiB block of zero bytes.
pub fn zero_block_crc() -> u32 {
    ZERO_BLOCK_CRC
}

/// CRC32C of one block.
pub(crate) fn block_crc(block: &[u8]) -> u32 {
    crc32c::crc32c(block)
}

/// The entries of the whole 4 KiB blocks of `data` (its length a multiple
/// of 4096) as written, and the CRC32C of all of `data`, from one pass over
/// it: the payload's CRC is folded from its blocks' (CRC32C(A ‖ B) is
/// CRC32C(A) moved past 4096 zero bytes, XOR CRC32C(B)), so a write of many
/// blocks is not read twice to check what its sender computed.
pub(crate) fn block_entries_and_crc(data: &[u8]) -> (Vec<u32>, u32) {
    let mut whole = None;
    let entries = data
        .chunks_exact(crate::BLOCK as usize)
        .map(|b| {
            let crc = block_crc(b);
            whole = Some(whole.map_or(crc, |w| past_one_block(w) ^ crc));
            written(crc)
        })
        .collect();
    (entries, whole.unwrap_or(0))
}

/// `crc` moved past one block of zero bytes: the linear map
/// `crc32c_combine(crc, 0, 4096)`, as four tables of its values on each
/// byte of `crc`, built once.
fn past_one_block(crc: u32) -> u32 {
    static TABLES: std::sync::OnceLock<[[u32; 256]; 4]> = std::sync::OnceLock::new();
    let tables = TABLES.get_or_init(|| {
        let mut t = [[0u32; 256]; 4];
        for (byte, table) in t.iter_mut().enumerate() {
            for (v, entry) in table.iter_mut().enumerate() {
                *entry = crc32c::crc32c_combine((v as u32) << (8 * byte), 0, crate::BLOCK as usize);
            }
        }
        t
    });
    tables[0][(crc & 0xff) as usize]
        ^ tables[1][((crc >> 8) & 0xff) as usize]
        ^ tables[2][((crc >> 16) & 0xff) as usize]
        ^ tables[3][(crc >> 24) as usize]
}

/// The entry of a block written with CRC32C `crc`.
pub(crate) fn written(crc: u32) -> u32 {
    if crc == UNWRITTEN || crc == DISCARDED {
        crc | ESCAPE
    } else {
        crc
    }
}

/// The state an entry records.
pub(crate) fn state(entry: u32) -> BlockState {
    match entry {
        UNWRITTEN => BlockState::Unwritten,
        DISCARDED => BlockState::Discarded,
        _ => BlockState::Written,
    }
}

/// Checks a block read from a layer against its entry; the computed CRC32C
/// on mismatch. A written block must match its CRC; a discarded one must be
/// zeroes; a block never written must be zeroes too — or, in a store
/// upgraded from format 1, a written block whose CRC32C was 0.
pub(crate) fn verify(block: &[u8], entry: u32) -> Result<(), u32> {
    let computed = block_crc(block);
    let ok = match state(entry) {
        BlockState::Unwritten => computed == 0 || computed == zero_block_crc(),
        BlockState::Discarded => computed == zero_block_crc(),
        BlockState::Written => computed == entry || written(computed) == entry,
    };
    if ok { Ok(()) } else { Err(computed) }
}

/// What [`crate::ReplicaStore::block_checksums`] reports for an entry:
/// blocks that read as zeroes report the zero block's CRC32C, whatever
/// their history, so replicas compare by content; a written block reports
/// its entry (a CRC32C of 0 or 1 shows escaped, the same on every replica,
/// which is all a comparison needs).
pub(crate) fn reported(entry: u32) -> u32 {
    match state(entry) {
        BlockState::Unwritten | BlockState::Discarded => zero_block_crc(),
        BlockState::Written => entry,
    }
}

/// The entry recovery writes for a block found on disk after an unclean
/// stop (its data and its entry may be from different writes). Data that is
/// not all zeroes is recorded written, with its CRC32C. An all-zero block
/// keeps an entry that already reads as zeroes (never written, discarded, or
/// written with zeroes); one whose entry names other data is recorded
/// discarded: zeroes are what the disk holds, and in a chain "never
/// written" would show the parent's data instead, which was never there.
pub(crate) fn recovered(block: &[u8], entry: u32) -> u32 {
    let computed = block_crc(block);
    if computed == ZERO_BLOCK_CRC && block.iter().all(|&b| b == 0) {
        match state(entry) {
            BlockState::Unwritten | BlockState::Discarded => entry,
            BlockState::Written if entry == ZERO_BLOCK_CRC => entry,
            BlockState::Written => DISCARDED,
        }
    } else {
        written(computed)
    }
}

#[cfg(test)]
mod tests {
    use proptest::strategy::Strategy;

    use super::*;

    proptest::proptest! {
        #[test]
        fn one_pass_gives_each_block_s_entry_and_the_payload_s_crc(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..=6)
                .prop_flat_map(|seeds| {
                    let blocks = seeds.len();
                    proptest::collection::vec(proptest::prelude::any::<u8>(), blocks * 4096)
                        .prop_map(move |mut d| {
                            // Some blocks all zero or all one byte, as real payloads have.
                            for (i, &s) in seeds.iter().enumerate() {
                                if s % 3 == 0 {
                                    d[i * 4096..(i + 1) * 4096].fill(s);
                                }
                            }
                            d
                        })
                })
        ) {
            let (entries, whole) = block_entries_and_crc(&data);
            proptest::prop_assert_eq!(whole, crc32c::crc32c(&data));
            let each: Vec<u32> = data.chunks_exact(4096).map(|b| written(block_crc(b))).collect();
            proptest::prop_assert_eq!(entries, each);
        }
    }

    #[test]
    fn the_zero_block_crc_is_computed_right() {
        assert_eq!(block_crc(&[0u8; 4096]), zero_block_crc());
    }

    #[test]
    fn states_and_their_checks() {
        let zeroes = [0u8; 4096];
        let data = [7u8; 4096];
        let c = block_crc(&data);
        assert_eq!(state(written(c)), BlockState::Written);
        assert!(verify(&data, written(c)).is_ok());
        assert!(verify(&zeroes, written(c)).is_err());
        assert!(verify(&zeroes, DISCARDED).is_ok());
        assert!(verify(&data, DISCARDED).is_err());
        assert!(verify(&zeroes, UNWRITTEN).is_ok());
        assert!(verify(&data, UNWRITTEN).is_err());
        assert_eq!(reported(DISCARDED), zero_block_crc());
        assert_eq!(reported(UNWRITTEN), zero_block_crc());
        assert_eq!(reported(written(c)), c);
    }

    #[test]
    fn a_crc_that_looks_like_a_state_is_escaped() {
        assert_eq!(written(0), 0x8000_0000);
        assert_eq!(written(1), 0x8000_0001);
        assert_eq!(state(written(0)), BlockState::Written);
        assert_eq!(state(written(1)), BlockState::Written);
        assert_eq!(written(0x8000_0000), 0x8000_0000);
    }

    #[test]
    fn recovery_keeps_what_reads_as_zeroes() {
        let zeroes = [0u8; 4096];
        assert_eq!(recovered(&zeroes, DISCARDED), DISCARDED);
        assert_eq!(recovered(&zeroes, UNWRITTEN), UNWRITTEN);
        assert_eq!(recovered(&zeroes, zero_block_crc()), zero_block_crc());
        assert_eq!(recovered(&zeroes, 12345), DISCARDED);
        let data = [9u8; 4096];
        assert_eq!(recovered(&data, UNWRITTEN), written(block_crc(&data)));
        assert_eq!(recovered(&data, DISCARDED), written(block_crc(&data)));
    }
}
