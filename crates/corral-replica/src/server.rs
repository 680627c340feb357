//! Building and running the replica daemon's gRPC server. This is the one
//! place where the daemon's listeners are made: plain TCP, or mutual TLS when
//! the daemon is given a [`ServerTls`] ([`ReplicaDaemon::with_tls`]), and
//! optionally a unix socket serving the same services with the same HTTP/2
//! settings for engines on this node ([`ReplicaDaemon::with_unix`], see
//! [`crate::unix`]). [`ReplicaDaemon`] lets a caller serve its own gRPC
//! services beside the replica services on the same listeners (`corral
//! node` adds its engine manager).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use corral_proto::v1::replica_control_server::ReplicaControlServer;
use corral_proto::v1::replica_data_server::ReplicaDataServer;
use corral_tls::ServerTls;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tracing::info;

use crate::control::ControlService;
use crate::data::DataService;
use crate::error::ReplicaError;
use crate::metrics::ReplicaMetrics;
use crate::registry::ReplicaRegistry;
use crate::unix::UnixSocket;

/// How a replica daemon runs.
#[derive(Clone, Debug)]
pub struct ReplicaServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
}

/// Flow-control windows sized for 1 MiB writes in flight (see DESIGN.md).
pub const STREAM_WINDOW: u32 = 16 << 20;
pub const CONNECTION_WINDOW: u32 = 64 << 20;
pub const MAX_FRAME: u32 = (1 << 20) - 1;
/// Streams one client connection may have open at once (an engine uses one
/// per data connection and a few control calls; the bound keeps a broken
/// or hostile client from making the daemon hold unbounded stream state).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// A replica that has executed data requests since its last sync is synced in the
/// background once it has had no data requests for this long...
pub const IDLE_SYNC_AFTER: Duration = Duration::from_secs(3);
/// ...or, while it stays busy, once this long after its last background sync.
pub const BUSY_SYNC_INTERVAL: Duration = Duration::from_secs(30);

/// Run a replica daemon until `shutdown` resolves, then close every replica cleanly.
pub async fn serve(
    config: ReplicaServerConfig,
    shutdown: CancellationToken,
) -> Result<(), ReplicaError> {
    let listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|source| ReplicaError::Listen {
                addr: config.listen.to_string(),
                source,
            })?;
    serve_listener(listener, config.data_dir, shutdown).await
}

/// Like [`serve`], on a listener the caller bound (tests bind port 0).
pub async fn serve_listener(
    listener: TcpListener,
    data_dir: PathBuf,
    shutdown: CancellationToken,
) -> Result<(), ReplicaError> {
    serve_with_metrics(listener, data_dir, None, shutdown).await
}

/// Like [`serve_listener`], also serving Prometheus metrics on `metrics`.
pub async fn serve_with_metrics(
    listener: TcpListener,
    data_dir: PathBuf,
    metrics: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), ReplicaError> {
    serve_with_tls(listener, data_dir, metrics, None, shutdown).await
}

/// Like [`serve_with_metrics`], over mutual TLS when `tls` is given.
pub async fn serve_with_tls(
    listener: TcpListener,
    data_dir: PathBuf,
    metrics: Option<TcpListener>,
    tls: Option<ServerTls>,
    shutdown: CancellationToken,
) -> Result<(), ReplicaError> {
    ReplicaDaemon::open(data_dir)
        .await?
        .with_tls(tls)
        .serve(listener, metrics, Routes::default(), shutdown)
        .await
}

/// A replica daemon whose replicas are open, not yet serving. A caller that
/// serves more than the replica services on the same listener (the node
/// daemon) opens it, reads what it needs from [`ReplicaDaemon::registry`],
/// and hands its own services to [`ReplicaDaemon::serve`] as tonic
/// [`Routes`].
pub struct ReplicaDaemon {
    registry: Arc<ReplicaRegistry>,
    data_dir: PathBuf,
    tls: Option<ServerTls>,
    unix: Option<PathBuf>,
}

impl ReplicaDaemon {
    /// Open the data dir (creating it) and every replica in it.
    pub async fn open(data_dir: PathBuf) -> Result<Self, ReplicaError> {
        let dir = data_dir.clone();
        let registry = Arc::new(
            tokio::task::spawn_blocking(move || ReplicaRegistry::open(&dir))
                .await
                .map_err(|e| ReplicaError::Task(e.to_string()))??,
        );
        Ok(ReplicaDaemon {
            registry,
            data_dir,
            tls: None,
            unix: None,
        })
    }

    /// Serve over mutual TLS (`None`: plain TCP).
    pub fn with_tls(mut self, tls: Option<ServerTls>) -> Self {
        self.tls = tls;
        self
    }

    /// Also serve on a unix socket at `path` (`None`: TCP only): the same
    /// services, never TLS, the file owner-only (see [`crate::unix`]).
    pub fn with_unix(mut self, path: Option<PathBuf>) -> Self {
        self.unix = path;
        self
    }

    /// The replicas this daemon hosts.
    pub fn registry(&self) -> &Arc<ReplicaRegistry> {
        &self.registry
    }

