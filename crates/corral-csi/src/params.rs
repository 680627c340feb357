//! A volume's parameters: what a StorageClass says (`numberOfReplicas`,
//! `staleReplicaTimeout`, `fsType`, `dataLocality`, `writePolicy`,
//! `chunkSize`, `blockSize`, `fromBackup`, `backupS3Endpoint`), parsed
//! once with an error that
//! names the parameter, and carried afterwards in the volume's
//! `volume_context` (kept by Kubernetes in the PV), so the plugin stays
//! stateless.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Parameters the external-provisioner adds (`--extra-create-metadata`)
/// or Kubernetes reserves: accepted and ignored.
const RESERVED_PREFIX: &str = "csi.storage.k8s.io/";
/// The fsType Kubernetes may pass in the reserved namespace.
const RESERVED_FSTYPE: &str = "csi.storage.k8s.io/fstype";

/// Every parameter a StorageClass may set.
const PARAMETERS: [&str; 9] = [
    "numberOfReplicas",
    "staleReplicaTimeout",
    "fsType",
    "dataLocality",
    "writePolicy",
    "chunkSize",
    "blockSize",
    "fromBackup",
    "backupS3Endpoint",
];

/// Filesystems the node plugin makes and mounts.
pub const FILESYSTEMS: [&str; 2] = ["ext4", "xfs"];

/// Whether a replica is placed on the node that will use the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataLocality {
    Disabled,
    BestEffort,
}

/// The engine's write policy (see docs/failure-handling.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WritePolicy {
    Quorum,
    Available,
}

impl WritePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            WritePolicy::Quorum => "quorum",
            WritePolicy::Available => "available",
        }
    }
}

/// Everything a StorageClass can set for a volume, with corral's defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeParams {
    pub replicas: u32,
    /// How long a failed replica may be away and still be caught up;
    /// past it, it is replaced by a new replica on another node.
    pub stale_replica_timeout: Duration,
    pub fs_type: String,
    pub data_locality: DataLocality,
    /// `None`: the engine's default for the replica count.
    pub write_policy: Option<WritePolicy>,
    pub chunk_size: u32,
    pub block_size: u32,
    /// A backup URL (`TARGET/VOLUME/BACKUP`) to create the volume from.
    pub from_backup: Option<String>,
    /// The S3 endpoint of `from_backup`'s target (None: AWS).
    pub backup_s3_endpoint: Option<String>,
}

impl Default for VolumeParams {
    fn default() -> Self {
        VolumeParams {
            replicas: 3,
            stale_replica_timeout: Duration::from_secs(30 * 60),
            fs_type: "ext4".into(),
            data_locality: DataLocality::Disabled,
            write_policy: None,
            chunk_size: 256 << 10,
            block_size: 512,
            from_backup: None,
            backup_s3_endpoint: None,
        }
    }
}

/// A parameter that is unknown or malformed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("parameter {name:?}: {why}")]
pub struct ParamError {
    pub name: String,
    pub why: String,
}

fn bad(name: &str, why: impl Into<String>) -> ParamError {
    ParamError {
        name: name.to_string(),
        why: why.into(),
    }
}

/// Most replicas a volume may ask for.
pub const MAX_REPLICAS: u32 = 16;

