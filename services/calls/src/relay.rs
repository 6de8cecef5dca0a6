//! Payload relay: opaque signalling payloads (SDP, ICE) from one device to
//! another, straight to the local stream or forwarded once to the node
//! holding the target's session. Payloads are never parsed or stored.

use std::collections::BTreeSet;
use std::time::Duration;

use spine_proto::calls::v1 as pb;
use spine_proto::calls::v1::calls_client::CallsClient;
use spine_proto::calls::v1::server_event::Event;
use tonic::Request;
use tonic::metadata::{MetadataMap, MetadataValue};

use crate::error::CallError;

use crate::Node;
use crate::error::{invalid, precondition};
use crate::model::{DevKey, Kind, Ring, State, parse_id};
use crate::service::call_id;

const SIGNAL: &str = "/spine.calls.v1.Calls/Signal";

/// Largest signalling payload.
pub const MAX_PAYLOAD: usize = 64 * 1024;

impl Node {
    /// Relays a payload to devices of a call; returns how many it reached.
    /// A forwarded request is delivered only to this node's streams.
    pub(crate) async fn signal(
        &self,
        me: &DevKey,
        auth: Option<&MetadataValue<tonic::metadata::Ascii>>,
        forwarded: bool,
        r: &pb::SignalRequest,
    ) -> Result<u32, CallError> {
        let id = call_id(&r.call_id)?;
        if r.payload.is_empty() || r.payload.len() > MAX_PAYLOAD {
            return Err(invalid("payload", format!("1 to {MAX_PAYLOAD} bytes")));
        }
        if !r.to_leg_id.is_empty() && parse_id("lg_", &r.to_leg_id).is_none() {
            return Err(invalid("to_leg_id", "not a leg id"));
        }
        if !forwarded {
            // Counted once, where the device sent it.
            self.limits.check(crate::config::CallsRate::Signals, &me.tenant, &me.account, 1.0)?;
        }
        let (rec, rev) = self.call_for(id, me, forwarded).await?;
        if rec.state == State::Ended {
            return Err(precondition("CALL_ENDED", "the call has ended"));
        }
        let mine = me.account_key();
        let my_leg = rec.leg_of(me).map(|l| l.id.clone());
        let ringing_here = rec
            .party(&mine)
            .is_some_and(|p| p.ring == Ring::Ringing && (rec.kind == Kind::Direct || p.devices.contains(&me.device)));
        if my_leg.is_none() && !ringing_here {
            return Err(precondition("NOT_IN_CALL", "this device is neither in the call nor ringing for it"));
        }
        let mut targets: Vec<DevKey> = Vec::new();
        if r.to_leg_id.is_empty() {
            targets.extend(rec.legs.iter().filter(|l| &l.dev != me).map(|l| l.dev.clone()));
            if rec.kind == Kind::Direct
                && rec.state == State::Ringing
                && let Some(callee) = rec.callee()
                && callee.who != mine
            {
                // The callee's devices are the sessions the mirror knows:
                // every one opened before the call was written, once the
                // watch has come that far.
                if !self.cluster.caught_up(rev, Duration::from_secs(2)).await {
                    tracing::debug!("signal: the mirror's watch is behind the call; sending to the sessions it knows");
                }
                for (d, ..) in self.cluster.sessions_of(&callee.who) {
                    targets.push(DevKey {
                        tenant: callee.who.tenant.clone(),
                        account: callee.who.account.clone(),
                        device: d,
                    });
                }
            }
        } else {
            let leg = rec.legs.iter().find(|l| l.id == r.to_leg_id).ok_or(CallError::Missing("leg"))?;
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
            match CallsClient::new(self.cluster.peer(&addr).map_err(CallError::Peer)?).signal(fwd).await {
                Ok(resp) => delivered += resp.into_inner().delivered,
                Err(e) => tracing::debug!(code = ?e.code(), "signal not forwarded to a peer node"),
            }
        }
        Ok(delivered)
    }
}

/// Whether a peer node forwarded this Signal (then it is delivered only to
/// this node's streams): only a proof made with the deployment's peer
/// secret counts, which no client can make.
pub(crate) fn forwarded(node: &Node, meta: &MetadataMap) -> bool {
    spine_runtime::secrets::forwarded_by_peer(&node.cluster.secrets, meta, SIGNAL)
}
