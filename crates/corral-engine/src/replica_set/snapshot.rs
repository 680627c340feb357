//! Snapshots across the replica set (DESIGN.md, "Snapshots, clones,
//! expansion"; docs/snapshots.md).
//!
//! Create, in two phases: with every write drained and none starting
//! (`io_gate` held exclusively), every RW replica switches to a new head in
//! memory at the same point of the write stream (`switch_snapshot`); then
//! writes resume, and every replica that switched is asked again
//! (`create_snapshot`, idempotent), which only then indexes and syncs the
//! frozen layer and commits its record, and answers. So the pause is the
//! drain plus one control round trip, not a sync — and no replica's commit
//! competes for the CPU with another's switch. A replica that fails either phase
//! is moved to ERR as for a failed write, so every replica left RW holds
//! the snapshot (all-or-nothing among the RW set); one that failed the
//! second phase may have lost writes it took after switching (its store
//! refuses flushes until the record is committed), so it is marked for a
//! full copy. If none took it, the call fails. Flushes and FUA writes wait
//! in the engine until the second phase ends (`snapshot_commit`).
//! Idempotent by name on each replica. A replica being rebuilt (WO) cannot
//! take it — its head is not the RW set's yet — so it is moved to ERR too,
//! and gets the snapshot replayed when it returns ([`crate::chain_sync`]):
//! no replica turns RW without a snapshot the RW set has.
//!
//! Delete: every RW and WO replica marks the layer deleted and merges it
//! away in the background; I/O is not paused. A replica that fails it goes
//! to ERR, as for a create, so the write set always agrees on the chain;
//! ERR replicas are noted as having missed it and have it deleted when
//! they return. List: from the first RW replica that answers.
//!
//! Revert: only with no client attached (the caller counts the frontend
//! connections), every replica RW (a rebuild or a catch-up would mix
//! contents from before and after) and no merge pending; checked on every
//! replica before any is changed. Then, with writes held, every replica
//! reverts. One that fails is moved to ERR with every chunk marked changed,
//! so it is copied in full when it returns.

use std::sync::atomic::{AtomicU64, Ordering};

use corral_client::ClientError;
use corral_proto::v1 as pb;
use futures::future::join_all;
use tracing::{info, warn};

use super::{Mode, ReplicaSet, SlotId};
use crate::error::ReplicaIoError;

/// The least time a replica is given to record a snapshot it has switched
/// to (four replica timeouts, at least this).
const COMMIT_TIMEOUT_FLOOR: std::time::Duration = std::time::Duration::from_secs(10);

/// Longest snapshot name (as the replica store's).
pub const MAX_NAME: usize = 64;

/// Why a snapshot operation was refused or failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "snapshot name {0:?} must be 1 to {MAX_NAME} bytes of letters, digits, '.', '_' and '-', not starting with '.' or '-'"
    )]
    BadName(String),
    #[error("volume {volume} has no snapshot named {name:?}")]
    NotFound { volume: String, name: String },
    /// Not now: a client is attached, a replica is not RW, a delete is merging.
    #[error("{0}")]
    Precondition(String),
    /// The replicas could not carry it out; the message says what changed.
    #[error("{0}")]
    Failed(String),
}

/// Checks a snapshot name by the replica store's rule, so a bad one is
/// refused before any replica is asked.
pub fn check_name(name: &str) -> Result<(), SnapshotError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(SnapshotError::BadName(name.to_string()))
    }
}

/// What a snapshot operation did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotReport {
    /// The snapshot as the first replica that took it reports it (create).
    pub snapshot: Option<pb::SnapshotInfo>,
    /// Replicas that carried it out.
    pub done: Vec<String>,
    /// Replicas that could not ("address: why"); after a create, now ERR.
    pub failed: Vec<String>,
}

/// Replicas that did it (address, answer), and those that failed (slot, address, why).
type Outcomes<T> = (Vec<(String, T)>, Vec<(SlotId, String, ReplicaIoError)>);

