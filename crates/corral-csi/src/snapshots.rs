//! CSI snapshots of corral volumes, found and taken through the node
//! daemons (docs/kubernetes.md, "Snapshots").
//!
//! - **Where they are**: a corral snapshot lives in every replica of its
//!   volume; the CSI snapshot id `VOLUME@SNAPSHOT` ([`crate::ids`]) names
//!   the volume, so nothing needs to be kept anywhere else. The
//!   [`Catalog`] asks the daemons for the snapshots of the replicas they
//!   host and, per volume, believes the replicas the newest membership
//!   record lists as RW (an ERR replica may lack a snapshot taken, or still
//!   hold one deleted, while it was away).
//! - **How they are taken**: only an engine takes or deletes a snapshot
//!   (it drains writes and reaches every replica at one point of the write
//!   stream), and engines listen on their node's loopback, out of the
//!   controller's reach. So the controller asks the node daemon running the
//!   volume's engine to relay the call ([`through_engine`]); for a volume
//!   attached nowhere it asks a daemon holding a replica to start a
//!   transient engine for the call ([`transient_spec`]).
//! - **Backups**: a backup-typed VolumeSnapshotClass ([`snapshot_class`])
//!   makes backups instead (`controller/backups.rs`). The corral snapshots
//!   they are taken from ([`ids::BACKUP_SNAPSHOT_PREFIX`]) are no CSI
//!   snapshots: the [`Catalog`] leaves them out but for
//!   [`Catalog::backup_snapshots`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use corral_client::ClientError;
use corral_proto::csi::v1 as csi;
use corral_proto::v1 as pb;
use corral_proto::v1::engine_manager_client::EngineManagerClient;
use futures::future::join_all;
use tonic::Status;

use crate::daemons::{ClusterView, NodeView};
use crate::ids;

/// Bound on a snapshot relayed through a node daemon: it may start an
/// engine (up to its start timeout, 30 s by default), take the snapshot
/// (seconds under a heavy write load) and stop the engine.
pub const SNAPSHOT_CALL_TIMEOUT: Duration = Duration::from_secs(110);

/// Prefix of the parameters the snapshotter adds (`--extra-create-metadata`).
const CO_PREFIX: &str = "csi.storage.k8s.io/";

/// What a VolumeSnapshotClass makes: a corral snapshot (the default), or
/// a backup of one to a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotKind {
    /// `type: snap` or none: a snapshot in the volume's replicas.
    Snapshot,
    /// `type: backup` (or Longhorn's `bak`) with `backupTarget`: a backup
    /// on `file:///DIR` or `s3://BUCKET/PREFIX`.
    Backup {
        target: String,
        s3_endpoint: Option<String>,
    },
}

/// CreateSnapshot's parameters (a VolumeSnapshotClass's): `type` (`snap`,
/// or `backup` / `bak` for a backup), `backupTarget` and
/// `backupS3Endpoint` (a backup's only); the snapshotter's own are
/// accepted, anything else is INVALID_ARGUMENT naming it.
pub fn snapshot_class(parameters: &HashMap<String, String>) -> Result<SnapshotKind, Status> {
    let bad = |name: &str, why: String| {
        Status::invalid_argument(format!("snapshot parameter {name:?}: {why}"))
    };
    let mut unknown: Vec<&String> = parameters
        .keys()
        .filter(|k| !k.starts_with(CO_PREFIX))
        .filter(|k| !["type", "backupTarget", "backupS3Endpoint"].contains(&k.as_str()))
        .collect();
    unknown.sort();
    if let Some(k) = unknown.first() {
        return Err(Status::invalid_argument(format!(
            "snapshot parameter {k:?} is not one corral knows (type, backupTarget, backupS3Endpoint)"
        )));
    }
    let get = |k: &str| parameters.get(k).map(|v| v.trim());
    let backup = match get("type") {
        None | Some("snap") => false,
        Some("backup" | "bak") => true,
        Some(other) => return Err(bad("type", format!("{other:?}: use snap or backup"))),
    };
    let target = get("backupTarget");
    let endpoint = get("backupS3Endpoint");
    if !backup {
        if let Some(k) = [("backupTarget", target), ("backupS3Endpoint", endpoint)]
            .iter()
            .find_map(|(k, v)| v.is_some().then_some(*k))
        {
            return Err(bad(k, "only with type: backup".into()));
        }
        return Ok(SnapshotKind::Snapshot);
    }
    let Some(target) = target.filter(|t| !t.is_empty()) else {
        return Err(bad(
            "backupTarget",
            "required with type: backup (file:///DIR or s3://BUCKET/PREFIX)".into(),
        ));
    };
    let scheme_ok = target.starts_with("file:///")
        || target
            .strip_prefix("s3://")
            .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'));
    if !scheme_ok || target.chars().any(|c| c.is_whitespace() || c == '|') {
        return Err(bad(
            "backupTarget",
            format!("{target:?}: use file:///DIR or s3://BUCKET/PREFIX"),
        ));
    }
    if let Some(e) = endpoint {
        if !ids::is_endpoint(e) {
            return Err(bad(
                "backupS3Endpoint",
                format!("{e:?}: use http(s)://HOST:PORT"),
            ));
        }
        if !target.starts_with("s3://") {
            return Err(bad(
                "backupS3Endpoint",
                "only with an s3:// backupTarget".into(),
            ));
        }
    }
    Ok(SnapshotKind::Backup {
        target: target.trim_end_matches('/').to_string(),
        s3_endpoint: endpoint.map(str::to_string),
    })
}

