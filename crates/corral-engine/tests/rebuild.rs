//! Rebuild, stale-replica timeout and repair on read, over real replica
//! daemons (in-process gRPC servers on 127.0.0.1) with the supervisor
//! running as it does in the engine.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use corral_block::BlockDevice;
use corral_engine::Volume;
use corral_engine::replica_set::Mode;

mod common;
use common::{TestReplica, config, start};

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

async fn assert_identical(volume: &Volume) {
    let report = volume.verify().await.unwrap();
    assert_eq!(report.replicas.len(), 3);
    assert!(report.differences.is_empty(), "{:?}", report.differences);
}

/// The last rebuild into `addr`, once it has ended: the copier records its
/// outcome just after it turns the replica RW, so a caller that saw the
/// replica RW may still find it running for a moment.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_replica_is_caught_up_with_only_what_it_missed() {
    let mut reps = vec![
        TestReplica::start().await,
        TestReplica::start().await,
        TestReplica::start().await,
    ];
    let (volume, _stop) = start(&config(&reps)).await;
    // Fill the volume, then lose replica 2.
    volume
        .write(0, Bytes::from(vec![1u8; 8 << 20]), false)
        .await
        .unwrap();
    reps[2].stop().await;
    // Two writes while it is away: 3 chunks' worth, one of them unaligned.
    volume
        .write(64 << 10, Bytes::from(vec![2u8; 128 << 10]), false)
        .await
        .unwrap();
    volume
        .write((1 << 20) + 100, Bytes::from(vec![3u8; 1000]), false)
        .await
        .unwrap();
    assert_eq!(volume.replica_set().status()[2].mode, Mode::Err);
    reps[2].restart().await;
    wait_all_rw(&volume, Duration::from_secs(30)).await;

    let r = last_rebuild(&volume, &reps[2].addr).await;
    assert_eq!(r.kind, "partial");
    assert_eq!(r.state, "done");
    // Only the chunks written while away were walked (3 chunks, plus the
    // write-intent regions the replica itself had dirty — none: it stopped cleanly).
    assert_eq!(r.total_bytes, 3 * (64 << 10), "{r:?}");
    assert!(
        r.copied_bytes <= r.total_bytes && r.copied_bytes >= 128 << 10,
        "{r:?}"
    );
    assert_identical(&volume).await;
    let back = volume.read(64 << 10, 4096).await.unwrap();
    assert!(back.iter().all(|b| *b == 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_stale_timeout_or_wiped_a_replica_is_rebuilt_in_full() {
    let mut reps = vec![
        TestReplica::start().await,
        TestReplica::start().await,
        TestReplica::start().await,
    ];
    let mut cfg = config(&reps);
    cfg.stale_replica_timeout = Duration::from_millis(300);
    let (volume, _stop) = start(&cfg).await;
    volume
        .write(0, Bytes::from(vec![7u8; 4 << 20]), false)
        .await
        .unwrap();

    // Away longer than the stale timeout: every chunk is walked.
    reps[1].stop().await;
    volume
        .write(0, Bytes::from(vec![8u8; 4096]), false)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    reps[1].restart().await;
    wait_all_rw(&volume, Duration::from_secs(30)).await;
    let r = last_rebuild(&volume, &reps[1].addr).await;
    assert_eq!(r.kind, "full", "{r:?}");
    assert_eq!(r.total_bytes, 8 << 20);
    // Identical chunks are compared by checksum and not sent.
    assert!(r.copied_bytes < 1 << 20, "{r:?}");
    assert!(r.skipped_bytes > 7 << 20, "{r:?}");
    assert_identical(&volume).await;

    // Its disk wiped: a new replica instance, rebuilt in full with the data.
    reps[0].wipe().await;
    // The engine notices on its next ping or write.
    let _ = volume
        .write(4096, Bytes::from(vec![9u8; 4096]), false)
        .await;
    wait_all_rw(&volume, Duration::from_secs(30)).await;
    let r = last_rebuild(&volume, &reps[0].addr).await;
    assert_eq!(r.kind, "full", "{r:?}");
    // A new replica is empty: the 4 MiB written are sent, the 4 MiB never
    // written are not.
    assert_eq!(r.copied_bytes, 4 << 20, "the data was copied: {r:?}");
    assert_eq!(r.skipped_bytes, 4 << 20, "{r:?}");
    assert_eq!(r.done_bytes, 8 << 20, "{r:?}");
    assert_identical(&volume).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_a_rebuild_are_never_overwritten_by_the_copier() {
    let mut reps = vec![
        TestReplica::start().await,
        TestReplica::start().await,
        TestReplica::start().await,
    ];
    let mut cfg = config(&reps);
    cfg.stale_replica_timeout = Duration::from_millis(1);
    cfg.rebuild_concurrency = 2;
    // Slow the copier down so that writes overlap it.
    cfg.rebuild_bandwidth = Some(4 << 20);
    let (volume, _stop) = start(&cfg).await;
    reps[2].wipe().await;
    let _ = volume
        .write(0, Bytes::from(vec![1u8; 8 << 20]), false)
        .await;
    // While it rebuilds, eight writers put unaligned writes all over the volume.
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let volume = Arc::clone(&volume);
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(30);
                let mut round = 0u64;
                while volume.replica_set().rw_count() < 3 {
                    assert!(Instant::now() < deadline, "rebuild did not finish");
                    let offset = (w * 1_000_003 + round * 77_777) % ((8 << 20) - 10_000);
                    let byte = ((w * 31 + round) % 250) as u8 + 2;
                    volume
                        .write(offset, Bytes::from(vec![byte; 9_000]), false)
                        .await
                        .unwrap();
                    round += 1;
                }
                round
            })
        })
        .collect();
    let mut rounds = 0;
    for w in writers {
        rounds += w.await.unwrap();
    }
    assert!(rounds > 100, "writes overlapped the rebuild ({rounds})");
    assert_identical(&volume).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_replica_gets_the_written_blocks_while_writes_and_discards_go_on() {
    let mut reps = vec![
        TestReplica::start().await,
        TestReplica::start().await,
        TestReplica::start().await,
    ];
    let mut cfg = config(&reps);
    cfg.stale_replica_timeout = Duration::from_millis(1);
    // Groups of four chunks, two groups in flight, slowed down so that the
    // writes below overlap the copier.
    cfg.rebuild_concurrency = 8;
    cfg.rebuild_bandwidth = Some(1 << 20);
    let (volume, _stop) = start(&cfg).await;
    reps[2].wipe().await;
    // Every other 4 KiB block of the first half holds data; the rest of the
    // volume was never written (the copier skips it on a new replica).
    for block in (0..(4u64 << 20) / 4096).step_by(2) {
        let _ = volume
            .write(block * 4096, Bytes::from(vec![1u8; 4096]), false)
            .await;
    }
    // While it rebuilds: unaligned writes all over the volume, some of them
    // zeroes, and unaligned discards.
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let volume = Arc::clone(&volume);
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(30);
                let mut round = 0u64;
                while volume.replica_set().rw_count() < 3 {
                    assert!(Instant::now() < deadline, "rebuild did not finish");
                    let offset = (w * 1_000_003 + round * 77_777) % ((8 << 20) - 10_000);
                    match (w + round) % 4 {
                        0 => volume.unmap(offset, 9_000).await.unwrap(),
                        1 => volume
                            .write(offset, Bytes::from(vec![0u8; 9_000]), false)
                            .await
                            .unwrap(),
                        _ => {
                            let byte = ((w * 31 + round) % 250) as u8 + 2;
                            volume
                                .write(offset, Bytes::from(vec![byte; 9_000]), false)
                                .await
                                .unwrap()
                        }
                    }
                    round += 1;
                }
                round
            })
        })
        .collect();
    let mut rounds = 0;
    for w in writers {
        rounds += w.await.unwrap();
    }
    assert!(rounds > 100, "writes overlapped the rebuild ({rounds})");
    let r = last_rebuild(&volume, &reps[2].addr).await;
    assert_eq!(r.kind, "full", "{r:?}");
    assert_eq!(r.done_bytes, 8 << 20, "{r:?}");
    assert_eq!(r.copied_bytes + r.skipped_bytes, 8 << 20, "{r:?}");
    assert!(
        r.skipped_bytes >= 2 << 20,
        "unwritten blocks were sent: {r:?}"
    );
    assert_identical(&volume).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_block_is_read_from_another_replica_and_repaired() {
    let reps = vec![
        TestReplica::start().await,
        TestReplica::start().await,
        TestReplica::start().await,
    ];
    let (volume, _stop) = start(&config(&reps)).await;
    volume
        .write(0, Bytes::from(vec![5u8; 1 << 20]), true)
        .await
        .unwrap();
    // Flip a byte of block 3 in replica 0's data file behind its back.
    let head = reps[0].dir().join("vol").join("head.img");
    let f = std::fs::OpenOptions::new().write(true).open(&head).unwrap();
    f.write_all_at(&[0xff], 3 * 4096 + 17).unwrap();
    drop(f);
    // Read it through every replica in turn (reads rotate round robin).
    for _ in 0..6 {
        let data = volume.read(0, 64 << 10).await.unwrap();
        assert!(
            data.iter().all(|b| *b == 5),
            "the client never sees the bad copy"
        );
    }
    assert_eq!(volume.repaired_blocks(), 1);
    assert_eq!(
        volume.replica_set().rw_count(),
        3,
        "a checksum error does not fail the replica"
    );
    assert_identical(&volume).await;
}
