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
mod data;
pub mod error;
mod keys;
mod model;
mod service;
#[cfg(feature = "testing")]
pub mod testing;
mod validate;

use std::sync::Arc;
use std::time::Duration;

use spine_proto::identity::v1::identity_server::IdentityServer;
use spine_proto::identity::v1::tenant_admin_server::TenantAdminServer;
use spine_runtime::Runtime;
use spine_runtime::auth::token::CLOCK_SKEW_SECS;
use spine_runtime::store::SharedLease;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;

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

/// Adds identity's services to `routes`, registers its account-data hook and
/// starts its upkeep. Returns the service names for health reporting.
pub fn install(rt: &Arc<Runtime>, routes: &mut RoutesBuilder) -> Vec<&'static str> {
    let max_token = u64::from(rt.config.auth.max_token_ttl_secs) + CLOCK_SKEW_SECS as u64;
    rt.register_account_data(Arc::new(IdentityData::new()));
    let node = Arc::new(Node {
        rt: rt.clone(),
        signer: keys::Signer::new(rt.system_store(), rt.auth.clone(), rt.sealer.clone(), rt.config.auth.clone()),
        idem_lease: SharedLease::new(
            rt.store.clone(),
            Duration::from_secs(model::IDEMPOTENCY_TTL_SECS + 3600),
            Duration::from_secs(3600),
        ),
        revocation_lease: SharedLease::new(
            rt.store.clone(),
            Duration::from_secs(max_token + 300),
            Duration::from_secs(300),
        ),
    });
    let max = spine_proto::codec::TRANSPORT_MAX_MESSAGE_BYTES;
    routes.add_service(
        TenantAdminServer::new(admin::Admin(node.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(4 * max),
    );
    routes.add_service(
        IdentityServer::new(service::IdentityApi(node.clone()))
            .max_decoding_message_size(max)
            .max_encoding_message_size(4 * max),
    );
    Runtime::spawn_upkeep(Arc::downgrade(&node), MAINTENANCE_EVERY, "identity", |node: Arc<Node>| async move {
        if node.rt.drain.is_cancelled() {
            return Ok(());
        }
        // Both run each round; the first failure is reported.
        let keys = node.signer.sweep().await.map(drop);
        let deletions = data::finish_deletions(&node).await;
        keys.and(deletions)
    });
    vec![
        <TenantAdminServer<admin::Admin> as NamedService>::NAME,
        <IdentityServer<service::IdentityApi> as NamedService>::NAME,
    ]
}

/// Creates an operator credential directly in the store (bootstrap: the
/// first operator cannot call the API yet). Returns the bearer credential,
/// shown once; only its hash is stored.
pub async fn bootstrap_operator(rt: &Runtime, label: &str) -> Result<String, spine_runtime::store::StoreError> {
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
    rt.system_store()
        .txn(
            spine_runtime::store::Txn::new()
                .then(spine_runtime::store::Op::put(rt.system_store().key(&rel), value.clone())),
        )
        .await?;
    rt.auth.observe(&rel, Some(&value));
    Ok(format!("{id}.{secret}"))
}

/// Operator credentials on file: (id, label, created_at). Secrets are never
/// stored, so never listed.
pub async fn list_operators(rt: &Runtime) -> Result<Vec<(String, String, i64)>, spine_runtime::store::StoreError> {
    use spine_runtime::auth::records::{self, OperatorCredential};
    let sys = rt.system_store();
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
pub async fn revoke_operator(rt: &Runtime, operator_id: &str) -> Result<bool, spine_runtime::store::StoreError> {
    use spine_runtime::auth::records;
    use spine_runtime::store::{Compare, Op, Txn};
    if spine_runtime::ids::parse(spine_runtime::ids::Kind::Operator, operator_id).is_none() {
        return Ok(false);
    }
    let sys = rt.system_store();
    let rel = format!("{}{operator_id}", records::OPERATORS);
    let out = sys.txn(Txn::new().when(Compare::Present(sys.key(&rel))).then(Op::delete(sys.key(&rel)))).await?;
    if out.succeeded {
        rt.auth.observe(&rel, None);
    }
    Ok(out.succeeded)
}
