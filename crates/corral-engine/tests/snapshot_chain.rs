//! A replica that missed snapshots gets them (issue 11), over real replica
//! daemons (in-process gRPC servers on 127.0.0.1) with the supervisor
//! running: one killed while snapshots are taken and caught up within the
//! stale timeout; one wiped and rebuilt in full on a volume whose chain had
//! snapshots deleted; one being rebuilt while a snapshot is taken. After
//! each, every replica's store is opened and every snapshot's view compared
//! block by block (checksums) across replicas and against what was written.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use corral_block::BlockDevice;
use corral_client::ReplicaControl;
use corral_engine::Volume;
use corral_engine::replica_set::Mode;

mod common;
use common::{TestReplica, config, replicas, start};

const SIZE: u64 = 8 << 20;

/// What the volume should hold: every acknowledged write applied.
struct Model {
    bytes: Vec<u8>,
}

impl Model {
    fn new() -> Self {
        Model {
            bytes: vec![0; SIZE as usize],
        }
    }

    /// Write `len` bytes of a pattern seeded by `seed` at `offset`, through
    /// the engine and into the model.
    async fn write(&mut self, volume: &Volume, offset: u64, len: usize, seed: u64) {
        let data: Vec<u8> = (0..len as u64)
            .map(|i| ((i / 512 + seed * 131 + i % 7) % 251) as u8 + 1)
            .collect();
        volume
            .write(offset, Bytes::from(data.clone()), false)
            .await
            .expect("write");
        self.bytes[offset as usize..offset as usize + len].copy_from_slice(&data);
    }
}

/// Writes scattered over the volume (unaligned, across chunk boundaries).
async fn scatter(volume: &Volume, model: &mut Model, seed: u64, count: u64) {
    for k in 0..count {
        let offset = (seed * 7_919 + k * 611_953) % (SIZE - 200_000);
        let len = 4096 + ((seed + k) * 9_973 % 150_000) as usize;
        model.write(volume, offset, len, seed * 100 + k).await;
    }
}

async fn wait_all_rw(volume: &Volume, limit: Duration) {
    let set = volume.replica_set();
    common::wait_until(
        limit,
        "every replica RW",
        || set.rw_count() == set.total(),
        || {
            format!(
                "{:?}",
                set.status()
                    .iter()
                    .map(|s| (s.address.clone(), s.mode, s.last_error.clone()))
                    .collect::<Vec<_>>()
            )
        },
    )
    .await;
}

/// The last rebuild into `addr`, once it has ended.
async fn last_rebuild(volume: &Volume, addr: &str) -> corral_proto::v1::RebuildStatus {
    let status = || {
        volume
            .replica_set()
            .status()
            .into_iter()
            .find(|s| s.address == addr)
            .and_then(|s| s.rebuild)
            .expect("a rebuild ran")
            .to_pb()
    };
    common::wait_until(
        Duration::from_secs(5),
        "the rebuild to end",
        || status().state != "running",
        || format!("{:?}", status()),
    )
    .await;
    status()
}

/// Every snapshot's view, checksums and head on one replica's store.
struct Contents {
    addr: String,
    names: Vec<String>,
    sums: Vec<Vec<u32>>,
    images: Vec<Vec<u8>>,
    head: Vec<u8>,
}

/// Stop every daemon and read each replica's store.
async fn contents(reps: &mut [TestReplica]) -> Vec<Contents> {
    let mut out = Vec::new();
    for r in reps.iter_mut() {
        r.stop().await;
        let mut store = None;
        // The daemon's last references drop as its tasks end.
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
        let names: Vec<String> = store.snapshots().into_iter().map(|s| s.name).collect();
        let mut sums = Vec::new();
        let mut images = Vec::new();
        for name in &names {
            sums.push(store.snapshot_checksums(name, 0, SIZE).unwrap());
            images.push(store.read_snapshot(name, 0, SIZE).unwrap().to_vec());
        }
        let head = store.read(0, SIZE).unwrap().to_vec();
        store.close().unwrap();
        out.push(Contents {
            addr: r.addr.clone(),
            names,
            sums,
            images,
            head,
        });
    }
    out
}

