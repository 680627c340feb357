//! The supervisor: the engine's background loop that keeps the replica set
//! healthy while the volume serves.
//!
//! Every `retry_interval` (and whenever the data path reports a failure or
//! an operator adds a replica) it:
//! - pings every RW and WO replica (a control call bounded by the replica
//!   timeout), so a dead or partitioned replica is noticed even when idle;
//! - once, at the start: checks that the RW replicas hold one snapshot
//!   chain ([`crate::chain_sync::check_rw_chains`]);
//! - forgets what ERR replicas missed once they are past the stale-replica
//!   timeout (they will be compared in full);
//! - tries to bring every ERR replica back: reconnect (over the daemon's
//!   unix socket for a replica on this node), create the replica if
//!   its daemon lost it, fence it at our epoch (which also ends whatever
//!   data streams of ours it still had), give it the snapshots it missed
//!   ([`crate::chain_sync`]), join it to the write set in WO mode
//!   and run the rebuild that [`crate::members::Members::join`] plans. A daemon that does not answer
//!   is tried again at the next retry; one that answers and then fails
//!   backs off (see [`crate::members::Members::release`]).

use std::sync::Arc;
use std::time::Duration;

use corral_block::BlockDevice;
use corral_client::{ClientError, ReplicaControl};
use corral_proto::v1::{CreateReplicaRequest, ReplicaInfo};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::chain_sync::{self, ChainSyncError};
use crate::client::{ClientSettings, ReplicaClient};
use crate::config::EngineConfig;
use crate::error::ReplicaIoError;
use crate::members::{Admission, MembershipError, ReturnFacts, ReturnFailure};
use crate::progress::RebuildProgress;
use crate::rebuild::{self, RebuildSettings};
use crate::replica_set::{JoinError, SlotId};
use crate::volume::Volume;

/// How the supervisor runs.
#[derive(Clone, Debug)]
pub struct SupervisorConfig {
    pub retry_interval: Duration,
    pub stale_replica_timeout: Duration,
    pub client: ClientSettings,
    pub rebuild: RebuildSettings,
}

impl SupervisorConfig {
    /// The supervisor's settings in an engine's configuration.
    pub fn of(cfg: &EngineConfig) -> Self {
        SupervisorConfig {
            retry_interval: cfg.retry_interval,
            stale_replica_timeout: cfg.stale_replica_timeout,
            client: ClientSettings::of(cfg),
            rebuild: RebuildSettings {
                concurrency: cfg.rebuild_concurrency,
                bandwidth: cfg.rebuild_bandwidth,
            },
        }
    }
}

/// Flushes the volume once it has gone quiet: twice, `period` apart, after
/// its last write has finished. Replicas clear a write-intent region at the
/// second flush that finds it unwritten, and only the engine's flushes may
/// clear one: with no write in flight, every RW replica holds every write
/// the engine issued (a replica that failed one is already ERR). This keeps
/// the bitmaps — and so a returning replica's catch-up — small on a volume
/// that has gone idle, without flushing a busy one.
pub async fn flush_when_idle(volume: Arc<Volume>, period: Duration, shutdown: CancellationToken) {
    let mut last = volume.write_activity().0;
    // Flushes since the last write; two clear its regions.
    let mut flushed = 2u8;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.cancelled() => return,
        }
        let (begun, in_flight) = volume.write_activity();
        if begun != last || in_flight > 0 {
            last = begun;
            flushed = 0;
            continue;
        }
        if flushed >= 2 || volume.replica_set().is_fenced() {
            continue;
        }
        match volume.flush_replicas().await {
            Ok(()) => flushed += 1,
            Err(e) => debug!(volume = %volume.name(), error = %e, "idle flush failed"),
        }
    }
}

