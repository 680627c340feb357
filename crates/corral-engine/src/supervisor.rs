//! The supervisor: the engine's background loop that keeps the replica set
//! healthy while the volume serves.
//!
//! Every `retry_interval` (and whenever the data path reports a failure or
//! an operator adds a replica) it:
//! - pings every RW and WO replica (a control call bounded by the replica
//!   timeout), so a dead or partitioned replica is noticed even when idle;
//! - forgets what ERR replicas missed once they are past the stale-replica
//!   timeout (they will be rebuilt in full);
//! - tries to bring every ERR replica back: reconnect, create the replica if
//!   its daemon lost it, fence it at our epoch, join it to the write set in
//!   WO mode and start a rebuild — partial (only the chunks it missed, plus
//!   the regions its own write-intent bitmap marks) when it is the same
//!   replica instance and within the timeout, full otherwise. A full rebuild
//!   into a replica it has just created is told the target is empty, so the
//!   copier skips comparing against it and sends only the written blocks.

use std::sync::Arc;
use std::time::Duration;

use corral_proto::v1::{
    CreateReplicaRequest, GetReplicaRequest, OpenReplicaRequest, ReplicaInfo,
    replica_control_client::ReplicaControlClient,
};
use tokio::sync::broadcast;
use tonic::transport::Channel;
use tracing::{debug, info};

use crate::client::{ClientSettings, ReplicaClient, connect_control};
use crate::error::ReplicaIoError;
use crate::rebuild::{self, RebuildProgress, RebuildSettings};
use crate::replica_set::{CatchUp, Mode, SlotId};
use crate::volume::Volume;

/// How the supervisor runs.
#[derive(Clone, Debug)]
pub struct SupervisorConfig {
    pub retry_interval: Duration,
    pub stale_replica_timeout: Duration,
    pub client: ClientSettings,
    pub rebuild: RebuildSettings,
}

/// Flushes the volume once it has gone quiet: twice, `period` apart, after
/// its last write has finished. Replicas clear a write-intent region at the
/// second flush that finds it unwritten, and only the engine's flushes may
/// clear one: with no write in flight, every RW replica holds every write
/// the engine issued (a replica that failed one is already ERR). This keeps
/// the bitmaps — and so a returning replica's catch-up — small on a volume
/// that has gone idle, without flushing a busy one.
pub async fn flush_when_idle(
    volume: Arc<Volume>,
    period: Duration,
    mut shutdown: broadcast::Receiver<()>,
) {
    let mut last = volume.write_activity().0;
    // Flushes since the last write; two clear its regions.
    let mut flushed = 2u8;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.recv() => return,
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
pub async fn run(
    volume: Arc<Volume>,
    config: SupervisorConfig,
    mut shutdown: broadcast::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(config.retry_interval) => {}
            _ = volume.wake.notified() => {}
            _ = shutdown.recv() => return,
        }
        let set = volume.replica_set();
        if set.is_fenced() {
            continue;
        }
        ping_all(&volume).await;
        set.expire_stale(config.stale_replica_timeout);
        for (id, address) in set.returnable() {
            if !set.claim(id) {
                continue;
            }
            let volume = Arc::clone(&volume);
            let config = config.clone();
            tokio::spawn(async move {
                if let Err(why) = bring_back(&volume, id, &address, &config).await {
                    debug!(replica = %address, %why, "replica not back yet");
                    volume
                        .replica_set()
                        .release_with_backoff(id, &why, config.retry_interval / 2);
                }
            });
        }
    }
}

