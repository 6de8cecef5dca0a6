//! Admission to group calls' rooms on media nodes (Janus VideoRoom).
//!
//! Nothing here is stored: a call's room id, each leg's participant id and
//! its tokens are keyed hashes (the deployment's pseudonym secret, each
//! with its own purpose) of the call id, the leg id and the time period, so
//! every calls node computes the same ones. A token admits one leg to one
//! room for two periods (`calls.media_admission_secs`): the one it was
//! issued in and the next. The media node's agent learns, from
//! `MediaNodes.WatchRooms`, every room it must hold and the tokens that
//! may join each; devices get their own from `Calls.GetMediaAdmission`.

use std::time::Duration;

use spine_proto::calls::v1 as pb;
use spine_runtime::secrets::Secrets;

use crate::model::{CallRec, Leg, State};

/// Janus room and participant ids are JSON numbers: kept below 2^53.
fn id(secrets: &Secrets, purpose: &str, of: &str) -> u64 {
    let hex = secrets.pseudonym(purpose, &[of]);
    u64::from_str_radix(&hex[..13], 16).expect("hex") + 1
}

/// The call's room on its media node.
pub fn room_id(secrets: &Secrets, call_id: &str) -> u64 {
    id(secrets, "media-room", call_id)
}

/// The id a leg joins its call's room as.
pub fn participant_id(secrets: &Secrets, leg_id: &str) -> u64 {
    id(secrets, "media-participant", leg_id)
}

/// The period a time falls in.
pub fn period(now_secs: i64, period: Duration) -> i64 {
    now_secs.div_euclid(period.as_secs().max(1) as i64)
}

/// The token admitting `leg` to `call`'s room, issued in period `p`.
pub fn token(secrets: &Secrets, call_id: &str, leg_id: &str, p: i64) -> String {
    secrets.pseudonym("media-admission", &[call_id, leg_id, &p.to_string()])
}

/// A device's admission (its leg in a call placed on a media node).
pub fn admission(
    secrets: &Secrets,
    rec: &CallRec,
    leg: &Leg,
    address: &str,
    now_secs: i64,
    length: Duration,
) -> pb::MediaAdmission {
    let p = period(now_secs, length);
    let expires = (p + 2) * length.as_secs().max(1) as i64;
    pb::MediaAdmission {
        address: address.to_string(),
        room_id: room_id(secrets, &rec.id),
        participant_id: participant_id(secrets, &leg.id),
        token: token(secrets, &rec.id, &leg.id, p),
        expires_at: Some(prost_types::Timestamp { seconds: expires, nanos: 0 }),
    }
}

/// Every room media node `node` must hold now, sorted (so two answers
/// compare equal when nothing changed): one per live group call placed on
/// it, each with its legs and the tokens that admit them (this period's
/// and the last one's).
pub fn rooms_on<'a>(
    secrets: &Secrets,
    node: &str,
    calls: impl Iterator<Item = &'a CallRec>,
    now_secs: i64,
    length: Duration,
) -> pb::MediaRooms {
    let p = period(now_secs, length);
    let mut rooms: Vec<pb::MediaRoom> = calls
        .filter(|c| c.state != State::Ended)
        .filter(|c| c.group.as_ref().and_then(|g| g.media.as_ref()).is_some_and(|m| m.id == node))
        .map(|c| {
            let mut participants: Vec<pb::RoomParticipant> = c
                .legs
                .iter()
                .map(|l| pb::RoomParticipant {
                    participant_id: participant_id(secrets, &l.id),
                    tokens: vec![token(secrets, &c.id, &l.id, p - 1), token(secrets, &c.id, &l.id, p)],
                })
                .collect();
            participants.sort_by_key(|x| x.participant_id);
            pb::MediaRoom { room_id: room_id(secrets, &c.id), participants }
        })
        .collect();
    rooms.sort_by_key(|r| r.room_id);
    pb::MediaRooms { rooms }
}
