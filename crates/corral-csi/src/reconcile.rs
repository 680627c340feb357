//! Bringing volumes back to their replica count: a replica that has been
//! in ERR for longer than its volume's stale-replica timeout (its node is
//! gone, or its disk) is replaced by a new replica on another node with
//! room, so a volume returns to `numberOfReplicas` RW replicas after a node
//! is lost for good.
//!
//! [`plan`] decides, from what the engines and node daemons report, as a
//! pure function; [`Reconciler`] runs it every interval in the controller
//! and carries it out: create the replica, add it to the engine (it joins
//! WO and is rebuilt), remove the stale one. When the lost node returns,
//! its replica — no longer a member — is deleted ([`orphans`]) once the
//! volume is whole again.

use std::collections::BTreeSet;
use std::time::Duration;

use corral_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::daemons::{ClusterView, Daemons};
use crate::placement::{NodeRoom, place};

/// One running engine as the reconciler sees it.
#[derive(Clone, Debug)]
pub struct EngineView {
    pub volume: String,
    /// The node running it.
    pub node_id: String,
    pub size: u64,
    pub stale_after: Duration,
    pub replicas: Vec<pb::ReplicaStatus>,
}

/// What to do for one volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replacement {
    pub volume: String,
    /// The node whose daemon runs the engine.
    pub engine_node: String,
    /// The stale replica's address.
    pub stale: String,
    /// Where the new replica goes.
    pub new_node: String,
}

fn mode(r: &pb::ReplicaStatus) -> Option<corral_types::ReplicaMode> {
    corral_proto::replica_mode(r.mode)
}

/// The replacements due now: at most one per volume, none while a volume
/// rebuilds (one change at a time), each on a node holding no replica of
/// the volume. `node_of` maps a replica address to its node (unknown for
/// an unreachable node); `holders(volume)` are the nodes holding a replica
/// of it, members or not.
pub fn plan(
    engines: &[EngineView],
    rooms: &[NodeRoom],
    node_of: impl Fn(&str) -> Option<String>,
    holders: impl Fn(&str) -> BTreeSet<String>,
) -> Vec<Replacement> {
    let mut out = Vec::new();
    for e in engines {
        use corral_types::ReplicaMode;
        if e.replicas.iter().any(|r| mode(r) == Some(ReplicaMode::Wo)) {
            continue;
        }
        let stale = e.replicas.iter().find(|r| {
            mode(r) == Some(ReplicaMode::Err)
                && Duration::from_millis(r.failed_for_ms) >= e.stale_after
        });
        let Some(stale) = stale else {
            continue;
        };
        let mut exclude = holders(&e.volume);
        exclude.extend(e.replicas.iter().filter_map(|r| node_of(&r.address)));
        match place(rooms, 1, e.size, &[], &exclude) {
            Ok(chosen) => {
                if let Some(new_node) = chosen.into_iter().next() {
                    out.push(Replacement {
                        volume: e.volume.clone(),
                        engine_node: e.node_id.clone(),
                        stale: stale.address.clone(),
                        new_node,
                    });
                }
            }
            Err(why) => {
                tracing::warn!(volume = %e.volume, replica = %stale.address, %why, "stale replica: no node to replace it on")
            }
        }
    }
    out
}

/// A replica left behind: on `node_id`, of `volume`, no longer a member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Orphan {
    pub node_id: String,
    pub volume: String,
}

/// Replicas to delete: of a volume whose engine runs with every member
/// RW, a replica that is not a member and not open by an engine — a
/// replaced replica whose node came back. `held(volume)` lists (node,
/// replica address, open) for every reachable replica of the volume.
pub fn orphans(
    engines: &[EngineView],
    held: impl Fn(&str) -> Vec<(String, String, bool)>,
) -> Vec<Orphan> {
    let mut out = Vec::new();
    for e in engines {
        let healthy = !e.replicas.is_empty()
            && e.replicas
                .iter()
                .all(|r| mode(r) == Some(corral_types::ReplicaMode::Rw));
        if !healthy {
            continue;
        }
        for (node_id, address, open) in held(&e.volume) {
            if !open && !e.replicas.iter().any(|r| r.address == address) {
                out.push(Orphan {
                    node_id,
                    volume: e.volume.clone(),
                });
            }
        }
    }
    out
}

