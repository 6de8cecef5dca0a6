//! The gRPC face of calls: the signalling stream and the call methods
//! (devices), call-record policy (tenant servers), media nodes (operators).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use spine_proto::calls::v1::{self as pb, call_records_server::CallRecords, calls_server::Calls};
use spine_proto::calls::v1::{media_nodes_server::MediaNodes, server_event::Event};
use spine_runtime::ids::{self};
use spine_runtime::{Caller, Principal, now_secs};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::Node;
use crate::error::{CallError, invalid, precondition};
use crate::machine;
use crate::media;
use crate::model::{DevKey, MediaRec, Ring, parse_id};
use crate::records;
use crate::turn;
use crate::view::render;

mod call_records;
mod media_nodes;

use crate::relay::forwarded;

pub struct CallsApi(pub(crate) Arc<Node>);
pub struct CallRecordsApi;
pub struct MediaNodesApi(pub(crate) Arc<Node>);

/// The calling device.
pub(crate) fn device<T>(req: &Request<T>) -> Result<DevKey, CallError> {
    match Caller::of(req).map_err(CallError::Caller)?.principal() {
        Principal::Device { tenant, account_id, device_id, .. } => {
            Ok(DevKey { tenant: tenant.to_string(), account: account_id.clone(), device: device_id.clone() })
        }
        _ => Err(CallError::DevicesOnly),
    }
}

pub(crate) fn request_id(v: &str) -> Result<&str, CallError> {
    ids::request_id(v).map_err(|m| invalid("request_id", m))
}

pub(crate) fn call_id(v: &str) -> Result<&str, CallError> {
    parse_id("cl_", v).ok_or_else(|| invalid("call_id", "not a call id"))
}

pub(crate) fn group_hex(gid: &[u8]) -> Result<String, CallError> {
    if gid.is_empty() || gid.len() > 64 {
        return Err(invalid("group_id", "1 to 64 bytes"));
    }
    Ok(hex::encode(gid))
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
                            let _ =
                                tx.send(Box::new(pb::ServerEvent { event: Some(Event::SignalResult(result)) })).await;
                        }
                        break;
                    }
                    None => break,
                };
                let result = match m.message {
                    Some(pb::client_message::Message::Signal(s)) => {
                        // Boxed: this task lives as long as the stream, and an
                        // idle one should not hold a signal's state inline.
                        match Box::pin(node.signal(&me, auth.as_ref(), false, &s)).await.map_err(Status::from) {
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
                if tx.send(Box::new(pb::ServerEvent { event: Some(Event::SignalResult(result)) })).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(out)))
    }

    type EventsStream = Pin<Box<dyn Stream<Item = Result<pb::ServerEvent, Status>> + Send>>;

    async fn events(&self, req: Request<pb::EventsRequest>) -> Result<Response<Self::EventsStream>, Status> {
        let me = device(&req)?;
        let principal = Caller::of(&req)?.principal().clone();
        // The same session as Session's, without a client half: signals
        // come in by the unary Signal method.
        let out = self.0.cluster.open(me, principal).await?;
        Ok(Response::new(Box::pin(out)))
    }

    async fn start_call(&self, req: Request<pb::StartCallRequest>) -> Result<Response<pb::Call>, Status> {
        let me = device(&req)?;
        let caller = Caller::of(&req)?;
        self.0.limits.check(crate::config::CallsRate::CallStarts, &me.tenant, &me.account, 1.0)?;
        Ok(Response::new(self.0.start_direct(caller, &me, req.get_ref()).await?))
    }

    async fn start_group_call(&self, req: Request<pb::StartGroupCallRequest>) -> Result<Response<pb::Call>, Status> {
        let me = device(&req)?;
        let caller = Caller::of(&req)?;
        self.0.limits.check(crate::config::CallsRate::CallStarts, &me.tenant, &me.account, 1.0)?;
        Ok(Response::new(self.0.start_group(caller, &me, req.get_ref()).await?))
    }

    async fn answer(&self, req: Request<pb::AnswerRequest>) -> Result<Response<pb::Call>, Status> {
        let me = device(&req)?;
        let id = call_id(&req.get_ref().call_id)?;
        let (rec, v) = self.0.cluster.update(id, |c| machine::answer(c, &me, self.0.clock.now_ms())).await?;
        Ok(Response::new(render(&rec, v, &me)))
    }

    async fn decline(&self, req: Request<pb::DeclineRequest>) -> Result<Response<pb::Call>, Status> {
        let me = device(&req)?;
        let id = call_id(&req.get_ref().call_id)?;
        let (rec, v) = self.0.cluster.update(id, |c| machine::decline(c, &me, self.0.clock.now_ms())).await?;
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
        let roster = spine_read_models::roster::group_roster(&self.0.groups, &g.gid).await?;
        let leaf = roster.as_ref().and_then(|r| r.member(&me.tenant, &me.account, &me.device)).map(|m| m.leaf);
        if leaf.is_none() && !party {
            return Err(CallError::NotFound.into());
        }
        let idle = self.0.idle_ms();
        let (rec, v) = self.0.cluster.update(id, |c| machine::join(c, &me, leaf, self.0.clock.now_ms(), idle)).await?;
        Ok(Response::new(render(&rec, v, &me)))
    }

    async fn hang_up(&self, req: Request<pb::HangUpRequest>) -> Result<Response<pb::Call>, Status> {
        let me = device(&req)?;
        let id = call_id(&req.get_ref().call_id)?;
        let idle = self.0.idle_ms();
        let (rec, v) = self.0.cluster.update(id, |c| machine::hang_up(c, &me, self.0.clock.now_ms(), idle)).await?;
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

    async fn get_media_admission(
        &self,
        req: Request<pb::GetMediaAdmissionRequest>,
    ) -> Result<Response<pb::MediaAdmission>, Status> {
        let me = device(&req)?;
        let id = call_id(&req.get_ref().call_id)?;
        let rec = self.0.live_call_for(id, &me).await?;
        let Some(media) = rec.group.as_ref().and_then(|g| g.media.as_ref()) else {
            return Err(precondition("NO_MEDIA_NODE", "the call has no media node").into());
        };
        let Some(leg) = rec.leg_of(&me) else {
            return Err(precondition("NOT_IN_CALL", "join the call first").into());
        };
        let length = Duration::from_secs(self.0.config.media_admission_secs.max(1));
        let a = crate::admission::admission(&self.0.cluster.secrets, &rec, leg, &media.address, now_secs(), length);
        Ok(Response::new(a))
    }

    async fn get_turn_credentials(
        &self,
        req: Request<pb::GetTurnCredentialsRequest>,
    ) -> Result<Response<pb::TurnCredentials>, Status> {
        let me = device(&req)?;
        let id = call_id(&req.get_ref().call_id)?;
        let rec = self.0.live_call_for(id, &me).await?;
        let ringing = rec.party(&me.account_key()).is_some_and(|p| p.ring == Ring::Ringing);
        if rec.leg_of(&me).is_none() && !ringing {
            return Err(precondition("NOT_IN_CALL", "this device is neither in the call nor ringing for it").into());
        }
        let cfg = &self.0.config.turn;
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
