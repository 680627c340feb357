//! The CSI Controller service: volumes are created as replicas on distinct
//! node daemons, published by starting the volume's engine on the
//! consumer's node (a new epoch, which fences any older engine), and
//! unpublished by stopping it — or, when that node is unreachable, by
//! fencing the volume through its replicas, so a lost node cannot hold a
//! volume hostage (no stuck Multi-Attach, no split brain). Volumes grow
//! through their running engine ([`expansion_size`]), or a transient one
//! when attached nowhere.
//! Snapshots are taken through the volume's engine by way of its node
//! daemon ([`crate::snapshots`]; the RPCs in `controller/snapshots.rs`);
//! backups, and volumes restored from them, likewise
//! (`controller/backups.rs`).
//!
//! Stateless: parameters travel in the volume context; membership lives on
//! the replicas; every call asks the daemons ([`Daemons::view`]).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use corral_proto::csi::v1 as csi;
use corral_proto::v1 as pb;
use futures::future::join_all;
use tonic::{Request, Response, Status};

use crate::capabilities::{check_capabilities, controller_capabilities};
use crate::daemons::{ClusterView, Daemons};
use crate::ids::{self, TOPOLOGY_NODE_KEY};
use crate::params::{DataLocality, VolumeParams};
use crate::placement::{NoRoom, place};
use crate::status::client_status;

/// Size of a volume whose request names none.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// Volumes are whole multiples of this (the store's block).
pub const SIZE_UNIT: u64 = 4096;

/// Keys of the publish context the node plugin reads.
pub mod publish_keys {
    pub const VOLUME: &str = "volume";
    pub const NBD: &str = "nbdAddress";
    pub const ISCSI_PORTAL: &str = "iscsiPortal";
    pub const ISCSI_TARGET: &str = "iscsiTarget";
    pub const CONTROL: &str = "controlAddress";
}

mod backups;
mod clones;
mod snapshots;

use backups::{RestoreSource, restore_size};
use clones::{CloneSource, clone_size};

/// Where a new volume's data comes from.
enum Origin {
    /// Another volume, or a snapshot of one.
    Clone(CloneSource),
    /// A backup.
    Restore(RestoreSource),
}

/// The controller.
pub struct ControllerService {
    daemons: Daemons,
    /// Calls that start or stop a volume's engine (publish, unpublish,
    /// snapshots, delete, expand) take turns per volume: a snapshot of a
    /// detached volume starts a transient engine, which must not race a
    /// publish (the newer engine fences the older one). One controller runs
    /// per cluster (its sidecars elect a leader), so a lock here is enough.
    turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl ControllerService {
    pub fn new(daemons: Daemons) -> Self {
        ControllerService {
            daemons,
            turns: Mutex::new(HashMap::new()),
        }
    }

    /// Wait for the turns of two volumes, in name order (so that two calls
    /// never wait for each other).
    async fn turns(&self, a: &str, b: &str) -> [tokio::sync::OwnedMutexGuard<()>; 2] {
        let (first, second) = if a <= b { (a, b) } else { (b, a) };
        let first = self.turn(first).await;
        [first, self.turn(second).await]
    }

    /// Wait for `volume`'s turn; it ends when the guard is dropped.
    async fn turn(&self, volume: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut turns = self.turns.lock().unwrap_or_else(|p| p.into_inner());
            // Forget the turns nobody waits for, so the map stays small.
            turns.retain(|_, l| Arc::strong_count(l) > 1);
            Arc::clone(turns.entry(volume.to_string()).or_default())
        };
        lock.lock_owned().await
    }
}

