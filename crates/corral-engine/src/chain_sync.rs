//! Giving a returning or rebuilt replica the volume's snapshot chain
//! (docs/snapshots.md, "A replica that missed snapshots"; decision 53).
//!
//! The copier ([`crate::rebuild`]) makes a replica's head equal to the RW
//! set's; a replica that was ERR while snapshots were taken, or is rebuilt
//! from scratch, also needs those snapshots, each with the same view as on
//! the RW replicas. [`reconcile`] gives it them before it joins the write
//! set, while it still takes no live writes, by replaying the chain oldest
//! first:
//!
//! 1. The snapshots of an RW replica (the source) and of the target are
//!    listed. The target's that the source no longer has, or that were
//!    deleted while it was out (it may hold an older snapshot of a name
//!    since re-used), are deleted on it; so is everything from the first
//!    that does not line up with the source's chain. When the engine does
//!    not know what the target missed (it was out when the engine started),
//!    every snapshot it shares with the source is compared by its view's
//!    block checksums instead. What is left is a prefix of the source's
//!    chain.
//! 2. For each later snapshot S of the source, oldest first, the target's
//!    head is made equal to S's view in every chunk that may differ — the
//!    chunks of its catch-up plan: what was written while it was away
//!    (S was taken after it left, so S's view differs from what it holds
//!    only there), or every chunk for a full rebuild — by comparing the
//!    source's checksums of S's view with the target's head checksums and
//!    copying the runs that differ; then S is taken on the target.
//!
//! Blocks past S's size (the volume grew after S) are made to read zero.
//! The copy is paced like the rebuild's (`--rebuild-concurrency`,
//! `--rebuild-bandwidth`).
//! Nothing here needs chunk locks: S's view never changes, and the target
//! takes no writes until it joins. The caller then joins it at the chain
//! version it read before step 1 ([`crate::replica_set::ReplicaSet::join_write_set`]):
//! a snapshot created or deleted meanwhile refuses the join, and the next
//! attempt reconciles again (chunks already equal cost a checksum each).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use corral_client::ClientError;
use corral_proto::v1 as pb;
use futures::StreamExt;
use tracing::info;

use crate::client::ReplicaClient;
use crate::error::ReplicaIoError;
use crate::members::Epoch;
use crate::rebuild::{
    ChunkRange, GROUP_CHUNKS, RebuildSettings, Run, group_checksums, read_runs, runs_to_copy,
    write_runs,
};
use crate::replica_set::ReplicaSet;
use crate::volume::Volume;

/// How long a reconciliation waits for the target to finish merging a
/// snapshot it deleted before it may take one of the same name again.
const MERGE_WAIT: Duration = Duration::from_secs(60);

/// Why a target's chain could not be made the RW set's.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ChainSyncError {
    /// No RW replica listed its snapshots.
    #[error("no RW replica to read the snapshot chain from: {0}")]
    NoSource(String),
    /// The source failed (a snapshot may have been deleted meanwhile).
    #[error("source {addr}: {why}")]
    Source { addr: String, why: String },
    #[error("target: {0}")]
    Target(String),
    /// A newer engine owns the volume.
    #[error("fenced: {0}")]
    Fenced(String),
}

/// What a reconciliation did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChainReport {
    /// Snapshots deleted on the target.
    pub deleted: Vec<String>,
    /// Snapshots replayed into the target, oldest first.
    pub replayed: Vec<String>,
    /// Bytes of snapshot views compared (checksums) and copied.
    pub compared_bytes: u64,
    pub copied_bytes: u64,
}

/// One snapshot as listed: name and size.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Listed {
    name: String,
    size: u64,
}

fn listed(response: &pb::ListSnapshotsResponse) -> Vec<Listed> {
    response
        .snapshots
        .iter()
        .map(|s| Listed {
            name: s.name.clone(),
            size: s.size,
        })
        .collect()
}

