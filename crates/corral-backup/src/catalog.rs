//! What a target holds and its upkeep: the volumes and backups on it
//! (`corral backup ls`), removing a backup (`backup rm`), keeping the last
//! N of a volume (`backup create --retain N`), and garbage collection of
//! the packs and pages no backup names any more (`backup gc`).
//!
//! Garbage collection never removes what a backup or restore in progress
//! still needs, in this cluster or another sharing the target:
//! - a volume with a live lease ([`crate::lease`]) is skipped whole; the
//!   leases are read before anything is decided and again just before
//!   anything is deleted, and so are the manifests: a change in between
//!   skips the volume this round;
//! - an object younger than the minimum age (an hour by default) is kept,
//!   whatever names it: a backup puts its packs before the manifest that
//!   names them;
//! - a page a manifest names that cannot be read stops the collection of
//!   that volume (its packs cannot be known), with an error.
//!
//! A pack is deleted only whole, once no page of any backup names it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::lease::{live_leases, now_unix_ms};
use crate::manifest::Manifest;
use crate::target::{Target, TargetError};
use crate::transfer::{TransferError, read_manifest};
use crate::{BlockHash, Page, layout};

/// Objects younger than this are never collected (see the module
/// documentation).
pub const DEFAULT_MIN_AGE: Duration = Duration::from_secs(60 * 60);

/// The backups of `volume` on `target`, oldest first.
pub async fn backups(target: &Target, volume: &str) -> Result<Vec<Manifest>, TransferError> {
    layout::check_name("volume", volume)?;
    let mut out = Vec::new();
    for object in target.list(&layout::backups(volume)).await? {
        let Some(name) = layout::backup_of_manifest(volume, &object) else {
            continue;
        };
        match read_manifest(target, volume, &name).await {
            Ok(m) => out.push(m),
            // Removed while we listed.
            Err(TransferError::Target(TargetError::NotFound { .. })) => {}
            Err(e) => return Err(e),
        }
    }
    out.sort_by(|a, b| (a.created_unix_ms, &a.name).cmp(&(b.created_unix_ms, &b.name)));
    Ok(out)
}

/// The volumes with anything on `target`.
pub async fn volumes(target: &Target) -> Result<Vec<String>, TransferError> {
    let mut out: Vec<String> = target
        .list_dirs("volumes/")
        .await?
        .into_iter()
        .filter(|v| layout::check_name("volume", v).is_ok())
        .collect();
    out.sort();
    Ok(out)
}

/// Removes backup `backup` of `volume` (its manifest: the packs and pages
/// only it named go at the next garbage collection). A backup that is not
/// there is an error.
pub async fn remove_backup(
    target: &Target,
    volume: &str,
    backup: &str,
) -> Result<(), TransferError> {
    // Read first: a name that is no backup is reported, not ignored.
    read_manifest(target, volume, backup).await?;
    target.delete(&layout::manifest(volume, backup)).await?;
    Ok(())
}

/// Keeps the newest `keep` backups of `volume` and removes the others;
/// returns the names removed, oldest first.
pub async fn retain(
    target: &Target,
    volume: &str,
    keep: usize,
) -> Result<Vec<String>, TransferError> {
    let all = backups(target, volume).await?;
    let drop = all.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for m in all.into_iter().take(drop) {
        target.delete(&layout::manifest(volume, &m.name)).await?;
        removed.push(m.name);
    }
    Ok(removed)
}

/// What a garbage collection of one volume did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub volume: String,
    pub backups: usize,
    pub live_pages: usize,
    pub live_packs: usize,
    pub deleted_pages: usize,
    pub deleted_packs: usize,
    pub bytes_freed: u64,
    /// Unnamed objects kept because they are younger than the minimum age.
    pub kept_young: usize,
    /// Why nothing was deleted, when the volume was skipped.
    pub skipped: Option<String>,
}

/// What is live: the manifests' names, and the pages and packs they name.
struct LiveSet {
    manifests: BTreeSet<String>,
    pages: BTreeSet<BlockHash>,
    packs: BTreeSet<BlockHash>,
}

