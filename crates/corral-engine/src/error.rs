//! Errors of the engine.

use corral_block::BlockError;

/// Why the engine could not start, or a replica call failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("replica {addr}: {message}")]
    Replica { addr: String, message: String },
    #[error("cannot open volume {volume}: {reason}")]
    Open { volume: String, reason: String },
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
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
