//! Many threads on one store: no false checksum errors, block writes atomic to readers,
//! flushes racing writes never clear a region with a write in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::small_store;
use crate::{BLOCK, ReplicaStore};

const SIZE: u64 = 512 * 1024;

/// A tiny deterministic generator (xorshift), so the test needs no extra dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn concurrent_writers_readers_and_flushers() {
    let tmp = tempfile::tempdir().unwrap();
    // Small chunks and regions so that stripes and regions are shared and crossed.
    let store = Arc::new(small_store(tmp.path(), SIZE, 4096, 16 * 1024));
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    // Aligned writers: every write fills whole blocks with one byte value, so every block
    // a reader sees must be uniform.
    for t in 0..3u64 {
        let s = store.clone();
        handles.push(std::thread::spawn(move || {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t + 1));
            for i in 0..400u64 {
                let blocks = 1 + rng.below(8);
                let first = rng.below(SIZE / 2 / BLOCK - blocks);
                let v = (1 + (t * 50 + i) % 250) as u8;
                let data = vec![v; (blocks * BLOCK) as usize];
                if rng.below(10) == 0 {
                    s.unmap(first * BLOCK, blocks * BLOCK).unwrap();
                } else {
                    s.write(first * BLOCK, &data).unwrap();
                }
            }
        }));
    }
    // An unaligned writer in the upper half.
    {
        let s = store.clone();
        handles.push(std::thread::spawn(move || {
            let mut rng = Rng(12345);
            for i in 0..400u64 {
                let off = SIZE / 2 + rng.below(SIZE / 2 - 20_000);
                let len = 1 + rng.below(19_999) as usize;
                s.write(off, &vec![(i % 251) as u8; len]).unwrap();
                if i % 7 == 0 {
                    s.write_zeroes(off, rng.below(10_000)).unwrap();
                }
            }
        }));
    }
    // Readers.
    let mut readers = Vec::new();
    for t in 0..2u64 {
        let s = store.clone();
        let stop = stop.clone();
        readers.push(std::thread::spawn(move || {
            let mut rng = Rng(777 + t);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let off = rng.below(SIZE - 40_000);
                let len = 1 + rng.below(40_000);
                let got = s.read(off, len).unwrap();
                if off + len <= SIZE / 2 && off.is_multiple_of(BLOCK) {
                    for block in got.chunks(BLOCK as usize) {
                        assert!(block.iter().all(|&b| b == block[0]), "torn block read");
                    }
                }
                s.block_checksums(0, SIZE).unwrap();
                n += 1;
            }
            n
        }));
    }
    // A flusher.
    {
        let s = store.clone();
        let stop = stop.clone();
        readers.push(std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                s.flush().unwrap();
                n += 1;
            }
            n
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
    let store = Arc::try_unwrap(store).unwrap();
    let before = store.read(0, SIZE).unwrap();
    store.crash();
    let store = ReplicaStore::open(tmp.path()).unwrap();
    assert_eq!(store.read(0, SIZE).unwrap(), before);
    store.close().unwrap();
}
