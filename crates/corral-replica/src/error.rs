//! Errors of the replica daemon and their mapping onto gRPC statuses.

use corral_store::StoreError;

/// What can go wrong in the replica daemon.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(
        "invalid volume name {0:?}: use 1-64 characters from [A-Za-z0-9._-], not starting with '.'"
    )]
    BadVolumeName(String),
    #[error("no replica of volume {0:?} on this daemon")]
    NotFound(String),
    #[error("a replica of volume {0:?} already exists on this daemon")]
    AlreadyExists(String),
    #[error("replica of volume {volume:?}: {source}")]
    Store {
        volume: String,
        #[source]
        source: StoreError,
    },
    #[error(
        "replica of volume {volume:?} is not open at epoch {given} (open at {open}): the engine must open it first"
    )]
    NotOpen {
        volume: String,
        open: corral_store::Epoch,
        given: corral_store::Epoch,
    },
    #[error(
        "replica of volume {volume:?} is already open at epoch {epoch} by another engine: a newer epoch is needed"
    )]
    EpochTaken {
        volume: String,
        epoch: corral_store::Epoch,
    },
    #[error("data dir {path}: {source}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("internal task failed: {0}")]
    Task(String),
}

impl From<ReplicaError> for tonic::Status {
    fn from(e: ReplicaError) -> Self {
        let msg = e.to_string();
        match e {
            ReplicaError::BadVolumeName(_) => tonic::Status::invalid_argument(msg),
            ReplicaError::NotFound(_) => tonic::Status::not_found(msg),
            ReplicaError::AlreadyExists(_) => tonic::Status::already_exists(msg),
            ReplicaError::NotOpen { .. } => tonic::Status::unavailable(msg),
            ReplicaError::EpochTaken { .. } => corral_proto::fenced_status(msg),
            ReplicaError::Store { source, .. } => match source {
                StoreError::StaleEpoch { .. }
                | StoreError::StaleGeneration { .. }
                | StoreError::StaleReservations { .. } => corral_proto::fenced_status(msg),
                StoreError::Invalid(_) | StoreError::OutOfRange { .. } => {
                    tonic::Status::invalid_argument(msg)
                }
                StoreError::NoSpace { .. } => tonic::Status::resource_exhausted(msg),
                StoreError::NoSuchSnapshot(_) => tonic::Status::not_found(msg),
                StoreError::Busy(_) => tonic::Status::failed_precondition(msg),
                _ => tonic::Status::internal(msg),
            },
            _ => tonic::Status::internal(msg),
        }
    }
}