/// A corral snapshot of `volume` as a CSI snapshot: ready at once (a
/// snapshot is complete when it is taken).
pub fn to_csi(volume: &str, info: &pb::SnapshotInfo) -> csi::Snapshot {
    let mut snapshot = csi::Snapshot {
        size_bytes: info.size.min(i64::MAX as u64) as i64,
        snapshot_id: ids::snapshot_id(volume, &info.name),
        source_volume_id: volume.to_string(),
        creation_time: None,
        ready_to_use: true,
        group_snapshot_id: String::new(),
    };
    let at = snapshot.creation_time.get_or_insert_with(Default::default);
    at.seconds = (info.created_unix_ms / 1000).min(i64::MAX as u64) as i64;
    at.nanos = ((info.created_unix_ms % 1000) * 1_000_000) as i32;
    snapshot
}

/// The snapshots of every volume (or of one), as their replicas report them.
#[derive(Debug, Default)]
pub struct Catalog {
    volumes: BTreeMap<String, BTreeMap<String, pb::SnapshotInfo>>,
}

impl Catalog {
    /// Ask the daemons holding replicas (of `volume`, or of any volume).
    /// A daemon that does not answer is left out, as in ListVolumes.
    pub async fn gather(view: &ClusterView, volume: Option<&str>) -> Catalog {
        let nodes: Vec<&NodeView> = match volume {
            Some(v) => view.holders(v),
            None => view.nodes.iter().collect(),
        };
        let asks = nodes.iter().map(|n| async move {
            let mut client = EngineManagerClient::new(n.channel.clone());
            let request = pb::ListHostedSnapshotsRequest {
                volume: volume.unwrap_or_default().to_string(),
            };
            let answer = call(
                &n.addr,
                "list snapshots",
                view_timeout(),
                client.list_hosted_snapshots(request),
            )
            .await;
            (*n, answer)
        });
        let mut reported: BTreeMap<String, Vec<(&NodeView, Vec<pb::SnapshotInfo>)>> =
            BTreeMap::new();
        for (node, answer) in join_all(asks).await {
            match answer {
                Ok(list) => {
                    for hosted in list.volumes {
                        reported
                            .entry(hosted.volume)
                            .or_default()
                            .push((node, hosted.snapshots));
                    }
                }
                Err(e) => {
                    tracing::warn!(daemon = %node.addr, error = %e, "cannot list its snapshots")
                }
            }
        }
        let mut catalog = Catalog::default();
        for (volume, lists) in reported {
            let trusted = trusted_replicas(view, &volume);
            let believed: Vec<_> = lists
                .iter()
                .filter(|(n, _)| trusted.contains(&n.info.replica_address))
                .collect();
            // None of the trusted ones answered: what the others say is
            // all there is.
            let believed = if believed.is_empty() {
                lists.iter().collect()
            } else {
                believed
            };
            // Each replica stamps its own creation time, a millisecond or
            // so apart: the earliest is the snapshot's, the same whichever
            // replicas answer.
            let snapshots = catalog.volumes.entry(volume).or_default();
            for (_, list) in believed {
                for s in list {
                    snapshots
                        .entry(s.name.clone())
                        .and_modify(|seen| {
                            seen.created_unix_ms = seen.created_unix_ms.min(s.created_unix_ms)
                        })
                        .or_insert_with(|| s.clone());
                }
            }
        }
        catalog
    }