/// Run until `shutdown`.
pub async fn run(volume: Arc<Volume>, config: SupervisorConfig, shutdown: CancellationToken) {
    // Whether the RW replicas are known to hold one snapshot chain.
    let mut chains_checked = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(config.retry_interval) => {}
            _ = volume.wake.notified() => {}
            _ = shutdown.cancelled() => return,
        }
        let set = volume.replica_set();
        if set.is_fenced() {
            continue;
        }
        ping_all(&volume).await;
        if !chains_checked {
            chains_checked = chain_sync::check_rw_chains(&volume).await;
        }
        set.expire_stale(config.stale_replica_timeout);
        for (id, address) in set.returnable() {
            if !set.claim(id) {
                continue;
            }
            let volume = Arc::clone(&volume);
            let config = config.clone();
            tokio::spawn(async move {
                if let Err(e) = bring_back(&volume, id, &address, &config).await {
                    let failure = match &e {
                        BringBackError::Unreachable(_) => ReturnFailure::Unreachable,
                        BringBackError::Refused(_) => ReturnFailure::Refused,
                    };
                    debug!(replica = %address, error = %e, "replica not back yet");
                    volume.replica_set().release(
                        id,
                        failure,
                        &e.to_string(),
                        config.retry_interval,
                    );
                }
            });
        }
    }
}

async fn ping_all(volume: &Volume) {
    let set = volume.replica_set();
    let timeout = set.timeout();
    let targets = set.write_targets();
    let pings = targets.iter().map(|(id, client, _)| async move {
        let outcome = match client.control().get(volume.name()).await {
            Ok(_) => None,
            Err(ClientError::TimedOut { .. }) => Some(ReplicaIoError::Timeout(timeout)),
            Err(e) => Some(ReplicaIoError::Unreachable(format!("ping: {e}"))),
        };
        (*id, outcome, client.is_broken())
    });
    for (id, outcome, broken) in futures::future::join_all(pings).await {
        let err = match (outcome, broken) {
            (Some(e), _) => e,
            (None, true) => ReplicaIoError::Unreachable("data stream broken".into()),
            (None, false) => continue,
        };
        let _ = set.handle_failure(id, &err, &[]).await;
    }
}

/// Why a return attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum BringBackError {
    /// Its daemon did not answer (or not in time): retried at the next tick.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// It answered and then failed or refused: retried with back-off.
    #[error("{0}")]
    Refused(String),
}

impl From<ClientError> for BringBackError {
    fn from(e: ClientError) -> Self {
        if e.is_unreachable() {
            BringBackError::Unreachable(e.to_string())
        } else {
            BringBackError::Refused(e.to_string())
        }
    }
}

