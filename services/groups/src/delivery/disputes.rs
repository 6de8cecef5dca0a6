//! Disputed commits: members report a commit they cannot process; the
//! first report freezes commits on top of it, and a majority of the other
//! members voids it (the rule and its abuse cases are in docs/api.md).

use super::*;

/// Most disputes a group keeps (every member device may report each of
/// its recent epochs; past this the oldest reports are dropped).
pub(crate) const MAX_DISPUTES: usize = 256;

pub(crate) async fn dispute(node: &Node, me: &Device, req: pb::ReportDisputeRequest) -> Result<()> {
    let g = group_id(&req.group_id)?;
    let c = load_core(node, &g).await?.ok_or(GroupsError::NotFound("group"))?;
    let meta = &c.meta;
    if meta.member(&me.tenant, &me.account, &me.device).is_none() {
        return Err(GroupsError::NotFound("group"));
    }
    if req.epoch == 0 || req.epoch > meta.epoch {
        return Err(invalid("epoch", format!("must name an epoch a commit created (1 to {})", meta.epoch)));
    }
    node.limits.check(crate::config::GroupsRate::Disputes, &me.tenant, &me.account, 1.0)?;
    // The record names the leaf whose commit made the epoch, from its slot
    // while the group keeps it (the current epoch and the one before).
    let committer_leaf = c.committers().find(|(e, _)| *e == req.epoch).map_or(u32::MAX, |(_, leaf)| leaf);
    let record = json(&model::DisputeRecord { committer_leaf });
    // Kept like the group's messages (14 to 15 days, under the mailbox
    // lease), and at most MAX_DISPUTES per group: the oldest go first.
    let existing = node.groups.range_all(&model::disputes_prefix(&g)).await?;
    let excess = (existing.len() + 1).saturating_sub(MAX_DISPUTES);
    node.mailbox_lease
        .txn(|lease| {
            Txn::new().then_all(existing.iter().take(excess).map(|kv| Op::delete(kv.stored_key()))).then(
                Op::put_leased(
                    node.groups.key(&model::dispute_key(&g, req.epoch, &me.tenant, &me.device)),
                    record.clone(),
                    lease,
                ),
            )
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
pub(crate) async fn settle(node: &Node, g: &str) -> Result<()> {
    for _ in 0..CAS_ATTEMPTS {
        let Some(l) = load(node, g).await? else { return Ok(()) };
        let Some(committer) = l.meta.committer.clone() else { return Ok(()) };
        if l.meta.confirmed {
            return Ok(());
        }
        let Some(prev) = &l.prev else { return Ok(()) };
        let prev_roster = epoch_roster(prev)?;
        let voters: Vec<&Device> = prev_roster.iter().map(|r| &r.device).filter(|d| **d != committer).collect();
        let disputed: std::collections::HashSet<String> = node
            .groups
            .range_all(&model::epoch_disputes_prefix(g, l.meta.epoch))
            .await?
            .into_iter()
            .filter_map(|kv| kv.key.rsplit('/').next().map(str::to_string))
            .collect();
        let votes = voters.iter().filter(|d| disputed.contains(&model::gone_id(d))).count();
        if votes * 2 > voters.len() {
            if void(node, g, &l, prev, prev_roster).await? {
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
            .when(Compare::ModRevision(l.meta_kv.stored_key(), l.meta_kv.mod_revision))
            .then(Op::put(l.meta_kv.stored_key(), json(&meta)));
        if node.groups.txn(txn).await?.succeeded {
            return Ok(());
        }
    }
    Err(GroupsError::Conflict)
}

/// The roster of an epoch kept in a slot, from its state.
pub(crate) fn epoch_roster(slot: &model::StoredSlot) -> Result<Vec<RosterEntry>> {
    let v =
        Verifier::from_bytes(&slot.unpack()?.state).map_err(|e| GroupsError::Internal(format!("group state: {e}")))?;
    roster(&v)
}

/// Voids the current epoch's commit: the group goes back to `prev` (its
/// state and GroupInfo stay where they are; the roster comes from that state),
/// the membership index follows, and every device of either roster is told
/// by an ENTRY_KIND_EPOCH_VOIDED entry. `false` if the group changed
/// meanwhile.
pub(crate) async fn void(
    node: &Node,
    g: &str,
    l: &Loaded,
    prev: &model::StoredSlot,
    prev_roster: Vec<RosterEntry>,
) -> Result<bool> {
    let voided_epoch = l.meta.epoch;
    let mut meta = l.meta.clone();
    meta.epoch = prev.epoch;
    meta.roster = prev_roster;
    meta.committer = None;
    meta.confirmed = false;
    meta.disputed_at = None;
    let seq = meta.next_seq;
    meta.next_seq += 1;
    let before: Vec<Device> = meta.roster.iter().map(|r| r.device.clone()).collect();
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
        .when(Compare::ModRevision(l.meta_kv.stored_key(), l.meta_kv.mod_revision))
        .then(Op::put(l.meta_kv.stored_key(), json(&meta)))
        .then(Op::delete(node.groups.key(&model::slot_key(g, voided_epoch))))
        .then(Op::delete(node.groups.key(&model::info_key(g, voided_epoch))))
        .then(Op::delete(node.groups.key(&model::legacy_committer_key(g, voided_epoch))))
        .then(Op::delete_prefix(node.groups.key(&model::epoch_disputes_prefix(g, voided_epoch))));
    let record = model::Voided { committer_leaf: l.slot.committer_leaf, at: now_secs() };
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
        .map(|kv| Op::delete(kv.stored_key()))
        .collect();
    for chunk in ops.chunks(spine_runtime::store::MAX_TXN_OPS) {
        node.groups.txn(Txn::new().then_all(chunk.to_vec())).await?;
    }
    Ok(())
}

/// Whether a device still in the group (not the committer) disputes the
/// current epoch: disputes of devices gone since (an account deleted) no
/// longer hold the group still.
pub(crate) async fn disputed_by_members(node: &Node, g: &str, meta: &GroupMeta) -> Result<bool> {
    let disputes = node.groups.range_all(&model::epoch_disputes_prefix(g, meta.epoch)).await?;
    Ok(disputes.iter().any(|kv| {
        let who = kv.key.rsplit('/').next().unwrap_or_default();
        meta.roster.iter().any(|r| Some(&r.device) != meta.committer.as_ref() && model::gone_id(&r.device) == who)
    }))
}

/// Until when commits on top of the current epoch are refused, if they are:
/// its commit is disputed, not confirmed, and the freeze has not run out.
pub(crate) fn frozen_until(meta: &GroupMeta, now: i64) -> Option<i64> {
    let until = meta.disputed_at? + FREEZE_SECS;
    (!meta.confirmed && meta.committer.is_some() && now < until).then_some(until)
}
