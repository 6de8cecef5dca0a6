//! Call placement: starting a one-to-one or group call, read top-down:
//! the caller's consent and limits, the callee's settings and devices,
//! the pair or group key that keeps one call per pair or group, the node
//! that runs it, and the write. Answering, declining and hanging up go
//! through the pure machine (`machine`) in `Cluster::update`.

use std::collections::BTreeMap;

use spine_proto::calls::v1::{self as pb};
use spine_proto::common::v1::peer_ref;
use spine_read_models::directory;
use spine_runtime::Caller;
use spine_runtime::ids::{self, Kind as IdKind, TenantId};
use spine_runtime::store::TenantStore;

use crate::Node;
use crate::error::{CallError, invalid};
use crate::machine;
use crate::media;
use crate::model::{
    AccountKey, CallRec, DevKey, End, GroupRef, Kind, Leg, Party, Ring, Role, State, group_call_key, new_id, pair_key,
};
use crate::service::{group_hex, request_id};
use crate::view::render;

impl Node {
    /// A tenant's store, for work on behalf of a call or group that spans
    /// tenants (settings of a rung member, records).
    pub(crate) fn tenant_of(&self, caller: &Caller, tenant: &str) -> Result<TenantStore, CallError> {
        if caller.tenant().is_some_and(|t| t.as_str() == tenant) {
            return Ok(caller.tenant_store()?);
        }
        let t = TenantId::parse(tenant).ok_or(CallError::Internal("a tenant id that does not parse"))?;
        Ok(self.rt.system_store().tenant(&t))
    }

    /// The call, from the mirror or else the store, if `me`'s account (or
    /// device) takes part in it; NOT_FOUND otherwise.
    pub(crate) async fn call_for(&self, id: &str, me: &DevKey, fresh: bool) -> Result<(CallRec, i64), CallError> {
        let found = if fresh { None } else { self.cluster.call(id) };
        let found = match found {
            Some(c) => Some(c),
            None => self.cluster.read_call(id).await?,
        };
        match found {
            Some((rec, v)) if rec.party(&me.account_key()).is_some() || rec.leg_of(me).is_some() => Ok((rec, v)),
            _ => Err(CallError::NotFound),
        }
    }

    /// As [`Node::call_for`] (from the mirror), for a call that has not
    /// ended: FAILED_PRECONDITION `CALL_ENDED` otherwise.
    pub(crate) async fn live_call_for(&self, id: &str, me: &DevKey) -> Result<CallRec, CallError> {
        let (rec, _) = self.call_for(id, me, false).await?;
        if rec.state == State::Ended {
            return Err(crate::error::precondition("CALL_ENDED", "the call has ended"));
        }
        Ok(rec)
    }

    pub(crate) fn idle_ms(&self) -> i64 {
        (self.config.group_idle_secs * 1000) as i64
    }

    pub(crate) fn ring_ms(&self) -> i64 {
        (self.config.ring_timeout_secs * 1000) as i64
    }

