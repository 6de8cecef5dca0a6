//! The delivery service: groups, commits (one per epoch), application
//! messages, GroupInfo for external joins, disputes, and removal of devices
//! that no longer exist.

use spine_mls::verifier::{Sender, Verified, Verifier};
use spine_proto::groups::v1::{self as pb, EntryKind};
use spine_read_models::directory;
use spine_runtime::ids::TenantId;
use spine_runtime::now_secs;
use spine_runtime::store::{Compare, KeyValue, Op, TenantStore, Txn};

use crate::error::{GroupsError, Result, invalid, mls, mls_refusal};
use crate::model::{self, Device, GroupMeta, LogEntry, RosterEntry, gid_hex, json, parse};
use crate::{APPLICATION_EPOCH_WINDOW, Node};
use spine_mls::Refusal;

mod commit;
mod disputes;
mod upkeep;
pub(crate) mod verifiers;

pub(crate) use commit::*;
pub(crate) use disputes::*;
pub(crate) use upkeep::*;

/// Most commit attempts before answering ABORTED (each re-verifies).
const CAS_ATTEMPTS: usize = 8;
/// Largest MLS message accepted (a commit adding hundreds of members).
pub(crate) const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Most tenants one group's policy names.
const MAX_POLICY_TENANTS: usize = 16;
/// How long a disputed commit holds off new commits on top of it, waiting
/// for enough of the other members to dispute it (and void it) or for one
/// of them to confirm it.
pub(crate) const FREEZE_SECS: i64 = 600;

pub(crate) fn group_id(v: &[u8]) -> Result<String> {
    if v.is_empty() || v.len() > 64 {
        return Err(invalid("group_id", "1 to 64 bytes"));
    }
    Ok(gid_hex(v))
}

fn bytes_field(field: &'static str, v: &[u8]) -> Result<()> {
    if v.is_empty() || v.len() > MAX_MESSAGE_BYTES {
        return Err(invalid(field, format!("1 to {MAX_MESSAGE_BYTES} bytes")));
    }
    Ok(())
}

pub(crate) struct Loaded {
    meta: GroupMeta,
    meta_kv: KeyValue,
    verifier: Verifier,
    /// The current epoch's slot (`verifier` holds its state).
    slot: model::StoredSlot,
    /// The epoch before, while its commit can still be voided.
    prev: Option<model::StoredSlot>,
    /// The fan-out cursor: last log entry delivered, and its revision.
    fanout: (u64, i64),
}

/// A group's core records, read in one range: no verifier built, no state
/// unpacked.
pub(crate) struct Core {
    meta: GroupMeta,
    meta_kv: KeyValue,
    slot: model::StoredSlot,
    prev: Option<model::StoredSlot>,
    fanout: (u64, i64),
}

async fn load_meta(node: &Node, g: &str) -> Result<Option<(GroupMeta, KeyValue)>> {
    match node.groups.get(&model::meta_key(g)).await? {
        Some(kv) => Ok(Some((parse(&kv)?, kv))),
        None => Ok(None),
    }
}

/// The group's core records (meta, the current slot and the one before,
/// the fan-out cursor), in one read. A group written before slots is moved
/// into them first.
async fn load_core(node: &Node, g: &str) -> Result<Option<Core>> {
    for _ in 0..CAS_ATTEMPTS {
        let core = node.groups.range_all(&model::core_prefix(g)).await?;
        let find = |k: String| core.iter().find(|kv| node.groups.relative(&kv.key) == k);
        let Some(meta_kv) = find(model::meta_key(g)).cloned() else { return Ok(None) };
        let meta: GroupMeta = parse(&meta_kv)?;
        if let Some(legacy) = find(model::legacy_state_key(g)) {
            into_slots(node, g, &meta, &meta_kv, legacy).await?;
            continue;
        }
        // An epoch's slot, if it holds that epoch (the other parity may
        // hold an older one, or nothing).
        let slot_of = |e: u64| -> Result<Option<model::StoredSlot>> {
            let kv = find(model::slot_key(g, e));
            Ok(kv.map(|kv| model::StoredSlot::read(kv.value.clone())).transpose()?.filter(|s| s.epoch == e))
        };
        let slot =
            slot_of(meta.epoch)?.ok_or_else(|| GroupsError::Internal("group without state for its epoch".into()))?;
        let prev = match meta.epoch.checked_sub(1) {
            Some(e) => slot_of(e)?,
            None => None,
        };
        let fanout = find(model::fanout_key(g)).map_or((0, 0), |kv| {
            (serde_json::from_slice::<model::Counter>(&kv.value).map_or(0, |c| c.n), kv.mod_revision)
        });
        return Ok(Some(Core { meta, meta_kv, slot, prev, fanout }));
    }
    Err(GroupsError::Conflict)
}

