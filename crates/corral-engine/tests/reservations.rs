//! The reservation record over real replica daemons: a save reaches every
//! writable replica; a replica that misses one goes to ERR and is given the
//! record when it joins again; a save that leaves too few replicas fails
//! and changes nothing; the next engine finds the newest record.

use std::time::Duration;

use bytes::Bytes;
use corral_block::BlockDevice;
use corral_client::ReplicaControl;

mod common;
use common::{TestReplica, config, start};

/// What replica `r` has stored: (epoch, sequence, state).
async fn stored(r: &TestReplica) -> Option<(u64, u64, Bytes)> {
    let control = ReplicaControl::connect(&r.addr, Duration::from_secs(5))
        .await
        .unwrap();
    let info = control.get("vol").await.unwrap();
    info.reservations.map(|x| (x.epoch, x.sequence, x.state))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reservation_record_follows_the_replicas_that_hold_the_volume() {
    let mut reps = vec![
        TestReplica::start().await,
        TestReplica::start().await,
        TestReplica::start().await,
    ];
    let cfg = config(&reps);
    let (volume, guard) = start(&cfg).await;
    let epoch = volume.replica_set().epoch().0;
    assert_eq!(volume.load_reservations().await.unwrap(), None);

    // A save reaches every replica.
    volume.save_reservations(Bytes::from("one")).await.unwrap();
    for r in &reps {
        assert_eq!(stored(r).await, Some((epoch, 1, Bytes::from("one"))));
    }

    // One replica is down at the next save: it goes to ERR, the save holds.
    reps[2].stop().await;
    volume.save_reservations(Bytes::from("two")).await.unwrap();
    assert_eq!(volume.replica_set().rw_count(), 2);
    assert_eq!(stored(&reps[0]).await.unwrap().2, Bytes::from("two"));

    // It returns: before it is back in the write set it is given the state
    // in force, as the next record.
    reps[2].restart().await;
    let set = volume.replica_set();
    common::wait_until(
        Duration::from_secs(30),
        "the returning replica to be RW",
        || set.rw_count() == 3,
        || format!("{:?}", set.status()),
    )
    .await;
    assert_eq!(stored(&reps[2]).await, Some((epoch, 3, Bytes::from("two"))));

    // Two replicas gone: the save cannot be kept and is not in force
    // (though the replica left may have taken it).
    reps[1].stop().await;
    reps[2].stop().await;
    let err = volume.save_reservations(Bytes::from("lost")).await;
    assert!(err.is_err(), "a save with one replica of three: {err:?}");
    assert_eq!(
        volume.load_reservations().await.unwrap(),
        Some(Bytes::from("two"))
    );
    assert_eq!(
        stored(&reps[0]).await,
        Some((epoch, 4, Bytes::from("lost"))),
        "the replica left took the failed save"
    );

    // They return and are given the state in force, as a record newer
    // than the failed save's.
    reps[1].restart().await;
    reps[2].restart().await;
    common::wait_until(
        Duration::from_secs(30),
        "both returning replicas to be RW",
        || set.rw_count() == 3,
        || format!("{:?}", set.status()),
    )
    .await;
    let (_, seq1, state1) = stored(&reps[1]).await.unwrap();
    let (_, seq2, state2) = stored(&reps[2]).await.unwrap();
    assert_eq!(
        (&state1, &state2),
        (&Bytes::from("two"), &Bytes::from("two"))
    );
    assert!(seq1 > 4 && seq2 > 4, "sequences {seq1}, {seq2}");
    drop(guard);
    drop(volume);

    // The next engine finds the state that was in force, and continues the
    // sequence past everything sent.
    let (volume, _guard) = start(&cfg).await;
    assert_eq!(
        volume.load_reservations().await.unwrap(),
        Some(Bytes::from("two"))
    );
    volume
        .save_reservations(Bytes::from("three"))
        .await
        .unwrap();
    let next_epoch = volume.replica_set().epoch().0;
    assert!(next_epoch > epoch);
    for r in &reps {
        let (e, sequence, state) = stored(r).await.unwrap();
        assert_eq!((e, state), (next_epoch, Bytes::from("three")));
        assert!(sequence > seq1.max(seq2));
    }
}
