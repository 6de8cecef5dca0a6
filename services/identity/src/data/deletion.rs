//! Account deletion: identity's data, the devices' revocation and a
//! tombstone in one transaction, then every other service's hook, retried
//! by the upkeep until each has finished; and the removal of lists that
//! name the account.

use super::*;

/// The deletes that remove one list entry (`kv`, `owner`'s entry for
/// `peer` under `list`): the entry, its reverse-index entry and, for another
/// tenant's person, its person entry.
pub(crate) fn entry_ops(
    t: &TenantStore,
    list: PeerList,
    owner: &str,
    peer: &str,
    kv: &spine_runtime::store::KeyValue,
) -> Vec<Op> {
    let mut ops = vec![Op::delete(kv.stored_key()), Op::delete(t.key(&model::peer_ref_key(peer, list, owner)))];
    if let Some(p) = serde_json::from_slice::<model::PeerEntry>(&kv.value).ok().and_then(|e| e.person) {
        ops.push(Op::delete(t.key(&directory::person_key(list.as_str(), owner, &p))));
    }
    ops
}

/// Deletes list entries in batches: each is (list, owner, peer, entry).
pub(crate) async fn delete_entries(
    t: &TenantStore,
    entries: Vec<(PeerList, String, String, spine_runtime::store::KeyValue)>,
) -> Result<()> {
    for chunk in entries.chunks(spine_runtime::store::MAX_TXN_OPS / 3) {
        let ops = chunk.iter().flat_map(|(list, owner, peer, kv)| entry_ops(t, *list, owner, peer, kv));
        t.txn(Txn::new().then_all(ops)).await?;
    }
    Ok(())
}

/// Removes the entries of other accounts' lists in `t` that name `peer` (a
/// peer key), found through the reverse index; `only` limits it to one list.
pub(crate) async fn delete_refs_to(t: &TenantStore, peer: &str, only: Option<PeerList>) -> Result<()> {
    let mut entries = Vec::new();
    for kv in t.range_all(&model::peer_refs_prefix(peer)).await? {
        let Some((list, owner)) = last(&kv.key).split_once('.') else { continue };
        let list = match list {
            "contacts" => PeerList::Contacts,
            "blocks" => PeerList::Blocks,
            _ => continue,
        };
        if only.is_some_and(|o| o != list) {
            continue;
        }
        match t.get(&format!("{}{peer}", model::peers_prefix(list, owner))).await? {
            Some(entry) => entries.push((list, owner.to_string(), peer.to_string(), entry)),
            // A dangling index entry: drop it alone.
            None => {
                t.txn(Txn::new().then(Op::delete(kv.stored_key()))).await?;
            }
        }
    }
    delete_entries(t, entries).await
}

/// Every contact and block list entry naming a deleted account, and the
/// account's own lists: in its tenant through the reverse index, in the
/// tenants its handles were open to through theirs.
pub(crate) async fn delete_lists(sys: &SystemStore, t: &TenantStore, account: &str) -> Result<()> {
    for list in [PeerList::Contacts, PeerList::Blocks] {
        let entries = t
            .range_all(&model::peers_prefix(list, account))
            .await?
            .into_iter()
            .map(|kv| (list, account.to_string(), last(&kv.key).to_string(), kv))
            .collect();
        delete_entries(t, entries).await?;
    }
    delete_refs_to(t, &directory::peer_account(account), None).await?;
    let tomb = match t.get(&format!("{}{account}", data::TOMBSTONES)).await? {
        Some(kv) => parse::<Tombstone>(&kv)?,
        None => return Ok(()),
    };
    for other in tomb.handle_tenants.iter().filter_map(|x| spine_runtime::ids::TenantId::parse(x)) {
        let ot = sys.tenant(&other);
        for h in &tomb.handles {
            delete_refs_to(&ot, &directory::peer_interop(t.tenant().as_str(), h), None).await?;
        }
    }
    Ok(())
}