/// The size to create from a capacity range.
pub fn volume_size(range: Option<&csi::CapacityRange>) -> Result<u64, Status> {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if required < 0 || limit < 0 {
        return Err(Status::invalid_argument(
            "capacity_range: required_bytes and limit_bytes must not be negative",
        ));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit != 0 && required > limit {
        return Err(Status::invalid_argument(format!(
            "capacity_range: required_bytes {required} exceeds limit_bytes {limit}"
        )));
    }
    let wanted = if required == 0 {
        if limit != 0 {
            DEFAULT_SIZE.min(limit)
        } else {
            DEFAULT_SIZE
        }
    } else {
        required
    };
    let size = wanted.div_ceil(SIZE_UNIT) * SIZE_UNIT;
    if size == 0 || (limit != 0 && size > limit) {
        return Err(Status::out_of_range(format!(
            "capacity_range: no multiple of {SIZE_UNIT} bytes lies between {required} and {limit}"
        )));
    }
    Ok(size)
}

/// How a ListVolumes token starts: the id of the last volume the previous
/// page returned follows it. Keyed on the id rather than on a position, a
/// page never repeats a volume and never skips one that existed throughout,
/// whatever was created or deleted between pages (the last volume of a page
/// included).
const PAGE_TOKEN_PREFIX: &str = "after:";

/// One ListVolumes page of `ids` (sorted): the ids after `starting_token`,
/// at most `max_entries` of them (0: all), and the token of the next page
/// (empty after the last). A token this plugin did not make is ABORTED.
pub fn page<'a>(
    ids: impl Iterator<Item = &'a String>,
    starting_token: &str,
    max_entries: i32,
) -> Result<(Vec<&'a String>, String), Status> {
    let after = if starting_token.is_empty() {
        None
    } else {
        let id = starting_token
            .strip_prefix(PAGE_TOKEN_PREFIX)
            .filter(|id| !id.is_empty())
            .ok_or_else(|| {
                Status::aborted(format!("starting_token {starting_token:?} is not valid"))
            })?;
        Some(id)
    };
    let take = if max_entries <= 0 {
        usize::MAX
    } else {
        max_entries as usize
    };
    let mut rest = ids
        .filter(|id| after.is_none_or(|a| id.as_str() > a))
        .peekable();
    let mut page = Vec::new();
    while page.len() < take
        && let Some(id) = rest.next()
    {
        page.push(id);
    }
    let next = match (rest.peek(), page.last()) {
        (Some(_), Some(last)) => format!("{PAGE_TOKEN_PREFIX}{last}"),
        _ => String::new(),
    };
    Ok((page, next))
}

/// How many bytes of volumes with `replicas` replicas each, on distinct
/// nodes, fit in nodes with `rooms` bytes of room: the largest `t` with
/// `sum(min(room, t)) >= replicas * t` (a node holds at most one replica of
/// a volume, so it never contributes more than `t` to `t` bytes of volumes).
pub fn provisionable(rooms: &[u64], replicas: u64) -> u64 {
    if replicas == 0 {
        return 0;
    }
    let fits = |t: u64| {
        let have: u128 = rooms.iter().map(|&r| u128::from(r.min(t))).sum();
        have >= u128::from(replicas) * u128::from(t)
    };
    let (mut lo, mut hi) = (0u64, rooms.iter().sum::<u64>() / replicas);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

fn no_room(e: NoRoom, view: &ClusterView) -> Status {
    let mut msg = e.to_string();
    if !view.unreachable.is_empty() {
        msg.push_str(&format!(
            " ({} node daemons unreachable)",
            view.unreachable.len()
        ));
    }
    Status::resource_exhausted(msg)
}

fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    Ok(value)
}

/// Nodes named by a topology list, in order.
fn topology_nodes(list: &[csi::Topology]) -> Vec<String> {
    list.iter()
        .filter_map(|t| t.segments.get(TOPOLOGY_NODE_KEY).cloned())
        .collect()
}

