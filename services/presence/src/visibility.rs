//! Who may see whose presence, and how precisely.

use spine_proto::identity::v1::{CrossAppReachability, LastSeenGranularity, PresenceVisibility};
use spine_runtime::Runtime;
use spine_runtime::directory;
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
pub async fn view(rt: &Runtime, watcher: &AccountKey, target: &AccountKey) -> Result<Option<View>, StoreError> {
    if watcher == target {
        return Ok(Some(View { last_seen: LastSeenGranularity::Exact }));
    }
    let sys = rt.system_store();
    let Some(target_tenant) = TenantId::parse(&target.0) else { return Ok(None) };
    let t = sys.tenant_for_interop(&target_tenant);
    if t.get(&directory::account_key(&target.1)).await?.is_none() {
        return Ok(None);
    }
    let (settings, _) = directory::settings(&t, &target.1).await?;
    let same_tenant = watcher.0 == target.0;
    let (contact, blocked) = if same_tenant {
        (
            t.get(&directory::contact_key(&target.1, &directory::peer_account(&watcher.1))).await?.is_some(),
            directory::blocks_account(&t, &target.1, &watcher.1).await?,
        )
    } else {
        let cross = CrossAppReachability::try_from(settings.cross_app).unwrap_or(CrossAppReachability::Contacts);
        let contact = directory::interop_peers(&sys, &t, "contacts", &target.1).await?.contains(watcher);
        let blocked = directory::interop_peers(&sys, &t, "blocks", &target.1).await?.contains(watcher);
        match cross {
            CrossAppReachability::Off => return Ok(None),
            CrossAppReachability::Contacts if !contact => return Ok(None),
            _ => {}
        }
        (contact, blocked)
    };
    if blocked {
        return Ok(None);
    }
    let allowed =
        match PresenceVisibility::try_from(settings.presence_visibility).unwrap_or(PresenceVisibility::Contacts) {
            PresenceVisibility::Everyone => true,
            PresenceVisibility::Contacts | PresenceVisibility::Unspecified => contact,
            PresenceVisibility::Nobody => false,
        };
    if !allowed {
        return Ok(None);
    }
    let mut last_seen = LastSeenGranularity::try_from(settings.last_seen).unwrap_or(LastSeenGranularity::Hidden);
    if settings.last_seen_reciprocal {
        // Reciprocal: no more precise than the watcher shows its own.
        let Some(wt) = TenantId::parse(&watcher.0) else { return Ok(None) };
        let (mine, _) = directory::settings(&sys.tenant_for_interop(&wt), &watcher.1).await?;
        let mine = LastSeenGranularity::try_from(mine.last_seen).unwrap_or(LastSeenGranularity::Hidden);
        if rank(mine) < rank(last_seen) {
            last_seen = mine;
        }
    }
    Ok(Some(View { last_seen }))
}
