//! One replica daemon as the engine sees it.
//!
//! A [`ReplicaClient`] holds a control channel and a few data streams, each
//! over its own TCP connection. Requests are sharded onto streams by chunk
//! (so per-chunk order holds: the replica executes a stream in order),
//! batched (up to `MAX_BATCH_REQUESTS` or `MAX_BATCH_BYTES` per message) and
//! pipelined (matched by id), with a bounded number in flight per stream.
//!
//! All channels are built by [`corral_client::endpoint`], the one place
//! where TLS goes; control calls go through [`corral_client::ReplicaControl`].
//! A replica whose daemon runs on this node (`--local-replica`) is reached
//! over its unix socket instead of TCP ([`ClientSettings::channel`]): its
//! control channel and data streams alike, at first and at every
//! reconnection, so that nothing else needs to know.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use corral_client::{ClientError, ReplicaControl};
use corral_proto::v1::{
    DataErrorCode, DataReply, DataRequest, DataRequestBatch, data_reply, data_request,
    replica_data_client::ReplicaDataClient,
};
use corral_proto::{MAX_BATCH_BYTES, MAX_BATCH_REQUESTS, MAX_MESSAGE_BYTES};
use corral_types::Epoch;
use tokio::sync::{Semaphore, TryAcquireError, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;
use tracing::debug;

use crate::error::ReplicaIoError;

/// What a successful data request returns.
#[derive(Debug)]
pub enum DataOutcome {
    Done,
    Read(bytes::Bytes),
    Checksums(Vec<u32>),
}

/// In-flight room on a client's streams, held until the replies are in.
pub struct Reservation {
    _permits: Vec<tokio::sync::OwnedSemaphorePermit>,
}

/// A queued request's reply.
pub struct PendingReply {
    rx: oneshot::Receiver<Result<DataOutcome, ReplicaIoError>>,
    addr: String,
}

impl PendingReply {
    /// Wait for the reply (no timeout: the caller bounds it).
    pub async fn wait(self) -> Result<DataOutcome, ReplicaIoError> {
        self.rx.await.map_err(|_| {
            ReplicaIoError::Unreachable(format!("{}: data stream closed", self.addr))
        })?
    }
}

struct Pending {
    request: DataRequest,
    reply: oneshot::Sender<Result<DataOutcome, ReplicaIoError>>,
    size: usize,
}

struct DataStream {
    queue: mpsc::UnboundedSender<Pending>,
    inflight: Arc<Semaphore>,
    capacity: u32,
    task: JoinHandle<()>,
}

/// Connection settings shared by all clients of one engine.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    pub timeout: Duration,
    pub streams: usize,
    pub inflight_per_stream: usize,
    /// Replicas on this node: address → their daemon's unix socket.
    pub local_sockets: Arc<BTreeMap<String, PathBuf>>,
}

impl ClientSettings {
    /// The settings of an engine's configuration.
    pub fn of(cfg: &crate::config::EngineConfig) -> Self {
        ClientSettings {
            timeout: cfg.replica_timeout,
            streams: cfg.streams_per_replica,
            inflight_per_stream: cfg.inflight_per_stream,
            local_sockets: Arc::new(cfg.local_replicas.clone()),
        }
    }

    /// The unix socket of the replica daemon at `addr`, if it is on this node.
    pub fn socket_of(&self, addr: &str) -> Option<&Path> {
        self.local_sockets.get(addr).map(PathBuf::as_path)
    }

    /// A new channel to the replica daemon at `addr`: over its unix socket
    /// when it is on this node, else over TCP (TLS when the process has it).
    pub async fn channel(&self, addr: &str) -> Result<Channel, ClientError> {
        match self.socket_of(addr) {
            Some(path) => corral_client::connect_unix(addr, path, self.timeout).await,
            None => corral_client::connect(addr, self.timeout).await,
        }
    }

    /// The control service of the replica daemon at `addr` (see
    /// [`ClientSettings::channel`]).
    pub async fn control(&self, addr: &str) -> Result<ReplicaControl, ClientError> {
        Ok(ReplicaControl::on(
            addr,
            self.channel(addr).await?,
            self.timeout,
        ))
    }
}