/// Moves a group written before slots into them, in one transaction on
/// its meta: the current state and GroupInfo into the current epoch's
/// slot (and its GroupInfo beside it), the copied previous epoch (if it is
/// the one before) into its own.
async fn into_slots(node: &Node, g: &str, meta: &GroupMeta, meta_kv: &KeyValue, state: &KeyValue) -> Result<()> {
    let (info, prev) = futures::try_join!(
        async { node.groups.get(&model::legacy_info_key(g)).await.map_err(GroupsError::from) },
        async { node.groups.get(&model::legacy_prev_key(g)).await.map_err(GroupsError::from) },
    )?;
    let prev = prev.map(|kv| parse::<model::LegacyPrev>(&kv)).transpose()?.filter(|p| p.epoch + 1 == meta.epoch);
    let current = model::Slot {
        epoch: meta.epoch,
        committer_leaf: prev.as_ref().map_or(u32::MAX, |p| p.committer_leaf),
        state: state.value.clone(),
    };
    let mut txn = Txn::new()
        .when(Compare::ModRevision(meta_kv.stored_key(), meta_kv.mod_revision))
        .when(Compare::ModRevision(state.stored_key(), state.mod_revision))
        .then(Op::put(node.groups.key(&model::slot_key(g, meta.epoch)), current.to_bytes()))
        .then(Op::put(node.groups.key(&model::info_key(g, meta.epoch)), info.map(|kv| kv.value).unwrap_or_default()))
        .then(Op::delete(state.stored_key()))
        .then(Op::delete(node.groups.key(&model::legacy_info_key(g))))
        .then(Op::delete(node.groups.key(&model::legacy_prev_key(g))));
    if let Some(p) = prev {
        let before = model::Slot { epoch: p.epoch, committer_leaf: u32::MAX, state: model::unb64(&p.state)? };
        txn = txn
            .then(Op::put(node.groups.key(&model::slot_key(g, p.epoch)), before.to_bytes()))
            .then(Op::put(node.groups.key(&model::info_key(g, p.epoch)), model::unb64(&p.info)?));
    }
    if node.groups.txn(txn).await?.succeeded {
        tracing::info!(group = %node.rt.redact(g), "group moved into epoch slots");
    }
    Ok(())
}

/// The epoch before the current one and its roster, while it is kept.
pub(crate) async fn previous_epoch(node: &Node, g: &str) -> Result<Option<(u64, Vec<RosterEntry>)>> {
    let Some(prev) = load_core(node, g).await?.and_then(|c| c.prev) else { return Ok(None) };
    Ok(Some((prev.epoch, epoch_roster(&prev)?)))
}

/// The committing leaf of each epoch the group keeps a slot of (the
/// current one and the one before), where known.
pub(crate) async fn epoch_committers(node: &Node, g: &str) -> Result<Vec<(u64, u32)>> {
    Ok(load_core(node, g).await?.map_or(vec![], |c| c.committers().collect()))
}