    /// Snapshot `name` of `volume` (a CSI snapshot: not one a backup was
    /// taken from).
    pub fn get(&self, volume: &str, name: &str) -> Option<&pb::SnapshotInfo> {
        self.volumes.get(volume)?.get(name).filter(|s| is_csi(s))
    }

    /// The CSI snapshots of `volume`, by name.
    pub fn of(&self, volume: &str) -> impl Iterator<Item = &pb::SnapshotInfo> {
        self.volumes
            .get(volume)
            .into_iter()
            .flat_map(|s| s.values())
            .filter(|s| is_csi(s))
    }

    /// The snapshots of `volume` that backups were taken from
    /// ([`ids::BACKUP_SNAPSHOT_PREFIX`]), by name.
    pub fn backup_snapshots(&self, volume: &str) -> impl Iterator<Item = &pb::SnapshotInfo> {
        self.volumes
            .get(volume)
            .into_iter()
            .flat_map(|s| s.values())
            .filter(|s| !is_csi(s))
    }

    /// The volumes holding a CSI snapshot named `name`.
    pub fn volumes_with<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> {
        self.volumes
            .iter()
            .filter(move |(_, s)| s.get(name).is_some_and(is_csi))
            .map(|(v, _)| v.as_str())
    }

    /// Every CSI snapshot, by snapshot id.
    pub fn entries(&self) -> BTreeMap<String, csi::Snapshot> {
        self.volumes
            .iter()
            .flat_map(|(v, s)| s.values().filter(|i| is_csi(i)).map(move |i| to_csi(v, i)))
            .map(|s| (s.snapshot_id.clone(), s))
            .collect()
    }
}

/// Whether a corral snapshot is a CSI snapshot: not one taken for a
/// backup, which stays on the volume as the next backup's parent.
fn is_csi(s: &pb::SnapshotInfo) -> bool {
    !s.name.starts_with(ids::BACKUP_SNAPSHOT_PREFIX)
}

/// The replica addresses whose word on `volume`'s snapshots counts: the RW
/// members of the newest membership record any reachable replica holds;
/// every holder for a volume never opened.
fn trusted_replicas(view: &ClusterView, volume: &str) -> BTreeSet<String> {
    let newest = view
        .nodes
        .iter()
        .filter_map(|n| n.replica(volume))
        .filter_map(|r| r.membership.as_ref())
        .filter(|m| !m.members.is_empty())
        .max_by_key(|m| (m.epoch, m.generation));
    match newest {
        Some(m) => m
            .members
            .iter()
            .filter(|m| m.mode == pb::ReplicaMode::Rw as i32)
            .map(|m| m.address.clone())
            .collect(),
        None => view
            .holders(volume)
            .iter()
            .map(|n| n.info.replica_address.clone())
            .collect(),
    }
}

/// Timeout of a quick question to a daemon.
fn view_timeout() -> Duration {
    Duration::from_secs(10)
}

/// The engine a snapshot call of a volume attached nowhere starts: every
/// replica of the newest membership, no frontends, and the `available`
/// write policy whatever the volume's own (the controller does not know
/// it here): that policy opens only once every up-to-date member answers,
/// so it can never open a volume from replicas that missed writes.
pub fn transient_spec(
    view: &ClusterView,
    volume: &str,
    replica: &pb::ReplicaInfo,
) -> pb::EngineSpec {
    pb::EngineSpec {
        volume: volume.to_string(),
        size: replica.size,
        replicas: view.replica_addresses(volume),
        replica_timeout_ms: 0,
        stale_replica_timeout_ms: 0,
        write_policy: "available".into(),
        block_size: replica.block_size,
        chunk_size: replica.chunk_size,
        nbd: false,
        iscsi: false,
        clone_from: String::new(),
        clone_snapshot: String::new(),
        from_backup: String::new(),
        backup_s3_endpoint: String::new(),
    }
}