/// A connected replica daemon, for one volume.
pub struct ReplicaClient {
    addr: String,
    /// Connected over its daemon's unix socket (a replica on this node).
    local: bool,
    volume: String,
    control: ReplicaControl,
    streams: Vec<DataStream>,
    timeout: Duration,
    broken: Arc<AtomicBool>,
}

/// The control service of the replica daemon at `addr` (no data streams).
pub async fn connect_control(
    addr: &str,
    settings: &ClientSettings,
) -> Result<ReplicaControl, ReplicaIoError> {
    settings
        .control(addr)
        .await
        .map_err(|e| ReplicaIoError::Unreachable(e.to_string()))
}

impl ReplicaClient {
    /// Connect the control channel and `settings.streams` data streams for
    /// `volume`, in the replica's open session `open_session` (what opening
    /// it returned): should the replica be opened again meanwhile, these
    /// streams are served nothing.
    pub async fn connect(
        addr: &str,
        volume: &str,
        open_session: u64,
        settings: &ClientSettings,
    ) -> Result<Self, ReplicaIoError> {
        let control = connect_control(addr, settings).await?;
        let broken = Arc::new(AtomicBool::new(false));
        let mut streams = Vec::with_capacity(settings.streams);
        for _ in 0..settings.streams.max(1) {
            let channel = settings
                .channel(addr)
                .await
                .map_err(|e| ReplicaIoError::Unreachable(e.to_string()))?;
            let data = ReplicaDataClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            streams.push(open_stream(
                data,
                addr,
                volume,
                open_session,
                settings.inflight_per_stream,
                Arc::clone(&broken),
            ));
        }
        Ok(ReplicaClient {
            addr: addr.to_string(),
            local: settings.socket_of(addr).is_some(),
            volume: volume.to_string(),
            control,
            streams,
            timeout: settings.timeout,
            broken,
        })
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn volume(&self) -> &str {
        &self.volume
    }

    /// Whether it is reached over its daemon's unix socket: a replica on
    /// this node, which reads go to first.
    pub fn is_local(&self) -> bool {
        self.local
    }

    /// This replica's control service.
    pub fn control(&self) -> &ReplicaControl {
        &self.control
    }

    /// True once any data stream has broken: the replica must be reconnected.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }

    fn stream_of(&self, chunk: u64) -> usize {
        (chunk % self.streams.len() as u64) as usize
    }

    fn check_usable(&self) -> Result<(), ReplicaIoError> {
        if self.is_broken() {
            return Err(ReplicaIoError::Unreachable(format!(
                "{}: data stream broken",
                self.addr
            )));
        }
        Ok(())
    }

    /// Reserve in-flight room for one request per entry of `chunks`, taking
    /// the streams' permits in ascending stream order (so that concurrent
    /// reservations can never wait on each other in a cycle).
    pub async fn reserve(&self, chunks: &[u64]) -> Result<Reservation, ReplicaIoError> {
        let counts = self.requests_per_stream(chunks)?;
        let mut permits = Vec::new();
        for (i, n) in counts.into_iter().enumerate() {
            if n == 0 {
                continue;
            }
            let permit = Arc::clone(&self.streams[i].inflight)
                .acquire_many_owned(n)
                .await
                .map_err(|_| {
                    ReplicaIoError::Unreachable(format!("{}: client closed", self.addr))
                })?;
            permits.push(permit);
        }
        Ok(Reservation { _permits: permits })
    }

    /// [`ReplicaClient::reserve`] if every stream has the room now; `None`
    /// when one would have to wait (the caller then waits, with a timer).
    pub fn try_reserve(&self, chunks: &[u64]) -> Option<Result<Reservation, ReplicaIoError>> {
        let counts = match self.requests_per_stream(chunks) {
            Ok(c) => c,
            Err(e) => return Some(Err(e)),
        };
        let mut permits = Vec::new();
        for (i, n) in counts.into_iter().enumerate() {
            if n == 0 {
                continue;
            }
            match Arc::clone(&self.streams[i].inflight).try_acquire_many_owned(n) {
                Ok(permit) => permits.push(permit),
                Err(TryAcquireError::NoPermits) => return None,
                Err(TryAcquireError::Closed) => {
                    return Some(Err(ReplicaIoError::Unreachable(format!(
                        "{}: client closed",
                        self.addr
                    ))));
                }
            }
        }
        Some(Ok(Reservation { _permits: permits }))
    }

    /// How many of `chunks` go to each stream; an error when the client is
    /// broken or one stream would get more than it may have in flight.
    fn requests_per_stream(&self, chunks: &[u64]) -> Result<Vec<u32>, ReplicaIoError> {
        self.check_usable()?;
        let mut counts = vec![0u32; self.streams.len()];
        for c in chunks {
            counts[self.stream_of(*c)] += 1;
        }
        for (i, n) in counts.iter().enumerate() {
            if *n > self.streams[i].capacity {
                return Err(ReplicaIoError::Rejected(format!(
                    "{} requests on one stream exceed its in-flight limit of {}",
                    n, self.streams[i].capacity
                )));
            }
        }
        Ok(counts)
    }

    /// Queue one request on the stream that owns `chunk`, without waiting.
    /// The caller holds a [`Reservation`] covering it. Requests queued on a
    /// stream are sent, and executed by the replica, in queueing order.
    pub fn send(
        &self,
        chunk: u64,
        epoch: Epoch,
        op: data_request::Op,
    ) -> Result<PendingReply, ReplicaIoError> {
        self.check_usable()?;
        let stream = &self.streams[self.stream_of(chunk)];
        let size = match &op {
            data_request::Op::Write(w) => w.data.len(),
            _ => 0,
        } + 64;
        let (tx, rx) = oneshot::channel();
        stream
            .queue
            .send(Pending {
                request: DataRequest {
                    id: 0,
                    epoch: epoch.0,
                    op: Some(op),
                },
                reply: tx,
                size,
            })
            .map_err(|_| {
                ReplicaIoError::Unreachable(format!("{}: data stream closed", self.addr))
            })?;
        Ok(PendingReply {
            rx,
            addr: self.addr.clone(),
        })
    }

    /// Send one data request on the stream that owns `chunk` and wait for its
    /// reply, at most the replica timeout (queueing included).
    pub async fn call(
        &self,
        chunk: u64,
        epoch: Epoch,
        op: data_request::Op,
    ) -> Result<DataOutcome, ReplicaIoError> {
        let work = async {
            let _reservation = self.reserve(&[chunk]).await?;
            self.send(chunk, epoch, op)?.wait().await
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(ReplicaIoError::Timeout(self.timeout)),
        }
    }

    /// The replica timeout this client applies.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Stop every data stream now; requests in flight fail.
    pub fn shutdown(&self) {
        self.broken.store(true, Ordering::Relaxed);
        for s in &self.streams {
            s.task.abort();
        }
    }
}

impl Drop for ReplicaClient {
    fn drop(&mut self) {
        for s in &self.streams {
            s.task.abort();
        }
    }
}

fn open_stream(
    client: ReplicaDataClient<Channel>,
    addr: &str,
    volume: &str,
    open_session: u64,
    inflight: usize,
    broken: Arc<AtomicBool>,
) -> DataStream {
    let (queue, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(run_stream(
        client,
        addr.to_string(),
        volume.to_string(),
        open_session,
        rx,
        broken,
    ));
    DataStream {
        queue,
        inflight: Arc::new(Semaphore::new(inflight.max(1))),
        capacity: inflight.max(1) as u32,
        task,
    }
}

type ReplyMap = HashMap<u64, oneshot::Sender<Result<DataOutcome, ReplicaIoError>>>;

/// Drive one data stream: batch queued requests out, match replies in.
async fn run_stream(
    mut client: ReplicaDataClient<Channel>,
    addr: String,
    volume: String,
    open_session: u64,
    mut queue: mpsc::UnboundedReceiver<Pending>,
    broken: Arc<AtomicBool>,
) {
    let (out, out_rx) = mpsc::unbounded_channel::<DataRequestBatch>();
    let mut request = tonic::Request::new(UnboundedReceiverStream::new(out_rx));
    match volume.parse() {
        Ok(v) => {
            let metadata = request.metadata_mut();
            metadata.insert(corral_proto::VOLUME_METADATA_KEY, v);
            metadata.insert(
                corral_proto::OPEN_SESSION_METADATA_KEY,
                tonic::metadata::MetadataValue::from(open_session),
            );
        }
        Err(_) => {
            broken.store(true, Ordering::Relaxed);
            fail_all(
                &mut queue,
                &mut HashMap::new(),
                "volume name is not valid metadata",
            );
            return;
        }
    }
    let mut inbound = match client.stream(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            debug!(%addr, %status, "cannot open data stream");
            broken.store(true, Ordering::Relaxed);
            fail_all(&mut queue, &mut HashMap::new(), &status.to_string());
            return;
        }
    };
    let mut waiting: ReplyMap = HashMap::new();
    let mut next_id: u64 = 1;
    let reason = loop {
        tokio::select! {
            pending = queue.recv() => {
                let Some(first) = pending else { break "client dropped".to_string() };
                let mut batch = Vec::with_capacity(MAX_BATCH_REQUESTS);
                let mut bytes = 0;
                let mut add = |p: Pending, batch: &mut Vec<DataRequest>, bytes: &mut usize| {
                    let mut request = p.request;
                    request.id = next_id;
                    next_id += 1;
                    *bytes += p.size;
                    waiting.insert(request.id, p.reply);
                    batch.push(request);
                };
                add(first, &mut batch, &mut bytes);
                while batch.len() < MAX_BATCH_REQUESTS && bytes < MAX_BATCH_BYTES {
                    match queue.try_recv() {
                        Ok(p) => add(p, &mut batch, &mut bytes),
                        Err(_) => break,
                    }
                }
                if out.send(DataRequestBatch { requests: batch }).is_err() {
                    break "request stream closed".to_string();
                }
            }
            reply = inbound.message() => match reply {
                Ok(Some(replies)) => {
                    for reply in replies.replies {
                        if let Some(tx) = waiting.remove(&reply.id) {
                            let _ = tx.send(outcome(&addr, reply));
                        }
                    }
                }
                Ok(None) => break "replica closed the data stream".to_string(),
                Err(status) => break format!("data stream failed: {status}"),
            }
        }
    };
    debug!(%addr, %reason, "data stream ended");
    broken.store(true, Ordering::Relaxed);
    fail_all(&mut queue, &mut waiting, &reason);
}

fn fail_all(queue: &mut mpsc::UnboundedReceiver<Pending>, waiting: &mut ReplyMap, reason: &str) {
    for (_, tx) in waiting.drain() {
        let _ = tx.send(Err(ReplicaIoError::Unreachable(reason.to_string())));
    }
    queue.close();
    while let Ok(p) = queue.try_recv() {
        let _ = p
            .reply
            .send(Err(ReplicaIoError::Unreachable(reason.to_string())));
    }
}

fn outcome(addr: &str, reply: DataReply) -> Result<DataOutcome, ReplicaIoError> {
    match reply.result {
        Some(data_reply::Result::Done(_)) => Ok(DataOutcome::Done),
        Some(data_reply::Result::Read(r)) => {
            let computed = crc32c::crc32c(&r.data);
            if computed != r.crc32c {
                return Err(ReplicaIoError::Unreachable(format!(
                    "{addr}: read payload CRC32C {computed:#010x} does not match {:#010x} (corrupted in transit)",
                    r.crc32c
                )));
            }
            Ok(DataOutcome::Read(r.data))
        }
        Some(data_reply::Result::Checksums(c)) => Ok(DataOutcome::Checksums(c.crc32c)),
        Some(data_reply::Result::Error(e)) => {
            let message = format!("{addr}: {}", e.message);
            Err(match DataErrorCode::try_from(e.code) {
                Ok(DataErrorCode::StaleEpoch) => ReplicaIoError::Fenced(message),
                Ok(DataErrorCode::Checksum) => ReplicaIoError::Checksum {
                    offset: e.offset,
                    message,
                },
                Ok(DataErrorCode::OutOfRange) | Ok(DataErrorCode::Invalid) => {
                    ReplicaIoError::Rejected(message)
                }
                Ok(DataErrorCode::NoSpace) => ReplicaIoError::NoSpace(message),
                _ => ReplicaIoError::Io(message),
            })
        }
        None => Err(ReplicaIoError::Io(format!("{addr}: empty reply"))),
    }
}