impl Core {
    /// The committing leaf of each epoch kept in a slot, where known.
    fn committers(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        [Some(&self.slot), self.prev.as_ref()]
            .into_iter()
            .flatten()
            .filter(|s| s.committer_leaf != u32::MAX)
            .map(|s| (s.epoch, s.committer_leaf))
    }
}

/// The group with its verifier: the one this node kept for the stored
/// slot if it did (see [`verifiers`]), else restored from the slot.
async fn load(node: &Node, g: &str) -> Result<Option<Loaded>> {
    let Some(c) = load_core(node, g).await? else { return Ok(None) };
    let verifier = match node.verifiers.take(g, &c.slot.bytes) {
        Some(v) => {
            crate::metrics::state("kept");
            v
        }
        None => {
            crate::metrics::state("store");
            Verifier::from_bytes(&c.slot.unpack()?.state)
                .map_err(|e| GroupsError::Internal(format!("group state: {e}")))?
        }
    };
    Ok(Some(Loaded { meta: c.meta, meta_kv: c.meta_kv, verifier, slot: c.slot, prev: c.prev, fanout: c.fanout }))
}

/// Writes `state` as the current epoch's slot in `txn`, and returns what
/// the node keeps once the write succeeds (`node.verifiers.keep`).
fn put_state(node: &Node, g: &str, slot: model::Slot, txn: Txn) -> (Txn, (Vec<u8>, usize)) {
    let bytes = slot.to_bytes();
    let txn = txn.then(Op::put(node.groups.key(&model::slot_key(g, slot.epoch)), bytes.clone()));
    (txn, (bytes, slot.state.len()))
}

fn tenant_store(node: &Node, caller: &TenantStore, tenant: &str) -> Result<TenantStore> {
    if tenant == caller.tenant().as_str() {
        return Ok(caller.clone());
    }
    let t = TenantId::parse(tenant)
        .ok_or_else(|| GroupsError::Refused("a member's credential names no valid tenant".into()))?;
    Ok(node.rt.system_store().tenant(&t))
}

/// Spine's rules for a device entering a group by `adder`'s doing: its
/// tenant is in the policy, it is a registered device whose key the leaf
/// carries, and its account consents to being added by `adder`'s account
/// (`who_can_add_to_groups`, blocks, cross-app reach; a device of the
/// adder's own account always may be).
async fn admit(
    node: &Node,
    caller: &TenantStore,
    meta_allowed: &[String],
    adder: &Device,
    d: &Device,
    leaf_key: &[u8],
) -> Result<()> {
    if !meta_allowed.contains(&d.tenant) {
        return Err(GroupsError::Refused("a member's tenant is not allowed by the group's policy".into()));
    }
    let t = tenant_store(node, caller, &d.tenant)?;
    match directory::device(&t, &d.account, &d.device).await? {
        Some(rec) if rec.public_key_bytes().as_deref() == Some(leaf_key) => {}
        _ => return Err(GroupsError::Refused("a member is not a registered device with that signature key".into())),
    }
    let own = d.tenant == adder.tenant && d.account == adder.account;
    if !own && !may_add(node, &t, adder, &d.account).await? {
        return Err(GroupsError::Refused("a member's account does not let the committer add it to groups".into()));
    }
    Ok(())
}

/// Whether `adder`'s account may add `account` (of `t`'s tenant) to a
/// group: its `who_can_add_to_groups`, blocks and cross-app reach.
pub(crate) async fn may_add(node: &Node, t: &TenantStore, adder: &Device, account: &str) -> Result<bool> {
    let from = (adder.tenant.as_str(), adder.account.as_str());
    Ok(directory::consent(&node.secrets, t, from, account, directory::who_can_add).await?.is_some())
}

fn roster(v: &Verifier) -> Result<Vec<RosterEntry>> {
    Ok(v.roster()
        .map_err(mls("group_info"))?
        .into_iter()
        .map(|m| RosterEntry { leaf: m.index, device: Device::of(&m.name) })
        .collect())
}