impl ControllerService {
    async fn create(&self, req: csi::CreateVolumeRequest) -> Result<csi::Volume, Status> {
        let name = required(&req.name, "name")?;
        if req.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities is required"));
        }
        check_capabilities(&req.volume_capabilities).map_err(Status::invalid_argument)?;
        let params = VolumeParams::parse(&req.parameters)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let id = ids::volume_id(name);
        // Everything about the source is checked before anything is made:
        // it exists, and fits in the size asked for.
        let origin = match (&req.volume_content_source, &params.from_backup) {
            (Some(_), Some(_)) => {
                return Err(Status::invalid_argument(
                    "parameter \"fromBackup\" and a volume_content_source: a volume has one source",
                ));
            }
            (Some(s), None) => Some(self.content_origin(s, &id).await?),
            (None, Some(url)) => Some(Origin::Restore(
                backups::restore_source(url, params.backup_s3_endpoint.as_deref()).await?,
            )),
            (None, None) => None,
        };
        let size = match &origin {
            Some(Origin::Clone(src)) => clone_size(req.capacity_range.as_ref(), src.size)?,
            Some(Origin::Restore(src)) => restore_size(req.capacity_range.as_ref(), src.size)?,
            None => volume_size(req.capacity_range.as_ref())?,
        };
        // A clone holds its source's turn too while it fills from it; a
        // restore holds its own.
        let _turns: Vec<_> = match &origin {
            Some(Origin::Clone(src)) => self.turns(&id, &src.volume).await.into(),
            Some(Origin::Restore(_)) => vec![self.turn(&id).await],
            None => Vec::new(),
        };
        let view = self.daemons.view().await;
        let holders: Vec<_> = view.holders(&id);
        if let Some(existing) = holders.first().and_then(|n| n.replica(&id))
            && existing.size != size
        {
            return Err(Status::already_exists(format!(
                "volume {name:?} exists with {} bytes, not {size}",
                existing.size
            )));
        }
        // Create what is missing: all of it, or the rest after a call that
        // was interrupted half way (the CO retries with the same name).
        let have: BTreeSet<String> = holders.iter().map(|n| n.node_id().to_string()).collect();
        let missing = (params.replicas as usize).saturating_sub(have.len());
        if missing > 0 {
            let preferred = match params.data_locality {
                DataLocality::BestEffort => req
                    .accessibility_requirements
                    .as_ref()
                    .map(|t| topology_nodes(&t.preferred))
                    .unwrap_or_default()
                    .into_iter()
                    .take(1)
                    .collect(),
                DataLocality::Disabled => Vec::new(),
            };
            let rooms: Vec<_> = view.nodes.iter().map(|n| n.room()).collect();
            let chosen =
                place(&rooms, missing, size, &preferred, &have).map_err(|e| no_room(e, &view))?;
            let creates = chosen.iter().filter_map(|node| view.node(node)).map(|n| {
                n.control.create(pb::CreateReplicaRequest {
                    volume: id.clone(),
                    size,
                    block_size: params.block_size,
                    chunk_size: params.chunk_size,
                })
            });
            let results = join_all(creates).await;
            if let Some(err) = results.iter().find_map(|r| r.as_ref().err()) {
                // Undo this call's replicas; a retry starts clean.
                for (node, r) in chosen.iter().zip(&results) {
                    if r.is_ok()
                        && let Some(n) = view.node(node)
                    {
                        let _ = n.control.delete(&id).await;
                    }
                }
                return Err(client_status(err));
            }
            tracing::info!(volume = %id, name, size, nodes = ?chosen, "created");
        }
        match &origin {
            Some(Origin::Clone(src)) => self.fill_clone(&id, src).await?,
            Some(Origin::Restore(src)) => {
                if let Err(e) = self.fill_restore(&id, src).await {
                    use tonic::Code;
                    // A backup gone or unusable since it was checked: a
                    // retry must not find half a volume.
                    if matches!(
                        e.code(),
                        Code::NotFound
                            | Code::FailedPrecondition
                            | Code::InvalidArgument
                            | Code::PermissionDenied
                    ) {
                        self.forget_unrestored(&id).await;
                    }
                    return Err(e);
                }
            }
            None => {}
        }
        let mut context = params.to_context();
        context.insert("name".into(), name.to_string());
        Ok(csi::Volume {
            capacity_bytes: size as i64,
            volume_id: id,
            volume_context: context,
            content_source: req.volume_content_source,
            accessible_topology: Vec::new(),
        })
    }

    /// The origin a content source names: a backup for a backup-typed
    /// snapshot id, a volume or a snapshot of one otherwise.
    async fn content_origin(
        &self,
        source: &csi::VolumeContentSource,
        new_volume: &str,
    ) -> Result<Origin, Status> {
        if let Some(csi::volume_content_source::Type::Snapshot(s)) = &source.r#type
            && let Some(restore) = backups::snapshot_restore_source(&s.snapshot_id).await
        {
            return restore.map(Origin::Restore);
        }
        self.clone_source(source, new_volume)
            .await
            .map(Origin::Clone)
    }

    async fn delete(&self, volume_id: &str) -> Result<(), Status> {
        let id = required(volume_id, "volume_id")?;
        let _turn = self.turn(id).await;
        let view = self.daemons.view().await;
        if let Some((addr, e)) = view.unreachable.first() {
            // It may hold a replica: deleting without it would leave one
            // behind. The CO retries.
            return Err(Status::unavailable(format!(
                "node daemon {addr} is unreachable ({e}); it may hold a replica of {id}"
            )));
        }
        if let Some(n) = view.attached_on(id).first() {
            // Kubernetes deletes only detached volumes; a published one is
            // in use, and stopping its engine would pull a disk from a pod.
            return Err(Status::failed_precondition(format!(
                "volume {id} is in use: published on node {}; unpublish it first",
                n.node_id()
            )));
        }
        if let Some(n) = view.engines_of(id).first() {
            return Err(Status::unavailable(format!(
                "volume {id}: a snapshot call is running through a transient engine on node {}",
                n.node_id()
            )));
        }
        if !view.holders(id).is_empty() {
            // Snapshots live in the volume's replicas: deleting it would
            // take them along, and leave the CO's snapshot objects naming
            // nothing (CSI: "has snapshots and the plugin doesn't treat
            // them as independent entities").
            let catalog = crate::snapshots::Catalog::gather(&view, Some(id)).await;
            let names: Vec<&str> = catalog.of(id).map(|s| s.name.as_str()).collect();
            if !names.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "volume {id} has {} snapshot(s) ({}); delete them first",
                    names.len(),
                    names.join(", ")
                )));
            }
        }
        for n in view.holders(id) {
            match n.control.delete(id).await {
                Ok(()) | Err(corral_client::ClientError::NotFound { .. }) => {}
                Err(e) => return Err(client_status(&e)),
            }
        }
        tracing::info!(volume = %id, "deleted");
        Ok(())
    }

    async fn publish(
        &self,
        req: csi::ControllerPublishVolumeRequest,
    ) -> Result<HashMap<String, String>, Status> {
        let id = required(&req.volume_id, "volume_id")?;
        let node_id = required(&req.node_id, "node_id")?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
        check_capabilities(std::slice::from_ref(cap)).map_err(Status::invalid_argument)?;
        let _turn = self.turn(id).await;
        let view = self.daemons.view().await;
        let holders = view.holders(id);
        let Some(replica) = holders.first().and_then(|n| n.replica(id)) else {
            return Err(Status::not_found(format!("volume {id} does not exist")));
        };
        let Some(node) = view.node(node_id) else {
            return Err(Status::not_found(format!(
                "node {node_id} is not known to any reachable node daemon"
            )));
        };
        if let Some(other) = view
            .engines_of(id)
            .into_iter()
            .find(|n| n.node_id() != node_id)
        {
            if other.attached(id).is_none() {
                return Err(Status::unavailable(format!(
                    "volume {id}: a snapshot call is running through a transient engine on node {}; retry",
                    other.node_id()
                )));
            }
            return Err(Status::failed_precondition(format!(
                "volume {id} is published on node {}; unpublish it there first",
                other.node_id()
            )));
        }
        let params = VolumeParams::from_context(&req.volume_context)
            .map_err(|e| Status::invalid_argument(format!("volume_context: {e}")))?;
        let spec = pb::EngineSpec {
            volume: id.to_string(),
            size: replica.size,
            replicas: view.replica_addresses(id),
            replica_timeout_ms: 0,
            stale_replica_timeout_ms: params.stale_replica_timeout.as_millis() as u64,
            write_policy: params
                .write_policy
                .map(|w| w.as_str().to_string())
                .unwrap_or_default(),
            block_size: replica.block_size,
            chunk_size: replica.chunk_size,
            nbd: true,
            iscsi: true,
            clone_from: String::new(),
            clone_snapshot: String::new(),
            from_backup: String::new(),
            backup_s3_endpoint: String::new(),
        };
        // A transient engine (a snapshot call) is not an attachment: the
        // daemon starts the real one once that call is done.
        let status = match node.attached(id) {
            Some(running) => running.clone(),
            None => node
                .manager
                .start_engine(spec)
                .await
                .map_err(|e| client_status(&e))?,
        };
        tracing::info!(volume = %id, node = node_id, "published");
        let mut ctx = HashMap::new();
        ctx.insert(publish_keys::VOLUME.into(), id.to_string());
        ctx.insert(publish_keys::NBD.into(), status.nbd_address.clone());
        ctx.insert(
            publish_keys::ISCSI_PORTAL.into(),
            status.iscsi_address.clone(),
        );
        ctx.insert(
            publish_keys::ISCSI_TARGET.into(),
            status.iscsi_target.clone(),
        );
        ctx.insert(publish_keys::CONTROL.into(), status.control_address);
        ctx.retain(|_, v| !v.is_empty());
        Ok(ctx)
    }

    async fn unpublish(&self, req: csi::ControllerUnpublishVolumeRequest) -> Result<(), Status> {
        let id = required(&req.volume_id, "volume_id")?;
        let node_id = required(&req.node_id, "node_id")?;
        let _turn = self.turn(id).await;
        let view = self.daemons.view().await;
        if let Some(node) = view.node(node_id) {
            node.manager
                .stop_engine(id)
                .await
                .map_err(|e| client_status(&e))?;
            tracing::info!(volume = %id, node = node_id, "unpublished");
            return Ok(());
        }
        // The node does not answer. If no reachable node runs the volume,
        // its engine may still be alive behind a partition: fence it
        // through the replicas so it can no longer write, then report the
        // volume detached.
        if view.holders(id).is_empty() || !view.engines_of(id).is_empty() {
            return Ok(());
        }
        let epoch = view.epoch(id) + 1;
        let mut fenced = 0;
        for n in view.holders(id) {
            match n.control.open(id, corral_types::Epoch(epoch)).await {
                Ok(_) => fenced += 1,
                Err(e) => {
                    tracing::warn!(volume = %id, replica = %n.addr, error = %e, "fence failed")
                }
            }
        }
        tracing::warn!(volume = %id, node = node_id, epoch, fenced, "node unreachable: volume fenced through its replicas");
        if fenced == 0 {
            return Err(Status::unavailable(format!(
                "node {node_id} is unreachable and no replica of {id} could be fenced"
            )));
        }
        Ok(())
    }
}

