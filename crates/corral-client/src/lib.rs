//! Typed clients of corral's control services — a replica daemon's
//! `ReplicaControl` ([`ReplicaControl`]), an engine's `EngineControl`
//! ([`EngineControl`]) and a node daemon's `EngineManager`
//! ([`EngineManager`]) — with one error type, [`ClientError`]. The engine,
//! the `corral volume` CLI and (later) the CSI plugin use these instead of
//! raw tonic clients, so that addresses, timeouts and status codes are
//! interpreted in one place: "no such replica", "fenced by a newer engine"
//! and "not open at this epoch" are variants, not strings to compare.
//!
//! Every channel is dialled by [`connect`] from an [`endpoint`]: the one
//! place where TLS goes. A process that was given `--tls-*` files calls
//! [`use_tls`] once at start; from then on every channel it dials runs
//! mutual TLS (see `corral_tls`), and every other one is plain TCP.
//! [`connect_unix`] dials a daemon on this node over its unix socket
//! instead (`--listen-unix`): the same HTTP/2 settings, no TLS — the
//! socket's file permissions are its authentication.

use std::path::Path;
use std::time::Duration;

use corral_proto::v1::{
    self as pb, AddReplicaRequest, CreateReplicaRequest, ExpandReplicaRequest, ExpandVolumeRequest,
    ExpandVolumeResponse, GetReplicaRequest, ListEngineReplicasRequest, OpenReplicaRequest,
    RebuildStatusRequest, RemoveReplicaRequest, ReplicaInfo, ReplicaStatus, SalvageRequest,
    SetMembershipRequest, VerifyRequest, VerifyResponse, VolumeInfo, VolumeInfoRequest,
    engine_control_client::EngineControlClient, engine_manager_client::EngineManagerClient,
    replica_control_client::ReplicaControlClient,
};
use std::sync::OnceLock;

use corral_tls::ClientTls;
use corral_tls::grpc::TlsChannelConnector;
use corral_types::Epoch;
use tonic::transport::{Channel, Endpoint};

/// This process's TLS for every channel it dials (set once, at start).
static PROCESS_TLS: OnceLock<ClientTls> = OnceLock::new();

/// Dial every channel of this process over mutual TLS with `tls`. Called
/// once, before the first channel; a second call is refused.
pub fn use_tls(tls: ClientTls) -> Result<(), ClientError> {
    PROCESS_TLS.set(tls).map_err(|_| ClientError::BadAddress {
        addr: String::new(),
        why: "TLS for this process's channels was already set".into(),
    })
}

/// The TLS this process dials with, if any.
pub fn process_tls() -> Option<&'static ClientTls> {
    PROCESS_TLS.get()
}

/// Why a control call failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("bad address {addr:?}: {why}")]
    BadAddress { addr: String, why: String },
    #[error("{addr}: unreachable: {why}")]
    Unreachable { addr: String, why: String },
    #[error("{addr}: {what} timed out after {after:?}")]
    TimedOut {
        addr: String,
        what: &'static str,
        after: Duration,
    },
    /// A newer engine owns the volume: the caller is fenced.
    #[error("{addr}: fenced: {message}")]
    Fenced { addr: String, message: String },
    /// The daemon holds no replica of the volume.
    #[error("{addr}: {message}")]
    NotFound { addr: String, message: String },
    /// The daemon is up but cannot serve the call now (not open at this
    /// epoch — it restarted —, shutting down, ...).
    #[error("{addr}: unavailable: {message}")]
    Unavailable { addr: String, message: String },
    /// Any other refusal, with its gRPC code.
    #[error("{addr}: {message} ({code:?})")]
    Refused {
        addr: String,
        code: tonic::Code,
        message: String,
    },
}

