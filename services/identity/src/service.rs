//! `Identity`: accounts, devices, tokens, settings, contacts, blocks and
//! interop handles, for tenant servers and devices.
//!
//! Every handler starts from the caller: its tenant's store handle (the only
//! store it can reach) and the account it may act on. An account id of
//! another tenant is simply absent from that handle: NOT_FOUND.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::VerifyingKey;
use prost::Message;
use spine_proto::common::v1::{DataReport, InteropRef};
use spine_proto::identity::v1 as pb;
use spine_proto::identity::v1::identity_server::Identity;
use spine_runtime::auth::records;
use spine_runtime::auth::token::{self, Claims};
use spine_runtime::ids::{self, Kind};
use spine_runtime::store::{Compare, Op, TenantStore, Txn};
use spine_runtime::{Caller, Scope, now_secs};
use tonic::{Request, Response, Status};

use crate::Node;
use crate::credentials::{self, Actor, ts};
use crate::error::{IdentityError, Result, invalid};
use crate::keys::json;
use crate::model::{self, AccountRec, DeviceRec, HandleIndex, HandleRec, PeerList};
use crate::model::{load_settings, parse};
use crate::validate::{self, MAX_DEVICES, MAX_HANDLE_TENANTS, MAX_HANDLES, MAX_PEERS, Peer};
use spine_runtime::idempotency::{fingerprint, record, replay};

mod accounts;
mod handles;
mod peers;
mod settings;

pub struct IdentityApi(pub(crate) Arc<Node>);

/// Read-modify-write attempts before answering ABORTED.
const CAS_ATTEMPTS: usize = 8;

/// The account a request acts on, checked to exist in the caller's tenant.
pub(crate) struct Scoped {
    pub store: TenantStore,
    pub account: String,
    pub record: AccountRec,
}

pub(crate) async fn scoped<T>(req: &Request<T>, requested: &str) -> Result<Scoped> {
    let caller = Caller::of(req).map_err(|_| IdentityError::Internal("no caller".into()))?;
    let store = caller.tenant_store()?;
    let account = caller.account(requested)?;
    validate::id("account_id", Kind::Account, account)?;
    let kv = store.get(&model::account_key(account)).await?.ok_or(IdentityError::NotFound("account"))?;
    let record = parse(&kv)?;
    Ok(Scoped { store, account: account.to_string(), record })
}

fn device_of(account: &str, id: &str, rec: &DeviceRec) -> Result<pb::Device> {
    Ok(pb::Device {
        device_id: id.to_string(),
        account_id: account.to_string(),
        signature_scheme: rec.scheme,
        signature_public_key: B64.decode(&rec.public_key).map_err(|e| IdentityError::Internal(e.to_string()))?,
        created_at: ts(rec.created_at),
    })
}

