//! The gRPC face of calls: the signalling stream and the call methods
//! (devices), call-record policy (tenant servers), media nodes (operators).

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use spine_proto::calls::v1::calls_client::CallsClient;
use spine_proto::calls::v1::{self as pb, call_records_server::CallRecords, calls_server::Calls};
use spine_proto::calls::v1::{media_nodes_server::MediaNodes, server_event::Event};
use spine_proto::common::v1::peer_ref;
use spine_runtime::ids::{self, Kind as IdKind, TenantId};
use spine_runtime::store::TenantStore;
use spine_runtime::{Caller, Principal, directory, now_secs};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::Node;
use crate::error::{CallError, invalid, precondition};
use crate::machine;
use crate::media;
use crate::model::{
    AccountKey, CallRec, DevKey, End, GroupRef, Kind, Leg, MediaRec, Party, Ring, Role, State, group_call_key, new_id,
    now_ms, pair_key, parse_id,
};
use crate::records;
use crate::turn;
use crate::view::render;

const SIGNAL: &str = "/spine.calls.v1.Calls/Signal";
/// Largest signalling payload.
pub const MAX_PAYLOAD: usize = 64 * 1024;

pub struct CallsApi(pub(crate) Arc<Node>);
pub struct CallRecordsApi;
pub struct MediaNodesApi(pub(crate) Arc<Node>);

/// The calling device.
fn device<T>(req: &Request<T>) -> Result<DevKey, Status> {
    match Caller::of(req)?.principal() {
        Principal::Device { tenant, account_id, device_id, .. } => {
            Ok(DevKey { tenant: tenant.to_string(), account: account_id.clone(), device: device_id.clone() })
        }
        _ => Err(Status::permission_denied("calls methods are for devices (device tokens)")),
    }
}

fn request_id(v: &str) -> Result<&str, CallError> {
    ids::request_id(v).map_err(|m| invalid("request_id", m))
}

fn call_id(v: &str) -> Result<&str, CallError> {
    parse_id("cl_", v).ok_or_else(|| invalid("call_id", "not a call id"))
}

fn group_hex(gid: &[u8]) -> Result<String, CallError> {
    if gid.is_empty() || gid.len() > 64 {
        return Err(invalid("group_id", "1 to 64 bytes"));
    }
    Ok(hex::encode(gid))
}

fn group_not_found() -> Status {
    Status::not_found("group not found")
}

impl Node {
    /// A tenant's store, for work on behalf of a call or group that spans
    /// tenants (settings of a rung member, records).
    fn tenant_of(&self, caller: &Caller, tenant: &str) -> Result<TenantStore, Status> {
        if caller.tenant().is_some_and(|t| t.as_str() == tenant) {
            return Ok(caller.tenant_store()?);
        }
        let t = TenantId::parse(tenant).ok_or_else(|| Status::internal("internal error"))?;
        Ok(self.rt.system_store().tenant_for_delivery(&t))
    }

