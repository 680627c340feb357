//! Opening a volume: find its replicas, elect the up-to-date ones, fence
//! older engines with a new epoch, resync what was in flight, record the
//! new membership — and only then serve.
//!
//! The election follows DESIGN.md: the replicas that carry the highest
//! membership generation and are listed RW in that record (matched by
//! instance id, which changes when a replica is wiped and recreated) are up
//! to date; every other replica missed something and is left in ERR for a
//! rebuild. Before serving, the engine must reach enough of the newest
//! record's RW members:
//! - `available`: all of them (one of them may hold the only copy of the
//!   last acknowledged writes);
//! - `quorum`: a majority of the volume's replicas.

use std::collections::BTreeSet;
use std::sync::Arc;

use corral_client::{ClientError, ReplicaControl};
use corral_proto::v1::{self as pb, CreateReplicaRequest, ReplicaInfo, data_request::Op};
use tracing::{info, warn};

use crate::chunk::ChunkMap;

/// The unit of the replicas' checksums (and of a resync copy).
const BLOCK: u64 = corral_proto::CHECKSUM_BLOCK;
use crate::client::{ClientSettings, DataOutcome, ReplicaClient, connect_control};
use crate::clone::{CloneError, CloneFill};
use crate::config::{EngineConfig, WritePolicy};
use crate::error::{EngineError, OpenWait};
use crate::members::{Epoch, Generation, Members, OpenedMember, OpenedState};
use crate::replica_set::ReplicaSet;
use crate::volume::Volume;

enum Probe {
    Found(Box<ReplicaInfo>, ReplicaControl),
    Missing(ReplicaControl),
    Unreachable(String),
}

/// Check the configuration before touching any replica.
pub fn validate(cfg: &EngineConfig) -> Result<ChunkMap, EngineError> {
    if cfg.replicas.is_empty() {
        return Err(EngineError::Config("give at least one --replica".into()));
    }
    let unique: BTreeSet<_> = cfg.replicas.iter().collect();
    if unique.len() != cfg.replicas.len() {
        return Err(EngineError::Config(
            "a --replica address is given twice".into(),
        ));
    }
    if let Some(addr) = cfg
        .local_replicas
        .keys()
        .find(|addr| !cfg.replicas.contains(addr))
    {
        return Err(EngineError::Config(format!(
            "--local-replica {addr}: not one of the --replica addresses"
        )));
    }
    if cfg.size == 0 || !cfg.size.is_multiple_of(4096) {
        return Err(EngineError::Config(format!(
            "volume size {} must be a non-zero multiple of 4096 bytes",
            cfg.size
        )));
    }
    if cfg.clone.is_some() && cfg.restore.is_some() {
        return Err(EngineError::Config(
            "a new volume is either a clone (--clone-from) or a restore (--from-backup), not both"
                .into(),
        ));
    }
    if let Some(r) = &cfg.restore {
        corral_backup::BackupUrl::parse(&r.backup)
            .map_err(|e| EngineError::Config(format!("--from-backup: {e}")))?;
    }
    if cfg.block_size != 512 && cfg.block_size != 4096 {
        return Err(EngineError::Config(format!(
            "block size {} must be 512 or 4096",
            cfg.block_size
        )));
    }
    ChunkMap::new(cfg.chunk_size).ok_or_else(|| {
        EngineError::Config(format!(
            "chunk size {} must be a power of two of at least 4096",
            cfg.chunk_size
        ))
    })
}

fn open_err(cfg: &EngineConfig, wait: OpenWait) -> EngineError {
    EngineError::Open {
        volume: cfg.volume.clone(),
        wait,
    }
}

fn replica_err(cfg: &EngineConfig, replica: &str, what: impl Into<String>) -> EngineError {
    open_err(
        cfg,
        OpenWait::Replica {
            replica: replica.to_string(),
            what: what.into(),
        },
    )
}

async fn probe(cfg: &EngineConfig, addr: &str) -> Probe {
    let control = match connect_control(addr, &ClientSettings::of(cfg)).await {
        Ok(c) => c,
        Err(e) => return Probe::Unreachable(e.to_string()),
    };
    match control.get(&cfg.volume).await {
        Ok(info) => Probe::Found(Box::new(info), control),
        Err(ClientError::NotFound { .. }) => Probe::Missing(control),
        Err(e) => Probe::Unreachable(e.to_string()),
    }
}

fn mode_in(record: &pb::Membership, instance_id: &str) -> Option<pb::ReplicaMode> {
    record
        .members
        .iter()
        .find(|m| m.instance_id == instance_id)
        .and_then(|m| pb::ReplicaMode::try_from(m.mode).ok())
}

