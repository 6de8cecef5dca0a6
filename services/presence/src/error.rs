//! The presence service's errors, mapped to gRPC statuses in one place.

use spine_runtime::store::StoreError;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: &'static str },
    /// The runtime's answer about the request's credential.
    #[error("{}", .0.message())]
    Caller(Status),
    #[error("presence methods are for devices (device tokens)")]
    DevicesOnly,
    #[error("a device may hold {0} watch streams at once: close one, or watch more targets on one stream")]
    TooManyWatches(usize),
    /// A watcher that does not keep up is cut off; it watches again and
    /// gets the current state.
    #[error("watcher too slow: watch again to resume from the current state")]
    TooSlow,
    /// The owner node's answer, or why it could not be reached, as given.
    #[error("{}", .0.message())]
    Peer(Status),
    /// A broken invariant; the client learns only "internal error".
    #[error("internal error: {0}")]
    Internal(&'static str),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub fn invalid(field: &'static str, reason: &'static str) -> PresenceError {
    PresenceError::Invalid { field, reason }
}

impl From<PresenceError> for Status {
    fn from(e: PresenceError) -> Self {
        match e {
            PresenceError::Invalid { field, reason } => spine_runtime::error::invalid(field, reason),
            PresenceError::Caller(s) | PresenceError::Peer(s) => s,
            PresenceError::DevicesOnly => Status::permission_denied(e.to_string()),
            PresenceError::TooManyWatches(_) => {
                spine_runtime::error::with_reason(Code::ResourceExhausted, e.to_string(), "TOO_MANY_WATCHES")
            }
            PresenceError::TooSlow => {
                spine_runtime::error::with_reason(Code::ResourceExhausted, e.to_string(), "WATCH_TOO_SLOW")
            }
            PresenceError::Internal(what) => spine_runtime::error::internal(&what),
            PresenceError::Store(s) => spine_runtime::error::store(s),
        }
    }
}
