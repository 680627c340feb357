//! `corral engine`: open a volume over its replicas and serve it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use corral_block::BlockDevice;
use corral_engine::control::EngineState;
use corral_engine::{EngineConfig, EngineError, WritePolicy, open::open_volume};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::frontends::{FrontendListeners, read_chap_file};
use crate::shutdown::Shutdown;
use crate::units::{parse_duration, parse_size};

#[derive(Args, Debug)]
pub struct EngineArgs {
    /// Volume name (also the NBD export name).
    #[arg(long)]
    pub volume: String,
    /// Volume size, e.g. 1GiB.
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    /// A replica daemon's address; give one per replica.
    #[arg(long = "replica", required = true)]
    pub replicas: Vec<String>,
    /// Address of the engine's control gRPC service.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Serve the volume over NBD on this address.
    #[arg(long)]
    pub nbd: Option<SocketAddr>,
    /// Serve the volume over iSCSI on this address (iqn.2026-11.io.corral:<volume>, LUN 0).
    #[arg(long)]
    pub iscsi: Option<SocketAddr>,
    /// Require iSCSI CHAP, with the credentials in this file (`user = ...`,
    /// `secret = ...`; with `mutual_user` and `mutual_secret` too, initiators
    /// must also have the target prove itself: mutual CHAP).
    #[arg(long, value_name = "FILE", requires = "iscsi")]
    pub iscsi_chap: Option<PathBuf>,
    /// A replica that does not answer within this goes to ERR.
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    pub replica_timeout: Duration,
    /// A failed replica returning within this is caught up incrementally.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub stale_replica_timeout: Duration,
    /// quorum or available (default: quorum for 3+ replicas, available for 1-2).
    #[arg(long)]
    pub write_policy: Option<WritePolicy>,
    /// Logical block size (512 or 4096).
    #[arg(long, default_value_t = 512)]
    pub block_size: u32,
    /// Chunk size: the unit of ordering and rebuild (power of two, >= 4KiB).
    #[arg(long, default_value = "256KiB", value_parser = parse_size)]
    pub chunk_size: u64,
    /// Data streams (TCP connections) per replica.
    #[arg(long, default_value_t = 2)]
    pub streams_per_replica: usize,
    /// Give up opening the volume after this long (replicas unreachable, waiting for a member).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub open_timeout: Duration,
    /// How often failed replicas are retried and healthy ones pinged.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub replica_retry_interval: Duration,
    /// Serve Prometheus metrics on http://ADDR/metrics.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Chunks a rebuild copies at once.
    #[arg(long, default_value_t = 8)]
    pub rebuild_concurrency: usize,
    /// Most bytes per second a rebuild copies (e.g. 100MiB; default unlimited).
    #[arg(long, value_parser = parse_size)]
    pub rebuild_bandwidth: Option<u64>,
}

impl EngineArgs {
    fn config(&self) -> anyhow::Result<EngineConfig> {
        let mut cfg = EngineConfig::new(self.volume.clone(), self.size, self.replicas.clone());
        cfg.replica_timeout = self.replica_timeout;
        cfg.stale_replica_timeout = self.stale_replica_timeout;
        if let Some(p) = self.write_policy {
            cfg.write_policy = p;
        }
        cfg.block_size = self.block_size;
        cfg.chunk_size = u32::try_from(self.chunk_size)
            .map_err(|_| anyhow::anyhow!("--chunk-size {} is too large", self.chunk_size))?;
        if self.streams_per_replica == 0 || self.streams_per_replica > 16 {
            bail!("--streams-per-replica must be between 1 and 16");
        }
        cfg.streams_per_replica = self.streams_per_replica;
        if self.replica_timeout.is_zero() {
            bail!("--replica-timeout must be more than 0");
        }
        if self.replica_retry_interval.is_zero() {
            bail!("--replica-retry-interval must be more than 0");
        }
        if self.rebuild_concurrency == 0 || self.rebuild_concurrency > 256 {
            bail!("--rebuild-concurrency must be between 1 and 256");
        }
        cfg.retry_interval = self.replica_retry_interval;
        cfg.rebuild_concurrency = self.rebuild_concurrency;
        cfg.rebuild_bandwidth = self.rebuild_bandwidth;
        corral_engine::open::validate(&cfg)?;
        Ok(cfg)
    }
}

