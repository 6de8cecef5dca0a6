//! The calls service's errors, mapped to gRPC statuses in one place.

use std::collections::HashMap;

use spine_runtime::error::DOMAIN;
use spine_runtime::store::StoreError;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The call does not exist, or the caller's account takes no part in
    /// it: one answer for both.
    #[error("call not found")]
    NotFound,
    /// Something other than a call does not exist (a leg, a credential).
    #[error("{0} not found")]
    Missing(&'static str),
    /// The callee's settings refuse the call (or the callee does not
    /// exist): one answer whatever the rule.
    #[error("the call could not be placed")]
    NotPlaced,
    /// The call is not in a state that allows this; `reason` says which.
    #[error("{message}")]
    Precondition { reason: &'static str, message: &'static str },
    #[error("{field}: {message}")]
    Invalid { field: &'static str, message: String },
    #[error("a call between these accounts is already live")]
    Exists { call_id: String },
    #[error("no media node is available for this call")]
    NoMediaNode,
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("the state of the call changed concurrently too often; retry")]
    Contended,
    /// This node drains and no other node is alive to take the call.
    #[error("node draining: retry on another node")]
    Draining,
    /// Refused by the caller's credential (wrong kind, other account).
    #[error(transparent)]
    Authz(#[from] spine_runtime::auth::AuthzError),
    #[error(transparent)]
    Rate(#[from] spine_runtime::rate::RateLimited),
    /// A broken invariant; the client learns only "internal error".
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// The runtime's answer about the request's credential.
    #[error("{}", .0.message())]
    Caller(Status),
    /// A peer node is unreachable or misconfigured (its answer as given).
    #[error("{}", .0.message())]
    Peer(Status),
    /// Not a device token: calls methods are for devices.
    #[error("calls methods are for devices (device tokens)")]
    DevicesOnly,
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub type Result<T, E = CallError> = std::result::Result<T, E>;

pub fn invalid(field: &'static str, message: impl Into<String>) -> CallError {
    CallError::Invalid { field, message: message.into() }
}

pub fn precondition(reason: &'static str, message: &'static str) -> CallError {
    CallError::Precondition { reason, message }
}

fn with_info(code: Code, message: String, reason: &str, meta: HashMap<String, String>) -> Status {
    Status::with_error_details(code, message, ErrorDetails::with_error_info(reason, DOMAIN, meta))
}

impl From<CallError> for Status {
    fn from(e: CallError) -> Self {
        match e {
            CallError::NotFound | CallError::Missing(_) => Status::not_found(e.to_string()),
            CallError::NotPlaced => {
                with_info(Code::FailedPrecondition, e.to_string(), "CALL_NOT_PLACED", HashMap::new())
            }
            CallError::Precondition { reason, message } => {
                with_info(Code::FailedPrecondition, message.to_string(), reason, HashMap::new())
            }
            CallError::Invalid { field, message } => spine_runtime::error::invalid(field, message),
            CallError::Exists { ref call_id } => with_info(
                Code::AlreadyExists,
                e.to_string(),
                "CALL_EXISTS",
                HashMap::from([("call_id".to_string(), call_id.clone())]),
            ),
            CallError::NoMediaNode => with_info(Code::Unavailable, e.to_string(), "NO_MEDIA_NODE", HashMap::new()),
            CallError::Forbidden(m) => Status::permission_denied(m),
            CallError::Contended => Status::aborted(e.to_string()),
            CallError::Draining => spine_runtime::error::draining(e.to_string()),
            CallError::Authz(a) => a.into(),
            CallError::Rate(r) => r.into(),
            CallError::Internal(what) => spine_runtime::error::internal(&what),
            CallError::Caller(s) | CallError::Peer(s) => s,
            CallError::DevicesOnly => Status::permission_denied(e.to_string()),
            CallError::Store(s) => spine_runtime::error::store(s),
        }
    }
}
