//! What an engine is: its validated [`EngineSpec`] (the request's spec,
//! checked field by field), the [`EngineAddresses`] the daemon gave it,
//! and the `corral engine` command line both make (with `--local-replica`
//! when the daemon's own replica is among the engine's: [`LocalReplica`]).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use corral_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::error::NodeError;

/// The iSCSI target name of `volume` (the volume is LUN 0).
pub fn iscsi_target(volume: &str) -> String {
    format!("iqn.2026-11.io.corral:{volume}")
}

/// A volume's engine as requested, validated. Zero / empty fields mean
/// "the engine's default", as in `node.proto`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineSpec {
    pub volume: String,
    pub size: u64,
    pub replicas: Vec<String>,
    pub replica_timeout_ms: u64,
    pub stale_replica_timeout_ms: u64,
    pub write_policy: String,
    pub block_size: u32,
    pub chunk_size: u32,
    pub nbd: bool,
    pub iscsi: bool,
    /// `--clone-from` (empty: not a clone).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub clone_from: String,
    /// `--clone-snapshot` (empty: none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub clone_snapshot: String,
    /// `--from-backup` (empty: not a restore).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub from_backup: String,
    /// `--s3-endpoint` of the restore's target (empty: AWS, or a `file://`
    /// target).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub backup_s3_endpoint: String,
}

impl EngineSpec {
    /// Check a request's spec; the error names the first bad field.
    pub fn from_pb(spec: &pb::EngineSpec) -> Result<Self, NodeError> {
        corral_replica::registry::validate_volume_name(&spec.volume)
            .map_err(|e| NodeError::bad_spec("volume", e.to_string()))?;
        if spec.size == 0 || !spec.size.is_multiple_of(4096) {
            return Err(NodeError::bad_spec(
                "size",
                format!("{} must be a non-zero multiple of 4096 bytes", spec.size),
            ));
        }
        if spec.replicas.is_empty() {
            return Err(NodeError::bad_spec(
                "replicas",
                "give at least one replica address",
            ));
        }
        for (i, r) in spec.replicas.iter().enumerate() {
            if r.is_empty() || r.chars().any(char::is_whitespace) {
                return Err(NodeError::bad_spec(
                    "replicas",
                    format!("address {r:?} is not a HOST:PORT"),
                ));
            }
            if spec.replicas[..i].contains(r) {
                return Err(NodeError::bad_spec(
                    "replicas",
                    format!("{r} is given twice"),
                ));
            }
        }
        if !matches!(spec.write_policy.as_str(), "" | "quorum" | "available") {
            return Err(NodeError::bad_spec(
                "write_policy",
                format!(
                    "{:?}: use \"quorum\", \"available\" or \"\" (the engine's default)",
                    spec.write_policy
                ),
            ));
        }
        if !matches!(spec.block_size, 0 | 512 | 4096) {
            return Err(NodeError::bad_spec(
                "block_size",
                format!(
                    "{} must be 512, 4096 or 0 (the engine's default)",
                    spec.block_size
                ),
            ));
        }
        if spec.chunk_size != 0 && (!spec.chunk_size.is_power_of_two() || spec.chunk_size < 4096) {
            return Err(NodeError::bad_spec(
                "chunk_size",
                format!(
                    "{} must be a power of two of at least 4096, or 0",
                    spec.chunk_size
                ),
            ));
        }
        if spec.clone_from.chars().any(char::is_whitespace) {
            return Err(NodeError::bad_spec(
                "clone_from",
                format!("{:?} is not a HOST:PORT", spec.clone_from),
            ));
        }
        if !spec.clone_snapshot.is_empty() && spec.clone_from.is_empty() {
            return Err(NodeError::bad_spec(
                "clone_snapshot",
                "needs clone_from (the source's engine)",
            ));
        }
        if !spec.from_backup.is_empty() {
            let url = &spec.from_backup;
            if !(url.starts_with("file:///") || url.starts_with("s3://"))
                || url.chars().any(char::is_whitespace)
            {
                return Err(NodeError::bad_spec(
                    "from_backup",
                    format!(
                        "{url:?} is not a file:///DIR/VOLUME/BACKUP or s3://BUCKET/PREFIX/VOLUME/BACKUP URL"
                    ),
                ));
            }
            if !spec.clone_from.is_empty() {
                return Err(NodeError::bad_spec(
                    "from_backup",
                    "a new volume is a clone (clone_from) or a restore, not both",
                ));
            }
        }
        if !spec.backup_s3_endpoint.is_empty() {
            let e = &spec.backup_s3_endpoint;
            if spec.from_backup.is_empty() {
                return Err(NodeError::bad_spec(
                    "backup_s3_endpoint",
                    "needs from_backup (the backup to restore)",
                ));
            }
            if !(e.starts_with("http://") || e.starts_with("https://"))
                || e.chars().any(char::is_whitespace)
            {
                return Err(NodeError::bad_spec(
                    "backup_s3_endpoint",
                    format!("{e:?} is not an http(s)://HOST:PORT URL"),
                ));
            }
        }
        Ok(EngineSpec {
            volume: spec.volume.clone(),
            size: spec.size,
            replicas: spec.replicas.clone(),
            replica_timeout_ms: spec.replica_timeout_ms,
            stale_replica_timeout_ms: spec.stale_replica_timeout_ms,
            write_policy: spec.write_policy.clone(),
            block_size: spec.block_size,
            chunk_size: spec.chunk_size,
            nbd: spec.nbd,
            iscsi: spec.iscsi,
            clone_from: spec.clone_from.clone(),
            clone_snapshot: spec.clone_snapshot.clone(),
            from_backup: spec.from_backup.clone(),
            backup_s3_endpoint: spec.backup_s3_endpoint.clone(),
        })
    }

