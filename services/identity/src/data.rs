//! Identity's account data: its section of the data report, account
//! deletion across services, and the upkeep that finishes deletions a
//! service could not complete at once.

use async_trait::async_trait;
use spine_proto::common::v1::{DataItem, DataReportSection, Retention, retention};
use spine_proto::identity::v1 as pb;
use spine_read_models::directory;
use spine_runtime::auth::records;
use spine_runtime::data::{self, AccountData, TOMBSTONE_DAYS, Tombstone};
use spine_runtime::now_secs;
use spine_runtime::store::{Compare, Op, SystemStore, TenantStore, Txn};
use tonic::Status;

use crate::Node;
use crate::credentials::{self, ts};
use crate::error::{IdentityError, Result};
use crate::keys::json;
use crate::model::{self, AccountRec, DeviceRec, HandleRec, PeerList, TenantRec};
use crate::model::{load_settings, parse};
use crate::validate::Peer;

mod deletion;

pub(crate) use deletion::*;

/// Identity's [`AccountData`] hook.
#[derive(Debug)]
pub struct IdentityData {
    sys: SystemStore,
    /// How long a device revocation is kept: the longest token lifetime,
    /// clock skew and the revocation lease's renewal period.
    revocation_secs: i64,
}

impl IdentityData {
    pub fn new(sys: SystemStore, revocation_secs: i64) -> Self {
        Self { sys, revocation_secs }
    }
}

fn until_deleted() -> Option<Retention> {
    Some(Retention { kind: Some(retention::Kind::UntilAccountDeleted(true)) })
}

fn item(
    kind: &str,
    description: &str,
    location: String,
    retention: Option<Retention>,
    values: Vec<String>,
    oldest: Option<i64>,
) -> DataItem {
    DataItem {
        kind: kind.into(),
        description: description.into(),
        location,
        retention,
        count: values.len() as u64,
        values,
        readers: "the account's own devices and its tenant's servers".into(),
        oldest: oldest.and_then(ts),
    }
}

fn last(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

#[async_trait]
impl AccountData for IdentityData {
    fn service(&self) -> &'static str {
        "identity"
    }

    async fn report(&self, t: &TenantStore, account: &str) -> std::result::Result<DataReportSection, Status> {
        Ok(report(t, account, self.revocation_secs).await?)
    }

    async fn delete(&self, t: &TenantStore, account: &str) -> std::result::Result<(), Status> {
        // DeleteAccount removed the account, its devices, settings, handles
        // and answers atomically; what is left are the contact and block
        // lists that name it, its own and other accounts'.
        Ok(delete_lists(&self.sys, t, account).await?)
    }

    async fn delete_device(&self, _t: &TenantStore, _account: &str, _device: &str) -> std::result::Result<(), Status> {
        // ... and a device's inside RevokeDevice.
        Ok(())
    }
}

