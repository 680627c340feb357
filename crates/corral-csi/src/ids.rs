//! Names the plugin and Kubernetes must agree on: the driver name, the
//! topology key, and how a CO's volume name becomes a corral volume id.

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
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("csi-{h:016x}")
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
}
