//! Upkeep: fan-outs a node did not finish, removal proposals for devices
//! that no longer exist, and groups with no member left.

use super::*;

/// Proposes the removal of a device from a group, as its external sender,
/// and queues the proposal for the members (their next commit includes it).
pub(crate) async fn propose_removal(node: &Node, g: &str, d: &Device) -> Result<bool> {
    for _ in 0..CAS_ATTEMPTS {
        let Some(mut l) = load(node, g).await? else { return Ok(false) };
        let Some(entry) = l.meta.member(&d.tenant, &d.account, &d.device).cloned() else { return Ok(false) };
        let proposal = node
            .ds
            .propose_remove(&mut l.verifier, entry.leaf, l.meta.ds_index)
            .map_err(|e| GroupsError::Internal(e.to_string()))?;
        let recipients = l.meta.roster.iter().map(|r| r.device.clone()).filter(|x| x != d).collect();
        let mut log = LogEntry::new(EntryKind::Proposal, &proposal, l.meta.epoch, recipients);
        log.removed = vec![d.clone()];
        let slot =
            model::Slot { epoch: l.slot.epoch, committer_leaf: l.slot.committer_leaf, state: l.verifier.to_bytes() };
        if append(node, g, &l.meta_kv, l.meta.clone(), log, Some((slot, l.verifier)), false).await? {
            tracing::info!(group = %node.rt.redact(g), device = %node.rt.redact(&d.device), "removal proposed for a deleted device");
            return Ok(true);
        }
    }
    Err(GroupsError::Conflict)
}

pub(crate) fn spawn_fanout(node: &Node, g: String) {
    let rt = node.rt.clone();
    let groups = node.groups.clone();
    let lease = node.mailbox_lease.clone();
    let quota = node.quota;
    tokio::spawn(async move {
        if let Err(e) = crate::mailbox::fanout(&rt, &groups, &lease, quota, &g).await {
            tracing::warn!(group = %rt.redact(&g), error = %e, "fan-out incomplete; upkeep will finish it");
        }
    });
}

/// How long a group may keep a device that no longer exists (revoked, or
/// its account deleted) in its roster after Spine proposed its removal,
/// waiting for a member to commit it. Past that the group is deleted: the
/// roster, public state and GroupInfo would otherwise keep naming the
/// device for as long as nobody commits.
pub const GONE_RETENTION_SECS: i64 = 14 * 86_400;

/// Upkeep: finishes fan-outs, proposes the removal of members whose device
/// no longer exists (and who have no removal queued yet), and deletes
/// groups whose every member is gone, or that kept a gone device past
/// [`GONE_RETENTION_SECS`]. A group that fails is skipped (and counted);
/// the others go on.
pub(crate) async fn sweep(node: &Node) -> Result<()> {
    let metas = node.groups.range_all("").await?;
    // Every epoch's committer, written before disputes named it: no longer
    // kept (docs/privacy.md).
    let legacy: Vec<Op> = metas
        .iter()
        .filter(|kv| node.groups.relative(&kv.key).split('/').nth(1) == Some("committers"))
        .map(|kv| Op::delete(kv.stored_key()))
        .collect();
    for chunk in legacy.chunks(spine_runtime::store::MAX_TXN_OPS) {
        node.groups.txn(Txn::new().then_all(chunk.to_vec())).await?;
    }
    let mut failed = 0;
    for kv in metas.iter().filter(|kv| kv.key.ends_with("/s/meta")) {
        let g = node.groups.relative(&kv.key).trim_end_matches("/s/meta").to_string();
        if let Err(e) = sweep_group(node, &g, kv).await {
            failed += 1;
            crate::metrics::upkeep_failure();
            tracing::warn!(group = %node.rt.redact(&g), error = %e, "group upkeep failed; going on with the others");
        }
    }
    if failed > 0 {
        return Err(GroupsError::Internal(format!("upkeep failed for {failed} group(s)")));
    }
    Ok(())
}

pub(crate) async fn sweep_group(node: &Node, g: &str, kv: &KeyValue) -> Result<()> {
    let sys = node.rt.system_store();
    crate::mailbox::fanout(&node.rt, &node.groups, &node.mailbox_lease, node.quota, g).await?;
    let meta: GroupMeta = parse(kv)?;
    let mut gone = Vec::new();
    for r in &meta.roster {
        let Some(tenant) = TenantId::parse(&r.device.tenant) else { continue };
        let t = sys.tenant(&tenant);
        if directory::device(&t, &r.device.account, &r.device.device).await?.is_none() {
            gone.push(r.clone());
        }
    }
    if gone.len() == meta.roster.len() {
        // No member device exists any more: nobody can commit, and the
        // group's data has no one left to serve. Delete it.
        return delete_group(node, g, kv, &meta, "no member device left").await;
    }
    // When each gone device was first noticed; markers of devices that
    // left the roster since are dropped.
    let now = now_secs();
    let markers = node.groups.range_all(&model::gone_prefix(g)).await?;
    let mut oldest = now;
    let mut ops = Vec::new();
    for m in &markers {
        let id = node.groups.relative(&m.key).rsplit('/').next().unwrap_or_default();
        if gone.iter().any(|r| model::gone_id(&r.device) == id) {
            oldest = oldest.min(String::from_utf8_lossy(&m.value).parse().unwrap_or(now));
        } else {
            ops.push(Op::delete(m.stored_key()));
        }
    }
    for r in &gone {
        let key = model::gone_key(g, &r.device);
        if !markers.iter().any(|m| node.groups.relative(&m.key) == key) {
            ops.push(Op::put(node.groups.key(&key), now.to_string().into_bytes()));
        }
    }
    if !ops.is_empty() {
        node.groups.txn(Txn::new().then_all(ops)).await?;
    }
    if now - oldest > GONE_RETENTION_SECS {
        return delete_group(node, g, kv, &meta, "a gone device's removal was never committed").await;
    }
    if gone.is_empty() {
        // Nothing to propose: the group's state need not be read.
        return Ok(());
    }
    let queued = match load(node, g).await? {
        Some(l) => l.verifier.queued_removals(),
        None => return Ok(()),
    };
    for r in &gone {
        if !queued.contains(&r.leaf) {
            propose_removal(node, g, &r.device).await?;
        }
    }
    Ok(())
}

/// Deletes a group and every member's index entry of it, if it is unchanged
/// since `kv` was read.
pub(crate) async fn delete_group(node: &Node, g: &str, kv: &KeyValue, meta: &GroupMeta, why: &str) -> Result<()> {
    let sys = node.rt.system_store();
    let mut txn = Txn::new()
        .when(Compare::ModRevision(kv.stored_key(), kv.mod_revision))
        .then(Op::delete_prefix(node.groups.key(&format!("{g}/"))));
    for r in meta.roster.iter().take(spine_runtime::store::MAX_TXN_OPS - 1) {
        let Some(tenant) = TenantId::parse(&r.device.tenant) else { continue };
        let t = sys.tenant(&tenant);
        txn = txn.then(Op::delete(t.key(&model::gm_key(&r.device.account, &r.device.device, g))));
    }
    if node.groups.txn(txn).await?.succeeded {
        node.verifiers.forget(g);
        tracing::info!(group = %node.rt.redact(g), reason = why, "group deleted");
        crate::metrics::group_deleted(why);
    }
    Ok(())
}
