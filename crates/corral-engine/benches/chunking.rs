//! Splitting requests at chunk boundaries and the missed-chunk bitmap: both
//! run on every write.

use corral_engine::chunk::{ChunkBitmap, ChunkMap};
use criterion::{Criterion, criterion_group, criterion_main};

fn chunking(c: &mut Criterion) {
    let map = ChunkMap::new(256 << 10).unwrap();
    c.bench_function("split 4 KiB", |b| {
        let mut at = 0u64;
        b.iter(|| {
            at = (at + 4096 * 17) % (1 << 40);
            map.split(at, 4096).count()
        })
    });
    c.bench_function("split 1 MiB unaligned", |b| {
        b.iter(|| map.split(12_345, 1 << 20).count())
    });
    c.bench_function("missed-chunk bitmap insert", |b| {
        let mut m = ChunkBitmap::new(4 << 20);
        let mut c = 0u64;
        b.iter(|| {
            c = (c + 7919) % (4 << 20);
            m.insert(c)
        })
    });
}

criterion_group!(benches, chunking);
criterion_main!(benches);