/// Records order by (epoch of the engine that wrote them, generation).
fn record_key(info: &ReplicaInfo) -> (u64, u64) {
    info.membership
        .as_ref()
        .map_or((0, 0), |m| (m.epoch, m.generation))
}

/// May a new engine serve, given what it reached? (DESIGN.md, "Write policy")
fn check_policy(
    cfg: &EngineConfig,
    record: &pb::Membership,
    infos: &[Option<ReplicaInfo>],
    up_to_date: &[bool],
    total: usize,
    generation: u64,
) -> Result<(), EngineError> {
    let count = up_to_date.iter().filter(|u| **u).count();
    match cfg.write_policy {
        WritePolicy::Available => {
            // Every RW member of the newest record: one of them may hold the
            // only copy of the last acknowledged writes.
            let missing: Vec<String> = record
                .members
                .iter()
                .filter(|m| m.mode == pb::ReplicaMode::Rw as i32)
                .filter(|m| {
                    !infos.iter().zip(up_to_date).any(|(info, ok)| {
                        *ok && info
                            .as_ref()
                            .is_some_and(|i| i.instance_id == m.instance_id)
                    })
                })
                .map(|m| m.address.clone())
                .collect();
            if !missing.is_empty() {
                return Err(open_err(
                    cfg,
                    OpenWait::AvailableMembers {
                        members: missing.join(", "),
                        generation,
                    },
                ));
            }
        }
        WritePolicy::Quorum => {
            // Fencing a majority of the volume's replicas guarantees that we
            // reached a member of the newest RW set (which never drops below a
            // majority while writes are acknowledged) — if each of them still
            // holds its record. A replica without one (its disk was replaced
            // and it was created again for a rebuild) proves nothing: it
            // does not count.
            let members = record.members.len().max(total);
            let need = members / 2 + 1;
            let fenced = infos
                .iter()
                .flatten()
                .filter(|i| {
                    generation == 0 || i.membership.as_ref().is_some_and(|m| m.generation > 0)
                })
                .count();
            if fenced < need {
                return Err(open_err(
                    cfg,
                    OpenWait::Quorum {
                        reached: fenced,
                        members,
                        needed: need,
                    },
                ));
            }
        }
    }
    if count == 0 {
        return Err(open_err(cfg, OpenWait::NoUpToDate));
    }
    Ok(())
}

/// Decide which reachable replicas are up to date, and whether the write
/// policy lets this engine serve: (up to date per replica, newest generation).
/// The newest reservation record, by (epoch, sequence), on any replica the
/// engine opened. Every save reaches every writable replica, and a replica
/// that missed one went to ERR, so the newest record is the last saved — or
/// one from a save that was never acknowledged, which is as good.
pub(crate) fn newest_reservations(infos: &[Option<ReplicaInfo>]) -> Option<pb::ReservationRecord> {
    infos
        .iter()
        .flatten()
        .filter_map(|i| i.reservations.as_ref())
        .max_by_key(|r| (r.epoch, r.sequence))
        .cloned()
}

pub(crate) fn elect(
    cfg: &EngineConfig,
    addrs: &[String],
    infos: &[Option<ReplicaInfo>],
    trust: Option<&str>,
) -> Result<(Vec<bool>, u64), EngineError> {
    let total = addrs.len();
    let mut up_to_date = vec![false; total];
    let newest = infos
        .iter()
        .flatten()
        .max_by_key(|i| record_key(i))
        .cloned()
        .ok_or_else(|| open_err(cfg, OpenWait::NoUpToDate))?;
    if newest.block_size != cfg.block_size {
        return Err(EngineError::Config(format!(
            "volume {} exists with block size {}; --block-size {} differs",
            cfg.volume, newest.block_size, cfg.block_size
        )));
    }
    let record = newest.membership.clone().unwrap_or_default();
    let newest_key = record_key(&newest);
    let max_generation = record.generation;
    if newest_key == (0, 0) && trust.is_none() && infos.iter().any(Option::is_none) {
        // No replica reached holds a membership record: a volume whose
        // first engine stopped before recording one — or a replica created
        // for a rebuild, whose siblings hold the records. Only all of them
        // together tell which.
        let missing: Vec<&str> = addrs
            .iter()
            .zip(infos)
            .filter(|(_, i)| i.is_none())
            .map(|(a, _)| a.as_str())
            .collect();
        return Err(open_err(cfg, OpenWait::NoRecord(missing.join(", "))));
    }
    if let Some(trusted) = trust {
        // The operator names the replica to trust (`corral volume salvage --force`).
        let Some(i) = addrs.iter().position(|a| a == trusted) else {
            return Err(EngineError::Config(format!(
                "salvage: {trusted} is not one of the volume's replicas"
            )));
        };
        if infos[i].is_none() {
            return Err(open_err(
                cfg,
                OpenWait::SalvageUnreachable(trusted.to_string()),
            ));
        }
        warn!(volume = %cfg.volume, replica = %trusted,
            "salvage: trusting this replica's data; every other replica will be rebuilt from it");
        up_to_date[i] = true;
    } else {
        for (i, info) in infos.iter().enumerate() {
            let Some(info) = info else { continue };
            up_to_date[i] = record_key(info) == newest_key
                && (max_generation == 0
                    || mode_in(&record, &info.instance_id) == Some(pb::ReplicaMode::Rw));
        }
        check_policy(cfg, &record, infos, &up_to_date, total, max_generation)?;
    }
    served_size(cfg, infos, &up_to_date)?;
    Ok((up_to_date, max_generation))
}

