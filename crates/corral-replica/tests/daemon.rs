//! The replica daemon over its real gRPC services on 127.0.0.1: lifecycle
//! calls, epoch fencing, and payload checksums on the data stream.

use std::time::Duration;

use bytes::Bytes;
use corral_proto::v1::{
    CreateReplicaRequest, DataErrorCode, DataReplyBatch, DataRequest, DataRequestBatch,
    DeleteReplicaRequest, GetReplicaRequest, ListReplicasRequest, OpenReplicaRequest, data_reply,
    data_request, replica_control_client::ReplicaControlClient,
    replica_data_client::ReplicaDataClient,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

struct Daemon {
    addr: String,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
    dir: tempfile::TempDir,
}

async fn start(dir: tempfile::TempDir) -> Daemon {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let path = dir.path().to_path_buf();
    let serving = stop.clone();
    let task = tokio::spawn(async move {
        corral_replica::serve_listener(listener, path, serving)
            .await
            .unwrap();
    });
    Daemon {
        addr,
        stop,
        task,
        dir,
    }
}

impl Daemon {
    async fn stop(mut self) -> tempfile::TempDir {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("daemon stops")
            .unwrap();
        self.dir
    }

    async fn control(&self) -> ReplicaControlClient<Channel> {
        ReplicaControlClient::connect(self.addr.clone())
            .await
            .unwrap()
    }

    /// Open a data stream for `volume`; returns the request sender and reply stream.
    async fn stream(
        &self,
        volume: &str,
    ) -> (
        mpsc::Sender<DataRequestBatch>,
        tonic::Streaming<DataReplyBatch>,
    ) {
        self.stream_of(volume, None).await
    }

    /// A data stream naming open session `session` (None: the current one).
    async fn stream_of(
        &self,
        volume: &str,
        session: Option<u64>,
    ) -> (
        mpsc::Sender<DataRequestBatch>,
        tonic::Streaming<DataReplyBatch>,
    ) {
        let mut client = ReplicaDataClient::connect(self.addr.clone()).await.unwrap();
        let (tx, rx) = mpsc::channel(8);
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        req.metadata_mut()
            .insert(corral_proto::VOLUME_METADATA_KEY, volume.parse().unwrap());
        if let Some(session) = session {
            req.metadata_mut().insert(
                corral_proto::OPEN_SESSION_METADATA_KEY,
                tonic::metadata::MetadataValue::from(session),
            );
        }
        let replies = client.stream(req).await.unwrap().into_inner();
        (tx, replies)
    }
}

fn write(id: u64, epoch: u64, offset: u64, data: &[u8], crc: u32) -> DataRequest {
    DataRequest {
        id,
        epoch,
        op: Some(data_request::Op::Write(corral_proto::v1::WriteOp {
            offset,
            data: Bytes::copy_from_slice(data),
            crc32c: crc,
            fua: false,
            ..Default::default()
        })),
    }
}

fn read(id: u64, epoch: u64, offset: u64, length: u32) -> DataRequest {
    DataRequest {
        id,
        epoch,
        op: Some(data_request::Op::Read(corral_proto::v1::ReadOp {
            offset,
            length,
            ..Default::default()
        })),
    }
}

async fn one(
    tx: &mpsc::Sender<DataRequestBatch>,
    rx: &mut tonic::Streaming<DataReplyBatch>,
    req: DataRequest,
) -> data_reply::Result {
    let id = req.id;
    tx.send(DataRequestBatch {
        requests: vec![req],
    })
    .await
    .unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(10), rx.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(batch.replies.len(), 1);
    assert_eq!(batch.replies[0].id, id);
    batch.replies[0].result.clone().unwrap()
}

fn error_code(r: &data_reply::Result) -> Option<DataErrorCode> {
    match r {
        data_reply::Result::Error(e) => DataErrorCode::try_from(e.code).ok(),
        _ => None,
    }
}

async fn create(control: &mut ReplicaControlClient<Channel>, volume: &str) {
    control
        .create_replica(CreateReplicaRequest {
            volume: volume.into(),
            size: 1 << 20,
            block_size: 512,
            chunk_size: 64 << 10,
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_epochs_and_bad_payloads_are_rejected_with_clear_errors() {
    let daemon = start(tempfile::tempdir().unwrap()).await;
    let mut control = daemon.control().await;
    create(&mut control, "vol").await;
    let open = |epoch| OpenReplicaRequest {
        volume: "vol".into(),
        epoch,
        engine_id: 0,
    };
    control.open_replica(open(2)).await.unwrap();
    let refused = control.open_replica(open(1)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);

    let (tx, mut rx) = daemon.stream("vol").await;
    let data = vec![7u8; 4096];
    let crc = crc32c::crc32c(&data);

    // Good write, then read back with a matching checksum.
    assert!(matches!(
        one(&tx, &mut rx, write(1, 2, 8192, &data, crc)).await,
        data_reply::Result::Done(_)
    ));
    match one(&tx, &mut rx, read(2, 2, 8192, 4096)).await {
        data_reply::Result::Read(r) => {
            assert_eq!(&r.data[..], &data[..]);
            assert_eq!(r.crc32c, crc);
        }
        other => panic!("unexpected {other:?}"),
    }
    // Corrupted in transit: refused before anything is stored.
    let r = one(&tx, &mut rx, write(3, 2, 8192, &[9u8; 4096], crc)).await;
    assert_eq!(error_code(&r), Some(DataErrorCode::BadPayload), "{r:?}");
    // An older engine's epoch: fenced. A newer one it was never opened at: not open.
    let r = one(&tx, &mut rx, write(4, 1, 0, &data, crc)).await;
    assert_eq!(error_code(&r), Some(DataErrorCode::StaleEpoch), "{r:?}");
    let r = one(&tx, &mut rx, write(5, 3, 0, &data, crc)).await;
    assert_eq!(error_code(&r), Some(DataErrorCode::NotOpen), "{r:?}");
    // Out of range is the request's fault.
    let r = one(&tx, &mut rx, read(6, 2, (1 << 20) - 512, 1024)).await;
    assert_eq!(error_code(&r), Some(DataErrorCode::OutOfRange), "{r:?}");
    // Nothing of the refused writes landed.
    match one(&tx, &mut rx, read(7, 2, 0, 12288)).await {
        data_reply::Result::Read(r) => {
            assert!(r.data[..8192].iter().all(|b| *b == 0));
            assert_eq!(&r.data[8192..], &data[..]);
        }
        other => panic!("unexpected {other:?}"),
    }
    // A newer engine opens it: the old epoch is now stale on the same stream.
    control.open_replica(open(3)).await.unwrap();
    let r = one(&tx, &mut rx, write(8, 2, 0, &data, crc)).await;
    assert_eq!(error_code(&r), Some(DataErrorCode::StaleEpoch), "{r:?}");
    drop(tx);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_survive_a_daemon_restart_and_bad_names_are_refused() {
    let daemon = start(tempfile::tempdir().unwrap()).await;
    let mut control = daemon.control().await;
    create(&mut control, "a").await;
    create(&mut control, "b").await;
    let dup = control
        .create_replica(CreateReplicaRequest {
            volume: "a".into(),
            size: 1 << 20,
            block_size: 512,
            chunk_size: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), tonic::Code::AlreadyExists);
    for bad in ["../etc", "", ".x", "a b"] {
        let e = control
            .get_replica(GetReplicaRequest { volume: bad.into() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}");
    }
    let e = control
        .get_replica(GetReplicaRequest {
            volume: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    control
        .delete_replica(DeleteReplicaRequest { volume: "b".into() })
        .await
        .unwrap();
    drop(control);

    let dir = daemon.stop().await;
    let daemon = start(dir).await;
    let mut control = daemon.control().await;
    let list = control
        .list_replicas(ListReplicasRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = list.replicas.iter().map(|r| r.volume.as_str()).collect();
    assert_eq!(names, vec!["a"]);
    assert!(
        list.replicas[0].clean_shutdown,
        "closed cleanly by the stop"
    );
    drop(control);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopening_at_the_same_epoch_cuts_off_the_streams_of_before() {
    let daemon = start(tempfile::tempdir().unwrap()).await;
    let mut control = daemon.control().await;
    create(&mut control, "vol").await;
    let open = OpenReplicaRequest {
        volume: "vol".into(),
        epoch: 4,
        engine_id: 0,
    };
    control.open_replica(open.clone()).await.unwrap();
    let (old_tx, mut old_rx) = daemon.stream("vol").await;
    let data = vec![5u8; 4096];
    let crc = crc32c::crc32c(&data);
    assert!(matches!(
        one(&old_tx, &mut old_rx, write(1, 4, 0, &data, crc)).await,
        data_reply::Result::Done(_)
    ));

    // The engine brings the replica back after a failure: it opens it again
    // at its epoch, then connects anew. A write still queued on the old
    // connection must not land any more.
    control.open_replica(open).await.unwrap();
    let r = one(
        &old_tx,
        &mut old_rx,
        write(2, 4, 4096, &[6u8; 4096], crc32c::crc32c(&[6u8; 4096])),
    )
    .await;
    assert_eq!(error_code(&r), Some(DataErrorCode::NotOpen), "{r:?}");
    let (tx, mut rx) = daemon.stream("vol").await;
    match one(&tx, &mut rx, read(3, 4, 0, 8192)).await {
        data_reply::Result::Read(r) => {
            assert_eq!(&r.data[..4096], &data[..]);
            assert!(
                r.data[4096..].iter().all(|b| *b == 0),
                "the late write did not land"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    drop((old_tx, tx));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_set_up_for_an_earlier_open_is_served_nothing() {
    let daemon = start(tempfile::tempdir().unwrap()).await;
    let mut control = daemon.control().await;
    create(&mut control, "vol").await;
    let open = OpenReplicaRequest {
        volume: "vol".into(),
        epoch: 3,
        engine_id: 0,
    };
    let first = control
        .open_replica(open.clone())
        .await
        .unwrap()
        .into_inner();
    let second = control.open_replica(open).await.unwrap().into_inner();
    assert!(
        second.open_session > first.open_session,
        "{first:?} {second:?}"
    );

    // A stream of the first open whose setup reached the daemon only after
    // the second (it waited in a stalled daemon's socket): nothing lands.
    let (old_tx, mut old_rx) = daemon.stream_of("vol", Some(first.open_session)).await;
    let data = [7u8; 4096];
    let r = one(
        &old_tx,
        &mut old_rx,
        write(1, 3, 0, &data, crc32c::crc32c(&data)),
    )
    .await;
    assert_eq!(error_code(&r), Some(DataErrorCode::NotOpen), "{r:?}");

    // The stream of the current open is served.
    let (tx, mut rx) = daemon.stream_of("vol", Some(second.open_session)).await;
    assert!(matches!(
        one(&tx, &mut rx, write(2, 3, 0, &data, crc32c::crc32c(&data))).await,
        data_reply::Result::Done(_)
    ));
    drop((old_tx, tx));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_daemon_not_yet_reopened_is_not_a_newer_engine() {
    let daemon = start(tempfile::tempdir().unwrap()).await;
    let mut control = daemon.control().await;
    create(&mut control, "vol").await;
    control
        .open_replica(OpenReplicaRequest {
            volume: "vol".into(),
            epoch: 7,
            engine_id: 0,
        })
        .await
        .unwrap();
    drop(control);
    let daemon = start(daemon.stop().await).await;
    let mut control = daemon.control().await;
    // The engine at epoch 7 records a membership before it has noticed the
    // restart: refused as "not open", not as "fenced" (FAILED_PRECONDITION
    // would make the engine believe a newer engine owns the volume).
    let request = |epoch| corral_proto::v1::SetMembershipRequest {
        volume: "vol".into(),
        epoch,
        membership: Some(corral_proto::v1::Membership {
            generation: 3,
            epoch,
            members: vec![],
        }),
    };
    let e = control.set_membership(request(7)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    // An older engine is fenced, as before, and told so in a way it can
    // check without reading the message.
    let e = control.set_membership(request(6)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(corral_proto::is_fenced(&e), "{e:?}");
    drop(control);
    daemon.stop().await;
}

/// A data stream on `channel` for `volume`.
async fn stream_on(
    channel: Channel,
    volume: &str,
) -> (
    mpsc::Sender<DataRequestBatch>,
    tonic::Streaming<DataReplyBatch>,
) {
    let mut client = ReplicaDataClient::new(channel);
    let (tx, rx) = mpsc::channel(8);
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut()
        .insert(corral_proto::VOLUME_METADATA_KEY, volume.parse().unwrap());
    let replies = client.stream(req).await.unwrap().into_inner();
    (tx, replies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_fails_its_own_stream_only() {
    let daemon = start(tempfile::tempdir().unwrap()).await;
    let mut control = daemon.control().await;
    create(&mut control, "vol").await;
    control
        .open_replica(OpenReplicaRequest {
            volume: "vol".into(),
            epoch: 1,
            engine_id: 0,
        })
        .await
        .unwrap();
    // Two streams on one HTTP/2 connection.
    let channel = tonic::transport::Endpoint::from_shared(daemon.addr.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx_a, mut rx_a) = stream_on(channel.clone(), "vol").await;
    let (tx_b, mut rx_b) = stream_on(channel.clone(), "vol").await;
    let data = vec![5u8; 4096];
    let crc = crc32c::crc32c(&data);
    assert!(matches!(
        one(&tx_b, &mut rx_b, write(1, 1, 0, &data, crc)).await,
        data_reply::Result::Done(_)
    ));

    // A message over the daemon's limit on stream A...
    let huge = vec![0u8; corral_proto::MAX_MESSAGE_BYTES + 4096];
    tx_a.send(DataRequestBatch {
        requests: vec![write(2, 1, 0, &huge, crc32c::crc32c(&huge))],
    })
    .await
    .unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(10), rx_a.message())
        .await
        .expect("refused, not hung")
        .expect_err("an oversized message was taken");
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused}");
    assert!(refused.message().contains("too large"), "{refused}");

    // ...fails that stream alone: B, on the same connection, goes on, and
    // the control service answers on it too.
    match one(&tx_b, &mut rx_b, read(3, 1, 0, 4096)).await {
        data_reply::Result::Read(r) => assert_eq!(&r.data[..], &data[..]),
        other => panic!("stream B after A's oversized message: {other:?}"),
    }
    ReplicaControlClient::new(channel)
        .list_replicas(ListReplicasRequest {})
        .await
        .unwrap();
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_epoch_belongs_to_the_first_engine_that_opens_at_it() {
    let daemon = start(tempfile::tempdir().unwrap()).await;
    let mut control = daemon.control().await;
    create(&mut control, "vol").await;
    let open = |epoch, engine_id| OpenReplicaRequest {
        volume: "vol".into(),
        epoch,
        engine_id,
    };
    // Engines A (1) and B (2) both picked epoch 5: A opens first.
    control.open_replica(open(5, 1)).await.unwrap();
    let refused = control.open_replica(open(5, 2)).await.unwrap_err();
    assert!(corral_proto::is_fenced(&refused), "{refused:?}");
    assert!(refused.message().contains("another engine"), "{refused:?}");
    // A may open again at its epoch (bringing the replica back)...
    control.open_replica(open(5, 1)).await.unwrap();
    // ...and B, with a newer epoch, fences A.
    control.open_replica(open(6, 2)).await.unwrap();
    let stale = control.open_replica(open(5, 1)).await.unwrap_err();
    assert!(corral_proto::is_fenced(&stale), "{stale:?}");
    daemon.stop().await;
}