/// Which of the target's snapshots to delete, and which it keeps (indices
/// into `target`; the `j`-th kept is the source's `j`-th), given the two
/// chains' names (oldest first) and the snapshots deleted while it was
/// out (None: not known; the caller compares what is kept).
pub(crate) fn plan_chain(
    source: &[&str],
    target: &[&str],
    missed: Option<&BTreeSet<String>>,
) -> (Vec<String>, Vec<usize>) {
    // Target snapshots the source has and that were not deleted meanwhile,
    // in the target's order: (index in target).
    let kept: Vec<usize> = (0..target.len())
        .filter(|&i| source.contains(&target[i]))
        .filter(|&i| missed.is_none_or(|m| !m.contains(target[i])))
        .collect();
    // The longest run of those that is a prefix of the source's chain.
    let prefix = kept
        .iter()
        .zip(source)
        .take_while(|(i, s)| target[**i] == **s)
        .count();
    let keep: Vec<usize> = kept[..prefix].to_vec();
    let delete = (0..target.len())
        .filter(|i| !keep.contains(i))
        .map(|i| target[i].to_string())
        .collect();
    (delete, keep)
}

fn source_err(client: &ReplicaClient, e: impl ToString) -> ChainSyncError {
    ChainSyncError::Source {
        addr: client.addr().to_string(),
        why: e.to_string(),
    }
}

fn data_err(
    set: &ReplicaSet,
    e: ReplicaIoError,
    wrap: impl FnOnce(String) -> ChainSyncError,
) -> ChainSyncError {
    if let ReplicaIoError::Fenced(m) = &e {
        set.mark_fenced(m);
        return ChainSyncError::Fenced(m.clone());
    }
    wrap(e.to_string())
}

fn control_err(
    set: &ReplicaSet,
    e: ClientError,
    wrap: impl FnOnce(String) -> ChainSyncError,
) -> ChainSyncError {
    if let ClientError::Fenced { .. } = &e {
        set.mark_fenced(&e.to_string());
        return ChainSyncError::Fenced(e.to_string());
    }
    wrap(e.to_string())
}

/// The parts of `chunks` inside `0..size` and past it, in groups.
fn split_at_size(volume: &Volume, chunks: &[u64], size: u64) -> (Vec<ChunkRange>, Vec<ChunkRange>) {
    let mut inside = Vec::new();
    let mut beyond = Vec::new();
    for &chunk in chunks {
        let (offset, len) = volume.chunk_range(chunk);
        let end = offset + len;
        if offset < size {
            inside.push(ChunkRange {
                chunk,
                offset,
                len: end.min(size) - offset,
            });
        }
        if end > size {
            let start = offset.max(size);
            beyond.push(ChunkRange {
                chunk,
                offset: start,
                len: end - start,
            });
        }
    }
    (inside, beyond)
}

/// Make the target's head equal to `snapshot`'s view on the source in
/// every chunk of `chunks` (and zero past its `size`). `empty`: the
/// target's head is known to hold nothing. Returns (compared, copied) bytes.
#[allow(clippy::too_many_arguments)]
async fn replay_view(
    volume: &Volume,
    source: &ReplicaClient,
    target: &ReplicaClient,
    snapshot: &str,
    size: u64,
    chunks: &[u64],
    empty: bool,
    pace: &Pace,
) -> Result<(u64, u64), ChainSyncError> {
    let set = volume.replica_set();
    let epoch = set.epoch();
    let (inside, beyond) = split_at_size(volume, chunks, size);
    let group_size = pace.concurrency.clamp(1, GROUP_CHUNKS);
    let in_flight = (pace.concurrency / group_size).max(1);
    let copies = futures::stream::iter(inside.chunks(group_size).map(<[ChunkRange]>::to_vec))
        .map(|group| async move {
            pace.wait().await;
            copy_view_group(set, epoch, source, target, snapshot, group, empty).await
        })
        .buffer_unordered(in_flight);
    futures::pin_mut!(copies);
    let (mut compared, mut copied) = (0u64, 0u64);
    while let Some(outcome) = copies.next().await {
        let (c, w) = outcome?;
        compared += c;
        copied += w;
        pace.copied.fetch_add(w, Ordering::Relaxed);
    }
    if !empty {
        let zeroes = futures::stream::iter(beyond.chunks(group_size).map(<[ChunkRange]>::to_vec))
            .map(|group| zero_group(set, epoch, target, group))
            .buffer_unordered(in_flight);
        futures::pin_mut!(zeroes);
        while let Some(outcome) = zeroes.next().await {
            copied += outcome?;
        }
    }
    Ok((compared, copied))
}

