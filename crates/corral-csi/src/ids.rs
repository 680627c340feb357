//! Names the plugin and Kubernetes must agree on: the driver name, the
//! topology key, how a CO's volume name becomes a corral volume id, and how
//! a CO's snapshot name becomes a corral snapshot and a CSI snapshot id —
//! or, for a backup-typed VolumeSnapshotClass, a backup and its id.

use corral_backup::BackupUrl;

/// The CSI driver name (the StorageClass's `provisioner`).
pub const DRIVER_NAME: &str = "csi.corral.io";

/// The topology segment naming a node (NodeGetInfo's topology; CreateVolume's
/// preferred topology for `dataLocality: best-effort`).
pub const TOPOLOGY_NODE_KEY: &str = "topology.corral.io/node";

/// The corral volume id for a CO volume name: the name itself when it is a
/// valid corral volume name (1–64 of `[A-Za-z0-9._-]`, not starting with
/// '.'; Kubernetes' `pvc-<uuid>` names are), otherwise `csi-` and a 64-bit
/// FNV-1a hash of it — deterministic, so CreateVolume stays idempotent by
/// name without a database.
pub fn volume_id(name: &str) -> String {
    let valid = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if valid {
        return name.to_string();
    }
    hashed(name)
}

/// `csi-` and the 64-bit FNV-1a hash of `name`.
fn hashed(name: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("csi-{h:016x}")
}

/// Separates the volume from the snapshot in a CSI snapshot id; neither
/// name can hold it.
pub const SNAPSHOT_ID_SEPARATOR: char = '@';

/// The CSI spec's bound on ids (its "Size Limits": 128 bytes).
pub const MAX_ID_LENGTH: usize = 128;

/// The corral snapshot (of volume `volume_id`) for a CO's snapshot name:
/// the name itself when it is a valid corral snapshot name (1–64 of
/// `[A-Za-z0-9._-]`, not starting with '.' or '-'; Kubernetes'
/// `snapshot-<uuid>` names are) and the snapshot id stays within 128
/// bytes, otherwise `csi-` and a hash of it — deterministic, so
/// CreateSnapshot is idempotent by name without a database.
pub fn snapshot_name(name: &str, volume_id: &str) -> String {
    let valid = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        && volume_id.len() + 1 + name.len() <= MAX_ID_LENGTH
        // Reserved for the snapshots backups are taken from.
        && !name.starts_with(BACKUP_SNAPSHOT_PREFIX);
    if valid {
        return name.to_string();
    }
    hashed(name)
}

/// The CSI snapshot id of snapshot `snapshot` of volume `volume`:
/// `VOLUME@SNAPSHOT`, as ZFS names them. It names the volume, so that
/// DeleteSnapshot and ListSnapshots find the snapshot without a database.
pub fn snapshot_id(volume: &str, snapshot: &str) -> String {
    format!("{volume}{SNAPSHOT_ID_SEPARATOR}{snapshot}")
}

/// The volume and snapshot a CSI snapshot id names; None for an id this
/// plugin cannot have made.
pub fn parse_snapshot_id(id: &str) -> Option<(&str, &str)> {
    let (volume, snapshot) = id.split_once(SNAPSHOT_ID_SEPARATOR)?;
    let fine = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && !s.starts_with('.')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    };
    (fine(volume) && fine(snapshot) && !snapshot.starts_with('-')).then_some((volume, snapshot))
}

/// How the CSI snapshot id of a backup (taken through a backup-typed
/// VolumeSnapshotClass) starts: `backup:` then the backup's URL,
/// `TARGET/VOLUME/BACKUP` — and, when the class names an S3 endpoint,
/// [`BACKUP_ENDPOINT_SEPARATOR`] and the endpoint. DeleteSnapshot gets
/// nothing but the id, so the id says where the backup is. (Longhorn's
/// are `bak://VOLUME/BACKUP`, its backup target being cluster-wide.)
pub const BACKUP_ID_PREFIX: &str = "backup:";

/// Separates a backup's URL from its S3 endpoint in a snapshot id: a
/// character no URL holds unescaped.
pub const BACKUP_ENDPOINT_SEPARATOR: char = '|';

/// How the corral snapshots that CSI backups are taken from are named:
/// `csi-backup-BACKUP`. They are not CSI snapshots (ListSnapshots leaves
/// them out, DeleteVolume does not wait for them); the newest stays on
/// the volume as the parent of its next, incremental, backup.
pub const BACKUP_SNAPSHOT_PREFIX: &str = "csi-backup-";

