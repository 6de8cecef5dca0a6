//! Whose devices may ring: the callee's settings, contacts and blocks,
//! checked before any device rings. A refusal never says which rule refused.

use prost_types::Timestamp;
use spine_proto::identity::v1::{CrossAppReachability, PrivacySettings, WhoCanCall};
use spine_runtime::directory::{self, account_key, contact_key, peer_account};
use spine_runtime::store::{StoreError, SystemStore, TenantStore};

use crate::model::AccountKey;

fn dnd_on(s: &PrivacySettings, now: i64) -> bool {
    s.do_not_disturb.as_ref().is_some_and(|d| d.enabled && d.until.as_ref().is_none_or(|u: &Timestamp| u.seconds > now))
}

/// Whether `caller` may ring `callee` (whose tenant's handle is `t`): the
/// callee exists; for another tenant, cross-app reach allows it; the
/// callee has not blocked the caller; who-can-call allows it; video calling
/// is on for a video call; do-not-disturb is off.
pub async fn may_ring(
    sys: &SystemStore,
    t: &TenantStore,
    caller: &AccountKey,
    callee: &AccountKey,
    video: bool,
) -> Result<bool, StoreError> {
    if t.get(&account_key(&callee.account)).await?.is_none() {
        return Ok(false);
    }
    let (s, _) = directory::settings(t, &callee.account).await?;
    let same_tenant = caller.tenant == callee.tenant;
    let (blocked, contact) = if same_tenant {
        (
            directory::blocks_account(t, &callee.account, &caller.account).await?,
            t.get(&contact_key(&callee.account, &peer_account(&caller.account))).await?.is_some(),
        )
    } else {
        let me = (caller.tenant.clone(), caller.account.clone());
        (
            directory::interop_peers(sys, t, "blocks", &callee.account).await?.contains(&me),
            directory::interop_peers(sys, t, "contacts", &callee.account).await?.contains(&me),
        )
    };
    if blocked {
        return Ok(false);
    }
    if !same_tenant {
        match directory::cross_app(t, &callee.account).await? {
            CrossAppReachability::HandleHolders => {}
            CrossAppReachability::Off => return Ok(false),
            _ if !contact => return Ok(false),
            _ => {}
        }
    }
    let allowed = match WhoCanCall::try_from(s.who_can_call).unwrap_or(WhoCanCall::Contacts) {
        WhoCanCall::Everyone => true,
        WhoCanCall::Nobody => false,
        WhoCanCall::Contacts | WhoCanCall::Unspecified => contact,
    };
    Ok(allowed && (!video || s.video_calling_enabled) && !dnd_on(&s, spine_runtime::now_secs()))
}

/// Whether a group call rings a member: it opted in to group rings, is not
/// in do-not-disturb, and takes video calls if the call is video.
pub async fn group_rings(t: &TenantStore, member: &str, video: bool) -> Result<bool, StoreError> {
    let (s, _) = directory::settings(t, member).await?;
    Ok(s.group_call_rings && !dnd_on(&s, spine_runtime::now_secs()) && (!video || s.video_calling_enabled))
}