/// The unit a volume of `block_size`-byte blocks grows by: a multiple of
/// both [`SIZE_UNIT`] and the block size (0: the default, 512).
pub fn expansion_unit(block_size: u32) -> u64 {
    let block = u64::from(block_size).max(1);
    let (mut a, mut b) = (SIZE_UNIT, block);
    while b != 0 {
        (a, b) = (b, a % b);
    }
    SIZE_UNIT / a * block
}

/// The size to grow to from a ControllerExpandVolume (or NodeExpandVolume)
/// capacity range: `required_bytes` rounded up to `unit`, within
/// `limit_bytes` (OUT_OF_RANGE past it). The range is required and must
/// ask for something.
pub fn expansion_size(range: Option<&csi::CapacityRange>, unit: u64) -> Result<u64, Status> {
    let range = range.ok_or_else(|| Status::invalid_argument("capacity_range is required"))?;
    let (required, limit) = (range.required_bytes, range.limit_bytes);
    if required < 0 || limit < 0 {
        return Err(Status::invalid_argument(
            "capacity_range: required_bytes and limit_bytes must not be negative",
        ));
    }
    let (required, limit) = (required as u64, limit as u64);
    if required == 0 {
        return Err(Status::invalid_argument(
            "capacity_range.required_bytes is required to expand a volume",
        ));
    }
    if limit != 0 && required > limit {
        return Err(Status::invalid_argument(format!(
            "capacity_range: required_bytes {required} exceeds limit_bytes {limit}"
        )));
    }
    let unit = unit.max(1);
    let size = required
        .checked_next_multiple_of(unit)
        .filter(|s| limit == 0 || *s <= limit)
        .ok_or_else(|| {
            Status::out_of_range(format!(
                "capacity_range: {required} bytes rounded up to a multiple of {unit} \
                 exceeds limit_bytes {limit}"
            ))
        })?;
    Ok(size)
}

