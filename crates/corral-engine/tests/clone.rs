//! Clones over real replica daemons (in-process gRPC servers on 127.0.0.1)
//! and real engines talking to each other over their control services:
//!
//! - a clone of a snapshot serves I/O as soon as it opens, while its data is
//!   filled in behind it: every read is the snapshot's data or what the
//!   clone wrote since (whole blocks, partial blocks, discards), never
//!   zeroes where the snapshot has data and never the snapshot over the
//!   clone's own writes; the source moves on meanwhile without the clone
//!   seeing it; once filled the replicas are identical;
//! - a clone of a whole volume takes a snapshot of its source and deletes it
//!   once filled; an engine stopped at any point of the fill and started
//!   again carries on and keeps every acknowledged write; a clone of that
//!   clone holds the same data;
//! - bad requests are refused with a clear error: a clone smaller than its
//!   snapshot, an unknown snapshot, --clone-from on a volume already served.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use corral_block::BlockDevice;
use corral_engine::{
    CloneSource, Engine, EngineConfig, EngineHandle, EngineOptions, Volume, engine::NoFrontends,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod common;
use common::{TestReplica, replicas, wait_until};

const SIZE: u64 = 16 << 20;
const BLOCK: usize = 4096;

fn cfg_for(volume: &str, size: u64, reps: &[TestReplica]) -> EngineConfig {
    let mut cfg = EngineConfig::new(volume, size, reps.iter().map(|r| r.addr.clone()).collect());
    cfg.replica_timeout = Duration::from_secs(5);
    cfg.retry_interval = Duration::from_millis(200);
    cfg.chunk_size = 64 << 10;
    cfg
}

async fn start_engine(cfg: EngineConfig) -> (EngineHandle, Arc<Volume>, String) {
    let control = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = control.local_addr().unwrap().to_string();
    let mut options = EngineOptions::new(cfg, control);
    options.open_timeout = Duration::from_secs(30);
    let engine = Engine::start(options, Box::new(NoFrontends), CancellationToken::new());
    let state = Arc::clone(engine.state());
    wait_until(
        Duration::from_secs(30),
        "the volume to open",
        || state.volume().is_some(),
        || state.waiting_for(),
    )
    .await;
    let volume = Arc::clone(state.volume().unwrap());
    (engine, volume, addr)
}

/// A block that says which generation wrote it and where.
fn pattern(generation: u8, block: usize) -> Vec<u8> {
    let mut b = vec![generation; BLOCK];
    b[..8].copy_from_slice(&(block as u64).to_le_bytes());
    b
}

async fn read_all(volume: &Volume) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIZE as usize);
    for at in (0..SIZE).step_by(1 << 20) {
        out.extend_from_slice(&volume.read(at, 1 << 20).await.expect("read"));
    }
    out
}

/// Fill the source with generation `g` in every other block (the rest
/// never written), so the clone's fill meets holes too.
async fn write_generation(volume: &Volume, g: u8) -> Vec<u8> {
    let mut image = vec![0u8; SIZE as usize];
    for block in (0..SIZE as usize / BLOCK).step_by(2) {
        let data = pattern(g, block);
        image[block * BLOCK..(block + 1) * BLOCK].copy_from_slice(&data);
        volume
            .write((block * BLOCK) as u64, Bytes::from(data), false)
            .await
            .expect("source write");
    }
    image
}

async fn wait_filled(volume: &Volume) {
    wait_until(
        Duration::from_secs(60),
        "the clone to be filled",
        || volume.clone_status().is_some_and(|s| s.done),
        || format!("{:?}", volume.clone_status()),
    )
    .await;
}

