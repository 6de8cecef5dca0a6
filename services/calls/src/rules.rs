//! Whose devices may ring: the callee's settings, contacts and blocks,
//! checked before any device rings. A refusal never says which rule refused.

use prost_types::Timestamp;
use spine_proto::identity::v1::PrivacySettings;
use spine_read_models::directory;
use spine_runtime::secrets::Secrets;
use spine_runtime::store::{StoreError, TenantStore};

use crate::model::AccountKey;

fn dnd_on(s: &PrivacySettings, now: i64) -> bool {
    s.do_not_disturb.as_ref().is_some_and(|d| d.enabled && d.until.as_ref().is_none_or(|u: &Timestamp| u.seconds > now))
}

/// Whether `caller` may ring `callee` (whose tenant's handle is `t`): the
/// callee exists; for another tenant, cross-app reach allows it; the
/// callee has not blocked the caller (a block on another product's person
/// holds whatever handle names them); who-can-call allows it; video calling
/// is on for a video call; do-not-disturb is off.
pub async fn may_ring(
    secrets: &Secrets,
    t: &TenantStore,
    caller: &AccountKey,
    callee: &AccountKey,
    video: bool,
) -> Result<bool, StoreError> {
    let from = (caller.tenant.as_str(), caller.account.as_str());
    let Some(s) = directory::consent(secrets, t, from, &callee.account, directory::who_can_call).await? else {
        return Ok(false);
    };
    Ok((!video || s.video_calling_enabled) && !dnd_on(&s, spine_runtime::now_secs()))
}

/// Whether a group call started by `caller` rings a member: it opted in to
/// group rings, and `caller` could ring it directly ([`may_ring`]).
pub async fn group_rings(
    secrets: &Secrets,
    t: &TenantStore,
    caller: &AccountKey,
    member: &AccountKey,
    video: bool,
) -> Result<bool, StoreError> {
    let (s, _) = directory::settings(t, &member.account).await?;
    Ok(s.group_call_rings && may_ring(secrets, t, caller, member, video).await?)
}