impl ControllerService {
    /// Grow a volume attached nowhere through a transient engine, started
    /// by a daemon holding one of its replicas with the smallest replica's
    /// size (an engine serves its up-to-date replicas' smallest size and
    /// refuses a larger `--size`). The size it has now.
    async fn expand_detached(
        &self,
        view: &crate::daemons::ClusterView,
        id: &str,
        size: u64,
    ) -> Result<u64, Status> {
        let holders = view.holders(id);
        let (node, smallest) = holders
            .iter()
            .filter_map(|n| n.replica(id).map(|r| (*n, r)))
            .min_by_key(|(_, r)| r.size)
            .ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))?;
        let spec = crate::snapshots::transient_spec(view, id, smallest);
        let grown = self.expand_through(node, id, size, Some(spec)).await?;
        tracing::info!(volume = %id, node = node.node_id(), old = grown.old_size, new = grown.new_size,
            "expanded while attached nowhere, through a transient engine");
        Ok(grown.new_size.max(size))
    }

    /// ExpandEngine on `node`'s daemon: its running engine of `id`, or a
    /// transient one from `spec`. Replicas that could not be grown are
    /// logged (they are grown when they return).
    async fn expand_through(
        &self,
        node: &crate::daemons::NodeView,
        id: &str,
        size: u64,
        spec: Option<pb::EngineSpec>,
    ) -> Result<pb::ExpandVolumeResponse, Status> {
        let request = pb::ExpandEngineRequest {
            volume: id.to_string(),
            size,
            spec,
        };
        let mut client = pb::engine_manager_client::EngineManagerClient::new(node.channel.clone());
        let grown = match tokio::time::timeout(
            crate::snapshots::SNAPSHOT_CALL_TIMEOUT,
            client.expand_engine(request),
        )
        .await
        {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => {
                return Err(client_status(&corral_client::ClientError::from_status(
                    &node.addr, &status,
                )));
            }
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "volume {id}: expansion through node {} did not answer",
                    node.node_id()
                )));
            }
        };
        if !grown.failed.is_empty() {
            tracing::warn!(volume = %id, failed = ?grown.failed, "replicas not grown yet (grown when they return)");
        }
        Ok(grown)
    }
}