/// How long a volume must stay without writes before each idle flush.
const IDLE_FLUSH_PERIOD: Duration = Duration::from_secs(3);

pub async fn run(args: EngineArgs) -> anyhow::Result<()> {
    let cfg = args.config()?;
    let shutdown = Shutdown::install()?;
    // Bind every listener first: a busy port is an immediate, clear error.
    let control = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("control listener on {}", args.listen))?;
    let chap = args.iscsi_chap.as_deref().map(read_chap_file).transpose()?;
    let listeners = FrontendListeners::bind(args.nbd, args.iscsi).await?;

    // The control service answers from now on: while the volume cannot be
    // opened yet, `corral volume info` says why, and `salvage` can help.
    let state = EngineState::new(cfg.clone());
    let control_task = tokio::spawn(corral_engine::control::serve_control(
        control,
        Arc::clone(&state),
        shutdown.signalled(),
    ));

    let mut registry = corral_metrics::Registry::default();
    let engine_metrics = corral_engine::metrics::EngineMetrics::register(&mut registry);
    if let Some(addr) = args.metrics {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("metrics listener on {addr}"))?;
        let refreshed = engine_metrics.clone();
        let seen = Arc::clone(&state);
        let exporter = corral_metrics::Exporter::new(registry, move || {
            if let Some(v) = seen.volume() {
                refreshed.refresh(v);
            }
        });
        tokio::spawn(corral_metrics::serve(
            listener,
            exporter,
            shutdown.signalled(),
        ));
    }

    let volume = {
        let mut stop = shutdown.subscribe();
        tokio::select! {
            v = open_with_retry(&cfg, &state, args.open_timeout) => v?,
            _ = stop.recv() => return Ok(()),
        }
    };
    state.set_volume(Arc::clone(&volume));
    let supervisor = tokio::spawn(corral_engine::supervisor::run(
        Arc::clone(&volume),
        cfg.supervisor(),
        shutdown.subscribe(),
    ));
    // Two flushes after the volume goes quiet let the replicas clear their
    // write-intent bitmaps (see `flush_when_idle`).
    tokio::spawn(corral_engine::supervisor::flush_when_idle(
        Arc::clone(&volume),
        IDLE_FLUSH_PERIOD,
        shutdown.subscribe(),
    ));

    // The frontends serve the volume through a wrapper that counts and times every I/O.
    let metered = Arc::new(corral_engine::metrics::Metered::new(
        Arc::clone(&volume),
        engine_metrics.clone(),
    ));
    let serving = listeners.serve(&cfg.volume, metered, chap, &shutdown)?;
    let frontends = serving.uris.join(" ");
    info!(volume = %cfg.volume, size = volume.size(), control = %args.listen, frontends = %frontends, "engine serving");
    state.set_frontends(frontends);
    for e in serving.wait().await? {
        warn!(error = %e, "frontend stopped with an error");
    }
    control_task.await??;
    let _ = supervisor.await;
    // Make everything acknowledged durable before leaving.
    if let Err(e) = volume.flush().await {
        warn!(error = %e, "final flush failed");
    }
    volume.replica_set().shutdown();
    info!("engine stopped");
    Ok(())
}

async fn open_with_retry(
    cfg: &EngineConfig,
    state: &EngineState,
    limit: Duration,
) -> anyhow::Result<Arc<corral_engine::Volume>> {
    let start = Instant::now();
    let mut last_reason = String::new();
    loop {
        let trust = state.salvage_target();
        match open_volume(cfg, trust.as_deref()).await {
            Ok(v) => return Ok(v),
            Err(EngineError::Open { reason, .. }) => {
                if reason != last_reason {
                    warn!(volume = %cfg.volume, %reason, "cannot open the volume yet; retrying");
                    state.set_waiting_for(&reason);
                    last_reason = reason.clone();
                }
                if start.elapsed() >= limit {
                    bail!(
                        "cannot open volume {} within {:?}: {reason}",
                        cfg.volume,
                        limit
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(other) => return Err(other.into()),
        }
    }
}
