//! Interop handles: creating one, reachable from named other tenants.

use super::*;

impl IdentityApi {
    pub(crate) async fn create_handle(
        &self,
        req: Request<pb::CreateInteropHandleRequest>,
    ) -> Result<pb::InteropHandle> {
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
                        .when(Compare::ModRevision(kv.stored_key(), kv.mod_revision))
                        .then(Op::put(kv.stored_key(), json(&acc)))
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
