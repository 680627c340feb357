//! Online expansion over real replica daemons (in-process gRPC servers on
//! 127.0.0.1): every replica grows with the volume, one that misses it is
//! grown and caught up when it returns, a restarted engine serves the new
//! size whatever `--size` says, and bad sizes change nothing.

use std::time::Duration;

use bytes::Bytes;
use corral_block::BlockDevice;
use corral_engine::Volume;
use corral_engine::open::open_volume;
use corral_engine::replica_set::Mode;
use corral_engine::replica_set::expand::ExpandError;

mod common;
use common::{config, replicas, start};

const OLD: u64 = 8 << 20;
/// Not a whole number of 64 KiB chunks: the last chunk is partial.
const NEW: u64 = (12 << 20) + 3 * 4096;

fn pattern(offset: u64, len: usize, seed: u8) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| ((offset as usize + i) / 4096) as u8 ^ seed)
            .collect::<Vec<u8>>(),
    )
}

async fn wait_all_rw(volume: &Volume) {
    let set = volume.replica_set();
    common::wait_until(
        Duration::from_secs(20),
        "every replica RW",
        || set.rw_count() == set.total(),
        || format!("{:?}", set.status()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_grows_online_and_a_replica_that_missed_it_catches_up() {
    let mut reps = replicas(3).await;
    let cfg = config(&reps);
    let (volume, stop) = start(&cfg).await;
    volume
        .write(0, pattern(0, OLD as usize, 1), false)
        .await
        .unwrap();
    let generation = volume.replica_set().generation();

    // Bad sizes are refused and change nothing.
    for (bad, what) in [
        (OLD - 4096, "shrink"),
        (0, "shrink"),
        (OLD + 512, "unaligned"),
        (u64::MAX - 4095, "too large"),
    ] {
        let err = volume.expand(bad).await.unwrap_err();
        assert!(err.is_invalid(), "{what}: {err}");
        match what {
            "shrink" => assert!(matches!(err, ExpandError::Shrink { .. }), "{err}"),
            "unaligned" => assert!(matches!(err, ExpandError::Unaligned { .. }), "{err}"),
            _ => assert!(matches!(err, ExpandError::TooLarge { .. }), "{err}"),
        }
        assert_eq!(volume.size(), OLD);
        assert_eq!(volume.replica_set().generation(), generation);
    }
    // The same size: nothing to do.
    let same = volume.expand(OLD).await.unwrap();
    assert_eq!((same.old_size, same.new_size), (OLD, OLD));
    assert_eq!(volume.replica_set().generation(), generation);

    // Replica 2's daemon is down when the volume grows: it cannot grow,
    // and goes to ERR like a replica that failed a write (unless its
    // broken streams moved it there first).
    reps[2].stop().await;
    let report = volume.expand(NEW).await.unwrap();
    assert_eq!((report.old_size, report.new_size), (OLD, NEW));
    assert_eq!(report.grown.len(), 2, "{report:?}");
    assert!(report.failed.len() <= 1, "{report:?}");
    assert!(report.generation > generation);
    assert_eq!(volume.size(), NEW);
    let status = volume.replica_set().status();
    assert_eq!(status[2].mode, Mode::Err, "{status:?}");

    // The new space reads as zeroes and takes writes, up to the new end.
    let tail = volume.read(OLD, 4 << 20).await.unwrap();
    assert!(tail.iter().all(|b| *b == 0));
    volume
        .write(
            OLD - 8192,
            pattern(OLD - 8192, (NEW - OLD + 8192) as usize, 2),
            false,
        )
        .await
        .unwrap();
    assert!(
        volume
            .write(NEW, Bytes::from(vec![1u8; 4096]), false)
            .await
            .is_err()
    );
    volume.flush().await.unwrap();

    // It returns: grown to the new size, then caught up.
    reps[2].restart().await;
    wait_all_rw(&volume).await;
    let report = volume.verify().await.unwrap();
    assert_eq!(report.replicas.len(), 3);
    assert!(report.differences.is_empty(), "{:?}", report.differences);
    assert_eq!(report.chunks_compared, NEW.div_ceil(64 << 10));

    // A new engine, given the size the volume was created with, serves the
    // size it has now; one given a larger size than it has is refused.
    drop(stop);
    let reopened = open_volume(&cfg, None).await.unwrap();
    assert_eq!(reopened.size(), NEW);
    let head = reopened.read(0, 8192).await.unwrap();
    assert_eq!(head, pattern(0, 8192, 1));
    let end = reopened
        .read(OLD - 8192, (NEW - OLD + 8192) as u32)
        .await
        .unwrap();
    assert_eq!(end, pattern(OLD - 8192, (NEW - OLD + 8192) as usize, 2));
    let mut larger = cfg.clone();
    larger.size = NEW + (1 << 20);
    let refused = open_volume(&larger, None).await.err().expect("refused");
    assert!(refused.to_string().contains("expand"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expansion_no_rw_replica_can_take_changes_nothing() {
    let mut reps = replicas(1).await;
    let mut cfg = config(&reps);
    cfg.write_policy = corral_engine::WritePolicy::Available;
    let (volume, _stop) = start(&cfg).await;
    let generation = volume.replica_set().generation();
    reps[0].stop().await;
    let err = volume.expand(NEW).await.unwrap_err();
    assert!(!err.is_invalid(), "{err}");
    assert!(err.to_string().contains("keeps its"), "{err}");
    assert_eq!(volume.size(), OLD);
    assert_eq!(volume.replica_set().generation(), generation);
    assert_eq!(volume.replica_set().rw_count(), 1);
}