    pub fn to_pb(&self) -> pb::EngineSpec {
        pb::EngineSpec {
            volume: self.volume.clone(),
            size: self.size,
            replicas: self.replicas.clone(),
            replica_timeout_ms: self.replica_timeout_ms,
            stale_replica_timeout_ms: self.stale_replica_timeout_ms,
            write_policy: self.write_policy.clone(),
            block_size: self.block_size,
            chunk_size: self.chunk_size,
            nbd: self.nbd,
            iscsi: self.iscsi,
            clone_from: self.clone_from.clone(),
            clone_snapshot: self.clone_snapshot.clone(),
            from_backup: self.from_backup.clone(),
            backup_s3_endpoint: self.backup_s3_endpoint.clone(),
        }
    }

    /// The names of the fields in which `other` differs from this spec.
    pub fn differences(&self, other: &EngineSpec) -> Vec<&'static str> {
        let mut d = Vec::new();
        let mut check = |same: bool, name| {
            if !same {
                d.push(name);
            }
        };
        check(self.volume == other.volume, "volume");
        check(self.size == other.size, "size");
        check(self.replicas == other.replicas, "replicas");
        check(
            self.replica_timeout_ms == other.replica_timeout_ms,
            "replica_timeout_ms",
        );
        check(
            self.stale_replica_timeout_ms == other.stale_replica_timeout_ms,
            "stale_replica_timeout_ms",
        );
        check(self.write_policy == other.write_policy, "write_policy");
        check(self.block_size == other.block_size, "block_size");
        check(self.chunk_size == other.chunk_size, "chunk_size");
        check(self.nbd == other.nbd, "nbd");
        check(self.iscsi == other.iscsi, "iscsi");
        check(self.clone_from == other.clone_from, "clone_from");
        check(
            self.clone_snapshot == other.clone_snapshot,
            "clone_snapshot",
        );
        check(self.from_backup == other.from_backup, "from_backup");
        check(
            self.backup_s3_endpoint == other.backup_s3_endpoint,
            "backup_s3_endpoint",
        );
        d
    }

    /// Ports its engine needs: control, plus one per frontend.
    pub fn ports_needed(&self) -> usize {
        1 + usize::from(self.nbd) + usize::from(self.iscsi)
    }
}

