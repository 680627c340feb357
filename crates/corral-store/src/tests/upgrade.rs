//! The upgrade from on-disk format 1 to format 2, tested on replica
//! directories that the format-1 release wrote (`tests/fixtures/format-1`,
//! whose README says how they were made and what they hold).

use std::path::{Path, PathBuf};

use crate::entry::{self, DISCARDED};
use crate::meta::{FORMAT_VERSION, MetaDb};
use crate::{BLOCK, Epoch, ReplicaStore, zero_block_crc};

const B: usize = BLOCK as usize;
const SIZE: usize = 1 << 20;

/// The generator's test pattern.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed as usize * 31 + i * 7 + i / 251) as u8)
        .collect()
}

/// The generator's forged block: `pattern(seed)` with its last four bytes
/// chosen so that its CRC32C is `target`. CRC32C is affine over GF(2), so
/// the effect of each of those 32 bits is a vector and the bits to set
/// solve a linear system; the generator solved the same system, and the
/// solution is unique because 32 trailing bits map onto the CRC one to one.
fn block_with_crc(seed: u8, target: u32) -> Vec<u8> {
    let mut base = pattern(seed, B);
    base[B - 4..].fill(0);
    let c0 = crc32c::crc32c(&base);
    let flip = |b: &mut [u8], bit: usize| b[B - 4 + bit / 8] ^= 1 << (bit % 8);
    // Row reduction over (effect on the CRC, bits that produce it).
    let mut basis: Vec<(u32, u32)> = Vec::new();
    for bit in 0..32 {
        let mut b = base.clone();
        flip(&mut b, bit);
        let mut row = (crc32c::crc32c(&b) ^ c0, 1u32 << bit);
        for &(v, m) in &basis {
            if row.0 ^ v < row.0 {
                row = (row.0 ^ v, row.1 ^ m);
            }
        }
        if row.0 != 0 {
            basis.push(row);
            basis.sort_by_key(|r| std::cmp::Reverse(r.0));
        }
    }
    let mut want = (c0 ^ target, 0u32);
    for &(v, m) in &basis {
        if want.0 ^ v < want.0 {
            want = (want.0 ^ v, want.1 ^ m);
        }
    }
    assert_eq!(want.0, 0, "the trailing bits reach every CRC");
    for bit in (0..32).filter(|bit| want.1 & (1 << bit) != 0) {
        flip(&mut base, bit);
    }
    assert_eq!(crc32c::crc32c(&base), target);
    base
}

/// The volume the generator wrote, byte for byte.
fn expected_image(crashed: bool) -> Vec<u8> {
    let mut img = vec![0u8; SIZE];
    let mut put = |at: usize, data: &[u8]| img[at..at + data.len()].copy_from_slice(data);
    put(0, &pattern(1, B));
    put(B, &block_with_crc(2, 1));
    put(2 * B, &block_with_crc(3, 0));
    put(10 * B, &pattern(4, 10 * B));
    put(12 * B, &[0u8; 3 * B]);
    put(100 * B + 100, &pattern(5, 5000));
    if crashed {
        put(200 * B, &block_with_crc(6, 1));
    }
    img
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/format-1")
        .join(name)
}

/// A copy of a fixture directory to open (opening upgrades it in place).
fn copy_of(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["meta.redb", "head.img", "head.crc"] {
        std::fs::copy(fixture(name).join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn recorded_format(dir: &Path) -> u64 {
    let (db, _, _) = MetaDb::open(dir).unwrap();
    db.format()
}

fn upgrade_and_check(name: &str, crashed: bool) {
    let dir = copy_of(name);
    assert_eq!(recorded_format(dir.path()), 1, "the fixture is format 1");
    let want = expected_image(crashed);

    let store = ReplicaStore::open(dir.path()).unwrap();
    assert_eq!(store.meta().volume, "vol-v1");
    assert_eq!(store.epoch(), Epoch(7));
    assert_eq!(store.meta().clean_shutdown, !crashed);
    let got = store.read(0, SIZE as u64).unwrap();
    assert!(
        got[..] == want[..],
        "{name}: the upgraded volume reads as written"
    );

    // Block 1's CRC32C is 1, the entry format 2 gives "discarded": it is
    // rewritten escaped, reads back its data, and reports what a format-2
    // store reports for the same data.
    let sums = store.block_checksums(0, SIZE as u64).unwrap();
    assert_eq!(sums[1], entry::written(1));
    assert_ne!(sums[1], DISCARDED);
    assert_eq!(sums[0], crc32c::crc32c(&pattern(1, B)));
    assert_eq!(sums[12], zero_block_crc(), "unmapped in format 1");
    assert_eq!(sums[50], zero_block_crc(), "never written");
    if crashed {
        assert_eq!(sums[200], entry::written(1));
    }
    // New writes and discards in the upgraded store.
    store.write(30 * BLOCK, &block_with_crc(7, 1)).unwrap();
    store.unmap(0, BLOCK).unwrap();
    store.close().unwrap();
    assert_eq!(recorded_format(dir.path()), FORMAT_VERSION);

    let store = ReplicaStore::open(dir.path()).unwrap();
    assert!(store.meta().clean_shutdown);
    let mut want = want;
    want[30 * B..31 * B].copy_from_slice(&block_with_crc(7, 1));
    want[..B].fill(0);
    let got = store.read(0, SIZE as u64).unwrap();
    assert!(
        got[..] == want[..],
        "{name}: reads as written after a reopen"
    );
    store.close().unwrap();
}

#[test]
fn a_clean_format_1_directory_opens_upgraded_and_serves_its_data() {
    upgrade_and_check("clean", false);
}

#[test]
fn a_crashed_format_1_directory_is_recovered_then_upgraded() {
    upgrade_and_check("crashed", true);
}

#[test]
fn a_format_2_store_escapes_crcs_that_look_like_states() {
    let dir = tempfile::tempdir().unwrap();
    let store = ReplicaStore::create(dir.path(), super::params(SIZE as u64, 65536)).unwrap();
    let one = block_with_crc(8, 1);
    let zero = block_with_crc(9, 0);
    store.write(0, &one).unwrap();
    store.write(BLOCK, &zero).unwrap();
    let sums = store.block_checksums(0, 3 * BLOCK).unwrap();
    assert_eq!(sums[0], entry::written(1));
    assert_eq!(sums[1], entry::written(0));
    assert_eq!(sums[2], zero_block_crc());
    assert!(store.read(0, BLOCK).unwrap()[..] == one[..]);
    assert!(store.read(BLOCK, BLOCK).unwrap()[..] == zero[..]);
    store.close().unwrap();
}

#[test]
fn a_format_newer_than_this_build_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    ReplicaStore::create(dir.path(), super::params(SIZE as u64, 65536))
        .unwrap()
        .close()
        .unwrap();
    {
        let (db, _, _) = MetaDb::open(dir.path()).unwrap();
        db.put_value("format", &(FORMAT_VERSION + 1)).unwrap();
    }
    let err = ReplicaStore::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("unsupported format version"), "{err}");
}