/// Deletes an account: identity's data atomically (with a tombstone and the
/// revocation of every device's tokens), then every other service's.
pub(crate) async fn delete_account(node: &Node, t: &TenantStore, account: &str) -> Result<()> {
    let sys = node.rt.system_store();
    let akey = t.key(&model::account_key(account));
    for _ in 0..8 {
        let Some(kv) = t.get(&model::account_key(account)).await? else {
            return Err(IdentityError::NotFound("account"));
        };
        let rec: AccountRec = parse(&kv)?;
        let devices: Vec<String> =
            t.range_all(&model::devices_prefix(account)).await?.iter().map(|kv| last(&kv.key).to_string()).collect();
        let handle_kvs = t.range_all(&model::handles_prefix(account)).await?;
        let handles: Vec<String> = handle_kvs.iter().map(|kv| last(&kv.key).to_string()).collect();
        let mut handle_tenants: Vec<String> =
            handle_kvs.iter().filter_map(|kv| parse::<HandleRec>(kv).ok()).flat_map(|h| h.allowed).collect();
        handle_tenants.sort();
        handle_tenants.dedup();
        // Identity is not done yet: the lists naming the account are
        // cleaned by its hook, in batches, retried until they are.
        let tomb = Tombstone { deleted_at: now_secs(), done: vec![], handles: handles.clone(), handle_tenants };
        let revoked: Vec<String> = devices.iter().map(|d| format!("{}{}/{d}", records::REVOKED, t.tenant())).collect();
        let out = node
            .revocation_lease
            .txn(|lease| {
                let mut txn = Txn::new()
                    // The account record changes with every device added or
                    // revoked: a device registered meanwhile forces a retry.
                    .when(Compare::ModRevision(akey.clone(), kv.mod_revision))
                    .then(Op::delete(akey.clone()))
                    .then(Op::delete_prefix(t.key(&model::devices_prefix(account))))
                    .then(Op::delete(t.key(&model::settings_key(account))))
                    .then(Op::delete_prefix(t.key(&model::revoked_devices_prefix(account))))
                    .then(Op::delete_prefix(t.key(&model::handles_prefix(account))))
                    .then(Op::delete_prefix(t.key(&model::idem_prefix(account))))
                    .then(Op::put(t.key(&format!("{}{account}", data::TOMBSTONES)), json(&tomb)));
                if let Some(r) = &rec.request_id {
                    txn = txn.then(Op::delete(t.key(&model::idem_key("tenant", r))));
                }
                for h in &handles {
                    txn = txn.then(Op::delete(sys.key(&model::handle_index_key(h))));
                }
                for r in &revoked {
                    txn = txn.then(Op::put_leased(sys.key(r), b"{}".to_vec(), lease));
                }
                txn
            })
            .await?;
        if out.succeeded {
            for r in &revoked {
                node.rt.auth.observe(r, Some(b"{}"));
            }
            tracing::info!(account = %node.rt.redact(account), devices = devices.len(), "account deleted");
            finish_for(node, t, account).await;
            return Ok(());
        }
    }
    Err(IdentityError::Conflict)
}

/// Runs every other service's deletion for an account and records which
/// finished; what fails is retried by [`finish_deletions`].
pub(crate) async fn finish_for(node: &Node, t: &TenantStore, account: &str) {
    let key = format!("{}{account}", data::TOMBSTONES);
    for holder in node.rt.account_data() {
        let Ok(Some(kv)) = t.get(&key).await else { return };
        let Ok(tomb) = serde_json::from_slice::<Tombstone>(&kv.value) else { return };
        if tomb.done.iter().any(|s| s == holder.service()) {
            continue;
        }
        match holder.delete(t, account).await {
            Ok(()) => {
                if let Err(e) = data::mark_done(t, account, holder.service()).await {
                    tracing::warn!(error = %e, "could not record finished deletion");
                }
            }
            Err(e) => {
                tracing::warn!(service = holder.service(), error = %e.message(), account = %node.rt.redact(account), "deletion incomplete; will retry");
            }
        }
    }
}

/// Upkeep: finishes pending deletions, drops tombstones and audit events
/// past their time.
pub(crate) async fn finish_deletions(node: &Node) -> Result<()> {
    let sys = node.rt.system_store();
    let services: Vec<&'static str> = node.rt.account_data().iter().map(|h| h.service()).collect();
    for tenant in sys.tenant_ids().await? {
        let t = sys.tenant(&tenant);
        credentials::prune_audit(&t, now_secs()).await?;
        for tk in t.range_all(data::TOMBSTONES).await? {
            let Ok(tomb) = serde_json::from_slice::<Tombstone>(&tk.value) else { continue };
            let account = last(&tk.key).to_string();
            if tomb.deleted_at + TOMBSTONE_DAYS * 86_400 < now_secs() {
                t.txn(Txn::new().then(Op::delete(tk.stored_key()))).await?;
            } else if services.iter().any(|s| !tomb.done.iter().any(|d| d == s)) {
                finish_for(node, &t, &account).await;
            }
        }
    }
    Ok(())
}
