//! The groups service's account data: its section of the data report, and
//! deletion (key packages, mailboxes, memberships, with a Remove proposal to
//! every group a deleted device was in).

use std::sync::Weak;

use async_trait::async_trait;
use spine_proto::common::v1::{DataItem, DataReportSection, Retention, retention};
use spine_runtime::data::AccountData;
use spine_runtime::store::{Op, TenantStore, Txn};
use tonic::Status;

use crate::Node;
use crate::error::GroupsError;
use crate::model::{self, Device, GroupMeta, LogEntry, RosterEntry, parse};

pub(crate) struct GroupsData(pub(crate) Weak<Node>);

fn item(
    kind: &str,
    description: &str,
    location: &str,
    retention: Retention,
    values: Vec<String>,
    readers: &str,
) -> DataItem {
    DataItem {
        kind: kind.into(),
        description: description.into(),
        location: location.into(),
        retention: Some(retention),
        count: values.len() as u64,
        values,
        readers: readers.into(),
        oldest: None,
    }
}

fn until_deleted() -> Retention {
    Retention { kind: Some(retention::Kind::UntilAccountDeleted(true)) }
}

fn max_age(secs: u64) -> Retention {
    Retention { kind: Some(retention::Kind::MaxAgeSeconds(secs as i64)) }
}

/// `<kind>/<account>/<device>/<rest>` -> (device, rest).
fn split(t: &TenantStore, key: &str) -> (String, String) {
    let rel = t.relative(key);
    let mut parts = rel.splitn(4, '/');
    let _ = (parts.next(), parts.next());
    (parts.next().unwrap_or_default().to_string(), parts.next().unwrap_or_default().to_string())
}

impl GroupsData {
    fn node(&self) -> Result<std::sync::Arc<Node>, Status> {
        self.0.upgrade().ok_or_else(|| spine_runtime::error::draining("groups service stopping"))
    }
}

