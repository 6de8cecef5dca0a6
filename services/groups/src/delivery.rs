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
use spine_runtime::rate::Kind;

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

struct Loaded {
    meta: GroupMeta,
    meta_kv: KeyValue,
    verifier: Verifier,
    /// The stored state `verifier` was read from.
    state: Vec<u8>,
    /// The fan-out cursor: last log entry delivered, and its revision.
    fanout: (u64, i64),
}

async fn load_meta(node: &Node, g: &str) -> Result<Option<(GroupMeta, KeyValue)>> {
    match node.groups.get(&model::meta_key(g)).await? {
        Some(kv) => Ok(Some((parse(&kv)?, kv))),
        None => Ok(None),
    }
}

/// Meta, state and fan-out cursor in one read.
async fn load(node: &Node, g: &str) -> Result<Option<Loaded>> {
    let core = node.groups.range_all(&model::core_prefix(g)).await?;
    let find = |k: String| core.iter().find(|kv| node.groups.relative(&kv.key) == k);
    let Some(meta_kv) = find(model::meta_key(g)).cloned() else { return Ok(None) };
    let meta = parse(&meta_kv)?;
    let state = find(model::state_key(g)).ok_or_else(|| GroupsError::Internal("group without state".into()))?;
    let verifier =
        Verifier::from_bytes(&state.value).map_err(|e| GroupsError::Internal(format!("group state: {e}")))?;
    let fanout = find(model::fanout_key(g))
        .map_or((0, 0), |kv| (serde_json::from_slice::<model::Counter>(&kv.value).map_or(0, |c| c.n), kv.mod_revision));
    Ok(Some(Loaded { meta, meta_kv, verifier, state: state.value.clone(), fanout }))
}

/// The group, if the calling device is a member. Non-members learn nothing
/// (NOT_FOUND), not even that the group exists.
async fn load_for_member(node: &Node, g: &str, me: &Device) -> Result<Loaded> {
    let l = load(node, g).await?.ok_or(GroupsError::NotFound("group"))?;
    if l.meta.member(&me.tenant, &me.account, &me.device).is_none() {
        return Err(GroupsError::NotFound("group"));
    }
    Ok(l)
}

