//! Identity's errors and their one mapping to gRPC statuses. The table of
//! which method returns which code is in docs/api.md.

use spine_runtime::auth::AuthzError;
use spine_runtime::error as wire;
use spine_runtime::store::StoreError;
use tonic::{Code, Status};

/// Everything an identity method can fail with.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A request field is missing, malformed or out of bounds.
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// The thing does not exist, or the caller may not know it exists.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// An idempotency key was reused for a different request.
    #[error("request_id was already used for a different request")]
    IdempotencyKeyReused,
    /// A per-account or per-tenant limit was reached.
    #[error("{0}")]
    Limit(String),
    /// The caller's role may not call this method.
    #[error(transparent)]
    Authz(#[from] AuthzError),
    /// A tenant tried to revoke its last credential.
    #[error("this is the tenant's last credential: issue its successor first")]
    LastCredential,
    /// Concurrent writes kept conflicting; the client may retry.
    #[error("concurrent update, retry")]
    Conflict,
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Our bug: stored data we cannot read, and the like.
    #[error("internal: {0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, IdentityError>;

impl From<spine_runtime::idempotency::IdemError> for IdentityError {
    fn from(e: spine_runtime::idempotency::IdemError) -> Self {
        match e {
            spine_runtime::idempotency::IdemError::Reused => IdentityError::IdempotencyKeyReused,
            spine_runtime::idempotency::IdemError::Corrupt(d) => IdentityError::Internal(d),
        }
    }
}

pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> IdentityError {
    IdentityError::Invalid { field, reason: reason.into() }
}

impl From<IdentityError> for Status {
    fn from(e: IdentityError) -> Self {
        match e {
            IdentityError::Invalid { field, reason } => wire::invalid(field, reason),
            IdentityError::NotFound(what) => Status::not_found(format!("{what} not found")),
            IdentityError::IdempotencyKeyReused => {
                wire::with_reason(Code::FailedPrecondition, e.to_string(), "IDEMPOTENCY_KEY_REUSED")
            }
            IdentityError::Limit(msg) => wire::with_reason(Code::ResourceExhausted, msg, "LIMIT_REACHED"),
            IdentityError::Authz(a) => a.into(),
            IdentityError::LastCredential => {
                wire::with_reason(Code::FailedPrecondition, e.to_string(), "LAST_CREDENTIAL")
            }
            IdentityError::Conflict => Status::aborted("concurrent update, retry"),
            IdentityError::Store(s) => wire::store(s),
            IdentityError::Internal(detail) => wire::internal(&detail),
        }
    }
}
