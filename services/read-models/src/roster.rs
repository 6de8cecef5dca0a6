//! A group's roster, as the groups service keeps it in the group space:
//! the groups service writes it; calls reads it (who may join a group call).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use spine_runtime::store::{SharedSpace, Store, StoreError};

/// The group space (`/spine/g/`): MLS groups span tenants by policy, so
/// they live outside every tenant's silo; their members' mailboxes stay in
/// each member's tenant. The groups service checks membership before it
/// touches a group; calls only reads rosters.
pub fn group_space(store: Arc<dyn Store>) -> SharedSpace {
    SharedSpace::new(store, "g")
}

/// Group space: `<group id hex>/s/meta`, a group's epoch and roster. The
/// groups service writes it; calls reads it (who may join a group call).
pub fn group_meta_key(gid_hex: &str) -> String {
    format!("{gid_hex}/s/meta")
}

/// A member device in a group's roster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RosterDevice {
    pub leaf: u32,
    pub tenant: String,
    pub account: String,
    pub device: String,
}

/// What other services may read of a group's meta record: its epoch and
/// roster (the record holds more, for the groups service alone).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupRoster {
    pub epoch: u64,
    pub roster: Vec<RosterDevice>,
}

impl GroupRoster {
    pub fn member(&self, tenant: &str, account: &str, device: &str) -> Option<&RosterDevice> {
        self.roster.iter().find(|r| r.tenant == tenant && r.account == account && r.device == device)
    }
}

/// A group's epoch and roster, if the group exists.
pub async fn group_roster(g: &SharedSpace, gid_hex: &str) -> Result<Option<GroupRoster>, StoreError> {
    Ok(g.get(&group_meta_key(gid_hex)).await?.and_then(|kv| serde_json::from_slice(&kv.value).ok()))
}
