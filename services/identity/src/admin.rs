//! `TenantAdmin`: operators create tenants, revoke their credentials in an
//! emergency (both recorded in the tenant's audit log), and rotate and
//! revoke token signing keys. Operators never see accounts, and never issue
//! a tenant's credentials after its first.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use spine_proto::identity::v1 as pb;
use spine_proto::identity::v1::tenant_admin_server::TenantAdmin;
use spine_runtime::Caller;
use spine_runtime::auth::records;
use spine_runtime::ids::{Kind, TenantId};
use spine_runtime::store::{KeyValue, SystemStore};
use tonic::{Request, Response, Status};

use crate::Node;
use crate::credentials::{self, Actor, ts};
use crate::error::{IdentityError, Result};
use crate::model::{self, TenantRec};
use crate::validate;

pub struct Admin(pub(crate) Arc<Node>);

fn tenant_of(kv: &KeyValue, sys: &SystemStore) -> Result<pb::Tenant> {
    let rec: TenantRec = serde_json::from_slice(&kv.value).map_err(|e| IdentityError::Internal(e.to_string()))?;
    let id = sys.relative(&kv.key).trim_start_matches("tenants/").to_string();
    Ok(pb::Tenant { tenant_id: id, display_name: rec.display_name, created_at: ts(rec.created_at) })
}

impl Admin {
    /// The calling operator, as the actor of what it does.
    fn operator<T>(req: &Request<T>) -> Result<Actor> {
        let caller = Caller::of(req).map_err(|_| IdentityError::Internal("no caller".into()))?;
        caller.require_operator()?;
        Actor::of(caller).ok_or(IdentityError::Internal("operator without an id".into()))
    }

    async fn existing_tenant(&self, sys: &SystemStore, id: &str) -> Result<TenantId> {
        let tenant = validate::tenant_id("tenant_id", id)?;
        sys.get(&model::tenant_key(tenant.as_str())).await?.ok_or(IdentityError::NotFound("tenant"))?;
        Ok(tenant)
    }
}

#[tonic::async_trait]
impl TenantAdmin for Admin {
    async fn create_tenant(
        &self,
        req: Request<pb::CreateTenantRequest>,
    ) -> std::result::Result<Response<pb::CreateTenantResponse>, Status> {
        let actor = Self::operator(&req)?;
        Ok(Response::new(credentials::create_tenant(&self.0, &actor, req.into_inner()).await?))
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

    async fn list_tenant_credentials(
        &self,
        req: Request<pb::ListTenantCredentialsRequest>,
    ) -> std::result::Result<Response<pb::ListTenantCredentialsResponse>, Status> {
        Self::operator(&req)?;
        let sys = self.0.rt.system_store();
        let tenant = self.existing_tenant(&sys, &req.get_ref().tenant_id).await?;
        let credentials = credentials::list(&sys, &tenant).await?;
        Ok(Response::new(pb::ListTenantCredentialsResponse { credentials }))
    }

    async fn revoke_tenant_credential(
        &self,
        req: Request<pb::RevokeTenantCredentialRequest>,
    ) -> std::result::Result<Response<pb::RevokeTenantCredentialResponse>, Status> {
        let actor = Self::operator(&req)?;
        let req = req.into_inner();
        let sys = self.0.rt.system_store();
        let tenant = self.existing_tenant(&sys, &req.tenant_id).await?;
        // An emergency: an operator may revoke even the last credential.
        credentials::revoke(&self.0, &tenant, &actor, &req.credential_id, false).await?;
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

    async fn revoke_signing_key(
        &self,
        req: Request<pb::RevokeSigningKeyRequest>,
    ) -> std::result::Result<Response<pb::RevokeSigningKeyResponse>, Status> {
        Self::operator(&req)?;
        let kid = validate::id("key_id", Kind::SigningKey, &req.get_ref().key_id)?;
        if !self.0.signer.revoke(kid).await? {
            return Err(IdentityError::NotFound("signing key").into());
        }
        Ok(Response::new(pb::RevokeSigningKeyResponse {}))
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
