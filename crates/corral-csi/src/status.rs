//! How a failed call to a node daemon or replica becomes a CSI status code.

use corral_client::ClientError;
use tonic::{Code, Status};

/// The CSI status for a daemon's refusal: unreachable and timed-out
/// daemons are UNAVAILABLE (the CO retries); refusals keep their code.
pub fn client_status(e: &ClientError) -> Status {
    let code = match e {
        ClientError::BadAddress { .. } => Code::InvalidArgument,
        ClientError::Unreachable { .. } | ClientError::Unavailable { .. } => Code::Unavailable,
        ClientError::TimedOut { .. } => Code::DeadlineExceeded,
        ClientError::Fenced { .. } => Code::FailedPrecondition,
        ClientError::NotFound { .. } => Code::NotFound,
        ClientError::Refused { code, .. } => *code,
    };
    Status::new(code, e.to_string())
}