impl ReplicaSet {
    /// Sorts the answers of a fan-out that changes every replica: a fenced
    /// answer ends the operation (a newer engine owns the volume); other
    /// failures are returned for the caller to move those replicas to ERR.
    fn sort_outcomes<T>(
        &self,
        what: &str,
        results: Vec<(SlotId, String, Result<T, ClientError>)>,
    ) -> Result<Outcomes<T>, SnapshotError> {
        let mut done = Vec::new();
        let mut failed = Vec::new();
        for (id, address, result) in results {
            let err = match result {
                Ok(answer) => {
                    done.push((address, answer));
                    continue;
                }
                Err(e @ ClientError::Fenced { .. }) => {
                    self.mark_fenced(&e.to_string());
                    return Err(SnapshotError::Failed(format!(
                        "volume {}: {e}",
                        self.volume
                    )));
                }
                Err(ClientError::TimedOut { after, .. }) => ReplicaIoError::Timeout(after),
                Err(e) => ReplicaIoError::Io(format!("{what}: {e}")),
            };
            failed.push((id, address, err));
        }
        Ok((done, failed))
    }

    /// Take snapshot `name` on every RW replica (see the module documentation).
    pub async fn snapshot_create(&self, name: &str) -> Result<SnapshotReport, SnapshotError> {
        check_name(name)?;
        self.check_writable()
            .map_err(|e| SnapshotError::Failed(e.to_string()))?;
        let started = std::time::Instant::now();
        // Flushes wait until every replica has recorded the snapshot: a
        // replica's flush waits for that commit, which under load can take
        // longer than the replica timeout a flush is held to.
        let _commits = self.snapshot_commit.write().await;
        let _gate = self.io_gate.write().await;
        let drained = started.elapsed();
        // A replica reconciled before or during this does not join (see
        // `ReplicaSet::join_write_set`).
        let _change = self.chain_change();
        let (targets, rebuilding): (Vec<_>, Vec<_>) = self
            .write_targets()
            .into_iter()
            .partition(|(_, _, mode)| *mode == Mode::Rw);
        let asked = std::time::Instant::now();
        let slowest_switch = AtomicU64::new(0);
        let fastest_switch = AtomicU64::new(u64::MAX);
        let calls = targets.iter().map(|(id, client, _)| {
            let (slowest_switch, fastest_switch) = (&slowest_switch, &fastest_switch);
            async move {
                let result = client
                    .control()
                    .switch_snapshot(&self.volume, self.epoch, name)
                    .await;
                let took = asked.elapsed().as_micros() as u64;
                slowest_switch.fetch_max(took, Ordering::Relaxed);
                fastest_switch.fetch_min(took, Ordering::Relaxed);
                (*id, client.addr().to_string(), result)
            }
        });
        let (done, failed) =
            self.sort_outcomes(&format!("snapshot {name}"), join_all(calls).await)?;
        let mut report = SnapshotReport::default();
        for (address, info) in done {
            report.snapshot.get_or_insert(info);
            report.done.push(address);
        }
        report.failed = failed
            .iter()
            .map(|(_, address, err)| format!("{address}: {err}"))
            .collect();
        if report.done.is_empty() {
            return Err(SnapshotError::Failed(format!(
                "volume {}: no RW replica took snapshot {name:?} ({})",
                self.volume,
                report.failed.join("; ")
            )));
        }
        // No ERR member holds the whole volume now (see `Member::holds_every_ack`).
        self.with_members(|m| m.note_snapshot_created());
        // Like a failed write: a replica without the snapshot leaves the RW set.
        for (id, address, err) in &failed {
            warn!(volume = %self.volume, replica = %address, error = %err,
                "replica could not take the snapshot: moving it to ERR");
            self.handle_failure(*id, err, &[])
                .await
                .map_err(|e| SnapshotError::Failed(format!("volume {}: {e}", self.volume)))?;
        }
        // A replica being rebuilt cannot take it: its head is not the RW
        // set's yet. It leaves the write set, keeping what its rebuild had
        // left to copy; its return replays this snapshot into it first
        // (`crate::chain_sync`), so it never turns RW without it.
        for (id, client, _) in &rebuilding {
            let err = ReplicaIoError::Io(format!(
                "missed snapshot {name:?} while being rebuilt: its chain is replayed when it returns"
            ));
            warn!(volume = %self.volume, replica = %client.addr(), snapshot = name,
                "replica was being rebuilt during a snapshot: moving it to ERR");
            self.handle_failure(*id, &err, &[])
                .await
                .map_err(|e| SnapshotError::Failed(format!("volume {}: {e}", self.volume)))?;
        }
        let paused = started.elapsed();
        drop(_change);
        drop(_gate);
        // Writes flow again. The second phase: every replica that switched
        // answers once the snapshot is durable on it.
        let switched: Vec<_> = targets
            .iter()
            .filter(|(_, client, _)| report.done.iter().any(|a| a == client.addr()))
            .collect();
        // A sync of everything the frozen head took since the last flush:
        // allowed longer than a write.
        let within = self.timeout.saturating_mul(4).max(COMMIT_TIMEOUT_FLOOR);
        let calls = switched.iter().map(|(id, client, _)| async move {
            let result = client
                .control()
                .commit_snapshot(&self.volume, self.epoch, name, within)
                .await;
            (*id, client.addr().to_string(), result)
        });
        let (_, unrecorded) =
            self.sort_outcomes(&format!("snapshot {name}"), join_all(calls).await)?;
        if !unrecorded.is_empty() {
            // It acknowledged writes into a head its metadata may not name.
            let every_chunk: Vec<u64> = (0..self.chunk_count()).collect();
            for (id, address, err) in &unrecorded {
                warn!(volume = %self.volume, replica = %address, error = %err,
                    "replica could not record the snapshot: moving it to ERR for a full copy");
                report.done.retain(|a| a != address);
                report.failed.push(format!("{address}: {err}"));
                self.handle_failure(*id, err, &every_chunk)
                    .await
                    .map_err(|e| SnapshotError::Failed(format!("volume {}: {e}", self.volume)))?;
            }
            if report.done.is_empty() {
                return Err(SnapshotError::Failed(format!(
                    "volume {}: no RW replica recorded snapshot {name:?} ({})",
                    self.volume,
                    report.failed.join("; ")
                )));
            }
        }
        info!(volume = %self.volume, snapshot = name, replicas = report.done.len(),
            drained_us = drained.as_micros() as u64,
            fastest_switch_us = fastest_switch.load(Ordering::Relaxed),
            slowest_switch_us = slowest_switch.load(Ordering::Relaxed),
            paused_us = paused.as_micros() as u64,
            total_us = started.elapsed().as_micros() as u64, "snapshot taken");
        Ok(report)
    }