impl VolumeParams {
    /// Parse a StorageClass's parameters (CreateVolume's `parameters`).
    pub fn parse(parameters: &HashMap<String, String>) -> Result<Self, ParamError> {
        let mut p = VolumeParams::default();
        // Sorted, so that of several bad parameters the same one is named.
        let sorted: BTreeMap<_, _> = parameters.iter().collect();
        for (name, value) in sorted {
            let v = value.trim();
            match name.as_str() {
                "numberOfReplicas" => {
                    let n: u32 = v
                        .parse()
                        .map_err(|_| bad(name, format!("{value:?} is not a whole number")))?;
                    if n == 0 || n > MAX_REPLICAS {
                        return Err(bad(name, format!("must be 1 to {MAX_REPLICAS}, not {n}")));
                    }
                    p.replicas = n;
                }
                "staleReplicaTimeout" => {
                    let d = parse_timeout(v).map_err(|why| bad(name, why))?;
                    if d.is_zero() || d > Duration::from_secs(7 * 24 * 3600) {
                        return Err(bad(name, "must be more than 0 and at most 10080 minutes"));
                    }
                    p.stale_replica_timeout = d;
                }
                "fsType" | RESERVED_FSTYPE => {
                    if !FILESYSTEMS.contains(&v) {
                        return Err(bad(name, format!("{value:?}: use ext4 or xfs")));
                    }
                    p.fs_type = v.to_string();
                }
                "dataLocality" => {
                    p.data_locality = match v {
                        "disabled" => DataLocality::Disabled,
                        "best-effort" => DataLocality::BestEffort,
                        _ => {
                            return Err(bad(
                                name,
                                format!("{value:?}: use disabled or best-effort"),
                            ));
                        }
                    }
                }
                "writePolicy" => {
                    p.write_policy = Some(match v {
                        "quorum" => WritePolicy::Quorum,
                        "available" => WritePolicy::Available,
                        _ => return Err(bad(name, format!("{value:?}: use quorum or available"))),
                    })
                }
                "chunkSize" => {
                    let n = parse_size(v).map_err(|why| bad(name, why))?;
                    if n < 4096 || !n.is_power_of_two() || n > (64 << 20) {
                        return Err(bad(
                            name,
                            format!("{value:?}: a power of two from 4KiB to 64MiB"),
                        ));
                    }
                    p.chunk_size = n as u32;
                }
                "blockSize" => {
                    p.block_size = match v {
                        "512" => 512,
                        "4096" => 4096,
                        _ => return Err(bad(name, format!("{value:?}: use 512 or 4096"))),
                    }
                }
                "fromBackup" => {
                    if v.is_empty() {
                        return Err(bad(name, "empty"));
                    }
                    if !(v.starts_with("file:///") || v.starts_with("s3://")) {
                        return Err(bad(
                            name,
                            format!(
                                "{value:?}: use file:///DIR/VOLUME/BACKUP or s3://BUCKET/PREFIX/VOLUME/BACKUP"
                            ),
                        ));
                    }
                    corral_backup::BackupUrl::parse(v).map_err(|e| bad(name, e.to_string()))?;
                    p.from_backup = Some(v.to_string());
                }
                "backupS3Endpoint" => {
                    if !crate::ids::is_endpoint(v) {
                        return Err(bad(name, format!("{value:?}: use http(s)://HOST:PORT")));
                    }
                    p.backup_s3_endpoint = Some(v.to_string());
                }
                other if other.starts_with(RESERVED_PREFIX) => {}
                _ => return Err(bad(name, "unknown parameter")),
            }
        }
        if p.backup_s3_endpoint.is_some()
            && !p
                .from_backup
                .as_deref()
                .is_some_and(|b| b.starts_with("s3://"))
        {
            return Err(bad(
                "backupS3Endpoint",
                "only with an s3:// fromBackup (a backup-typed VolumeSnapshotClass names its own)",
            ));
        }
        Ok(p)
    }

    /// The volume context: every parameter, as strings, under the
    /// StorageClass's own names.
    pub fn to_context(&self) -> HashMap<String, String> {
        let mut c = HashMap::new();
        c.insert("numberOfReplicas".into(), self.replicas.to_string());
        let secs = self.stale_replica_timeout.as_secs();
        c.insert(
            "staleReplicaTimeout".into(),
            if secs.is_multiple_of(60) {
                (secs / 60).to_string()
            } else {
                format!("{secs}s")
            },
        );
        c.insert("fsType".into(), self.fs_type.clone());
        c.insert(
            "dataLocality".into(),
            match self.data_locality {
                DataLocality::Disabled => "disabled",
                DataLocality::BestEffort => "best-effort",
            }
            .into(),
        );
        if let Some(w) = self.write_policy {
            c.insert("writePolicy".into(), w.as_str().into());
        }
        c.insert("chunkSize".into(), self.chunk_size.to_string());
        c.insert("blockSize".into(), self.block_size.to_string());
        if let Some(b) = &self.from_backup {
            c.insert("fromBackup".into(), b.clone());
        }
        if let Some(e) = &self.backup_s3_endpoint {
            c.insert("backupS3Endpoint".into(), e.clone());
        }
        c
    }

