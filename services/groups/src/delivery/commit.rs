//! SendCommit: verify the commit against the group's public state, check
//! Spine's rules (committer, added devices, policy, consent), and write the
//! new epoch's slot (state and GroupInfo) and log entries in one
//! compare-and-swap.

use super::*;

/// What a commit is tried on: the group's meta (stored under `meta_key` at
/// `meta_revision`), state and fan-out cursor; and whether the group is to
/// be kept as contended once the commit is written.
struct Base {
    meta: GroupMeta,
    meta_key: spine_runtime::store::Key,
    meta_revision: i64,
    verifier: Verifier,
    fanout: (u64, i64),
    contended: bool,
}

enum Attempt {
    Accepted(u64),
    /// Another write to the group landed first.
    Lost {
        from_epoch: u64,
    },
}

/// How a try found its base.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Found {
    /// Read nothing: a bet on what this node's last write stored.
    Bet,
    /// Read the meta, and it was (or was not) where this node left it.
    Meta { unchanged: bool },
    /// Read the group's core records.
    Group,
}

/// Accepts a commit bundle: verified, for the current epoch, within policy,
/// and the one that wins the epoch.
///
/// On top of this node's own last write to the group it reads nothing, or
/// only the meta while the group is contended ([`verifiers`]); otherwise,
/// or when that bet is lost, it reads the group's core records.
pub(crate) async fn commit(node: &Node, t: &TenantStore, me: &Device, req: pb::SendCommitRequest) -> Result<u64> {
    let g = group_id(&req.group_id)?;
    bytes_field("commit", &req.commit)?;
    bytes_field("group_info", &req.group_info)?;
    node.limits.check(crate::config::GroupsRate::Commits, &me.tenant, &me.account, 1.0)?;
    if req.welcome.len() > MAX_MESSAGE_BYTES {
        return Err(invalid("welcome", format!("at most {MAX_MESSAGE_BYTES} bytes")));
    }
    let my_key = node.own_key(t, me).await?;
    // Whether another node's write was found in the way: the group is then
    // contended for the next commit here.
    let mut crossed = false;
    for n in 0..CAS_ATTEMPTS {
        let (how, base) = if n == 0 { kept_base(node, &g).await? } else { (Found::Group, None) };
        crossed |= how == Found::Meta { unchanged: false };
        let base = match base {
            Some(b) => b,
            None => {
                let Some(l) = load(node, &g).await? else { return Err(GroupsError::NotFound("group")) };
                let meta_key = l.meta_kv.stored_key();
                let (meta_revision, verifier, fanout) = (l.meta_kv.mod_revision, l.verifier, l.fanout);
                Base { meta: l.meta, meta_key, meta_revision, verifier, fanout, contended: crossed }
            }
        };
        match attempt(node, t, me, &req, &g, &my_key, base).await {
            Ok(Attempt::Accepted(epoch)) => return Ok(epoch),
            // The kept state was behind the store (another node wrote):
            // try again on what the store holds. A store error is not
            // retried: the write may have landed.
            Ok(Attempt::Lost { .. }) if how == Found::Bet => crossed = true,
            Err(e) if how == Found::Bet && !matches!(e, GroupsError::Store(_)) => crossed = true,
            // Another write landed first. If it moved the epoch, this
            // commit lost: say so with the epoch to catch up to.
            Ok(Attempt::Lost { from_epoch }) => {
                crossed = true;
                if let Some((now, _)) = load_meta(node, &g).await?
                    && now.epoch != from_epoch
                {
                    return Err(GroupsError::WrongEpoch { current: now.epoch });
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(GroupsError::Conflict)
}

/// The base this node kept from its last write to group `g`, if any: a bet
/// with no read, or, while the group is contended, after reading the meta
/// and finding it where that write left it.
async fn kept_base(node: &Node, g: &str) -> Result<(Found, Option<Base>)> {
    let meta_key = node.groups.key(&model::meta_key(g));
    let (found, kept) = match node.verifiers.contended(g) {
        None => return Ok((Found::Group, None)),
        Some(false) => {
            let Some((verifier, w)) = node.verifiers.take_written(g, None) else { return Ok((Found::Group, None)) };
            (Found::Bet, (w.meta, w.meta_revision, verifier, w.fanout))
        }
        Some(true) => {
            let Some((meta, kv)) = load_meta(node, g).await? else { return Err(GroupsError::NotFound("group")) };
            let Some((verifier, w)) = node.verifiers.take_written(g, Some(kv.mod_revision)) else {
                return Ok((Found::Meta { unchanged: false }, None));
            };
            (Found::Meta { unchanged: true }, (meta, kv.mod_revision, verifier, w.fanout))
        }
    };
    crate::metrics::state("written");
    let (meta, meta_revision, verifier, fanout) = kept;
    Ok((found, Some(Base { meta, meta_key, meta_revision, verifier, fanout, contended: false })))
}

/// One try of `req` on `l`.
async fn attempt(
    node: &Node,
    t: &TenantStore,
    me: &Device,
    req: &pb::SendCommitRequest,
    g: &str,
    my_key: &[u8],
    mut l: Base,
) -> Result<Attempt> {
    let is_member = l.meta.member(&me.tenant, &me.account, &me.device).is_some();
    let account_in_group = l.meta.roster.iter().any(|r| r.device.tenant == me.tenant && r.device.account == me.account);
    if !is_member && !account_in_group {
        return Err(GroupsError::NotFound("group"));
    }
    if let Some(until) = frozen_until(&l.meta, now_secs())
        && disputed_by_members(node, g, &l.meta).await?
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
            if Device::of(name) != *me || signature_key.as_slice() != my_key {
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
        admit(node, t, &l.meta.allowed, me, me, my_key).await?;
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
        _ => l.verifier.index_of(&spine_mls::DeviceName::new(&me.tenant, &me.account, &me.device)).unwrap_or(u32::MAX),
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
    entry.removed =
        removed.iter().map(|m| Device::of(&m.name)).filter(|d| !meta.roster.iter().any(|r| &r.device == d)).collect();
    // The epoch this commit leaves stays in its slot (the new one goes
    // to the other) until the next commit, so the commit can be voided
    // if its members dispute it; except when the commit removes a device
    // that no longer exists: that epoch names a deleted account (or a
    // revoked device) and must not be kept, nor brought back.
    let mut removes_gone = false;
    for m in &removed {
        let d = Device::of(&m.name);
        let t = tenant_store(node, t, &d.tenant)?;
        if directory::device(&t, &d.account, &d.device).await?.is_none() {
            removes_gone = true;
            break;
        }
    }
    if meta.epoch != from_epoch + 1 {
        return Err(GroupsError::Internal(format!("a commit from epoch {from_epoch} made epoch {}", meta.epoch)));
    }
    let slot = model::Slot { epoch: meta.epoch, committer_leaf: signer, state: l.verifier.to_bytes() };
    // The slot's revision need not be compared: every write to a slot
    // or a GroupInfo writes the meta too.
    let (mut txn, stored) =
        put_state(node, g, slot, Txn::new().when(Compare::ModRevision(l.meta_key.clone(), l.meta_revision)));
    txn = txn.then(Op::put(node.groups.key(&model::info_key(g, meta.epoch)), req.group_info.clone()));
    if removes_gone {
        txn = txn
            .then(Op::delete(node.groups.key(&model::slot_key(g, from_epoch))))
            .then(Op::delete(node.groups.key(&model::info_key(g, from_epoch))));
    }
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
        txn = txn.then(Op::put(t.key(&model::gm_key(&me.account, &me.device, g)), b"{}".to_vec()));
    }
    meta.next_seq = seq + log.len() as u64;
    txn = txn.then(Op::put(l.meta_key.clone(), json(&meta)));
    // Nothing to deliver (a one-member group, or only the committer
    // left) and nothing pending: the commit advances the fan-out cursor
    // itself, sparing a fan-out pass, and writes no log entry: it would
    // reach no one, and stay until its lease ran out.
    let nothing_to_deliver =
        l.fanout.0 + 1 == seq && log.iter().all(|(_, e)| e.recipients.is_empty() && e.removed.is_empty());
    if nothing_to_deliver {
        let cursor = node.groups.key(&model::fanout_key(g));
        txn = txn
            .when(Compare::ModRevision(cursor.clone(), l.fanout.1))
            .then(Op::put(cursor, json(&model::Counter { n: meta.next_seq - 1 })));
    }
    let out = if nothing_to_deliver {
        node.groups.txn(txn).await?
    } else {
        node.mailbox_lease
            .txn(|lease| {
                let mut txn = txn.clone();
                for (s, e) in &log {
                    txn = txn.then(Op::put_leased(node.groups.key(&model::log_key(g, *s)), json(e), lease));
                }
                txn
            })
            .await?
    };
    if !out.succeeded {
        return Ok(Attempt::Lost { from_epoch });
    }
    tracing::info!(group = %node.rt.redact(g), epoch = meta.epoch, added = added.len(), removed = removed.len(), "commit accepted");
    let fanout = if nothing_to_deliver { (meta.next_seq - 1, out.revision) } else { l.fanout };
    let epoch = meta.epoch;
    let written = verifiers::Written { meta, meta_revision: out.revision, fanout, contended: l.contended };
    node.verifiers.keep(g, l.verifier, stored, Some(written));
    if !nothing_to_deliver {
        spawn_fanout(node, g.to_string());
    }
    Ok(Attempt::Accepted(epoch))
}