/// Where an engine serves: its control gRPC and its frontends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineAddresses {
    pub control: SocketAddr,
    pub nbd: Option<SocketAddr>,
    pub iscsi: Option<SocketAddr>,
}

impl EngineAddresses {
    /// Give `spec`'s engine the `ports` (as many as it needs: control,
    /// then NBD, then iSCSI) on `ip`.
    pub fn assign(ip: IpAddr, spec: &EngineSpec, ports: &[u16]) -> Option<Self> {
        let mut ports = ports.iter().map(|p| SocketAddr::new(ip, *p));
        let control = ports.next()?;
        let nbd = if spec.nbd { Some(ports.next()?) } else { None };
        let iscsi = if spec.iscsi {
            Some(ports.next()?)
        } else {
            None
        };
        Some(EngineAddresses {
            control,
            nbd,
            iscsi,
        })
    }

    /// Every port it holds.
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        std::iter::once(self.control)
            .chain(self.nbd)
            .chain(self.iscsi)
            .map(|a| a.port())
    }
}

/// Flags the daemon always sets on an engine's command line; the operator's
/// `--engine-args` may not give them.
pub const DAEMON_FLAGS: [&str; 7] = [
    "--volume",
    "--size",
    "--replica",
    "--listen",
    "--nbd",
    "--iscsi",
    "--local-replica",
];

/// The daemon's own replica service as its engines reach it: the address
/// engines name it by and the unix socket it also serves on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalReplica {
    pub address: String,
    pub socket: PathBuf,
}

/// `--local-replica ADDR=SOCKET` when `local` (this daemon's replica
/// service) is among `spec`'s replicas; nothing otherwise (the engine
/// refuses a local replica that is not one of its replicas).
pub fn local_replica_args(spec: &EngineSpec, local: Option<&LocalReplica>) -> Vec<String> {
    match local {
        Some(l) if spec.replicas.contains(&l.address) => vec![
            "--local-replica".into(),
            format!("{}={}", l.address, l.socket.display()),
        ],
        _ => Vec::new(),
    }
}

/// Check the operator's extra engine arguments once, at daemon start.
pub fn check_engine_args(extra: &[String]) -> Result<(), NodeError> {
    for arg in extra {
        let flag = arg.split('=').next().unwrap_or(arg);
        if DAEMON_FLAGS.contains(&flag) {
            return Err(NodeError::Config(format!(
                "--engine-args may not give {flag}: the node daemon sets it for each engine"
            )));
        }
    }
    Ok(())
}

/// The `corral engine` arguments (after the binary) for `spec` at `addrs`.
/// `extra` (the operator's `--engine-args`) goes last; a flag the spec sets
/// replaces the same flag there (the engine refuses a flag given twice).
pub fn engine_command_line(
    spec: &EngineSpec,
    addrs: &EngineAddresses,
    extra: &[String],
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "engine".into(),
        "--volume".into(),
        spec.volume.clone(),
        "--size".into(),
        spec.size.to_string(),
    ];
    for r in &spec.replicas {
        args.push("--replica".into());
        args.push(r.clone());
    }
    args.push("--listen".into());
    args.push(addrs.control.to_string());
    if let Some(nbd) = addrs.nbd {
        args.push("--nbd".into());
        args.push(nbd.to_string());
    }
    if let Some(iscsi) = addrs.iscsi {
        args.push("--iscsi".into());
        args.push(iscsi.to_string());
    }
    let mut set = Vec::new();
    if spec.replica_timeout_ms > 0 {
        set.push((
            "--replica-timeout",
            format!("{}ms", spec.replica_timeout_ms),
        ));
    }
    if spec.stale_replica_timeout_ms > 0 {
        set.push((
            "--stale-replica-timeout",
            format!("{}ms", spec.stale_replica_timeout_ms),
        ));
    }
    if !spec.write_policy.is_empty() {
        set.push(("--write-policy", spec.write_policy.clone()));
    }
    if spec.block_size > 0 {
        set.push(("--block-size", spec.block_size.to_string()));
    }
    if spec.chunk_size > 0 {
        set.push(("--chunk-size", spec.chunk_size.to_string()));
    }
    if !spec.clone_from.is_empty() {
        set.push(("--clone-from", spec.clone_from.clone()));
    }
    if !spec.clone_snapshot.is_empty() {
        set.push(("--clone-snapshot", spec.clone_snapshot.clone()));
    }
    if !spec.from_backup.is_empty() {
        set.push(("--from-backup", spec.from_backup.clone()));
        if !spec.backup_s3_endpoint.is_empty() {
            set.push(("--s3-endpoint", spec.backup_s3_endpoint.clone()));
        }
    }
    for (flag, value) in &set {
        args.push((*flag).to_string());
        args.push(value.clone());
    }
    let mut rest = extra.iter().peekable();
    while let Some(arg) = rest.next() {
        let replaced = set.iter().any(|(flag, _)| {
            if arg == flag {
                // `--flag value`: drop the value too.
                if rest.peek().is_some_and(|v| !v.starts_with("--")) {
                    rest.next();
                }
                true
            } else {
                arg.starts_with(&format!("{flag}="))
            }
        });
        if !replaced {
            args.push(arg.clone());
        }
    }
    args
}