async fn live_set(target: &Target, volume: &str) -> Result<LiveSet, TransferError> {
    let manifests = backups(target, volume).await?;
    let mut pages = BTreeSet::new();
    for m in &manifests {
        for i in 0..m.pages.len() {
            if let Some(id) = m.page(i)? {
                pages.insert(id);
            }
        }
    }
    let mut packs = BTreeSet::new();
    for id in &pages {
        let object = target.get(&layout::page(volume, id)).await?;
        let page = Page::decode(&object, id)?;
        packs.extend(page.blocks.iter().flatten().map(|r| r.pack));
    }
    Ok(LiveSet {
        manifests: manifests.into_iter().map(|m| m.name).collect(),
        pages,
        packs,
    })
}

async fn lease_note(target: &Target, volume: &str) -> Result<Option<String>, TransferError> {
    let leases = live_leases(target, volume, now_unix_ms()).await?;
    Ok(leases.first().map(|(object, lease)| match lease {
        Some(l) => format!(
            "a {:?} of backup {} is in progress ({}, lease {object} until {} ms since the epoch)",
            l.kind, l.backup, l.holder, l.until_unix_ms
        )
        .to_lowercase(),
        None => format!("lease {object} cannot be read: kept as live"),
    }))
}

/// Deletes the packs and pages of `volume` that no backup names and that
/// are older than `min_age` (see the module documentation for what is
/// never deleted).
pub async fn collect_garbage(
    target: &Target,
    volume: &str,
    min_age: Duration,
) -> Result<GcReport, TransferError> {
    layout::check_name("volume", volume)?;
    let mut report = GcReport {
        volume: volume.to_string(),
        ..Default::default()
    };
    if let Some(why) = lease_note(target, volume).await? {
        report.skipped = Some(why);
        return Ok(report);
    }
    let live = live_set(target, volume).await?;
    report.backups = live.manifests.len();
    report.live_pages = live.pages.len();
    report.live_packs = live.packs.len();
    let older_than = now_unix_ms().saturating_sub(min_age.as_millis() as u64);
    let mut doomed: BTreeMap<String, (bool, u64)> = BTreeMap::new();
    for (dir, is_pack) in [("pages", false), ("packs", true)] {
        for o in target
            .list_objects(&format!("volumes/{volume}/{dir}/"))
            .await?
        {
            let Some(hex) = o.name.rsplit('/').next() else {
                continue;
            };
            // An object whose name is no hash is not ours to delete.
            let Ok(id) = BlockHash::from_hex(hex) else {
                continue;
            };
            let named = if is_pack {
                live.packs.contains(&id)
            } else {
                live.pages.contains(&id)
            };
            if named {
                continue;
            }
            if o.modified_unix_ms > older_than {
                report.kept_young += 1;
                continue;
            }
            doomed.insert(o.name, (is_pack, o.size));
        }
    }
    // Anything started or finished meanwhile: leave this round.
    if let Some(why) = lease_note(target, volume).await? {
        report.skipped = Some(why);
        return Ok(report);
    }
    let now: BTreeSet<String> = backups(target, volume)
        .await?
        .into_iter()
        .map(|m| m.name)
        .collect();
    if now != live.manifests {
        report.skipped = Some("its backups changed during the collection: run it again".into());
        return Ok(report);
    }
    for (object, (is_pack, size)) in doomed {
        target.delete(&object).await?;
        if is_pack {
            report.deleted_packs += 1;
        } else {
            report.deleted_pages += 1;
        }
        report.bytes_freed += size;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::{HeldLease, LeaseKind};
    use crate::testing::{GIB, MemoryVolume, file_target, spec};
    use crate::transfer::{restore, write_backup};

    async fn back_up(
        t: &Target,
        vol: &MemoryVolume,
        name: &str,
        at: u64,
        parent: Option<&Manifest>,
        changed: &[u64],
    ) -> Manifest {
        let mut s = spec(name, GIB);
        s.created_unix_ms = at;
        write_backup(t, &s, parent, changed, vol)
            .await
            .unwrap()
            .manifest
            .unwrap()
    }

    async fn restores_as(t: &Target, name: &str, image: &std::collections::HashMap<u64, Vec<u8>>) {
        let m = read_manifest(t, "db", name).await.unwrap();
        let out = MemoryVolume::default();
        restore(t, &m, &out).await.unwrap();
        assert!(
            &out.snapshot() == image,
            "backup {name} does not restore as taken"
        );
    }

    async fn objects(t: &Target, dir: &str) -> usize {
        t.list(&format!("volumes/db/{dir}/")).await.unwrap().len()
    }

    #[tokio::test]
    async fn retention_and_removal_free_only_what_no_backup_names_and_never_under_a_lease() {
        let tmp = tempfile::tempdir().unwrap();
        let t = file_target(tmp.path());
        let vol = MemoryVolume::default();
        for b in 0..8 {
            vol.set(b, b as u8);
        }
        let m1 = back_up(&t, &vol, "b1", 10, None, &(0..8).collect::<Vec<_>>()).await;
        vol.set(3, 33);
        vol.set(20, 20);
        let m2 = back_up(&t, &vol, "b2", 20, Some(&m1), &[3, 20]).await;
        let image2 = vol.snapshot();
        vol.set(5, 55);
        back_up(&t, &vol, "b3", 30, Some(&m2), &[5]).await;
        let image3 = vol.snapshot();

        assert_eq!(volumes(&t).await.unwrap(), ["db"]);
        let names: Vec<String> = backups(&t, "db")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(names, ["b1", "b2", "b3"]);
        assert!(matches!(
            remove_backup(&t, "db", "no-such").await,
            Err(TransferError::Target(TargetError::NotFound { .. }))
        ));

        // Keep the last two: b1 goes; young objects are kept by default.
        assert_eq!(retain(&t, "db", 2).await.unwrap(), ["b1"]);
        let young = collect_garbage(&t, "db", DEFAULT_MIN_AGE).await.unwrap();
        assert_eq!(
            (young.deleted_packs, young.deleted_pages),
            (0, 0),
            "{young:?}"
        );
        assert!(
            young.kept_young >= 1,
            "b1's page is unnamed but young: {young:?}"
        );

        // Under a lease, nothing goes, whatever its age.
        let lease = HeldLease::take(&t, "db", LeaseKind::Restore, "b2", Duration::from_secs(60))
            .await
            .unwrap();
        let held = collect_garbage(&t, "db", Duration::ZERO).await.unwrap();
        assert!(
            held.skipped
                .as_deref()
                .is_some_and(|w| w.contains("restore of backup b2")),
            "{held:?}"
        );
        assert_eq!((held.deleted_packs, held.deleted_pages), (0, 0));
        lease.release().await.unwrap();

        let pages_before = objects(&t, "pages").await;
        let gc = collect_garbage(&t, "db", Duration::ZERO).await.unwrap();
        assert_eq!(gc.skipped, None);
        assert_eq!(gc.backups, 2);
        assert_eq!(
            gc.deleted_pages, 1,
            "b1's page, which b2 and b3 replaced: {gc:?}"
        );
        assert_eq!(
            gc.deleted_packs, 0,
            "b1's pack still holds blocks b2 and b3 name"
        );
        assert_eq!(objects(&t, "pages").await, pages_before - 1);
        restores_as(&t, "b2", &image2).await;
        restores_as(&t, "b3", &image3).await;

        // Once no backup is left, nothing of the volume's data is.
        remove_backup(&t, "db", "b2").await.unwrap();
        remove_backup(&t, "db", "b3").await.unwrap();
        let gc = collect_garbage(&t, "db", Duration::ZERO).await.unwrap();
        assert!(gc.deleted_packs >= 3 && gc.bytes_freed > 0, "{gc:?}");
        assert_eq!(
            (objects(&t, "packs").await, objects(&t, "pages").await),
            (0, 0)
        );
    }

    #[tokio::test]
    async fn a_page_that_cannot_be_read_stops_the_collection() {
        let tmp = tempfile::tempdir().unwrap();
        let t = file_target(tmp.path());
        let vol = MemoryVolume::default();
        vol.set(1, 1);
        let m = back_up(&t, &vol, "b1", 1, None, &[1]).await;
        let page = m.page(0).unwrap().unwrap();
        t.delete(&layout::page("db", &page)).await.unwrap();
        assert!(collect_garbage(&t, "db", Duration::ZERO).await.is_err());
        assert_eq!(objects(&t, "packs").await, 1, "nothing deleted");
    }
}