/// The size an existing volume is served at: the smallest among its
/// up-to-date replicas. Each of them took every expansion recorded before
/// the record that names it RW; one may be larger still (an expansion cut
/// short before it was recorded: nothing was written past the smaller size).
/// `--size` may be smaller — the volume was expanded since the command line
/// was written (a node daemon or CSI restarting the engine keeps the size it
/// was created with) — but not larger: growing is `corral volume expand`.
pub(crate) fn served_size(
    cfg: &EngineConfig,
    infos: &[Option<ReplicaInfo>],
    up_to_date: &[bool],
) -> Result<u64, EngineError> {
    let size = infos
        .iter()
        .zip(up_to_date)
        .filter(|(_, ok)| **ok)
        .filter_map(|(info, _)| info.as_ref().map(|i| i.size))
        .min()
        .ok_or_else(|| open_err(cfg, OpenWait::NoUpToDate))?;
    if cfg.size > size {
        return Err(EngineError::Config(format!(
            "volume {} exists with size {size} bytes; --size {} is larger (grow it with `corral volume --engine ADDR expand SIZE`)",
            cfg.volume, cfg.size
        )));
    }
    Ok(size)
}

/// Open the volume once; errors of kind `Open` may succeed on a retry.
pub async fn open_volume(
    cfg: &EngineConfig,
    trust: Option<&str>,
) -> Result<Arc<Volume>, EngineError> {
    let chunks = validate(cfg)?;
    // The replicas on the command line, plus members of the newest record
    // found on them that the command line does not name (added at run time).
    let mut addrs: Vec<String> = cfg.replicas.clone();
    let mut probes = futures::future::join_all(addrs.iter().map(|a| probe(cfg, a))).await;
    let newest_members: Vec<String> = probes
        .iter()
        .filter_map(|p| match p {
            Probe::Found(info, _) => info.membership.as_ref(),
            _ => None,
        })
        .max_by_key(|m| (m.epoch, m.generation))
        .map(|m| m.members.iter().map(|m| m.address.clone()).collect())
        .unwrap_or_default();
    let extra: Vec<String> = newest_members
        .into_iter()
        .filter(|a| !addrs.contains(a))
        .collect();
    if !extra.is_empty() {
        info!(volume = %cfg.volume, members = ?extra, "the membership record names replicas the command line does not: including them");
        probes.extend(futures::future::join_all(extra.iter().map(|a| probe(cfg, a))).await);
        addrs.extend(extra);
    }
    let mut infos: Vec<Option<ReplicaInfo>> = vec![None; addrs.len()];
    let mut controls: Vec<Option<ReplicaControl>> = vec![None; addrs.len()];
    let mut problems: Vec<String> = vec![String::new(); addrs.len()];
    for (i, p) in probes.into_iter().enumerate() {
        match p {
            Probe::Found(info, control) => {
                infos[i] = Some(*info);
                controls[i] = Some(control);
            }
            Probe::Missing(control) => controls[i] = Some(control),
            Probe::Unreachable(why) => problems[i] = why,
        }
    }
    let reachable = controls.iter().filter(|c| c.is_some()).count();
    if reachable == 0 {
        let detail: Vec<_> = addrs
            .iter()
            .zip(&problems)
            .map(|(a, p)| format!("{a}: {p}"))
            .collect();
        return Err(open_err(cfg, OpenWait::NoneReachable(detail.join("; "))));
    }
    let total = addrs.len();
    let mut up_to_date = vec![false; total];
    let mut max_generation;
    let mut created = true;
    if infos.iter().all(Option::is_none) {
        // A new volume: create a replica on every reachable daemon.
        if reachable < cfg.write_policy.min_rw(total) {
            return Err(open_err(
                cfg,
                OpenWait::TooFewToCreate {
                    reachable,
                    total,
                    policy: cfg.write_policy.as_str(),
                    needed: cfg.write_policy.min_rw(total),
                },
            ));
        }
        for i in 0..total {
            let Some(control) = controls[i].as_ref() else {
                continue;
            };
            let request = CreateReplicaRequest {
                volume: cfg.volume.clone(),
                size: cfg.size,
                block_size: cfg.block_size,
                chunk_size: cfg.chunk_size,
            };
            let info = control
                .create(request)
                .await
                .map_err(|e| replica_err(cfg, &addrs[i], format!("create failed: {e}")))?;
            info!(volume = %cfg.volume, replica = %addrs[i], "created replica");
            infos[i] = Some(info);
            up_to_date[i] = true;
        }
        max_generation = 0;
    } else {
        // A first election from what the probes saw, so that an engine that
        // could not serve anyway does not fence the running one.
        (up_to_date, max_generation) = elect(cfg, &addrs, &infos, trust)?;
        created = false;
    }

    // Fence: a new epoch on every replica we can reach.
    let epoch = Epoch(infos.iter().flatten().map(|i| i.epoch).max().unwrap_or(0) + 1);
    for i in 0..total {
        let (Some(control), Some(_)) = (controls[i].as_ref(), infos[i].as_ref()) else {
            continue;
        };
        match control
            .open_as(&cfg.volume, epoch, crate::engine_id())
            .await
        {
            Ok(info) => infos[i] = Some(info),
            Err(e) => {
                warn!(replica = %addrs[i], error = %e, "cannot fence replica at epoch {epoch}");
                problems[i] = format!("open at epoch {epoch} failed: {e}");
                infos[i] = None;
            }
        }
    }
    if !created {
        // Elect again from the records returned by fencing: an older engine
        // can no longer change those, while the probes' may be stale by now
        // (it could have dropped a replica and acknowledged writes without it
        // in between).
        (up_to_date, max_generation) = elect(cfg, &addrs, &infos, trust)?;
    } else if up_to_date
        .iter()
        .zip(&infos)
        .any(|(u, i)| *u && i.is_none())
    {
        return Err(open_err(
            cfg,
            OpenWait::Replica {
                replica: "a replica just created".into(),
                what: "could not be opened".into(),
            },
        ));
    }

    // Data connections to the up-to-date replicas.
    let settings = ClientSettings::of(cfg);
    let mut clients: Vec<Option<Arc<ReplicaClient>>> = vec![None; total];
    for i in 0..total {
        if !up_to_date[i] {
            continue;
        }
        let session = infos[i].as_ref().map_or(0, |info| info.open_session);
        let client = ReplicaClient::connect(&addrs[i], &cfg.volume, session, &settings)
            .await
            .map_err(|e| replica_err(cfg, &addrs[i], e.to_string()))?;
        clients[i] = Some(Arc::new(client));
    }

    let size = if created {
        cfg.size
    } else {
        served_size(cfg, &infos, &up_to_date)?
    };
    if size != cfg.size {
        info!(volume = %cfg.volume, size, configured = cfg.size,
            "the volume was expanded since --size was given: serving its size");
    }
    let clone = open_clone(cfg, epoch, size, &infos, &clients, chunks).await?;
    resync_dirty_regions(cfg, epoch, size, &infos, &clients, chunks, clone.as_deref()).await?;

    let members = members_after_open(
        cfg,
        size.div_ceil(chunks.chunk_size()),
        &addrs,
        &infos,
        &problems,
        &up_to_date,
        trust,
        Generation(max_generation + 1),
        std::time::Instant::now(),
    );
    let generation = members.generation();
    let member_clients: Vec<_> = members
        .all()
        .iter()
        .zip(&clients)
        .filter_map(|(m, c)| c.clone().map(|c| (m.id, c)))
        .collect();
    let reservations = newest_reservations(&infos);
    let set = Arc::new(ReplicaSet::new(
        cfg,
        epoch,
        size,
        members,
        member_clients,
        reservations,
    ));
    let record = set.membership();
    for i in 0..total {
        if !up_to_date[i] {
            continue;
        }
        let Some(client) = clients[i].as_ref() else {
            continue;
        };
        client
            .control()
            .set_membership(&cfg.volume, epoch, record.clone())
            .await
            .map_err(|e| replica_err(cfg, &addrs[i], format!("recording membership: {e}")))?;
    }
    info!(
        volume = %cfg.volume, %epoch, %generation,
        rw = set.rw_count(), total, policy = cfg.write_policy.as_str(),
        "volume open"
    );
    let volume = Arc::new(Volume::new(cfg.volume.clone(), cfg.block_size, chunks, set));
    volume.set_write_through(cfg.write_through);
    if let Some(fill) = clone {
        volume.set_clone_fill(fill);
    }
    Ok(volume)
}

