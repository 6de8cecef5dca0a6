//! Accounts, devices and device tokens.

use super::*;

impl IdentityApi {
    pub(crate) async fn create_account(&self, req: Request<pb::CreateAccountRequest>) -> Result<pb::Account> {
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

    pub(crate) async fn register_device(&self, req: Request<pb::RegisterDeviceRequest>) -> Result<pb::Device> {
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

    pub(crate) async fn revoke_device(&self, req: Request<pb::RevokeDeviceRequest>) -> Result<()> {
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
            let akey = acc_kv.stored_key();
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

    pub(crate) async fn issue_token(&self, req: Request<pb::IssueDeviceTokenRequest>) -> Result<pb::DeviceToken> {
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
}