    /// Serve `ReplicaControl` and `ReplicaData`, plus the services in
    /// `extra`, on `listener` and the unix socket if any (and metrics on
    /// `metrics`) until `shutdown` is cancelled; then close every replica
    /// cleanly and remove the socket file.
    pub async fn serve(
        self,
        listener: TcpListener,
        metrics: Option<TcpListener>,
        extra: Routes,
        shutdown: CancellationToken,
    ) -> Result<(), ReplicaError> {
        serve_registry(self, listener, metrics, extra, shutdown).await
    }
}

/// [`ReplicaDaemon::serve`].
async fn serve_registry(
    daemon: ReplicaDaemon,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    extra: Routes,
    shutdown: CancellationToken,
) -> Result<(), ReplicaError> {
    let ReplicaDaemon {
        registry,
        data_dir,
        tls,
        unix,
    } = daemon;
    // Bound before anything serves: a path in use is an immediate error.
    let mut unix = unix.as_deref().map(UnixSocket::bind).transpose()?;
    let local = listener
        .local_addr()
        .map_err(|source| ReplicaError::Listen {
            addr: "?".into(),
            source,
        })?;
    info!(listen = %local, data_dir = %data_dir.display(), tls = tls.is_some(),
        unix = ?unix.as_ref().map(|u| u.path().display().to_string()), "replica daemon serving");
    // TCP_NODELAY is set on every accepted socket there.
    let incoming = corral_tls::grpc::incoming(listener, tls);
    let max = corral_proto::MAX_MESSAGE_BYTES;
    let mut registry_metrics = corral_metrics::Registry::default();
    let replica_metrics = ReplicaMetrics::register(&mut registry_metrics);
    if let Some(listener) = metrics {
        let refreshed = replica_metrics.clone();
        let hosted = Arc::clone(&registry);
        let exporter =
            corral_metrics::Exporter::new(registry_metrics, move || refreshed.refresh(&hosted));
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = corral_metrics::serve(listener, exporter, stop).await {
                tracing::warn!(error = %e, "metrics endpoint stopped");
            }
        });
    }
    // Background sync: makes a replica's writes durable once it has gone
    // quiet for a few seconds, and every `BUSY_SYNC_INTERVAL` while it
    // stays busy (an fdatasync every few seconds would tie a busy writer to
    // the disk's speed). It does not clear write-intent bits: only the
    // engine's flushes may (see `ReplicaStore::sync`).
    {
        let registry = Arc::clone(&registry);
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(IDLE_SYNC_AFTER);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Per volume: the batch count at the last tick, at the last
            // sync, and when that sync was.
            struct Seen {
                at_tick: u64,
                at_sync: u64,
                synced: tokio::time::Instant,
            }
            let mut seen: std::collections::HashMap<String, Seen> =
                std::collections::HashMap::new();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                let hosted_now = registry.all();
                seen.retain(|v, _| hosted_now.iter().any(|h| &h.volume == v));
                for hosted in hosted_now {
                    let batches = hosted.batches.load(std::sync::atomic::Ordering::Relaxed);
                    let now = tokio::time::Instant::now();
                    let s = seen.entry(hosted.volume.clone()).or_insert(Seen {
                        at_tick: batches,
                        at_sync: 0,
                        synced: now,
                    });
                    let idle = s.at_tick == batches;
                    s.at_tick = batches;
                    let overdue = now.duration_since(s.synced) >= BUSY_SYNC_INTERVAL;
                    if s.at_sync == batches || !(idle || overdue) {
                        continue;
                    }
                    s.at_sync = batches;
                    s.synced = now;
                    let syncing = Arc::clone(&hosted);
                    let result = tokio::task::spawn_blocking(move || syncing.store.sync()).await;
                    if let Ok(Err(e)) = result {
                        tracing::warn!(volume = %hosted.volume, error = %e, "background sync failed");
                    }
                }
            }
        });
    }
    let routes = extra
        .add_service(ReplicaControlServer::new(ControlService::new(Arc::clone(
            &registry,
        ))))
        .add_service(
            ReplicaDataServer::new(DataService::new(
                Arc::clone(&registry),
                shutdown.clone(),
                replica_metrics,
            ))
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        );
    // One builder for both listeners: the same windows, frame size, stream
    // bound and keepalives on TCP and on the unix socket.
    let server = || {
        tonic::transport::Server::builder()
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
    };
    let tcp = server()
        .add_routes(routes.clone())
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    let result = match unix.as_mut().and_then(UnixSocket::incoming) {
        None => tcp.await,
        Some(unix_incoming) => {
            let on_unix = server()
                .add_routes(routes)
                .serve_with_incoming_shutdown(unix_incoming, shutdown.clone().cancelled_owned());
            // Should one server fail, the daemon stops: the other is shut
            // down too rather than left serving alone.
            let (a, b) = tokio::join!(
                async {
                    let r = tcp.await;
                    shutdown.cancel();
                    r
                },
                async {
                    let r = on_unix.await;
                    shutdown.cancel();
                    r
                }
            );
            a.and(b)
        }
    };
    drop(unix);
    let closing = Arc::clone(&registry);
    tokio::task::spawn_blocking(move || closing.close_all())
        .await
        .map_err(|e| ReplicaError::Task(e.to_string()))?;
    info!("replica daemon stopped");
    result.map_err(ReplicaError::from)
}
