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
use spine_runtime::store::{Compare, KeyValue, Op, TenantStore, Txn};
use spine_runtime::{Caller, Scope, now_secs};
use tonic::{Request, Response, Status};

use crate::Node;
use crate::credentials::{self, Actor, ts};
use crate::error::{IdentityError, Result, invalid};
use crate::keys::json;
use crate::model::{self, AccountRec, DeviceRec, HandleIndex, HandleRec, PeerList};
use crate::validate::{self, MAX_DEVICES, MAX_HANDLE_TENANTS, MAX_HANDLES, MAX_PEERS, Peer};
use spine_runtime::idempotency::{fingerprint, record, replay};

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

pub(crate) fn parse<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Result<T> {
    serde_json::from_slice(&kv.value).map_err(|e| IdentityError::Internal(format!("{}: {e}", kv.key)))
}

pub(crate) async fn load_settings(store: &TenantStore, account: &str) -> Result<(pb::PrivacySettings, i64)> {
    Ok(spine_read_models::directory::settings(store, account).await?)
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

    async fn create_account(&self, req: Request<pb::CreateAccountRequest>) -> Result<pb::Account> {
        let caller = Caller::of(&req).map_err(|_| IdentityError::Internal("no caller".into()))?;
        caller.require_tenant_server()?;
        let store = caller.tenant_store()?;
        let req = req.into_inner();
        validate::request_id(&req.request_id)?;
        let fp = fingerprint(&req);
        let idem = model::idem_key("tenant", &req.request_id);
        if let Some(r) = replay(store.get(&idem).await?, &fp)? {
            return Ok(r);
        }
        let account = ids::new(Kind::Account);
        let now = now_secs();
        let rec = AccountRec { created_at: now, request_id: Some(req.request_id.clone()), ..Default::default() };
        let resp = pb::Account { account_id: account.clone(), created_at: ts(now) };
        let out = self
            .node()
            .idem_lease
            .txn(|lease| {
                Txn::new()
                    .when(Compare::Absent(store.key(&idem)))
                    .then(Op::put(store.key(&model::account_key(&account)), json(&rec)))
                    .then(record(store.key(&idem), &fp, &resp, lease))
            })
            .await?;
        if !out.succeeded {
            return replay(store.get(&idem).await?, &fp)?.ok_or(IdentityError::Conflict);
        }
        tracing::info!(account = %self.node().rt.redact(&account), "account created");
        Ok(resp)
    }

    async fn register_device(&self, req: Request<pb::RegisterDeviceRequest>) -> Result<pb::Device> {
        Caller::of(&req).map_err(|_| IdentityError::Internal("no caller".into()))?.require_tenant_server()?;
        validate::request_id(&req.get_ref().request_id)?;
        let s = scoped(&req, &req.get_ref().account_id).await?;
        let req = req.into_inner();
        if req.signature_scheme != pb::SignatureScheme::Ed25519 as i32 {
            return Err(invalid("signature_scheme", "must be SIGNATURE_SCHEME_ED25519"));
        }
        let key: [u8; 32] = req
            .signature_public_key
            .as_slice()
            .try_into()
            .map_err(|_| invalid("signature_public_key", "an Ed25519 public key is 32 bytes"))?;
        let vk =
            VerifyingKey::from_bytes(&key).map_err(|_| invalid("signature_public_key", "not a valid Ed25519 point"))?;
        if vk.is_weak() {
            return Err(invalid("signature_public_key", "weak (small-order) key"));
        }
        let fp = fingerprint(&req);
        let idem = model::idem_key(&s.account, &req.request_id);
        if let Some(r) = replay(s.store.get(&idem).await?, &fp)? {
            return Ok(r);
        }
        let device = ids::new(Kind::Device);
        let rec = DeviceRec { scheme: req.signature_scheme, public_key: B64.encode(key), created_at: now_secs() };
        let resp = device_of(&s.account, &device, &rec)?;
        let lease_store = &self.node().idem_lease;
        let account_key = s.store.key(&model::account_key(&s.account));
        let device_key = s.store.key(&model::device_key(&s.account, &device));
        let mut replayed = None;
        for _ in 0..CAS_ATTEMPTS {
            let kv = s.store.get(&model::account_key(&s.account)).await?.ok_or(IdentityError::NotFound("account"))?;
            let mut acc: AccountRec = parse(&kv)?;
            if acc.devices >= MAX_DEVICES {
                return Err(IdentityError::Limit(format!("an account has at most {MAX_DEVICES} devices")));
            }
            acc.devices += 1;
            let out = lease_store
                .txn(|lease| {
                    Txn::new()
                        .when(Compare::ModRevision(account_key.clone(), kv.mod_revision))
                        .when(Compare::Absent(s.store.key(&idem)))
                        .then(Op::put(account_key.clone(), json(&acc)))
                        .then(Op::put(device_key.clone(), json(&rec)))
                        .then(record(s.store.key(&idem), &fp, &resp, lease))
                })
                .await?;
            if out.succeeded {
                tracing::info!(account = %self.node().rt.redact(&s.account), device = %self.node().rt.redact(&device), "device registered");
                return Ok(resp);
            }
            if let Some(r) = replay(s.store.get(&idem).await?, &fp)? {
                replayed = Some(r);
                break;
            }
        }
        replayed.ok_or(IdentityError::Conflict)
    }

    async fn revoke_device(&self, req: Request<pb::RevokeDeviceRequest>) -> Result<()> {
        let s = scoped(&req, &req.get_ref().account_id).await?;
        let device = validate::id("device_id", Kind::Device, &req.get_ref().device_id)?.to_string();
        let dkey = s.store.key(&model::device_key(&s.account, &device));
        let tenant = s.store.tenant().to_string();
        let revoked = format!("{}{tenant}/{device}", records::REVOKED);
        let sys = self.node().rt.system_store();
        for _ in 0..CAS_ATTEMPTS {
            let acc_kv =
                s.store.get(&model::account_key(&s.account)).await?.ok_or(IdentityError::NotFound("account"))?;
            let mut acc: AccountRec = parse(&acc_kv)?;
            if s.store.get(&model::device_key(&s.account, &device)).await?.is_none() {
                return Err(IdentityError::NotFound("device"));
            }
            acc.devices = acc.devices.saturating_sub(1);
            let akey = acc_kv.key.clone();
            let out = self
                .node()
                .revocation_lease
                .txn(|lease| {
                    Txn::new()
                        .when(Compare::ModRevision(akey.clone(), acc_kv.mod_revision))
                        .when(Compare::Present(dkey.clone()))
                        .then(Op::put(akey.clone(), json(&acc)))
                        .then(Op::delete(dkey.clone()))
                        .then(Op::put_leased(sys.key(&revoked), b"{}".to_vec(), lease))
                        .then(Op::put_leased(
                            s.store.key(&model::revoked_device_key(&s.account, &device)),
                            b"{}".to_vec(),
                            lease,
                        ))
                })
                .await?;
            if out.succeeded {
                self.node().rt.auth.observe(&revoked, Some(b"{}"));
                tracing::info!(account = %self.node().rt.redact(&s.account), device = %self.node().rt.redact(&device), "device revoked");
                // Other services drop what they hold for the device; what
                // fails here, their own upkeep finishes (groups sweeps
                // rosters for devices that no longer exist).
                for holder in self.node().rt.account_data() {
                    if let Err(e) = holder.delete_device(&s.store, &s.account, &device).await {
                        tracing::warn!(service = holder.service(), error = %e.message(), "device cleanup incomplete");
                    }
                }
                return Ok(());
            }
        }
        Err(IdentityError::Conflict)
    }

    async fn issue_token(&self, req: Request<pb::IssueDeviceTokenRequest>) -> Result<pb::DeviceToken> {
        Caller::of(&req).map_err(|_| IdentityError::Internal("no caller".into()))?.require_tenant_server()?;
        let s = scoped(&req, &req.get_ref().account_id).await?;
        let req = req.into_inner();
        let device = validate::id("device_id", Kind::Device, &req.device_id)?;
        s.store.get(&model::device_key(&s.account, device)).await?.ok_or(IdentityError::NotFound("device"))?;
        let cfg = &self.node().rt.config.auth;
        let ttl = match req.ttl_seconds {
            0 => cfg.default_token_ttl_secs,
            t if t <= cfg.max_token_ttl_secs => t,
            _ => return Err(invalid("ttl_seconds", format!("at most {}", cfg.max_token_ttl_secs))),
        };
        let mut scopes = Vec::new();
        if req.scopes.len() > Scope::ALL.len() {
            return Err(invalid("scopes", "too many scopes"));
        }
        for sc in &req.scopes {
            let sc = Scope::parse(sc)
                .ok_or_else(|| invalid("scopes", "unknown scope (identity, presence, calls, groups)"))?;
            if !scopes.contains(&sc) {
                scopes.push(sc);
            }
        }
        if scopes.is_empty() {
            scopes = Scope::ALL.to_vec();
        }
        let (kid, key) = self.node().signer.current().await?;
        let now = now_secs();
        let claims = Claims {
            t: s.store.tenant().to_string(),
            a: s.account.clone(),
            d: device.to_string(),
            s: scopes.iter().map(|s| s.as_str().to_string()).collect(),
            iat: now,
            exp: now + i64::from(ttl),
        };
        Ok(pb::DeviceToken { token: token::sign(&kid, &key, &claims), expires_at: ts(claims.exp), key_id: kid })
    }

    async fn update_settings(&self, req: Request<pb::UpdateSettingsRequest>) -> Result<pb::PrivacySettings> {
        let s = scoped(&req, &req.get_ref().account_id).await?;
        let req = req.into_inner();
        let new = req.settings.ok_or_else(|| invalid("settings", "required"))?;
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        if paths.is_empty() {
            return Err(invalid("update_mask", "name at least one field"));
        }
        if paths.len() > 16 {
            return Err(invalid("update_mask", "too many paths"));
        }
        let key = s.store.key(&model::settings_key(&s.account));
        let akey = s.store.key(&model::account_key(&s.account));
        for _ in 0..CAS_ATTEMPTS {
            let (mut cur, rev) = load_settings(&s.store, &s.account).await?;
            for p in &paths {
                match p.as_str() {
                    "video_calling_enabled" => cur.video_calling_enabled = new.video_calling_enabled,
                    "who_can_call" => {
                        cur.who_can_call = enum_field::<pb::WhoCanCall>("settings.who_can_call", new.who_can_call)?;
                    }
                    "presence_visibility" => {
                        cur.presence_visibility = enum_field::<pb::PresenceVisibility>(
                            "settings.presence_visibility",
                            new.presence_visibility,
                        )?;
                    }
                    "last_seen" => {
                        cur.last_seen = enum_field::<pb::LastSeenGranularity>("settings.last_seen", new.last_seen)?;
                    }
                    "last_seen_reciprocal" => cur.last_seen_reciprocal = new.last_seen_reciprocal,
                    "cross_app" => {
                        cur.cross_app = enum_field::<pb::CrossAppReachability>("settings.cross_app", new.cross_app)?;
                    }
                    "auto_answer_hint" => cur.auto_answer_hint = new.auto_answer_hint,
                    "group_call_rings" => cur.group_call_rings = new.group_call_rings,
                    "who_can_add_to_groups" => {
                        cur.who_can_add_to_groups = enum_field::<pb::WhoCanAddToGroups>(
                            "settings.who_can_add_to_groups",
                            new.who_can_add_to_groups,
                        )?;
                    }
                    "do_not_disturb" => cur.do_not_disturb = Some(new.do_not_disturb.unwrap_or_default()),
                    "do_not_disturb.enabled" => {
                        cur.do_not_disturb.get_or_insert_default().enabled =
                            new.do_not_disturb.as_ref().is_some_and(|d| d.enabled);
                    }
                    "do_not_disturb.until" => {
                        cur.do_not_disturb.get_or_insert_default().until =
                            new.do_not_disturb.as_ref().and_then(|d| d.until);
                    }
                    other => return Err(invalid("update_mask", format!("unknown or read-only field `{other}`"))),
                }
            }
            if let Some(u) = cur.do_not_disturb.as_ref().and_then(|d| d.until.as_ref()) {
                validate::timestamp("settings.do_not_disturb.until", u)?;
            }
            cur.updated_at = ts(now_secs());
            let mut stored = cur.clone();
            stored.account_id.clear();
            let txn = Txn::new()
                .when(Compare::ModRevision(key.clone(), rev))
                .when(Compare::Present(akey.clone()))
                .then(Op::put(key.clone(), stored.encode_to_vec()));
            if s.store.txn(txn).await?.succeeded {
                return Ok(cur);
            }
            s.store.get(&model::account_key(&s.account)).await?.ok_or(IdentityError::NotFound("account"))?;
        }
        Err(IdentityError::Conflict)
    }

    /// Checks that a peer is something this account may list: an existing
    /// other account of its tenant, or a live handle open to its tenant.
    /// Checks that a peer is something this account may list: an existing
    /// other account of its tenant, or a live handle open to its tenant.
    /// For a handle, returns the hash standing for the person behind it
    /// (`directory::person`), which the list keeps so the entry follows
    /// the person whatever happens to the handle.
    async fn check_peer(&self, s: &Scoped, peer: &Peer) -> Result<Option<String>> {
        match peer {
            Peer::Account(a) if *a == s.account => Err(invalid("peer", "an account cannot list itself")),
            Peer::Account(a) => {
                s.store.get(&model::account_key(a)).await?.ok_or(IdentityError::NotFound("peer"))?;
                Ok(None)
            }
            Peer::Interop { tenant, handle } => {
                let sys = self.node().rt.system_store();
                match spine_read_models::directory::resolve_handle(&sys, handle, s.store.tenant()).await? {
                    Some((t, account)) if &t == tenant => {
                        let secrets = self.node().rt.secrets().await?;
                        Ok(Some(spine_read_models::directory::person(secrets, t.as_str(), &account)))
                    }
                    _ => Err(IdentityError::NotFound("peer")),
                }
            }
        }
    }

    /// Resolves a handle for a caller of `caller_tenant`. Unknown, revoked,
    /// not-for-you and unreachable all look the same: NOT_FOUND.
    async fn resolve(&self, handle: &str, caller_tenant: &ids::TenantId) -> Result<ids::TenantId> {
        let sys = self.node().rt.system_store();
        match spine_read_models::directory::resolve_handle(&sys, handle, caller_tenant).await? {
            Some((tenant, _account)) => Ok(tenant),
            None => Err(IdentityError::NotFound("handle")),
        }
    }

    async fn add_peer(
        &self,
        list: PeerList,
        req: Request<(String, Option<spine_proto::common::v1::PeerRef>)>,
    ) -> Result<()> {
        let s = scoped(&req, &req.get_ref().0).await?;
        let peer = Peer::parse(req.get_ref().1.as_ref())?;
        let person = self.check_peer(&s, &peer).await?;
        let prefix = model::peers_prefix(list, &s.account);
        let rel = format!("{prefix}{}", peer.key());
        let key = s.store.key(&rel);
        for _ in 0..CAS_ATTEMPTS {
            if s.store.get(&rel).await?.is_some() {
                return Ok(());
            }
            // The limit holds inside the write: the account record carries
            // the count and the write compares its revision.
            let kv = s.store.get(&model::account_key(&s.account)).await?.ok_or(IdentityError::NotFound("account"))?;
            let mut acc: AccountRec = parse(&kv)?;
            if u64::from(*acc.list_count(list)) >= MAX_PEERS {
                return Err(IdentityError::Limit(format!("at most {MAX_PEERS} {}", list.as_str())));
            }
            *acc.list_count(list) += 1;
            let out = s
                .store
                .txn(
                    Txn::new()
                        .when(Compare::ModRevision(kv.key.clone(), kv.mod_revision))
                        .when(Compare::Absent(key.clone()))
                        .then(Op::put(kv.key.clone(), json(&acc)))
                        .then(Op::put(key.clone(), json(&model::PeerEntry { at: now_secs(), person: person.clone() })))
                        .then(Op::put(s.store.key(&model::peer_ref_key(&peer.key(), list, &s.account)), b"{}".to_vec()))
                        .then_all(person.as_ref().map(|p| {
                            Op::put(
                                s.store.key(&spine_read_models::directory::person_key(list.as_str(), &s.account, p)),
                                b"{}".to_vec(),
                            )
                        })),
                )
                .await?;
            if out.succeeded {
                return Ok(());
            }
        }
        Err(IdentityError::Conflict)
    }

    async fn remove_peer(
        &self,
        list: PeerList,
        req: Request<(String, Option<spine_proto::common::v1::PeerRef>)>,
    ) -> Result<()> {
        let s = scoped(&req, &req.get_ref().0).await?;
        let peer = Peer::parse(req.get_ref().1.as_ref())?;
        let rel = format!("{}{}", model::peers_prefix(list, &s.account), peer.key());
        for _ in 0..CAS_ATTEMPTS {
            let Some(kv) = s.store.get(&rel).await? else { return Ok(()) };
            let akv = s.store.get(&model::account_key(&s.account)).await?.ok_or(IdentityError::NotFound("account"))?;
            let mut acc: AccountRec = parse(&akv)?;
            *acc.list_count(list) = acc.list_count(list).saturating_sub(1);
            let ops = crate::data::entry_ops(&s.store, list, &s.account, &peer.key(), &kv);
            let txn = Txn::new()
                .when(Compare::ModRevision(kv.key.clone(), kv.mod_revision))
                .when(Compare::ModRevision(akv.key.clone(), akv.mod_revision))
                .then(Op::put(akv.key.clone(), json(&acc)))
                .then_all(ops);
            if s.store.txn(txn).await?.succeeded {
                return Ok(());
            }
        }
        Err(IdentityError::Conflict)
    }

    async fn list_peers(
        &self,
        list: PeerList,
        req: Request<(String, u32, String)>,
    ) -> Result<(Vec<spine_proto::common::v1::PeerRef>, String)> {
        let s = scoped(&req, &req.get_ref().0).await?;
        let limit = validate::page_size(req.get_ref().1)?;
        let prefix = model::peers_prefix(list, &s.account);
        let after = validate::page_token(&req.get_ref().2)?.map(|t| format!("{prefix}{t}"));
        let page = s.store.range(&prefix, after.as_deref(), limit).await?;
        let peers =
            page.kvs.iter().filter_map(|kv| Peer::from_key(last_segment(&kv.key))).map(|p| p.to_proto()).collect();
        let last = page.kvs.last().map(|kv| kv.key.as_str());
        Ok((peers, validate::next_page_token(last, page.more)))
    }

    async fn create_handle(&self, req: Request<pb::CreateInteropHandleRequest>) -> Result<pb::InteropHandle> {
        let s = scoped(&req, &req.get_ref().account_id).await?;
        validate::request_id(&req.get_ref().request_id)?;
        let req = req.into_inner();
        if req.allowed_tenant_ids.is_empty() || req.allowed_tenant_ids.len() > MAX_HANDLE_TENANTS {
            return Err(invalid("allowed_tenant_ids", format!("1 to {MAX_HANDLE_TENANTS} tenant ids")));
        }
        let sys = self.node().rt.system_store();
        let mut allowed: Vec<String> = Vec::new();
        for t in &req.allowed_tenant_ids {
            let t = validate::tenant_id("allowed_tenant_ids", t)?;
            if &t == s.store.tenant() {
                return Err(invalid("allowed_tenant_ids", "name other tenants, not the account's own"));
            }
            if sys.get(&model::tenant_key(t.as_str())).await?.is_none() {
                return Err(invalid("allowed_tenant_ids", format!("unknown tenant {t}")));
            }
            if !allowed.contains(&t.to_string()) {
                allowed.push(t.to_string());
            }
        }
        let fp = fingerprint(&req);
        let idem = model::idem_key(&s.account, &req.request_id);
        if let Some(r) = replay(s.store.get(&idem).await?, &fp)? {
            return Ok(r);
        }
        let handle = ids::new(Kind::InteropHandle);
        let now = now_secs();
        let resp =
            pb::InteropHandle { handle: handle.clone(), allowed_tenant_ids: allowed.clone(), created_at: ts(now) };
        let rec = HandleRec { allowed: allowed.clone(), created_at: now };
        let idx = HandleIndex { tenant_id: s.store.tenant().to_string(), account_id: s.account.clone(), allowed };
        for _ in 0..CAS_ATTEMPTS {
            // The limit holds inside the write (the account record counts).
            let kv = s.store.get(&model::account_key(&s.account)).await?.ok_or(IdentityError::NotFound("account"))?;
            let mut acc: AccountRec = parse(&kv)?;
            if u64::from(acc.handles) >= MAX_HANDLES {
                return Err(IdentityError::Limit(format!("at most {MAX_HANDLES} interop handles per account")));
            }
            acc.handles += 1;
            let out = self
                .node()
                .idem_lease
                .txn(|lease| {
                    Txn::new()
                        .when(Compare::Absent(s.store.key(&idem)))
                        .when(Compare::ModRevision(kv.key.clone(), kv.mod_revision))
                        .then(Op::put(kv.key.clone(), json(&acc)))
                        .then(Op::put(
                            s.store.key(&format!("{}{handle}", model::handles_prefix(&s.account))),
                            json(&rec),
                        ))
                        .then(Op::put(sys.key(&model::handle_index_key(&handle)), json(&idx)))
                        .then(record(s.store.key(&idem), &fp, &resp, lease))
                })
                .await?;
            if out.succeeded {
                return Ok(resp);
            }
            if let Some(r) = replay(s.store.get(&idem).await?, &fp)? {
                return Ok(r);
            }
        }
        Err(IdentityError::Conflict)
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
        let out = s
            .store
            .txn(
                Txn::new()
                    .when(Compare::ModRevision(key.clone(), kv.mod_revision))
                    .when(Compare::ModRevision(akv.key.clone(), akv.mod_revision))
                    .then(Op::put(akv.key.clone(), json(&acc)))
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
                let ot = sys.tenant_for_maintenance(&other);
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
