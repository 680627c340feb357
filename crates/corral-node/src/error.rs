//! Errors of the node daemon and their mapping onto gRPC statuses.

use std::path::PathBuf;

/// What can go wrong in the node daemon.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A request's engine spec is malformed; names the field.
    #[error("invalid engine spec: {field}: {why}")]
    BadSpec { field: &'static str, why: String },
    /// The daemon's own configuration is unusable.
    #[error("{0}")]
    Config(String),
    /// The volume's engine runs here with another spec.
    #[error(
        "an engine of volume {volume:?} already runs on this node with another spec ({differs}); stop it first"
    )]
    SpecDiffers { volume: String, differs: String },
    /// No engine of the volume on this node.
    #[error("no engine of volume {0:?} on this node")]
    NotFound(String),
    /// Every port of the range is taken.
    #[error("no free ports left in the engine port range {range} (need {needed})")]
    NoPorts { range: String, needed: usize },
    /// A new engine exited before it served; nothing of it is kept.
    #[error(
        "the engine of volume {volume:?} exited before serving ({exit}); its log ends with:\n{log_tail}"
    )]
    EngineFailed {
        volume: String,
        exit: String,
        log_tail: String,
    },
    /// An engine that should run here is restarting after exiting.
    #[error(
        "the engine of volume {volume:?} exited ({exit}) and is being restarted; its log ends with:\n{log_tail}"
    )]
    EngineRestarting {
        volume: String,
        exit: String,
        log_tail: String,
    },
    /// An engine started for a call did not serve in time.
    #[error("the engine of volume {volume:?} started but did not serve within {after:?}")]
    NotServing {
        volume: String,
        after: std::time::Duration,
    },
    /// The volume's engine runs here already (a fill needs a new one).
    #[error("an engine of volume {0:?} runs on this node already")]
    InUse(String),
    /// A clone's fill stopped making progress.
    #[error("the clone {volume:?} stopped filling at {filled} of {total} bytes: {why}")]
    CloneStuck {
        volume: String,
        filled: u64,
        total: u64,
        why: String,
    },
    /// A backup written in the background failed (told once; the next
    /// call starts it again).
    #[error("backup {backup} of volume {volume:?}: {why}")]
    BackupFailed {
        volume: String,
        backup: String,
        code: tonic::Code,
        why: String,
    },
    /// The engine did not stop in time.
    #[error("the engine of volume {0:?} did not stop in time")]
    StopTimedOut(String),
    /// The record of engines on disk cannot be read or written.
    #[error("engine record {path}: {why}")]
    Record { path: PathBuf, why: String },
    /// A file or directory of the daemon.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Starting an engine process failed.
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The daemon is shutting down.
    #[error("the node daemon is shutting down")]
    ShuttingDown,
    /// The replica side of the daemon.
    #[error(transparent)]
    Replica(#[from] corral_replica::ReplicaError),
    #[error("internal task failed: {0}")]
    Task(String),
    /// The volume's engine refused or did not answer a relayed call.
    #[error("the engine: {0}")]
    Engine(#[from] corral_client::ClientError),
}

impl NodeError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        NodeError::Io {
            path: path.into(),
            source,
        }
    }

    /// A malformed spec field.
    pub fn bad_spec(field: &'static str, why: impl Into<String>) -> Self {
        NodeError::BadSpec {
            field,
            why: why.into(),
        }
    }
}

impl From<NodeError> for tonic::Status {
    fn from(e: NodeError) -> Self {
        let msg = e.to_string();
        match e {
            NodeError::BadSpec { .. } => tonic::Status::invalid_argument(msg),
            NodeError::SpecDiffers { .. } => tonic::Status::already_exists(msg),
            NodeError::NotFound(_) => tonic::Status::not_found(msg),
            NodeError::NoPorts { .. } => tonic::Status::resource_exhausted(msg),
            NodeError::EngineFailed { .. } | NodeError::InUse(_) => {
                tonic::Status::failed_precondition(msg)
            }
            NodeError::CloneStuck { .. } => tonic::Status::unavailable(msg),
            NodeError::BackupFailed { code, .. } => tonic::Status::new(code, msg),
            NodeError::EngineRestarting { .. }
            | NodeError::ShuttingDown
            | NodeError::StopTimedOut(_)
            | NodeError::NotServing { .. } => tonic::Status::unavailable(msg),
            NodeError::Replica(e) => e.into(),
            NodeError::Engine(e) => match e {
                corral_client::ClientError::Refused { code, .. } => tonic::Status::new(code, msg),
                corral_client::ClientError::NotFound { .. } => tonic::Status::not_found(msg),
                corral_client::ClientError::Fenced { .. } => {
                    tonic::Status::failed_precondition(msg)
                }
                corral_client::ClientError::BadAddress { .. } => {
                    tonic::Status::invalid_argument(msg)
                }
                _ => tonic::Status::unavailable(msg),
            },
            _ => tonic::Status::internal(msg),
        }
    }
}
