//! How an invocation can fail, and what each failure means for its usage
//! record: the outcome and the status recorded. The HTTP layer renders a
//! [`Failure`] as a problem answer with the same status.

use hearth_bridge::{ErrorCode, InferError};
use hearth_engine::InvokeError;
use hearth_metering::{LogError, Outcome};
use hearth_registry::RegistryError;
use hearth_scheduler::{Rejection, TenantRejection};

/// Why an invocation produced no response of its function.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The guest failed: trapped, timed out, ran out of memory, sent no
    /// response.
    #[error("{0}")]
    Guest(InvokeError),
    /// The scheduler refused it: the function's limit (429) or the server's
    /// capacity (503).
    #[error("{0}")]
    Rejected(Rejection),
    /// A per-tenant limit refused it (429).
    #[error("{0}")]
    TenantLimit(TenantRejection),
    /// The usage log cannot write: nothing runs until it can (503).
    #[error("the usage log is recovering from a failed write; invocations resume once it has")]
    UsageLogDown,
    /// The invocation ended but its record could not be committed, so the
    /// client must not see it complete (503).
    #[error("the invocation's usage record was not committed: {0}")]
    Unrecorded(#[source] LogError),
    /// The request body was larger than allowed (413).
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit, in bytes.
        limit: u64,
    },
    /// The request body stalled past the idle timeout or broke off (408).
    #[error("the request body stalled or broke off before it was complete")]
    RequestTimeout,
    /// The caller's request cannot be run as it is (400).
    #[error("{0}")]
    BadRequest(String),
    /// The request body is compressed in a way Hearth does not read (415).
    #[error("`Content-Encoding: {0}` is not supported: send gzip, deflate or an uncompressed body")]
    UnsupportedEncoding(String),
    /// An asynchronous invocation waited in the queue past the retention
    /// without running (504).
    #[error("the invocation waited {}s in the queue, longer than the retention, and never ran", waited.as_secs())]
    Expired {
        /// How long it waited.
        waited: std::time::Duration,
    },
    /// The function could not be found or loaded (404 when it is gone, 500
    /// otherwise).
    #[error("{0}")]
    Function(#[source] RegistryError),
    /// A direct model call failed: inputs the model does not take (400),
    /// too large (413), or the model itself (500).
    #[error("{0}")]
    Model(#[source] InferError),
}

impl Failure {
    /// The status an answer to this failure carries, and its record keeps.
    pub fn status(&self) -> u16 {
        match self {
            Failure::Guest(err) => match err {
                InvokeError::Timeout(_) => 504,
                InvokeError::Capacity | InvokeError::MemoryBudget { .. } => 503,
                InvokeError::Trap { .. }
                | InvokeError::MemoryLimit { .. }
                | InvokeError::NoResponse
                | InvokeError::GuestError(_)
                | InvokeError::Internal(_) => 500,
            },
            Failure::Rejected(rejection) if rejection.is_function_limit() => 429,
            Failure::Rejected(_) | Failure::UsageLogDown | Failure::Unrecorded(_) => 503,
            Failure::TenantLimit(_) => 429,
            Failure::PayloadTooLarge { .. } => 413,
            Failure::RequestTimeout => 408,
            Failure::Expired { .. } => 504,
            Failure::BadRequest(_) => 400,
            Failure::UnsupportedEncoding(_) => 415,
            Failure::Function(RegistryError::NotFound { .. }) => 404,
            Failure::Function(err) if err.is_unavailable() => 503,
            Failure::Function(_) => 500,
            Failure::Model(err) => match err.code {
                ErrorCode::InvalidArgument | ErrorCode::InvalidEncoding => 400,
                ErrorCode::TooLarge => 413,
                ErrorCode::NotFound => 404,
                _ => 500,
            },
        }
    }

    /// The outcome its usage record keeps.
    pub fn outcome(&self) -> Outcome {
        match self {
            Failure::Guest(InvokeError::Trap { .. }) => Outcome::GuestTrap,
            Failure::Guest(InvokeError::Timeout(_)) => Outcome::Timeout,
            Failure::Guest(InvokeError::MemoryLimit { .. }) => Outcome::MemoryLimit,
            Failure::Guest(InvokeError::NoResponse | InvokeError::GuestError(_)) => Outcome::GuestError,
            Failure::Guest(InvokeError::Capacity | InvokeError::MemoryBudget { .. })
            | Failure::Rejected(_)
            | Failure::TenantLimit(_)
            | Failure::UsageLogDown
            | Failure::Unrecorded(_)
            | Failure::Expired { .. } => Outcome::Rejected,
            Failure::Function(err) if err.is_unavailable() => Outcome::Rejected,
            Failure::PayloadTooLarge { .. }
            | Failure::RequestTimeout
            | Failure::BadRequest(_)
            | Failure::UnsupportedEncoding(_) => Outcome::BadRequest,
            Failure::Model(_) if self.status() < 500 => Outcome::BadRequest,
            Failure::Guest(InvokeError::Internal(_)) | Failure::Function(_) | Failure::Model(_) => {
                Outcome::InternalError
            }
        }
    }

    /// Whether it is a refusal to run at all (retrying later may succeed):
    /// an asynchronous invocation refused this way stays queued. A store
    /// that cannot be reached is one.
    pub fn is_refusal(&self) -> bool {
        match self {
            Failure::Rejected(_)
            | Failure::TenantLimit(_)
            | Failure::UsageLogDown
            | Failure::Unrecorded(_)
            | Failure::Guest(InvokeError::Capacity | InvokeError::MemoryBudget { .. }) => true,
            Failure::Function(err) => err.is_unavailable(),
            _ => false,
        }
    }
}

impl From<InvokeError> for Failure {
    fn from(err: InvokeError) -> Self {
        Failure::Guest(err)
    }
}

impl From<Rejection> for Failure {
    fn from(rejection: Rejection) -> Self {
        Failure::Rejected(rejection)
    }
}

impl From<TenantRejection> for Failure {
    fn from(rejection: TenantRejection) -> Self {
        Failure::TenantLimit(rejection)
    }
}

impl From<RegistryError> for Failure {
    fn from(err: RegistryError) -> Self {
        Failure::Function(err)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn statuses_and_outcomes_agree_with_the_record_contract() {
        let cases: Vec<(Failure, u16, Outcome)> = vec![
            (
                InvokeError::Timeout(Duration::from_secs(1)).into(),
                504,
                Outcome::Timeout,
            ),
            (
                InvokeError::MemoryLimit { limit_mb: 1 }.into(),
                500,
                Outcome::MemoryLimit,
            ),
            (InvokeError::NoResponse.into(), 500, Outcome::GuestError),
            (InvokeError::Capacity.into(), 503, Outcome::Rejected),
            (
                Rejection::FunctionBusy {
                    max_instances: 1,
                    queued: 0,
                    function: "t/f@1".into(),
                }
                .into(),
                429,
                Outcome::Rejected,
            ),
            (
                Rejection::Capacity {
                    max_instances: 1,
                    queued: 0,
                }
                .into(),
                503,
                Outcome::Rejected,
            ),
            (Failure::UsageLogDown, 503, Outcome::Rejected),
            (Failure::PayloadTooLarge { limit: 1 }, 413, Outcome::BadRequest),
            (Failure::RequestTimeout, 408, Outcome::BadRequest),
            (Failure::BadRequest("x".into()), 400, Outcome::BadRequest),
            (Failure::UnsupportedEncoding("br".into()), 415, Outcome::BadRequest),
            (
                RegistryError::NotFound {
                    tenant: "t".into(),
                    name: "f".into(),
                }
                .into(),
                404,
                Outcome::InternalError,
            ),
            (RegistryError::Engine("x".into()).into(), 500, Outcome::InternalError),
            (
                RegistryError::Store(hearth_store::StoreError::Unavailable("x".into())).into(),
                503,
                Outcome::Rejected,
            ),
        ];
        for (failure, status, outcome) in cases {
            assert_eq!((failure.status(), failure.outcome()), (status, outcome), "{failure:?}");
        }
    }
}