/// How fast a reconciliation copies: the rebuild's settings
/// (`--rebuild-concurrency`, `--rebuild-bandwidth`), over all its views.
struct Pace {
    concurrency: usize,
    bandwidth: Option<u64>,
    started: Instant,
    copied: AtomicU64,
}

impl Pace {
    fn new(settings: &RebuildSettings) -> Self {
        Pace {
            concurrency: settings.concurrency,
            bandwidth: settings.bandwidth.filter(|b| *b > 0),
            started: Instant::now(),
            copied: AtomicU64::new(0),
        }
    }

    /// Wait until what was copied so far is within the bandwidth.
    async fn wait(&self) {
        if let Some(bw) = self.bandwidth {
            let copied = self.copied.load(Ordering::Relaxed);
            let due = Duration::from_secs_f64(copied as f64 / bw as f64);
            let spent = self.started.elapsed();
            if due > spent {
                tokio::time::sleep(due - spent).await;
            }
        }
    }
}

/// One group of [`replay_view`] inside the snapshot's size.
async fn copy_view_group(
    set: &ReplicaSet,
    epoch: Epoch,
    source: &ReplicaClient,
    target: &ReplicaClient,
    snapshot: &str,
    group: Vec<ChunkRange>,
    empty: bool,
) -> Result<(u64, u64), ChainSyncError> {
    let compared: u64 = group.iter().map(|r| r.len).sum();
    let (source_sums, target_sums) = if empty {
        (group_checksums(source, epoch, &group, snapshot).await, None)
    } else {
        let (s, t) = futures::join!(
            group_checksums(source, epoch, &group, snapshot),
            group_checksums(target, epoch, &group, "")
        );
        let t = t.map_err(|e| data_err(set, e, ChainSyncError::Target))?;
        (s, Some(t))
    };
    let source_sums = source_sums.map_err(|e| data_err(set, e, |m| source_err(source, m)))?;
    let runs = runs_to_copy(&group, &source_sums, target_sums.as_deref());
    if runs.is_empty() {
        return Ok((compared, 0));
    }
    let data = read_runs(source, epoch, &runs, snapshot)
        .await
        .map_err(|e| data_err(set, e, |m| source_err(source, m)))?;
    write_runs(target, epoch, &runs, data)
        .await
        .map_err(|e| data_err(set, e, ChainSyncError::Target))?;
    Ok((compared, runs.iter().map(|r| r.len).sum()))
}

/// One group of [`replay_view`] past the snapshot's size: blocks of the
/// target's head that do not read zero are zeroed.
async fn zero_group(
    set: &ReplicaSet,
    epoch: Epoch,
    target: &ReplicaClient,
    group: Vec<ChunkRange>,
) -> Result<u64, ChainSyncError> {
    let sums = group_checksums(target, epoch, &group, "")
        .await
        .map_err(|e| data_err(set, e, ChainSyncError::Target))?;
    let zero: Vec<Vec<u32>> = sums
        .iter()
        .map(|s| vec![corral_proto::ZERO_BLOCK_CRC; s.len()])
        .collect();
    let runs: Vec<Run> = runs_to_copy(&group, &zero, Some(&sums));
    let data = runs
        .iter()
        .map(|r| Bytes::from(vec![0u8; r.len as usize]))
        .collect();
    write_runs(target, epoch, &runs, data)
        .await
        .map_err(|e| data_err(set, e, ChainSyncError::Target))?;
    Ok(runs.iter().map(|r| r.len).sum())
}

