//! Identity's account data: its section of the data report, account
//! deletion across services, and the upkeep that finishes deletions a
//! service could not complete at once.

use async_trait::async_trait;
use spine_proto::common::v1::{DataItem, DataReportSection, Retention, retention};
use spine_proto::identity::v1 as pb;
use spine_runtime::auth::records;
use spine_runtime::data::{self, AccountData, TOMBSTONE_DAYS, Tombstone};
use spine_runtime::now_secs;
use spine_runtime::store::{Compare, Op, TenantStore, Txn};
use spine_runtime::telemetry::redact;
use tonic::Status;

use crate::Node;
use crate::admin::ts;
use crate::error::{IdentityError, Result};
use crate::keys::json;
use crate::model::{self, AccountRec, DeviceRec, HandleRec, PeerList};
use crate::service::{load_settings, parse};
use crate::validate::Peer;

/// Identity's [`AccountData`] hook.
#[derive(Debug, Default)]
pub struct IdentityData;

impl IdentityData {
    pub fn new() -> Self {
        Self
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
        Ok(report(t, account).await?)
    }

    async fn delete(&self, _t: &TenantStore, _account: &str) -> std::result::Result<(), Status> {
        // Identity deletes its data atomically inside DeleteAccount itself.
        Ok(())
    }

    async fn delete_device(&self, _t: &TenantStore, _account: &str, _device: &str) -> std::result::Result<(), Status> {
        // ... and a device's inside RevokeDevice.
        Ok(())
    }
}

async fn report(t: &TenantStore, account: &str) -> Result<DataReportSection> {
    let root = format!("etcd:/spine/t/{}/", t.tenant());
    let mut items = Vec::new();
    if let Some(kv) = t.get(&model::account_key(account)).await? {
        let rec: AccountRec = parse(&kv)?;
        items.push(item(
            "account",
            "The account id and when it was created. No name, phone number or profile.",
            format!("{root}accounts/<account>"),
            until_deleted(),
            vec![format!("{account} created {}", rec.created_at)],
            Some(rec.created_at),
        ));
    }
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
            "video_calling_enabled={} who_can_call={:?} presence_visibility={:?} last_seen={:?} last_seen_reciprocal={} cross_app={:?} auto_answer_hint={} do_not_disturb={} until={:?} group_call_rings={}",
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
        )],
        None,
    ));
    for (list, kind, description) in [
        (PeerList::Contacts, "contact", "Accounts (or other apps' interop references) the account lists as contacts."),
        (PeerList::Blocks, "block", "Accounts (or interop references) the account has blocked."),
    ] {
        let kvs = t.range_all(&model::peers_prefix(list, account)).await?;
        let values = kvs.iter().filter_map(|kv| Peer::from_key(last(&kv.key))).map(|p| p.describe()).collect();
        items.push(item(
            kind,
            description,
            format!("{root}{}/<account>/<peer>", list.as_str()),
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
    let idem = t.range_all(&model::idem_prefix(account)).await?;
    items.push(item(
        "idempotency_answer",
        "The answers to retried writes (a device or handle just created), so a retry gets the same answer.",
        format!("{root}idem/<account>/<request id>"),
        Some(Retention { kind: Some(retention::Kind::MaxAgeSeconds(model::IDEMPOTENCY_TTL_SECS as i64 + 3600)) }),
        idem.iter().map(|kv| last(&kv.key).to_string()).collect(),
        None,
    ));
    Ok(DataReportSection { service: "identity".into(), items })
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
        let handles: Vec<String> =
            t.range_all(&model::handles_prefix(account)).await?.iter().map(|kv| last(&kv.key).to_string()).collect();
        let tomb = Tombstone { deleted_at: now_secs(), done: vec!["identity".into()] };
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
                    .then(Op::delete_prefix(t.key(&model::peers_prefix(PeerList::Contacts, account))))
                    .then(Op::delete_prefix(t.key(&model::peers_prefix(PeerList::Blocks, account))))
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
            tracing::info!(account = %redact(account), devices = devices.len(), "account deleted");
            finish_for(node, t, account).await;
            return Ok(());
        }
    }
    Err(IdentityError::Conflict)
}

/// Runs every other service's deletion for an account and records which
/// finished; what fails is retried by [`finish_deletions`].
async fn finish_for(node: &Node, t: &TenantStore, account: &str) {
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
                tracing::warn!(service = holder.service(), error = %e.message(), account = %redact(account), "deletion incomplete; will retry")
            }
        }
    }
}

/// Upkeep: finishes pending deletions and drops tombstones past their time.
pub(crate) async fn finish_deletions(node: &Node) -> Result<()> {
    let sys = node.rt.system_store();
    let services: Vec<&'static str> = node.rt.account_data().iter().map(|h| h.service()).collect();
    for tenant in sys.tenant_ids().await? {
        let t = sys.tenant_for_maintenance(&tenant);
        for tk in t.range_all(data::TOMBSTONES).await? {
            let Ok(tomb) = serde_json::from_slice::<Tombstone>(&tk.value) else { continue };
            let account = last(&tk.key).to_string();
            if tomb.deleted_at + TOMBSTONE_DAYS * 86_400 < now_secs() {
                t.txn(Txn::new().then(Op::delete(tk.key.clone()))).await?;
            } else if services.iter().any(|s| !tomb.done.iter().any(|d| d == s)) {
                finish_for(node, &t, &account).await;
            }
        }
    }
    Ok(())
}
