//! Errors of the engine.

use corral_block::BlockError;

/// Why the engine could not start, or a replica call failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("replica {addr}: {message}")]
    Replica { addr: String, message: String },
    /// The volume cannot be opened yet: worth retrying.
    #[error("cannot open volume {volume}: {wait}")]
    Open { volume: String, wait: OpenWait },
    #[error("cannot open volume {volume} within {after:?}: {wait}")]
    OpenTimedOut {
        volume: String,
        after: std::time::Duration,
        wait: OpenWait,
    },
    #[error("a frontend stopped: {0}")]
    Frontend(String),
    #[error("engine task failed: {0}")]
    Task(String),
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Why a volume cannot be opened yet (each is retried until the open
/// timeout; the same reason is reported once).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenWait {
    #[error("no replica daemon reachable ({0})")]
    NoneReachable(String),
    #[error(
        "only {reachable} of {total} replica daemons reachable; write policy {policy} needs {needed}"
    )]
    TooFewToCreate {
        reachable: usize,
        total: usize,
        policy: &'static str,
        needed: usize,
    },
    #[error(
        "write policy available: waiting for {members} (RW in membership generation {generation}), which may hold the only copy of the last writes; `corral volume salvage --force REPLICA` trusts another"
    )]
    AvailableMembers { members: String, generation: u64 },
    #[error(
        "write policy quorum: reached {reached} of {members} replicas holding a membership record, need a majority ({needed})"
    )]
    Quorum {
        reached: usize,
        members: usize,
        needed: usize,
    },
    #[error("no up-to-date replica reachable")]
    NoUpToDate,
    #[error(
        "no replica reached holds a membership record; waiting for {0} (a replica created for a rebuild holds none either)"
    )]
    NoRecord(String),
    #[error("salvage: {0} is not reachable or holds no replica of the volume")]
    SalvageUnreachable(String),
    #[error("{replica}: {what}")]
    Replica { replica: String, what: String },
    #[error("resync: {0}")]
    Resync(String),
    /// A clone waits for its source engine.
    #[error("waiting for the clone's source: {0}")]
    CloneSource(String),
}

/// Why one data request to one replica failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ReplicaIoError {
    /// The replica rejected our epoch: a newer engine owns the volume.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The replica could not be reached, its stream broke, or it timed out.
    #[error("replica unreachable: {0}")]
    Unreachable(String),
    #[error("request timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// Stored data failed its checksum on that replica.
    #[error("checksum mismatch at {offset}: {message}")]
    Checksum { offset: u64, message: String },
    /// The request itself is wrong (range): not the replica's fault.
    #[error("request rejected: {0}")]
    Rejected(String),
    #[error("replica disk full: {0}")]
    NoSpace(String),
    #[error("replica I/O error: {0}")]
    Io(String),
}

impl ReplicaIoError {
    /// Does this error mean the replica must leave the I/O path?
    pub fn fails_replica(&self) -> bool {
        !matches!(
            self,
            ReplicaIoError::Fenced(_)
                | ReplicaIoError::Rejected(_)
                | ReplicaIoError::Checksum { .. }
        )
    }
}

impl From<ReplicaIoError> for BlockError {
    fn from(e: ReplicaIoError) -> Self {
        match e {
            ReplicaIoError::Rejected(m) => BlockError::Invalid(m),
            ReplicaIoError::NoSpace(m) => BlockError::NoSpace(m),
            ReplicaIoError::Checksum { message, .. } => BlockError::Integrity(message),
            ReplicaIoError::Fenced(m) => {
                BlockError::Unavailable(format!("fenced by a newer engine: {m}"))
            }
            other => BlockError::Io(other.to_string()),
        }
    }
}
