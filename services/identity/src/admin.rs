//! `TenantAdmin`: operators create tenants, issue and revoke their
//! credentials, and rotate token signing keys. Operators never see accounts.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use prost::Message;
use sha2::{Digest, Sha256};
use spine_proto::identity::v1 as pb;
use spine_proto::identity::v1::tenant_admin_server::TenantAdmin;
use spine_runtime::auth::records::{self, TenantCredential as CredRec};
use spine_runtime::ids::{self, Kind, TenantId};
use spine_runtime::store::{Compare, KeyValue, Op, SystemStore, Txn};
use spine_runtime::{Caller, now_secs};
use tonic::{Request, Response, Status};

use crate::Node;
use crate::error::{IdentityError, Result};
use crate::keys::json;
use crate::model::{self, IdemRec, TenantRec};
use crate::validate;

pub struct Admin(pub(crate) Arc<Node>);

pub(crate) fn ts(secs: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds: secs, nanos: 0 })
}

/// Fingerprint of a request, to tell a retry from a reuse of its key.
pub(crate) fn fingerprint<M: Message>(m: &M) -> String {
    hex::encode(Sha256::digest(m.encode_to_vec()))
}

/// The stored answer for an idempotency key: `None` if the key is new, the
/// answer if this is a retry of the same request, an error if the key was
/// used for a different request.
pub(crate) fn replay<R: Message + Default>(kv: Option<KeyValue>, fp: &str) -> Result<Option<R>> {
    let Some(kv) = kv else { return Ok(None) };
    let rec: IdemRec = serde_json::from_slice(&kv.value).map_err(|e| IdentityError::Internal(e.to_string()))?;
    if rec.fingerprint != fp {
        return Err(IdentityError::IdempotencyKeyReused);
    }
    let bytes = B64.decode(rec.response).map_err(|e| IdentityError::Internal(e.to_string()))?;
    R::decode(bytes.as_slice()).map(Some).map_err(|e| IdentityError::Internal(e.to_string()))
}

/// The write that records an answer under an idempotency key.
pub(crate) fn record<R: Message>(abs_key: String, fp: &str, resp: &R, lease: i64) -> Op {
    let rec =
        IdemRec { fingerprint: fp.to_string(), response: B64.encode(resp.encode_to_vec()), created_at: now_secs() };
    Op::put_leased(abs_key, json(&rec), lease)
}

fn tenant_of(kv: &KeyValue, sys: &SystemStore) -> Result<pb::Tenant> {
    let rec: TenantRec = serde_json::from_slice(&kv.value).map_err(|e| IdentityError::Internal(e.to_string()))?;
    let id = sys.relative(&kv.key).trim_start_matches("tenants/").to_string();
    Ok(pb::Tenant { tenant_id: id, display_name: rec.display_name, created_at: ts(rec.created_at) })
}

impl Admin {
    fn operator<T>(req: &Request<T>) -> Result<()> {
        Caller::of(req).map_err(|_| IdentityError::Internal("no caller".into()))?.require_operator()?;
        Ok(())
    }

    async fn existing_tenant(&self, sys: &SystemStore, id: &str) -> Result<TenantId> {
        let tenant = validate::tenant_id("tenant_id", id)?;
        sys.get(&model::tenant_key(tenant.as_str())).await?.ok_or(IdentityError::NotFound("tenant"))?;
        Ok(tenant)
    }

    /// A new credential: the record to store and the answer with the secret.
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

