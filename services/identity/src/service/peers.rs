//! Contacts and blocks, by account id or by interop handle.

use super::*;

impl IdentityApi {
    /// Checks that a peer is something this account may list: an existing
    /// other account of its tenant, or a live handle open to its tenant.
    /// Checks that a peer is something this account may list: an existing
    /// other account of its tenant, or a live handle open to its tenant.
    /// For a handle, returns the hash standing for the person behind it
    /// (`directory::person`), which the list keeps so the entry follows
    /// the person whatever happens to the handle.
    pub(crate) async fn check_peer(&self, s: &Scoped, peer: &Peer) -> Result<Option<String>> {
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
    pub(crate) async fn resolve(&self, handle: &str, caller_tenant: &ids::TenantId) -> Result<ids::TenantId> {
        let sys = self.node().rt.system_store();
        match spine_read_models::directory::resolve_handle(&sys, handle, caller_tenant).await? {
            Some((tenant, _account)) => Ok(tenant),
            None => Err(IdentityError::NotFound("handle")),
        }
    }

    pub(crate) async fn add_peer(
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
                        .when(Compare::ModRevision(kv.stored_key(), kv.mod_revision))
                        .when(Compare::Absent(key.clone()))
                        .then(Op::put(kv.stored_key(), json(&acc)))
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

    pub(crate) async fn remove_peer(
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
                .when(Compare::ModRevision(kv.stored_key(), kv.mod_revision))
                .when(Compare::ModRevision(akv.stored_key(), akv.mod_revision))
                .then(Op::put(akv.stored_key(), json(&acc)))
                .then_all(ops);
            if s.store.txn(txn).await?.succeeded {
                return Ok(());
            }
        }
        Err(IdentityError::Conflict)
    }

    pub(crate) async fn list_peers(
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
}
