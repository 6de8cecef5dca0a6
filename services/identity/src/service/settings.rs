//! Privacy settings: partial updates under compare-and-swap.

use super::*;

impl IdentityApi {
    pub(crate) async fn update_settings(&self, req: Request<pb::UpdateSettingsRequest>) -> Result<pb::PrivacySettings> {
        let s = scoped(&req, &req.get_ref().account_id).await?;
        let req = req.into_inner();
        let new = req.settings.ok_or_else(|| invalid("settings", "required"))?;
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        if paths.is_empty() {
            return Err(invalid("update_mask", "name at least one field"));
        }
        if paths.len() > 16 {
            return Err(invalid("update_mask", "too many paths"));
        }
        let key = s.store.key(&model::settings_key(&s.account));
        let akey = s.store.key(&model::account_key(&s.account));
        for _ in 0..CAS_ATTEMPTS {
            let (mut cur, rev) = load_settings(&s.store, &s.account).await?;
            for p in &paths {
                match p.as_str() {
                    "video_calling_enabled" => cur.video_calling_enabled = new.video_calling_enabled,
                    "who_can_call" => {
                        cur.who_can_call = enum_field::<pb::WhoCanCall>("settings.who_can_call", new.who_can_call)?;
                    }
                    "presence_visibility" => {
                        cur.presence_visibility = enum_field::<pb::PresenceVisibility>(
                            "settings.presence_visibility",
                            new.presence_visibility,
                        )?;
                    }
                    "last_seen" => {
                        cur.last_seen = enum_field::<pb::LastSeenGranularity>("settings.last_seen", new.last_seen)?;
                    }
                    "last_seen_reciprocal" => cur.last_seen_reciprocal = new.last_seen_reciprocal,
                    "cross_app" => {
                        cur.cross_app = enum_field::<pb::CrossAppReachability>("settings.cross_app", new.cross_app)?;
                    }
                    "auto_answer_hint" => cur.auto_answer_hint = new.auto_answer_hint,
                    "group_call_rings" => cur.group_call_rings = new.group_call_rings,
                    "who_can_add_to_groups" => {
                        cur.who_can_add_to_groups = enum_field::<pb::WhoCanAddToGroups>(
                            "settings.who_can_add_to_groups",
                            new.who_can_add_to_groups,
                        )?;
                    }
                    "do_not_disturb" => cur.do_not_disturb = Some(new.do_not_disturb.unwrap_or_default()),
                    "do_not_disturb.enabled" => {
                        cur.do_not_disturb.get_or_insert_default().enabled =
                            new.do_not_disturb.as_ref().is_some_and(|d| d.enabled);
                    }
                    "do_not_disturb.until" => {
                        cur.do_not_disturb.get_or_insert_default().until =
                            new.do_not_disturb.as_ref().and_then(|d| d.until);
                    }
                    other => return Err(invalid("update_mask", format!("unknown or read-only field `{other}`"))),
                }
            }
            if let Some(u) = cur.do_not_disturb.as_ref().and_then(|d| d.until.as_ref()) {
                validate::timestamp("settings.do_not_disturb.until", u)?;
            }
            cur.updated_at = ts(now_secs());
            let mut stored = cur.clone();
            stored.account_id.clear();
            let txn = Txn::new()
                .when(Compare::ModRevision(key.clone(), rev))
                .when(Compare::Present(akey.clone()))
                .then(Op::put(key.clone(), stored.encode_to_vec()));
            if s.store.txn(txn).await?.succeeded {
                return Ok(cur);
            }
            s.store.get(&model::account_key(&s.account)).await?.ok_or(IdentityError::NotFound("account"))?;
        }
        Err(IdentityError::Conflict)
    }
}
