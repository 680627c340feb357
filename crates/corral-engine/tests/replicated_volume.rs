//! The engine over real replica daemons (in-process gRPC servers on
//! 127.0.0.1): fan-out, failover, membership recording, write policy and
//! fencing, exercised through the `BlockDevice` interface.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use corral_block::{BlockDevice, BlockError};
use corral_engine::client::DataOutcome;
use corral_engine::open::open_volume;
use corral_engine::replica_set::Mode;
use corral_engine::{EngineConfig, EngineError, OpenWait, Volume, WritePolicy};
use corral_proto::v1::{self as pb, data_request::Op};
use rand::{Rng, SeedableRng};

mod common;
use common::{TestReplica, replicas};

fn config(reps: &[TestReplica], size: u64) -> EngineConfig {
    let mut cfg = EngineConfig::new("vol", size, reps.iter().map(|r| r.addr.clone()).collect());
    cfg.replica_timeout = Duration::from_secs(3);
    cfg.chunk_size = 64 << 10;
    cfg
}

async fn membership_on(addr: &str) -> pb::Membership {
    corral_client::ReplicaControl::connect(addr, Duration::from_secs(3))
        .await
        .unwrap()
        .get("vol")
        .await
        .unwrap()
        .membership
        .unwrap()
}

/// Read the whole volume from one replica directly, bypassing the engine.
async fn read_from_each(volume: &Volume, len: u64) -> Vec<Vec<u8>> {
    let epoch = volume.replica_set().epoch();
    let mut out = Vec::new();
    for client in volume.rw_clients() {
        let mut data = Vec::new();
        let mut at = 0;
        while at < len {
            let n = (len - at).min(64 << 10);
            let op = Op::Read(pb::ReadOp {
                offset: at,
                length: n as u32,
                ..Default::default()
            });
            match client.call(at >> 16, epoch, op).await.unwrap() {
                DataOutcome::Read(d) => data.extend_from_slice(&d),
                other => panic!("unexpected {other:?}"),
            }
            at += n;
        }
        out.push(data);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unaligned_writes_reach_every_replica_and_read_back() {
    let reps = replicas(3).await;
    let size = 1 << 20;
    let volume = open_volume(&config(&reps, size), None).await.unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for round in 0..60u32 {
        let offset = rng.random_range(0..size - 1);
        let len = rng.random_range(1..=(size - offset).min(200_000));
        let byte = (round % 251) as u8 + 1;
        let data = vec![byte; len as usize];
        volume
            .write(offset, Bytes::from(data.clone()), round % 7 == 0)
            .await
            .unwrap();
        model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
        if round % 10 == 0 {
            let zero_at = rng.random_range(0..size - 8192);
            volume.write_zeroes(zero_at, 8192, false).await.unwrap();
            model[zero_at as usize..zero_at as usize + 8192].fill(0);
        }
    }
    volume.flush().await.unwrap();
    let whole = volume.read(0, size as u32).await.unwrap();
    assert!(
        whole[..] == model[..],
        "the volume reads back what was written"
    );
    let copies = read_from_each(&volume, size).await;
    assert_eq!(copies.len(), 3);
    for copy in copies {
        assert!(copy == model, "every replica holds the same data");
    }
    // Out of range is the client's error, not a replica failure.
    assert!(matches!(
        volume.read(size - 512, 1024).await,
        Err(BlockError::OutOfRange { .. })
    ));
    assert_eq!(volume.replica_set().rw_count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_replica_goes_to_err_and_the_change_is_recorded_first() {
    let mut reps = replicas(3).await;
    let volume = open_volume(&config(&reps, 1 << 20), None).await.unwrap();
    assert_eq!(volume.replica_set().generation().0, 1);
    volume
        .write(0, Bytes::from(vec![1u8; 4096]), false)
        .await
        .unwrap();

    reps[2].stop().await;
    volume
        .write(4096, Bytes::from(vec![2u8; 4096]), false)
        .await
        .expect("the volume keeps serving with two replicas");

    let status = volume.replica_set().status();
    assert_eq!(status[2].mode, Mode::Err);
    assert!(!status[2].last_error.is_empty());
    assert_eq!(volume.replica_set().generation().0, 2);
    // The survivors carry the new record, naming the failed replica ERR.
    for r in &reps[..2] {
        let m = membership_on(&r.addr).await;
        assert_eq!(m.generation, 2);
        assert_eq!(m.members[2].mode, pb::ReplicaMode::Err as i32);
        assert_eq!(m.members[0].mode, pb::ReplicaMode::Rw as i32);
    }
    let back = volume.read(0, 8192).await.unwrap();
    assert!(back[..4096].iter().all(|b| *b == 1) && back[4096..].iter().all(|b| *b == 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_refuses_writes_without_a_majority_but_still_reads() {
    let mut reps = replicas(3).await;
    let cfg = config(&reps, 1 << 20);
    assert_eq!(cfg.write_policy, WritePolicy::Quorum);
    let volume = open_volume(&cfg, None).await.unwrap();
    volume
        .write(0, Bytes::from(vec![9u8; 4096]), false)
        .await
        .unwrap();
    reps[1].stop().await;
    reps[2].stop().await;
    let err = volume
        .write(0, Bytes::from(vec![8u8; 4096]), false)
        .await
        .expect_err("one of three replicas is not a majority");
    assert!(matches!(err, BlockError::Unavailable(_)), "{err}");
    assert!(volume.flush().await.is_err());
    assert_eq!(volume.replica_set().rw_count(), 1);
    // Reads are served by the remaining replica.
    assert!(volume.read(0, 4096).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn available_policy_writes_down_to_the_last_replica_and_waits_for_it_at_open() {
    let mut reps = replicas(2).await;
    let cfg = config(&reps, 1 << 20);
    assert_eq!(cfg.write_policy, WritePolicy::Available);
    let volume = open_volume(&cfg, None).await.unwrap();
    reps[1].stop().await;
    volume
        .write(0, Bytes::from(vec![5u8; 4096]), true)
        .await
        .unwrap();
    assert_eq!(volume.replica_set().rw_count(), 1);
    volume.replica_set().shutdown();
    drop(volume);

    // Replica 0 alone holds the last write: a new engine may open with it...
    let again = open_volume(&cfg, None).await.unwrap();
    assert_eq!(again.read(0, 4096).await.unwrap()[..], [5u8; 4096][..]);
    again.replica_set().shutdown();
    drop(again);

    // ...but without it (only replica 1, which missed that write, could
    // answer) a new engine must refuse to serve.
    reps[0].stop().await;
    reps[1].restart().await;
    match open_volume(&cfg, None).await {
        Err(EngineError::Open {
            wait: OpenWait::AvailableMembers { members, .. },
            ..
        }) => assert!(members.contains(&reps[0].addr), "{members}"),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("opened with no up-to-date replica reachable"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_engine_fences_the_first() {
    let reps = replicas(3).await;
    let cfg = config(&reps, 1 << 20);
    let first = open_volume(&cfg, None).await.unwrap();
    first
        .write(0, Bytes::from(vec![1u8; 4096]), false)
        .await
        .unwrap();

    let second = open_volume(&cfg, None).await.unwrap();
    assert!(second.replica_set().epoch() > first.replica_set().epoch());

    let err = first
        .write(0, Bytes::from(vec![2u8; 4096]), false)
        .await
        .expect_err("the fenced engine cannot write");
    assert!(err.to_string().contains("fenced"), "{err}");
    assert!(first.replica_set().is_fenced());
    assert!(first.read(0, 4096).await.is_err(), "nor serve reads");

    second
        .write(0, Bytes::from(vec![3u8; 4096]), false)
        .await
        .unwrap();
    assert_eq!(second.read(0, 4096).await.unwrap()[..], [3u8; 4096][..]);
    // The fenced engine did not take any replica out of the set on its way down.
    assert_eq!(second.replica_set().rw_count(), 3);
    let _ = Arc::clone(second.replica_set());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_concurrent_writes_land_in_the_same_order_on_every_replica() {
    let reps = replicas(3).await;
    let volume = open_volume(&config(&reps, 1 << 20), None).await.unwrap();
    // Eight writers hammer the same 64 KiB with overlapping, unaligned writes.
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let volume = Arc::clone(&volume);
            tokio::spawn(async move {
                for round in 0..150u64 {
                    let offset = (w * 4_001 + round * 1_237) % 50_000;
                    let byte = (w * 16 + round % 16) as u8;
                    volume
                        .write(offset, Bytes::from(vec![byte; 7_000]), false)
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let copies = read_from_each(&volume, 1 << 20).await;
    assert_eq!(copies.len(), 3);
    assert!(
        copies[0] == copies[1] && copies[1] == copies[2],
        "replicas diverged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discarding_the_whole_volume_is_one_request_that_succeeds() {
    let reps = replicas(3).await;
    let size = 64 << 20; // 1024 chunks of 64 KiB
    let volume = open_volume(&config(&reps, size), None).await.unwrap();
    volume
        .write(0, Bytes::from(vec![4u8; 1 << 20]), false)
        .await
        .unwrap();
    volume.unmap(0, size).await.unwrap();
    volume.write_zeroes(0, size, true).await.unwrap();
    assert!(
        volume
            .read(0, 1 << 20)
            .await
            .unwrap()
            .iter()
            .all(|b| *b == 0)
    );
    assert_eq!(volume.replica_set().rw_count(), 3);
}