    /// The call, from the mirror or else the store, if `me`'s account (or
    /// device) takes part in it; NOT_FOUND otherwise.
    async fn call_for(&self, id: &str, me: &DevKey, fresh: bool) -> Result<(CallRec, i64), CallError> {
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

    /// Relays a payload to devices of a call; returns how many it reached.
    /// A forwarded request is delivered only to this node's streams.
    pub(crate) async fn signal(
        &self,
        me: &DevKey,
        auth: Option<&MetadataValue<tonic::metadata::Ascii>>,
        forwarded: bool,
        r: &pb::SignalRequest,
    ) -> Result<u32, Status> {
        let id = call_id(&r.call_id)?;
        if r.payload.is_empty() || r.payload.len() > MAX_PAYLOAD {
            return Err(invalid("payload", format!("1 to {MAX_PAYLOAD} bytes")).into());
        }
        if !r.to_leg_id.is_empty() && parse_id("lg_", &r.to_leg_id).is_none() {
            return Err(invalid("to_leg_id", "not a leg id").into());
        }
        if !forwarded {
            // Counted once, where the device sent it.
            self.rt.limits.check(spine_runtime::rate::Kind::Signals, &me.tenant, &me.account, 1.0)?;
        }
        let (rec, _) = self.call_for(id, me, forwarded).await?;
        if rec.state == State::Ended {
            return Err(precondition("CALL_ENDED", "the call has ended").into());
        }
        let mine = me.account_key();
        let my_leg = rec.leg_of(me).map(|l| l.id.clone());
        let ringing_here = rec
            .party(&mine)
            .is_some_and(|p| p.ring == Ring::Ringing && (rec.kind == Kind::Direct || p.devices.contains(&me.device)));
        if my_leg.is_none() && !ringing_here {
            return Err(precondition("NOT_IN_CALL", "this device is neither in the call nor ringing for it").into());
        }
        let mut targets: Vec<DevKey> = Vec::new();
        if r.to_leg_id.is_empty() {
            targets.extend(rec.legs.iter().filter(|l| &l.dev != me).map(|l| l.dev.clone()));
            if rec.kind == Kind::Direct
                && rec.state == State::Ringing
                && let Some(callee) = rec.callee()
                && callee.who != mine
            {
                for (d, ..) in self.cluster.sessions_of(&callee.who) {
                    targets.push(DevKey {
                        tenant: callee.who.tenant.clone(),
                        account: callee.who.account.clone(),
                        device: d,
                    });
                }
            }
        } else {
            let leg =
                rec.legs.iter().find(|l| l.id == r.to_leg_id).ok_or_else(|| Status::not_found("leg not found"))?;
            targets.push(leg.dev.clone());
        }
        let event = pb::ServerEvent {
            event: Some(Event::Signal(pb::IncomingSignal {
                call_id: rec.id.clone(),
                from_leg_id: my_leg.unwrap_or_default(),
                payload: r.payload.clone(),
            })),
        };
        // `delivered` counts devices in the call (legs) only: a payload to a
        // callee's ringing devices is delivered to every one connected, but
        // how many that is stays hidden (it would tell a caller how many
        // devices someone has online before they answer).
        let mut delivered = 0;
        let mut remote = BTreeSet::new();
        for t in targets.iter().filter(|t| *t != me) {
            match self.cluster.session_of(t) {
                Some((node, ..)) if node == self.cluster.me => {
                    let reached = self.cluster.deliver_local(t, event.clone());
                    delivered += u32::from(reached && rec.leg_of(t).is_some());
                }
                Some((_, addr, _)) if !forwarded && !addr.is_empty() => {
                    remote.insert(addr);
                }
                _ => {}
            }
        }
        for addr in remote {
            let mut fwd = Request::new(r.clone());
            if let Some(a) = auth {
                fwd.metadata_mut().insert("authorization", a.clone());
            }
            if let Some(a) = auth {
                let mark = self.cluster.secrets.peer_mark(SIGNAL, a.as_bytes());
                fwd.metadata_mut().insert(spine_runtime::secrets::FORWARDED, mark.parse().expect("ascii"));
            }
            fwd.set_timeout(Duration::from_secs(5));
            match CallsClient::new(self.cluster.peer(&addr)?).signal(fwd).await {
                Ok(resp) => delivered += resp.into_inner().delivered,
                Err(e) => tracing::debug!(code = ?e.code(), "signal not forwarded to a peer node"),
            }
        }
        Ok(delivered)
    }

    pub(crate) fn idle_ms(&self) -> i64 {
        (self.rt.config.calls.group_idle_secs * 1000) as i64
    }

    fn ring_ms(&self) -> i64 {
        (self.rt.config.calls.ring_timeout_secs * 1000) as i64
    }

    async fn start_direct(&self, caller: &Caller, me: &DevKey, r: &pb::StartCallRequest) -> Result<pb::Call, Status> {
        let rid = request_id(&r.request_id)?;
        let sys = self.rt.system_store();
        let mine = me.account_key();
        let my_tenant = caller.tenant().ok_or_else(|| Status::internal("internal error"))?.clone();
        let (callee, callee_t, callee_handle) = match r.callee.as_ref().and_then(|c| c.peer.as_ref()) {
            Some(peer_ref::Peer::AccountId(a)) => {
                ids::parse(IdKind::Account, a).ok_or_else(|| invalid("callee.account_id", "not an account id"))?;
                let who = AccountKey { tenant: me.tenant.clone(), account: a.clone() };
                (who, caller.tenant_store()?, None)
            }
            Some(peer_ref::Peer::Interop(i)) => {
                ids::parse(IdKind::InteropHandle, &i.handle)
                    .ok_or_else(|| invalid("callee.interop.handle", "not an interop handle"))?;
                match directory::resolve_handle(&sys, &i.handle, &my_tenant)
                    .await
                    .map_err(spine_runtime::error::store)?
                {
                    Some((t, a)) if t.as_str() == i.tenant_id => (
                        AccountKey { tenant: t.to_string(), account: a },
                        sys.tenant_for_interop(&t),
                        Some(i.handle.clone()),
                    ),
                    _ => return Err(CallError::NotPlaced.into()),
                }
            }
            None => return Err(invalid("callee", "required").into()),
        };
        if callee == mine {
            return Err(invalid("callee", "cannot call your own account").into());
        }
        let mut caller_handle = None;
        if !r.caller_handle.is_empty() && callee.tenant != mine.tenant {
            ids::parse(IdKind::InteropHandle, &r.caller_handle)
                .ok_or_else(|| invalid("caller_handle", "not an interop handle"))?;
            let target = TenantId::parse(&callee.tenant).ok_or_else(|| Status::internal("internal error"))?;
            match directory::resolve_handle(&sys, &r.caller_handle, &target)
                .await
                .map_err(spine_runtime::error::store)?
            {
                Some((t, a)) if t == my_tenant && a == mine.account => caller_handle = Some(r.caller_handle.clone()),
                _ => return Err(invalid("caller_handle", "not your live handle open to the callee's tenant").into()),
            }
        }
        if !crate::rules::may_ring(&self.cluster.secrets, &callee_t, &mine, &callee, r.video)
            .await
            .map_err(spine_runtime::error::store)?
        {
            tracing::debug!("call not placed: the callee's settings refuse it");
            return Err(CallError::NotPlaced.into());
        }
        let request = format!("{}/{rid}", me.device);
        let pair = pair_key(&self.cluster.secrets, &mine, &callee);
        for _ in 0..4 {
            let now = now_ms();
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
                waiting: occupied == 1,
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
            if occupied >= 2 {
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
                    if rec.request == request {
                        return Ok(render(&rec, v, me));
                    }
                    let glare = rec.state == State::Ringing
                        && rec.caller().is_some_and(|p| p.who == callee)
                        && rec.callee().is_some_and(|p| p.who == mine);
                    if glare {
                        let (rec, v) = self.cluster.update(&existing, |c| machine::answer(c, me, now_ms())).await?;
                        return Ok(render(&rec, v, me));
                    }
                    return Err(CallError::Exists { call_id: existing }.into());
                }
                _ => self.cluster.clear_aux(&pair, &existing).await?,
            }
        }
        Err(CallError::Contended.into())
    }