/// Whether the node must act after an expansion: always, since the
/// device itself only shows the new size once the node refreshes it (an
/// iSCSI rescan), and a filesystem grows there as well.
const NODE_EXPANSION_REQUIRED: bool = true;

impl ControllerService {
    /// ControllerExpandVolume: grow a published volume online through its
    /// engine, a detached one through a transient engine. A volume already
    /// at or above the size is left as it is (0 OK).
    async fn expand(
        &self,
        req: csi::ControllerExpandVolumeRequest,
    ) -> Result<csi::ControllerExpandVolumeResponse, Status> {
        let id = required(&req.volume_id, "volume_id")?;
        if req.capacity_range.is_none() {
            return Err(Status::invalid_argument("capacity_range is required"));
        }
        if let Some(cap) = &req.volume_capability {
            check_capabilities(std::slice::from_ref(cap)).map_err(Status::invalid_argument)?;
        }
        let _turn = self.turn(id).await;
        let view = self.daemons.view().await;
        let holders = view.holders(id);
        let Some(replica) = holders
            .iter()
            .filter_map(|n| n.replica(id))
            .max_by_key(|r| r.size)
        else {
            if let Some((addr, e)) = view.unreachable.first() {
                return Err(Status::unavailable(format!(
                    "volume {id} not found on the reachable node daemons; \
                     {addr} is unreachable ({e}) and may hold it"
                )));
            }
            return Err(Status::not_found(format!("volume {id} does not exist")));
        };
        let size = expansion_size(
            req.capacity_range.as_ref(),
            expansion_unit(replica.block_size),
        )?;
        let done = |capacity: u64| csi::ControllerExpandVolumeResponse {
            capacity_bytes: capacity.min(i64::MAX as u64) as i64,
            node_expansion_required: NODE_EXPANSION_REQUIRED,
        };
        // CSI: a volume already at or above the requested capacity is 0 OK.
        // The replicas say so for a detached volume; a running engine says
        // what it serves (a replica may be larger after an expansion cut
        // short, or smaller if it missed one).
        let Some(node) = view.engines_of(id).into_iter().next() else {
            if replica.size >= size {
                return Ok(done(replica.size));
            }
            // Attached nowhere: a transient engine on a node holding a
            // replica grows it (every replica, recorded like a membership
            // change), and is stopped after.
            return self.expand_detached(&view, id, size).await.map(done);
        };
        // Through the node daemon, which reaches the engine on its node's
        // loopback (where engines listen unless told otherwise).
        let grown = self.expand_through(node, id, size, None).await?;
        tracing::info!(volume = %id, node = node.node_id(), old = grown.old_size, new = grown.new_size, "expanded");
        Ok(done(grown.new_size.max(size)))
    }
}

