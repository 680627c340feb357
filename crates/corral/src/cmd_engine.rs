//! `corral engine`: open a volume over its replicas and serve it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use corral_engine::{Engine, EngineConfig, EngineOptions, WritePolicy};
use tokio::net::TcpListener;

use crate::frontends::{EngineFrontends, FrontendListeners, read_chap_file};
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
    /// A replica whose daemon runs on this node, and the unix socket that
    /// daemon serves on (its --listen-unix): ADDR=PATH, ADDR one of the
    /// --replica addresses. Its control channel and data streams go over
    /// the socket, and reads go to it first. Give one per local replica.
    #[arg(long = "local-replica", value_name = "ADDR=PATH", value_parser = corral_engine::config::parse_local_replica)]
    pub local_replicas: Vec<(String, PathBuf)>,
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
    /// TLS on the NBD frontend (NBD_OPT_STARTTLS with client certificates):
    /// off, allow (the client's choice) or require. Default: allow when
    /// --tls-* files are given, else off.
    #[arg(long, value_enum, requires = "nbd")]
    pub nbd_tls: Option<crate::tls::NbdTlsMode>,
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
    /// Data streams (TCP connections) per replica (decision 63).
    #[arg(long, default_value_t = 1)]
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
    /// Make a new volume a clone of the volume served by the engine at this
    /// control address: it serves I/O at once while its data is filled in
    /// behind it (`corral volume clone status`). Without --clone-snapshot the
    /// clone takes a snapshot named clone-VOLUME of the source, deleted once
    /// the clone is filled. Ignored once the replicas record the fill done.
    #[arg(long, value_name = "ENGINE_ADDR")]
    pub clone_from: Option<String>,
    /// The source's snapshot to clone (with --clone-from).
    #[arg(long, value_name = "NAME", requires = "clone_from")]
    pub clone_snapshot: Option<String>,
    /// Make a new volume from a backup: TARGET/VOLUME/BACKUP, e.g.
    /// s3://bucket/corral/db/backup-1733040000000 or file:///mnt/backups/db/b1.
    /// The volume is filled through the engine once (every block's BLAKE3
    /// checked); the frontends start when it is filled, unless
    /// --serve-while-filling. S3 keys from the environment (AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_REGION) or --s3-credentials.
    #[arg(long, value_name = "URL", conflicts_with = "clone_from")]
    pub from_backup: Option<String>,
    /// With --from-backup: serve I/O at once, a read of a part not yet
    /// restored reading it from the backup first.
    #[arg(long, requires = "from_backup")]
    pub serve_while_filling: bool,
    /// With --from-backup: the S3 endpoint (MinIO, Ceph RGW, s3s-fs), e.g. http://10.0.0.5:9000.
    #[arg(long, value_name = "URL", requires = "from_backup")]
    pub s3_endpoint: Option<String>,
    /// S3 keys for backups and restores: a file of KEY=VALUE lines
    /// (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION) instead of
    /// the environment; read when a backup or restore starts, so rotated
    /// keys need no restart.
    #[arg(long, value_name = "FILE")]
    pub s3_credentials: Option<std::path::PathBuf>,
    /// Send every write as the client sent it and run a flush round for
    /// every flush. By default, while a client flushes after each write (a
    /// database's commits at queue depth 1), its writes go FUA to the
    /// replicas and its flushes are answered without a second round trip.
    #[arg(long)]
    pub no_write_through: bool,
}

impl EngineArgs {
    fn config(&self) -> anyhow::Result<EngineConfig> {
        let mut cfg = EngineConfig::new(self.volume.clone(), self.size, self.replicas.clone());
        for (addr, path) in &self.local_replicas {
            if cfg
                .local_replicas
                .insert(addr.clone(), path.clone())
                .is_some()
            {
                bail!("--local-replica {addr} is given twice");
            }
        }
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
        cfg.write_through = !self.no_write_through;
        cfg.clone = self
            .clone_from
            .as_ref()
            .map(|engine| corral_engine::CloneSource {
                engine: engine.clone(),
                snapshot: self.clone_snapshot.clone(),
            });
        cfg.restore = self
            .from_backup
            .as_ref()
            .map(|backup| corral_engine::RestoreSource {
                backup: backup.clone(),
                s3: corral_backup::target::S3Settings {
                    endpoint: self.s3_endpoint.clone(),
                    credentials_file: self.s3_credentials.clone(),
                    ..Default::default()
                },
                serve_while_filling: self.serve_while_filling,
            });
        cfg.s3_credentials = self.s3_credentials.clone();
        corral_engine::open::validate(&cfg)?;
        Ok(cfg)
    }
}

pub async fn run(args: EngineArgs, tls: crate::tls::TlsArgs) -> anyhow::Result<()> {
    let cfg = args.config()?;
    let server_tls = tls.install()?;
    let shutdown = crate::shutdown::install()?;
    // Bind every listener first: a busy port is an immediate, clear error.
    let control = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("control listener on {}", args.listen))?;
    let chap = args.iscsi_chap.as_deref().map(read_chap_file).transpose()?;
    let listeners = FrontendListeners::bind(args.nbd, args.iscsi)
        .await?
        .with_nbd_tls(crate::tls::nbd_tls(args.nbd_tls, server_tls.as_ref())?);
    let metrics = match args.metrics {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("metrics listener on {addr}"))?,
        ),
        None => None,
    };
    let frontends = EngineFrontends {
        listeners,
        name: cfg.volume.clone(),
        chap,
    };
    let mut options = EngineOptions::new(cfg, control);
    options.metrics = metrics;
    options.open_timeout = args.open_timeout;
    options.control_tls = server_tls;
    let engine = Engine::start(options, Box::new(frontends), shutdown);
    engine.wait().await?;
    Ok(())
}
