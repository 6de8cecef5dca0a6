//! The `[groups]` configuration section.

use serde::{Deserialize, Serialize};
use spine_runtime::config::Section;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupsConfig {
    /// Most entries a device's mailbox holds unacknowledged. Past it (or
    /// past `mailbox_max_bytes`), application messages for the device are
    /// dropped, and it is told how many; commits, proposals and Welcomes
    /// are always delivered.
    pub mailbox_max_entries: u64,
    /// Most bytes a device's mailbox holds unacknowledged.
    pub mailbox_max_bytes: u64,
    /// How often each node sweeps the groups (unfinished fan-outs, removals
    /// of devices that no longer exist), in seconds.
    pub upkeep_secs: u64,
}

impl Default for GroupsConfig {
    fn default() -> Self {
        Self { mailbox_max_entries: 5000, mailbox_max_bytes: 16 * 1024 * 1024, upkeep_secs: 15 }
    }
}

impl Section for GroupsConfig {
    const NAME: &'static str = "groups";
}