pub(crate) fn to_proto(
    g: &[u8],
    meta: &GroupMeta,
    disputes: Vec<pb::Dispute>,
    voided: Vec<pb::VoidedCommit>,
) -> pb::Group {
    pb::Group {
        group_id: g.to_vec(),
        epoch: meta.epoch,
        members: meta
            .roster
            .iter()
            .map(|r| pb::Member {
                leaf_index: r.leaf,
                tenant_id: r.device.tenant.clone(),
                account_id: r.device.account.clone(),
                device_id: r.device.device.clone(),
            })
            .collect(),
        allowed_tenant_ids: meta.allowed.clone(),
        created_at: Some(prost_types::Timestamp { seconds: meta.created_at, nanos: 0 }),
        disputes,
        voided,
        commits_frozen_until: frozen_until(meta, now_secs())
            .map(|until| prost_types::Timestamp { seconds: until, nanos: 0 }),
    }
}

pub(crate) async fn create(
    node: &Node,
    t: &TenantStore,
    me: &Device,
    req: pb::CreateGroupRequest,
) -> Result<pb::Group> {
    bytes_field("group_info", &req.group_info)?;
    node.limits.check(crate::config::GroupsRate::Commits, &me.tenant, &me.account, 1.0)?;
    if req.allowed_tenant_ids.is_empty() || req.allowed_tenant_ids.len() > MAX_POLICY_TENANTS {
        return Err(invalid("allowed_tenant_ids", format!("1 to {MAX_POLICY_TENANTS} tenant ids")));
    }
    let sys = node.rt.system_store();
    let mut allowed: Vec<String> = Vec::new();
    for a in &req.allowed_tenant_ids {
        TenantId::parse(a).ok_or_else(|| invalid("allowed_tenant_ids", "not a tenant id"))?;
        if sys.get(&directory::tenant_key(a)).await?.is_none() {
            return Err(invalid("allowed_tenant_ids", format!("unknown tenant {a}")));
        }
        if !allowed.contains(a) {
            allowed.push(a.clone());
        }
    }
    if !allowed.contains(&me.tenant) {
        return Err(invalid("allowed_tenant_ids", "must include the creator's tenant"));
    }
    let v = Verifier::from_group_info(&req.group_info).map_err(mls("group_info"))?;
    let g_raw = v.group_id();
    let g = group_id(&g_raw)?;
    if !v.ciphersuite_ok() {
        return Err(mls_refusal("group_info", Refusal::Unsupported, "the group must use ciphersuite 0x0001"));
    }
    let ds_index = v
        .external_sender_index(&node.ds.public_key())
        .ok_or_else(|| invalid("group_info", "the delivery service must be one of the group's external senders"))?;
    let members = v.roster().map_err(mls("group_info"))?;
    if members.iter().all(|m| Device::of(&m.name) != *me) {
        return Err(invalid("group_info", "the calling device must be a member"));
    }
    for m in &members {
        admit(node, t, &allowed, me, &Device::of(&m.name), &m.signature_key).await?;
    }
    let meta = GroupMeta {
        epoch: v.epoch(),
        next_seq: 1,
        roster: roster(&v)?,
        allowed,
        created_at: now_secs(),
        ds_index,
        committer: None,
        confirmed: false,
        disputed_at: None,
    };
    let meta_key = node.groups.key(&model::meta_key(&g));
    let (txn, stored) = put_state(
        node,
        &g,
        model::Slot { epoch: meta.epoch, committer_leaf: u32::MAX, state: v.to_bytes() },
        Txn::new().when(Compare::Absent(meta_key.clone())).then(Op::put(meta_key, json(&meta))),
    );
    let mut txn = txn.then(Op::put(node.groups.key(&model::info_key(&g, meta.epoch)), req.group_info.clone()));
    for r in &meta.roster {
        let ts = tenant_store(node, t, &r.device.tenant)?;
        txn = txn.then(Op::put(ts.key(&model::gm_key(&r.device.account, &r.device.device, &g)), b"{}".to_vec()));
    }
    let out = node.groups.txn(txn).await?;
    if !out.succeeded {
        return Err(GroupsError::AlreadyExists);
    }
    // No fan-out cursor yet: revision 0 compares as absent.
    let written =
        verifiers::Written { meta: meta.clone(), meta_revision: out.revision, fanout: (0, 0), contended: false };
    node.verifiers.keep(&g, v, stored, Some(written));
    tracing::info!(group = %node.rt.redact(&g), members = meta.roster.len(), "group created");
    Ok(to_proto(&g_raw, &meta, vec![], vec![]))
}

