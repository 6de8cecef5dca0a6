//! A call as one device sees it: its role, how ringing went on it, who is
//! in the call, named only as its tenant may know them.

use spine_proto::calls::v1 as pb;
use spine_proto::common::v1::{InteropRef, PeerRef, peer_ref};

use crate::model::{AccountKey, CallRec, DevKey, End, Kind, Party, Ring, Role, State};

fn ts(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

pub fn end_reason(e: End) -> pb::EndReason {
    match e {
        End::HungUp => pb::EndReason::HungUp,
        End::Cancelled => pb::EndReason::Cancelled,
        End::Declined => pb::EndReason::Declined,
        End::NoAnswer => pb::EndReason::NoAnswer,
        End::Busy => pb::EndReason::Busy,
        End::EveryoneLeft => pb::EndReason::EveryoneLeft,
        End::Idle => pb::EndReason::Idle,
        End::ServiceLost => pb::EndReason::ServiceLost,
        End::AccountDeleted => pb::EndReason::AccountDeleted,
        End::ConnectionLost => pb::EndReason::ConnectionLost,
    }
}

/// How `reader`'s tenant may name `who`: by account id within a tenant,
/// by the interop handle `who` consented to across tenants, else not at all.
fn name(reader: &DevKey, who: &AccountKey, party: Option<&Party>) -> Option<PeerRef> {
    if who.tenant == reader.tenant {
        return Some(PeerRef { peer: Some(peer_ref::Peer::AccountId(who.account.clone())) });
    }
    let handle = party?.handle.clone()?;
    Some(PeerRef { peer: Some(peer_ref::Peer::Interop(InteropRef { tenant_id: who.tenant.clone(), handle })) })
}

fn ring_state(rec: &CallRec, reader: &DevKey, party: Option<&Party>) -> pb::RingState {
    let Some(p) = party else { return pb::RingState::NotRinging };
    if p.role == Role::Caller || (rec.kind == Kind::Group && !p.devices.contains(&reader.device)) {
        return pb::RingState::NotRinging;
    }
    match &p.ring {
        Ring::None => pb::RingState::NotRinging,
        Ring::Ringing if rec.state == State::Ended => pb::RingState::Cancelled,
        Ring::Ringing => pb::RingState::Ringing,
        Ring::Answered(d) if d == &reader.device => pb::RingState::AnsweredHere,
        Ring::Answered(_) => pb::RingState::AnsweredElsewhere,
        Ring::Declined(d) if d == &reader.device => pb::RingState::DeclinedHere,
        Ring::Declined(_) => pb::RingState::DeclinedElsewhere,
        Ring::Cancelled => pb::RingState::Cancelled,
        Ring::TimedOut => pb::RingState::TimedOut,
    }
}

/// The call as the device `reader` sees it at `version`.
pub fn render(rec: &CallRec, version: i64, reader: &DevKey) -> pb::Call {
    let mine = reader.account_key();
    let party = rec.party(&mine);
    let role = match party.map(|p| p.role) {
        Some(Role::Caller) => pb::Role::Caller,
        Some(Role::Callee) => pb::Role::Callee,
        _ => pb::Role::Member,
    };
    let participants = rec
        .legs
        .iter()
        .map(|l| {
            let who = l.dev.account_key();
            pb::Participant {
                leg_id: l.id.clone(),
                who: name(reader, &who, rec.party(&who)),
                you: &l.dev == reader,
                leaf_index: l.leaf,
                joined_at: Some(ts(l.joined_ms)),
            }
        })
        .collect();
    let peer = match rec.kind {
        Kind::Direct => rec.parties.iter().find(|p| p.who != mine).and_then(|p| name(reader, &p.who, Some(p))),
        Kind::Group => None,
    };
    let group = rec.group.as_ref();
    pb::Call {
        call_id: rec.id.clone(),
        kind: match rec.kind {
            Kind::Direct => pb::CallKind::Direct,
            Kind::Group => pb::CallKind::Group,
        } as i32,
        video: rec.video,
        state: match rec.state {
            State::Ringing => pb::CallState::Ringing,
            State::Active => pb::CallState::Active,
            State::Ended => pb::CallState::Ended,
        } as i32,
        end_reason: rec.end.map_or(pb::EndReason::Unspecified, end_reason) as i32,
        role: role as i32,
        ring: ring_state(rec, reader, party) as i32,
        your_leg_id: rec.leg_of(reader).map(|l| l.id.clone()).unwrap_or_default(),
        participants,
        peer,
        waiting: rec.waiting && role == pb::Role::Callee,
        group_id: group.and_then(|g| hex::decode(&g.gid).ok()).unwrap_or_default(),
        epoch: group.map_or(0, |g| g.epoch),
        media: group.and_then(|g| g.media.as_ref()).map(|m| pb::MediaNode {
            node_id: m.id.clone(),
            address: m.address.clone(),
            region: m.region.clone(),
        }),
        started_at: Some(ts(rec.started_ms)),
        answered_at: rec.answered_ms.map(ts),
        ended_at: rec.ended_ms.map(ts),
        version: version.max(0) as u64,
    }
}