    pub(crate) async fn start_direct(
        &self,
        caller: &Caller,
        me: &DevKey,
        r: &pb::StartCallRequest,
    ) -> Result<pb::Call, CallError> {
        let rid = request_id(&r.request_id)?;
        let sys = self.rt.system_store();
        let mine = me.account_key();
        let my_tenant = caller.tenant().ok_or(CallError::Internal("a tenant id that does not parse"))?.clone();
        let (callee, callee_t, callee_handle) = match r.callee.as_ref().and_then(|c| c.peer.as_ref()) {
            Some(peer_ref::Peer::AccountId(a)) => {
                ids::parse(IdKind::Account, a).ok_or_else(|| invalid("callee.account_id", "not an account id"))?;
                let who = AccountKey { tenant: me.tenant.clone(), account: a.clone() };
                (who, caller.tenant_store()?, None)
            }
            Some(peer_ref::Peer::Interop(i)) => {
                ids::parse(IdKind::InteropHandle, &i.handle)
                    .ok_or_else(|| invalid("callee.interop.handle", "not an interop handle"))?;
                match directory::resolve_handle(&sys, &i.handle, &my_tenant).await? {
                    Some((t, a)) if t.as_str() == i.tenant_id => {
                        (AccountKey { tenant: t.to_string(), account: a }, sys.tenant(&t), Some(i.handle.clone()))
                    }
                    _ => return Err(CallError::NotPlaced),
                }
            }
            None => return Err(invalid("callee", "required")),
        };
        if callee == mine {
            return Err(invalid("callee", "cannot call your own account"));
        }
        let mut caller_handle = None;
        if !r.caller_handle.is_empty() && callee.tenant != mine.tenant {
            ids::parse(IdKind::InteropHandle, &r.caller_handle)
                .ok_or_else(|| invalid("caller_handle", "not an interop handle"))?;
            let target =
                TenantId::parse(&callee.tenant).ok_or(CallError::Internal("a tenant id that does not parse"))?;
            match directory::resolve_handle(&sys, &r.caller_handle, &target).await? {
                Some((t, a)) if t == my_tenant && a == mine.account => caller_handle = Some(r.caller_handle.clone()),
                _ => return Err(invalid("caller_handle", "not your live handle open to the callee's tenant")),
            }
        }
        if !crate::rules::may_ring(&self.cluster.secrets, &callee_t, &mine, &callee, r.video).await? {
            tracing::debug!("call not placed: the callee's settings refuse it");
            return Err(CallError::NotPlaced);
        }
        let request = format!("{}/{rid}", me.device);
        let pair = pair_key(&self.cluster.secrets, &mine, &callee);
        for _ in 0..4 {
            let now = self.clock.now_ms();
            // Calls between these two are glare or a retry, handled below.
            let occupied = self
                .cluster
                .calls_of(&callee)
                .iter()
                .filter(|(c, _)| {
                    c.occupies(&callee)
                        && crate::cluster::aux_key(&self.cluster.secrets, c).as_deref() != Some(pair.as_str())
                })
                .count();
            let mut rec = CallRec {
                id: new_id("cl_"),
                kind: Kind::Direct,
                video: r.video,
                state: State::Ringing,
                end: None,
                home: self.cluster.me.clone(),
                request: request.clone(),
                started_ms: now,
                answered_ms: None,
                ended_ms: None,
                ring_deadline_ms: now + self.ring_ms(),
                idle_deadline_ms: 0,
                waiting: machine::availability(occupied) == machine::Availability::Waiting,
                parties: vec![
                    Party {
                        who: mine.clone(),
                        role: Role::Caller,
                        ring: Ring::None,
                        devices: vec![],
                        handle: caller_handle.clone(),
                    },
                    Party {
                        who: callee.clone(),
                        role: Role::Callee,
                        ring: Ring::Ringing,
                        devices: vec![],
                        handle: callee_handle.clone(),
                    },
                ],
                legs: vec![Leg { id: new_id("lg_"), dev: me.clone(), leaf: 0, joined_ms: now }],
                group: None,
            };
            if machine::availability(occupied) == machine::Availability::Busy {
                // In a call with another waiting: busy. Nothing is stored.
                crate::metrics::busy();
                machine::end(&mut rec, End::Busy, now);
                return Ok(render(&rec, 0, me));
            }
            let existing = match self.cluster.create(rec).await? {
                Ok((rec, v)) => return Ok(render(&rec, v, me)),
                Err(existing) => existing,
            };
            // The pair already has a call: a retry, glare, or a live call.
            match self.cluster.read_call(&existing).await? {
                Some((rec, v)) if rec.state != State::Ended => {
                    match machine::pair_taken(&rec, &request, &mine, &callee) {
                        machine::PairTaken::Retry => return Ok(render(&rec, v, me)),
                        machine::PairTaken::Glare => {
                            let now = self.clock.now_ms();
                            let (rec, v) = self.cluster.update(&existing, |c| machine::answer(c, me, now)).await?;
                            return Ok(render(&rec, v, me));
                        }
                        machine::PairTaken::Exists => return Err(CallError::Exists { call_id: existing }),
                    }
                }
                _ => self.cluster.clear_aux(&pair, &existing).await?,
            }
        }
        Err(CallError::Contended)
    }

