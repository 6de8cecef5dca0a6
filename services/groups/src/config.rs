//! The `[groups]` configuration section.

use serde::{Deserialize, Serialize};
use spine_runtime::config::Section;
use spine_runtime::rate::{Limit, Rate, RateKind};

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
    /// Memory each node may spend keeping groups' public state between
    /// requests, in MiB, so a group's next commit on the same node need not
    /// restore it from the store (0: none kept). A state over a quarter of
    /// it is never kept.
    pub verifier_cache_mib: u64,
    /// Rate limits per account and per tenant, per node (`[groups.rates]`).
    pub rates: GroupsRates,
}

/// The groups service's rate limits: token buckets `{ per_second, burst }`
/// per account and per tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupsRates {
    /// Group application messages (`SendApplication`).
    pub group_messages: Limit,
    /// Bytes of group application messages.
    pub group_message_bytes: Limit,
    /// Commits (`SendCommit`, `CreateGroup`).
    pub commits: Limit,
    /// Key-package uploads (`UploadKeyPackages` calls).
    pub key_package_uploads: Limit,
    /// Key-package claims: one per target of a `ClaimKeyPackages`.
    pub key_package_claims: Limit,
    /// Disputes reported (`ReportDispute`).
    pub disputes: Limit,
}

impl Default for GroupsRates {
    fn default() -> Self {
        Self {
            group_messages: Limit::new(Rate::new(20.0, 100.0), Rate::new(2000.0, 10_000.0)),
            group_message_bytes: Limit::new(
                Rate::new(1024.0 * 1024.0, 4.0 * 1024.0 * 1024.0),
                Rate::new(64.0 * 1024.0 * 1024.0, 256.0 * 1024.0 * 1024.0),
            ),
            commits: Limit::new(Rate::new(5.0, 30.0), Rate::new(500.0, 2000.0)),
            key_package_uploads: Limit::new(Rate::new(1.0, 10.0), Rate::new(200.0, 1000.0)),
            key_package_claims: Limit::new(Rate::new(2.0, 40.0), Rate::new(500.0, 2000.0)),
            disputes: Limit::new(Rate::new(0.2, 5.0), Rate::new(50.0, 200.0)),
        }
    }
}

/// Which of the groups service's limits a piece of work counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupsRate {
    GroupMessages,
    GroupMessageBytes,
    Commits,
    KeyPackageUploads,
    KeyPackageClaims,
    Disputes,
}

impl RateKind for GroupsRate {
    fn name(self) -> &'static str {
        match self {
            GroupsRate::GroupMessages => "group_messages",
            GroupsRate::GroupMessageBytes => "group_message_bytes",
            GroupsRate::Commits => "commits",
            GroupsRate::KeyPackageUploads => "key_package_uploads",
            GroupsRate::KeyPackageClaims => "key_package_claims",
            GroupsRate::Disputes => "disputes",
        }
    }
}

impl GroupsRates {
    /// The limiter these limits configure.
    pub fn limiter(&self) -> spine_runtime::rate::RateLimits<GroupsRate> {
        spine_runtime::rate::RateLimits::new([
            (GroupsRate::GroupMessages, self.group_messages),
            (GroupsRate::GroupMessageBytes, self.group_message_bytes),
            (GroupsRate::Commits, self.commits),
            (GroupsRate::KeyPackageUploads, self.key_package_uploads),
            (GroupsRate::KeyPackageClaims, self.key_package_claims),
            (GroupsRate::Disputes, self.disputes),
        ])
    }
}

impl Default for GroupsConfig {
    fn default() -> Self {
        Self {
            mailbox_max_entries: 5000,
            mailbox_max_bytes: 16 * 1024 * 1024,
            upkeep_secs: 15,
            verifier_cache_mib: 64,
            rates: GroupsRates::default(),
        }
    }
}

impl Section for GroupsConfig {
    const NAME: &'static str = "groups";
}
