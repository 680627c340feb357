//! The replica store's hot path: 4 KiB and 256 KiB writes and reads (CRC32C
//! per block, striped locks, pwrite/pread into the page cache), and the
//! checksum itself.

use corral_store::{CreateParams, ReplicaStore};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn store(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = ReplicaStore::create(
        &dir.path().join("r"),
        CreateParams {
            volume: "bench".into(),
            size: 256 << 20,
            block_size: 512,
            chunk_size: 256 << 10,
            instance_id: "bench".into(),
        },
    )
    .unwrap();
    let mut g = c.benchmark_group("store");
    for size in [4096usize, 256 << 10] {
        let data = vec![0x5au8; size];
        g.throughput(Throughput::Bytes(size as u64));
        let mut at = 0u64;
        g.bench_function(format!("write {size}"), |b| {
            b.iter(|| {
                store.write(at, &data).unwrap();
                at = (at + size as u64) % (64 << 20);
            })
        });
        g.bench_function(format!("read {size}"), |b| {
            b.iter(|| {
                let out = store.read(at, size as u64).unwrap();
                at = (at + size as u64) % (64 << 20);
                out
            })
        });
    }
    g.throughput(Throughput::Bytes(512));
    g.bench_function("write 512 unaligned (read-modify-write)", |b| {
        let data = vec![1u8; 512];
        let mut at = 512u64;
        b.iter(|| {
            store.write(at, &data).unwrap();
            at = (at + 4096) % (64 << 20);
        })
    });
    g.finish();

    let mut g = c.benchmark_group("crc32c");
    let block = vec![0xa5u8; 4096];
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("4 KiB block", |b| b.iter(|| crc32c::crc32c(&block)));
    g.finish();
}

criterion_group!(benches, store);
criterion_main!(benches);