/// Whether `argv` (a process's command line) is the engine of `volume`
/// serving its control service on `control` — how a restarted daemon tells
/// its engine from an unrelated process that reuses a recorded pid.
pub fn is_engine_command_line(argv: &[String], volume: &str, control: SocketAddr) -> bool {
    let value_of = |flag: &str| {
        argv.windows(2)
            .find(|w| w[0] == flag)
            .map(|w| w[1].as_str())
    };
    argv.get(1).is_some_and(|a| a == "engine")
        && value_of("--volume") == Some(volume)
        && value_of("--listen") == Some(control.to_string().as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> pb::EngineSpec {
        pb::EngineSpec {
            volume: "pvc-1".into(),
            size: 64 << 20,
            replicas: vec!["10.0.0.1:9500".into(), "10.0.0.2:9500".into()],
            nbd: true,
            ..Default::default()
        }
    }

    #[test]
    fn a_good_spec_round_trips() {
        let spec = EngineSpec::from_pb(&good()).unwrap();
        assert_eq!(spec.to_pb(), good());
        assert!(spec.differences(&spec.clone()).is_empty());
    }

    #[test]
    fn bad_specs_name_their_field() {
        type Spoil = Box<dyn Fn(&mut pb::EngineSpec)>;
        let cases: Vec<(&str, Spoil)> = vec![
            ("volume", Box::new(|s| s.volume.clear())),
            ("volume", Box::new(|s| s.volume = "../etc".into())),
            ("size", Box::new(|s| s.size = 0)),
            ("size", Box::new(|s| s.size = 1000)),
            ("replicas", Box::new(|s| s.replicas.clear())),
            (
                "replicas",
                Box::new(|s| s.replicas.push("10.0.0.1:9500".into())),
            ),
            ("replicas", Box::new(|s| s.replicas.push(String::new()))),
            (
                "write_policy",
                Box::new(|s| s.write_policy = "majority".into()),
            ),
            ("block_size", Box::new(|s| s.block_size = 1000)),
            ("chunk_size", Box::new(|s| s.chunk_size = 3000)),
        ];
        for (field, spoil) in cases {
            let mut spec = good();
            spoil(&mut spec);
            match EngineSpec::from_pb(&spec) {
                Err(NodeError::BadSpec { field: f, .. }) => assert_eq!(f, field, "{spec:?}"),
                other => panic!("{spec:?}: expected a bad {field}, got {other:?}"),
            }
        }
    }

    #[test]
    fn differences_name_the_fields() {
        let a = EngineSpec::from_pb(&good()).unwrap();
        let mut b = a.clone();
        b.size *= 2;
        b.iscsi = true;
        assert_eq!(a.differences(&b), vec!["size", "iscsi"]);
    }

    fn addrs(spec: &EngineSpec) -> EngineAddresses {
        EngineAddresses::assign("127.0.0.1".parse().unwrap(), spec, &[10000, 10001, 10002]).unwrap()
    }

    #[test]
    fn ports_are_assigned_control_first_then_frontends() {
        let mut spec = EngineSpec::from_pb(&good()).unwrap();
        spec.iscsi = true;
        let a = addrs(&spec);
        assert_eq!(a.control.port(), 10000);
        assert_eq!(a.nbd.map(|a| a.port()), Some(10001));
        assert_eq!(a.iscsi.map(|a| a.port()), Some(10002));
        assert_eq!(a.ports().collect::<Vec<_>>(), vec![10000, 10001, 10002]);
        spec.nbd = false;
        let a = addrs(&spec);
        assert_eq!((a.nbd, a.iscsi.map(|a| a.port())), (None, Some(10001)));
        assert!(EngineAddresses::assign(a.control.ip(), &spec, &[1]).is_none());
    }

    #[test]
    fn the_command_line_carries_the_spec_and_the_spec_wins_over_extra_args() {
        let mut spec = EngineSpec::from_pb(&good()).unwrap();
        spec.replica_timeout_ms = 3000;
        spec.write_policy = "available".into();
        let a = addrs(&spec);
        let extra: Vec<String> = "--replica-timeout 9s --open-timeout 10s --write-policy=quorum"
            .split_whitespace()
            .map(String::from)
            .collect();
        let argv = engine_command_line(&spec, &a, &extra);
        let line = argv.join(" ");
        assert!(line.starts_with(
            "engine --volume pvc-1 --size 67108864 --replica 10.0.0.1:9500 --replica 10.0.0.2:9500 --listen 127.0.0.1:10000 --nbd 127.0.0.1:10001"
        ), "{line}");
        assert!(line.contains("--replica-timeout 3000ms"), "{line}");
        assert!(line.contains("--write-policy available"), "{line}");
        assert!(line.ends_with("--open-timeout 10s"), "{line}");
        assert_eq!(line.matches("--replica-timeout").count(), 1, "{line}");
        assert_eq!(line.matches("--write-policy").count(), 1, "{line}");
        assert!(!line.contains("--iscsi"), "{line}");
        // Without spec values, the operator's flags stay.
        spec.replica_timeout_ms = 0;
        let line = engine_command_line(&spec, &a, &extra).join(" ");
        assert!(line.contains("--replica-timeout 9s"), "{line}");
        // As /proc/PID/cmdline shows it: the binary first.
        let mut with_binary = vec!["/usr/bin/corral".to_string()];
        with_binary.extend(argv);
        assert!(is_engine_command_line(&with_binary, "pvc-1", a.control));
    }

    #[test]
    fn engine_args_may_not_set_what_the_daemon_sets() {
        let ok: Vec<String> = vec!["--open-timeout".into(), "10s".into()];
        assert!(check_engine_args(&ok).is_ok());
        for bad in ["--listen", "--nbd=1.2.3.4:5", "--volume"] {
            let e = check_engine_args(&[bad.to_string()]).unwrap_err();
            assert!(
                e.to_string().contains(bad.split('=').next().unwrap()),
                "{e}"
            );
        }
    }

    #[test]
    fn only_the_recorded_engine_is_recognised() {
        let control: SocketAddr = "127.0.0.1:10000".parse().unwrap();
        let argv = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        assert!(is_engine_command_line(
            &argv("/usr/bin/corral engine --volume v --listen 127.0.0.1:10000"),
            "v",
            control
        ));
        for other in [
            "/usr/bin/corral engine --volume w --listen 127.0.0.1:10000",
            "/usr/bin/corral engine --volume v --listen 127.0.0.1:10001",
            "/usr/bin/corral replica --volume v --listen 127.0.0.1:10000",
            "/bin/sleep 100",
            "",
        ] {
            assert!(
                !is_engine_command_line(&argv(other), "v", control),
                "{other}"
            );
        }
    }

    #[test]
    fn an_engine_with_this_nodes_replica_reaches_it_over_the_socket() {
        let spec = EngineSpec::from_pb(&good()).unwrap();
        let here = LocalReplica {
            address: "10.0.0.2:9500".into(),
            socket: "/var/lib/corral/.sockets/replica.sock".into(),
        };
        assert_eq!(
            local_replica_args(&spec, Some(&here)),
            [
                "--local-replica",
                "10.0.0.2:9500=/var/lib/corral/.sockets/replica.sock"
            ]
        );
        let elsewhere = LocalReplica {
            address: "10.0.0.9:9500".into(),
            ..here
        };
        assert!(local_replica_args(&spec, Some(&elsewhere)).is_empty());
        assert!(local_replica_args(&spec, None).is_empty());
        // The operator may not set it: the daemon does.
        assert!(
            check_engine_args(&["--local-replica=a=b".into()])
                .unwrap_err()
                .to_string()
                .contains("--local-replica")
        );
    }

    #[test]
    fn a_clone_carries_its_source_on_the_command_line() {
        let mut clone = good();
        clone.clone_from = "127.0.0.1:10001".into();
        clone.clone_snapshot = "snapshot-1".into();
        let spec = EngineSpec::from_pb(&clone).unwrap();
        assert_eq!(spec.to_pb(), clone);
        let addrs =
            EngineAddresses::assign("127.0.0.1".parse().unwrap(), &spec, &[10002, 10003]).unwrap();
        let argv = engine_command_line(&spec, &addrs, &[]);
        let joined = argv.join(" ");
        assert!(
            joined.contains("--clone-from 127.0.0.1:10001 --clone-snapshot snapshot-1"),
            "{joined}"
        );
        assert_eq!(
            spec.differences(&EngineSpec::from_pb(&good()).unwrap()),
            ["clone_from", "clone_snapshot"]
        );
        let mut orphan = good();
        orphan.clone_snapshot = "snapshot-1".into();
        assert!(matches!(
            EngineSpec::from_pb(&orphan),
            Err(NodeError::BadSpec {
                field: "clone_snapshot",
                ..
            })
        ));
    }

    #[test]
    fn a_restore_carries_its_backup_and_endpoint_on_the_command_line() {
        let mut restore = good();
        restore.from_backup = "s3://bucket/corral/db/backup-1".into();
        restore.backup_s3_endpoint = "http://10.0.0.5:9000".into();
        let spec = EngineSpec::from_pb(&restore).unwrap();
        assert_eq!(spec.to_pb(), restore);
        let addrs =
            EngineAddresses::assign("127.0.0.1".parse().unwrap(), &spec, &[10002, 10003]).unwrap();
        let joined = engine_command_line(&spec, &addrs, &[]).join(" ");
        assert!(
            joined.contains(
                "--from-backup s3://bucket/corral/db/backup-1 --s3-endpoint http://10.0.0.5:9000"
            ),
            "{joined}"
        );
        assert_eq!(
            spec.differences(&EngineSpec::from_pb(&good()).unwrap()),
            ["from_backup", "backup_s3_endpoint"]
        );
        // A record written before restores existed reads back as no restore.
        let json = serde_json::to_string(&EngineSpec::from_pb(&good()).unwrap()).unwrap();
        assert!(!json.contains("from_backup"), "{json}");
        type Spoil = Box<dyn Fn(&mut pb::EngineSpec)>;
        let cases: Vec<(&str, Spoil)> = vec![
            (
                "from_backup",
                Box::new(|s| s.from_backup = "http://x/v/b".into()),
            ),
            (
                "from_backup",
                Box::new(|s| s.clone_from = "127.0.0.1:1".into()),
            ),
            (
                "backup_s3_endpoint",
                Box::new(|s| s.backup_s3_endpoint = "10.0.0.5:9000".into()),
            ),
            (
                "backup_s3_endpoint",
                Box::new(|s| {
                    s.from_backup.clear();
                }),
            ),
        ];
        for (field, spoil) in cases {
            let mut spec = restore.clone();
            spoil(&mut spec);
            match EngineSpec::from_pb(&spec) {
                Err(NodeError::BadSpec { field: f, .. }) => assert_eq!(f, field, "{spec:?}"),
                other => panic!("{spec:?}: expected a bad {field}, got {other:?}"),
            }
        }
    }
}