/// Whether `snapshot`'s view is the same on source and target over its
/// `size`, by block checksums. Returns (same, bytes compared).
async fn same_view(
    volume: &Volume,
    source: &ReplicaClient,
    target: &ReplicaClient,
    snapshot: &str,
    size: u64,
    pace: &Pace,
) -> Result<(bool, u64), ChainSyncError> {
    let set = volume.replica_set();
    let epoch = set.epoch();
    let all: Vec<u64> = (0..volume.chunk_count()).collect();
    let (inside, _) = split_at_size(volume, &all, size);
    let group_size = pace.concurrency.clamp(1, GROUP_CHUNKS);
    let in_flight = (pace.concurrency / group_size).max(1);
    let compares = futures::stream::iter(inside.chunks(group_size).map(<[ChunkRange]>::to_vec))
        .map(|group| async move {
            let (s, t) = futures::join!(
                group_checksums(source, epoch, &group, snapshot),
                group_checksums(target, epoch, &group, snapshot)
            );
            let s = s.map_err(|e| data_err(set, e, |m| source_err(source, m)))?;
            let t = t.map_err(|e| data_err(set, e, ChainSyncError::Target))?;
            Ok::<_, ChainSyncError>((s == t, group.iter().map(|r| r.len).sum::<u64>()))
        })
        .buffer_unordered(in_flight);
    futures::pin_mut!(compares);
    let mut compared = 0;
    while let Some(outcome) = compares.next().await {
        let (same, len) = outcome?;
        compared += len;
        if !same {
            return Ok((false, compared));
        }
    }
    Ok((true, compared))
}