    /// Delete snapshot `name` on every RW and WO replica; each merges it
    /// away in the background. A replica that no longer has it counts as
    /// done. Like a create, all-or-nothing among the write set: a replica
    /// that fails it is moved to ERR, and ERR replicas — those too — have
    /// it deleted when they return (`crate::chain_sync`).
    pub async fn snapshot_delete(&self, name: &str) -> Result<SnapshotReport, SnapshotError> {
        check_name(name)?;
        // Shared with writes, exclusive with joins, for the whole fan-out
        // (each replica only marks the layer deleted): a replica joins
        // before it and is a target, or after it, and then one whose chain
        // was read before the delete had reached every replica sees the
        // version change and is reconciled again.
        let _gate = self.io_gate.read().await;
        let _change = self.chain_change();
        let targets = self.write_targets();
        let calls = targets.iter().map(|(id, client, _)| async move {
            let result = match client
                .control()
                .delete_snapshot(&self.volume, self.epoch, name)
                .await
            {
                Ok(_) => Ok(false),
                Err(ClientError::NotFound { .. }) => Ok(true),
                Err(e) => Err(e),
            };
            (*id, client.addr().to_string(), result)
        });
        let (done, failed) =
            self.sort_outcomes(&format!("deleting snapshot {name}"), join_all(calls).await)?;
        let missing = done.iter().filter(|(_, missing)| *missing).count();
        let mut report = SnapshotReport {
            done: done.into_iter().map(|(address, _)| address).collect(),
            ..Default::default()
        };
        report.failed = failed
            .iter()
            .map(|(_, address, err)| format!("{address}: {err}"))
            .collect();
        let mut kept = Vec::new();
        for (id, address, err) in &failed {
            warn!(volume = %self.volume, replica = %address, snapshot = name, error = %err,
                "replica could not delete the snapshot: moving it to ERR");
            if self.handle_failure(*id, err, &[]).await.is_err()
                && self
                    .read_state()
                    .members
                    .get(*id)
                    .is_some_and(|m| m.mode != Mode::Err)
            {
                kept.push(address.clone());
            }
        }
        // ERR members (those just moved too) delete it when they return.
        self.with_members(|m| m.note_snapshot_deleted(name));
        if !kept.is_empty() || report.done.is_empty() {
            return Err(SnapshotError::Failed(format!(
                "volume {}: snapshot {name:?} deleted on {} replica(s), not on: {}; delete it again",
                self.volume,
                report.done.len(),
                report.failed.join("; ")
            )));
        }
        if missing == report.done.len() {
            return Err(SnapshotError::NotFound {
                volume: self.volume.clone(),
                name: name.to_string(),
            });
        }
        info!(volume = %self.volume, snapshot = name, replicas = report.done.len(),
            "snapshot deleted");
        Ok(report)
    }

