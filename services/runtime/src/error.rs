//! Building blocks for mapping domain errors to `tonic::Status`.
//!
//! Each service maps its own error enum in one `From<...> for Status`; these
//! helpers keep the shapes consistent: bad fields carry a
//! `google.rpc.BadRequest` detail, machine-readable reasons a
//! `google.rpc.ErrorInfo` detail in domain `spine`, and internal failures
//! reach the client as a bare INTERNAL with the detail only in our logs.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::store::StoreError;

/// Domain of every `google.rpc.ErrorInfo` Spine sends.
pub const DOMAIN: &str = "spine";

/// INVALID_ARGUMENT naming the offending field.
pub fn invalid(field: &str, description: impl Into<String>) -> Status {
    let description = description.into();
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {description}"),
        ErrorDetails::with_bad_request_violation(field, description),
    )
}

/// A status with a stable machine-readable reason.
pub fn with_reason(code: Code, message: impl Into<String>, reason: &str) -> Status {
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, DOMAIN, std::collections::HashMap::<String, String>::new()),
    )
}

/// INTERNAL without detail; the detail goes to our log.
pub fn internal(detail: &dyn std::fmt::Display) -> Status {
    tracing::error!(error = %detail, "internal error");
    Status::internal("internal error")
}

/// How long clients are told to wait before retrying after a transient
/// failure of the store.
pub const STORE_RETRY_AFTER: Duration = Duration::from_millis(500);
/// How long clients are told to wait before reconnecting, to another node,
/// when this one drains.
pub const DRAIN_RETRY_AFTER: Duration = Duration::from_millis(100);

/// UNAVAILABLE with a stable reason and a `google.rpc.RetryInfo` saying
/// when to try again: the one shape of every transient failure, which
/// clients may always retry (on any node).
pub fn unavailable(message: impl Into<String>, reason: &str, retry_after: Duration) -> Status {
    let mut details = ErrorDetails::with_error_info(reason, DOMAIN, std::collections::HashMap::<String, String>::new());
    details.set_retry_info(Some(retry_after));
    Status::with_error_details(Code::Unavailable, message, details)
}

/// UNAVAILABLE NODE_DRAINING: this node is shutting down; reconnect (the
/// load balancer sends the new connection to another node) and retry.
pub fn draining(message: impl Into<String>) -> Status {
    unavailable(message, "NODE_DRAINING", DRAIN_RETRY_AFTER)
}

/// The status for a store failure. Everything transient (no member
/// reachable, no quorum, a lease lost as its node drains, a watch that fell
/// behind) is UNAVAILABLE STORE_UNAVAILABLE with a retry hint, never
/// INTERNAL: clients are told never to retry INTERNAL.
pub fn store(e: StoreError) -> Status {
    match e {
        StoreError::Unavailable(detail) => {
            tracing::warn!(%detail, "store unavailable");
            unavailable("store unavailable, retry later", "STORE_UNAVAILABLE", STORE_RETRY_AFTER)
        }
        StoreError::LeaseNotFound | StoreError::Compacted { .. } | StoreError::WatchLagged => {
            tracing::warn!(error = %e, "store state changed under the request");
            unavailable("store state changed, retry", "STORE_UNAVAILABLE", STORE_RETRY_AFTER)
        }
        StoreError::TooLarge => Status::invalid_argument("request too large to store"),
        other => internal(&other),
    }
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        store(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_carries_the_field() {
        let s = invalid("display_name", "at most 64 characters");
        assert_eq!(s.code(), Code::InvalidArgument);
        let d = s.get_error_details();
        let v = &d.bad_request().unwrap().field_violations[0];
        assert_eq!(v.field, "display_name");
    }

    #[test]
    fn internal_hides_detail() {
        let s = store(StoreError::Backend("etcd said: secret path /spine/t/x".into()));
        assert_eq!(s.code(), Code::Internal);
        assert_eq!(s.message(), "internal error");
        assert_eq!(store(StoreError::Unavailable("x".into())).code(), Code::Unavailable);
    }

    #[test]
    fn transient_store_failures_are_unavailable_with_a_retry_hint() {
        for e in [
            StoreError::Unavailable("no leader".into()),
            StoreError::LeaseNotFound,
            StoreError::Compacted { requested: 1, oldest: 2 },
            StoreError::WatchLagged,
        ] {
            let s = store(e);
            assert_eq!(s.code(), Code::Unavailable);
            let d = s.get_error_details();
            assert_eq!(d.error_info().unwrap().reason, "STORE_UNAVAILABLE");
            assert_eq!(d.retry_info().unwrap().retry_delay, Some(STORE_RETRY_AFTER));
        }
        let d = draining("node draining").get_error_details();
        assert_eq!(d.error_info().unwrap().reason, "NODE_DRAINING");
        assert!(d.retry_info().is_some());
    }
}