/// Wait until the target has merged away every snapshot deleted on it.
async fn wait_merged(set: &ReplicaSet, target: &ReplicaClient) -> Result<(), ChainSyncError> {
    let deadline = tokio::time::Instant::now() + MERGE_WAIT;
    loop {
        let listed = target
            .control()
            .list_snapshots(set.volume())
            .await
            .map_err(|e| control_err(set, e, ChainSyncError::Target))?;
        if !listed.merge_pending {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ChainSyncError::Target(format!(
                "a deleted snapshot is still merging after {MERGE_WAIT:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Make `target`'s snapshot chain the RW set's (see the module
/// documentation). `chunks`: where its head may differ from the RW set's
/// (its catch-up plan); `empty`: it holds nothing; `missed`: the snapshots
/// deleted while it was out (None: not known). With no RW replica there is
/// no chain to copy: nothing is done.
pub async fn reconcile(
    volume: &Volume,
    target: &ReplicaClient,
    chunks: &[u64],
    empty: bool,
    missed: Option<&BTreeSet<String>>,
    settings: &RebuildSettings,
) -> Result<ChainReport, ChainSyncError> {
    let pace = Pace::new(settings);
    let set = volume.replica_set();
    let name = set.volume();
    let epoch = set.epoch();
    let sources = set.read_targets();
    if sources.is_empty() {
        return Ok(ChainReport::default());
    }
    let mut errors = Vec::new();
    let mut found = None;
    for (_, client) in sources {
        match client.control().list_snapshots(name).await {
            Ok(list) => {
                found = Some((client, list));
                break;
            }
            Err(e) => errors.push(format!("{}: {e}", client.addr())),
        }
    }
    let Some((source, source_list)) = found else {
        return Err(ChainSyncError::NoSource(errors.join("; ")));
    };
    let source_chain = listed(&source_list);
    let target_list = target
        .control()
        .list_snapshots(name)
        .await
        .map_err(|e| control_err(set, e, ChainSyncError::Target))?;
    let target_chain = listed(&target_list);
    let source_names: Vec<&str> = source_chain.iter().map(|s| s.name.as_str()).collect();
    let target_names: Vec<&str> = target_chain.iter().map(|s| s.name.as_str()).collect();
    let (mut delete, mut keep) = plan_chain(&source_names, &target_names, missed);
    let mut report = ChainReport::default();
    // Not knowing what it missed: a snapshot it shares may be an older one
    // of the same name. Compare the views; from the first that differs on,
    // its chain is replayed.
    if missed.is_none() && !empty {
        let mut checked = 0;
        for (j, &i) in keep.iter().enumerate() {
            let s = &source_chain[j];
            // A replayed snapshot may be larger (taken after an expansion,
            // zero past the source's size); a smaller one is another.
            if target_chain[i].size < s.size {
                break;
            }
            let (same, compared) =
                same_view(volume, &source, target, &s.name, s.size, &pace).await?;
            report.compared_bytes += compared;
            if !same {
                break;
            }
            checked += 1;
            debug_assert_eq!(target_chain[i].name, s.name);
        }
        for &i in &keep[checked..] {
            delete.push(target_chain[i].name.clone());
        }
        keep.truncate(checked);
    }
    for snapshot in &delete {
        match target
            .control()
            .delete_snapshot(name, epoch, snapshot)
            .await
        {
            Ok(_) | Err(ClientError::NotFound { .. }) => report.deleted.push(snapshot.clone()),
            Err(e) => return Err(control_err(set, e, ChainSyncError::Target)),
        }
    }
    let replay = &source_chain[keep.len()..];
    // A name deleted above cannot be taken again until its merge is done.
    if replay.iter().any(|s| delete.contains(&s.name)) {
        wait_merged(set, target).await?;
    }
    let mut head_empty = empty && target_chain.is_empty();
    let shown = (!replay.is_empty()).then(|| set.show_replay(target.addr(), replay.len()));
    for s in replay {
        if let Some(shown) = &shown {
            shown.progress().replaying(&s.name);
        }
        let (compared, copied) = replay_view(
            volume, &source, target, &s.name, s.size, chunks, head_empty, &pace,
        )
        .await?;
        target
            .control()
            .create_snapshot(name, epoch, &s.name)
            .await
            .map_err(|e| control_err(set, e, ChainSyncError::Target))?;
        head_empty = false;
        report.compared_bytes += compared;
        report.copied_bytes += copied;
        report.replayed.push(s.name.clone());
        if let Some(shown) = &shown {
            shown.progress().replayed(compared, copied);
        }
        info!(volume = %name, replica = %target.addr(), snapshot = %s.name, compared, copied,
            "replayed a missed snapshot into a returning replica");
    }
    if !report.deleted.is_empty() || !report.replayed.is_empty() {
        info!(volume = %name, replica = %target.addr(), source = %source.addr(),
            deleted = ?report.deleted, replayed = ?report.replayed,
            compared = report.compared_bytes, copied = report.copied_bytes,
            "snapshot chain reconciled");
    }
    Ok(report)
}

/// Which replicas hold a chain other than the RW set's, given each one's
/// chain (names, oldest first): the chain most of them hold is the RW
/// set's (ties: the longer, then the first listed); the indices of the
/// others are returned.
pub(crate) fn outliers(chains: &[Vec<String>]) -> Vec<usize> {
    let Some(reference) = chains
        .iter()
        .enumerate()
        .max_by(|(i, a), (j, b)| {
            let count = |c: &Vec<String>| chains.iter().filter(|x| *x == c).count();
            count(a)
                .cmp(&count(b))
                .then(a.len().cmp(&b.len()))
                .then(j.cmp(i))
        })
        .map(|(_, c)| c)
    else {
        return Vec::new();
    };
    (0..chains.len())
        .filter(|&i| chains[i] != *reference)
        .collect()
}

/// Check that the RW replicas hold one chain. They can differ only if an
/// engine stopped in the middle of a snapshot create or delete, before a
/// replica that missed it was moved out; those that differ from the chain
/// most hold are moved to ERR, with every chunk marked changed (their
/// head is in sync but any snapshot view may differ anywhere), and are
/// reconciled when they return. Returns false if it could not tell (a
/// replica did not answer, or a snapshot was being created or deleted):
/// the caller tries again.
pub async fn check_rw_chains(volume: &Volume) -> bool {
    let set = volume.replica_set();
    // Not while a create or delete is under way: its replicas' chains
    // differ until it ends.
    let Some(version) = set.quiet_chain_version() else {
        return false;
    };
    let targets = set.read_targets();
    let lists = futures::future::join_all(
        targets
            .iter()
            .map(|(_, client)| client.control().list_snapshots(set.volume())),
    )
    .await;
    let mut chains = Vec::new();
    for list in lists {
        match list {
            Ok(list) => chains.push(listed(&list).into_iter().map(|s| s.name).collect()),
            Err(_) => return false,
        }
    }
    if set.quiet_chain_version() != Some(version) {
        return false;
    }
    let out = outliers(&chains);
    if out.is_empty() {
        return true;
    }
    // Not below what the write policy needs: a volume that serves with
    // two chains beats one that does not serve.
    if chains.len() - out.len() < set.min_rw().max(1) {
        tracing::warn!(volume = %set.volume(), chains = ?chains,
            "the RW replicas hold different snapshot chains, and too few hold the same one to move the others out");
        return true;
    }
    let every_chunk: Vec<u64> = (0..volume.chunk_count()).collect();
    for i in out {
        let (id, client) = &targets[i];
        tracing::warn!(volume = %set.volume(), replica = %client.addr(), chain = ?chains[i],
            "replica's snapshot chain differs from the RW set's (a create or delete was cut short): moving it to ERR to reconcile it");
        let err = ReplicaIoError::Io(format!(
            "its snapshot chain {:?} differs from the RW set's",
            chains[i]
        ));
        let _ = set.handle_failure(*id, &err, &every_chunk).await;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_prefix_is_kept_and_the_rest_replayed() {
        let none = set(&[]);
        // Missed the newest two.
        assert_eq!(
            plan_chain(&["a", "b", "c"], &["a"], Some(&none)),
            (vec![], vec![0])
        );
        // Empty target: everything replayed.
        assert_eq!(plan_chain(&["a", "b"], &[], Some(&none)), (vec![], vec![]));
        // Same chain: nothing to do.
        assert_eq!(
            plan_chain(&["a", "b"], &["a", "b"], Some(&none)),
            (vec![], vec![0, 1])
        );
    }

    #[test]
    fn snapshots_the_source_lost_are_deleted() {
        let none = set(&[]);
        // b was deleted while it was away; c taken.
        assert_eq!(
            plan_chain(&["a", "c"], &["a", "b"], Some(&none)),
            (vec!["b".to_string()], vec![0])
        );
        // A middle one deleted: the rest still lines up.
        assert_eq!(
            plan_chain(&["a", "c"], &["a", "b", "c"], Some(&none)),
            (vec!["b".to_string()], vec![0, 2])
        );
        // Out of order (a re-used name): from the first mismatch on.
        assert_eq!(
            plan_chain(&["a", "c", "b"], &["a", "b", "c"], Some(&none)),
            (vec!["b".to_string(), "c".to_string()], vec![0])
        );
    }

    #[test]
    fn the_chain_most_replicas_hold_wins() {
        let c = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(outliers(&[]), Vec::<usize>::new());
        assert_eq!(outliers(&[c(&["a"]), c(&["a"])]), Vec::<usize>::new());
        // A create cut short on one of three.
        assert_eq!(
            outliers(&[c(&["a"]), c(&["a", "b"]), c(&["a", "b"])]),
            vec![0]
        );
        // A delete cut short on one of three.
        assert_eq!(outliers(&[c(&["a", "b"]), c(&["a"]), c(&["a"])]), vec![0]);
        // A tie: the longer chain.
        assert_eq!(outliers(&[c(&["a"]), c(&["a", "b"])]), vec![0]);
        assert_eq!(outliers(&[c(&["a", "b"]), c(&["a"])]), vec![1]);
    }

    #[test]
    fn a_name_deleted_while_away_is_not_trusted() {
        // b deleted and taken again while it was away: its b is older.
        let missed = set(&["b"]);
        assert_eq!(
            plan_chain(&["a", "b"], &["a", "b"], Some(&missed)),
            (vec!["b".to_string()], vec![0])
        );
        // Unknown: names are kept for the caller to compare.
        assert_eq!(
            plan_chain(&["a", "b"], &["a", "b"], None),
            (vec![], vec![0, 1])
        );
    }
}
