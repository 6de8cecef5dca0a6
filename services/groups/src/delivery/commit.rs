//! SendCommit: verify the commit against the group's public state, check
//! Spine's rules (committer, added devices, policy, consent), and write the
//! new epoch's slot (state and GroupInfo) and log entries in one
//! compare-and-swap.

use super::*;

/// What a commit is tried on: the group's meta, state and fan-out cursor,
/// read from the store or kept from this node's last commit to the group
/// ([`verifiers::Written`]).
struct Base {
    meta: GroupMeta,
    meta_kv: KeyValue,
    verifier: Verifier,
    fanout: (u64, i64),
}

enum Attempt {
    Accepted(u64),
    /// Another write to the group landed first.
    Lost {
        from_epoch: u64,
    },
}

/// Accepts a commit bundle: verified, for the current epoch, within policy,
/// and the one that wins the epoch.
///
/// It is tried first on what this node's last commit to the group wrote,
/// with no read (the transaction holds only if nothing was written since);
/// if that is not kept, or the attempt fails on it, on what the store holds.
pub(crate) async fn commit(node: &Node, t: &TenantStore, me: &Device, req: pb::SendCommitRequest) -> Result<u64> {
    let g = group_id(&req.group_id)?;
    bytes_field("commit", &req.commit)?;
    bytes_field("group_info", &req.group_info)?;
    node.limits.check(crate::config::GroupsRate::Commits, &me.tenant, &me.account, 1.0)?;
    if req.welcome.len() > MAX_MESSAGE_BYTES {
        return Err(invalid("welcome", format!("at most {MAX_MESSAGE_BYTES} bytes")));
    }
    let my_key = node.own_key(t, me).await?;
    let mut kept = node.verifiers.take_written(&g);
    let mut reads = 0;
    loop {
        let (base, from_kept) = match kept.take() {
            Some((verifier, w)) => {
                crate::metrics::state("written");
                (Base { meta: w.meta, meta_kv: w.meta_kv, verifier, fanout: w.fanout }, true)
            }
            None if reads == CAS_ATTEMPTS => return Err(GroupsError::Conflict),
            None => {
                reads += 1;
                let Some(l) = load(node, &g).await? else { return Err(GroupsError::NotFound("group")) };
                (Base { meta: l.meta, meta_kv: l.meta_kv, verifier: l.verifier, fanout: l.fanout }, false)
            }
        };
        match attempt(node, t, me, &req, &g, &my_key, base).await {
            Ok(Attempt::Accepted(epoch)) => return Ok(epoch),
            // If it moved the epoch, this commit lost: say so with the
            // epoch to catch up to.
            Ok(Attempt::Lost { from_epoch }) => {
                if let Some((now, _)) = load_meta(node, &g).await?
                    && now.epoch != from_epoch
                {
                    return Err(GroupsError::WrongEpoch { current: now.epoch });
                }
            }
            // The kept state may be behind the store (another node's
            // commit): what it refused, the store's state decides. A store
            // error is not retried: the write may have landed.
            Err(e) if from_kept && !matches!(e, GroupsError::Store(_)) => {}
            Err(e) => return Err(e),
        }
    }
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
        put_state(node, g, slot, Txn::new().when(Compare::ModRevision(l.meta_kv.stored_key(), l.meta_kv.mod_revision)));
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
    let meta_json = json(&meta);
    txn = txn.then(Op::put(l.meta_kv.stored_key(), meta_json.clone()));
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
    let w = written(&l.meta_kv.stored_key(), Some(&l.meta_kv), meta, meta_json, out.revision, fanout);
    node.verifiers.keep(g, l.verifier, stored, Some(w));
    if !nothing_to_deliver {
        spawn_fanout(node, g.to_string());
    }
    Ok(Attempt::Accepted(epoch))
}