/// A backup a CSI snapshot id names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupRef {
    pub url: BackupUrl,
    /// The S3 endpoint of its target (None: AWS, or a `file://` target).
    pub s3_endpoint: Option<String>,
}

/// The CSI snapshot id of backup `url` (see [`BACKUP_ID_PREFIX`]).
pub fn backup_snapshot_id(url: &BackupUrl, s3_endpoint: Option<&str>) -> String {
    match s3_endpoint {
        Some(e) => format!("{BACKUP_ID_PREFIX}{url}{BACKUP_ENDPOINT_SEPARATOR}{e}"),
        None => format!("{BACKUP_ID_PREFIX}{url}"),
    }
}

/// Whether `id` is a backup's snapshot id (well formed or not).
pub fn is_backup_snapshot_id(id: &str) -> bool {
    id.starts_with(BACKUP_ID_PREFIX)
}

/// The backup a CSI snapshot id names; None for an id this plugin cannot
/// have made.
pub fn parse_backup_snapshot_id(id: &str) -> Option<BackupRef> {
    let rest = id.strip_prefix(BACKUP_ID_PREFIX)?;
    let (url, s3_endpoint) = match rest.rsplit_once(BACKUP_ENDPOINT_SEPARATOR) {
        Some((url, e)) if url.starts_with("s3://") && is_endpoint(e) => (url, Some(e.to_string())),
        _ => (rest, None),
    };
    if !(url.starts_with("file:///") || url.starts_with("s3://")) {
        return None;
    }
    let url = BackupUrl::parse(url).ok()?;
    Some(BackupRef { url, s3_endpoint })
}

/// An S3 endpoint as a StorageClass or VolumeSnapshotClass may give it:
/// `http(s)://HOST[:PORT][/PATH]`, no spaces, no
/// [`BACKUP_ENDPOINT_SEPARATOR`].
pub fn is_endpoint(e: &str) -> bool {
    let host = e
        .strip_prefix("http://")
        .or_else(|| e.strip_prefix("https://"))
        .unwrap_or_default();
    !host.is_empty()
        && !host.starts_with('/')
        && !e
            .chars()
            .any(|c| c.is_whitespace() || c == BACKUP_ENDPOINT_SEPARATOR)
}

/// The backup a CreateSnapshot of a backup-typed class makes of `volume`
/// on `target`, and its snapshot id: named after the CO's snapshot name
/// when that is a valid backup name and the id stays within 128 bytes,
/// otherwise `csi-` and a hash of it — deterministic, so CreateSnapshot is
/// idempotent by name. An error (the reason) if even that id is too long.
pub fn backup_for(
    name: &str,
    volume: &str,
    target: &str,
    s3_endpoint: Option<&str>,
) -> Result<(BackupUrl, String), String> {
    let url = |backup: String| BackupUrl {
        target: target.trim_end_matches('/').to_string(),
        volume: volume.to_string(),
        backup,
    };
    let kept = url(name.to_string());
    if corral_backup::layout::check_name("backup", name).is_ok() {
        let id = backup_snapshot_id(&kept, s3_endpoint);
        if id.len() <= MAX_ID_LENGTH {
            return Ok((kept, id));
        }
    }
    let short = url(hashed(name));
    let id = backup_snapshot_id(&short, s3_endpoint);
    if id.len() > MAX_ID_LENGTH {
        return Err(format!(
            "the snapshot id of a backup of {volume} there ({id}) would pass the CSI limit of \
             {MAX_ID_LENGTH} bytes: use a shorter backupTarget (or backupS3Endpoint)"
        ));
    }
    Ok((short, id))
}

