//! Names the plugin and Kubernetes must agree on: the driver name, the
//! topology key, how a CO's volume name becomes a corral volume id, and how
//! a CO's snapshot name becomes a corral snapshot and a CSI snapshot id.

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
        && volume_id.len() + 1 + name.len() <= MAX_ID_LENGTH;
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
}