    async fn create_tenant(&self, req: pb::CreateTenantRequest) -> Result<pb::CreateTenantResponse> {
        validate::request_id(&req.request_id)?;
        let display_name = validate::name("display_name", &req.display_name, true)?;
        let sys = self.0.rt.system_store();
        let fp = fingerprint(&req);
        let idem = model::admin_idem_key(&req.request_id);
        if let Some(r) = replay(sys.get(&idem).await?, &fp)? {
            return Ok(r);
        }
        let tenant = TenantId::generate();
        let now = now_secs();
        let (cred_id, cred, answer) = Self::new_credential(&tenant, "initial".into());
        let resp = pb::CreateTenantResponse {
            tenant: Some(pb::Tenant {
                tenant_id: tenant.to_string(),
                display_name: display_name.clone(),
                created_at: ts(now),
            }),
            credential: Some(answer),
        };
        let cred_key = format!("{}{cred_id}", records::TENANT_CREDS);
        let out = self
            .0
            .idem_lease
            .txn(|lease| {
                Txn::new()
                    .when(Compare::Absent(sys.key(&idem)))
                    .then(Op::put(
                        sys.key(&model::tenant_key(tenant.as_str())),
                        json(&TenantRec { display_name: display_name.clone(), created_at: now }),
                    ))
                    .then(Op::put(sys.key(&cred_key), json(&cred)))
                    .then(record(sys.key(&idem), &fp, &resp, lease))
            })
            .await?;
        if !out.succeeded {
            // A concurrent retry with the same key won; answer as it did.
            return replay(sys.get(&idem).await?, &fp)?.ok_or(IdentityError::Conflict);
        }
        self.0.rt.auth.observe(&cred_key, Some(&json(&cred)));
        tracing::info!(tenant = %tenant, "tenant created");
        Ok(resp)
    }

    async fn issue_credential(&self, req: pb::IssueTenantCredentialRequest) -> Result<pb::TenantCredential> {
        validate::request_id(&req.request_id)?;
        let label = validate::name("label", &req.label, false)?;
        let sys = self.0.rt.system_store();
        let tenant = self.existing_tenant(&sys, &req.tenant_id).await?;
        let fp = fingerprint(&req);
        let idem = model::admin_idem_key(&req.request_id);
        if let Some(r) = replay(sys.get(&idem).await?, &fp)? {
            return Ok(r);
        }
        let (cred_id, cred, answer) = Self::new_credential(&tenant, label);
        let cred_key = format!("{}{cred_id}", records::TENANT_CREDS);
        let remembered = pb::TenantCredential { secret: String::new(), ..answer.clone() };
        let out = self
            .0
            .idem_lease
            .txn(|lease| {
                Txn::new()
                    .when(Compare::Absent(sys.key(&idem)))
                    .when(Compare::Present(sys.key(&model::tenant_key(tenant.as_str()))))
                    .then(Op::put(sys.key(&cred_key), json(&cred)))
                    .then(record(sys.key(&idem), &fp, &remembered, lease))
            })
            .await?;
        if !out.succeeded {
            return replay(sys.get(&idem).await?, &fp)?.ok_or(IdentityError::NotFound("tenant"));
        }
        self.0.rt.auth.observe(&cred_key, Some(&json(&cred)));
        Ok(answer)
    }

    async fn credentials(&self, tenant: &TenantId, sys: &SystemStore) -> Result<Vec<(String, CredRec)>> {
        let mut out = Vec::new();
        for kv in sys.range_all(records::TENANT_CREDS).await? {
            let rec: CredRec = serde_json::from_slice(&kv.value).map_err(|e| IdentityError::Internal(e.to_string()))?;
            if rec.tenant_id == tenant.as_str() {
                out.push((sys.relative(&kv.key).trim_start_matches(records::TENANT_CREDS).to_string(), rec));
            }
        }
        Ok(out)
    }
}

#[tonic::async_trait]
impl TenantAdmin for Admin {
    async fn create_tenant(
        &self,
        req: Request<pb::CreateTenantRequest>,
    ) -> std::result::Result<Response<pb::CreateTenantResponse>, Status> {
        Self::operator(&req)?;
        Ok(Response::new(Admin::create_tenant(self, req.into_inner()).await?))
    }

    async fn get_tenant(
        &self,
        req: Request<pb::GetTenantRequest>,
    ) -> std::result::Result<Response<pb::Tenant>, Status> {
        Self::operator(&req)?;
        let sys = self.0.rt.system_store();
        let tenant = validate::tenant_id("tenant_id", &req.get_ref().tenant_id)?;
        let kv = sys.get(&model::tenant_key(tenant.as_str())).await.map_err(IdentityError::from)?;
        let kv = kv.ok_or(IdentityError::NotFound("tenant"))?;
        Ok(Response::new(tenant_of(&kv, &sys)?))
    }

