//! The directory every service reads: where identity keeps devices,
//! settings and the interop-handle index, and how a handle resolves.
//! Identity writes these; other services only read them, through the same
//! definitions, so the layout lives in one place.

use serde::{Deserialize, Serialize};
use spine_proto::identity::v1::{CrossAppReachability, PrivacySettings};

use spine_runtime::ids::TenantId;
use spine_runtime::secrets::Secrets;
use spine_runtime::store::{KeyValue, StoreError, SystemStore, TenantStore};

/// Tenant: `accounts/<account>`.
pub fn account_key(account: &str) -> String {
    format!("accounts/{account}")
}

/// Tenant: `blocks/<account>/<peer>`, `peer` as [`peer_account`] or
/// [`peer_interop`] render it.
pub fn block_key(account: &str, peer: &str) -> String {
    format!("blocks/{account}/{peer}")
}

/// A peer of the same tenant, as contact and block keys name it.
pub fn peer_account(account: &str) -> String {
    format!("a.{account}")
}

/// A peer of another tenant, by interop reference.
pub fn peer_interop(tenant: &str, handle: &str) -> String {
    format!("i.{tenant}.{handle}")
}

/// Whether `owner` has blocked the account `other` of its own tenant.
pub async fn blocks_account(t: &TenantStore, owner: &str, other: &str) -> Result<bool, StoreError> {
    Ok(t.get(&block_key(owner, &peer_account(other))).await?.is_some())
}

/// Tenant: `devices/<account>/<device>`.
pub fn device_key(account: &str, device: &str) -> String {
    format!("devices/{account}/{device}")
}

pub fn devices_prefix(account: &str) -> String {
    format!("devices/{account}/")
}

/// Tenant: `settings/<account>` (absent until first changed).
pub fn settings_key(account: &str) -> String {
    format!("settings/{account}")
}

/// Control plane: `handles/<handle>`.
pub fn handle_index_key(handle: &str) -> String {
    format!("handles/{handle}")
}

/// Control plane: `tenants/<tenant>`.
pub fn tenant_key(tenant: &str) -> String {
    format!("tenants/{tenant}")
}

/// A registered device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRec {
    /// `SignatureScheme` number.
    pub scheme: i32,
    /// Base64 raw public key.
    pub public_key: String,
    pub created_at: i64,
}

impl DeviceRec {
    /// The raw signature public key.
    pub fn public_key_bytes(&self) -> Option<Vec<u8>> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.decode(&self.public_key).ok()
    }
}

/// The control-plane index entry of an interop handle.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandleIndex {
    pub tenant_id: String,
    pub account_id: String,
    pub allowed: Vec<String>,
}

/// A device's record, if it is registered.
pub async fn device(t: &TenantStore, account: &str, device: &str) -> Result<Option<DeviceRec>, StoreError> {
    Ok(t.get(&device_key(account, device)).await?.and_then(|kv| serde_json::from_slice(&kv.value).ok()))
}

/// Every device of an account: (device id, record).
pub async fn devices(t: &TenantStore, account: &str) -> Result<Vec<(String, DeviceRec)>, StoreError> {
    let mut out = Vec::new();
    for kv in t.range_all(&devices_prefix(account)).await? {
        if let Ok(rec) = serde_json::from_slice(&kv.value) {
            out.push((kv.key.rsplit('/').next().unwrap_or_default().to_string(), rec));
        }
    }
    Ok(out)
}

/// Tenant: `contacts/<account>/<peer>`.
pub fn contact_key(account: &str, peer: &str) -> String {
    format!("contacts/{account}/{peer}")
}

/// Private defaults, for an account that never changed its settings: video
/// on, calls, presence and group adds from contacts, coarse reciprocal
/// last-seen, other apps only for contacts, no auto-answer, do-not-disturb
/// off, group calls not ringing.
pub fn default_settings(account: &str) -> PrivacySettings {
    use spine_proto::identity::v1::{DoNotDisturb, LastSeenGranularity, PresenceVisibility, WhoCanCall};
    PrivacySettings {
        account_id: account.to_string(),
        video_calling_enabled: true,
        who_can_call: WhoCanCall::Contacts as i32,
        presence_visibility: PresenceVisibility::Contacts as i32,
        last_seen: LastSeenGranularity::Coarse as i32,
        last_seen_reciprocal: true,
        cross_app: CrossAppReachability::Contacts as i32,
        auto_answer_hint: false,
        group_call_rings: false,
        do_not_disturb: Some(DoNotDisturb { enabled: false, until: None }),
        updated_at: None,
        who_can_add_to_groups: spine_proto::identity::v1::WhoCanAddToGroups::Contacts as i32,
    }
}