async fn assert_replicas_identical(volume: &Volume) {
    let report = volume.verify().await.expect("verify");
    assert_eq!(report.replicas.len(), 3, "{report:?}");
    assert!(report.differences.is_empty(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_serves_its_snapshot_at_once_and_keeps_its_own_writes() {
    let src_reps = replicas(3).await;
    let (src_engine, src, src_addr) = start_engine(cfg_for("src", SIZE, &src_reps)).await;
    let snap_image = write_generation(&src, 1).await;
    src.replica_set().snapshot_create("golden").await.unwrap();
    // The source moves on: the clone must not see it.
    write_generation(&src, 2).await;

    let clone_reps = replicas(3).await;
    let mut cfg = cfg_for("copy", SIZE, &clone_reps);
    cfg.clone = Some(CloneSource {
        engine: src_addr.clone(),
        snapshot: Some("golden".into()),
    });
    let (engine, clone, _) = start_engine(cfg).await;
    let status = clone.clone_status().expect("a clone");
    assert_eq!(status.snapshot, "golden");
    assert_eq!(status.total_bytes, SIZE);

    // At once, while the fill runs: writes of whole blocks, of 512 bytes
    // inside a block (the rest of the block must stay the snapshot's), a
    // discard; then every byte read back.
    let mut expect = snap_image.clone();
    let chunk = 64 << 10;
    for (i, at) in [0usize, 3 * chunk + 4096, SIZE as usize - chunk, 7 * chunk]
        .into_iter()
        .enumerate()
    {
        let data = vec![0xA0 + i as u8; BLOCK];
        expect[at..at + BLOCK].copy_from_slice(&data);
        clone
            .write(at as u64, Bytes::from(data), false)
            .await
            .unwrap();
    }
    for at in [
        5 * chunk + 512,
        9 * chunk + 4096 - 512,
        SIZE as usize - 1024,
    ] {
        let data = vec![0xEE; 512];
        expect[at..at + 512].copy_from_slice(&data);
        clone
            .write(at as u64, Bytes::from(data), false)
            .await
            .unwrap();
    }
    let discard = 11 * chunk + 8192;
    clone.unmap(discard as u64, 8192).await.unwrap();
    expect[discard..discard + 8192].fill(0);
    // A snapshot of a clone still filling would lack what is filled later.
    if !clone.clone_status().unwrap().done {
        let control = corral_client::EngineControl::connect(
            &engine.control_addr().unwrap().to_string(),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        if let Err(e) = control.create_snapshot("early").await {
            assert!(e.to_string().contains("still filling"), "{e}");
        }
    }
    let seen = read_all(&clone).await;
    assert!(
        seen == expect,
        "the clone reads differ from the snapshot plus its own writes"
    );

    wait_filled(&clone).await;
    let seen = read_all(&clone).await;
    assert!(seen == expect, "after the fill the clone differs");
    assert_replicas_identical(&clone).await;
    // The source's snapshot was named: the clone leaves it.
    let listed = src.replica_set().snapshot_list().await.unwrap();
    assert!(listed.snapshots.iter().any(|s| s.name == "golden"));

    engine.stop().await.unwrap();
    src_engine.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_of_a_volume_survives_a_restart_and_can_be_cloned_again() {
    let src_reps = replicas(3).await;
    let (src_engine, src, src_addr) = start_engine(cfg_for("src", SIZE, &src_reps)).await;
    let image = write_generation(&src, 7).await;

    // Bad requests first: refused, nothing made.
    let spare = replicas(3).await;
    let mut small = cfg_for("small", SIZE / 2, &spare);
    small.clone = Some(CloneSource {
        engine: src_addr.clone(),
        snapshot: None,
    });
    let err = corral_engine::open::open_volume(&small, None)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("smaller than snapshot"), "{err}");
    let mut unknown = cfg_for("unknown", SIZE, &spare);
    unknown.clone = Some(CloneSource {
        engine: src_addr.clone(),
        snapshot: Some("no-such".into()),
    });
    let err = corral_engine::open::open_volume(&unknown, None)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("no snapshot named"), "{err}");

    // Clone the whole volume; stop its engine at once, wherever the fill is.
    let clone_reps = replicas(3).await;
    let mut cfg = cfg_for("copy", SIZE, &clone_reps);
    cfg.clone = Some(CloneSource {
        engine: src_addr.clone(),
        snapshot: None,
    });
    let (engine, clone, _) = start_engine(cfg.clone()).await;
    let taken = src.replica_set().snapshot_list().await.unwrap();
    assert!(
        taken.snapshots.iter().any(|s| s.name == "clone-copy"),
        "{taken:?}"
    );
    let mut expect = image.clone();
    let own = vec![0x5A; BLOCK];
    expect[BLOCK * 3..BLOCK * 4].copy_from_slice(&own);
    clone
        .write(3 * BLOCK as u64, Bytes::from(own), false)
        .await
        .unwrap();
    clone.flush().await.unwrap();
    drop(clone);
    engine.stop().await.unwrap();

    // The source moves on after the clone began: the clone keeps the point
    // in time it was made at.
    write_generation(&src, 8).await;

    // The same engine again (the flag again, as a node daemon would).
    let (engine, clone, clone_addr) = start_engine(cfg.clone()).await;
    assert!(read_all(&clone).await == expect, "after the restart");
    wait_filled(&clone).await;
    assert!(read_all(&clone).await == expect, "once filled");
    assert_replicas_identical(&clone).await;
    // The snapshot taken for the clone goes once the clone is filled.
    let mut gone = false;
    for _ in 0..200 {
        let listed = src.replica_set().snapshot_list().await.unwrap();
        if listed.snapshots.iter().all(|s| s.name != "clone-copy") {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        gone,
        "the snapshot taken for the clone is still listed 20 s after the fill"
    );

    // --clone-from on a volume that has been served: refused.
    let mut again = cfg_for("src", SIZE, &src_reps);
    again.clone = Some(CloneSource {
        engine: clone_addr.clone(),
        snapshot: None,
    });
    src_engine.stop().await.unwrap();
    let err = corral_engine::open::open_volume(&again, None)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("not a clone"), "{err}");

    // A clone of the clone (its source engine stopped: the clone needs it no more).
    let second_reps = replicas(3).await;
    let mut cfg2 = cfg_for("copy2", SIZE, &second_reps);
    cfg2.clone = Some(CloneSource {
        engine: clone_addr.clone(),
        snapshot: None,
    });
    let (engine2, clone2, _) = start_engine(cfg2).await;
    assert!(read_all(&clone2).await == expect, "the clone of the clone");
    wait_filled(&clone2).await;
    assert_replicas_identical(&clone2).await;
    engine2.stop().await.unwrap();
    engine.stop().await.unwrap();
}
