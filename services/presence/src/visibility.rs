//! Who may see whose presence, and how precisely.

use spine_proto::identity::v1::{LastSeenGranularity, PresenceVisibility};
use spine_read_models::directory;
use spine_runtime::Runtime;
use spine_runtime::ids::TenantId;
use spine_runtime::store::StoreError;

/// An account: (tenant, account).
pub type AccountKey = (String, String);

pub fn key_str(k: &AccountKey) -> String {
    format!("{}/{}", k.0, k.1)
}

/// How much of a target a watcher may see, if anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub last_seen: LastSeenGranularity,
}

fn rank(g: LastSeenGranularity) -> u8 {
    match g {
        LastSeenGranularity::Unspecified | LastSeenGranularity::Hidden => 0,
        LastSeenGranularity::Coarse => 1,
        LastSeenGranularity::Hour => 2,
        LastSeenGranularity::Exact => 3,
    }
}

/// What `watcher` may see of `target`: `None` is the same as for an account
/// that does not exist.
pub async fn view(
    rt: &Runtime,
    secrets: &spine_runtime::secrets::Secrets,
    watcher: &AccountKey,
    target: &AccountKey,
) -> Result<Option<View>, StoreError> {
    if watcher == target {
        return Ok(Some(View { last_seen: LastSeenGranularity::Exact }));
    }
    let sys = rt.system_store();
    let Some(target_tenant) = TenantId::parse(&target.0) else { return Ok(None) };
    let t = sys.tenant(&target_tenant);
    let rule =
        |s: &spine_proto::identity::v1::PrivacySettings| match PresenceVisibility::try_from(s.presence_visibility)
            .unwrap_or(PresenceVisibility::Contacts)
        {
            PresenceVisibility::Everyone => directory::Who::Everyone,
            PresenceVisibility::Contacts | PresenceVisibility::Unspecified => directory::Who::Contacts,
            PresenceVisibility::Nobody => directory::Who::Nobody,
        };
    let watcher_ref = (watcher.0.as_str(), watcher.1.as_str());
    let Some(settings) = directory::consent(secrets, &t, watcher_ref, &target.1, rule).await? else {
        return Ok(None);
    };
    let mut last_seen = LastSeenGranularity::try_from(settings.last_seen).unwrap_or(LastSeenGranularity::Hidden);
    if settings.last_seen_reciprocal {
        // Reciprocal: no more precise than the watcher shows its own.
        let Some(wt) = TenantId::parse(&watcher.0) else { return Ok(None) };
        let (mine, _) = directory::settings(&sys.tenant(&wt), &watcher.1).await?;
        let mine = LastSeenGranularity::try_from(mine.last_seen).unwrap_or(LastSeenGranularity::Hidden);
        if rank(mine) < rank(last_seen) {
            last_seen = mine;
        }
    }
    Ok(Some(View { last_seen }))
}