pub(crate) async fn get(node: &Node, me: &Device, raw: &[u8]) -> Result<pb::Group> {
    let g = group_id(raw)?;
    let (meta, _) = load_meta(node, &g).await?.ok_or(GroupsError::NotFound("group"))?;
    if meta.member(&me.tenant, &me.account, &me.device).is_none() {
        return Err(GroupsError::NotFound("group"));
    }
    // Per disputed epoch: how many reports, and the committing leaf they
    // name (records from before they named it: the legacy committers key).
    let mut by_epoch: std::collections::BTreeMap<u64, (u32, u32)> = std::collections::BTreeMap::new();
    for kv in node.groups.range_all(&model::disputes_prefix(&g)).await? {
        let rel = node.groups.relative(&kv.key);
        if let Some(e) = rel.split('/').nth(2).and_then(|e| e.parse::<u64>().ok()) {
            let leaf = model::DisputeRecord::committer_of(&kv.value);
            let (reports, committer) = by_epoch.entry(e).or_insert((0, u32::MAX));
            *reports += 1;
            if *committer == u32::MAX {
                *committer = leaf;
            }
        }
    }
    let mut disputes = Vec::new();
    for (epoch, (reports, mut committer)) in by_epoch {
        if committer == u32::MAX
            && let Some(kv) = node.groups.get(&model::legacy_committer_key(&g, epoch)).await?
        {
            committer = model::legacy_committer_of(&kv.value);
        }
        disputes.push(pb::Dispute { epoch, committer_leaf_index: committer, reports });
    }
    let mut voided = Vec::new();
    for kv in node.groups.range_all(&model::voided_prefix(&g)).await? {
        let epoch = node.groups.relative(&kv.key).rsplit('/').next().and_then(|e| e.parse().ok()).unwrap_or(0);
        let v: model::Voided = parse(&kv)?;
        voided.push(pb::VoidedCommit {
            epoch,
            committer_leaf_index: v.committer_leaf,
            voided_at: Some(prost_types::Timestamp { seconds: v.at, nanos: 0 }),
        });
    }
    Ok(to_proto(raw, &meta, disputes, voided))
}

/// The GroupInfo for a member device, or for a new device of an account
/// that has a device in the group (to join by external commit).
pub(crate) async fn group_info(node: &Node, me: &Device, raw: &[u8]) -> Result<pb::GroupInfoResponse> {
    let g = group_id(raw)?;
    let c = load_core(node, &g).await?.ok_or(GroupsError::NotFound("group"))?;
    if !c.meta.roster.iter().any(|r| r.device.tenant == me.tenant && r.device.account == me.account) {
        return Err(GroupsError::NotFound("group"));
    }
    let info = node
        .groups
        .get(&model::info_key(&g, c.meta.epoch))
        .await?
        .ok_or_else(|| GroupsError::Internal("group without info".into()))?;
    Ok(pb::GroupInfoResponse { epoch: c.meta.epoch, group_info: info.value })
}