/// The controller's background loop.
pub struct Reconciler {
    pub daemons: Daemons,
    pub interval: Duration,
}

impl Reconciler {
    /// Run until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
            self.round().await;
        }
    }

    /// One look and the repairs it calls for.
    pub async fn round(&self) {
        let view = self.daemons.view().await;
        let engines = engines(&view).await;
        let rooms: Vec<NodeRoom> = view.nodes.iter().map(|n| n.room()).collect();
        let node_of = |addr: &str| {
            view.nodes
                .iter()
                .find(|n| n.info.replica_address == addr)
                .map(|n| n.node_id().to_string())
        };
        let holders = |volume: &str| {
            view.holders(volume)
                .iter()
                .map(|n| n.node_id().to_string())
                .collect()
        };
        for r in plan(&engines, &rooms, node_of, holders) {
            if let Err(e) = replace(&view, &r).await {
                tracing::warn!(volume = %r.volume, stale = %r.stale, new_node = %r.new_node, error = %e, "replacing a stale replica failed; retrying next round");
            }
        }
        let held = |volume: &str| {
            view.holders(volume)
                .iter()
                .filter_map(|n| {
                    n.replica(volume).map(|r| {
                        (
                            n.node_id().to_string(),
                            n.info.replica_address.clone(),
                            r.open,
                        )
                    })
                })
                .collect()
        };
        for o in orphans(&engines, held) {
            let Some(node) = view.node(&o.node_id) else {
                continue;
            };
            match node.control.delete(&o.volume).await {
                Ok(()) => {
                    tracing::info!(volume = %o.volume, node = %o.node_id, "deleted a replica that is no longer a member")
                }
                Err(e) => {
                    tracing::warn!(volume = %o.volume, node = %o.node_id, error = %e, "could not delete a former replica")
                }
            }
        }
    }
}

/// Every running engine of an attached volume, with its replicas.
async fn engines(view: &ClusterView) -> Vec<EngineView> {
    let mut out = Vec::new();
    for n in &view.nodes {
        for status in &n.engines {
            let Some(spec) = &status.spec else { continue };
            // A transient engine (a snapshot or a clone's fill) lives for
            // one call: the repairs wait for the volume's own engine, with
            // its own stale-replica timeout (a transient one has none set).
            if status.state != pb::EngineState::Running as i32 || status.transient {
                continue;
            }
            match n.manager.engine_replicas(&spec.volume).await {
                Ok(replicas) => out.push(EngineView {
                    volume: spec.volume.clone(),
                    node_id: n.node_id().to_string(),
                    size: spec.size,
                    stale_after: Duration::from_millis(spec.stale_replica_timeout_ms.max(1)),
                    replicas,
                }),
                Err(e) => {
                    tracing::debug!(volume = %spec.volume, error = %e, "engine replicas unknown")
                }
            }
        }
    }
    out
}

