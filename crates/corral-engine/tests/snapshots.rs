//! Snapshots over real replica daemons (in-process gRPC servers on
//! 127.0.0.1): a snapshot taken while a writer runs holds, on every replica,
//! exactly a prefix of the writer's acknowledged writes — the same prefix on
//! each, so the replicas took it at one point of the write stream; deleting
//! it merges it away on every replica and leaves the volume as it was; bad
//! names and unknown snapshots are refused; revert gives a snapshot back;
//! 300 snapshots created and deleted in random order between writes and
//! discards keep their data on every replica.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use corral_block::BlockDevice;
use corral_client::ReplicaControl;
use corral_engine::replica_set::snapshot::SnapshotError;

mod common;
use common::{config, replicas, start};

const SIZE: u64 = 8 << 20;
const BLOCK: u64 = 4096;
/// Blocks the writer writes, one after another.
const WRITES: usize = 1500;

/// Write `i` puts this block at block `i` (each block says which write it is).
fn block_of(i: usize) -> Bytes {
    let mut b = vec![0u8; BLOCK as usize];
    b[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    b[8..].fill((i % 251) as u8 + 1);
    Bytes::from(b)
}

/// How many leading writes a snapshot image holds, checking that it holds
/// exactly writes `0..n` and nothing after.
fn prefix_len(image: &[u8]) -> usize {
    let n = (0..WRITES)
        .take_while(|&i| image[i * BLOCK as usize..(i + 1) * BLOCK as usize] == block_of(i)[..])
        .count();
    assert!(
        image[n * BLOCK as usize..].iter().all(|&b| b == 0),
        "the snapshot holds write {n}'s successors but not write {n}: not a prefix"
    );
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_under_writes_is_one_prefix_on_every_replica_and_deletes_cleanly() {
    let mut reps = replicas(3).await;
    let cfg = config(&reps);
    let (volume, stop) = start(&cfg).await;
    let set = Arc::clone(volume.replica_set());

    // Bad names and unknown snapshots: refused, nothing changes.
    for bad in ["", "-x", "a/b", &"n".repeat(65)] {
        let err = set.snapshot_create(bad).await.unwrap_err();
        assert!(matches!(err, SnapshotError::BadName(_)), "{bad:?}: {err}");
    }
    let err = set.snapshot_delete("nope").await.unwrap_err();
    assert!(matches!(err, SnapshotError::NotFound { .. }), "{err}");
    assert!(set.snapshot_list().await.unwrap().snapshots.is_empty());

    // A writer fills blocks in order while the snapshot is taken.
    let acked = Arc::new(AtomicUsize::new(0));
    let writer = {
        let volume = Arc::clone(&volume);
        let acked = Arc::clone(&acked);
        tokio::spawn(async move {
            for i in 0..WRITES {
                volume
                    .write(i as u64 * BLOCK, block_of(i), false)
                    .await
                    .expect("write");
                acked.store(i + 1, Ordering::SeqCst);
            }
        })
    };
    common::wait_until(
        Duration::from_secs(30),
        "the writer to get going",
        || acked.load(Ordering::SeqCst) >= 200,
        || format!("{} acked", acked.load(Ordering::SeqCst)),
    )
    .await;
    let before = acked.load(Ordering::SeqCst);
    let report = set.snapshot_create("mid-write").await.unwrap();
    let after = acked.load(Ordering::SeqCst);
    assert_eq!(report.done.len(), 3, "{report:?}");
    assert!(report.failed.is_empty(), "{report:?}");
    // Again: idempotent.
    let again = set.snapshot_create("mid-write").await.unwrap();
    assert_eq!(again.snapshot, report.snapshot);
    tokio::time::timeout(Duration::from_secs(60), writer)
        .await
        .expect("the writer ends")
        .expect("writer task");
    let listed = set.snapshot_list().await.unwrap();
    assert_eq!(listed.snapshots.len(), 1);
    assert_eq!(listed.snapshots[0].name, "mid-write");
    assert_eq!(listed.snapshots[0].size, SIZE);
    assert_eq!(listed.layers.len(), 2, "the snapshot and the head");
    let dropped = set.snapshot_create("second").await.unwrap();
    assert_eq!(dropped.done.len(), 3);
    set.snapshot_delete("second").await.unwrap();
    for r in &reps {
        wait_merged(&r.addr).await;
    }

    // Stop everything and look into each replica's store.
    drop(stop);
    drop(volume);
    drop(set);
    let mut prefixes = Vec::new();
    for r in reps.iter_mut() {
        r.stop().await;
        // The daemon's last references drop as its tasks end.
        let mut store = None;
        for _ in 0..100 {
            match corral_store::ReplicaStore::open(&r.data_dir().join("vol")) {
                Ok(s) => {
                    store = Some(s);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let store = store.expect("the stopped daemon's store opens within 5 s");
        let image = store.read_snapshot("mid-write", 0, SIZE).unwrap();
        prefixes.push(prefix_len(&image));
        // The volume itself holds every write.
        let head = store.read(0, SIZE).unwrap();
        assert_eq!(prefix_len(&head), WRITES);
        store.close().unwrap();
    }
    assert!(
        prefixes.iter().all(|&p| p == prefixes[0]),
        "the replicas took the snapshot at different points: {prefixes:?}"
    );
    let p = prefixes[0];
    assert!(
        (before..=after + 1).contains(&p),
        "the snapshot holds {p} writes; {before} were acknowledged before it was asked for, {after} when it returned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_snapshot_is_merged_away_on_every_replica() {
    let reps = replicas(3).await;
    let cfg = config(&reps);
    let (volume, _stop) = start(&cfg).await;
    let set = Arc::clone(volume.replica_set());
    for i in 0..64 {
        volume
            .write(i * BLOCK, block_of(i as usize), false)
            .await
            .unwrap();
    }
    set.snapshot_create("old").await.unwrap();
    for i in 32..96 {
        volume
            .write(i * BLOCK, block_of(i as usize + 1000), false)
            .await
            .unwrap();
    }
    set.snapshot_delete("old").await.unwrap();
    // Deleted twice: the second finds it gone everywhere.
    assert!(matches!(
        set.snapshot_delete("old").await,
        Err(SnapshotError::NotFound { .. })
    ));
    for r in &reps {
        wait_merged(&r.addr).await;
        let control = ReplicaControl::connect(&r.addr, Duration::from_secs(5))
            .await
            .unwrap();
        let listed = control.list_snapshots("vol").await.unwrap();
        assert_eq!(listed.layers.len(), 1, "{}: only the head is left", r.addr);
    }
    let got = volume.read(0, (96 * BLOCK) as u32).await.unwrap();
    for i in 0..96usize {
        let want = if i < 32 {
            block_of(i)
        } else {
            block_of(i + 1000)
        };
        assert_eq!(
            &got[i * BLOCK as usize..(i + 1) * BLOCK as usize],
            &want[..],
            "block {i} after the merge"
        );
    }
}

/// Waits (at most 15 s) until the replica at `addr` has no merge pending.
async fn wait_merged(addr: &str) {
    let control = ReplicaControl::connect(addr, Duration::from_secs(5))
        .await
        .unwrap();
    for _ in 0..300 {
        let listed = control.list_snapshots("vol").await.unwrap();
        if !listed.merge_pending {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{addr}: a deleted snapshot is still merging after 15 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_brings_the_snapshot_back_and_keeps_later_snapshots() {
    let reps = replicas(3).await;
    let cfg = config(&reps);
    let (volume, _stop) = start(&cfg).await;
    let set = Arc::clone(volume.replica_set());
    let chunks = volume.chunk_count();
    for i in 0..64 {
        volume
            .write(i * BLOCK, block_of(i as usize), false)
            .await
            .unwrap();
    }
    set.snapshot_create("base").await.unwrap();
    for i in 16..80 {
        volume
            .write(i * BLOCK, block_of(i as usize + 5000), false)
            .await
            .unwrap();
    }
    set.snapshot_create("later").await.unwrap();
    volume.write(0, block_of(9999), false).await.unwrap();

    // Refused while a client is attached, or for an unknown snapshot: nothing changes.
    let err = set.snapshot_revert("base", 1, chunks).await.unwrap_err();
    assert!(matches!(err, SnapshotError::Precondition(_)), "{err}");
    assert!(err.to_string().contains("attached"), "{err}");
    let err = set.snapshot_revert("nope", 0, chunks).await.unwrap_err();
    assert!(matches!(err, SnapshotError::NotFound { .. }), "{err}");
    assert_eq!(
        &volume.read(0, BLOCK as u32).await.unwrap()[..],
        &block_of(9999)[..]
    );

    let report = set.snapshot_revert("base", 0, chunks).await.unwrap();
    assert_eq!(report.done.len(), 3, "{report:?}");
    let got = volume.read(0, (96 * BLOCK) as u32).await.unwrap();
    for i in 0..96usize {
        let block = &got[i * BLOCK as usize..(i + 1) * BLOCK as usize];
        if i < 64 {
            assert_eq!(block, &block_of(i)[..], "block {i} after revert");
        } else {
            assert!(
                block.iter().all(|&b| b == 0),
                "block {i} after revert: written after the snapshot"
            );
        }
    }
    // Both snapshots are still there, and the replicas agree.
    let listed = set.snapshot_list().await.unwrap();
    let names: Vec<_> = listed.snapshots.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["base", "later"]);
    let verify = volume.verify().await.unwrap();
    assert!(verify.differences.is_empty(), "{verify:?}");
    // And the volume takes writes again.
    volume.write(0, block_of(7), false).await.unwrap();
    assert_eq!(
        &volume.read(0, BLOCK as u32).await.unwrap()[..],
        &block_of(7)[..]
    );
}

/// A small deterministic generator (xorshift) for the random story.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_snapshots_created_and_deleted_in_random_order_keep_their_data() {
    const BLOCKS: u64 = 256; // 1 MiB of the volume is written
    let mut reps = replicas(3).await;
    let cfg = config(&reps);
    let (volume, stop) = start(&cfg).await;
    let set = Arc::clone(volume.replica_set());
    let mut model = vec![0u8; (BLOCKS * BLOCK) as usize];
    let mut live: Vec<(String, Vec<u8>)> = Vec::new();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut deleted = 0usize;
    for i in 0..300usize {
        // A few writes (some discards) between snapshots.
        for _ in 0..1 + rng.below(4) {
            let b = rng.below(BLOCKS - 4);
            let n = 1 + rng.below(4);
            if rng.below(8) == 0 {
                volume.unmap(b * BLOCK, n * BLOCK).await.unwrap();
                model[(b * BLOCK) as usize..((b + n) * BLOCK) as usize].fill(0);
            } else {
                let data: Vec<u8> = (0..n * BLOCK)
                    .map(|k| (i as u64 * 31 + k / 64 + b) as u8)
                    .collect();
                volume
                    .write(b * BLOCK, Bytes::from(data.clone()), false)
                    .await
                    .unwrap();
                model[(b * BLOCK) as usize..((b + n) * BLOCK) as usize].copy_from_slice(&data);
            }
        }
        let name = format!("s{i}");
        set.snapshot_create(&name).await.unwrap();
        live.push((name, model.clone()));
        // Now and then delete a random live one (the newest included).
        if rng.below(3) == 0 && !live.is_empty() {
            let k = rng.below(live.len() as u64) as usize;
            let (gone, _) = live.remove(k);
            set.snapshot_delete(&gone).await.unwrap();
            deleted += 1;
        }
    }
    assert!(deleted > 50, "the story deletes a good share ({deleted})");
    // No replica was put out: a create or delete under way is not taken for
    // a chain left different by a cut-short one (the engine's check at
    // start runs while the story does).
    for s in set.status() {
        assert_eq!(
            s.mode,
            corral_engine::replica_set::Mode::Rw,
            "{} left the write set during the story",
            s.address
        );
    }
    for r in &reps {
        wait_merged(&r.addr).await;
    }
    let listed = set.snapshot_list().await.unwrap();
    let names: Vec<&str> = listed.snapshots.iter().map(|s| s.name.as_str()).collect();
    let want: Vec<&str> = live.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, want, "the live snapshots, oldest first");
    let head = volume.read(0, (BLOCKS * BLOCK) as u32).await.unwrap();
    assert!(head[..] == model[..], "the volume after every merge");

    // Every remaining snapshot, on every replica, holds what it held when taken.
    drop(stop);
    drop(volume);
    drop(set);
    for r in reps.iter_mut() {
        r.stop().await;
        let mut store = None;
        for _ in 0..100 {
            match corral_store::ReplicaStore::open(&r.data_dir().join("vol")) {
                Ok(s) => {
                    store = Some(s);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let store = store.expect("the stopped daemon's store opens within 5 s");
        for (name, data) in &live {
            let got = store.read_snapshot(name, 0, BLOCKS * BLOCK).unwrap();
            assert!(got[..] == data[..], "{}: snapshot {name} differs", r.addr);
        }
        store.close().unwrap();
    }
}