    async fn list_tenants(
        &self,
        req: Request<pb::ListTenantsRequest>,
    ) -> std::result::Result<Response<pb::ListTenantsResponse>, Status> {
        Self::operator(&req)?;
        let req = req.into_inner();
        let limit = validate::page_size(req.page_size)?;
        let after = validate::page_token(&req.page_token)?.map(|t| model::tenant_key(&t));
        let sys = self.0.rt.system_store();
        let page = sys.range("tenants/", after.as_deref(), limit).await.map_err(IdentityError::from)?;
        let tenants = page.kvs.iter().map(|kv| tenant_of(kv, &sys)).collect::<Result<Vec<_>>>()?;
        let last = page.kvs.last().map(|kv| sys.relative(&kv.key).to_string());
        Ok(Response::new(pb::ListTenantsResponse {
            tenants,
            next_page_token: validate::next_page_token(last.as_deref(), page.more),
        }))
    }

    async fn issue_tenant_credential(
        &self,
        req: Request<pb::IssueTenantCredentialRequest>,
    ) -> std::result::Result<Response<pb::TenantCredential>, Status> {
        Self::operator(&req)?;
        Ok(Response::new(self.issue_credential(req.into_inner()).await?))
    }

    async fn list_tenant_credentials(
        &self,
        req: Request<pb::ListTenantCredentialsRequest>,
    ) -> std::result::Result<Response<pb::ListTenantCredentialsResponse>, Status> {
        Self::operator(&req)?;
        let sys = self.0.rt.system_store();
        let tenant = self.existing_tenant(&sys, &req.get_ref().tenant_id).await?;
        let credentials = self
            .credentials(&tenant, &sys)
            .await?
            .into_iter()
            .map(|(id, rec)| pb::TenantCredential {
                credential_id: id,
                tenant_id: rec.tenant_id,
                label: rec.label,
                secret: String::new(),
                created_at: ts(rec.created_at),
            })
            .collect();
        Ok(Response::new(pb::ListTenantCredentialsResponse { credentials }))
    }

    async fn revoke_tenant_credential(
        &self,
        req: Request<pb::RevokeTenantCredentialRequest>,
    ) -> std::result::Result<Response<pb::RevokeTenantCredentialResponse>, Status> {
        Self::operator(&req)?;
        let req = req.into_inner();
        let sys = self.0.rt.system_store();
        let tenant = self.existing_tenant(&sys, &req.tenant_id).await?;
        let id = validate::id("credential_id", Kind::TenantCredential, &req.credential_id)?;
        let key = format!("{}{id}", records::TENANT_CREDS);
        let kv = sys.get(&key).await.map_err(IdentityError::from)?.ok_or(IdentityError::NotFound("credential"))?;
        let rec: CredRec = serde_json::from_slice(&kv.value).map_err(|e| IdentityError::Internal(e.to_string()))?;
        if rec.tenant_id != tenant.as_str() {
            return Err(IdentityError::NotFound("credential").into());
        }
        sys.txn(
            Txn::new().when(Compare::ModRevision(kv.key.clone(), kv.mod_revision)).then(Op::delete(kv.key.clone())),
        )
        .await
        .map_err(IdentityError::from)?;
        self.0.rt.auth.observe(&key, None);
        tracing::info!(tenant = %tenant, credential = %id, "tenant credential revoked");
        Ok(Response::new(pb::RevokeTenantCredentialResponse {}))
    }

    async fn rotate_signing_key(
        &self,
        req: Request<pb::RotateSigningKeyRequest>,
    ) -> std::result::Result<Response<pb::SigningKey>, Status> {
        Self::operator(&req)?;
        let (id, k) = self.0.signer.rotate().await?;
        Ok(Response::new(signing_key(id, k)?))
    }

    async fn list_signing_keys(
        &self,
        req: Request<pb::ListSigningKeysRequest>,
    ) -> std::result::Result<Response<pb::ListSigningKeysResponse>, Status> {
        Self::operator(&req)?;
        let keys = self.0.signer.list().await?.into_iter().map(|(id, k)| signing_key(id, k)).collect::<Result<_>>()?;
        Ok(Response::new(pb::ListSigningKeysResponse { keys }))
    }
}

fn signing_key(id: String, k: records::PublishedKey) -> Result<pb::SigningKey> {
    Ok(pb::SigningKey {
        key_id: id,
        public_key: B64.decode(&k.public_key).map_err(|e| IdentityError::Internal(e.to_string()))?,
        created_at: ts(k.created_at),
        activates_at: ts(k.activates_at),
        retires_at: k.retires_at.and_then(ts),
    })
}