async fn replace(view: &ClusterView, r: &Replacement) -> Result<(), String> {
    let engine_node = view
        .node(&r.engine_node)
        .ok_or("the engine's node is gone")?;
    let new_node = view.node(&r.new_node).ok_or("the chosen node is gone")?;
    let like = view
        .nodes
        .iter()
        .find_map(|n| n.replica(&r.volume))
        .ok_or("no replica of the volume answers")?;
    new_node
        .control
        .create(pb::CreateReplicaRequest {
            volume: r.volume.clone(),
            size: like.size,
            block_size: like.block_size,
            chunk_size: like.chunk_size,
        })
        .await
        .map_err(|e| e.to_string())?;
    let address = new_node.info.replica_address.clone();
    if let Err(e) = engine_node
        .manager
        .add_engine_replica(&r.volume, &address)
        .await
    {
        let _ = new_node.control.delete(&r.volume).await;
        return Err(e.to_string());
    }
    engine_node
        .manager
        .remove_engine_replica(&r.volume, &r.stale)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(volume = %r.volume, stale = %r.stale, new = %address, node = %r.new_node, "stale replica replaced");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(addr: &str, mode: pb::ReplicaMode, failed_for_s: u64) -> pb::ReplicaStatus {
        pb::ReplicaStatus {
            address: addr.into(),
            mode: mode as i32,
            failed_for_ms: failed_for_s * 1000,
            ..Default::default()
        }
    }

    fn room(id: &str) -> NodeRoom {
        NodeRoom {
            node_id: id.into(),
            free_bytes: 100 << 30,
            allocated_bytes: 0,
            capacity_bytes: 100 << 30,
        }
    }

    fn engine(replicas: Vec<pb::ReplicaStatus>) -> EngineView {
        EngineView {
            volume: "v".into(),
            node_id: "a".into(),
            size: 1 << 30,
            stale_after: Duration::from_secs(30),
            replicas,
        }
    }

    fn node_of(addr: &str) -> Option<String> {
        addr.strip_suffix(":9600").map(str::to_string)
    }

    fn holders(_: &str) -> BTreeSet<String> {
        BTreeSet::new()
    }

    use pb::ReplicaMode::{Err, Rw, Wo};
    const ROOMS: fn() -> Vec<NodeRoom> = || vec![room("a"), room("b"), room("c"), room("d")];

    #[test]
    fn a_replica_in_err_past_the_stale_timeout_moves_to_a_node_without_one() {
        let e = engine(vec![
            replica("a:9600", Rw, 0),
            replica("b:9600", Rw, 0),
            replica("c:9600", Err, 31),
        ]);
        let got = plan(&[e], &ROOMS(), node_of, holders);
        assert_eq!(
            got,
            [Replacement {
                volume: "v".into(),
                engine_node: "a".into(),
                stale: "c:9600".into(),
                new_node: "d".into(),
            }]
        );
    }

    #[test]
    fn a_former_replica_is_deleted_once_the_volume_is_whole_again() {
        let whole = engine(vec![
            replica("a:9600", Rw, 0),
            replica("b:9600", Rw, 0),
            replica("d:9600", Rw, 0),
        ]);
        let held = |_: &str| {
            vec![
                ("a".to_string(), "a:9600".to_string(), true),
                ("b".to_string(), "b:9600".to_string(), true),
                ("c".to_string(), "c:9600".to_string(), false),
                ("d".to_string(), "d:9600".to_string(), true),
            ]
        };
        assert_eq!(
            orphans(std::slice::from_ref(&whole), held),
            [Orphan {
                node_id: "c".into(),
                volume: "v".into()
            }]
        );
        // While a member rebuilds, or a non-member is open (some engine
        // uses it), nothing is deleted.
        let rebuilding = engine(vec![
            replica("a:9600", Rw, 0),
            replica("b:9600", Rw, 0),
            replica("d:9600", Wo, 0),
        ]);
        assert!(orphans(&[rebuilding], held).is_empty());
        let open = |_: &str| vec![("c".to_string(), "c:9600".to_string(), true)];
        assert!(orphans(&[whole], open).is_empty());
    }

    #[test]
    fn a_replica_away_less_than_the_timeout_is_waited_for() {
        let e = engine(vec![
            replica("a:9600", Rw, 0),
            replica("b:9600", Rw, 0),
            replica("c:9600", Err, 29),
        ]);
        assert!(plan(&[e], &ROOMS(), node_of, holders).is_empty());
    }

    #[test]
    fn nothing_changes_while_a_replica_rebuilds() {
        let e = engine(vec![
            replica("a:9600", Rw, 0),
            replica("b:9600", Wo, 0),
            replica("c:9600", Err, 300),
        ]);
        assert!(plan(&[e], &ROOMS(), node_of, holders).is_empty());
    }

    #[test]
    fn no_node_without_a_replica_of_the_volume_means_no_replacement() {
        let e = engine(vec![
            replica("a:9600", Rw, 0),
            replica("b:9600", Rw, 0),
            replica("c:9600", Err, 300),
        ]);
        // d holds an old replica of the volume (say, a removed member).
        let held = |_: &str| BTreeSet::from(["d".to_string()]);
        assert!(plan(&[e], &ROOMS(), node_of, held).is_empty());
    }
}