async fn report(t: &TenantStore, account: &str, revocation_secs: i64) -> Result<DataReportSection> {
    let root = format!("etcd:/spine/t/{}/", t.tenant());
    let mut items = Vec::new();
    if let Some(kv) = t.get(&model::account_key(account)).await? {
        let rec: AccountRec = parse(&kv)?;
        items.push(item(
            "account",
            "The account id, when it was created, the idempotency key (`request_id`) of the request that \
             created it, and how many devices it has. No name, phone number or profile.",
            format!("{root}accounts/<account>"),
            until_deleted(),
            vec![format!(
                "{account} created {} by request {} with {} device(s)",
                rec.created_at,
                rec.request_id.as_deref().unwrap_or("-"),
                rec.devices
            )],
            Some(rec.created_at),
        ));
    }
    let revoked = t.range_all(&model::revoked_devices_prefix(account)).await?;
    let mut it = item(
        "revoked_device",
        "Devices of the account revoked within the last token lifetime: every node refuses their tokens until \
         the tokens would have expired anyway. The control-plane entry holds the tenant and device id only.",
        format!("{root}revoked-dev/<account>/<device> and etcd:/spine/sys/auth/revoked/<tenant>/<device>"),
        Some(Retention { kind: Some(retention::Kind::MaxAgeSeconds(revocation_secs)) }),
        revoked.iter().map(|kv| last(&kv.key).to_string()).collect(),
        None,
    );
    it.readers = "every Spine node (to refuse the device's tokens)".into();
    items.push(it);
    let devices = t.range_all(&model::devices_prefix(account)).await?;
    let mut oldest = None;
    let mut values = Vec::new();
    for kv in &devices {
        let d: DeviceRec = parse(kv)?;
        oldest = Some(oldest.map_or(d.created_at, |o: i64| o.min(d.created_at)));
        values.push(format!("{} (signature key {}) created {}", last(&kv.key), d.public_key, d.created_at));
    }
    items.push(item(
        "device",
        "Each device's id, the public signature key of its MLS credential, and when it was registered.",
        format!("{root}devices/<account>/<device>"),
        until_deleted(),
        values,
        oldest,
    ));
    let (s, _) = load_settings(t, account).await?;
    let dnd = s.do_not_disturb.unwrap_or_default();
    items.push(item(
        "settings",
        "Privacy settings (defaults until first changed).",
        format!("{root}settings/<account>"),
        until_deleted(),
        vec![format!(
            "video_calling_enabled={} who_can_call={:?} presence_visibility={:?} last_seen={:?} last_seen_reciprocal={} cross_app={:?} auto_answer_hint={} do_not_disturb={} until={:?} group_call_rings={} who_can_add_to_groups={:?}",
            s.video_calling_enabled,
            pb::WhoCanCall::try_from(s.who_can_call).unwrap_or_default(),
            pb::PresenceVisibility::try_from(s.presence_visibility).unwrap_or_default(),
            pb::LastSeenGranularity::try_from(s.last_seen).unwrap_or_default(),
            s.last_seen_reciprocal,
            pb::CrossAppReachability::try_from(s.cross_app).unwrap_or_default(),
            s.auto_answer_hint,
            dnd.enabled,
            dnd.until.map(|u| u.seconds),
            s.group_call_rings,
            pb::WhoCanAddToGroups::try_from(s.who_can_add_to_groups).unwrap_or_default(),
        )],
        None,
    ));
    for (list, kind, description) in [
        (
            PeerList::Contacts,
            "contact",
            "Accounts (or other apps' interop references) the account lists as contacts, each with the time it \
             was added, an entry in the tenant's reverse index (so deleting either account finds it) and, for \
             another app's person, a keyed hash standing for that person.",
        ),
        (
            PeerList::Blocks,
            "block",
            "Accounts (or interop references) the account has blocked, with the time, a reverse-index entry and, \
             for another app's person, a keyed hash standing for that person (so the block holds whatever \
             handle names them).",
        ),
    ] {
        let kvs = t.range_all(&model::peers_prefix(list, account)).await?;
        let values = kvs.iter().filter_map(|kv| Peer::from_key(last(&kv.key))).map(|p| p.describe()).collect();
        items.push(item(
            kind,
            description,
            format!("{root}{l}/<account>/<peer> and {root}peer-refs/<peer>/{l}.<account>", l = list.as_str()),
            until_deleted(),
            values,
            None,
        ));
    }
    let handles = t.range_all(&model::handles_prefix(account)).await?;
    let mut values = Vec::new();
    for kv in &handles {
        let h: HandleRec = parse(kv)?;
        values.push(format!("{} reachable from {} created {}", last(&kv.key), h.allowed.join(","), h.created_at));
    }
    let mut it = item(
        "interop_handle",
        "Interop handles and the tenants each is open to; an index entry per handle lets other tenants resolve it.",
        format!("{root}handles/<account>/<handle> and etcd:/spine/sys/handles/<handle>"),
        until_deleted(),
        values,
        None,
    );
    it.readers =
        "the account's devices and tenant servers; callers of the named tenants resolve it to a reference only".into();
    items.push(it);
    let mut idem: Vec<String> =
        t.range_all(&model::idem_prefix(account)).await?.iter().map(|kv| last(&kv.key).to_string()).collect();
    if let Some(rid) = t
        .get(&model::account_key(account))
        .await?
        .and_then(|kv| parse::<AccountRec>(&kv).ok())
        .and_then(|r| r.request_id)
        && t.get(&model::idem_key("tenant", &rid)).await?.is_some()
    {
        idem.push(format!("{rid} (the account's creation)"));
    }
    items.push(item(
        "idempotency_answer",
        "The answers to retried writes (the account, a device or a handle just created: ids and times), \
         so a retry gets the same answer.",
        format!("{root}idem/<account>/<request_id> and {root}idem/tenant/<request_id>"),
        Some(Retention {
            kind: Some(retention::Kind::MaxAgeSeconds(spine_runtime::idempotency::TTL_SECS as i64 + 3600)),
        }),
        idem,
        None,
    ));
    Ok(DataReportSection { service: "identity".into(), items })
}