async fn get_or_create(
    volume: &Volume,
    control: &ReplicaControl,
) -> Result<(ReplicaInfo, bool), BringBackError> {
    match control.get(volume.name()).await {
        Ok(info) => return Ok((info, false)),
        Err(ClientError::NotFound { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let request = CreateReplicaRequest {
        volume: volume.name().to_string(),
        size: volume.size(),
        block_size: volume.block_size(),
        chunk_size: volume.chunk_map().chunk_size() as u32,
    };
    let info = control.create(request).await?;
    info!(volume = %volume.name(), "created a replica on a daemon that had none");
    Ok((info, true))
}

/// Chunks inside the write-intent regions a replica reports dirty.
pub fn dirty_chunks(volume: &Volume, info: &ReplicaInfo) -> Vec<u64> {
    dirty_chunks_of(
        volume.chunk_map().chunk_size(),
        volume.chunk_count(),
        info.region_size,
        &info.dirty_regions,
    )
}

/// Chunks (of `chunk_size`, `chunk_count` in all) inside write-intent
/// regions of `region_size` bytes starting at the offsets `regions`.
pub fn dirty_chunks_of(
    chunk_size: u64,
    chunk_count: u64,
    region_size: u64,
    regions: &[u64],
) -> Vec<u64> {
    let region = region_size.max(chunk_size);
    let mut out = Vec::new();
    for start in regions {
        let first = start / chunk_size;
        let last = start
            .saturating_add(region)
            .div_ceil(chunk_size)
            .min(chunk_count);
        out.extend(first..last);
    }
    out
}

/// Try once to bring ERR member `id` back; on success a rebuild runs.
async fn bring_back(
    volume: &Arc<Volume>,
    id: SlotId,
    address: &str,
    config: &SupervisorConfig,
) -> Result<(), BringBackError> {
    use BringBackError::{Refused, Unreachable};
    let set = Arc::clone(volume.replica_set());
    // Over its unix socket when its daemon is on this node, as at open.
    let control = config.client.control(address).await?;
    let (info, created) = get_or_create(volume, &control).await?;
    if info.block_size != volume.block_size() {
        return Err(Refused(format!(
            "its replica has block size {}, the volume {}: not touching it",
            info.block_size,
            volume.block_size()
        )));
    }
    // Fence it at our epoch. This also cuts off any data stream of ours it
    // still had from before it failed: nothing queued there can land after
    // the rebuild has compared or copied a chunk.
    let info = match control
        .open_as(volume.name(), set.epoch(), crate::engine_id())
        .await
    {
        Ok(info) => info,
        Err(e @ ClientError::Fenced { .. }) => {
            set.mark_fenced(&e.to_string());
            return Err(Refused(e.to_string()));
        }
        Err(e) => return Err(e.into()),
    };
    // It missed an expansion: grow it first (a larger one — an expansion
    // cut short — is left as it is; nothing was written past the volume).
    let info = if info.size < volume.size() {
        let grown = control
            .expand(volume.name(), set.epoch(), volume.size())
            .await?;
        info!(volume = %volume.name(), replica = %address, from = info.size, to = grown.size,
            "grew a returning replica that missed an expansion");
        ReplicaInfo {
            open_session: info.open_session,
            ..grown
        }
    } else {
        info
    };
    let client = Arc::new(
        ReplicaClient::connect(address, volume.name(), info.open_session, &config.client)
            .await
            .map_err(|e| Unreachable(e.to_string()))?,
    );
    let mut facts = ReturnFacts {
        instance_id: info.instance_id.clone(),
        created,
        dirty_chunks: dirty_chunks(volume, &info),
    };
    // The snapshots it missed (or all, for a new replica), before it takes
    // any write: the join below is refused if the chain changes meanwhile.
    let chain_version = set.chain_version();
    if let Some((chunks, empty)) = set.catch_up_preview(id, &facts) {
        let missed = set.missed_deletes(id);
        let report = chain_sync::reconcile(
            volume,
            &client,
            &chunks,
            empty,
            missed.as_ref(),
            &config.rebuild,
        )
        .await
        .map_err(|e| match e {
            ChainSyncError::Target(_) | ChainSyncError::Fenced(_) => {
                Refused(format!("snapshot chain: {e}"))
            }
            // Not its fault: try again at the next tick.
            ChainSyncError::NoSource(_) | ChainSyncError::Source { .. } => {
                Unreachable(format!("snapshot chain: {e}"))
            }
        })?;
        // A new replica that was given snapshots holds data now: its
        // rebuild must compare, not assume it empty (a block the head has
        // since discarded would be left as the snapshot had it).
        if !report.replayed.is_empty() {
            facts.created = false;
        }
    }
    let mut progress = None;
    let admission = set
        .join_write_set(
            id,
            Arc::clone(&client),
            facts,
            info.size,
            chain_version,
            |plan| {
                let p = Arc::new(RebuildProgress::new(address, plan.kind));
                progress = Some(Arc::clone(&p));
                p
            },
        )
        .await;
    let plan = match admission {
        Ok(Admission::Rebuild(plan)) => plan,
        Ok(Admission::Readmitted) => {
            warn!(volume = %volume.name(), replica = %address,
                "the last RW replica is back: it holds the newest data, serving from it again");
            return Ok(());
        }
        // Nobody to rebuild it from yet: wait for the last RW replica.
        Err(e @ JoinError::Membership(MembershipError::NoSource)) => {
            return Err(Unreachable(e.to_string()));
        }
        // The volume grew meanwhile: grow it at the next tick.
        Err(e @ JoinError::TooSmall { .. }) => return Err(Unreachable(e.to_string())),
        // A snapshot was taken or deleted meanwhile: reconcile at the next tick.
        Err(e @ JoinError::ChainChanged) => return Err(Unreachable(e.to_string())),
        Err(e) => return Err(Refused(e.to_string())),
    };
    let Some(progress) = progress else {
        return Err(Refused("no rebuild progress".into()));
    };
    info!(volume = %volume.name(), replica = %address, kind = plan.kind.as_str(),
        chunks = plan.chunks.len(), "replica is back: rebuilding it in WO mode");
    rebuild::run(
        Arc::clone(volume),
        client,
        plan,
        progress,
        config.rebuild.clone(),
    )
    .await
    .map_err(|e| Refused(e.to_string()))
}