/// Every replica lists `expected` (name, image) in this order, with the
/// same checksums of each view, and its head holds `head`.
fn assert_chains(all: &[Contents], expected: &[(&str, &[u8])], head: &[u8]) {
    let names: Vec<&str> = expected.iter().map(|(n, _)| *n).collect();
    for c in all {
        assert_eq!(c.names, names, "{}: snapshots", c.addr);
        for (i, (name, image)) in expected.iter().enumerate() {
            assert_eq!(
                c.sums[i], all[0].sums[i],
                "{}: snapshot {name}'s block checksums differ from {}'s",
                c.addr, all[0].addr
            );
            if let Some(b) = (0..SIZE as usize).find(|&b| c.images[i][b] != image[b]) {
                panic!(
                    "{}: snapshot {name} differs from what was written at byte {b}",
                    c.addr
                );
            }
        }
        if let Some(b) = (0..SIZE as usize).find(|&b| c.head[b] != head[b]) {
            panic!(
                "{}: the volume differs from what was written at byte {b}",
                c.addr
            );
        }
    }
}

/// Waits (at most 15 s) until the replica at `addr` has no merge pending.
async fn wait_merged(addr: &str) {
    let control = ReplicaControl::connect(addr, Duration::from_secs(5))
        .await
        .unwrap();
    for _ in 0..300 {
        if !control.list_snapshots("vol").await.unwrap().merge_pending {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{addr}: the merge did not finish within 15 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_down_during_snapshots_gets_them_when_caught_up() {
    let mut reps = replicas(3).await;
    let cfg = config(&reps);
    let (volume, stop) = start(&cfg).await;
    let set = Arc::clone(volume.replica_set());
    let mut model = Model::new();
    scatter(&volume, &mut model, 1, 40).await;
    set.snapshot_create("before").await.unwrap();
    let before = model.bytes.clone();
    scatter(&volume, &mut model, 5, 4).await;
    set.snapshot_create("gone").await.unwrap();

    // Replica 2 is killed; a snapshot is taken without it (it fails there,
    // or the supervisor's ping noticed first: ERR either way), writes go on, a snapshot it holds is deleted,
    // another snapshot, more writes.
    reps[2].stop().await;
    let report = set.snapshot_create("while-down").await.unwrap();
    assert_eq!(report.done.len(), 2, "{report:?}");
    assert_eq!(set.status()[2].mode, Mode::Err);
    let while_down = model.bytes.clone();
    scatter(&volume, &mut model, 2, 4).await;
    set.snapshot_delete("gone").await.unwrap();
    scatter(&volume, &mut model, 3, 4).await;
    set.snapshot_create("also-down").await.unwrap();
    let also_down = model.bytes.clone();
    scatter(&volume, &mut model, 4, 4).await;
    assert_eq!(set.status()[2].mode, Mode::Err);

    // It returns within the stale timeout: caught up, not rebuilt in full.
    reps[2].restart().await;
    wait_all_rw(&volume, Duration::from_secs(30)).await;
    let r = last_rebuild(&volume, &reps[2].addr).await;
    assert_eq!(r.kind, "partial", "{r:?}");
    assert_eq!(r.state, "done", "{r:?}");
    assert!(
        r.total_bytes < SIZE,
        "only what it missed was walked: {r:?}"
    );
    // Reads through the engine, from whichever replica, see the newest data.
    let got = volume.read(0, SIZE as u32).await.unwrap();
    assert!(
        got[..] == model.bytes[..],
        "the volume reads what was written"
    );
    // A snapshot taken now lands on all three.
    let report = set.snapshot_create("after").await.unwrap();
    assert_eq!(report.done.len(), 3, "{report:?}");

    drop(stop);
    drop(set);
    drop(volume);
    let all = contents(&mut reps).await;
    assert_chains(
        &all,
        &[
            ("before", &before),
            ("while-down", &while_down),
            ("also-down", &also_down),
            ("after", &model.bytes),
        ],
        &model.bytes,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_rebuilt_from_scratch_gets_every_remaining_snapshot() {
    let mut reps = replicas(3).await;
    let mut cfg = config(&reps);
    cfg.stale_replica_timeout = Duration::from_millis(1);
    // Paced, so that the replay is seen in the rebuild status below.
    cfg.rebuild_bandwidth = Some(8 << 20);
    let (volume, stop) = start(&cfg).await;
    let set = Arc::clone(volume.replica_set());
    let mut model = Model::new();
    let mut kept: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..5u64 {
        scatter(&volume, &mut model, 10 + i, 15).await;
        let name = format!("s{i}");
        set.snapshot_create(&name).await.unwrap();
        kept.push((name, model.bytes.clone()));
    }
    // Two deleted, the newest included; a discard over part of the volume.
    set.snapshot_delete("s1").await.unwrap();
    set.snapshot_delete("s4").await.unwrap();
    kept.retain(|(n, _)| n != "s1" && n != "s4");
    volume.unmap(1 << 20, 512 << 10).await.unwrap();
    model.bytes[1 << 20..(1 << 20) + (512 << 10)].fill(0);
    scatter(&volume, &mut model, 20, 10).await;

    // Replica 2 loses everything: a new, empty replica at its address.
    let old = set.instance_of(set.status()[2].id).unwrap();
    // What an operator's `rebuild-status` shows meanwhile.
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (set, watching) = (Arc::clone(&set), Arc::clone(&watching));
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while watching.load(std::sync::atomic::Ordering::SeqCst) {
                seen.extend(set.replays());
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            seen
        })
    };
    reps[2].wipe().await;
    scatter(&volume, &mut model, 21, 5).await;
    common::wait_until(
        Duration::from_secs(60),
        "the wiped replica rebuilt and RW",
        || {
            let s = &set.status()[2];
            s.mode == Mode::Rw && s.instance_id != old
        },
        || format!("{:?}", set.status()[2].last_error),
    )
    .await;
    watching.store(false, std::sync::atomic::Ordering::SeqCst);
    let seen = watcher.await.unwrap();
    assert!(
        seen.iter().any(|r| r.kind == "snapshot replay"
            && r.address.contains(&reps[2].addr)
            && r.snapshots_total == 3
            && ["s0", "s2", "s3"].contains(&r.snapshot.as_str())),
        "the replay was never shown: {seen:?}"
    );
    assert!(set.replays().is_empty(), "a finished replay is still shown");
    let r = last_rebuild(&volume, &reps[2].addr).await;
    assert_eq!(r.kind, "full", "{r:?}");
    assert_eq!(r.state, "done", "{r:?}");
    scatter(&volume, &mut model, 22, 5).await;

    drop(stop);
    drop(set);
    drop(volume);
    let all = contents(&mut reps).await;
    let expected: Vec<(&str, &[u8])> = kept
        .iter()
        .map(|(n, image)| (n.as_str(), image.as_slice()))
        .collect();
    assert_chains(&all, &expected, &model.bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_taken_during_a_rebuild_reaches_the_rebuilt_replica() {
    let mut reps = replicas(3).await;
    let mut cfg = config(&reps);
    cfg.stale_replica_timeout = Duration::from_millis(1);
    cfg.rebuild_concurrency = 2;
    // Slow enough that the snapshot lands in the middle of the copy.
    cfg.rebuild_bandwidth = Some(2 << 20);
    let (volume, stop) = start(&cfg).await;
    let set = Arc::clone(volume.replica_set());
    let mut model = Model::new();
    model.write(&volume, 0, SIZE as usize / 2, 30).await;
    set.snapshot_create("old").await.unwrap();
    let old = model.bytes.clone();
    scatter(&volume, &mut model, 31, 10).await;

    reps[2].wipe().await;
    // Writes notice it is gone; the supervisor brings it back and rebuilds.
    scatter(&volume, &mut model, 32, 5).await;
    common::wait_until(
        Duration::from_secs(30),
        "the wiped replica to be rebuilding (WO)",
        || set.status()[2].mode == Mode::Wo,
        || format!("{:?}", set.status()[2]),
    )
    .await;
    scatter(&volume, &mut model, 33, 5).await;
    let report = set.snapshot_create("during").await.unwrap();
    let during = model.bytes.clone();
    assert_eq!(
        report.done.len(),
        2,
        "only the RW replicas took it: {report:?}"
    );
    // The replica being rebuilt could not take it consistently: it is out.
    assert_ne!(set.status()[2].mode, Mode::Rw);
    scatter(&volume, &mut model, 34, 10).await;
    wait_all_rw(&volume, Duration::from_secs(90)).await;
    scatter(&volume, &mut model, 35, 5).await;

    drop(stop);
    drop(set);
    drop(volume);
    let all = contents(&mut reps).await;
    assert_chains(&all, &[("old", &old), ("during", &during)], &model.bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_engine_restart_a_returning_replica_has_its_snapshots_compared() {
    let mut reps = replicas(3).await;
    let cfg = config(&reps);
    let mut model = Model::new();
    let (volume, stop) = start(&cfg).await;
    let set = Arc::clone(volume.replica_set());
    scatter(&volume, &mut model, 40, 20).await;
    set.snapshot_create("kept").await.unwrap();
    let kept = model.bytes.clone();
    scatter(&volume, &mut model, 41, 20).await;
    set.snapshot_create("renewed").await.unwrap();
    scatter(&volume, &mut model, 42, 4).await;
    // Replica 2 goes; "renewed" is deleted and taken again over other data.
    reps[2].stop().await;
    scatter(&volume, &mut model, 43, 4).await;
    set.snapshot_delete("renewed").await.unwrap();
    for r in &reps[..2] {
        wait_merged(&r.addr).await;
    }
    scatter(&volume, &mut model, 44, 4).await;
    set.snapshot_create("renewed").await.unwrap();
    let renewed = model.bytes.clone();
    // A new engine, which does not know what replica 2 missed.
    drop(stop);
    drop(set);
    drop(volume);
    let (volume, stop) = start(&cfg).await;
    let set = Arc::clone(volume.replica_set());
    scatter(&volume, &mut model, 45, 4).await;
    reps[2].restart().await;
    wait_all_rw(&volume, Duration::from_secs(30)).await;
    scatter(&volume, &mut model, 46, 4).await;

    drop(stop);
    drop(set);
    drop(volume);
    let all = contents(&mut reps).await;
    assert_chains(
        &all,
        &[("kept", &kept), ("renewed", &renewed)],
        &model.bytes,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_deleted_and_taken_again_while_a_replica_was_away_is_replaced_on_it() {
    let mut reps = replicas(3).await;
    let cfg = config(&reps);
    let (volume, stop) = start(&cfg).await;
    let set = Arc::clone(volume.replica_set());
    let mut model = Model::new();
    scatter(&volume, &mut model, 50, 20).await;
    set.snapshot_create("first").await.unwrap();
    let first = model.bytes.clone();
    scatter(&volume, &mut model, 51, 20).await;
    set.snapshot_create("daily").await.unwrap();
    scatter(&volume, &mut model, 52, 4).await;
    // Replica 2 is killed; the delete fails there (or a ping noticed
    // first): ERR, and noted as having missed the delete.
    reps[2].stop().await;
    let report = set.snapshot_delete("daily").await.unwrap();
    assert_eq!(report.done.len(), 2, "{report:?}");
    assert_eq!(set.status()[2].mode, Mode::Err);
    scatter(&volume, &mut model, 53, 6).await;
    for r in &reps[..2] {
        wait_merged(&r.addr).await;
    }
    // The same name, over newer data, in the same place in the chain.
    set.snapshot_create("daily").await.unwrap();
    let daily = model.bytes.clone();
    scatter(&volume, &mut model, 54, 4).await;
    reps[2].restart().await;
    wait_all_rw(&volume, Duration::from_secs(30)).await;
    let r = last_rebuild(&volume, &reps[2].addr).await;
    assert_eq!(r.kind, "partial", "{r:?}");

    drop(stop);
    drop(set);
    drop(volume);
    let all = contents(&mut reps).await;
    assert_chains(&all, &[("first", &first), ("daily", &daily)], &model.bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_cut_short_by_an_engine_crash_is_made_whole_by_the_next_engine() {
    let mut reps = replicas(3).await;
    let cfg = config(&reps);
    let mut model = Model::new();
    let (volume, stop) = start(&cfg).await;
    let set = Arc::clone(volume.replica_set());
    scatter(&volume, &mut model, 60, 20).await;
    set.snapshot_create("whole").await.unwrap();
    let whole = model.bytes.clone();
    scatter(&volume, &mut model, 61, 20).await;
    drop(stop);
    drop(set);
    drop(volume);
    // An engine without a supervisor (it fences the one above, whose last
    // tick may still run) takes "cut" on two replicas and dies before the
    // third (and before moving it to ERR): the membership names all RW.
    let fencing = corral_engine::open::open_volume(&cfg, None).await.unwrap();
    let epoch = fencing.replica_set().epoch();
    for r in &reps[..2] {
        let control = ReplicaControl::connect(&r.addr, Duration::from_secs(5))
            .await
            .unwrap();
        control.create_snapshot("vol", epoch, "cut").await.unwrap();
    }
    let cut = model.bytes.clone();
    drop(fencing);

    // The next engine finds the third replica's chain short, moves it out
    // and replays the snapshot into it.
    let (volume, stop) = start(&cfg).await;
    let set = Arc::clone(volume.replica_set());
    common::wait_until(
        Duration::from_secs(30),
        "the short chain to be noticed",
        || set.failures() > 0,
        || format!("{:?}", set.status()),
    )
    .await;
    scatter(&volume, &mut model, 62, 6).await;
    wait_all_rw(&volume, Duration::from_secs(30)).await;
    scatter(&volume, &mut model, 63, 4).await;

    drop(stop);
    drop(set);
    drop(volume);
    let all = contents(&mut reps).await;
    assert_chains(&all, &[("whole", &whole), ("cut", &cut)], &model.bytes);
}