/// What identity stores about a tenant itself: its record, its
/// credentials (ids, labels, times; never secrets or their hashes), its
/// audit log, tenant-wide idempotency answers and deletion tombstones.
pub(crate) async fn tenant_report(sys: &SystemStore, t: &TenantStore) -> Result<DataReportSection> {
    let tenant = t.tenant();
    let root = format!("etcd:/spine/t/{tenant}/");
    let mut items = Vec::new();
    if let Some(kv) = sys.get(&model::tenant_key(tenant.as_str())).await? {
        let rec: TenantRec = parse(&kv)?;
        let mut it = item(
            "tenant",
            "The tenant's id, display name, creation time and how many credentials it holds.",
            format!("etcd:/spine/sys/tenants/{tenant}"),
            None,
            vec![format!(
                "{tenant} \"{}\" created {} credentials {}",
                rec.display_name, rec.created_at, rec.credentials
            )],
            Some(rec.created_at),
        );
        it.readers = "Spine's operators; the tenant's servers".into();
        items.push(it);
    }
    let creds = credentials::list(sys, tenant).await?;
    let mut it = item(
        "tenant_credential",
        "Each credential's id, label and creation time, and a SHA-256 hash of its secret (never the secret).",
        "etcd:/spine/sys/auth/tenant-creds/<credential>".into(),
        None,
        creds
            .iter()
            .map(|c| format!("{} \"{}\" created {}", c.credential_id, c.label, c.created_at.map_or(0, |t| t.seconds)))
            .collect(),
        None,
    );
    it.readers =
        "every Spine node (the hash, to verify requests); operators and the tenant's servers see ids and labels".into();
    items.push(it);
    let events = credentials::audit_all(t).await?;
    let mut it = item(
        "audit_event",
        "Every action on the tenant's credentials: what was done, by whom (an operator or tenant credential id), when.",
        format!("{root}audit/<time>-<random>"),
        Some(Retention { kind: Some(retention::Kind::MaxAgeSeconds(credentials::AUDIT_RETENTION_SECS)) }),
        events
            .iter()
            .map(|e| {
                format!(
                    "{:?} by {} {} on {} at {}",
                    pb::AuditAction::try_from(e.action).unwrap_or_default(),
                    e.actor_kind,
                    e.actor_id,
                    e.credential_id,
                    e.at.map_or(0, |t| t.seconds)
                )
            })
            .collect(),
        None,
    );
    it.readers = "the tenant's servers (append-only: no method changes or deletes an event)".into();
    items.push(it);
    let mut idem = t.range_all("idem/tenant/").await?;
    idem.extend(t.range_all("idem/creds/").await?);
    let mut it = item(
        "tenant_idempotency_answer",
        "Answers to the tenant servers' retried creates (an account or a credential just created; never a secret).",
        format!("{root}idem/tenant/<request_id>, {root}idem/creds/<request_id>"),
        Some(Retention {
            kind: Some(retention::Kind::MaxAgeSeconds(spine_runtime::idempotency::TTL_SECS as i64 + 3600)),
        }),
        idem.iter().map(|kv| t.relative(&kv.key).to_string()).collect(),
        None,
    );
    it.readers = "Spine only (replayed to a retry of the same request)".into();
    items.push(it);
    let tombs = t.range_all(data::TOMBSTONES).await?;
    let mut it = item(
        "deletion_tombstone",
        "Accounts deleted in the last 7 days, when, and which services have finished deleting their data.",
        format!("{root}deleted/<account>"),
        Some(Retention { kind: Some(retention::Kind::MaxAgeSeconds(TOMBSTONE_DAYS * 86_400)) }),
        tombs.iter().map(|kv| last(&kv.key).to_string()).collect(),
        None,
    );
    it.readers = "Spine only (every service finishes the deletion from it)".into();
    items.push(it);
    Ok(DataReportSection { service: "identity".into(), items })
}