fn tenant_store(node: &Node, caller: &TenantStore, tenant: &str) -> Result<TenantStore> {
    if tenant == caller.tenant().as_str() {
        return Ok(caller.clone());
    }
    let t = TenantId::parse(tenant)
        .ok_or_else(|| GroupsError::Refused("a member's credential names no valid tenant".into()))?;
    Ok(node.rt.system_store().tenant_for_delivery(&t))
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

/// Whether a device still in the group (not the committer) disputes the
/// current epoch: disputes of devices gone since (an account deleted) no
/// longer hold the group still.
async fn disputed_by_members(node: &Node, g: &str, meta: &GroupMeta) -> Result<bool> {
    let disputes = node.groups.range_all(&model::epoch_disputes_prefix(g, meta.epoch)).await?;
    Ok(disputes.iter().any(|kv| {
        let who = kv.key.rsplit('/').next().unwrap_or_default();
        meta.roster.iter().any(|r| Some(&r.device) != meta.committer.as_ref() && model::gone_id(&r.device) == who)
    }))
}

/// Until when commits on top of the current epoch are refused, if they are:
/// its commit is disputed, not confirmed, and the freeze has not run out.
fn frozen_until(meta: &GroupMeta, now: i64) -> Option<i64> {
    let until = meta.disputed_at? + FREEZE_SECS;
    (!meta.confirmed && meta.committer.is_some() && now < until).then_some(until)
}

pub(crate) async fn create(
    node: &Node,
    t: &TenantStore,
    me: &Device,
    req: pb::CreateGroupRequest,
) -> Result<pb::Group> {
    bytes_field("group_info", &req.group_info)?;
    node.rt.limits.check(Kind::Commits, &me.tenant, &me.account, 1.0)?;
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
    let mut txn = Txn::new()
        .when(Compare::Absent(node.groups.key(&model::meta_key(&g))))
        .then(Op::put(node.groups.key(&model::meta_key(&g)), json(&meta)))
        .then(Op::put(node.groups.key(&model::state_key(&g)), v.to_bytes()))
        .then(Op::put(node.groups.key(&model::info_key(&g)), req.group_info.clone()));
    for r in &meta.roster {
        let ts = tenant_store(node, t, &r.device.tenant)?;
        txn = txn.then(Op::put(ts.key(&model::gm_key(&r.device.account, &r.device.device, &g)), b"{}".to_vec()));
    }
    if !node.groups.txn(txn).await?.succeeded {
        return Err(GroupsError::AlreadyExists);
    }
    tracing::info!(group = %node.rt.redact(&g), members = meta.roster.len(), "group created");
    Ok(to_proto(&g_raw, &meta, vec![], vec![]))
}

pub(crate) async fn get(node: &Node, me: &Device, raw: &[u8]) -> Result<pb::Group> {
    let g = group_id(raw)?;
    let (meta, _) = load_meta(node, &g).await?.ok_or(GroupsError::NotFound("group"))?;
    if meta.member(&me.tenant, &me.account, &me.device).is_none() {
        return Err(GroupsError::NotFound("group"));
    }
    let mut by_epoch: std::collections::BTreeMap<u64, u32> = std::collections::BTreeMap::new();
    for kv in node.groups.range_all(&model::disputes_prefix(&g)).await? {
        let rel = node.groups.relative(&kv.key);
        if let Some(e) = rel.split('/').nth(2).and_then(|e| e.parse::<u64>().ok()) {
            *by_epoch.entry(e).or_default() += 1;
        }
    }
    let mut disputes = Vec::new();
    for (epoch, reports) in by_epoch {
        let committer = match node.groups.get(&model::committer_key(&g, epoch)).await? {
            Some(kv) => String::from_utf8_lossy(&kv.value).parse().unwrap_or(u32::MAX),
            None => u32::MAX,
        };
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
    let (meta, _) = load_meta(node, &g).await?.ok_or(GroupsError::NotFound("group"))?;
    if !meta.roster.iter().any(|r| r.device.tenant == me.tenant && r.device.account == me.account) {
        return Err(GroupsError::NotFound("group"));
    }
    let info = node
        .groups
        .get(&model::info_key(&g))
        .await?
        .ok_or_else(|| GroupsError::Internal("group without info".into()))?;
    Ok(pb::GroupInfoResponse { epoch: meta.epoch, group_info: info.value })
}

/// Accepts a commit bundle: verified, for the current epoch, within policy,
/// and the one that wins the epoch.
pub(crate) async fn commit(node: &Node, t: &TenantStore, me: &Device, req: pb::SendCommitRequest) -> Result<u64> {
    let g = group_id(&req.group_id)?;
    bytes_field("commit", &req.commit)?;
    bytes_field("group_info", &req.group_info)?;
    node.rt.limits.check(Kind::Commits, &me.tenant, &me.account, 1.0)?;
    if req.welcome.len() > MAX_MESSAGE_BYTES {
        return Err(invalid("welcome", format!("at most {MAX_MESSAGE_BYTES} bytes")));
    }
    let my_key = node.own_key(t, me).await?;
    for _ in 0..CAS_ATTEMPTS {
        let Some(mut l) = load(node, &g).await? else { return Err(GroupsError::NotFound("group")) };
        let is_member = l.meta.member(&me.tenant, &me.account, &me.device).is_some();
        let account_in_group =
            l.meta.roster.iter().any(|r| r.device.tenant == me.tenant && r.device.account == me.account);
        if !is_member && !account_in_group {
            return Err(GroupsError::NotFound("group"));
        }
        if let Some(until) = frozen_until(&l.meta, now_secs())
            && disputed_by_members(node, &g, &l.meta).await?
        {
            return Err(GroupsError::Frozen { epoch: l.meta.epoch, until });
        }
        let verdict = l.verifier.verify(&req.commit).map_err(mls("commit"))?;
        let (sender, added, removed) = match verdict {
            Verified::Commit { sender, added, removed, .. } => (sender, added, removed),
            Verified::Proposal { .. } => {
                return Err(mls_refusal("commit", Refusal::NotAllowed, "a proposal, not a commit"));
            }
        };
        // The commit is the calling device's own, signed with its
        // registered key.
        match &sender {
            Sender::Member { name, signature_key, .. } | Sender::NewMember { name, signature_key } => {
                if Device::of(name) != *me || *signature_key != my_key {
                    return Err(GroupsError::Refused(
                        "the commit is not signed by the calling device's registered key".into(),
                    ));
                }
            }
            Sender::External => {
                return Err(mls_refusal("commit", Refusal::NotAllowed, "commits by external senders are not accepted"));
            }
        }
        if matches!(sender, Sender::NewMember { .. }) {
            admit(node, t, &l.meta.allowed, me, me, &my_key).await?;
        }
        for a in &added {
            admit(node, t, &l.meta.allowed, me, &Device::of(&a.name), &a.signature_key).await?;
        }
        if added.is_empty() != req.welcome.is_empty() && !matches!(sender, Sender::NewMember { .. }) {
            return Err(invalid("welcome", "required exactly when the commit adds members"));
        }
        let from_epoch = l.meta.epoch;
        let old_roster = l.meta.roster.clone();
        l.verifier.apply().map_err(mls("commit"))?;
        let signer = match &sender {
            Sender::Member { index, .. } => *index,
            _ => l
                .verifier
                .index_of(&spine_mls::DeviceName::new(&me.tenant, &me.account, &me.device))
                .unwrap_or(u32::MAX),
        };
        l.verifier.check_group_info(&req.group_info, signer).map_err(mls("group_info"))?;
        if !req.welcome.is_empty() && !spine_mls::client::is_welcome(&req.welcome) {
            return Err(mls_refusal("welcome", Refusal::Malformed, "not a Welcome message"));
        }

        // The delivery service keeps its place as the group's external
        // sender: without it Spine could not propose removals of deleted
        // devices.
        if l.verifier.external_sender_index(&node.ds.public_key()) != Some(l.meta.ds_index) {
            return Err(GroupsError::Refused(
                "a commit may not remove or change the delivery service as the group's external sender".into(),
            ));
        }
        let mut meta = l.meta.clone();
        meta.epoch = l.verifier.epoch();
        meta.committer = Some(me.clone());
        meta.confirmed = false;
        meta.disputed_at = None;
        meta.roster = roster(&l.verifier).map_err(|_| {
            GroupsError::Refused("a commit may not bring in a credential that is not a Spine device".into())
        })?;
        // A leaf that stays in the group keeps its device: an update path
        // may change keys, never who the member is.
        for r in &meta.roster {
            if let Some(before) = old_roster.iter().find(|o| o.leaf == r.leaf)
                && before.device != r.device
                && !removed.iter().any(|m| m.index == r.leaf)
            {
                return Err(GroupsError::Refused("a commit may not change a member's identity".into()));
            }
        }
        let seq = meta.next_seq;
        let recipients: Vec<Device> = old_roster.iter().map(|r| r.device.clone()).filter(|d| d != me).collect();
        let mut entry = LogEntry::new(EntryKind::Commit, &req.commit, from_epoch, recipients);
        // Devices the commit takes out of the group. A device that rejoins
        // by external commit replaces its own old leaf: it is removed and
        // added at once, and stays a member (its index entry must stay).
        entry.removed = removed
            .iter()
            .map(|m| Device::of(&m.name))
            .filter(|d| !meta.roster.iter().any(|r| &r.device == d))
            .collect();
        // The epoch this commit leaves, kept until the next commit so the
        // commit can be voided if its members dispute it; except when the
        // commit removes a device that no longer exists: that epoch names a
        // deleted account (or a revoked device) and must not be kept, nor
        // brought back.
        let mut removes_gone = false;
        for m in &removed {
            let d = Device::of(&m.name);
            let t = tenant_store(node, t, &d.tenant)?;
            if directory::device(&t, &d.account, &d.device).await?.is_none() {
                removes_gone = true;
                break;
            }
        }
        let prev_op = if removes_gone {
            Op::delete(node.groups.key(&model::prev_key(&g)))
        } else {
            let old_info = node.groups.get(&model::info_key(&g)).await?.map(|kv| kv.value).unwrap_or_default();
            let prev = model::PrevEpoch {
                epoch: from_epoch,
                state: model::b64(&l.state),
                info: model::b64(&old_info),
                roster: old_roster.clone(),
                committer_leaf: signer,
            };
            Op::put(node.groups.key(&model::prev_key(&g)), json(&prev))
        };
        let mut txn = Txn::new()
            .when(Compare::ModRevision(l.meta_kv.key.clone(), l.meta_kv.mod_revision))
            .then(Op::put(node.groups.key(&model::state_key(&g)), l.verifier.to_bytes()))
            .then(Op::put(node.groups.key(&model::info_key(&g)), req.group_info.clone()))
            .then(prev_op)
            .then(Op::put(node.groups.key(&model::committer_key(&g, meta.epoch)), signer.to_string().into_bytes()));
        let mut log = vec![(seq, entry)];
        if !req.welcome.is_empty() {
            let mut w = LogEntry::new(
                EntryKind::Welcome,
                &req.welcome,
                meta.epoch,
                added.iter().map(|m| Device::of(&m.name)).collect(),
            );
            w.joins = true;
            log.push((seq + 1, w));
        }
        if matches!(sender, Sender::NewMember { .. }) {
            // The joiner has no Welcome to receive: index its membership now.
            txn = txn.then(Op::put(t.key(&model::gm_key(&me.account, &me.device, &g)), b"{}".to_vec()));
        }
        meta.next_seq = seq + log.len() as u64;
        txn = txn.then(Op::put(l.meta_kv.key.clone(), json(&meta)));
        // Nothing to deliver (a one-member group, or only the committer
        // left) and nothing pending: the commit advances the fan-out cursor
        // itself, sparing a fan-out pass.
        let nothing_to_deliver =
            l.fanout.0 + 1 == seq && log.iter().all(|(_, e)| e.recipients.is_empty() && e.removed.is_empty());
        if nothing_to_deliver {
            let cursor = node.groups.key(&model::fanout_key(&g));
            txn = txn
                .when(Compare::ModRevision(cursor.clone(), l.fanout.1))
                .then(Op::put(cursor, json(&model::Counter { n: meta.next_seq - 1 })));
        }
        let out = node
            .mailbox_lease
            .txn(|lease| {
                let mut txn = txn.clone();
                for (s, e) in &log {
                    txn = txn.then(Op::put_leased(node.groups.key(&model::log_key(&g, *s)), json(e), lease));
                }
                txn
            })
            .await?;
        if out.succeeded {
            tracing::info!(group = %node.rt.redact(&g), epoch = meta.epoch, added = added.len(), removed = removed.len(), "commit accepted");
            if !nothing_to_deliver {
                spawn_fanout(node, g.clone());
            }
            return Ok(meta.epoch);
        }
        // Another write landed first. If it moved the epoch, this commit
        // lost: say so with the epoch to catch up to.
        if let Some((now, _)) = load_meta(node, &g).await?
            && now.epoch != from_epoch
        {
            return Err(GroupsError::WrongEpoch { current: now.epoch });
        }
    }
    Err(GroupsError::Conflict)
}

/// Accepts an application message from a member device, for fan-out.
pub(crate) async fn application(node: &Node, me: &Device, req: pb::SendApplicationRequest) -> Result<()> {
    let g = group_id(&req.group_id)?;
    bytes_field("message", &req.message)?;
    node.rt.limits.check(Kind::GroupMessages, &me.tenant, &me.account, 1.0)?;
    node.rt.limits.check(Kind::GroupMessageBytes, &me.tenant, &me.account, req.message.len() as f64)?;
    for _ in 0..CAS_ATTEMPTS {
        let mut l = load_for_member(node, &g, me).await?;
        let framing = l.verifier.check_application(&req.message).map_err(mls("message"))?;
        if framing.epoch > l.meta.epoch || framing.epoch + APPLICATION_EPOCH_WINDOW < l.meta.epoch {
            return Err(invalid(
                "message",
                format!("epoch {} is outside the accepted window (group at {})", framing.epoch, l.meta.epoch),
            ));
        }
        // A member other than the committer writing in the new epoch has
        // processed its commit: the commit works, and can no longer be voided.
        if framing.epoch == l.meta.epoch && l.meta.committer.as_ref().is_some_and(|c| c != me) {
            l.meta.confirmed = true;
        }
        let recipients = l.meta.roster.iter().map(|r| r.device.clone()).filter(|d| d != me).collect();
        let entry = LogEntry::new(EntryKind::Application, &req.message, framing.epoch, recipients);
        if append(node, &g, &l, entry, None).await? {
            return Ok(());
        }
    }
    Err(GroupsError::Conflict)
}

/// Most disputes a group keeps (every member device may report each of
/// its recent epochs; past this the oldest reports are dropped).
const MAX_DISPUTES: usize = 256;

pub(crate) async fn dispute(node: &Node, me: &Device, req: pb::ReportDisputeRequest) -> Result<()> {
    let g = group_id(&req.group_id)?;
    let (meta, _) = load_meta(node, &g).await?.ok_or(GroupsError::NotFound("group"))?;
    if meta.member(&me.tenant, &me.account, &me.device).is_none() {
        return Err(GroupsError::NotFound("group"));
    }
    if req.epoch == 0 || req.epoch > meta.epoch {
        return Err(invalid("epoch", format!("must name an epoch a commit created (1 to {})", meta.epoch)));
    }
    node.rt.limits.check(Kind::Disputes, &me.tenant, &me.account, 1.0)?;
    // Kept like the group's messages (14 to 15 days, under the mailbox
    // lease), and at most MAX_DISPUTES per group: the oldest go first.
    let existing = node.groups.range_all(&model::disputes_prefix(&g)).await?;
    let excess = (existing.len() + 1).saturating_sub(MAX_DISPUTES);
    node.mailbox_lease
        .txn(|lease| {
            Txn::new().then_all(existing.iter().take(excess).map(|kv| Op::delete(kv.key.clone()))).then(Op::put_leased(
                node.groups.key(&model::dispute_key(&g, req.epoch, &me.tenant, &me.device)),
                b"{}".to_vec(),
                lease,
            ))
        })
        .await?;
    crate::metrics::dispute();
    tracing::debug!(group = %node.rt.redact(&g), epoch = req.epoch, "commit disputed by a member");
    if req.epoch == meta.epoch {
        settle(node, &g).await?;
    }
    Ok(())
}

/// Settles the disputes of the current epoch's commit: the first dispute
/// freezes commits on top of it; the commit is voided once more than half of
/// the other members of the epoch before (not its committer) disputed it,
/// unless one of them confirmed it by writing in the new epoch. See
/// docs/api.md, "A forked epoch", for the rule and its abuse cases.
async fn settle(node: &Node, g: &str) -> Result<()> {
    for _ in 0..CAS_ATTEMPTS {
        let Some(l) = load(node, g).await? else { return Ok(()) };
        let Some(committer) = l.meta.committer.clone() else { return Ok(()) };
        if l.meta.confirmed {
            return Ok(());
        }
        let Some(prev_kv) = node.groups.get(&model::prev_key(g)).await? else { return Ok(()) };
        let prev: model::PrevEpoch = parse(&prev_kv)?;
        if prev.epoch + 1 != l.meta.epoch {
            return Ok(());
        }
        let voters: Vec<&Device> = prev.roster.iter().map(|r| &r.device).filter(|d| **d != committer).collect();
        let disputed: std::collections::HashSet<String> = node
            .groups
            .range_all(&model::epoch_disputes_prefix(g, l.meta.epoch))
            .await?
            .into_iter()
            .filter_map(|kv| kv.key.rsplit('/').next().map(str::to_string))
            .collect();
        let votes = voters.iter().filter(|d| disputed.contains(&model::gone_id(d))).count();
        if votes * 2 > voters.len() {
            if void(node, g, &l, &prev, prev_kv.mod_revision).await? {
                return Ok(());
            }
            continue;
        }
        if l.meta.disputed_at.is_some() {
            return Ok(());
        }
        // The first dispute: freeze commits on top of this one.
        let mut meta = l.meta.clone();
        meta.disputed_at = Some(now_secs());
        let txn = Txn::new()
            .when(Compare::ModRevision(l.meta_kv.key.clone(), l.meta_kv.mod_revision))
            .then(Op::put(l.meta_kv.key.clone(), json(&meta)));
        if node.groups.txn(txn).await?.succeeded {
            return Ok(());
        }
    }
    Err(GroupsError::Conflict)
}

/// Voids the current epoch's commit: the group goes back to `prev` (state,
/// GroupInfo, roster), the membership index follows, and every device of
/// either roster is told by an ENTRY_KIND_EPOCH_VOIDED entry. `false` if the
/// group changed meanwhile.
async fn void(node: &Node, g: &str, l: &Loaded, prev: &model::PrevEpoch, prev_rev: i64) -> Result<bool> {
    let voided_epoch = l.meta.epoch;
    let mut meta = l.meta.clone();
    meta.epoch = prev.epoch;
    meta.roster = prev.roster.clone();
    meta.committer = None;
    meta.confirmed = false;
    meta.disputed_at = None;
    let seq = meta.next_seq;
    meta.next_seq += 1;
    let before: Vec<Device> = prev.roster.iter().map(|r| r.device.clone()).collect();
    let after: Vec<Device> = l.meta.roster.iter().map(|r| r.device.clone()).collect();
    let mut recipients = before.clone();
    recipients.extend(after.iter().filter(|d| !before.contains(d)).cloned());
    let mut entry = LogEntry::new(EntryKind::EpochVoided, &[], voided_epoch, recipients);
    // The membership index follows, in the fan-out (after the voided
    // commit's own, which it must undo): every device told is indexed, then
    // those the voided commit brought in leave with it, and those it took
    // out are members again.
    entry.joins = true;
    entry.removed = after.iter().filter(|d| !before.contains(d)).cloned().collect();
    let base = Txn::new()
        .when(Compare::ModRevision(l.meta_kv.key.clone(), l.meta_kv.mod_revision))
        .when(Compare::ModRevision(node.groups.key(&model::prev_key(g)), prev_rev))
        .then(Op::put(l.meta_kv.key.clone(), json(&meta)))
        .then(Op::put(node.groups.key(&model::state_key(g)), model::unb64(&prev.state)?))
        .then(Op::put(node.groups.key(&model::info_key(g)), model::unb64(&prev.info)?))
        .then(Op::delete(node.groups.key(&model::prev_key(g))))
        .then(Op::delete(node.groups.key(&model::committer_key(g, voided_epoch))))
        .then(Op::delete_prefix(node.groups.key(&model::epoch_disputes_prefix(g, voided_epoch))));
    let record = model::Voided { committer_leaf: prev.committer_leaf, at: now_secs() };
    let out = node
        .mailbox_lease
        .txn(|lease| {
            base.clone()
                .then(Op::put_leased(node.groups.key(&model::log_key(g, seq)), json(&entry), lease))
                .then(Op::put_leased(node.groups.key(&model::voided_key(g, voided_epoch)), json(&record), lease))
        })
        .await?;
    if !out.succeeded {
        return Ok(false);
    }
    crate::metrics::voided();
    tracing::info!(group = %node.rt.redact(g), epoch = voided_epoch, "disputed commit voided");
    spawn_fanout(node, g.to_string());
    Ok(true)
}

/// Deletes the disputes a device filed in a group (its account is gone).
pub(crate) async fn forget_disputes(node: &Node, g: &str, d: &Device) -> Result<()> {
    let mine = format!("/{}", model::gone_id(d));
    let ops: Vec<Op> = node
        .groups
        .range_all(&model::disputes_prefix(g))
        .await?
        .into_iter()
        .filter(|kv| kv.key.ends_with(&mine))
        .map(|kv| Op::delete(kv.key))
        .collect();
    for chunk in ops.chunks(spine_runtime::store::MAX_TXN_OPS) {
        node.groups.txn(Txn::new().then_all(chunk.to_vec())).await?;
    }
    Ok(())
}

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
        let state = l.verifier.to_bytes();
        if append(node, g, &l, log, Some(state)).await? {
            tracing::info!(group = %node.rt.redact(g), device = %node.rt.redact(&d.device), "removal proposed for a deleted device");
            return Ok(true);
        }
    }
    Err(GroupsError::Conflict)
}

