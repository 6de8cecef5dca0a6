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
    // The reads are independent: one round trip to the store, not four.
    let same_tenant = caller.tenant == callee.tenant;
    let me = (caller.tenant.clone(), caller.account.clone());
    let relations = async {
        if same_tenant {
            let contact_key = contact_key(&callee.account, &peer_account(&caller.account));
            let (blocked, contact) = futures::try_join!(
                directory::blocks_account(t, &callee.account, &caller.account),
                t.get(&contact_key),
            )?;
            Ok::<_, StoreError>((blocked, contact.is_some()))
        } else {
            let (blocks, contacts) = futures::try_join!(
                directory::interop_peers(sys, t, "blocks", &callee.account),
                directory::interop_peers(sys, t, "contacts", &callee.account),
            )?;
            Ok((blocks.contains(&me), contacts.contains(&me)))
        }
    };
    let account = account_key(&callee.account);
    let (exists, (s, _), (blocked, contact)) =
        futures::try_join!(t.get(&account), directory::settings(t, &callee.account), relations)?;
    if exists.is_none() {
        return Ok(false);
    }
    if blocked {
        return Ok(false);
    }
    if !same_tenant {
        let reach = CrossAppReachability::try_from(s.cross_app)
            .ok()
            .filter(|c| *c != CrossAppReachability::Unspecified)
            .unwrap_or(CrossAppReachability::Contacts);
        match reach {
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
