//! Model-based property test: random sequences of operations against an in-memory
//! `Vec<u8>` model, including clean reopens, crashes and writes torn by a crash.
//!
//! After every read, and after every reopen, the store's contents equal the model and no
//! checksum mismatch ever appears; `block_checksums` always equals the CRC32C of the model's
//! blocks.

use proptest::prelude::*;

use super::{no_mismatch, params, pattern};
use crate::{BLOCK, ReplicaStore};

const SIZE: u64 = 256 * 1024;

#[derive(Clone, Debug)]
enum Op {
    Write {
        off: u64,
        len: u64,
        seed: u8,
        fua: bool,
    },
    Read {
        off: u64,
        len: u64,
    },
    Flush,
    Unmap {
        off: u64,
        len: u64,
    },
    WriteZeroes {
        off: u64,
        len: u64,
    },
    Reopen,
    Crash,
    /// The data reached the data file, the checksum did not; then a crash.
    TornData {
        off: u64,
        len: u64,
        seed: u8,
    },
    /// The checksum reached the checksum file, the data did not; then a crash.
    TornCrc {
        off: u64,
        len: u64,
        seed: u8,
    },
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        (0..SIZE / BLOCK).prop_map(|b| b * BLOCK),
        0..SIZE,
        (SIZE - 2 * BLOCK)..SIZE,
    ]
}

fn length() -> impl Strategy<Value = u64> {
    prop_oneof![(1..=16u64).prop_map(|b| b * BLOCK), 1..40_000u64, 1..64u64,]
}

/// An in-range (offset, length) with length >= 1.
fn range() -> impl Strategy<Value = (u64, u64)> {
    (offset(), length()).prop_map(|(o, l)| (o, l.min(SIZE - o).max(1)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (range(), any::<u8>(), prop::bool::weighted(0.2))
            .prop_map(|((off, len), seed, fua)| Op::Write { off, len, seed: seed % 8, fua }),
        3 => range().prop_map(|(off, len)| Op::Read { off, len }),
        2 => Just(Op::Flush),
        1 => range().prop_map(|(off, len)| Op::Unmap { off, len }),
        1 => range().prop_map(|(off, len)| Op::WriteZeroes { off, len }),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
        1 => (range(), any::<u8>()).prop_map(|((off, len), seed)| Op::TornData { off, len, seed: seed % 8 }),
        1 => (range(), any::<u8>()).prop_map(|((off, len), seed)| Op::TornCrc { off, len, seed: seed % 8 }),
    ]
}

fn span(off: u64, len: u64) -> std::ops::Range<usize> {
    off as usize..(off + len) as usize
}

fn check_all(s: &ReplicaStore, model: &[u8], what: &str) -> Result<(), TestCaseError> {
    let got = no_mismatch(s.read(0, SIZE), what)?;
    if got[..] != model[..] {
        let first = (0..model.len()).find(|&i| got[i] != model[i]).unwrap_or(0);
        return Err(TestCaseError::fail(format!(
            "{what}: contents differ from the model, first at byte {first}"
        )));
    }
    let sums = no_mismatch(s.block_checksums(0, SIZE), what)?;
    let expect: Vec<u32> = model.chunks(BLOCK as usize).map(crc32c::crc32c).collect();
    prop_assert_eq!(
        sums,
        expect,
        "{}: block checksums differ from the model",
        what
    );
    Ok(())
}

fn run(chunk: u32, region: u64, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("replica");
    let mut store = Some(
        ReplicaStore::create_with_region_size(&dir, params(SIZE, chunk), region)
            .map_err(|e| TestCaseError::fail(e.to_string()))?,
    );
    let mut model = vec![0u8; SIZE as usize];
    for (i, op) in ops.into_iter().enumerate() {
        let what = format!("op {i} {op:?}");
        let s = store.as_ref().unwrap();
        match op {
            Op::Write {
                off,
                len,
                seed,
                fua,
            } => {
                let data = pattern(seed, len as usize);
                if fua {
                    no_mismatch(s.write_fua(off, &data), &what)?;
                } else {
                    no_mismatch(s.write(off, &data), &what)?;
                }
                model[span(off, len)].copy_from_slice(&data);
            }
            Op::Read { off, len } => {
                let got = no_mismatch(s.read(off, len), &what)?;
                prop_assert!(got[..] == model[span(off, len)], "{}: read differs", what);
            }
            Op::Flush => no_mismatch(s.flush(), &what)?,
            Op::Unmap { off, len } => {
                no_mismatch(s.unmap(off, len), &what)?;
                model[span(off, len)].fill(0);
            }
            Op::WriteZeroes { off, len } => {
                no_mismatch(s.write_zeroes(off, len), &what)?;
                model[span(off, len)].fill(0);
            }
            Op::Reopen => {
                no_mismatch(store.take().unwrap().close(), &what)?;
                let s = no_mismatch(ReplicaStore::open(&dir), &what)?;
                prop_assert!(s.meta().clean_shutdown);
                prop_assert!(s.dirty_regions().is_empty());
                check_all(&s, &model, &what)?;
                store = Some(s);
            }
            Op::Crash | Op::TornData { .. } | Op::TornCrc { .. } => {
                match op {
                    Op::TornData { off, len, seed } => {
                        let data = pattern(seed, len as usize);
                        no_mismatch(s.torn_write_data_only(off, &data), &what)?;
                        model[span(off, len)].copy_from_slice(&data);
                    }
                    Op::TornCrc { off, len, seed } => {
                        let data = pattern(seed, len as usize);
                        no_mismatch(s.torn_write_crc_only(off, &data), &what)?;
                    }
                    _ => {}
                }
                store.take().unwrap().crash();
                let s = no_mismatch(ReplicaStore::open(&dir), &what)?;
                prop_assert!(!s.meta().clean_shutdown);
                prop_assert_eq!(s.dirty_regions(), s.recovered_regions());
                check_all(&s, &model, &what)?;
                store = Some(s);
            }
        }
    }
    let s = store.take().unwrap();
    check_all(&s, &model, "at the end")?;
    no_mismatch(s.close(), "close")?;
    let s = no_mismatch(ReplicaStore::open(&dir), "final open")?;
    check_all(&s, &model, "after the final reopen")?;
    no_mismatch(s.close(), "final close")?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(
        chunk in prop::sample::select(vec![4096u32, 16 * 1024, 64 * 1024]),
        region in prop::sample::select(vec![4096u64, 16 * 1024, 64 * 1024, 1 << 20]),
        ops in prop::collection::vec(op(), 1..40),
    ) {
        run(chunk, region, ops)?;
    }
}