fn last_segment(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

fn enum_field<E: TryFrom<i32>>(field: &'static str, v: i32) -> Result<i32> {
    if v == 0 || E::try_from(v).is_err() {
        return Err(invalid(field, "must be one of the defined values (not UNSPECIFIED)"));
    }
    Ok(v)
}

impl IdentityApi {
    fn node(&self) -> &Node {
        &self.0
    }
}

/// Maps a handler's result to the wire.
fn wire<T>(r: Result<T>) -> std::result::Result<Response<T>, Status> {
    r.map(Response::new).map_err(Status::from)
}

fn with<T, U>(req: Request<T>, f: impl FnOnce(&T) -> U) -> Request<U> {
    let u = f(req.get_ref());
    let (meta, ext, _) = req.into_parts();
    Request::from_parts(meta, ext, u)
}

#[tonic::async_trait]
impl Identity for IdentityApi {
    async fn create_account(
        &self,
        req: Request<pb::CreateAccountRequest>,
    ) -> std::result::Result<Response<pb::Account>, Status> {
        wire(IdentityApi::create_account(self, req).await)
    }

    async fn get_account(
        &self,
        req: Request<pb::GetAccountRequest>,
    ) -> std::result::Result<Response<pb::Account>, Status> {
        let s = scoped(&req, &req.get_ref().account_id).await?;
        wire(Ok(pb::Account { account_id: s.account, created_at: ts(s.record.created_at) }))
    }

    async fn delete_account(
        &self,
        req: Request<pb::DeleteAccountRequest>,
    ) -> std::result::Result<Response<pb::DeleteAccountResponse>, Status> {
        let s = scoped(&req, &req.get_ref().account_id).await?;
        crate::data::delete_account(self.node(), &s.store, &s.account).await?;
        wire(Ok(pb::DeleteAccountResponse {}))
    }

    async fn register_device(
        &self,
        req: Request<pb::RegisterDeviceRequest>,
    ) -> std::result::Result<Response<pb::Device>, Status> {
        wire(IdentityApi::register_device(self, req).await)
    }

    async fn list_devices(
        &self,
        req: Request<pb::ListDevicesRequest>,
    ) -> std::result::Result<Response<pb::ListDevicesResponse>, Status> {
        let s = scoped(&req, &req.get_ref().account_id).await?;
        let limit = validate::page_size(req.get_ref().page_size)?;
        let prefix = model::devices_prefix(&s.account);
        let after = validate::page_token(&req.get_ref().page_token)?.map(|t| format!("{prefix}{t}"));
        let page = s.store.range(&prefix, after.as_deref(), limit).await.map_err(IdentityError::from)?;
        let devices = page
            .kvs
            .iter()
            .map(|kv| device_of(&s.account, last_segment(&kv.key), &parse(kv)?))
            .collect::<Result<Vec<_>>>()?;
        let next_page_token = validate::next_page_token(page.kvs.last().map(|kv| kv.key.as_str()), page.more);
        wire(Ok(pb::ListDevicesResponse { devices, next_page_token }))
    }

    async fn revoke_device(
        &self,
        req: Request<pb::RevokeDeviceRequest>,
    ) -> std::result::Result<Response<pb::RevokeDeviceResponse>, Status> {
        wire(IdentityApi::revoke_device(self, req).await.map(|()| pb::RevokeDeviceResponse {}))
    }

    async fn issue_device_token(
        &self,
        req: Request<pb::IssueDeviceTokenRequest>,
    ) -> std::result::Result<Response<pb::DeviceToken>, Status> {
        wire(self.issue_token(req).await)
    }

    async fn get_settings(
        &self,
        req: Request<pb::GetSettingsRequest>,
    ) -> std::result::Result<Response<pb::PrivacySettings>, Status> {
        let s = scoped(&req, &req.get_ref().account_id).await?;
        wire(load_settings(&s.store, &s.account).await.map(|(s, _)| s))
    }

    async fn update_settings(
        &self,
        req: Request<pb::UpdateSettingsRequest>,
    ) -> std::result::Result<Response<pb::PrivacySettings>, Status> {
        wire(IdentityApi::update_settings(self, req).await)
    }

    async fn add_contact(
        &self,
        req: Request<pb::AddContactRequest>,
    ) -> std::result::Result<Response<pb::AddContactResponse>, Status> {
        let req = with(req, |r| (r.account_id.clone(), r.peer.clone()));
        wire(self.add_peer(PeerList::Contacts, req).await.map(|()| pb::AddContactResponse {}))
    }

    async fn remove_contact(
        &self,
        req: Request<pb::RemoveContactRequest>,
    ) -> std::result::Result<Response<pb::RemoveContactResponse>, Status> {
        let req = with(req, |r| (r.account_id.clone(), r.peer.clone()));
        wire(self.remove_peer(PeerList::Contacts, req).await.map(|()| pb::RemoveContactResponse {}))
    }

    async fn list_contacts(
        &self,
        req: Request<pb::ListContactsRequest>,
    ) -> std::result::Result<Response<pb::ListContactsResponse>, Status> {
        let req = with(req, |r| (r.account_id.clone(), r.page_size, r.page_token.clone()));
        wire(
            self.list_peers(PeerList::Contacts, req)
                .await
                .map(|(contacts, next_page_token)| pb::ListContactsResponse { contacts, next_page_token }),
        )
    }

    async fn block(&self, req: Request<pb::BlockRequest>) -> std::result::Result<Response<pb::BlockResponse>, Status> {
        let req = with(req, |r| (r.account_id.clone(), r.peer.clone()));
        wire(self.add_peer(PeerList::Blocks, req).await.map(|()| pb::BlockResponse {}))
    }

    async fn unblock(
        &self,
        req: Request<pb::UnblockRequest>,
    ) -> std::result::Result<Response<pb::UnblockResponse>, Status> {
        let req = with(req, |r| (r.account_id.clone(), r.peer.clone()));
        wire(self.remove_peer(PeerList::Blocks, req).await.map(|()| pb::UnblockResponse {}))
    }

    async fn list_blocks(
        &self,
        req: Request<pb::ListBlocksRequest>,
    ) -> std::result::Result<Response<pb::ListBlocksResponse>, Status> {
        let req = with(req, |r| (r.account_id.clone(), r.page_size, r.page_token.clone()));
        wire(
            self.list_peers(PeerList::Blocks, req)
                .await
                .map(|(blocked, next_page_token)| pb::ListBlocksResponse { blocked, next_page_token }),
        )
    }

    async fn create_interop_handle(
        &self,
        req: Request<pb::CreateInteropHandleRequest>,
    ) -> std::result::Result<Response<pb::InteropHandle>, Status> {
        wire(self.create_handle(req).await)
    }

    async fn list_interop_handles(
        &self,
        req: Request<pb::ListInteropHandlesRequest>,
    ) -> std::result::Result<Response<pb::ListInteropHandlesResponse>, Status> {
        let s = scoped(&req, &req.get_ref().account_id).await?;
        let kvs = s.store.range_all(&model::handles_prefix(&s.account)).await.map_err(IdentityError::from)?;
        let handles = kvs
            .iter()
            .map(|kv| {
                let rec: HandleRec = parse(kv)?;
                Ok(pb::InteropHandle {
                    handle: last_segment(&kv.key).to_string(),
                    allowed_tenant_ids: rec.allowed,
                    created_at: ts(rec.created_at),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        wire(Ok(pb::ListInteropHandlesResponse { handles }))
    }

    async fn revoke_interop_handle(
        &self,
        req: Request<pb::RevokeInteropHandleRequest>,
    ) -> std::result::Result<Response<pb::RevokeInteropHandleResponse>, Status> {
        let s = scoped(&req, &req.get_ref().account_id).await?;
        let handle = validate::id("handle", Kind::InteropHandle, &req.get_ref().handle)?;
        let rel = format!("{}{handle}", model::handles_prefix(&s.account));
        let key = s.store.key(&rel);
        let sys = self.node().rt.system_store();
        let kv = s.store.get(&rel).await.map_err(IdentityError::from)?.ok_or(IdentityError::NotFound("handle"))?;
        let akv = s
            .store
            .get(&model::account_key(&s.account))
            .await
            .map_err(IdentityError::from)?
            .ok_or(IdentityError::NotFound("account"))?;
        let mut acc: AccountRec = parse(&akv)?;
        acc.handles = acc.handles.saturating_sub(1);
        // The tenant's handle record and the control plane's index go
        // together: a transaction across silos, through the runtime.
        let out = self
            .node()
            .rt
            .txn(
                Txn::new()
                    .when(Compare::ModRevision(key.clone(), kv.mod_revision))
                    .when(Compare::ModRevision(akv.stored_key(), akv.mod_revision))
                    .then(Op::put(akv.stored_key(), json(&acc)))
                    .then(Op::delete(key))
                    .then(Op::delete(sys.key(&model::handle_index_key(handle)))),
            )
            .await
            .map_err(IdentityError::from)?;
        if !out.succeeded {
            return Err(IdentityError::NotFound("handle").into());
        }
        // Contacts in other tenants that reached the account through this
        // handle now name nothing: remove them (blocks stay, to keep the
        // person blocked).
        if let Ok(rec) = parse::<HandleRec>(&kv) {
            let peer = spine_read_models::directory::peer_interop(s.store.tenant().as_str(), handle);
            for other in rec.allowed.iter().filter_map(|t| ids::TenantId::parse(t)) {
                let ot = sys.tenant(&other);
                crate::data::delete_refs_to(&ot, &peer, Some(PeerList::Contacts)).await?;
            }
        }
        wire(Ok(pb::RevokeInteropHandleResponse {}))
    }

    async fn resolve_interop_handle(
        &self,
        req: Request<pb::ResolveInteropHandleRequest>,
    ) -> std::result::Result<Response<pb::ResolveInteropHandleResponse>, Status> {
        let caller = Caller::of(&req)?;
        let tenant = caller.tenant().ok_or(IdentityError::Authz(spine_runtime::auth::AuthzError::TenantOnly))?.clone();
        let handle = validate::id("handle", Kind::InteropHandle, &req.get_ref().handle)?;
        let target = self.resolve(handle, &tenant).await?;
        wire(Ok(pb::ResolveInteropHandleResponse {
            r#ref: Some(InteropRef { tenant_id: target.to_string(), handle: handle.to_string() }),
        }))
    }

    async fn issue_tenant_credential(
        &self,
        req: Request<pb::IssueTenantCredentialRequest>,
    ) -> std::result::Result<Response<pb::TenantCredential>, Status> {
        let caller = Caller::of(&req)?;
        let tenant = credentials::own_tenant(caller, &req.get_ref().tenant_id)?.clone();
        let actor = Actor::of(caller).ok_or(IdentityError::Internal("tenant server without an id".into()))?;
        wire(credentials::issue(self.node(), &tenant, &actor, req.into_inner()).await)
    }

    async fn list_tenant_credentials(
        &self,
        req: Request<pb::ListTenantCredentialsRequest>,
    ) -> std::result::Result<Response<pb::ListTenantCredentialsResponse>, Status> {
        let tenant = credentials::own_tenant(Caller::of(&req)?, &req.get_ref().tenant_id)?;
        let credentials = credentials::list(&self.node().rt.system_store(), tenant).await?;
        wire(Ok(pb::ListTenantCredentialsResponse { credentials }))
    }

    async fn revoke_tenant_credential(
        &self,
        req: Request<pb::RevokeTenantCredentialRequest>,
    ) -> std::result::Result<Response<pb::RevokeTenantCredentialResponse>, Status> {
        let caller = Caller::of(&req)?;
        let tenant = credentials::own_tenant(caller, &req.get_ref().tenant_id)?.clone();
        let actor = Actor::of(caller).ok_or(IdentityError::Internal("tenant server without an id".into()))?;
        credentials::revoke(self.node(), &tenant, &actor, &req.get_ref().credential_id, true).await?;
        wire(Ok(pb::RevokeTenantCredentialResponse {}))
    }

    async fn list_audit_events(
        &self,
        req: Request<pb::ListAuditEventsRequest>,
    ) -> std::result::Result<Response<pb::ListAuditEventsResponse>, Status> {
        let caller = Caller::of(&req)?;
        credentials::own_tenant(caller, "")?;
        let t = caller.tenant_store().map_err(IdentityError::from)?;
        wire(credentials::audit_page(&t, req.get_ref().page_size, &req.get_ref().page_token).await)
    }

    async fn get_tenant_data_report(
        &self,
        req: Request<pb::GetTenantDataReportRequest>,
    ) -> std::result::Result<Response<DataReport>, Status> {
        let caller = Caller::of(&req)?;
        credentials::own_tenant(caller, "")?;
        let t = caller.tenant_store().map_err(IdentityError::from)?;
        let mut sections = vec![crate::data::tenant_report(&self.node().rt.system_store(), &t).await?];
        for holder in self.node().rt.account_data() {
            if let Some(section) = holder.tenant_report(&t).await? {
                sections.push(section);
            }
        }
        wire(Ok(DataReport { account_id: String::new(), generated_at: ts(now_secs()), sections }))
    }

    async fn get_data_report(
        &self,
        req: Request<pb::GetDataReportRequest>,
    ) -> std::result::Result<Response<DataReport>, Status> {
        let s = scoped(&req, &req.get_ref().account_id).await?;
        let mut sections = Vec::new();
        for holder in self.node().rt.account_data() {
            sections.push(holder.report(&s.store, &s.account).await?);
        }
        wire(Ok(DataReport { account_id: s.account, generated_at: ts(now_secs()), sections }))
    }
}
