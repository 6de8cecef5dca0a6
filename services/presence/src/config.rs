//! The `[presence]` configuration section.

use serde::{Deserialize, Serialize};
use spine_runtime::config::Section;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    /// The address other presence nodes reach this one at (`host:port`);
    /// default: the listen address (use the pod IP in Kubernetes).
    pub advertise: Option<String>,
    /// Most watch streams one device may hold open on a node at once (each
    /// up to 256 targets).
    pub max_watches_per_device: usize,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self { advertise: None, max_watches_per_device: 8 }
    }
}

impl Section for PresenceConfig {
    const NAME: &'static str = "presence";
}