/// An account's settings (defaults if never changed) and the revision of
/// the stored record (0 if none).
pub async fn settings(t: &TenantStore, account: &str) -> Result<(PrivacySettings, i64), StoreError> {
    settings_of(account, t.get(&settings_key(account)).await?)
}

/// An account's settings from its stored record, if any.
fn settings_of(account: &str, stored: Option<KeyValue>) -> Result<(PrivacySettings, i64), StoreError> {
    use prost::Message;
    match stored {
        Some(kv) => {
            let mut s = PrivacySettings::decode(kv.value.as_slice())
                .map_err(|e| StoreError::Backend(format!("stored settings: {e}")))?;
            s.account_id = account.to_string();
            Ok((s, kv.mod_revision))
        }
        None => Ok((default_settings(account), 0)),
    }
}

/// The keyed hash standing for a person (an account of any tenant) in
/// another account's lists: stable whatever handle named the person, so a
/// block follows the person when a handle is revoked or another is used,
/// and naming no one to anyone without the deployment's pseudonym secret.
pub fn person(secrets: &Secrets, tenant: &str, account: &str) -> String {
    secrets.pseudonym("person", &[tenant, account])
}

/// Tenant: `<list>-p/<owner>/<person>`: an other-tenant person `owner`
/// lists (through an interop handle) under `list` (`contacts` or `blocks`),
/// by [`person`], for O(1) checks that survive the handle.
pub fn person_key(list: &str, owner: &str, person: &str) -> String {
    format!("{list}-p/{owner}/{person}")
}

/// Whether `owner` (an account of `t`'s tenant) lists the account `who`
/// (tenant, account) under `list`: by account id within the tenant, by the
/// person hash across tenants.
pub async fn lists(
    secrets: &Secrets,
    t: &TenantStore,
    list: &str,
    owner: &str,
    who: (&str, &str),
) -> Result<bool, StoreError> {
    Ok(t.get(&list_key(secrets, t, list, owner, who)).await?.is_some())
}

/// The key of `who`'s entry in `owner`'s list (see [`lists`]).
fn list_key(secrets: &Secrets, t: &TenantStore, list: &str, owner: &str, who: (&str, &str)) -> String {
    if who.0 == t.tenant().as_str() {
        format!("{list}/{owner}/{}", peer_account(who.1))
    } else {
        person_key(list, owner, &person(secrets, who.0, who.1))
    }
}

/// The tenant-relative prefixes of everything [`consent`] reads about the
/// account it guards: whether it exists, its settings, and its contact and
/// block lists (`contacts` covers `contacts/` and `contacts-p/`, `blocks`
/// likewise). A follower watching these sees every change that can change
/// a consent answer.
pub const CONSENT_PREFIXES: [&str; 4] = ["accounts/", "settings/", "contacts", "blocks"];

/// A change to one of [`CONSENT_PREFIXES`], by the tenant-relative key it
/// wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentChange {
    /// The account whose consent answers may have changed.
    pub account: String,
    /// Its settings changed (rules that read the *asker's* settings, such
    /// as reciprocal last-seen, may have changed too).
    pub settings: bool,
}

/// What a tenant-relative key under [`CONSENT_PREFIXES`] changes, if
/// anything.
pub fn consent_change(rel: &str) -> Option<ConsentChange> {
    let (family, rest) = rel.split_once('/')?;
    if !matches!(family, "accounts" | "settings" | "contacts" | "contacts-p" | "blocks" | "blocks-p") {
        return None;
    }
    let account = rest.split('/').next().filter(|a| !a.is_empty())?;
    Some(ConsentChange { account: account.to_string(), settings: family == "settings" })
}

/// Who a rule lets through: everyone, contacts only, or nobody.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    Everyone,
    Contacts,
    Nobody,
}

/// Whether `from` (tenant, account) may reach `to` (an account of `t`'s
/// tenant) under the rule `who(settings)`: `to` exists, has not blocked
/// `from`, and, from another tenant, its cross-app reach allows it (off:
/// never; contacts: only its interop contacts; handle holders: anyone its
/// handles reached); then `who` decides. Returns `to`'s settings too, for
/// rules of their own (video, do-not-disturb). Refusals are not told
/// apart: every caller answers them as if `to` did not exist.
pub async fn consent(
    secrets: &Secrets,
    t: &TenantStore,
    from: (&str, &str),
    to: &str,
    who: impl Fn(&PrivacySettings) -> Who,
) -> Result<Option<PrivacySettings>, StoreError> {
    // One read of the four records, at one revision.
    let keys = [
        account_key(to),
        settings_key(to),
        list_key(secrets, t, "blocks", to, from),
        list_key(secrets, t, "contacts", to, from),
    ];
    let [exists, stored, blocked, contact]: [Option<KeyValue>; 4] = t
        .get_many(&keys.each_ref().map(String::as_str))
        .await?
        .try_into()
        .map_err(|_| StoreError::Backend("a read of four keys did not answer four".into()))?;
    let s = settings_of(to, stored)?.0;
    let (blocked, contact) = (blocked.is_some(), contact.is_some());
    if exists.is_none() || blocked {
        return Ok(None);
    }
    if from.0 != t.tenant().as_str() {
        let reach = CrossAppReachability::try_from(s.cross_app)
            .ok()
            .filter(|c| *c != CrossAppReachability::Unspecified)
            .unwrap_or(CrossAppReachability::Contacts);
        match reach {
            CrossAppReachability::HandleHolders => {}
            CrossAppReachability::Off => return Ok(None),
            _ if !contact => return Ok(None),
            _ => {}
        }
    }
    let allowed = match who(&s) {
        Who::Everyone => true,
        Who::Contacts => contact,
        Who::Nobody => false,
    };
    Ok(allowed.then_some(s))
}