/// A clone's fill as the replicas record it, or a new one for
/// `--clone-from` on a volume that has never been served; None for a volume
/// that is not a clone, or whose fill is done.
async fn open_clone(
    cfg: &EngineConfig,
    epoch: Epoch,
    size: u64,
    infos: &[Option<ReplicaInfo>],
    clients: &[Option<Arc<ReplicaClient>>],
    chunks: ChunkMap,
) -> Result<Option<Arc<CloneFill>>, EngineError> {
    let recorded = infos
        .iter()
        .flatten()
        .filter_map(|i| i.clone.clone())
        .max_by_key(|r| (r.done, r.filled_below));
    let timeout = cfg.replica_timeout;
    let waiting = |e: CloneError| match e {
        CloneError::Config(m) => EngineError::Config(m),
        other => open_err(cfg, OpenWait::CloneSource(other.to_string())),
    };
    let served = || {
        infos
            .iter()
            .flatten()
            .any(|i| i.membership.as_ref().is_some_and(|m| m.generation > 0))
    };
    let new_only = |flag: &str| {
        EngineError::Config(format!(
            "volume {} has been served before and is not a clone or a restore: {flag} makes a new volume",
            cfg.volume
        ))
    };
    let fill = match (recorded, &cfg.clone, &cfg.restore) {
        (Some(r), _, _) if r.done => return Ok(None),
        (Some(r), source, restore) => {
            let address = source.as_ref().map(|s| s.engine.as_str());
            let s3 = restore.as_ref().map(|r| &r.s3);
            CloneFill::resume(&cfg.volume, r, address, s3, chunks, timeout)
                .await
                .map_err(waiting)?
        }
        (None, None, Some(restore)) => {
            if served() {
                return Err(new_only("--from-backup"));
            }
            let fill = CloneFill::start_restore(&cfg.volume, size, restore, chunks, timeout)
                .await
                .map_err(waiting)?;
            record_new_fill(cfg, epoch, clients, &fill, "restore").await?;
            info!(volume = %cfg.volume, backup = %restore.backup, "new volume restored from a backup: filling it");
            fill
        }
        (None, Some(source), _) => {
            if served() {
                return Err(new_only("--clone-from"));
            }
            let fill = CloneFill::start(&cfg.volume, size, source, chunks, timeout)
                .await
                .map_err(waiting)?;
            record_new_fill(cfg, epoch, clients, &fill, "clone").await?;
            info!(volume = %cfg.volume, source = %source.engine, snapshot = %fill.record().snapshot,
                "new clone: serving while it fills from its source");
            fill
        }
        (None, None, None) => return Ok(None),
    };
    Ok(Some(Arc::new(fill)))
}

