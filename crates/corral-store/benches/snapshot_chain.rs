//! A long snapshot chain on a large sparse volume: how long snapshots take,
//! how long the store takes to open, how much memory its index costs, and what
//! the chain costs random reads. Not a criterion bench: one run prints a table
//! (docs/benchmarks.md, "Snapshots").
//!
//! `cargo bench -p corral-store --bench snapshot_chain -- [SNAPSHOTS] [SIZE_GIB] [DIR]`
//! (defaults: 1000 snapshots, a 1024 GiB volume, a temporary directory on the
//! disk under `target/`). Between two snapshots it writes 16 random 64 KiB
//! pieces, so each layer holds 1 MiB scattered over the whole volume.

use std::time::{Duration, Instant};

use corral_store::{CreateParams, ReplicaStore};

/// A small deterministic generator (xorshift), so runs are comparable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Random 4 KiB reads for `secs` seconds over blocks written in the chain; IOPS.
fn read_iops(s: &ReplicaStore, spots: &[u64], secs: f64) -> f64 {
    let mut rng = Rng(7);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        let at = spots[(rng.next() % spots.len() as u64) as usize];
        if s.read(at, 4096).is_err() {
            eprintln!("read at {at} failed");
            std::process::exit(1);
        }
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let snapshots: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let size_gib: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1024);
    let base = args
        .get(2)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target")
        });
    let tmp = tempfile::tempdir_in(&base).unwrap_or_else(|e| {
        eprintln!("cannot make a directory under {}: {e}", base.display());
        std::process::exit(1)
    });
    let dir = tmp.path().join("replica");
    let size = size_gib << 30;
    let s = ReplicaStore::create(
        &dir,
        CreateParams {
            volume: "bench".into(),
            size,
            block_size: 4096,
            chunk_size: 1 << 20,
            instance_id: "bench".into(),
        },
    )
    .unwrap_or_else(|e| {
        eprintln!("create: {e}");
        std::process::exit(1)
    });
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let piece = vec![0x5au8; 64 * 1024];
    let mut spots = Vec::new();
    let mut create = Vec::with_capacity(snapshots);
    let mut iops_at = Vec::new();
    for i in 0..snapshots {
        for _ in 0..16 {
            let at = (rng.next() % (size / piece.len() as u64)) * piece.len() as u64;
            s.write(at, &piece).expect("write");
            spots.push(at);
        }
        s.flush().expect("flush");
        let t = Instant::now();
        s.snapshot_create(&format!("s{i}")).expect("snapshot");
        create.push(t.elapsed());
        if matches!(i + 1, 1 | 10 | 100) || i + 1 == snapshots {
            // The first layer's blocks: the same working set at every
            // length, so only the chain's cost changes; then every block
            // written so far (a working set that grows with the chain).
            let first_layer = &spots[..16];
            iops_at.push((
                i + 1,
                read_iops(&s, first_layer, 2.0),
                read_iops(&s, &spots, 2.0),
            ));
        }
    }
    let extents = s.index_extents();
    s.close().expect("close");
    create.sort();
    let before = rss_kib();
    let t = Instant::now();
    let s = ReplicaStore::open(&dir).expect("open");
    let open = t.elapsed();
    let after = rss_kib();
    assert_eq!(s.snapshots().len(), snapshots);
    println!(
        "| volume | snapshots | snapshot create p50 / p99 | open | RSS growth at open | index extents |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| {size_gib} GiB | {snapshots} | {:.1} / {:.1} ms | {:.0} ms | {:.1} MiB | {extents} |",
        pct(&create, 0.5).as_secs_f64() * 1e3,
        pct(&create, 0.99).as_secs_f64() * 1e3,
        open.as_secs_f64() * 1e3,
        after.saturating_sub(before) as f64 / 1024.0,
    );
    println!();
    println!(
        "| snapshots in the chain | 4 KiB reads of the oldest layer's 1 MiB (IOPS) | 4 KiB reads of every written block (IOPS) |"
    );
    println!("| ---: | ---: | ---: |");
    for (n, fixed, all) in iops_at {
        println!("| {n} | {fixed:.0} | {all:.0} |");
    }
    let t = Instant::now();
    for i in 0..snapshots / 2 {
        s.snapshot_delete(&format!("s{}", i * 2)).expect("delete");
    }
    let mut steps = 0u64;
    while s.merge_step().expect("merge") {
        steps += 1;
    }
    println!();
    println!(
        "deleting every other snapshot ({}) and merging them: {:.1} s, {steps} merge steps",
        snapshots / 2,
        t.elapsed().as_secs_f64()
    );
    s.close().expect("close");
}