    /// Read a volume context back (absent keys: defaults, as for a volume
    /// made before the key existed). Keys that are not parameters (the
    /// volume's `name`, what the CO adds) are ignored.
    pub fn from_context(context: &HashMap<String, String>) -> Result<Self, ParamError> {
        let known: HashMap<String, String> = context
            .iter()
            .filter(|(k, _)| PARAMETERS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Self::parse(&known)
    }
}

/// `staleReplicaTimeout`: a whole number of minutes, as Longhorn's users
/// write it, or a number with `s`, `m` or `h` (corral's extension, so a
/// test or a lab can use seconds).
fn parse_timeout(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a number of minutes (or of s, m, h)"))?;
    let secs = match unit {
        "" | "m" => n.checked_mul(60),
        "s" => Some(n),
        "h" => n.checked_mul(3600),
        _ => return Err(format!("{s:?}: unknown unit {unit:?}")),
    };
    secs.map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// A size: bytes, or a number with `Ki`/`Mi`/`Gi` (Kubernetes' quantity
/// suffixes) or `KiB`/`MiB`/`GiB`.
fn parse_size(s: &str) -> Result<u64, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size such as 256KiB"))?;
    let shift = match unit {
        "" | "B" => 0,
        "K" | "Ki" | "KiB" => 10,
        "M" | "Mi" | "MiB" => 20,
        "G" | "Gi" | "GiB" => 30,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_issue_storage_class_parses() {
        let p = VolumeParams::parse(&params(&[
            ("numberOfReplicas", "3"),
            ("staleReplicaTimeout", "30"),
            ("fsType", "ext4"),
            ("dataLocality", "best-effort"),
            ("csi.storage.k8s.io/pvc/name", "data-mysql-0"),
        ]))
        .unwrap();
        assert_eq!(p.replicas, 3);
        assert_eq!(p.stale_replica_timeout, Duration::from_secs(30 * 60));
        assert_eq!(p.data_locality, DataLocality::BestEffort);
        assert_eq!(p.fs_type, "ext4");
    }

    #[test]
    fn corral_own_parameters_parse() {
        let p = VolumeParams::parse(&params(&[
            ("writePolicy", "available"),
            ("chunkSize", "1MiB"),
            ("blockSize", "4096"),
            ("csi.storage.k8s.io/fstype", "xfs"),
        ]))
        .unwrap();
        assert_eq!(p.write_policy, Some(WritePolicy::Available));
        assert_eq!(p.chunk_size, 1 << 20);
        assert_eq!(p.block_size, 4096);
        assert_eq!(p.fs_type, "xfs");
    }

    #[test]
    fn a_bad_or_unknown_parameter_is_named() {
        for (pairs, name) in [
            (vec![("numberOfReplicas", "three")], "numberOfReplicas"),
            (vec![("numberOfReplicas", "0")], "numberOfReplicas"),
            (
                vec![("staleReplicaTimeout", "30 minutes")],
                "staleReplicaTimeout",
            ),
            (vec![("staleReplicaTimeout", "0")], "staleReplicaTimeout"),
            (vec![("fsType", "btrfs")], "fsType"),
            (vec![("dataLocality", "strict-local")], "dataLocality"),
            (vec![("writePolicy", "all")], "writePolicy"),
            (vec![("chunkSize", "3000")], "chunkSize"),
            (vec![("blockSize", "1024")], "blockSize"),
            (vec![("replicaCount", "3")], "replicaCount"),
            (vec![("fromBackup", "s3://b")], "fromBackup"),
            (vec![("fromBackup", "http://b/v/b1")], "fromBackup"),
            (vec![("fromBackup", "file://relative/v/b1")], "fromBackup"),
            (vec![("fromBackup", "s3://b/p/v/bad name")], "fromBackup"),
            (
                vec![("backupS3Endpoint", "http://10.0.0.5:9000")],
                "backupS3Endpoint",
            ),
            (
                vec![
                    ("fromBackup", "file:///backups/v/b1"),
                    ("backupS3Endpoint", "http://10.0.0.5:9000"),
                ],
                "backupS3Endpoint",
            ),
            (
                vec![
                    ("fromBackup", "s3://b/p/v/b1"),
                    ("backupS3Endpoint", "10.0.0.5:9000"),
                ],
                "backupS3Endpoint",
            ),
        ] {
            let err = VolumeParams::parse(&params(&pairs)).unwrap_err();
            assert_eq!(err.name, name, "{pairs:?}: {err}");
            assert!(err.to_string().contains(name));
        }
    }

    #[test]
    fn a_backup_to_restore_and_its_endpoint_parse() {
        let p = VolumeParams::parse(&params(&[
            ("fromBackup", "s3://bucket/corral/pvc-1/snapshot-1"),
            ("backupS3Endpoint", "http://10.0.0.5:9000"),
        ]))
        .unwrap();
        assert_eq!(
            p.from_backup.as_deref(),
            Some("s3://bucket/corral/pvc-1/snapshot-1")
        );
        assert_eq!(
            p.backup_s3_endpoint.as_deref(),
            Some("http://10.0.0.5:9000")
        );
        assert_eq!(VolumeParams::from_context(&p.to_context()).unwrap(), p);
        let file = VolumeParams::parse(&params(&[("fromBackup", "file:///mnt/b/pvc-1/b1")]));
        assert_eq!(
            file.unwrap().from_backup.as_deref(),
            Some("file:///mnt/b/pvc-1/b1")
        );
    }

    #[test]
    fn the_context_reads_back_as_the_same_parameters() {
        let p = VolumeParams::parse(&params(&[
            ("numberOfReplicas", "2"),
            ("staleReplicaTimeout", "45s"),
            ("writePolicy", "quorum"),
            ("chunkSize", "64KiB"),
        ]))
        .unwrap();
        let mut context = p.to_context();
        context.insert("name".into(), "pvc-1".into());
        context.insert("csi.storage.k8s.io/pod.name".into(), "mysql-0".into());
        assert_eq!(VolumeParams::from_context(&context).unwrap(), p);
        let d = VolumeParams::default();
        assert_eq!(VolumeParams::from_context(&d.to_context()).unwrap(), d);
    }
}