/// The group-add rule of an account's settings.
pub fn who_can_add(s: &PrivacySettings) -> Who {
    use spine_proto::identity::v1::WhoCanAddToGroups as W;
    match W::try_from(s.who_can_add_to_groups).unwrap_or(W::Contacts) {
        W::Everyone => Who::Everyone,
        W::Nobody => Who::Nobody,
        W::Contacts | W::Unspecified => Who::Contacts,
    }
}

/// The calling rule of an account's settings.
pub fn who_can_call(s: &PrivacySettings) -> Who {
    use spine_proto::identity::v1::WhoCanCall as W;
    match W::try_from(s.who_can_call).unwrap_or(W::Contacts) {
        W::Everyone => Who::Everyone,
        W::Nobody => Who::Nobody,
        W::Contacts | W::Unspecified => Who::Contacts,
    }
}

/// An account's cross-app reachability (the private default if unset).
pub async fn cross_app(t: &TenantStore, account: &str) -> Result<CrossAppReachability, StoreError> {
    use prost::Message;
    let value = match t.get(&settings_key(account)).await? {
        Some(kv) => PrivacySettings::decode(kv.value.as_slice()).map(|s| s.cross_app).unwrap_or(0),
        None => 0,
    };
    Ok(CrossAppReachability::try_from(value)
        .ok()
        .filter(|c| *c != CrossAppReachability::Unspecified)
        .unwrap_or(CrossAppReachability::Contacts))
}

/// Resolves an interop handle for a caller of `caller_tenant`: the target's
/// tenant and account, or `None` if the handle is unknown, revoked, not open
/// to that tenant, or its account has cross-app reach off. Callers must
/// answer all of these alike (NOT_FOUND) and never reveal the account id.
pub async fn resolve_handle(
    sys: &SystemStore,
    handle: &str,
    caller_tenant: &TenantId,
) -> Result<Option<(TenantId, String)>, StoreError> {
    let Some(kv) = sys.get(&handle_index_key(handle)).await? else { return Ok(None) };
    let Ok(idx) = serde_json::from_slice::<HandleIndex>(&kv.value) else { return Ok(None) };
    if !idx.allowed.iter().any(|t| t == caller_tenant.as_str()) {
        return Ok(None);
    }
    let Some(target) = TenantId::parse(&idx.tenant_id) else { return Ok(None) };
    if cross_app(&sys.tenant(&target), &idx.account_id).await? == CrossAppReachability::Off {
        return Ok(None);
    }
    Ok(Some((target, idx.account_id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consent_changes_name_the_account_whose_answers_change() {
        let c = |rel: &str| consent_change(rel).map(|c| (c.account, c.settings));
        assert_eq!(c(&settings_key("ac_1")), Some(("ac_1".into(), true)));
        assert_eq!(c(&account_key("ac_1")), Some(("ac_1".into(), false)));
        assert_eq!(c(&contact_key("ac_1", &peer_account("ac_2"))), Some(("ac_1".into(), false)));
        assert_eq!(c(&block_key("ac_1", &peer_interop("tn_x", "ih_y"))), Some(("ac_1".into(), false)));
        assert_eq!(c(&person_key("contacts", "ac_1", "h")), Some(("ac_1".into(), false)));
        assert_eq!(c(&person_key("blocks", "ac_1", "h")), Some(("ac_1".into(), false)));
        // Every prefix a follower watches starts the keys it parses.
        for rel in [settings_key("a"), account_key("a"), contact_key("a", "p"), person_key("blocks", "a", "h")] {
            assert!(CONSENT_PREFIXES.iter().any(|p| rel.starts_with(p)), "{rel}");
        }
        // Nothing else under the tenant counts, even where a prefix matches.
        assert_eq!(c(&device_key("ac_1", "dv_1")), None);
        assert_eq!(c("contactsx/ac_1"), None);
        assert_eq!(c("settings/"), None);
        assert_eq!(c("mbox/ac_1/dv_1/0"), None);
    }
}