#[tonic::async_trait]
impl csi::controller_server::Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let volume = self.create(request.into_inner()).await?;
        Ok(Response::new(csi::CreateVolumeResponse {
            volume: Some(volume),
        }))
    }

    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        self.delete(&request.into_inner().volume_id).await?;
        Ok(Response::new(csi::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        request: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        let publish_context = self.publish(request.into_inner()).await?;
        Ok(Response::new(csi::ControllerPublishVolumeResponse {
            publish_context,
        }))
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        self.unpublish(request.into_inner()).await?;
        Ok(Response::new(csi::ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        let id = required(&req.volume_id, "volume_id")?;
        if req.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities is required"));
        }
        let view = self.daemons.view().await;
        if view.holders(id).is_empty() {
            return Err(Status::not_found(format!("volume {id} does not exist")));
        }
        let response = match check_capabilities(&req.volume_capabilities) {
            Ok(()) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                    mutable_parameters: req.mutable_parameters,
                }),
                message: String::new(),
            },
            Err(why) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: why,
            },
        };
        Ok(Response::new(response))
    }

    async fn list_volumes(
        &self,
        request: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        let req = request.into_inner();
        if req.max_entries < 0 {
            return Err(Status::invalid_argument("max_entries must not be negative"));
        }
        let view = self.daemons.view().await;
        let volumes = view.volumes();
        let (ids, next_token) = page(volumes.keys(), &req.starting_token, req.max_entries)?;
        let entries: Vec<_> = ids
            .into_iter()
            .filter_map(|id| volumes.get_key_value(id))
            .map(|(id, (size, _))| csi::list_volumes_response::Entry {
                volume: Some(csi::Volume {
                    capacity_bytes: *size as i64,
                    volume_id: id.clone(),
                    ..Default::default()
                }),
                status: Some(csi::list_volumes_response::VolumeStatus {
                    published_node_ids: view
                        .attached_on(id)
                        .iter()
                        .map(|n| n.node_id().to_string())
                        .collect(),
                    volume_condition: None,
                }),
            })
            .collect();
        Ok(Response::new(csi::ListVolumesResponse {
            entries,
            next_token,
        }))
    }

    async fn get_capacity(
        &self,
        request: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        let req = request.into_inner();
        check_capabilities(&req.volume_capabilities).map_err(Status::invalid_argument)?;
        let params = VolumeParams::parse(&req.parameters)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // A volume is reachable from every node (its engine runs where it
        // is used), so the room is the cluster's whatever the topology.
        let view = self.daemons.view().await;
        let mut rooms: Vec<u64> = view.nodes.iter().map(|n| n.room().room()).collect();
        rooms.sort_unstable_by(|a, b| b.cmp(a));
        let available = provisionable(&rooms, params.replicas as u64);
        // The largest volume that still finds `replicas` distinct nodes.
        let largest = rooms
            .get(params.replicas as usize - 1)
            .copied()
            .unwrap_or(0);
        Ok(Response::new(csi::GetCapacityResponse {
            available_capacity: available.min(i64::MAX as u64) as i64,
            maximum_volume_size: Some(largest.min(i64::MAX as u64) as i64),
            minimum_volume_size: Some(SIZE_UNIT as i64),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities: controller_capabilities(),
        }))
    }

    async fn controller_get_volume(
        &self,
        _request: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        Err(Status::unimplemented("GET_VOLUME is not advertised"))
    }

    async fn controller_modify_volume(
        &self,
        _request: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented("MODIFY_VOLUME is not advertised"))
    }

    async fn create_snapshot(
        &self,
        request: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let snapshot = self.take_snapshot(request.into_inner()).await?;
        Ok(Response::new(csi::CreateSnapshotResponse {
            snapshot: Some(snapshot),
        }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        self.remove_snapshot(&request.into_inner().snapshot_id)
            .await?;
        Ok(Response::new(csi::DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        request: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        Ok(Response::new(
            self.snapshots_page(request.into_inner()).await?,
        ))
    }

    async fn get_snapshot(
        &self,
        request: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        let snapshot = self
            .find_snapshot(&request.into_inner().snapshot_id)
            .await?;
        Ok(Response::new(csi::GetSnapshotResponse {
            snapshot: Some(snapshot),
        }))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let response = self.expand(request.into_inner()).await?;
        Ok(Response::new(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(required: i64, limit: i64) -> Option<csi::CapacityRange> {
        Some(csi::CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        })
    }

    #[test]
    fn pages_follow_the_last_id_and_survive_creates_and_deletes() {
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let all = ids(&["a", "b", "c", "d", "e"]);
        let (p, next) = page(all.iter(), "", 2).unwrap();
        assert_eq!(p, ["a", "b"]);
        assert_eq!(next, "after:b");
        // "b" (the last of the page) and "a" are deleted, "0" and "bb" created.
        let now = ids(&["0", "bb", "c", "d", "e"]);
        let (p, next) = page(now.iter(), &next, 2).unwrap();
        assert_eq!(p, ["bb", "c"]);
        let (p, next) = page(now.iter(), &next, 2).unwrap();
        assert_eq!(p, ["d", "e"]);
        assert_eq!(next, "", "no token after the last page");
        let (p, next) = page(all.iter(), "", 0).unwrap();
        assert_eq!((p.len(), next.as_str()), (5, ""));
        let (p, next) = page(all.iter(), "after:e", 3).unwrap();
        assert!(p.is_empty() && next.is_empty());
        for bad in ["invalid-token", "3", "after:"] {
            let err = page(all.iter(), bad, 1).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Aborted, "{bad}");
        }
    }

    #[test]
    fn provisionable_capacity_counts_replicas_on_distinct_nodes() {
        // Three equal nodes, three replicas: one node's worth.
        assert_eq!(provisionable(&[10, 10, 10], 3), 10);
        // A fourth node lets volumes spread: 40 bytes of replicas / 3.
        assert_eq!(provisionable(&[10, 10, 10, 10], 3), 13);
        // One huge node cannot hold two replicas of the same volume.
        assert_eq!(provisionable(&[1000, 10, 10], 3), 10);
        assert_eq!(provisionable(&[1000, 10], 3), 0);
        assert_eq!(provisionable(&[7, 5], 1), 12);
        assert_eq!(provisionable(&[], 3), 0);
    }

    #[test]
    fn expansion_rounds_up_to_the_unit_and_respects_the_limit() {
        assert_eq!(expansion_unit(512), 4096);
        assert_eq!(expansion_unit(4096), 4096);
        assert_eq!(expansion_unit(0), 4096);
        assert_eq!(expansion_unit(8192), 8192);
        let unit = 4096;
        assert_eq!(expansion_size(range(5000, 0).as_ref(), unit).unwrap(), 8192);
        assert_eq!(
            expansion_size(range(1 << 30, 1 << 30).as_ref(), unit).unwrap(),
            1 << 30
        );
        let over = expansion_size(range(5000, 6000).as_ref(), unit).unwrap_err();
        assert_eq!(over.code(), tonic::Code::OutOfRange);
        for bad in [
            None,
            range(0, 0),
            range(0, 1 << 20),
            range(-1, 0),
            range(2, 1),
        ] {
            let err = expansion_size(bad.as_ref(), unit).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }

    fn controller() -> ControllerService {
        ControllerService::new(Daemons::new(Vec::new(), std::time::Duration::from_secs(1)))
    }

    fn expand_request(
        id: &str,
        range: Option<csi::CapacityRange>,
    ) -> csi::ControllerExpandVolumeRequest {
        csi::ControllerExpandVolumeRequest {
            volume_id: id.into(),
            capacity_range: range,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn expanding_checks_its_arguments_then_finds_the_volume() {
        use csi::controller_server::Controller;
        let c = controller();
        let cases = [
            (
                expand_request("", range(1 << 20, 0)),
                tonic::Code::InvalidArgument,
            ),
            (expand_request("pvc-1", None), tonic::Code::InvalidArgument),
            (
                expand_request("pvc-1", range(1 << 20, 0)),
                tonic::Code::NotFound,
            ),
        ];
        for (req, code) in cases {
            let err = c
                .controller_expand_volume(Request::new(req.clone()))
                .await
                .unwrap_err();
            assert_eq!(err.code(), code, "{req:?}: {err}");
        }
    }

    #[test]
    fn sizes_follow_the_capacity_range() {
        assert_eq!(volume_size(None).unwrap(), DEFAULT_SIZE);
        assert_eq!(
            volume_size(range(1 << 30, 1 << 30).as_ref()).unwrap(),
            1 << 30
        );
        assert_eq!(volume_size(range(1000, 0).as_ref()).unwrap(), 4096);
        assert_eq!(volume_size(range(0, 1 << 20).as_ref()).unwrap(), 1 << 20);
        let exact_unaligned = volume_size(range(5000, 5000).as_ref()).unwrap_err();
        assert_eq!(exact_unaligned.code(), tonic::Code::OutOfRange);
        let inverted = volume_size(range(2 << 20, 1 << 20).as_ref()).unwrap_err();
        assert_eq!(inverted.code(), tonic::Code::InvalidArgument);
        let negative = volume_size(range(-1, 0).as_ref()).unwrap_err();
        assert_eq!(negative.code(), tonic::Code::InvalidArgument);
    }
}