/// Appends one entry to the group's log (and, with a proposal, the state
/// that queues it) if the group is unchanged since `l` was read, then fans
/// it out. `false` if another write came first: re-read and retry.
async fn append(node: &Node, g: &str, l: &Loaded, entry: LogEntry, state: Option<Vec<u8>>) -> Result<bool> {
    let mut meta = l.meta.clone();
    let seq = meta.next_seq;
    meta.next_seq += 1;
    let out = node
        .mailbox_lease
        .txn(|lease| {
            let mut txn = Txn::new()
                .when(Compare::ModRevision(l.meta_kv.key.clone(), l.meta_kv.mod_revision))
                .then(Op::put(l.meta_kv.key.clone(), json(&meta)))
                .then(Op::put_leased(node.groups.key(&model::log_key(g, seq)), json(&entry), lease));
            if let Some(s) = &state {
                txn = txn.then(Op::put(node.groups.key(&model::state_key(g)), s.clone()));
            }
            txn
        })
        .await?;
    if out.succeeded {
        spawn_fanout(node, g.to_string());
    }
    Ok(out.succeeded)
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

async fn sweep_group(node: &Node, g: &str, kv: &KeyValue) -> Result<()> {
    let sys = node.rt.system_store();
    crate::mailbox::fanout(&node.rt, &node.groups, &node.mailbox_lease, node.quota, g).await?;
    let meta: GroupMeta = parse(kv)?;
    let mut gone = Vec::new();
    for r in &meta.roster {
        let Some(tenant) = TenantId::parse(&r.device.tenant) else { continue };
        let t = sys.tenant_for_delivery(&tenant);
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
            ops.push(Op::delete(m.key.clone()));
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
async fn delete_group(node: &Node, g: &str, kv: &KeyValue, meta: &GroupMeta, why: &str) -> Result<()> {
    let sys = node.rt.system_store();
    let mut txn = Txn::new()
        .when(Compare::ModRevision(kv.key.clone(), kv.mod_revision))
        .then(Op::delete_prefix(node.groups.key(&format!("{g}/"))));
    for r in meta.roster.iter().take(spine_runtime::store::MAX_TXN_OPS - 1) {
        let Some(tenant) = TenantId::parse(&r.device.tenant) else { continue };
        let t = sys.tenant_for_delivery(&tenant);
        txn = txn.then(Op::delete(t.key(&model::gm_key(&r.device.account, &r.device.device, g))));
    }
    if node.groups.txn(txn).await?.succeeded {
        tracing::info!(group = %node.rt.redact(g), reason = why, "group deleted");
        crate::metrics::group_deleted(why);
    }
    Ok(())
}