#[async_trait]
impl AccountData for GroupsData {
    fn service(&self) -> &'static str {
        "groups"
    }

    async fn report(&self, t: &TenantStore, account: &str) -> Result<DataReportSection, Status> {
        let node = self.node()?;
        Ok(report(&node, t, account).await?)
    }

    async fn delete(&self, t: &TenantStore, account: &str) -> Result<(), Status> {
        let node = self.node()?;
        let gm = t.range_all(&model::gm_account_prefix(account)).await.map_err(GroupsError::from)?;
        // Every group is tried, whatever fails: a group that refuses the
        // removal proposal must not keep the rest of the data.
        let mut failed = None;
        for kv in &gm {
            let (device, g) = split(t, &kv.key);
            let d = Device { tenant: t.tenant().to_string(), account: account.to_string(), device };
            if let Err(e) = crate::delivery::propose_removal(&node, &g, &d).await {
                failed = Some(e);
            }
            if let Err(e) = crate::delivery::forget_disputes(&node, &g, &d).await {
                failed = Some(e);
            }
        }
        let mut txn = Txn::new();
        for p in model::account_prefixes(account) {
            txn = txn.then(Op::delete_prefix(t.key(&p)));
        }
        t.txn(txn).await.map_err(GroupsError::from)?;
        match failed {
            // Retried from the tombstone: the removal is proposed again by
            // the upkeep anyway, which finds the device gone.
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    async fn delete_device(&self, t: &TenantStore, account: &str, device: &str) -> Result<(), Status> {
        let node = self.node()?;
        let prefix = format!("gm/{account}/{device}/");
        let gm = t.range_all(&prefix).await.map_err(GroupsError::from)?;
        let mut failed = None;
        for kv in &gm {
            let (_, g) = split(t, &kv.key);
            let d = Device { tenant: t.tenant().to_string(), account: account.to_string(), device: device.to_string() };
            if let Err(e) = crate::delivery::propose_removal(&node, &g, &d).await {
                failed = Some(e);
            }
        }
        // The membership index stays until the removal is committed (the
        // fan-out of that commit drops it), so the account's data report
        // keeps listing the groups that still name the revoked device.
        let txn = Txn::new()
            .then(Op::delete_prefix(t.key(&model::kp_prefix(account, device))))
            .then(Op::delete(t.key(&model::kpl_key(account, device))))
            .then(Op::delete_prefix(t.key(&model::mbox_prefix(account, device))))
            .then(Op::delete(t.key(&model::mbox_head_key(account, device))))
            .then(Op::delete_prefix(t.key(&format!("mbox-grp/{account}/{device}/"))));
        t.txn(txn).await.map_err(GroupsError::from)?;
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

/// Everything groups stores about an account: its key packages, mailbox
/// and delivery cursors in its tenant, and in the group space, for each
/// group one of its devices is in (or was, until the removal is committed):
/// the roster, public state and GroupInfo naming it, log entries still to
/// be delivered that are addressed to or name its devices, the epochs its
/// devices committed, the disputes they filed, and removal markers.
async fn report(node: &Node, t: &TenantStore, account: &str) -> Result<DataReportSection, GroupsError> {
    let kps = t.range_all(&model::kp_account_prefix(account)).await?;
    let kpl = t.range_all(&model::kpl_account_prefix(account)).await?;
    let mbox = t.range_all(&format!("mbox/{account}/")).await?;
    let heads = t.range_all(&format!("mbox-head/{account}/")).await?;
    let cursors = t.range_all(&format!("mbox-grp/{account}/")).await?;
    let gm = t.range_all(&model::gm_account_prefix(account)).await?;
    let root = format!("etcd:/spine/t/{}/", t.tenant());
    let tenant = t.tenant().as_str();
    let identity_prefix = format!("spine/v1/{tenant}/{account}/");
    let (mut memberships, mut log_entries, mut committed, mut disputes, mut gone) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut previous = Vec::new();
    let mut groups: Vec<String> = gm.iter().map(|kv| split(t, &kv.key).1).collect();
    groups.sort();
    groups.dedup();
    for g in &groups {
        let Some(meta) = node.groups.get(&model::meta_key(g)).await? else { continue };
        let meta: GroupMeta = parse(&meta)?;
        let mine: Vec<&RosterEntry> =
            meta.roster.iter().filter(|r| r.device.tenant == tenant && r.device.account == account).collect();
        for r in &mine {
            memberships.push(format!(
                "device {} in group {g} at leaf {} (epoch {}, {} member devices)",
                r.device.device,
                r.leaf,
                meta.epoch,
                meta.roster.len()
            ));
        }
        if let Some((epoch, roster)) = crate::delivery::previous_epoch(node, g).await? {
            for r in roster.iter().filter(|r| r.device.tenant == tenant && r.device.account == account) {
                previous.push(format!("device {} in group {g}'s epoch {epoch} at leaf {}", r.device.device, r.leaf));
            }
        }
        for kv in node.groups.range_all(&model::log_prefix(g)).await? {
            let e: LogEntry = parse(&kv)?;
            let addressed = e.recipients.iter().any(|d| d.tenant == tenant && d.account == account);
            let named = model::unb64(&e.message)
                .is_ok_and(|m| m.windows(identity_prefix.len()).any(|w| w == identity_prefix.as_bytes()));
            if addressed || named {
                let seq = node.groups.relative(&kv.key).rsplit('/').next().unwrap_or_default().trim_start_matches('0');
                log_entries.push(format!("group {g} entry {seq} (epoch {}, kind {})", e.epoch, e.kind));
            }
        }
        // Who committed an epoch is kept in its slot (the current epoch and
        // the one before), in disputes of it, and, for groups committed to
        // before disputes named it, in the legacy committers keys.
        let mut committers = crate::delivery::epoch_committers(node, g).await?;
        for kv in node.groups.range_all(&model::disputes_prefix(g)).await? {
            let epoch = node.groups.relative(&kv.key).split('/').nth(2).and_then(|e| e.parse::<u64>().ok());
            let leaf = model::DisputeRecord::committer_of(&kv.value);
            committers.extend(epoch.map(|e| (e, leaf)));
        }
        for kv in node.groups.range_all(&model::legacy_committers_prefix(g)).await? {
            let epoch = node.groups.relative(&kv.key).rsplit('/').next().and_then(|e| e.parse::<u64>().ok());
            committers.extend(epoch.map(|e| (e, model::legacy_committer_of(&kv.value))));
        }
        committers.sort_unstable();
        committers.dedup();
        for (epoch, leaf) in committers {
            if mine.iter().any(|r| r.leaf == leaf) {
                committed.push(format!("group {g} epoch {epoch} committed by leaf {leaf}"));
            }
        }
        for kv in node.groups.range_all(&model::voided_prefix(g)).await? {
            let v: model::Voided = parse(&kv)?;
            if mine.iter().any(|r| r.leaf == v.committer_leaf) {
                let epoch =
                    node.groups.relative(&kv.key).rsplit('/').next().unwrap_or_default().trim_start_matches('0');
                committed.push(format!("group {g} epoch {epoch} committed by leaf {}, voided", v.committer_leaf));
            }
        }
        for kv in node.groups.range_all(&model::disputes_prefix(g)).await? {
            let rel = node.groups.relative(&kv.key);
            let who = rel.rsplit('/').next().unwrap_or_default();
            if mine.iter().any(|r| model::gone_id(&r.device) == who) {
                disputes.push(format!("group {g}: {rel}"));
            }
        }
        for kv in node.groups.range_all(&model::gone_prefix(g)).await? {
            let who = node.groups.relative(&kv.key).rsplit('/').next().unwrap_or_default().to_string();
            if mine.iter().any(|r| model::gone_id(&r.device) == who) {
                gone.push(format!("group {g}: {who} gone since {}", String::from_utf8_lossy(&kv.value)));
            }
        }
    }
    let gspace = "etcd:/spine/g/<group>";
    let items = vec![
        item(
            "key_package",
            "MLS key packages the account's devices uploaded for others to add them to groups (public keys only); single-use ones are deleted when claimed.",
            &format!("{root}kp/<account>/<device>/<ref> and {root}kpl/<account>/<device>"),
            max_age(crate::MAX_KEY_PACKAGE_LIFETIME_SECS),
            kps.iter()
                .map(|kv| format!("device {} package {}", split(t, &kv.key).0, split(t, &kv.key).1))
                .chain(kpl.iter().map(|kv| {
                    format!("device {} last-resort package", t.relative(&kv.key).rsplit('/').next().unwrap_or_default())
                }))
                .collect(),
            "the service; anyone allowed to add the account to a group claims one",
        ),
        item(
            "mailbox_entry",
            "MLS messages (encrypted application messages, commits, proposals, Welcomes) waiting for the account's devices to fetch and acknowledge them. Spine cannot read application messages.",
            &format!("{root}mbox/<account>/<device>/<seq>"),
            max_age(crate::MAILBOX_RETENTION_SECS),
            mbox.iter()
                .map(|kv| {
                    format!("device {} entry {}", split(t, &kv.key).0, split(t, &kv.key).1.trim_start_matches('0'))
                })
                .collect(),
            "the device it is for",
        ),
        item(
            "mailbox_cursor",
            "Each device's next mailbox sequence number, and per group the last group message delivered to it.",
            &format!("{root}mbox-head/<account>/<device> and {root}mbox-grp/<account>/<device>/<group>"),
            until_deleted(),
            heads
                .iter()
                .map(|kv| format!("device {} next entry", t.relative(&kv.key).rsplit('/').next().unwrap_or_default()))
                .chain(cursors.iter().map(|kv| {
                    let (d, g) = split(t, &kv.key);
                    format!("device {d} group {g}")
                }))
                .collect(),
            "Spine only",
        ),
        item(
            "group_membership",
            "Which MLS groups the account's devices are in: the membership index in its tenant, and in each group the roster (tenant, account and device ids and leaf index of every member), the public MLS state (ratchet tree with each member's credential and public keys, no secret) and the current GroupInfo, all naming its devices. A revoked or deleted device stays in them until a member commits its removal, which Spine proposes; a group that never does is deleted after 14 days.",
            &format!(
                "{root}gm/<account>/<device>/<group>, {gspace}/s/meta and the current epoch's {gspace}/s/slot/<0|1> and {gspace}/info/<0|1>"
            ),
            until_deleted(),
            memberships,
            "the account's devices; the group's member devices (roster, state and GroupInfo)",
        ),
        item(
            "previous_epoch",
            "The epoch before the current one of each group the account's devices were in: its public MLS state and GroupInfo (and so its roster), naming them, kept until the next commit, or until a member other than the committer writes in the current epoch, so the group's members can have the current one voided (docs/api.md, \"A forked epoch\").",
            &format!("the other {gspace}/s/slot/<0|1> and {gspace}/info/<0|1>"),
            until_deleted(),
            previous,
            "Spine only, until a voiding makes it the group's state again",
        ),
        item(
            "group_log_entry",
            "Group messages not yet delivered to every recipient that are addressed to the account's devices or name them (a commit adding one, its own commits and proposals); each is dropped from the log once delivered.",
            &format!("{gspace}/log/<seq>"),
            max_age(crate::MAILBOX_RETENTION_SECS),
            log_entries,
            "the service, to deliver them",
        ),
        item(
            "committed_epoch",
            "The leaf index of the member that committed an epoch, kept for the group's current epoch and the one before (in their slots), for an epoch a member disputed (in the dispute: see `dispute`), and for a voided commit: these are the epochs the account's devices committed (from the leaf each holds now), and the commits of theirs the group's members had voided. Groups committed to before disputes named the committer may still hold every epoch's committer until upkeep deletes them.",
            &format!("{gspace}/s/slot/<parity> and {gspace}/voided/<epoch> (before: {gspace}/committers/<epoch>)"),
            until_deleted(),
            committed,
            "the group's member devices (GetGroup, with disputes)",
        ),
        item(
            "dispute",
            "Commits the account's devices reported as unprocessable (ReportDispute): group, epoch, the reporting device, and the leaf that committed the epoch when Spine still kept it.",
            &format!("{gspace}/disputes/<epoch>/<tenant>.<device>"),
            until_deleted(),
            disputes,
            "the group's member devices",
        ),
        item(
            "removal_pending",
            "A device of the account that no longer exists (revoked) but is still in a group's roster: when Spine first noticed, to delete the group if no member commits the removal within 14 days.",
            &format!("{gspace}/gone/<tenant>.<device>"),
            max_age(crate::delivery::GONE_RETENTION_SECS as u64),
            gone,
            "Spine only",
        ),
    ];
    Ok(DataReportSection { service: "groups".into(), items })
}