    /// Revert the volume to snapshot `name` (see the module documentation).
    /// `attached`: frontend clients connected now; `chunk_count`: the
    /// volume's chunks (a replica that fails is marked changed in all).
    pub async fn snapshot_revert(
        &self,
        name: &str,
        attached: usize,
        chunk_count: u64,
    ) -> Result<SnapshotReport, SnapshotError> {
        check_name(name)?;
        if attached > 0 {
            return Err(SnapshotError::Precondition(format!(
                "volume {}: {attached} client(s) attached; detach (unmount, log out) before reverting",
                self.volume
            )));
        }
        let _gate = self.io_gate.write().await;
        let _change = self.change.lock().await;
        if self.rw_count() != self.total() {
            return Err(SnapshotError::Precondition(format!(
                "volume {}: only {} of {} replicas are RW; revert when every replica is healthy",
                self.volume,
                self.rw_count(),
                self.total()
            )));
        }
        let targets = self.write_targets();
        // Every replica must have it and no merge under way, before any changes.
        for (_, client, _) in &targets {
            let listed = client
                .control()
                .list_snapshots(&self.volume)
                .await
                .map_err(|e| {
                    SnapshotError::Failed(format!("volume {}: {e}; nothing changed", self.volume))
                })?;
            if !listed.snapshots.iter().any(|s| s.name == name) {
                return Err(SnapshotError::NotFound {
                    volume: self.volume.clone(),
                    name: name.to_string(),
                });
            }
            if listed.merge_pending {
                return Err(SnapshotError::Precondition(format!(
                    "volume {}: a deleted snapshot is still merging on {}; revert when it is done",
                    self.volume,
                    client.addr()
                )));
            }
        }
        let calls = targets.iter().map(|(id, client, _)| async move {
            let result = client
                .control()
                .revert_snapshot(&self.volume, self.epoch, name)
                .await;
            (*id, client.addr().to_string(), result)
        });
        let (done, failed) =
            self.sort_outcomes(&format!("revert to {name}"), join_all(calls).await)?;
        let mut report = SnapshotReport {
            done: done.into_iter().map(|(address, _)| address).collect(),
            ..Default::default()
        };
        report.failed = failed
            .iter()
            .map(|(_, address, err)| format!("{address}: {err}"))
            .collect();
        drop(_change);
        // A replica that may not have reverted differs anywhere: copy it whole.
        let every_chunk: Vec<u64> = (0..chunk_count).collect();
        for (id, address, err) in &failed {
            warn!(volume = %self.volume, replica = %address, error = %err,
                "replica could not revert: moving it to ERR for a full copy");
            self.handle_failure(*id, err, &every_chunk)
                .await
                .map_err(|e| SnapshotError::Failed(format!("volume {}: {e}", self.volume)))?;
        }
        if report.done.is_empty() {
            return Err(SnapshotError::Failed(format!(
                "volume {}: no replica reverted to {name:?} ({})",
                self.volume,
                report.failed.join("; ")
            )));
        }
        info!(volume = %self.volume, snapshot = name, replicas = report.done.len(), "volume reverted to snapshot");
        Ok(report)
    }