/// Take (`create`) or delete a snapshot through `node`'s daemon: its
/// engine of the volume, or a transient one from `request.spec`.
pub async fn through_engine(
    node: &NodeView,
    request: pb::EngineSnapshotRequest,
    create: bool,
) -> Result<pb::VolumeSnapshotResponse, ClientError> {
    let mut client = EngineManagerClient::new(node.channel.clone());
    if create {
        call(
            &node.addr,
            "create snapshot",
            SNAPSHOT_CALL_TIMEOUT,
            client.create_engine_snapshot(request),
        )
        .await
    } else {
        call(
            &node.addr,
            "delete snapshot",
            SNAPSHOT_CALL_TIMEOUT,
            client.delete_engine_snapshot(request),
        )
        .await
    }
}

/// One call to a daemon, bounded by `timeout`, its refusal as a [`ClientError`].
async fn call<T>(
    addr: &str,
    what: &'static str,
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn class(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_plain_class_takes_only_the_snapshotters_parameters() {
        let ok = class(&[
            ("csi.storage.k8s.io/volumesnapshot/name", "s"),
            ("csi.storage.k8s.io/volumesnapshot/namespace", "default"),
            ("csi.storage.k8s.io/volumesnapshotcontent/name", "c"),
        ]);
        assert_eq!(snapshot_class(&ok).unwrap(), SnapshotKind::Snapshot);
        assert_eq!(
            snapshot_class(&HashMap::new()).unwrap(),
            SnapshotKind::Snapshot
        );
        assert_eq!(
            snapshot_class(&class(&[("type", "snap")])).unwrap(),
            SnapshotKind::Snapshot
        );
        let mut bad = ok.clone();
        bad.insert("incremental".into(), "true".into());
        let err = snapshot_class(&bad).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("incremental"), "{}", err.message());
    }

    #[test]
    fn a_backup_class_names_its_target() {
        let kind = snapshot_class(&class(&[
            ("type", "backup"),
            ("backupTarget", "s3://bucket/corral/"),
            ("backupS3Endpoint", "http://10.0.0.5:9000"),
            ("csi.storage.k8s.io/volumesnapshot/name", "s"),
        ]))
        .unwrap();
        assert_eq!(
            kind,
            SnapshotKind::Backup {
                target: "s3://bucket/corral".into(),
                s3_endpoint: Some("http://10.0.0.5:9000".into()),
            }
        );
        let longhorn =
            snapshot_class(&class(&[("type", "bak"), ("backupTarget", "file:///b")])).unwrap();
        assert!(matches!(
            longhorn,
            SnapshotKind::Backup {
                s3_endpoint: None,
                ..
            }
        ));
        for (pairs, named) in [
            (vec![("type", "bi")], "type"),
            (vec![("type", "backup")], "backupTarget"),
            (
                vec![("type", "backup"), ("backupTarget", "nfs://x")],
                "backupTarget",
            ),
            (
                vec![("type", "backup"), ("backupTarget", "file://rel")],
                "backupTarget",
            ),
            (
                vec![("type", "backup"), ("backupTarget", "s3://")],
                "backupTarget",
            ),
            (vec![("backupTarget", "file:///b")], "backupTarget"),
            (
                vec![
                    ("type", "backup"),
                    ("backupTarget", "file:///b"),
                    ("backupS3Endpoint", "http://h:9000"),
                ],
                "backupS3Endpoint",
            ),
            (
                vec![
                    ("type", "backup"),
                    ("backupTarget", "s3://b/p"),
                    ("backupS3Endpoint", "h:9000"),
                ],
                "backupS3Endpoint",
            ),
            (
                vec![
                    ("type", "backup"),
                    ("backupTarget", "s3://b/p"),
                    ("retain", "3"),
                ],
                "retain",
            ),
        ] {
            let err = snapshot_class(&class(&pairs)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{pairs:?}");
            assert!(
                err.message().contains(named),
                "{pairs:?}: {}",
                err.message()
            );
        }
    }

    #[test]
    fn a_snapshot_is_ready_with_its_creation_time_and_size() {
        let s = to_csi(
            "pvc-1",
            &pb::SnapshotInfo {
                name: "snapshot-1".into(),
                created_unix_ms: 1_764_500_000_123,
                size: 64 << 20,
                allocated_bytes: 0,
            },
        );
        assert_eq!(s.snapshot_id, "pvc-1@snapshot-1");
        assert_eq!(s.source_volume_id, "pvc-1");
        assert_eq!(s.size_bytes, 64 << 20);
        assert!(s.ready_to_use);
        let t = s.creation_time.unwrap();
        assert_eq!((t.seconds, t.nanos), (1_764_500_000, 123_000_000));
    }
}
