//! Building blocks for mapping domain errors to `tonic::Status`.
//!
//! Each service maps its own error enum in one `From<...> for Status`; these
//! helpers keep the shapes consistent: bad fields carry a
//! `google.rpc.BadRequest` detail, machine-readable reasons a
//! `google.rpc.ErrorInfo` detail in domain `spine`, and internal failures
//! reach the client as a bare INTERNAL with the detail only in our logs.

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

/// The status for a store failure.
pub fn store(e: StoreError) -> Status {
    match e {
        StoreError::Unavailable(detail) => {
            tracing::warn!(%detail, "store unavailable");
            Status::unavailable("store unavailable, retry later")
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
}