/// The corral snapshot backup `backup` is taken from (see
/// [`BACKUP_SNAPSHOT_PREFIX`]).
pub fn backup_snapshot(backup: &str) -> String {
    let name = format!("{BACKUP_SNAPSHOT_PREFIX}{backup}");
    if name.len() <= 64 {
        return name;
    }
    format!(
        "{BACKUP_SNAPSHOT_PREFIX}{}",
        hashed(backup).trim_start_matches("csi-")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_names_are_kept_and_others_hashed_stably() {
        let pv = "pvc-0b9a5c3e-8a5f-4b1e-9d1c-2f7c1a3e5b7d";
        assert_eq!(volume_id(pv), pv);
        let odd = "sanity Node Service/with spaces";
        assert_eq!(volume_id(odd), volume_id(odd));
        assert!(volume_id(odd).starts_with("csi-"));
        assert_ne!(volume_id(odd), volume_id("sanity Node Service/with space"));
        assert!(volume_id(&"x".repeat(65)).starts_with("csi-"));
        assert!(volume_id(".hidden").starts_with("csi-"));
    }

    #[test]
    fn snapshot_ids_name_their_volume_and_round_trip() {
        let pv = "pvc-0b9a5c3e-8a5f-4b1e-9d1c-2f7c1a3e5b7d";
        let snap = "snapshot-5d0a8f3c-1b2e-4c6d-8e9f-0a1b2c3d4e5f";
        assert_eq!(snapshot_name(snap, pv), snap);
        let id = snapshot_id(pv, snap);
        assert_eq!(id, format!("{pv}@{snap}"));
        assert_eq!(parse_snapshot_id(&id), Some((pv, snap)));
        // Too long, or not a corral name: hashed, stably; the id stays short.
        for odd in ["x".repeat(128), "-dash".into(), "with space".into()] {
            let name = snapshot_name(&odd, pv);
            assert!(name.starts_with("csi-"), "{odd}: {name}");
            assert_eq!(name, snapshot_name(&odd, pv));
            let id = snapshot_id(pv, &name);
            assert!(id.len() <= MAX_ID_LENGTH);
            assert_eq!(parse_snapshot_id(&id), Some((pv, name.as_str())));
        }
        // A valid name whose id would pass 128 bytes is hashed too.
        let long_volume = "v".repeat(64);
        assert!(snapshot_name(&"s".repeat(64), &long_volume).starts_with("csi-"));
        for bad in [
            "",
            "reallyfakesnapshotid",
            "@",
            "v@",
            "@s",
            "v@s@t",
            "v@-s",
            ".v@s",
            "v@s p",
        ] {
            assert_eq!(parse_snapshot_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn backup_ids_carry_the_url_and_endpoint_and_round_trip() {
        let pv = "pvc-0b9a5c3e-8a5f-4b1e-9d1c-2f7c1a3e5b7d";
        let snap = "snapshot-5d0a8f3c-1b2e-4c6d-8e9f-0a1b2c3d4e5f";
        let (url, id) = backup_for(snap, pv, "file:///mnt/backups/", None).unwrap();
        assert_eq!(url.backup, snap);
        assert_eq!(id, format!("backup:file:///mnt/backups/{pv}/{snap}"));
        let back = parse_backup_snapshot_id(&id).unwrap();
        assert_eq!((back.url, back.s3_endpoint), (url, None));
        assert!(is_backup_snapshot_id(&id));
        assert_eq!(parse_snapshot_id(&id), None, "not a plain snapshot id");

        // With an endpoint the name no longer fits: hashed, stably.
        let (url, id) =
            backup_for(snap, pv, "s3://bucket/corral", Some("http://10.0.0.5:9000")).unwrap();
        assert!(url.backup.starts_with("csi-"), "{url}");
        assert!(id.len() <= MAX_ID_LENGTH, "{id}");
        assert!(id.ends_with("|http://10.0.0.5:9000"), "{id}");
        let again = backup_for(snap, pv, "s3://bucket/corral", Some("http://10.0.0.5:9000"));
        assert_eq!(again.unwrap().1, id);
        let back = parse_backup_snapshot_id(&id).unwrap();
        assert_eq!(back.url, url);
        assert_eq!(back.s3_endpoint.as_deref(), Some("http://10.0.0.5:9000"));

        let long_target = format!("s3://bucket/{}", "p".repeat(100));
        assert!(backup_for(snap, pv, &long_target, None).is_err());
        for bad in [
            "backup:",
            "backup:http://x/v/b",
            "backup:file://relative/v/b",
            "backup:s3://b/v",
            "backup:s3://b/p/v/b c",
            "v@s",
        ] {
            assert_eq!(parse_backup_snapshot_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_snapshots_backups_are_taken_from_are_reserved() {
        assert_eq!(backup_snapshot("snapshot-1"), "csi-backup-snapshot-1");
        let long = backup_snapshot(&"b".repeat(64));
        assert!(
            long.starts_with(BACKUP_SNAPSHOT_PREFIX) && long.len() <= 64,
            "{long}"
        );
        // A CO's snapshot can never be named like one.
        assert!(snapshot_name("csi-backup-snapshot-1", "pvc-1").starts_with("csi-"));
        assert_ne!(
            snapshot_name("csi-backup-snapshot-1", "pvc-1"),
            "csi-backup-snapshot-1"
        );
        assert!(is_endpoint("http://10.0.0.5:9000"));
        assert!(is_endpoint("https://s3.example.com"));
        for bad in [
            "10.0.0.5:9000",
            "http://",
            "http:///x",
            "http://a b",
            "http://a|b",
        ] {
            assert!(!is_endpoint(bad), "{bad}");
        }
    }
}
