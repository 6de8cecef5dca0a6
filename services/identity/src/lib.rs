//! spine-identity: tenants, accounts, devices, device tokens, privacy
//! settings, contacts, blocks, interop handles and data reports.
//!
//! Two gRPC services: `TenantAdmin` (operators) and `Identity` (tenant
//! servers and devices); see `proto/spine/identity/v1/identity.proto`.
//!
//! It must never store a profile, phone number, IP address or any secret in
//! plain form, and never let a caller reach another tenant's data except by
//! resolving an interop handle that names the caller's tenant.

mod admin;
mod credentials;
mod data;
pub mod error;
mod keys;
mod model;
mod service;
mod validate;

use std::sync::Arc;
use std::time::Duration;

use spine_proto::identity::v1::identity_server::IdentityServer;
use spine_proto::identity::v1::tenant_admin_server::TenantAdminServer;
use spine_runtime::auth::token::CLOCK_SKEW_SECS;
use spine_runtime::service::{Installer, Limits, SpineService};
use spine_runtime::store::SharedLease;
use spine_runtime::{Runtime, StartError};

pub use credentials::recover as recover_tenant_credential;
pub use data::IdentityData;
pub use validate::{MAX_DEVICES, MAX_HANDLE_TENANTS, MAX_HANDLES, MAX_PEERS};

/// How often each node runs identity's upkeep (key retirement, unfinished
/// account deletions, old tombstones).
const MAINTENANCE_EVERY: Duration = Duration::from_secs(30);

/// One identity node's state, shared by its two services.
pub(crate) struct Node {
    rt: Arc<Runtime>,
    signer: keys::Signer,
    /// Lease for idempotency answers (kept about a day).
    idem_lease: SharedLease,
    /// Lease for device revocations (kept until every token has expired).
    revocation_lease: SharedLease,
}

/// The identity service: `Identity` for devices and tenants, and
/// `TenantAdmin` for operators.
#[derive(Debug)]
pub struct Identity;

#[async_trait::async_trait]
impl SpineService for Identity {
    const NAME: &'static str = "identity";
    /// Data reports can be large; responses get four times the request cap.
    const LIMITS: Limits = Limits {
        max_request_bytes: spine_proto::codec::TRANSPORT_MAX_MESSAGE_BYTES,
        max_response_bytes: 4 * spine_proto::codec::TRANSPORT_MAX_MESSAGE_BYTES,
    };
    type Handle = ();
    type Options = ();

    /// Adds identity's services, registers its account-data hook and starts
    /// its upkeep.
    async fn install(at: &mut Installer<'_>, (): ()) -> Result<(), StartError> {
        let rt = at.rt;
        let max_token = u64::from(rt.config.auth.max_token_ttl_secs) + CLOCK_SKEW_SECS as u64;
        let revocation_secs = max_token + 300;
        rt.register_account_data(Arc::new(IdentityData::new(rt.system_store(), revocation_secs as i64)));
        let node = Arc::new(Node {
            rt: rt.clone(),
            signer: keys::Signer::new(rt.system_store(), rt.auth.clone(), rt.sealer.clone(), rt.config.auth.clone()),
            idem_lease: spine_runtime::idempotency::lease(rt.store.clone()),
            revocation_lease: SharedLease::new(
                rt.store.clone(),
                Duration::from_secs(revocation_secs),
                Duration::from_secs(300),
            ),
        });
        spine_runtime::add_service!(at, TenantAdminServer::new(admin::Admin(node.clone())));
        spine_runtime::add_service!(at, IdentityServer::new(service::IdentityApi(node.clone())));
        Runtime::spawn_upkeep(Arc::downgrade(&node), MAINTENANCE_EVERY, "identity", |node: Arc<Node>| async move {
            if node.rt.drain.is_cancelled() {
                return Ok(());
            }
            // Both run each round; the first failure is reported.
            let keys = node.signer.sweep().await.map(drop);
            let deletions = data::finish_deletions(&node).await;
            keys.and(deletions)
        });
        Ok(())
    }
}

/// Creates an operator credential directly in the store (bootstrap: the
/// first operator cannot call the API yet). Returns the bearer credential,
/// shown once; only its hash is stored.
pub async fn bootstrap_operator(rt: &Runtime, label: &str) -> Result<String, spine_runtime::store::StoreError> {
    let (rel, value, credential) = create_operator(&rt.system_store(), label).await?;
    rt.auth.observe(&rel, Some(&value));
    Ok(credential)
}

/// Writes a new operator credential into the control plane: (its key
/// relative to `/spine/sys/`, the stored record, the bearer credential).
async fn create_operator(
    sys: &spine_runtime::store::SystemStore,
    label: &str,
) -> Result<(String, Vec<u8>, String), spine_runtime::store::StoreError> {
    use spine_runtime::auth::records::{self, OperatorCredential};
    use spine_runtime::ids::{self, Kind};
    let id = ids::new(Kind::Operator);
    let secret = ids::secret();
    let rec = OperatorCredential {
        secret_sha256: records::hash_secret(&secret),
        label: label.to_string(),
        created_at: spine_runtime::now_secs(),
    };
    let rel = format!("{}{id}", records::OPERATORS);
    let value = keys::json(&rec);
    sys.txn(spine_runtime::store::Txn::new().then(spine_runtime::store::Op::put(sys.key(&rel), value.clone()))).await?;
    Ok((rel, value, format!("{id}.{secret}")))
}

/// [`bootstrap_operator`] for tools that hold only the store (the node
/// serving requests learns it from its watch).
pub async fn bootstrap_operator_in(
    sys: &spine_runtime::store::SystemStore,
    label: &str,
) -> Result<String, spine_runtime::store::StoreError> {
    Ok(create_operator(sys, label).await?.2)
}

/// Operator credentials on file: (id, label, created_at). Secrets are never
/// stored, so never listed.
pub async fn list_operators(
    sys: &spine_runtime::store::SystemStore,
) -> Result<Vec<(String, String, i64)>, spine_runtime::store::StoreError> {
    use spine_runtime::auth::records::{self, OperatorCredential};
    let mut out = Vec::new();
    for kv in sys.range_all(records::OPERATORS).await? {
        if let Ok(rec) = serde_json::from_slice::<OperatorCredential>(&kv.value) {
            out.push((
                sys.relative(&kv.key).trim_start_matches(records::OPERATORS).to_string(),
                rec.label,
                rec.created_at,
            ));
        }
    }
    Ok(out)
}

/// Revokes an operator credential; it stops working on every node at watch
/// latency. `false` if there was no such credential.
pub async fn revoke_operator(
    sys: &spine_runtime::store::SystemStore,
    operator_id: &str,
) -> Result<bool, spine_runtime::store::StoreError> {
    use spine_runtime::auth::records;
    use spine_runtime::store::{Compare, Op, Txn};
    if spine_runtime::ids::parse(spine_runtime::ids::Kind::Operator, operator_id).is_none() {
        return Ok(false);
    }
    let rel = format!("{}{operator_id}", records::OPERATORS);
    let out = sys.txn(Txn::new().when(Compare::Present(sys.key(&rel))).then(Op::delete(sys.key(&rel)))).await?;
    Ok(out.succeeded)
}
