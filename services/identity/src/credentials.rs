//! Tenant credentials and the tenant's audit log.
//!
//! Least privilege: operators create a tenant (its first credential is shown
//! once, to the operator who hands it over) and may revoke a credential in an
//! emergency; every further credential is issued by the tenant itself, with
//! a credential it already holds. Whoever acts, the act is appended to the
//! tenant's audit log (`/spine/t/<tenant>/audit/`), which the tenant reads
//! through `Identity.ListAuditEvents` and in its tenant data report.
//!
//! The tenant's record counts its live credentials; every issue and
//! revocation is a compare-and-swap on it, so concurrent revocations cannot
//! take the last one.

use serde::{Deserialize, Serialize};
use spine_proto::identity::v1 as pb;
use spine_runtime::auth::records::{self, TenantCredential as CredRec};
use spine_runtime::idempotency::{fingerprint, record, replay};
use spine_runtime::ids::{self, Kind, TenantId};
use spine_runtime::store::{Compare, KeyValue, Op, SystemStore, TenantStore, Txn};
use spine_runtime::{Caller, Principal, now_secs};

use crate::Node;
use crate::error::{IdentityError, Result};
use crate::keys::json;
use crate::model::{self, TenantRec};
use crate::validate;

/// How long audit events are kept.
pub const AUDIT_RETENTION_SECS: i64 = 400 * 86_400;
/// Read-modify-write attempts on the tenant record.
const CAS_ATTEMPTS: usize = 8;

pub(crate) fn ts(secs: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds: secs, nanos: 0 })
}

/// Who acted on a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    Operator(String),
    Tenant(String),
    /// An operator with direct store access (`spine admin credential recover`).
    Store,
}

impl Actor {
    pub fn of(caller: &Caller) -> Option<Actor> {
        match caller.principal() {
            Principal::Operator { operator_id } => Some(Actor::Operator(operator_id.clone())),
            Principal::TenantServer { credential_id, .. } => Some(Actor::Tenant(credential_id.clone())),
            _ => None,
        }
    }

    fn parts(&self) -> (&'static str, &str) {
        match self {
            Actor::Operator(id) => ("operator", id),
            Actor::Tenant(id) => ("tenant", id),
            Actor::Store => ("store", ""),
        }
    }
}

/// An audit event as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditRec {
    pub at: i64,
    pub action: i32,
    pub actor_kind: String,
    #[serde(default)]
    pub actor_id: String,
    pub credential_id: String,
}

/// The write that appends an event to the tenant's log.
fn audit_op(t: &TenantStore, action: pb::AuditAction, actor: &Actor, credential_id: &str) -> Op {
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    // Keys sort oldest first: by millisecond, then, within one millisecond
    // on this node, by the order of writing (two events of one request can
    // share a millisecond), then a random part against other nodes.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let id = format!("{now_ms:020}-{seq:020}-{:016x}", rand::random::<u64>());
    let (kind, actor_id) = actor.parts();
    let rec = AuditRec {
        at: now_secs(),
        action: action as i32,
        actor_kind: kind.into(),
        actor_id: actor_id.into(),
        credential_id: credential_id.into(),
    };
    Op::put(t.key(&format!("{}{id}", model::AUDIT)), json(&rec))
}

fn event_of(t: &TenantStore, kv: &KeyValue) -> Result<pb::AuditEvent> {
    let rec: AuditRec = serde_json::from_slice(&kv.value).map_err(|e| IdentityError::Internal(e.to_string()))?;
    Ok(pb::AuditEvent {
        event_id: t.relative(&kv.key).trim_start_matches(model::AUDIT).to_string(),
        at: ts(rec.at),
        action: rec.action,
        actor_kind: rec.actor_kind,
        actor_id: rec.actor_id,
        credential_id: rec.credential_id,
    })
}