async fn ping_all(volume: &Volume) {
    let set = volume.replica_set();
    let timeout = set.timeout();
    let targets = set.write_targets();
    let pings = targets.iter().map(|(id, client, _)| {
        let mut control = client.control();
        let request = GetReplicaRequest {
            volume: volume.name().to_string(),
        };
        async move {
            let outcome = match tokio::time::timeout(timeout, control.get_replica(request)).await {
                Ok(Ok(_)) => None,
                Ok(Err(status)) => Some(ReplicaIoError::Unreachable(format!(
                    "{}: ping: {}",
                    client.addr(),
                    status.message()
                ))),
                Err(_) => Some(ReplicaIoError::Timeout(timeout)),
            };
            (*id, outcome, client.is_broken())
        }
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

async fn get_or_create(
    volume: &Volume,
    control: &mut ReplicaControlClient<Channel>,
    timeout: Duration,
) -> Result<(ReplicaInfo, bool), String> {
    let request = GetReplicaRequest {
        volume: volume.name().to_string(),
    };
    match tokio::time::timeout(timeout, control.get_replica(request)).await {
        Ok(Ok(info)) => return Ok((info.into_inner(), false)),
        Ok(Err(status)) if status.code() == tonic::Code::NotFound => {}
        Ok(Err(status)) => return Err(status.message().to_string()),
        Err(_) => return Err("timed out".into()),
    }
    use corral_block::BlockDevice;
    let request = CreateReplicaRequest {
        volume: volume.name().to_string(),
        size: volume.size(),
        block_size: volume.block_size(),
        chunk_size: volume.chunk_map().chunk_size() as u32,
    };
    let info = tokio::time::timeout(timeout, control.create_replica(request))
        .await
        .map_err(|_| "create timed out".to_string())?
        .map_err(|s| format!("create: {}", s.message()))?
        .into_inner();
    info!(volume = %volume.name(), "created a replica on a daemon that had none");
    Ok((info, true))
}

/// Chunks inside the write-intent regions a replica reports dirty.
fn dirty_chunks(volume: &Volume, info: &ReplicaInfo) -> Vec<u64> {
    let chunk = volume.chunk_map().chunk_size();
    let region = info.region_size.max(chunk);
    let mut out = Vec::new();
    for start in &info.dirty_regions {
        let first = start / chunk;
        let last = (start + region).div_ceil(chunk).min(volume.chunk_count());
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
) -> Result<(), String> {
    let set = Arc::clone(volume.replica_set());
    let timeout = set.timeout();
    let mut control = connect_control(address, timeout)
        .await
        .map_err(|e| e.to_string())?;
    let (info, created) = get_or_create(volume, &mut control, timeout).await?;
    use corral_block::BlockDevice;
    if info.size != volume.size() {
        return Err(format!(
            "its replica has size {}, the volume {}: not touching it",
            info.size,
            volume.size()
        ));
    }
    let (instance, missed_known, away, resume) = set
        .catch_up_facts(id)
        .ok_or_else(|| "member was removed".to_string())?;
    let same = !instance.is_empty() && instance == info.instance_id;
    let stale = away > config.stale_replica_timeout;
    let (catch_up, kind) = if created || !same {
        (CatchUp::Full { start: 0 }, "full")
    } else if missed_known && !stale {
        (CatchUp::Partial, "partial")
    } else if let Some(cursor) = info.rebuild_cursor.or(resume) {
        (CatchUp::Full { start: cursor }, "resumed")
    } else {
        (CatchUp::Full { start: 0 }, "full")
    };
    // Fence it at our epoch.
    let request = OpenReplicaRequest {
        volume: volume.name().to_string(),
        epoch: set.epoch(),
    };
    match tokio::time::timeout(timeout, control.open_replica(request)).await {
        Ok(Ok(_)) => {}
        Ok(Err(status)) if status.code() == tonic::Code::FailedPrecondition => {
            set.mark_fenced(status.message());
            return Err(format!("fenced: {}", status.message()));
        }
        Ok(Err(status)) => return Err(format!("open: {}", status.message())),
        Err(_) => return Err("open timed out".into()),
    }
    let client = Arc::new(
        ReplicaClient::connect(address, volume.name(), &config.client)
            .await
            .map_err(|e| e.to_string())?,
    );
    // Besides what it missed while away: whatever its own write-intent
    // bitmap says may have been in flight when it stopped, and, for a
    // resumed rebuild, what the RW replicas had in flight.
    let mut extra = dirty_chunks(volume, &info);
    if kind == "resumed" {
        for (_, source) in set.read_targets() {
            let mut c = source.control();
            let request = GetReplicaRequest {
                volume: volume.name().to_string(),
            };
            if let Ok(Ok(i)) = tokio::time::timeout(timeout, c.get_replica(request)).await {
                extra.extend(dirty_chunks(volume, &i.into_inner()));
            }
        }
    }
    let progress = Arc::new(RebuildProgress::new(address, kind));
    let mut chunks = set
        .join_write_set(
            id,
            Arc::clone(&client),
            info.instance_id.clone(),
            catch_up,
            Arc::clone(&progress),
        )
        .await?;
    chunks.extend(extra);
    chunks.sort_unstable();
    chunks.dedup();
    info!(volume = %volume.name(), replica = %address, kind, chunks = chunks.len(),
        "replica is back: rebuilding it in WO mode");
    let job = rebuild::RebuildJob {
        chunks,
        record_cursor: kind != "partial",
        // Only a replica created just now is known to be empty: one that
        // merely has a new instance id, or is past the stale timeout, may
        // hold anything and is compared block by block.
        target_empty: created,
    };
    rebuild::run(
        Arc::clone(volume),
        id,
        client,
        job,
        progress,
        config.rebuild.clone(),
    )
    .await?;
    debug_assert!(
        set.status()
            .iter()
            .any(|s| s.id == id && s.mode == Mode::Rw)
    );
    Ok(())
}
