//! What identity stores, and where. Keys are relative to the tenant's root
//! (`/spine/t/<tenant>/`) unless marked as control plane (`/spine/sys/`).
//! `docs/privacy.md` lists each of these with its retention and readers;
//! change both together.

use serde::{Deserialize, Serialize};
use spine_proto::identity::v1 as pb;
use spine_runtime::store::{KeyValue, TenantStore};

use crate::error::{IdentityError, Result};
pub use spine_read_models::directory::{
    DeviceRec, HandleIndex, account_key, device_key, devices_prefix, handle_index_key, settings_key, tenant_key,
};

/// Tenant: `contacts/<account>/<peer>` and `blocks/<account>/<peer>`.
pub fn peers_prefix(list: PeerList, account: &str) -> String {
    format!("{}/{account}/", list.as_str())
}
/// Tenant: `peer-refs/<peer>/<list>.<owner>`: the reverse index of
/// contacts and blocks (who lists `peer`), written with each entry, so an
/// account's deletion finds every list that names it without a scan.
pub fn peer_ref_key(peer: &str, list: PeerList, owner: &str) -> String {
    format!("peer-refs/{peer}/{}.{owner}", list.as_str())
}
pub fn peer_refs_prefix(peer: &str) -> String {
    format!("peer-refs/{peer}/")
}
/// Tenant: `revoked-dev/<account>/<device>`: a device of the account revoked
/// within the last token lifetime (under the revocation lease), for the
/// account's data report; the control-plane revocation entry names no
/// account.
pub fn revoked_device_key(account: &str, device: &str) -> String {
    format!("revoked-dev/{account}/{device}")
}
pub fn revoked_devices_prefix(account: &str) -> String {
    format!("revoked-dev/{account}/")
}
/// Tenant: `handles/<account>/<handle>`.
pub fn handles_prefix(account: &str) -> String {
    format!("handles/{account}/")
}
/// Tenant: `idem/<scope>/<request id>`: the answer to an idempotent write.
/// `scope` is an account id for account-scoped writes, `tenant` otherwise.
pub fn idem_key(scope: &str, request_id: &str) -> String {
    format!("idem/{scope}/{request_id}")
}
pub fn idem_prefix(scope: &str) -> String {
    format!("idem/{scope}/")
}
/// Control plane: `idem/admin/<request id>`.
pub fn admin_idem_key(request_id: &str) -> String {
    format!("idem/admin/{request_id}")
}
/// Tenant: `idem/creds/<request id>`: a credential the tenant issued itself
/// (the answer without its secret).
pub fn creds_idem_key(request_id: &str) -> String {
    format!("idem/creds/{request_id}")
}
/// Tenant: `audit/<time>-<random>`: the tenant's audit log.
pub const AUDIT: &str = "audit/";

/// Contacts or blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerList {
    Contacts,
    Blocks,
}

impl PeerList {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerList::Contacts => "contacts",
            PeerList::Blocks => "blocks",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TenantRec {
    pub display_name: String,
    pub created_at: i64,
    /// Live credentials: changed (compare-and-swap on this record) with every
    /// issue and revocation, so the last one cannot be revoked by two
    /// concurrent requests.
    #[serde(default)]
    pub credentials: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AccountRec {
    pub created_at: i64,
    /// The `request_id` that created it, so deletion also removes that answer.
    #[serde(default)]
    pub request_id: Option<String>,
    /// Live devices; bumped with every registration and revocation so account
    /// deletion can tell whether a device appeared while it ran.
    #[serde(default)]
    pub devices: u32,
    /// Live interop handles, contacts and blocks: changed in the same
    /// transaction (compare-and-swap on this record) as the item, so
    /// concurrent requests cannot overrun their limits.
    #[serde(default)]
    pub handles: u32,
    #[serde(default)]
    pub contacts: u32,
    #[serde(default)]
    pub blocks: u32,
}

impl AccountRec {
    /// The counter of a list.
    pub fn list_count(&mut self, list: PeerList) -> &mut u32 {
        match list {
            PeerList::Contacts => &mut self.contacts,
            PeerList::Blocks => &mut self.blocks,
        }
    }
}

/// A contact or block entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerEntry {
    /// When it was added (Unix seconds).
    pub at: i64,
    /// For a peer of another tenant (an interop handle), the hash standing
    /// for the person behind it (`directory::person`).
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "p")]
    pub person: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandleRec {
    pub allowed: Vec<String>,
    pub created_at: i64,
}

/// A stored record, or INTERNAL naming its key.
pub(crate) fn parse<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Result<T> {
    serde_json::from_slice(&kv.value).map_err(|e| IdentityError::Internal(format!("{}: {e}", kv.key)))
}

/// An account's settings (defaults if never changed) and their revision.
pub(crate) async fn load_settings(store: &TenantStore, account: &str) -> Result<(pb::PrivacySettings, i64)> {
    Ok(spine_read_models::directory::settings(store, account).await?)
}
