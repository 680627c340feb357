//! The engine's configuration, as given on `corral engine`'s command line.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// How far the RW set may shrink (see DESIGN.md, "Write policy").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WritePolicy {
    /// The RW set never drops below a majority of the volume's replicas.
    Quorum,
    /// Keep writing down to the last RW replica (Longhorn's behaviour).
    Available,
}

impl WritePolicy {
    /// The default for a volume with `replicas` replicas.
    pub fn default_for(replicas: usize) -> Self {
        if replicas >= 3 {
            WritePolicy::Quorum
        } else {
            WritePolicy::Available
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            WritePolicy::Quorum => "quorum",
            WritePolicy::Available => "available",
        }
    }

    /// Fewest RW replicas with which writes may still be acknowledged.
    pub fn min_rw(&self, replicas: usize) -> usize {
        match self {
            WritePolicy::Quorum => replicas / 2 + 1,
            WritePolicy::Available => 1,
        }
    }
}

impl std::str::FromStr for WritePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "quorum" => Ok(WritePolicy::Quorum),
            "available" => Ok(WritePolicy::Available),
            other => Err(format!(
                "unknown write policy {other:?}: use quorum or available"
            )),
        }
    }
}

/// Everything an engine needs to open and serve one volume.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub volume: String,
    pub size: u64,
    pub block_size: u32,
    pub chunk_size: u32,
    /// Replica daemon addresses (`host:port`).
    pub replicas: Vec<String>,
    /// Replicas whose daemon runs on this node, by address: the unix socket
    /// it also serves on (`--local-replica ADDR=PATH`). Their control
    /// channel and data streams go over it, and reads go to them first;
    /// everything else (membership, status, metrics) still names them by
    /// address (decision 64).
    pub local_replicas: BTreeMap<String, PathBuf>,
    /// A request not answered within this moves the replica to ERR.
    pub replica_timeout: Duration,
    /// How long a failed replica may return and be caught up incrementally.
    pub stale_replica_timeout: Duration,
    pub write_policy: WritePolicy,
    /// Data streams (separate connections) per replica.
    pub streams_per_replica: usize,
    /// Requests in flight per data stream.
    pub inflight_per_stream: usize,
    /// How often the supervisor pings replicas and retries failed ones.
    pub retry_interval: Duration,
    /// Chunks a rebuild copies at once.
    pub rebuild_concurrency: usize,
    /// Bytes per second a rebuild may copy (None: unlimited).
    pub rebuild_bandwidth: Option<u64>,
    /// A new volume made from another: where its data comes from (see
    /// [`CloneSource`]). Ignored once the replicas record the fill as done.
    pub clone: Option<CloneSource>,
    /// A new volume restored from a backup (see [`RestoreSource`]). Ignored
    /// once the replicas record the fill as done.
    pub restore: Option<RestoreSource>,
    /// S3 keys for backups (a KEY=VALUE file); None: the environment.
    pub s3_credentials: Option<std::path::PathBuf>,
    /// Send a client's write FUA when its flushes follow each write, and
    /// answer those flushes without a round (decision 76).
    pub write_through: bool,
}

/// Parse `--local-replica`'s `ADDR=PATH`: a replica daemon's address and
/// the unix socket it serves on (the path may itself hold `=`; neither
/// part may be empty).
pub fn parse_local_replica(text: &str) -> Result<(String, PathBuf), String> {
    let (addr, path) = text.split_once('=').ok_or_else(|| {
        format!("{text:?}: give ADDR=PATH, a --replica address and its daemon's unix socket")
    })?;
    let addr = addr.trim();
    if addr.is_empty() || path.is_empty() {
        return Err(format!(
            "{text:?}: give ADDR=PATH, a --replica address and its daemon's unix socket"
        ));
    }
    Ok((addr.to_string(), PathBuf::from(path)))
}

/// The source of a restore: a backup (`TARGET/VOLUME/BACKUP`) and how to
/// reach its target. The volume fills from it like a clone.
#[derive(Clone, Debug)]
pub struct RestoreSource {
    pub backup: String,
    pub s3: corral_backup::target::S3Settings,
    /// Serve I/O while the fill runs (otherwise the frontends start once
    /// the volume is filled).
    pub serve_while_filling: bool,
}

/// The source of a clone: a snapshot of the volume served by the engine at
/// `engine` (its control address), or, without `snapshot`, that volume as it
/// is when the clone starts (the clone takes a snapshot of it named
/// `clone-<clone's volume>` and deletes it once filled).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloneSource {
    pub engine: String,
    pub snapshot: Option<String>,
}

impl EngineConfig {
    /// A configuration with the defaults of the command line.
    pub fn new(volume: impl Into<String>, size: u64, replicas: Vec<String>) -> Self {
        let n = replicas.len();
        EngineConfig {
            volume: volume.into(),
            size,
            block_size: 512,
            chunk_size: 256 << 10,
            replicas,
            local_replicas: BTreeMap::new(),
            replica_timeout: Duration::from_secs(8),
            stale_replica_timeout: Duration::from_secs(30 * 60),
            write_policy: WritePolicy::default_for(n),
            streams_per_replica: 1,
            inflight_per_stream: 128,
            retry_interval: Duration::from_secs(5),
            rebuild_concurrency: 8,
            rebuild_bandwidth: None,
            clone: None,
            restore: None,
            s3_credentials: None,
            write_through: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_replicas_parse_as_address_and_socket() {
        assert_eq!(
            parse_local_replica("10.0.0.5:9600=/var/lib/corral/.sockets/replica.sock"),
            Ok((
                "10.0.0.5:9600".to_string(),
                PathBuf::from("/var/lib/corral/.sockets/replica.sock")
            ))
        );
        // Only the first '=' splits: a path may hold one.
        assert_eq!(
            parse_local_replica("node-0:9600=/run/a=b.sock"),
            Ok(("node-0:9600".to_string(), PathBuf::from("/run/a=b.sock")))
        );
        for bad in ["10.0.0.5:9600", "=/run/r.sock", "10.0.0.5:9600=", ""] {
            let e = parse_local_replica(bad).unwrap_err();
            assert!(e.contains("ADDR=PATH"), "{bad}: {e}");
        }
    }
}