    /// The snapshots and layers as the first RW replica lists them; a merge
    /// is pending if it is on any RW replica, and `merge_error` says why it
    /// is stuck on each replica where it is.
    pub async fn snapshot_list(&self) -> Result<pb::ListSnapshotsResponse, SnapshotError> {
        let rw: Vec<_> = self
            .write_targets()
            .into_iter()
            .filter(|(_, _, mode)| *mode == Mode::Rw)
            .collect();
        let listed = join_all(rw.iter().map(|(_, client, _)| async move {
            let listed = client.control().list_snapshots(&self.volume).await;
            (client.addr().to_string(), listed.map_err(|e| e.to_string()))
        }))
        .await;
        merge_listings(listed).map_err(|errors| {
            SnapshotError::Failed(format!(
                "volume {}: no RW replica listed its snapshots ({errors})",
                self.volume
            ))
        })
    }
}

/// One listing from the replicas' (address, listing) answers, in the order
/// asked: the first that answered, with `merge_pending` of any and the
/// `merge_error` of each, prefixed by its address. Err: every call failed
/// (their errors joined).
fn merge_listings(
    listed: Vec<(String, Result<pb::ListSnapshotsResponse, String>)>,
) -> Result<pb::ListSnapshotsResponse, String> {
    let mut merged: Option<pb::ListSnapshotsResponse> = None;
    let mut stuck = Vec::new();
    let mut errors = Vec::new();
    for (address, result) in listed {
        match result {
            Ok(l) => {
                if !l.merge_error.is_empty() {
                    stuck.push(format!("{address}: {}", l.merge_error));
                }
                let pending = l.merge_pending;
                let m = merged.get_or_insert(l);
                m.merge_pending |= pending;
            }
            Err(e) => errors.push(format!("{address}: {e}")),
        }
    }
    let mut merged = merged.ok_or_else(|| errors.join("; "))?;
    merged.merge_error = stuck.join("; ");
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_reports_a_merge_stuck_on_any_replica() {
        let listing = |pending: bool, error: &str| pb::ListSnapshotsResponse {
            merge_pending: pending,
            merge_error: error.into(),
            ..Default::default()
        };
        let merged = merge_listings(vec![
            ("a".into(), Ok(listing(false, ""))),
            ("b".into(), Err("unreachable".into())),
            ("c".into(), Ok(listing(true, "no space left on device"))),
        ])
        .unwrap();
        assert!(merged.merge_pending);
        assert_eq!(merged.merge_error, "c: no space left on device");
        let none = merge_listings(vec![("a".into(), Ok(listing(false, "")))]).unwrap();
        assert!(!none.merge_pending && none.merge_error.is_empty());
        let failed = merge_listings(vec![
            ("a".into(), Err("x".into())),
            ("b".into(), Err("y".into())),
        ]);
        assert_eq!(failed, Err("a: x; b: y".into()));
    }

    #[test]
    fn names_follow_the_store_rule() {
        for good in ["a", "hourly-2026.11.30_17", &"n".repeat(64)] {
            assert_eq!(check_name(good), Ok(()), "{good}");
        }
        for bad in ["", "-a", ".a", "a/b", "a b", "é", &"n".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