    async fn start_group(
        &self,
        caller: &Caller,
        me: &DevKey,
        r: &pb::StartGroupCallRequest,
    ) -> Result<pb::Call, Status> {
        let rid = request_id(&r.request_id)?;
        let gid = group_hex(&r.group_id)?;
        let sys = self.rt.system_store();
        for _ in 0..4 {
            let roster = directory::group_roster(&self.groups, &gid).await.map_err(spine_runtime::error::store)?;
            let Some(roster) = roster else { return Err(group_not_found()) };
            let Some(member) = roster.member(&me.tenant, &me.account, &me.device).cloned() else {
                return Err(group_not_found());
            };
            if let Some(kv) = sys.get(&group_call_key(&gid)).await.map_err(spine_runtime::error::store)? {
                let existing = String::from_utf8_lossy(&kv.value).into_owned();
                let idle = self.idle_ms();
                match self.cluster.update(&existing, |c| machine::join(c, me, Some(member.leaf), now_ms(), idle)).await
                {
                    Ok((rec, v)) => return Ok(render(&rec, v, me)),
                    Err(CallError::NotFound | CallError::Precondition { reason: "CALL_ENDED", .. }) => {
                        self.cluster.clear_aux(&group_call_key(&gid), &existing).await?;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let now = now_ms();
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
                    && crate::rules::group_rings(&self.cluster.secrets, &t, &me.account_key(), &who, r.video)
                        .await
                        .map_err(spine_runtime::error::store)?;
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
            let nodes = media::list(&sys).await.map_err(spine_runtime::error::store)?;
            let Some(media) = media::choose(&nodes, region.as_deref()) else {
                return Err(CallError::NoMediaNode.into());
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
        Err(CallError::Contended.into())
    }
}

/// Whether a peer node forwarded this Signal (then it is delivered only to
/// this node's streams): only a proof made with the deployment's peer
/// secret counts, which no client can make.
fn forwarded(node: &Node, meta: &MetadataMap) -> bool {
    spine_runtime::secrets::forwarded_by_peer(&node.cluster.secrets, meta, SIGNAL)
}

#[tonic::async_trait]
impl Calls for CallsApi {
    type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::ServerEvent, Status>> + Send>>;

    async fn session(
        &self,
        req: Request<Streaming<pb::ClientMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let me = device(&req)?;
        let principal = Caller::of(&req)?.principal().clone();
        let auth = req.metadata().get("authorization").cloned();
        let out = self.0.cluster.open(me.clone(), principal).await?;
        let tx = out.tx.clone();
        let mut inbound = req.into_inner();
        let node = self.0.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    m = inbound.next() => m,
                    _ = tx.closed() => break,
                };
                let m = match msg {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        if e.code() == Code::InvalidArgument || e.code() == Code::OutOfRange {
                            // A malformed or oversized message: say so, keep the stream.
                            let result = pb::SignalResult {
                                r#ref: 0,
                                code: e.code() as i32,
                                message: e.message().to_string(),
                                delivered: 0,
                            };
                            let _ = tx.send(pb::ServerEvent { event: Some(Event::SignalResult(result)) }).await;
                        }
                        break;
                    }
                    None => break,
                };
                let result = match m.message {
                    Some(pb::client_message::Message::Signal(s)) => {
                        match node.signal(&me, auth.as_ref(), false, &s).await {
                            Ok(n) => pb::SignalResult { r#ref: m.r#ref, code: 0, message: String::new(), delivered: n },
                            Err(e) => pb::SignalResult {
                                r#ref: m.r#ref,
                                code: e.code() as i32,
                                message: e.message().to_string(),
                                delivered: 0,
                            },
                        }
                    }
                    None => pb::SignalResult {
                        r#ref: m.r#ref,
                        code: Code::InvalidArgument as i32,
                        message: "message: required".into(),
                        delivered: 0,
                    },
                };
                if tx.send(pb::ServerEvent { event: Some(Event::SignalResult(result)) }).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn start_call(&self, req: Request<pb::StartCallRequest>) -> Result<Response<pb::Call>, Status> {
        let me = device(&req)?;
        let caller = Caller::of(&req)?;
        self.0.rt.limits.check(spine_runtime::rate::Kind::CallStarts, &me.tenant, &me.account, 1.0)?;
        Ok(Response::new(self.0.start_direct(caller, &me, req.get_ref()).await?))
    }

    async fn start_group_call(&self, req: Request<pb::StartGroupCallRequest>) -> Result<Response<pb::Call>, Status> {
        let me = device(&req)?;
        let caller = Caller::of(&req)?;
        self.0.rt.limits.check(spine_runtime::rate::Kind::CallStarts, &me.tenant, &me.account, 1.0)?;
        Ok(Response::new(self.0.start_group(caller, &me, req.get_ref()).await?))
    }

    async fn answer(&self, req: Request<pb::AnswerRequest>) -> Result<Response<pb::Call>, Status> {
        let me = device(&req)?;
        let id = call_id(&req.get_ref().call_id)?;
        let (rec, v) = self.0.cluster.update(id, |c| machine::answer(c, &me, now_ms())).await?;
        Ok(Response::new(render(&rec, v, &me)))
    }

    async fn decline(&self, req: Request<pb::DeclineRequest>) -> Result<Response<pb::Call>, Status> {
        let me = device(&req)?;
        let id = call_id(&req.get_ref().call_id)?;
        let (rec, v) = self.0.cluster.update(id, |c| machine::decline(c, &me, now_ms())).await?;
        Ok(Response::new(render(&rec, v, &me)))
    }

    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::Call>, Status> {
        let me = device(&req)?;
        let id = call_id(&req.get_ref().call_id)?;
        // Read without the party check: a device added to the group after
        // the call started is in the roster but not yet a party.
        let (rec, _) = self.0.cluster.read_call(id).await?.ok_or(CallError::NotFound)?;
        let party = rec.party(&me.account_key()).is_some();
        let Some(g) = rec.group.as_ref() else {
            return Err(if party {
                precondition("WRONG_CALL_KIND", "this method is for group calls")
            } else {
                CallError::NotFound
            }
            .into());
        };
        let roster = directory::group_roster(&self.0.groups, &g.gid).await.map_err(spine_runtime::error::store)?;
        let leaf = roster.as_ref().and_then(|r| r.member(&me.tenant, &me.account, &me.device)).map(|m| m.leaf);
        if leaf.is_none() && !party {
            return Err(CallError::NotFound.into());
        }
        let idle = self.0.idle_ms();
        let (rec, v) = self.0.cluster.update(id, |c| machine::join(c, &me, leaf, now_ms(), idle)).await?;
        Ok(Response::new(render(&rec, v, &me)))
    }

    async fn hang_up(&self, req: Request<pb::HangUpRequest>) -> Result<Response<pb::Call>, Status> {
        let me = device(&req)?;
        let id = call_id(&req.get_ref().call_id)?;
        let idle = self.0.idle_ms();
        let (rec, v) = self.0.cluster.update(id, |c| machine::hang_up(c, &me, now_ms(), idle)).await?;
        Ok(Response::new(render(&rec, v, &me)))
    }

    async fn get_call(&self, req: Request<pb::GetCallRequest>) -> Result<Response<pb::Call>, Status> {
        let me = device(&req)?;
        let id = call_id(&req.get_ref().call_id)?;
        let (rec, v) = self.0.call_for(id, &me, true).await?;
        Ok(Response::new(render(&rec, v, &me)))
    }

    async fn signal(&self, req: Request<pb::SignalRequest>) -> Result<Response<pb::SignalResponse>, Status> {
        let me = device(&req)?;
        let fwd = forwarded(&self.0, req.metadata());
        let auth = req.metadata().get("authorization").cloned();
        let delivered = self.0.signal(&me, auth.as_ref(), fwd, req.get_ref()).await?;
        Ok(Response::new(pb::SignalResponse { delivered }))
    }

    async fn get_turn_credentials(
        &self,
        req: Request<pb::GetTurnCredentialsRequest>,
    ) -> Result<Response<pb::TurnCredentials>, Status> {
        let me = device(&req)?;
        let id = call_id(&req.get_ref().call_id)?;
        let (rec, _) = self.0.call_for(id, &me, false).await?;
        if rec.state == State::Ended {
            return Err(precondition("CALL_ENDED", "the call has ended").into());
        }
        let ringing = rec.party(&me.account_key()).is_some_and(|p| p.ring == Ring::Ringing);
        if rec.leg_of(&me).is_none() && !ringing {
            return Err(precondition("NOT_IN_CALL", "this device is neither in the call nor ringing for it").into());
        }
        let cfg = &self.0.rt.config.calls.turn;
        let Some(secret) = cfg.secrets.first() else {
            return Err(precondition("TURN_NOT_CONFIGURED", "this deployment has no TURN server").into());
        };
        let ttl = cfg.ttl_secs.clamp(60, turn::MAX_TTL);
        let expires_at = now_secs() + i64::from(ttl);
        let (username, password) = turn::mint(secret, expires_at, &turn::opaque_id(secret, &rec.id, &me.device));
        Ok(Response::new(pb::TurnCredentials {
            username,
            password,
            ttl_seconds: ttl,
            uris: cfg.uris.clone(),
            expires_at: Some(prost_types::Timestamp { seconds: expires_at, nanos: 0 }),
        }))
    }
}

fn policy_pb(tenant: &str, p: &records::Policy) -> pb::RecordPolicy {
    pb::RecordPolicy { tenant_id: tenant.to_string(), fields: p.fields.clone(), retention_seconds: p.retention_seconds }
}

#[tonic::async_trait]
impl CallRecords for CallRecordsApi {
    async fn set_record_policy(
        &self,
        req: Request<pb::SetRecordPolicyRequest>,
    ) -> Result<Response<pb::RecordPolicy>, Status> {
        let caller = Caller::of(&req)?;
        let tenant = caller.require_tenant_server()?.to_string();
        let t = caller.tenant_store()?;
        let r = req.get_ref();
        let mut fields = Vec::new();
        for f in &r.fields {
            match pb::RecordField::try_from(*f) {
                Ok(pb::RecordField::Unspecified) | Err(_) => {
                    return Err(invalid("fields", "unknown record field").into());
                }
                Ok(_) if fields.contains(f) => return Err(invalid("fields", "a field is named twice").into()),
                Ok(_) => fields.push(*f),
            }
        }
        let retention_seconds = if fields.is_empty() { 0 } else { r.retention_seconds };
        if !fields.is_empty() && !(records::MIN_RETENTION..=records::MAX_RETENTION).contains(&retention_seconds) {
            return Err(invalid("retention_seconds", "60 seconds to 400 days").into());
        }
        let p = records::Policy { fields, retention_seconds };
        records::set_policy(&t, &p).await.map_err(spine_runtime::error::store)?;
        tracing::info!(fields = p.fields.len(), retention_seconds, "call record policy set");
        Ok(Response::new(policy_pb(&tenant, &p)))
    }

    async fn get_record_policy(
        &self,
        req: Request<pb::GetRecordPolicyRequest>,
    ) -> Result<Response<pb::RecordPolicy>, Status> {
        let caller = Caller::of(&req)?;
        let tenant = caller.require_tenant_server()?.to_string();
        let p = records::policy(&caller.tenant_store()?).await.map_err(spine_runtime::error::store)?;
        Ok(Response::new(policy_pb(&tenant, &p)))
    }

    async fn list_call_records(
        &self,
        req: Request<pb::ListCallRecordsRequest>,
    ) -> Result<Response<pb::ListCallRecordsResponse>, Status> {
        let caller = Caller::of(&req)?;
        caller.require_tenant_server()?;
        let t = caller.tenant_store()?;
        let r = req.get_ref();
        let size = match r.page_size {
            0 => 100,
            n @ 1..=1000 => n as usize,
            _ => return Err(invalid("page_size", "at most 1000").into()),
        };
        let after = if r.page_token.is_empty() {
            None
        } else if r.page_token.starts_with(crate::model::RECORDS) && !r.page_token.contains("..") {
            Some(r.page_token.as_str())
        } else {
            return Err(invalid("page_token", "not a token from this method").into());
        };
        let page = t.range(crate::model::RECORDS, after, size).await.map_err(spine_runtime::error::store)?;
        let next = if page.more {
            page.kvs.last().map(|kv| t.relative(&kv.key).to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        let records = page
            .kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<records::Stored>(&kv.value).ok())
            .map(|s| records::to_pb(&s))
            .collect();
        Ok(Response::new(pb::ListCallRecordsResponse { records, next_page_token: next }))
    }
}

#[tonic::async_trait]
impl MediaNodes for MediaNodesApi {
    async fn register_media_node(
        &self,
        req: Request<pb::RegisterMediaNodeRequest>,
    ) -> Result<Response<pb::RegisterMediaNodeResponse>, Status> {
        let mine = Caller::of(&req)?.require_media_node()?.to_string();
        let r = req.get_ref();
        media::node_id(&r.node_id)?;
        if r.node_id != mine {
            return Err(Status::permission_denied("this credential registers another media node"));
        }
        if r.address.is_empty()
            || r.address.len() > 256
            || r.address.chars().any(|c| c.is_control() || c.is_whitespace() || ids::is_bidi_control(c))
        {
            return Err(invalid("address", "1 to 256 characters, no spaces or control characters").into());
        }
        if r.region.is_empty()
            || r.region.len() > 32
            || !r.region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(invalid("region", "1 to 32 characters of a-z, 0-9 and '-'").into());
        }
        if r.capacity == 0 {
            return Err(invalid("capacity", "at least 1").into());
        }
        let ttl = match r.ttl_seconds {
            0 => 15,
            t @ 5..=60 => t,
            _ => return Err(invalid("ttl_seconds", "5 to 60").into()),
        };
        let rec = MediaRec {
            address: r.address.clone(),
            region: r.region.clone(),
            capacity: r.capacity,
            load: r.load,
            updated_at: now_secs(),
        };
        media::register(&self.0.rt.system_store(), &r.node_id, &rec, Duration::from_secs(u64::from(ttl)))
            .await
            .map_err(spine_runtime::error::store)?;
        Ok(Response::new(pb::RegisterMediaNodeResponse { ttl_seconds: ttl }))
    }

    async fn deregister_media_node(
        &self,
        req: Request<pb::DeregisterMediaNodeRequest>,
    ) -> Result<Response<pb::DeregisterMediaNodeResponse>, Status> {
        let mine = Caller::of(&req)?.require_media_node()?.to_string();
        let id = media::node_id(&req.get_ref().node_id)?;
        if id != mine {
            return Err(Status::permission_denied("this credential deregisters another media node"));
        }
        media::deregister(&self.0.rt.system_store(), id).await.map_err(spine_runtime::error::store)?;
        Ok(Response::new(pb::DeregisterMediaNodeResponse {}))
    }

    async fn list_media_nodes(
        &self,
        req: Request<pb::ListMediaNodesRequest>,
    ) -> Result<Response<pb::ListMediaNodesResponse>, Status> {
        Caller::of(&req)?.require_operator()?;
        let nodes = media::list(&self.0.rt.system_store())
            .await
            .map_err(spine_runtime::error::store)?
            .into_iter()
            .map(|(id, r)| pb::RegisteredMediaNode {
                node_id: id,
                address: r.address,
                region: r.region,
                capacity: r.capacity,
                load: r.load,
                updated_at: Some(prost_types::Timestamp { seconds: r.updated_at, nanos: 0 }),
            })
            .collect();
        Ok(Response::new(pb::ListMediaNodesResponse { nodes }))
    }

    async fn issue_media_node_credential(
        &self,
        req: Request<pb::IssueMediaNodeCredentialRequest>,
    ) -> Result<Response<pb::MediaNodeCredential>, Status> {
        Caller::of(&req)?.require_operator()?;
        let rt = &self.0.rt;
        let cred = media::issue_credential(
            &rt.system_store(),
            &self.0.idem_lease,
            |k, v| rt.auth.observe(k, v),
            req.get_ref(),
        )
        .await?;
        Ok(Response::new(cred))
    }

    async fn list_media_node_credentials(
        &self,
        req: Request<pb::ListMediaNodeCredentialsRequest>,
    ) -> Result<Response<pb::ListMediaNodeCredentialsResponse>, Status> {
        Caller::of(&req)?.require_operator()?;
        let credentials = media::credentials(&self.0.rt.system_store()).await.map_err(spine_runtime::error::store)?;
        Ok(Response::new(pb::ListMediaNodeCredentialsResponse { credentials }))
    }

    async fn revoke_media_node_credential(
        &self,
        req: Request<pb::RevokeMediaNodeCredentialRequest>,
    ) -> Result<Response<pb::RevokeMediaNodeCredentialResponse>, Status> {
        Caller::of(&req)?.require_operator()?;
        let rt = &self.0.rt;
        media::revoke_credential(&rt.system_store(), |k, v| rt.auth.observe(k, v), &req.get_ref().credential_id)
            .await?;
        Ok(Response::new(pb::RevokeMediaNodeCredentialResponse {}))
    }
}