/// A page of the tenant's audit log, oldest first.
pub(crate) async fn audit_page(
    t: &TenantStore,
    page_size: u32,
    page_token: &str,
) -> Result<pb::ListAuditEventsResponse> {
    let limit = validate::page_size(page_size)?;
    let after = validate::page_token(page_token)?.map(|k| format!("{}{k}", model::AUDIT));
    let page = t.range(model::AUDIT, after.as_deref(), limit).await?;
    let events = page.kvs.iter().map(|kv| event_of(t, kv)).collect::<Result<Vec<_>>>()?;
    let last = page.kvs.last().map(|kv| kv.key.as_str());
    Ok(pb::ListAuditEventsResponse { events, next_page_token: validate::next_page_token(last, page.more) })
}

/// Every event of the tenant's log.
pub(crate) async fn audit_all(t: &TenantStore) -> Result<Vec<pb::AuditEvent>> {
    t.range_all(model::AUDIT).await?.iter().map(|kv| event_of(t, kv)).collect()
}

/// Drops audit events past their retention (keys are in time order).
pub(crate) async fn prune_audit(t: &TenantStore, now: i64) -> Result<()> {
    let cutoff_ms = (now - AUDIT_RETENTION_SECS).max(0) as u128 * 1000;
    let old: Vec<Op> = t
        .range(model::AUDIT, None, spine_runtime::store::MAX_TXN_OPS)
        .await?
        .kvs
        .iter()
        .filter(|kv| {
            let rel = t.relative(&kv.key).trim_start_matches(model::AUDIT);
            rel.split('-').next().and_then(|ms| ms.parse::<u128>().ok()).is_some_and(|ms| ms < cutoff_ms)
        })
        .map(|kv| Op::delete(kv.stored_key()))
        .collect();
    if !old.is_empty() {
        t.txn(Txn::new().then_all(old)).await?;
    }
    Ok(())
}

/// A new credential: its id, the record to store, and the answer with the
/// secret.
fn new_credential(tenant: &TenantId, label: String) -> (String, CredRec, pb::TenantCredential) {
    let id = ids::new(Kind::TenantCredential);
    let secret = ids::secret();
    let now = now_secs();
    let rec = CredRec {
        tenant_id: tenant.to_string(),
        secret_sha256: records::hash_secret(&secret),
        label: label.clone(),
        created_at: now,
    };
    let answer = pb::TenantCredential {
        credential_id: id.clone(),
        tenant_id: tenant.to_string(),
        label,
        secret: format!("{id}.{secret}"),
        created_at: ts(now),
    };
    (id, rec, answer)
}

fn cred_key(id: &str) -> String {
    format!("{}{id}", records::TENANT_CREDS)
}

async fn tenant_rec(sys: &SystemStore, tenant: &TenantId) -> Result<(TenantRec, KeyValue)> {
    let kv = sys.get(&model::tenant_key(tenant.as_str())).await?.ok_or(IdentityError::NotFound("tenant"))?;
    let rec = serde_json::from_slice(&kv.value).map_err(|e| IdentityError::Internal(e.to_string()))?;
    Ok((rec, kv))
}