/// Records a new clone's or restore's fill on every replica reached, before
/// anything is written to them.
async fn record_new_fill(
    cfg: &EngineConfig,
    epoch: Epoch,
    clients: &[Option<Arc<ReplicaClient>>],
    fill: &CloneFill,
    what: &str,
) -> Result<(), EngineError> {
    for client in clients.iter().flatten() {
        client
            .control()
            .set_clone(&cfg.volume, epoch, fill.record())
            .await
            .map_err(|e| replica_err(cfg, client.addr(), format!("recording the {what}: {e}")))?;
    }
    Ok(())
}

/// The members as an engine that has just fenced and elected finds them:
/// up-to-date replicas RW, the others ERR, each with what it may differ in
/// (see [`Members::after_open`]). `generation` is the record about to be
/// written. Pure: the engine's open and the model test both use it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn members_after_open(
    cfg: &EngineConfig,
    chunk_count: u64,
    addrs: &[String],
    infos: &[Option<ReplicaInfo>],
    problems: &[String],
    up_to_date: &[bool],
    trust: Option<&str>,
    generation: Generation,
    now: std::time::Instant,
) -> Members {
    let total = addrs.len();
    let newest_record = infos
        .iter()
        .flatten()
        .max_by_key(|i| record_key(i))
        .and_then(|i| i.membership.clone())
        .unwrap_or_default();
    let opened: Vec<OpenedMember> = (0..total)
        .map(|i| {
            // Known from its daemon, or from the record when unreachable.
            let instance_id = infos[i].as_ref().map_or_else(
                || {
                    newest_record
                        .members
                        .iter()
                        .find(|m| m.address == addrs[i])
                        .map(|m| m.instance_id.clone())
                        .unwrap_or_default()
                },
                |info| info.instance_id.clone(),
            );
            let state = if up_to_date[i] {
                OpenedState::UpToDate
            } else if trust.is_none()
                && !instance_id.is_empty()
                && mode_in(&newest_record, &instance_id) == Some(pb::ReplicaMode::Wo)
            {
                OpenedState::Rebuilding {
                    reason: if problems[i].is_empty() {
                        "its rebuild was interrupted: resuming it, comparing every chunk".into()
                    } else {
                        format!(
                            "its rebuild was interrupted; unreachable at open: {}",
                            problems[i]
                        )
                    },
                }
            } else {
                OpenedState::Behind {
                    reason: if !problems[i].is_empty() {
                        format!("unreachable at open: {}", problems[i])
                    } else if infos[i].is_none() {
                        "no replica of this volume on the daemon: needs a full rebuild".into()
                    } else {
                        "missed writes (older membership generation): needs a rebuild".into()
                    },
                }
            };
            OpenedMember {
                address: addrs[i].clone(),
                instance_id,
                state,
            }
        })
        .collect();
    Members::after_open(cfg.write_policy, chunk_count, generation, opened, now)
}

