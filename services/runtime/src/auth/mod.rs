//! Authentication: turning a request's credentials into a [`Caller`].
//!
//! Four kinds of credential travel as `authorization: Bearer <credential>`:
//! - operator credentials (`op_<id>.<secret>`), for Spine's operators;
//! - tenant credentials (`tc_<id>.<secret>`), for a product's servers;
//! - media-node credentials (`mc_<id>.<secret>`), each for one media node
//!   (SFU), which may only register that node;
//! - device tokens (`sdt1.<key id>.<claims>.<signature>`), short-lived and
//!   Ed25519-signed, for a product's apps.
//!
//! Every node verifies all three locally from the control plane it mirrors
//! in memory ([`AuthRing`]): only hashes of secrets and public keys are
//! mirrored. The [`AuthLayer`] runs in front of every service, so handlers
//! receive a [`Caller`] and never parse credentials.

mod layer;
pub mod records;
mod ring;
pub mod token;

use std::sync::Arc;

pub use layer::AuthLayer;
pub use ring::{AuthError, AuthRing, stream_ended};

use crate::ids::TenantId;
use crate::store::{Store, TenantStore};

/// A device scope: which services a device token may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Identity,
    Presence,
    Calls,
    Groups,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Identity, Scope::Presence, Scope::Calls, Scope::Groups];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Identity => "identity",
            Scope::Presence => "presence",
            Scope::Calls => "calls",
            Scope::Groups => "groups",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// Who is calling, as established by the auth layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A Spine operator.
    Operator { operator_id: String },
    /// A product's server, acting for its whole tenant.
    TenantServer { tenant: TenantId, credential_id: String },
    /// A device of an account, with the scopes its token grants, when the
    /// token expires (Unix seconds) and the key that signed it, for streams
    /// that outlive requests (see [`AuthRing::stream_end`]).
    Device {
        tenant: TenantId,
        account_id: String,
        device_id: String,
        scopes: Vec<Scope>,
        expires_at: i64,
        key_id: String,
    },
    /// A media node (SFU), which may only register itself.
    MediaNode { node_id: String, credential_id: String },
}

/// The authenticated caller of a request. Handlers find it in the request's
/// extensions (see [`Caller::of`]).
#[derive(Debug, Clone)]
pub struct Caller {
    principal: Principal,
    store: Arc<dyn Store>,
}

/// Why a caller may not do what it asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthzError {
    #[error("this method is for operators")]
    OperatorOnly,
    #[error("this method is for a tenant's servers or devices")]
    TenantOnly,
    #[error("this method is for a tenant's servers")]
    TenantServerOnly,
    #[error("account_id is required")]
    AccountRequired,
    #[error("not found")]
    OtherAccount,
    #[error("this method is for media-node credentials")]
    MediaNodeOnly,
}

impl From<AuthzError> for tonic::Status {
    fn from(e: AuthzError) -> Self {
        match e {
            AuthzError::OperatorOnly
            | AuthzError::TenantOnly
            | AuthzError::TenantServerOnly
            | AuthzError::MediaNodeOnly => tonic::Status::permission_denied(e.to_string()),
            AuthzError::AccountRequired => tonic::Status::invalid_argument(e.to_string()),
            // A device asking about another account learns nothing of it.
            AuthzError::OtherAccount => tonic::Status::not_found("account not found"),
        }
    }
}

impl Caller {
    pub(crate) fn new(principal: Principal, store: Arc<dyn Store>) -> Self {
        Self { principal, store }
    }

    /// The caller of a request that passed the auth layer. A request that did
    /// not pass it never reaches a handler, so a missing caller is our bug.
    pub fn of<T>(req: &tonic::Request<T>) -> Result<&Caller, tonic::Status> {
        req.extensions().get::<Caller>().ok_or_else(|| {
            tracing::error!("request reached a handler without a caller");
            tonic::Status::internal("internal error")
        })
    }

    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    /// The caller's tenant, if it acts within one.
    pub fn tenant(&self) -> Option<&TenantId> {
        match &self.principal {
            Principal::Operator { .. } | Principal::MediaNode { .. } => None,
            Principal::TenantServer { tenant, .. } | Principal::Device { tenant, .. } => Some(tenant),
        }
    }

    /// The store handle for the caller's tenant: the only way a handler
    /// reaches tenant data.
    pub fn tenant_store(&self) -> Result<TenantStore, AuthzError> {
        let tenant = self.tenant().ok_or(AuthzError::TenantOnly)?;
        Ok(TenantStore::new(self.store.clone(), tenant.clone()))
    }

    pub fn require_operator(&self) -> Result<&str, AuthzError> {
        match &self.principal {
            Principal::Operator { operator_id } => Ok(operator_id),
            _ => Err(AuthzError::OperatorOnly),
        }
    }

    /// The media node a media-node credential is for.
    pub fn require_media_node(&self) -> Result<&str, AuthzError> {
        match &self.principal {
            Principal::MediaNode { node_id, .. } => Ok(node_id),
            _ => Err(AuthzError::MediaNodeOnly),
        }
    }

    pub fn require_tenant_server(&self) -> Result<&TenantId, AuthzError> {
        match &self.principal {
            Principal::TenantServer { tenant, .. } => Ok(tenant),
            _ => Err(AuthzError::TenantServerOnly),
        }
    }

    /// The account a request acts on: a tenant server must name one; a
    /// device acts on its own account (empty or equal `requested`).
    pub fn account<'a>(&'a self, requested: &'a str) -> Result<&'a str, AuthzError> {
        match &self.principal {
            Principal::Operator { .. } | Principal::MediaNode { .. } => Err(AuthzError::TenantOnly),
            Principal::TenantServer { .. } if requested.is_empty() => Err(AuthzError::AccountRequired),
            Principal::TenantServer { .. } => Ok(requested),
            Principal::Device { account_id, .. } if requested.is_empty() || requested == account_id => Ok(account_id),
            Principal::Device { .. } => Err(AuthzError::OtherAccount),
        }
    }

    /// The calling device, if the caller is a device.
    pub fn device(&self) -> Option<(&str, &str)> {
        match &self.principal {
            Principal::Device { account_id, device_id, .. } => Some((account_id, device_id)),
            _ => None,
        }
    }
}