/// Creates a tenant and its first credential (operators), recorded in the
/// new tenant's audit log. The idempotency answer never holds the secret.
pub(crate) async fn create_tenant(
    node: &Node,
    actor: &Actor,
    req: pb::CreateTenantRequest,
) -> Result<pb::CreateTenantResponse> {
    validate::request_id(&req.request_id)?;
    let display_name = validate::name("display_name", &req.display_name, true)?;
    let sys = node.rt.system_store();
    let fp = fingerprint(&req);
    let idem = model::admin_idem_key(&req.request_id);
    if let Some(r) = replay(sys.get(&idem).await?, &fp)? {
        return Ok(r);
    }
    let tenant = TenantId::generate();
    let now = now_secs();
    let (cred_id, cred, answer) = new_credential(&tenant, "initial".into());
    let mut resp = pb::CreateTenantResponse {
        tenant: Some(pb::Tenant {
            tenant_id: tenant.to_string(),
            display_name: display_name.clone(),
            created_at: ts(now),
        }),
        credential: Some(pb::TenantCredential { secret: String::new(), ..answer.clone() }),
    };
    let t = sys.tenant(&tenant);
    let rec = TenantRec { display_name: display_name.clone(), created_at: now, credentials: 1 };
    let out = node
        .idem_lease
        .txn(|lease| {
            Txn::new()
                .when(Compare::Absent(sys.key(&idem)))
                .then(Op::put(sys.key(&model::tenant_key(tenant.as_str())), json(&rec)))
                .then(Op::put(sys.key(&cred_key(&cred_id)), json(&cred)))
                .then(audit_op(&t, pb::AuditAction::TenantCreated, actor, &cred_id))
                // Remembered without the secret: a retry gets the ids only.
                .then(record(sys.key(&idem), &fp, &resp, lease))
        })
        .await?;
    if !out.succeeded {
        // A concurrent retry with the same key won; answer as it did.
        return replay(sys.get(&idem).await?, &fp)?.ok_or(IdentityError::Conflict);
    }
    node.rt.auth.observe(&cred_key(&cred_id), Some(&json(&cred)));
    tracing::info!(tenant = %tenant, "tenant created");
    resp.credential = Some(answer);
    Ok(resp)
}

/// The tenant a tenant server acts on: its own (`requested` empty or equal).
pub(crate) fn own_tenant<'a>(caller: &'a Caller, requested: &str) -> Result<&'a TenantId> {
    let tenant = caller.require_tenant_server()?;
    if !requested.is_empty() && requested != tenant.as_str() {
        return Err(IdentityError::NotFound("tenant"));
    }
    Ok(tenant)
}

/// Issues a credential of `tenant` (by the tenant itself, or recovery).
pub(crate) async fn issue(
    node: &Node,
    tenant: &TenantId,
    actor: &Actor,
    req: pb::IssueTenantCredentialRequest,
) -> Result<pb::TenantCredential> {
    validate::request_id(&req.request_id)?;
    let label = validate::name("label", &req.label, false)?;
    let sys = node.rt.system_store();
    let t = sys.tenant(tenant);
    let fp = fingerprint(&req);
    let idem = model::creds_idem_key(&req.request_id);
    if let Some(r) = replay(t.get(&idem).await?, &fp)? {
        return Ok(r);
    }
    let (cred_id, cred, answer) = new_credential(tenant, label);
    let remembered = pb::TenantCredential { secret: String::new(), ..answer.clone() };
    for _ in 0..CAS_ATTEMPTS {
        let (mut rec, kv) = tenant_rec(&sys, tenant).await?;
        if rec.credentials >= validate::MAX_TENANT_CREDENTIALS {
            return Err(IdentityError::Limit(format!(
                "a tenant has at most {} live credentials",
                validate::MAX_TENANT_CREDENTIALS
            )));
        }
        rec.credentials += 1;
        let out = node
            .idem_lease
            .txn(|lease| {
                Txn::new()
                    .when(Compare::ModRevision(kv.stored_key(), kv.mod_revision))
                    .when(Compare::Absent(t.key(&idem)))
                    .then(Op::put(kv.stored_key(), json(&rec)))
                    .then(Op::put(sys.key(&cred_key(&cred_id)), json(&cred)))
                    .then(audit_op(&t, pb::AuditAction::CredentialIssued, actor, &cred_id))
                    .then(record(t.key(&idem), &fp, &remembered, lease))
            })
            .await?;
        if out.succeeded {
            node.rt.auth.observe(&cred_key(&cred_id), Some(&json(&cred)));
            tracing::info!(tenant = %tenant, "tenant credential issued");
            return Ok(answer);
        }
        if let Some(r) = replay(t.get(&idem).await?, &fp)? {
            return Ok(r);
        }
    }
    Err(IdentityError::Conflict)
}