/// After an unclean stop, the up-to-date replicas may differ where writes
/// were in flight: those lie in regions some replica marked dirty. Compare
/// the stored block checksums there and copy differing blocks from the first
/// up-to-date replica to the others. Either version is acceptable: a write
/// that reached only some replicas was never acknowledged.
async fn resync_dirty_regions(
    cfg: &EngineConfig,
    epoch: Epoch,
    size: u64,
    infos: &[Option<ReplicaInfo>],
    clients: &[Option<Arc<ReplicaClient>>],
    chunks: ChunkMap,
    clone: Option<&CloneFill>,
) -> Result<(), EngineError> {
    let live: Vec<(usize, &Arc<ReplicaClient>)> = clients
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.as_ref().map(|c| (i, c)))
        .collect();
    if live.len() < 2 {
        return Ok(());
    }
    let mut regions = BTreeSet::new();
    for (i, _) in &live {
        if let Some(info) = &infos[*i] {
            let size = info.region_size.max(BLOCK);
            for start in &info.dirty_regions {
                regions.insert((*start, size));
            }
        }
    }
    if regions.is_empty() {
        return Ok(());
    }
    let volume_size = size;
    let fail = |what: String| open_err(cfg, OpenWait::Resync(what));
    let (source_idx, source) = live[0];
    let mut copied = 0u64;
    for (start, size) in regions {
        let end = (start + size).min(volume_size);
        for seg in chunks.split(start, end.saturating_sub(start)) {
            // A clone's chunk is filled on every replica before they are
            // compared (see crate::clone).
            if let Some(fill) = clone
                && !fill.is_filled(seg.chunk)
            {
                let source = fill
                    .read_source(seg.chunk)
                    .await
                    .map_err(|e| open_err(cfg, OpenWait::CloneSource(e.to_string())))?;
                if let Some((offset, data)) = source {
                    let op = CloneFill::fill_op(offset, data);
                    for (_, client) in &live {
                        client
                            .call(seg.chunk, epoch, op.clone())
                            .await
                            .map_err(|e| fail(format!("{}: clone fill: {e}", client.addr())))?;
                    }
                }
                fill.mark_filled(seg.chunk);
            }
            let op = Op::Checksums(pb::ChecksumsOp {
                offset: seg.offset,
                length: seg.len,
                ..Default::default()
            });
            let mut sums = Vec::new();
            for (_, client) in &live {
                match client.call(seg.chunk, epoch, op.clone()).await {
                    Ok(DataOutcome::Checksums(c)) => sums.push(c),
                    Ok(_) => return Err(fail(format!("{}: bad checksum reply", client.addr()))),
                    Err(e) => return Err(fail(format!("{}: {e}", client.addr()))),
                }
            }
            let blocks = sums[0].len();
            for b in 0..blocks {
                let differs = sums.iter().any(|s| s.get(b) != sums[0].get(b));
                if !differs {
                    continue;
                }
                let offset = seg.offset + b as u64 * BLOCK;
                let read = Op::Read(pb::ReadOp {
                    offset,
                    length: BLOCK as u32,
                    ..Default::default()
                });
                let data = match source.call(seg.chunk, epoch, read).await {
                    Ok(DataOutcome::Read(d)) => d,
                    Ok(_) => return Err(fail("bad read reply".into())),
                    Err(e) => return Err(fail(format!("{}: {e}", source.addr()))),
                };
                let crc = crc32c::crc32c(&data);
                for (k, (i, client)) in live.iter().enumerate() {
                    if *i == source_idx || sums[k].get(b) == sums[0].get(b) {
                        continue;
                    }
                    let write = Op::Write(pb::WriteOp {
                        offset,
                        data: data.clone(),
                        crc32c: crc,
                        fua: false,
                        ..Default::default()
                    });
                    client
                        .call(seg.chunk, epoch, write)
                        .await
                        .map_err(|e| fail(format!("{}: {e}", client.addr())))?;
                }
                copied += BLOCK;
            }
        }
    }
    for (_, client) in &live {
        client
            .call(0, epoch, Op::Flush(pb::FlushOp {}))
            .await
            .map_err(|e| fail(format!("{}: flush: {e}", client.addr())))?;
    }
    info!(volume = %cfg.volume, bytes = copied, "resynced dirty regions among up-to-date replicas");
    Ok(())
}

