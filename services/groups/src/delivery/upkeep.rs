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

/// The groups nodes' shared record of their upkeep (`/spine/sys/groups/upkeep`):
/// when the last pass started and how long the one before it took. One
/// node sweeps at a time: a node's tick claims the pass by a
/// compare-and-swap on this record, and only once the last pass is old
/// enough.
const UPKEEP_KEY: &str = "groups/upkeep";

/// Keys read per page while sweeping: the scan holds one page and one
/// group at a time, never the whole space.
const SWEEP_PAGE: usize = 512;

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct UpkeepRecord {
    started_ms: i64,
    took_ms: i64,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The gap between passes: the configured interval, or four times the last
/// pass's length if that is longer, so sweeping a large space takes at most
/// about a fifth of one node's time.
fn gap_ms(every: std::time::Duration, last: &UpkeepRecord) -> i64 {
    (every.as_millis() as i64).max(4 * last.took_ms)
}

/// Claims this pass for this node, if no node ran one within the gap (less
/// a quarter, so a node's own next tick is not late): the claim's record
/// and revision.
async fn claim(node: &Node, every: std::time::Duration) -> Result<Option<(UpkeepRecord, i64)>> {
    let sys = node.rt.system_store();
    let kv = sys.get(UPKEEP_KEY).await?;
    let last: UpkeepRecord = kv.as_ref().and_then(|kv| serde_json::from_slice(&kv.value).ok()).unwrap_or_default();
    let now = now_ms();
    let gap = gap_ms(every, &last);
    if now - last.started_ms < gap - gap / 4 {
        return Ok(None);
    }
    let when = match &kv {
        Some(kv) => Compare::ModRevision(kv.stored_key(), kv.mod_revision),
        None => Compare::Absent(sys.key(UPKEEP_KEY)),
    };
    let mine = UpkeepRecord { started_ms: now, took_ms: last.took_ms };
    let out = sys.txn(Txn::new().when(when).then(Op::put(sys.key(UPKEEP_KEY), json(&mine)))).await?;
    Ok(out.succeeded.then_some((mine, out.revision)))
}

/// Upkeep, one pass shared by the groups nodes (see [`UPKEEP_KEY`]): finishes
/// fan-outs, proposes the removal of members whose device no longer exists
/// (and who have no removal queued yet), and deletes groups whose every
/// member is gone, or that kept a gone device past [`GONE_RETENTION_SECS`].
///
/// It reads the groups space once, a page at a time, and works on each
/// group from what that read found: a group with no undelivered log entry
/// costs no fan-out read, and each member device's existence is read once
/// per pass however many groups it is in. A group that fails is skipped
/// (and counted); the others go on. A node whose tick finds a pass run
/// recently does nothing.
pub(crate) async fn sweep(node: &Node, every: std::time::Duration) -> Result<()> {
    let Some((mut record, revision)) = claim(node, every).await? else { return Ok(()) };
    let started = std::time::Instant::now();
    let mut pass = Pass::default();
    let mut group: Option<(String, GroupKeys)> = None;
    let mut after: Option<String> = None;
    loop {
        let page = node.groups.range("", after.as_deref(), SWEEP_PAGE).await?;
        after = page.kvs.last().map(|kv| node.groups.relative(&kv.key).to_string());
        for kv in page.kvs {
            let rel = node.groups.relative(&kv.key).to_string();
            let Some((g, rest)) = rel.split_once('/') else { continue };
            if group.as_ref().is_none_or(|(current, _)| current != g) {
                if let Some((done, keys)) = group.take() {
                    pass.group(node, &done, keys).await?;
                }
                group = Some((g.to_string(), GroupKeys::default()));
            }
            let keys = &mut group.as_mut().expect("a group is open").1;
            match rest.split('/').collect::<Vec<_>>().as_slice() {
                ["s", "meta"] => keys.meta = Some(kv),
                ["log", ..] => keys.has_log = true,
                ["gone", ..] => keys.gone.push(kv),
                // Every epoch's committer, written before disputes named
                // it: no longer kept (docs/privacy.md).
                ["committers", ..] => keys.legacy.push(Op::delete(kv.stored_key())),
                _ => {}
            }
        }
        if !page.more {
            break;
        }
    }
    if let Some((done, keys)) = group.take() {
        pass.group(node, &done, keys).await?;
    }
    // How long this pass took sets the gap before the next one.
    record.took_ms = started.elapsed().as_millis() as i64;
    let sys = node.rt.system_store();
    sys.txn(
        Txn::new()
            .when(Compare::ModRevision(sys.key(UPKEEP_KEY), revision))
            .then(Op::put(sys.key(UPKEEP_KEY), json(&record))),
    )
    .await?;
    if pass.failed > 0 {
        return Err(GroupsError::Internal(format!("upkeep failed for {} group(s)", pass.failed)));
    }
    Ok(())
}

/// What the sweep's read found of one group.
#[derive(Default)]
struct GroupKeys {
    meta: Option<KeyValue>,
    /// An undelivered log entry (delivered ones are deleted).
    has_log: bool,
    /// Markers of member devices found gone.
    gone: Vec<KeyValue>,
    legacy: Vec<Op>,
}

/// One pass's memory: which member devices exist (each read once), and how
/// many groups failed.
#[derive(Default)]
struct Pass {
    devices: std::collections::HashMap<(String, String, String), bool>,
    failed: usize,
}

impl Pass {
    async fn group(&mut self, node: &Node, g: &str, keys: GroupKeys) -> Result<()> {
        for chunk in keys.legacy.chunks(spine_runtime::store::MAX_TXN_OPS) {
            node.groups.txn(Txn::new().then_all(chunk.to_vec())).await?;
        }
        let Some(meta) = &keys.meta else { return Ok(()) };
        if let Err(e) = sweep_group(node, g, meta, &keys, self).await {
            self.failed += 1;
            crate::metrics::upkeep_failure();
            tracing::warn!(group = %node.rt.redact(g), error = %e, "group upkeep failed; going on with the others");
        }
        Ok(())
    }

    /// Whether a member device still exists (read once per pass). The
    /// memory is dropped past 100,000 devices, to stay bounded.
    async fn exists(&mut self, node: &Node, d: &Device) -> Result<bool> {
        let k = (d.tenant.clone(), d.account.clone(), d.device.clone());
        if let Some(e) = self.devices.get(&k) {
            return Ok(*e);
        }
        let e = match TenantId::parse(&d.tenant) {
            Some(tenant) => {
                directory::device(&node.rt.system_store().tenant(&tenant), &d.account, &d.device).await?.is_some()
            }
            // A credential naming no valid tenant: not a device Spine
            // can find, and not one upkeep acts on.
            None => true,
        };
        if self.devices.len() >= 100_000 {
            self.devices.clear();
        }
        self.devices.insert(k, e);
        Ok(e)
    }
}

async fn sweep_group(node: &Node, g: &str, kv: &KeyValue, keys: &GroupKeys, pass: &mut Pass) -> Result<()> {
    if keys.has_log {
        crate::mailbox::fanout(&node.rt, &node.groups, &node.mailbox_lease, node.quota, g).await?;
    }
    let meta: GroupMeta = parse(kv)?;
    let mut gone = Vec::new();
    for r in &meta.roster {
        if !pass.exists(node, &r.device).await? {
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
    let markers = &keys.gone;
    let mut oldest = now;
    let mut ops = Vec::new();
    for m in markers {
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
