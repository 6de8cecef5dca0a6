//! What identity stores, and where. Keys are relative to the tenant's root
//! (`/spine/t/<tenant>/`) unless marked as control plane (`/spine/sys/`).
//! `docs/privacy.md` lists each of these with its retention and readers;
//! change both together.

use serde::{Deserialize, Serialize};
pub use spine_runtime::directory::{
    DeviceRec, HandleIndex, account_key, device_key, devices_prefix, handle_index_key, settings_key, tenant_key,
};

/// Tenant: `contacts/<account>/<peer>` and `blocks/<account>/<peer>`.
pub fn peers_prefix(list: PeerList, account: &str) -> String {
    format!("{}/{account}/", list.as_str())
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccountRec {
    pub created_at: i64,
    /// The `request_id` that created it, so deletion also removes that answer.
    #[serde(default)]
    pub request_id: Option<String>,
    /// Live devices; bumped with every registration and revocation so account
    /// deletion can tell whether a device appeared while it ran.
    #[serde(default)]
    pub devices: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandleRec {
    pub allowed: Vec<String>,
    pub created_at: i64,
}

/// A stored answer to an idempotent write.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdemRec {
    /// Hex SHA-256 of the encoded request.
    pub fingerprint: String,
    /// Base64 of the encoded response.
    pub response: String,
    pub created_at: i64,
}

/// How long idempotency answers are kept.
pub const IDEMPOTENCY_TTL_SECS: u64 = 24 * 3600;