/// The election's rules, one test each (docs/failure-handling.md, "Write
/// policies"; architecture.md, "Opening a volume").
#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 1 << 20;

    fn cfg(policy: WritePolicy) -> EngineConfig {
        let mut cfg = EngineConfig::new("v", SIZE, vec!["a".into(), "b".into(), "c".into()]);
        cfg.write_policy = policy;
        cfg
    }

    fn addrs() -> Vec<String> {
        ["a", "b", "c"].iter().map(|s| s.to_string()).collect()
    }

    /// A record naming a, b, c (instances "a1", ...) with these modes.
    fn record(epoch: u64, generation: u64, modes: [pb::ReplicaMode; 3]) -> pb::Membership {
        pb::Membership {
            generation,
            epoch,
            members: ["a", "b", "c"]
                .iter()
                .zip(modes)
                .map(|(a, mode)| pb::Member {
                    address: a.to_string(),
                    instance_id: format!("{a}1"),
                    mode: mode as i32,
                })
                .collect(),
        }
    }

    fn info(addr: &str, membership: Option<pb::Membership>) -> Option<ReplicaInfo> {
        Some(ReplicaInfo {
            volume: "v".into(),
            size: SIZE,
            block_size: 512,
            chunk_size: 256 << 10,
            instance_id: format!("{addr}1"),
            membership,
            ..Default::default()
        })
    }

    use pb::ReplicaMode::{Err as E, Rw as R, Wo as W};

    #[test]
    fn a_local_replica_must_be_one_of_the_replicas() {
        let mut c = cfg(WritePolicy::Quorum);
        c.local_replicas.insert("b".into(), "/run/b.sock".into());
        validate(&c).unwrap();
        c.local_replicas.insert("d".into(), "/run/d.sock".into());
        let e = validate(&c).unwrap_err().to_string();
        assert!(
            e.contains("--local-replica d: not one of the --replica addresses"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");
    }

    #[test]
    fn the_newest_reservation_record_wins_whoever_holds_it() {
        let with = |addr: &str, epoch: u64, sequence: u64| {
            info(addr, None).map(|mut i| {
                i.reservations = Some(pb::ReservationRecord {
                    epoch,
                    sequence,
                    state: format!("{addr}:{epoch}:{sequence}").into_bytes().into(),
                });
                i
            })
        };
        assert_eq!(newest_reservations(&[info("a", None), None]), None);
        // A later engine's record wins over a longer run of an older one's.
        let infos = vec![with("a", 3, 2), None, with("c", 2, 40), info("b", None)];
        let newest = newest_reservations(&infos).unwrap();
        assert_eq!((newest.epoch, newest.sequence), (3, 2));
        // Within one engine, the later save.
        let infos = vec![with("a", 3, 2), with("b", 3, 3)];
        assert_eq!(newest_reservations(&infos).unwrap().state, &b"b:3:3"[..]);
    }

    #[test]
    fn the_up_to_date_replicas_hold_the_newest_record_and_are_rw_in_it() {
        let newest = record(2, 5, [R, R, E]);
        let infos = vec![
            info("a", Some(newest.clone())),
            info("b", Some(record(2, 4, [R, R, R]))),
            info("c", Some(newest)),
        ];
        let (up, generation) = elect(&cfg(WritePolicy::Quorum), &addrs(), &infos, None).unwrap();
        assert_eq!((up, generation), (vec![true, false, false], 5));
    }

    #[test]
    fn records_order_by_epoch_before_generation() {
        let infos = vec![
            info("a", Some(record(3, 1, [R, E, R]))),
            info("b", Some(record(2, 9, [R, R, R]))),
            info("c", Some(record(3, 1, [R, E, R]))),
        ];
        let (up, _) = elect(&cfg(WritePolicy::Quorum), &addrs(), &infos, None).unwrap();
        assert_eq!(up, vec![true, false, true]);
    }

    #[test]
    fn available_waits_for_every_rw_member_of_the_newest_record() {
        let newest = record(1, 3, [R, E, R]);
        let infos = vec![
            info("a", Some(newest.clone())),
            info("b", Some(newest)),
            None,
        ];
        match elect(&cfg(WritePolicy::Available), &addrs(), &infos, None) {
            Err(EngineError::Open {
                wait: OpenWait::AvailableMembers { members, .. },
                ..
            }) => assert_eq!(members, "c"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn quorum_serves_with_a_majority_of_record_holders() {
        let newest = record(1, 3, [R, R, R]);
        let two = vec![
            info("a", Some(newest.clone())),
            info("b", Some(newest)),
            None,
        ];
        assert!(elect(&cfg(WritePolicy::Quorum), &addrs(), &two, None).is_ok());
        // A replica created for a rebuild holds no record: it proves nothing.
        let newest = record(1, 3, [R, R, W]);
        let one_and_a_new_one = vec![info("a", Some(newest)), None, info("c", None)];
        assert!(matches!(
            elect(
                &cfg(WritePolicy::Quorum),
                &addrs(),
                &one_and_a_new_one,
                None
            ),
            Err(EngineError::Open {
                wait: OpenWait::Quorum { reached: 1, .. },
                ..
            })
        ));
    }

    #[test]
    fn without_any_record_every_replica_must_be_reached() {
        let all = vec![info("a", None), info("b", None), info("c", None)];
        let (up, _) = elect(&cfg(WritePolicy::Available), &addrs(), &all, None).unwrap();
        assert_eq!(up, vec![true; 3]);
        // Only one, record-less: a new volume's, or a rebuild's fresh target?
        let one = vec![None, info("b", None), None];
        assert!(matches!(
            elect(&cfg(WritePolicy::Available), &addrs(), &one, None),
            Err(EngineError::Open {
                wait: OpenWait::NoRecord(_),
                ..
            })
        ));
    }

    #[test]
    fn salvage_trusts_the_named_replica_alone() {
        let infos = vec![
            info("a", Some(record(1, 3, [E, R, E]))),
            None,
            info("c", Some(record(1, 2, [R, R, R]))),
        ];
        let (up, _) = elect(&cfg(WritePolicy::Available), &addrs(), &infos, Some("c")).unwrap();
        assert_eq!(up, vec![false, false, true]);
        assert!(matches!(
            elect(&cfg(WritePolicy::Available), &addrs(), &infos, Some("b")),
            Err(EngineError::Open {
                wait: OpenWait::SalvageUnreachable(_),
                ..
            })
        ));
    }

    #[test]
    fn a_larger_size_than_the_volume_is_refused_not_waited_for() {
        let mut small = info("a", Some(record(1, 1, [R, R, R])));
        if let Some(i) = small.as_mut() {
            i.size = SIZE / 2;
        }
        let refused = elect(
            &cfg(WritePolicy::Quorum),
            &addrs(),
            &[small.clone(), small, None],
            None,
        );
        assert!(
            matches!(&refused, Err(EngineError::Config(m)) if m.contains("expand")),
            "{refused:?}"
        );
    }

    #[test]
    fn an_expanded_volume_is_served_at_its_size_whatever_size_was_given() {
        let grown = |addr: &str, size: u64| {
            info(addr, Some(record(1, 3, [R, R, E]))).map(|mut i| {
                i.size = size;
                i
            })
        };
        // c missed the expansion (ERR); b took it but the expansion to 4x
        // was cut short before it was recorded: the smallest up-to-date size.
        let infos = vec![grown("a", 2 * SIZE), grown("b", 4 * SIZE), grown("c", SIZE)];
        let config = cfg(WritePolicy::Quorum);
        let (up, _) = elect(&config, &addrs(), &infos, None).unwrap();
        assert_eq!(up, vec![true, true, false]);
        assert_eq!(served_size(&config, &infos, &up).unwrap(), 2 * SIZE);
    }

    #[test]
    fn a_member_rebuilding_in_the_newest_record_is_resumed_by_comparing_everything() {
        let newest = record(1, 4, [R, R, W]);
        let infos = vec![
            info("a", Some(newest.clone())),
            info("b", Some(newest)),
            info("c", Some(record(1, 2, [R, R, E]))),
        ];
        let config = cfg(WritePolicy::Quorum);
        let (up, max) = elect(&config, &addrs(), &infos, None).unwrap();
        let members = members_after_open(
            &config,
            config.size.div_ceil(u64::from(config.chunk_size)),
            &addrs(),
            &infos,
            &[String::new(), String::new(), String::new()],
            &up,
            None,
            Generation(max + 1),
            std::time::Instant::now(),
        );
        let c = &members.all()[2];
        assert_eq!(c.mode, crate::members::Mode::Err);
        assert!(c.interrupted);
        assert!(matches!(c.divergence, crate::members::Divergence::Unknown));
        assert_eq!(members.generation(), Generation(5));
    }
}