impl ClientError {
    /// Map a gRPC status from `addr` onto a variant.
    pub fn from_status(addr: &str, status: &tonic::Status) -> Self {
        let addr = addr.to_string();
        let mut message = status.message().to_string();
        let connection_lost =
            matches!(status.code(), tonic::Code::Unknown | tonic::Code::Cancelled)
                && (message.contains("transport error")
                    || message.contains("operation was canceled"));
        if connection_lost && process_tls().is_none() {
            // What a plaintext client sees of a listener that wants TLS.
            message.push_str(
                " (the connection was closed: if the server requires TLS, give --tls-cert, --tls-key and --tls-ca)",
            );
        }
        if corral_proto::is_fenced(status) {
            return ClientError::Fenced { addr, message };
        }
        match status.code() {
            tonic::Code::NotFound => ClientError::NotFound { addr, message },
            tonic::Code::Unavailable => ClientError::Unavailable { addr, message },
            code => ClientError::Refused {
                addr,
                code,
                message,
            },
        }
    }

    /// The peer could not be reached or did not answer (worth retrying
    /// later; not a refusal).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ClientError::Unreachable { .. }
                | ClientError::TimedOut { .. }
                | ClientError::Unavailable { .. }
        )
    }
}

/// The largest DATA frame a channel accepts from its server (1 MiB, as the
/// replica daemon accepts from its clients).
pub const REPLY_FRAME: u32 = (1 << 20) - 1;

/// The channel endpoint for `addr` (`host:port` or a URI), with the
/// windows and keepalives corral's streams need; `timeout` bounds connects
/// and keepalive answers.
pub fn endpoint(addr: &str, timeout: Duration) -> Result<Endpoint, ClientError> {
    let uri = if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Ok(Endpoint::from_shared(uri)
        .map_err(|e| ClientError::BadAddress {
            addr: addr.to_string(),
            why: e.to_string(),
        })?
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(16 << 20)
        .initial_connection_window_size(64 << 20)
        // What the server may send in one DATA frame: a replica's reply to
        // a 512 KiB snapshot read (a backup's) then comes in one frame
        // rather than thirty-two of HTTP/2's default 16 KiB.
        .max_frame_size(REPLY_FRAME)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(timeout)
        .keep_alive_while_idle(true))
}

/// Connect a channel to `addr` (over TLS if the process [`use_tls`]).
pub async fn connect(addr: &str, timeout: Duration) -> Result<Channel, ClientError> {
    let endpoint = endpoint(addr, timeout)?;
    let connected = match process_tls() {
        Some(tls) => {
            endpoint
                .connect_with_connector(TlsChannelConnector::new(tls.clone()))
                .await
        }
        None => endpoint.connect().await,
    };
    connected.map_err(|e| ClientError::Unreachable {
        addr: addr.to_string(),
        why: corral_tls::describe(&e),
    })
}

/// Connect a channel to the daemon known as `addr` over the unix socket at
/// `path` (a daemon on this node serving `--listen-unix`): the endpoint of
/// [`endpoint`] — windows, keepalives, timeouts — over a
/// `tokio::net::UnixStream` instead of TCP. Never TLS: only processes that
/// may open the socket file reach it. `addr` stays the peer's name (in
/// errors and in the requests' `:authority`).
pub async fn connect_unix(
    addr: &str,
    path: &Path,
    timeout: Duration,
) -> Result<Channel, ClientError> {
    let endpoint = endpoint(addr, timeout)?;
    let socket = path.to_path_buf();
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let socket = socket.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(&socket).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| ClientError::Unreachable {
            addr: format!("{addr} (unix socket {})", path.display()),
            why: corral_tls::describe(&e),
        })
}

/// Run one call, bounded by `timeout`, mapping its failure.
async fn call<T>(
    addr: &str,
    what: &'static str,
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, ClientError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(status)) => Err(ClientError::from_status(addr, &status)),
        Err(_) => Err(ClientError::TimedOut {
            addr: addr.to_string(),
            what,
            after: timeout,
        }),
    }
}

/// A replica daemon's control service, for one caller.
#[derive(Clone)]
pub struct ReplicaControl {
    addr: String,
    inner: ReplicaControlClient<Channel>,
    timeout: Duration,
}

