//! The groups service's errors and their one mapping to gRPC statuses.

use spine_mls::MlsError;
use spine_runtime::auth::AuthzError;
use spine_runtime::error as wire;
use spine_runtime::store::StoreError;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

#[derive(Debug, thiserror::Error)]
pub enum GroupsError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// MLS bytes that do not parse, or that MLS validation refuses.
    #[error("{field}: {source}")]
    Mls { field: &'static str, source: MlsError },
    /// A commit for an epoch that is not the group's current one.
    #[error("the group is at epoch {current}")]
    WrongEpoch { current: u64 },
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("group already exists")]
    AlreadyExists,
    /// Allowed by MLS, refused by Spine's rules (policy, registered keys).
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Limit(String),
    #[error(transparent)]
    Rate(#[from] spine_runtime::rate::RateLimited),
    #[error(transparent)]
    Authz(#[from] AuthzError),
    #[error("concurrent update, retry")]
    Conflict,
    /// The current epoch's commit is disputed: no commit on top of it until
    /// it is settled or `until` passes.
    #[error("the commit that created epoch {epoch} is disputed")]
    Frozen { epoch: u64, until: i64 },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal: {0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, GroupsError>;

pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> GroupsError {
    GroupsError::Invalid { field, reason: reason.into() }
}

/// MLS input Spine refuses for `refusal` (INVALID_ARGUMENT with that
/// stable reason).
pub(crate) fn mls_refusal(field: &'static str, refusal: spine_mls::Refusal, message: impl Into<String>) -> GroupsError {
    GroupsError::Mls { field, source: MlsError::refused(refusal, message) }
}

pub(crate) fn mls(field: &'static str) -> impl FnOnce(MlsError) -> GroupsError {
    move |source| match source {
        MlsError::WrongEpoch { current, .. } => GroupsError::WrongEpoch { current },
        source => GroupsError::Mls { field, source },
    }
}

/// INVALID_ARGUMENT for refused MLS input: the field (in the message and a
/// `google.rpc.BadRequest`) and a stable reason (`google.rpc.ErrorInfo`),
/// never the MLS library's diagnostics.
fn mls_refused(field: &str, refusal: spine_mls::Refusal, message: &str) -> Status {
    let mut details = ErrorDetails::with_bad_request_violation(field, message);
    details.set_error_info(refusal.reason(), wire::DOMAIN, std::collections::HashMap::<String, String>::new());
    Status::with_error_details(Code::InvalidArgument, format!("{field}: {message}"), details)
}

impl From<GroupsError> for Status {
    fn from(e: GroupsError) -> Self {
        match e {
            GroupsError::Invalid { field, reason } => wire::invalid(field, reason),
            GroupsError::Mls { field, source: MlsError::Library(detail) } => {
                wire::internal(&format!("{field}: {detail}"))
            }
            GroupsError::Mls { field, source: MlsError::Refused { refusal, message, detail } } => {
                if !detail.is_empty() {
                    tracing::debug!(field, reason = refusal.reason(), detail = %detail, "MLS input refused");
                }
                mls_refused(field, refusal, &message)
            }
            GroupsError::Mls { field, source } => mls_refused(field, spine_mls::Refusal::Invalid, &source.to_string()),
            GroupsError::WrongEpoch { current } => Status::with_error_details(
                Code::FailedPrecondition,
                format!("wrong epoch: the group is at epoch {current}"),
                ErrorDetails::with_error_info(
                    "WRONG_EPOCH",
                    wire::DOMAIN,
                    [("current_epoch".to_string(), current.to_string())]
                        .into_iter()
                        .collect::<std::collections::HashMap<_, _>>(),
                ),
            ),
            GroupsError::NotFound(what) => Status::not_found(format!("{what} not found")),
            GroupsError::AlreadyExists => Status::already_exists("group already exists"),
            GroupsError::Refused(msg) => wire::with_reason(Code::PermissionDenied, msg, "POLICY_REFUSED"),
            GroupsError::Limit(msg) => wire::with_reason(Code::ResourceExhausted, msg, "LIMIT_REACHED"),
            GroupsError::Rate(r) => r.into(),
            GroupsError::Authz(a) => a.into(),
            GroupsError::Conflict => Status::aborted("concurrent update, retry"),
            GroupsError::Frozen { epoch, until } => {
                let wait = (until - spine_runtime::now_secs()).max(1) as u64;
                let mut details = ErrorDetails::with_error_info(
                    "EPOCH_DISPUTED",
                    wire::DOMAIN,
                    [("epoch".to_string(), epoch.to_string()), ("frozen_until".to_string(), until.to_string())]
                        .into_iter()
                        .collect::<std::collections::HashMap<_, _>>(),
                );
                details.set_retry_info(Some(std::time::Duration::from_secs(wait)));
                Status::with_error_details(
                    Code::FailedPrecondition,
                    format!(
                        "the commit that created epoch {epoch} is disputed: commits on top of it wait until it is \
                         settled (at most {wait} s)"
                    ),
                    details,
                )
            }
            GroupsError::Store(StoreError::TooLarge) => wire::with_reason(
                Code::ResourceExhausted,
                "the commit is too large for the store (group state, GroupInfo and log entries); add fewer devices per commit",
                "GROUP_TOO_LARGE",
            ),
            GroupsError::Store(s) => wire::store(s),
            GroupsError::Internal(detail) => wire::internal(&detail),
        }
    }
}