    pub(crate) async fn start_group(
        &self,
        caller: &Caller,
        me: &DevKey,
        r: &pb::StartGroupCallRequest,
    ) -> Result<pb::Call, CallError> {
        let rid = request_id(&r.request_id)?;
        let gid = group_hex(&r.group_id)?;
        let sys = self.rt.system_store();
        for _ in 0..4 {
            let roster = spine_read_models::roster::group_roster(&self.groups, &gid).await?;
            let Some(roster) = roster else { return Err(CallError::Missing("group")) };
            let Some(member) = roster.member(&me.tenant, &me.account, &me.device).cloned() else {
                return Err(CallError::Missing("group"));
            };
            if let Some(kv) = sys.get(&group_call_key(&gid)).await? {
                let existing = String::from_utf8_lossy(&kv.value).into_owned();
                let idle = self.idle_ms();
                match self
                    .cluster
                    .update(&existing, |c| machine::join(c, me, Some(member.leaf), self.clock.now_ms(), idle))
                    .await
                {
                    Ok((rec, v)) => return Ok(render(&rec, v, me)),
                    Err(CallError::NotFound | CallError::Precondition { reason: "CALL_ENDED", .. }) => {
                        self.cluster.clear_aux(&group_call_key(&gid), &existing).await?;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            let now = self.clock.now_ms();
            let mut accounts: BTreeMap<AccountKey, Vec<String>> = BTreeMap::new();
            for d in &roster.roster {
                accounts
                    .entry(AccountKey { tenant: d.tenant.clone(), account: d.account.clone() })
                    .or_default()
                    .push(d.device.clone());
            }
            let mut parties = Vec::new();
            let mut ringing = false;
            for (who, devices) in accounts {
                let t = self.tenant_of(caller, &who.tenant)?;
                let rings = who != me.account_key()
                    && crate::rules::group_rings(&self.cluster.secrets, &t, &me.account_key(), &who, r.video).await?;
                ringing |= rings;
                parties.push(Party {
                    who,
                    role: Role::Member,
                    ring: if rings { Ring::Ringing } else { Ring::None },
                    devices,
                    handle: None,
                });
            }
            // The media node: in the region most members' streams are in.
            let mut regions: Vec<String> = vec![self.cluster.region.clone()];
            for d in roster.roster.iter().filter(|d| !(d.tenant == me.tenant && d.device == me.device)) {
                let dev = DevKey { tenant: d.tenant.clone(), account: d.account.clone(), device: d.device.clone() };
                if let Some((.., region)) = self.cluster.session_of(&dev) {
                    regions.push(region);
                }
            }
            let region = media::majority_region(regions.iter().map(String::as_str));
            let nodes = media::list(&sys).await?;
            let Some(media) = media::choose(&nodes, region.as_deref()) else {
                return Err(CallError::NoMediaNode);
            };
            let rec = CallRec {
                id: new_id("cl_"),
                kind: Kind::Group,
                video: r.video,
                state: State::Active,
                end: None,
                home: self.cluster.me.clone(),
                request: format!("{}/{rid}", me.device),
                started_ms: now,
                answered_ms: None,
                ended_ms: None,
                ring_deadline_ms: if ringing { now + self.ring_ms() } else { 0 },
                idle_deadline_ms: now + self.idle_ms(),
                waiting: false,
                parties,
                legs: vec![Leg { id: new_id("lg_"), dev: me.clone(), leaf: member.leaf, joined_ms: now }],
                group: Some(GroupRef { gid: gid.clone(), epoch: roster.epoch, media: Some(media) }),
            };
            if let Ok((rec, v)) = self.cluster.create(rec).await? {
                return Ok(render(&rec, v, me));
            }
        }
        Err(CallError::Contended)
    }
}