impl ReplicaControl {
    /// Connect to the daemon at `addr`; every call is bounded by `timeout`.
    pub async fn connect(addr: &str, timeout: Duration) -> Result<Self, ClientError> {
        Ok(Self::on(addr, connect(addr, timeout).await?, timeout))
    }

    /// Connect to the daemon known as `addr` over its unix socket at `path`
    /// (see [`connect_unix`]).
    pub async fn connect_unix(
        addr: &str,
        path: &Path,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        Ok(Self::on(
            addr,
            connect_unix(addr, path, timeout).await?,
            timeout,
        ))
    }

    /// Use an existing channel to the daemon at `addr`.
    pub fn on(addr: &str, channel: Channel, timeout: Duration) -> Self {
        ReplicaControl {
            addr: addr.to_string(),
            inner: ReplicaControlClient::new(channel),
            timeout,
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The replica of `volume` (`NotFound` when the daemon has none).
    pub async fn get(&self, volume: &str) -> Result<ReplicaInfo, ClientError> {
        let mut c = self.inner.clone();
        let request = GetReplicaRequest {
            volume: volume.to_string(),
        };
        call(
            &self.addr,
            "get replica",
            self.timeout,
            c.get_replica(request),
        )
        .await
    }

    /// Every replica the daemon hosts.
    pub async fn list(&self) -> Result<Vec<ReplicaInfo>, ClientError> {
        let mut c = self.inner.clone();
        call(
            &self.addr,
            "list replicas",
            self.timeout,
            c.list_replicas(pb::ListReplicasRequest {}),
        )
        .await
        .map(|r| r.replicas)
    }

    /// Delete the replica of `volume` and its data (`NotFound` when the
    /// daemon has none).
    pub async fn delete(&self, volume: &str) -> Result<(), ClientError> {
        let mut c = self.inner.clone();
        let request = pb::DeleteReplicaRequest {
            volume: volume.to_string(),
        };
        call(
            &self.addr,
            "delete replica",
            self.timeout,
            c.delete_replica(request),
        )
        .await
        .map(|_| ())
    }

    /// Create an empty replica.
    pub async fn create(&self, request: CreateReplicaRequest) -> Result<ReplicaInfo, ClientError> {
        let mut c = self.inner.clone();
        call(
            &self.addr,
            "create replica",
            self.timeout,
            c.create_replica(request),
        )
        .await
    }

    /// Open the replica at `epoch` (fencing older engines), unnamed.
    pub async fn open(&self, volume: &str, epoch: Epoch) -> Result<ReplicaInfo, ClientError> {
        self.open_as(volume, epoch, 0).await
    }

    /// Open the replica for engine `engine_id` at `epoch` (fencing older
    /// ones). Another engine already open at `epoch` makes this `Fenced`.
    pub async fn open_as(
        &self,
        volume: &str,
        epoch: Epoch,
        engine_id: u64,
    ) -> Result<ReplicaInfo, ClientError> {
        let mut c = self.inner.clone();
        let request = OpenReplicaRequest {
            volume: volume.to_string(),
            epoch: epoch.0,
            engine_id,
        };
        call(
            &self.addr,
            "open replica",
            self.timeout,
            c.open_replica(request),
        )
        .await
    }

    /// Record `membership` on the replica, as the engine of `epoch`.
    pub async fn set_membership(
        &self,
        volume: &str,
        epoch: Epoch,
        membership: pb::Membership,
    ) -> Result<ReplicaInfo, ClientError> {
        let mut c = self.inner.clone();
        let request = SetMembershipRequest {
            volume: volume.to_string(),
            epoch: epoch.0,
            membership: Some(membership),
        };
        call(
            &self.addr,
            "record membership",
            self.timeout,
            c.set_membership(request),
        )
        .await
    }

    /// Grow the replica of `volume` to `size` bytes, as the engine open at
    /// `epoch` (a replica already at least that large is left as it is).
    pub async fn expand(
        &self,
        volume: &str,
        epoch: Epoch,
        size: u64,
    ) -> Result<ReplicaInfo, ClientError> {
        let mut c = self.inner.clone();
        let request = ExpandReplicaRequest {
            volume: volume.to_string(),
            epoch: epoch.0,
            size,
        };
        call(
            &self.addr,
            "expand replica",
            self.timeout,
            c.expand_replica(request),
        )
        .await
    }

    /// Take snapshot `name` of the replica of `volume`, as the engine open at
    /// `epoch` (idempotent by name); answers once the snapshot is durable.
    pub async fn create_snapshot(
        &self,
        volume: &str,
        epoch: Epoch,
        name: &str,
    ) -> Result<pb::SnapshotInfo, ClientError> {
        self.snapshot_call(volume, epoch, name, false, self.timeout)
            .await
    }

    /// [`ReplicaControl::create_snapshot`] with its own time limit: after a
    /// [`ReplicaControl::switch_snapshot`], the answer comes once the replica
    /// has synced everything the frozen layer took, which may take longer
    /// than a write.
    pub async fn commit_snapshot(
        &self,
        volume: &str,
        epoch: Epoch,
        name: &str,
        within: Duration,
    ) -> Result<pb::SnapshotInfo, ClientError> {
        self.snapshot_call(volume, epoch, name, false, within).await
    }

    /// Like [`ReplicaControl::create_snapshot`], but answers as soon
    /// as the replica has switched heads in memory: writes sent after the
    /// answer are not in the snapshot. It is durable once the replica's next
    /// flush, or a repeated `create_snapshot`, succeeds.
    pub async fn switch_snapshot(
        &self,
        volume: &str,
        epoch: Epoch,
        name: &str,
    ) -> Result<pb::SnapshotInfo, ClientError> {
        self.snapshot_call(volume, epoch, name, true, self.timeout)
            .await
    }

    async fn snapshot_call(
        &self,
        volume: &str,
        epoch: Epoch,
        name: &str,
        answer_when_switched: bool,
        within: Duration,
    ) -> Result<pb::SnapshotInfo, ClientError> {
        let mut c = self.inner.clone();
        let request = pb::SnapshotRequest {
            volume: volume.to_string(),
            epoch: epoch.0,
            name: name.to_string(),
            answer_when_switched,
        };
        call(
            &self.addr,
            "create snapshot",
            within,
            c.create_snapshot(request),
        )
        .await
    }

    /// Delete snapshot `name` of the replica of `volume`, as the engine open
    /// at `epoch`; the replica merges it away in the background.
    pub async fn delete_snapshot(
        &self,
        volume: &str,
        epoch: Epoch,
        name: &str,
    ) -> Result<pb::ListSnapshotsResponse, ClientError> {
        let mut c = self.inner.clone();
        let request = pb::SnapshotRequest {
            volume: volume.to_string(),
            epoch: epoch.0,
            name: name.to_string(),
            answer_when_switched: false,
        };
        call(
            &self.addr,
            "delete snapshot",
            self.timeout,
            c.delete_snapshot(request),
        )
        .await
    }

    /// Revert the replica of `volume` to snapshot `name`, as the engine open
    /// at `epoch`.
    pub async fn revert_snapshot(
        &self,
        volume: &str,
        epoch: Epoch,
        name: &str,
    ) -> Result<ReplicaInfo, ClientError> {
        let mut c = self.inner.clone();
        let request = pb::SnapshotRequest {
            volume: volume.to_string(),
            epoch: epoch.0,
            name: name.to_string(),
            answer_when_switched: false,
        };
        call(
            &self.addr,
            "revert snapshot",
            self.timeout,
            c.revert_snapshot(request),
        )
        .await
    }

    /// The snapshots and layers of the replica of `volume`.
    pub async fn list_snapshots(
        &self,
        volume: &str,
    ) -> Result<pb::ListSnapshotsResponse, ClientError> {
        let mut c = self.inner.clone();
        let request = pb::ListSnapshotsRequest {
            volume: volume.to_string(),
        };
        call(
            &self.addr,
            "list snapshots",
            self.timeout,
            c.list_snapshots(request),
        )
        .await
    }

    /// Where snapshot `to`'s view may differ from snapshot `from`'s (None:
    /// from an empty volume): sorted `(offset, length)` byte ranges, from
    /// the layers' entries (what an incremental backup reads). Each message
    /// of the answer is bounded by the call's timeout.
    pub async fn changed_extents(
        &self,
        volume: &str,
        from: Option<&str>,
        to: &str,
    ) -> Result<Vec<(u64, u64)>, ClientError> {
        let mut c = self.inner.clone();
        let request = pb::ChangedExtentsRequest {
            volume: volume.to_string(),
            from_snapshot: from.unwrap_or_default().to_string(),
            to_snapshot: to.to_string(),
        };
        let mut stream = call(
            &self.addr,
            "changed extents",
            self.timeout,
            c.changed_extents(request),
        )
        .await?;
        let mut out = Vec::new();
        loop {
            let next = tokio::time::timeout(self.timeout, stream.message())
                .await
                .map_err(|_| ClientError::TimedOut {
                    addr: self.addr.clone(),
                    what: "changed extents",
                    after: self.timeout,
                })?
                .map_err(|status| ClientError::from_status(&self.addr, &status))?;
            let Some(chunk) = next else {
                return Ok(out);
            };
            if chunk.ranges.len() % 2 != 0 {
                return Err(ClientError::Refused {
                    addr: self.addr.clone(),
                    code: tonic::Code::DataLoss,
                    message: "changed extents: an odd number of values".into(),
                });
            }
            out.extend(chunk.ranges.chunks_exact(2).map(|p| (p[0], p[1])));
        }
    }

    /// Record a clone's fill progress on the replica, as the engine of `epoch`.
    pub async fn set_clone(
        &self,
        volume: &str,
        epoch: Epoch,
        record: pb::CloneRecord,
    ) -> Result<ReplicaInfo, ClientError> {
        let mut c = self.inner.clone();
        let request = pb::SetCloneRequest {
            volume: volume.to_string(),
            epoch: epoch.0,
            record: Some(record),
        };
        call(
            &self.addr,
            "record clone progress",
            self.timeout,
            c.set_clone(request),
        )
        .await
    }

    /// Record a reservation record on the replica, as the engine of `epoch`.
    pub async fn set_reservations(
        &self,
        volume: &str,
        epoch: Epoch,
        record: pb::ReservationRecord,
    ) -> Result<ReplicaInfo, ClientError> {
        let mut c = self.inner.clone();
        let request = pb::SetReservationsRequest {
            volume: volume.to_string(),
            epoch: epoch.0,
            record: Some(record),
        };
        call(
            &self.addr,
            "record reservations",
            self.timeout,
            c.set_reservations(request),
        )
        .await
    }
}

/// An engine's control service.
#[derive(Clone)]
pub struct EngineControl {
    addr: String,
    inner: EngineControlClient<Channel>,
    timeout: Duration,
}

impl EngineControl {
    /// Connect to the engine at `addr`; calls are bounded by `timeout`.
    pub async fn connect(addr: &str, timeout: Duration) -> Result<Self, ClientError> {
        let channel = connect(addr, timeout.min(Duration::from_secs(5))).await?;
        Ok(EngineControl {
            addr: addr.to_string(),
            inner: EngineControlClient::new(channel).max_decoding_message_size(8 << 20),
            timeout,
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub async fn info(&self) -> Result<VolumeInfo, ClientError> {
        let mut c = self.inner.clone();
        call(
            &self.addr,
            "volume info",
            self.timeout,
            c.get_volume_info(VolumeInfoRequest {}),
        )
        .await
    }

    pub async fn replicas(&self) -> Result<Vec<ReplicaStatus>, ClientError> {
        let mut c = self.inner.clone();
        call(
            &self.addr,
            "replica ls",
            self.timeout,
            c.list_replicas(ListEngineReplicasRequest {}),
        )
        .await
        .map(|r| r.replicas)
    }

    /// Add a replica (or retry one in ERR now); the engine's message.
    pub async fn add_replica(&self, address: &str) -> Result<String, ClientError> {
        let mut c = self.inner.clone();
        let request = AddReplicaRequest {
            address: address.to_string(),
        };
        call(
            &self.addr,
            "replica add",
            self.timeout,
            c.add_replica(request),
        )
        .await
        .map(|r| r.message)
    }

    /// Remove a replica; the engine's message.
    pub async fn remove_replica(&self, address: &str) -> Result<String, ClientError> {
        let mut c = self.inner.clone();
        let request = RemoveReplicaRequest {
            address: address.to_string(),
        };
        call(
            &self.addr,
            "replica rm",
            self.timeout,
            c.remove_replica(request),
        )
        .await
        .map(|r| r.message)
    }

    pub async fn rebuild_status(&self) -> Result<Vec<pb::RebuildStatus>, ClientError> {
        let mut c = self.inner.clone();
        call(
            &self.addr,
            "rebuild status",
            self.timeout,
            c.get_rebuild_status(RebuildStatusRequest {}),
        )
        .await
        .map(|r| r.rebuilds)
    }

    pub async fn verify(&self) -> Result<VerifyResponse, ClientError> {
        let mut c = self.inner.clone();
        call(
            &self.addr,
            "verify",
            self.timeout,
            c.verify(VerifyRequest {}),
        )
        .await
    }

    /// Grow the volume online to `size` bytes.
    pub async fn expand(&self, size: u64) -> Result<ExpandVolumeResponse, ClientError> {
        let mut c = self.inner.clone();
        call(
            &self.addr,
            "expand volume",
            self.timeout,
            c.expand_volume(ExpandVolumeRequest { size }),
        )
        .await
    }

    /// Take snapshot `name` of the volume on every RW replica.
    pub async fn create_snapshot(
        &self,
        name: &str,
    ) -> Result<pb::VolumeSnapshotResponse, ClientError> {
        let mut c = self.inner.clone();
        let request = pb::VolumeSnapshotRequest {
            name: name.to_string(),
            ..Default::default()
        };
        call(
            &self.addr,
            "create snapshot",
            self.timeout,
            c.create_snapshot(request),
        )
        .await
    }

    /// Back a snapshot of the volume up to a target (see
    /// `CreateBackupRequest`); bounded by `within`, not the call timeout:
    /// a backup lasts as long as its data takes to read and put.
    pub async fn create_backup(
        &self,
        request: pb::CreateBackupRequest,
        within: Duration,
    ) -> Result<pb::CreateBackupResponse, ClientError> {
        let mut c = self.inner.clone();
        call(
            &self.addr,
            "create backup",
            within,
            c.create_backup(request),
        )
        .await
    }

    /// Delete snapshot `name` (merged away in the background).
    pub async fn delete_snapshot(
        &self,
        name: &str,
    ) -> Result<pb::VolumeSnapshotResponse, ClientError> {
        self.delete_snapshot_as(name, false).await
    }

    /// Delete snapshot `name`, taken for a clone that is now filled (it
    /// skips the minute a snapshot read by a clone is kept for).
    pub async fn delete_clone_snapshot(
        &self,
        name: &str,
    ) -> Result<pb::VolumeSnapshotResponse, ClientError> {
        self.delete_snapshot_as(name, true).await
    }

    async fn delete_snapshot_as(
        &self,
        name: &str,
        clone_filled: bool,
    ) -> Result<pb::VolumeSnapshotResponse, ClientError> {
        let mut c = self.inner.clone();
        let request = pb::VolumeSnapshotRequest {
            name: name.to_string(),
            clone_filled,
        };
        call(
            &self.addr,
            "delete snapshot",
            self.timeout,
            c.delete_snapshot(request),
        )
        .await
    }

    /// Revert the volume to snapshot `name` (no client may be attached).
    pub async fn revert_snapshot(
        &self,
        name: &str,
    ) -> Result<pb::VolumeSnapshotResponse, ClientError> {
        let mut c = self.inner.clone();
        let request = pb::VolumeSnapshotRequest {
            name: name.to_string(),
            ..Default::default()
        };
        call(
            &self.addr,
            "revert snapshot",
            self.timeout,
            c.revert_snapshot(request),
        )
        .await
    }

    /// `length` bytes (at most 4 MiB) at `offset` of snapshot `name`'s view,
    /// checked against the CRC32C the engine sent with them.
    pub async fn read_snapshot(
        &self,
        name: &str,
        offset: u64,
        length: u32,
    ) -> Result<bytes::Bytes, ClientError> {
        let mut c = self.inner.clone();
        let request = pb::ReadSnapshotRequest {
            name: name.to_string(),
            offset,
            length,
        };
        let reply = call(
            &self.addr,
            "read snapshot",
            self.timeout,
            c.read_snapshot(request),
        )
        .await?;
        if reply.data.len() != length as usize || crc32c::crc32c(&reply.data) != reply.crc32c {
            return Err(ClientError::from_status(
                &self.addr,
                &tonic::Status::data_loss(format!(
                    "snapshot {name} read at {offset}: {} bytes whose CRC32C does not match the sender's",
                    reply.data.len()
                )),
            ));
        }
        Ok(reply.data)
    }

    /// The volume's snapshots and layers.
    pub async fn list_snapshots(&self) -> Result<pb::ListSnapshotsResponse, ClientError> {
        let mut c = self.inner.clone();
        call(
            &self.addr,
            "list snapshots",
            self.timeout,
            c.list_snapshots(pb::VolumeListSnapshotsRequest {}),
        )
        .await
    }

    /// Trust `replica`'s data while the engine waits to open; its message.
    pub async fn salvage(&self, replica: &str) -> Result<String, ClientError> {
        let mut c = self.inner.clone();
        let request = SalvageRequest {
            replica: replica.to_string(),
        };
        call(&self.addr, "salvage", self.timeout, c.salvage(request))
            .await
            .map(|r| r.message)
    }
}

/// A node daemon's engine manager (`corral node`): starts, supervises and
/// stops the engines of the volumes attached on its node.
///
/// `start_engine` waits until the engine serves (or the daemon's own start
/// timeout, `corral node --start-timeout`, 30 s by default) and
/// `stop_engine` until the engine has flushed and exited: give this client
/// a timeout longer than those.
#[derive(Clone)]
pub struct EngineManager {
    addr: String,
    inner: EngineManagerClient<Channel>,
    timeout: Duration,
}

impl EngineManager {
    /// Connect to the node daemon at `addr`; every call is bounded by `timeout`.
    pub async fn connect(addr: &str, timeout: Duration) -> Result<Self, ClientError> {
        let channel = connect(addr, timeout.min(Duration::from_secs(5))).await?;
        Ok(Self::on(addr, channel, timeout))
    }

    /// Use an existing channel to the node daemon at `addr`.
    pub fn on(addr: &str, channel: Channel, timeout: Duration) -> Self {
        EngineManager {
            addr: addr.to_string(),
            inner: EngineManagerClient::new(channel),
            timeout,
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The node's identity, capacity and addresses.
    pub async fn node_info(&self) -> Result<pb::NodeInfo, ClientError> {
        let mut c = self.inner.clone();
        call(
            &self.addr,
            "node info",
            self.timeout,
            c.get_node_info(pb::NodeInfoRequest {}),
        )
        .await
    }

    /// Start the volume's engine on this node (idempotent for the same
    /// spec; another spec for a running volume is `Refused` with
    /// `AlreadyExists`, a bad spec with `InvalidArgument`).
    pub async fn start_engine(
        &self,
        spec: pb::EngineSpec,
    ) -> Result<pb::EngineStatus, ClientError> {
        let mut c = self.inner.clone();
        let request = pb::StartEngineRequest { spec: Some(spec) };
        call(
            &self.addr,
            "start engine",
            self.timeout,
            c.start_engine(request),
        )
        .await
    }

    /// Stop the volume's engine, flushing first (unknown volume: Ok).
    pub async fn stop_engine(&self, volume: &str) -> Result<(), ClientError> {
        let mut c = self.inner.clone();
        let request = pb::StopEngineRequest {
            volume: volume.to_string(),
        };
        call(
            &self.addr,
            "stop engine",
            self.timeout,
            c.stop_engine(request),
        )
        .await
        .map(|_| ())
    }

    /// The status of the volume's engine (`NotFound` when none runs here).
    pub async fn get_engine(&self, volume: &str) -> Result<pb::EngineStatus, ClientError> {
        let mut c = self.inner.clone();
        let request = pb::GetEngineRequest {
            volume: volume.to_string(),
        };
        call(
            &self.addr,
            "get engine",
            self.timeout,
            c.get_engine(request),
        )
        .await
    }

    /// The replicas of the volume's engine, as it sees them.
    pub async fn engine_replicas(&self, volume: &str) -> Result<Vec<ReplicaStatus>, ClientError> {
        let mut c = self.inner.clone();
        let request = pb::GetEngineRequest {
            volume: volume.to_string(),
        };
        call(
            &self.addr,
            "engine replicas",
            self.timeout,
            c.get_engine_replicas(request),
        )
        .await
        .map(|r| r.replicas)
    }

    /// Add a replica (a replica daemon address) to the volume's engine.
    pub async fn add_engine_replica(
        &self,
        volume: &str,
        address: &str,
    ) -> Result<String, ClientError> {
        let mut c = self.inner.clone();
        let request = pb::EngineReplicaRequest {
            volume: volume.to_string(),
            address: address.to_string(),
        };
        call(
            &self.addr,
            "add engine replica",
            self.timeout,
            c.add_engine_replica(request),
        )
        .await
        .map(|r| r.message)
    }

    /// Remove a replica from the volume's engine.
    pub async fn remove_engine_replica(
        &self,
        volume: &str,
        address: &str,
    ) -> Result<String, ClientError> {
        let mut c = self.inner.clone();
        let request = pb::EngineReplicaRequest {
            volume: volume.to_string(),
            address: address.to_string(),
        };
        call(
            &self.addr,
            "remove engine replica",
            self.timeout,
            c.remove_engine_replica(request),
        )
        .await
        .map(|r| r.message)
    }

    /// Every engine this node daemon runs.
    pub async fn list_engines(&self) -> Result<Vec<pb::EngineStatus>, ClientError> {
        let mut c = self.inner.clone();
        call(
            &self.addr,
            "list engines",
            self.timeout,
            c.list_engines(pb::ListEnginesRequest {}),
        )
        .await
        .map(|r| r.engines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_onto_variants() {
        let fenced = corral_proto::fenced_status("epoch 3 < 4");
        assert!(matches!(
            ClientError::from_status("a:1", &fenced),
            ClientError::Fenced { .. }
        ));
        // A FAILED_PRECONDITION without the mark is no fencing.
        let other = tonic::Status::failed_precondition("something else");
        assert!(matches!(
            ClientError::from_status("a:1", &other),
            ClientError::Refused {
                code: tonic::Code::FailedPrecondition,
                ..
            }
        ));
        let missing = tonic::Status::not_found("no replica");
        assert!(matches!(
            ClientError::from_status("a:1", &missing),
            ClientError::NotFound { .. }
        ));
        let not_open = tonic::Status::unavailable("not open at epoch 7");
        let e = ClientError::from_status("a:1", &not_open);
        assert!(e.is_unreachable(), "{e}");
    }

    #[tokio::test]
    async fn a_missing_unix_socket_is_unreachable_and_named() {
        let dir = std::env::temp_dir().join(format!("corral-client-{}", std::process::id()));
        let path = dir.join("none.sock");
        let e = connect_unix("10.0.0.5:9600", &path, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(e.is_unreachable(), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("10.0.0.5:9600") && text.contains("none.sock"),
            "{text}"
        );
    }

    #[test]
    fn bad_addresses_are_refused_before_any_connection() {
        assert!(matches!(
            endpoint("not a uri\n", Duration::from_secs(1)),
            Err(ClientError::BadAddress { .. })
        ));
        assert!(endpoint("127.0.0.1:9", Duration::from_secs(1)).is_ok());
    }
}