/// Accepts an application message from a member device, for fan-out.
pub(crate) async fn application(node: &Node, me: &Device, req: pb::SendApplicationRequest) -> Result<()> {
    let g = group_id(&req.group_id)?;
    bytes_field("message", &req.message)?;
    node.limits.check(crate::config::GroupsRate::GroupMessages, &me.tenant, &me.account, 1.0)?;
    node.limits.check(
        crate::config::GroupsRate::GroupMessageBytes,
        &me.tenant,
        &me.account,
        req.message.len() as f64,
    )?;
    for _ in 0..CAS_ATTEMPTS {
        // Non-members learn nothing (NOT_FOUND), not even that the group
        // exists.
        let (mut meta, meta_kv) = load_meta(node, &g).await?.ok_or(GroupsError::NotFound("group"))?;
        if meta.member(&me.tenant, &me.account, &me.device).is_none() {
            return Err(GroupsError::NotFound("group"));
        }
        // Its clear framing is all that can be checked: no group state
        // needed.
        let framing = spine_mls::verifier::check_application(&req.group_id, &req.message).map_err(mls("message"))?;
        if framing.epoch > meta.epoch || framing.epoch + APPLICATION_EPOCH_WINDOW < meta.epoch {
            return Err(invalid(
                "message",
                format!("epoch {} is outside the accepted window (group at {})", framing.epoch, meta.epoch),
            ));
        }
        // A member other than the committer writing in the new epoch has
        // processed its commit: the commit works, and can no longer be voided.
        let confirms =
            !meta.confirmed && framing.epoch == meta.epoch && meta.committer.as_ref().is_some_and(|c| c != me);
        meta.confirmed |= confirms;
        let recipients = meta.roster.iter().map(|r| r.device.clone()).filter(|d| d != me).collect();
        let entry = LogEntry::new(EntryKind::Application, &req.message, framing.epoch, recipients);
        if append(node, &g, &meta_kv, meta, entry, None, confirms).await? {
            return Ok(());
        }
    }
    Err(GroupsError::Conflict)
}

/// Appends one entry to the group's log as `meta` (read as `meta_kv`, its
/// sequence not yet taken), with a proposal the state that queues it, if
/// the group is unchanged since it was read; then fans it out. `false` if
/// another write came first (re-read and retry); the verifier that holds
/// the state is kept once it is stored. `confirms`: the entry confirms the
/// current epoch, which can then no longer be voided: the epoch before
/// goes (its slot and GroupInfo, at the other parity).
async fn append(
    node: &Node,
    g: &str,
    meta_kv: &KeyValue,
    mut meta: GroupMeta,
    entry: LogEntry,
    state: Option<(model::Slot, Verifier)>,
    confirms: bool,
) -> Result<bool> {
    let seq = meta.next_seq;
    meta.next_seq += 1;
    let mut txn = Txn::new()
        .when(Compare::ModRevision(meta_kv.stored_key(), meta_kv.mod_revision))
        .then(Op::put(meta_kv.stored_key(), json(&meta)));
    let mut kept = None;
    if let Some((slot, verifier)) = state {
        let (t, stored) = put_state(node, g, slot, txn);
        (txn, kept) = (t, Some((verifier, stored)));
    }
    if let Some(before) = meta.epoch.checked_sub(1).filter(|_| confirms) {
        txn = txn
            .then(Op::delete(node.groups.key(&model::slot_key(g, before))))
            .then(Op::delete(node.groups.key(&model::info_key(g, before))));
    }
    let out = node
        .mailbox_lease
        .txn(|lease| txn.clone().then(Op::put_leased(node.groups.key(&model::log_key(g, seq)), json(&entry), lease)))
        .await?;
    if !out.succeeded {
        return Ok(false);
    }
    match kept {
        // The cursor is not known here (this write adds an entry to
        // deliver): (0, 0) makes the next commit log its own entry.
        Some((verifier, stored)) => {
            let written = verifiers::Written { meta, meta_revision: out.revision, fanout: (0, 0), contended: false };
            node.verifiers.keep(g, verifier, stored, Some(written));
        }
        None => node.verifiers.advance(g, meta_kv.mod_revision, meta, out.revision),
    }
    spawn_fanout(node, g.to_string());
    Ok(true)
}