/// A tenant's credentials, without secrets.
pub(crate) async fn list(sys: &SystemStore, tenant: &TenantId) -> Result<Vec<pb::TenantCredential>> {
    let mut out = Vec::new();
    for kv in sys.range_all(records::TENANT_CREDS).await? {
        let rec: CredRec = serde_json::from_slice(&kv.value).map_err(|e| IdentityError::Internal(e.to_string()))?;
        if rec.tenant_id == tenant.as_str() {
            out.push(pb::TenantCredential {
                credential_id: sys.relative(&kv.key).trim_start_matches(records::TENANT_CREDS).to_string(),
                tenant_id: rec.tenant_id,
                label: rec.label,
                secret: String::new(),
                created_at: ts(rec.created_at),
            });
        }
    }
    Ok(out)
}

/// Revokes a credential of `tenant`. A tenant may not revoke its last one
/// (`keep_one`); an operator may, in an emergency.
pub(crate) async fn revoke(
    node: &Node,
    tenant: &TenantId,
    actor: &Actor,
    credential_id: &str,
    keep_one: bool,
) -> Result<()> {
    let id = validate::id("credential_id", Kind::TenantCredential, credential_id)?;
    let sys = node.rt.system_store();
    let t = sys.tenant(tenant);
    let key = cred_key(id);
    for _ in 0..CAS_ATTEMPTS {
        let ckv = sys.get(&key).await?.ok_or(IdentityError::NotFound("credential"))?;
        let cred: CredRec = serde_json::from_slice(&ckv.value).map_err(|e| IdentityError::Internal(e.to_string()))?;
        if cred.tenant_id != tenant.as_str() {
            return Err(IdentityError::NotFound("credential"));
        }
        let (mut rec, kv) = tenant_rec(&sys, tenant).await?;
        if keep_one && rec.credentials <= 1 {
            return Err(IdentityError::LastCredential);
        }
        rec.credentials = rec.credentials.saturating_sub(1);
        let out = sys
            .txn(
                Txn::new()
                    .when(Compare::ModRevision(kv.stored_key(), kv.mod_revision))
                    .when(Compare::ModRevision(ckv.stored_key(), ckv.mod_revision))
                    .then(Op::put(kv.stored_key(), json(&rec)))
                    .then(Op::delete(ckv.stored_key()))
                    .then(audit_op(&t, pb::AuditAction::CredentialRevoked, actor, id)),
            )
            .await?;
        if out.succeeded {
            node.rt.auth.observe(&key, None);
            tracing::info!(tenant = %tenant, "tenant credential revoked");
            return Ok(());
        }
    }
    Err(IdentityError::Conflict)
}

/// Writes a new credential for a tenant straight into the store, for a
/// tenant locked out of all its credentials (an operator with store access:
/// `spine admin credential recover`). Recorded in the audit log. Returns the
/// bearer credential, shown once.
pub async fn recover(sys: &SystemStore, tenant_id: &str, label: &str) -> std::result::Result<String, String> {
    let tenant = TenantId::parse(tenant_id).ok_or("not a tenant id")?;
    let label = validate::name("label", label, false).map_err(|e| e.to_string())?;
    let t = sys.tenant(&tenant);
    let (cred_id, cred, answer) = new_credential(&tenant, label);
    for _ in 0..CAS_ATTEMPTS {
        let (mut rec, kv) = tenant_rec(sys, &tenant).await.map_err(|e| e.to_string())?;
        rec.credentials += 1;
        let out = sys
            .txn(
                Txn::new()
                    .when(Compare::ModRevision(kv.stored_key(), kv.mod_revision))
                    .then(Op::put(kv.stored_key(), json(&rec)))
                    .then(Op::put(sys.key(&cred_key(&cred_id)), json(&cred)))
                    .then(audit_op(&t, pb::AuditAction::CredentialRecovered, &Actor::Store, &cred_id)),
            )
            .await
            .map_err(|e| e.to_string())?;
        if out.succeeded {
            return Ok(answer.secret);
        }
    }
    Err("the tenant record kept changing; retry".into())
}
