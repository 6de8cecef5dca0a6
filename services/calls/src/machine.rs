//! The call state machine: every transition, as a pure function on a
//! call's record. The cluster applies them with compare-and-swap, so any
//! node can run any transition and concurrent ones serialize.

use crate::error::{CallError, Result, precondition};
use crate::model::{CallRec, DevKey, End, Kind, Leg, Ring, Role, State, new_id};

fn not_ringing() -> CallError {
    precondition("NOT_RINGING", "this call is not ringing on this account")
}

fn ended() -> CallError {
    precondition("CALL_ENDED", "the call has ended")
}

fn wrong_kind(for_group: bool) -> CallError {
    if for_group {
        precondition("WRONG_CALL_KIND", "this method is for group calls")
    } else {
        precondition("WRONG_CALL_KIND", "this method is for one-to-one calls")
    }
}

/// The party of `me`'s account, or NOT_FOUND: a device learns nothing of a
/// call its account takes no part in.
pub fn check_party(rec: &CallRec, me: &DevKey) -> Result<Role> {
    rec.party(&me.account_key()).map(|p| p.role).ok_or(CallError::NotFound)
}

/// Ends the call: every account still ringing learns how.
pub fn end(rec: &mut CallRec, why: End, now: i64) {
    if rec.state == State::Ended {
        return;
    }
    let ring_end = if why == End::NoAnswer { Ring::TimedOut } else { Ring::Cancelled };
    for p in &mut rec.parties {
        if p.ring == Ring::Ringing {
            p.ring = ring_end.clone();
        }
    }
    rec.state = State::Ended;
    rec.end = Some(why);
    rec.ended_ms = Some(now);
    rec.ring_deadline_ms = 0;
    rec.idle_deadline_ms = 0;
}

fn add_leg(rec: &mut CallRec, me: &DevKey, leaf: u32, now: i64) -> bool {
    if rec.leg_of(me).is_some() {
        return false;
    }
    rec.legs.push(Leg { id: new_id("lg_"), dev: me.clone(), leaf, joined_ms: now });
    true
}

/// A callee device answers a ringing direct call.
pub fn answer(rec: &mut CallRec, me: &DevKey, now: i64) -> Result<()> {
    check_party(rec, me)?;
    if rec.kind != Kind::Direct {
        return Err(wrong_kind(false));
    }
    if rec.state == State::Ended {
        return Err(ended());
    }
    let callee = rec.party_mut(&me.account_key()).filter(|p| p.role == Role::Callee).ok_or_else(not_ringing)?;
    match &callee.ring {
        Ring::Answered(d) if d == &me.device => return Ok(()), // a retry
        Ring::Ringing => {}
        _ => return Err(not_ringing()),
    }
    callee.ring = Ring::Answered(me.device.clone());
    rec.state = State::Active;
    rec.answered_ms = Some(now);
    rec.ring_deadline_ms = 0;
    add_leg(rec, me, 0, now);
    Ok(())
}

/// A rung device declines: a direct call ends; a group call stops ringing
/// the account.
pub fn decline(rec: &mut CallRec, me: &DevKey, now: i64) -> Result<()> {
    check_party(rec, me)?;
    if rec.state == State::Ended {
        return Err(ended());
    }
    let group = rec.kind == Kind::Group;
    let p = rec.party_mut(&me.account_key()).expect("checked party");
    if p.ring != Ring::Ringing {
        return Err(not_ringing());
    }
    if group && !p.devices.contains(&me.device) {
        return Err(not_ringing());
    }
    p.ring = Ring::Declined(me.device.clone());
    if rec.kind == Kind::Direct {
        end(rec, End::Declined, now);
    }
    Ok(())
}

/// A device leaves: the caller of a ringing call cancels it; an answered
/// direct call ends; a group call loses a participant and ends with its
/// last one.
pub fn hang_up(rec: &mut CallRec, me: &DevKey, now: i64, idle_ms: i64) -> Result<()> {
    let role = check_party(rec, me)?;
    if rec.state == State::Ended {
        return Err(ended());
    }
    if rec.leg_of(me).is_none() {
        return Err(precondition("NOT_IN_CALL", "this device is not in the call (ringing devices decline)"));
    }
    match rec.kind {
        Kind::Direct if rec.state == State::Ringing && role == Role::Caller => end(rec, End::Cancelled, now),
        Kind::Direct => end(rec, End::HungUp, now),
        Kind::Group => {
            rec.legs.retain(|l| &l.dev != me);
            after_group_change(rec, now, idle_ms);
        }
    }
    Ok(())
}

/// A roster device joins a group call.
pub fn join(rec: &mut CallRec, me: &DevKey, leaf: Option<u32>, now: i64, idle_ms: i64) -> Result<()> {
    check_party(rec, me).or_else(|_| if leaf.is_some() { Ok(Role::Member) } else { Err(CallError::NotFound) })?;
    if rec.kind != Kind::Group {
        return Err(wrong_kind(true));
    }
    if rec.state == State::Ended {
        return Err(ended());
    }
    let Some(leaf) = leaf else {
        return Err(precondition("NOT_A_MEMBER", "this device is not in the group's roster"));
    };
    if rec.party(&me.account_key()).is_none() {
        // A member added to the group after the call started.
        rec.parties.push(crate::model::Party {
            who: me.account_key(),
            role: Role::Member,
            ring: Ring::None,
            devices: vec![me.device.clone()],
            handle: None,
        });
    }
    let p = rec.party_mut(&me.account_key()).expect("party present");
    if p.ring == Ring::Ringing {
        p.ring = Ring::Answered(me.device.clone());
    }
    if !p.devices.contains(&me.device) {
        p.devices.push(me.device.clone());
    }
    if add_leg(rec, me, leaf, now) && rec.answered_ms.is_none() && rec.legs.len() >= 2 {
        rec.answered_ms = Some(now);
    }
    after_group_change(rec, now, idle_ms);
    Ok(())
}

/// Keeps a group call's idle deadline and end in step with its legs.
fn after_group_change(rec: &mut CallRec, now: i64, idle_ms: i64) {
    if rec.legs.is_empty() {
        end(rec, End::EveryoneLeft, now);
    } else if rec.legs.len() < 2 {
        if rec.idle_deadline_ms == 0 {
            rec.idle_deadline_ms = now + idle_ms;
        }
    } else {
        rec.idle_deadline_ms = 0;
    }
}

/// Applies the group's current roster and epoch: participants no longer in
/// the roster are removed. Returns whether anything changed.
pub fn apply_roster(
    rec: &mut CallRec,
    roster: &spine_read_models::roster::GroupRoster,
    now: i64,
    idle_ms: i64,
) -> bool {
    let Some(g) = rec.group.as_mut() else { return false };
    let mut changed = false;
    if g.epoch != roster.epoch {
        g.epoch = roster.epoch;
        changed = true;
    }
    let before = rec.legs.len();
    rec.legs.retain(|l| roster.member(&l.dev.tenant, &l.dev.account, &l.dev.device).is_some());
    for p in &mut rec.parties {
        let keep: Vec<String> =
            p.devices.iter().filter(|d| roster.member(&p.who.tenant, &p.who.account, d).is_some()).cloned().collect();
        if keep != p.devices {
            p.devices = keep;
            changed = true;
        }
        if p.devices.is_empty() && p.ring == Ring::Ringing {
            p.ring = Ring::Cancelled;
        }
    }
    if rec.legs.len() != before {
        changed = true;
        after_group_change(rec, now, idle_ms);
    }
    changed
}

/// Devices whose signalling session has been gone too long (`lost`) leave
/// the call: a one-to-one call ends if any of its legs is lost (the other
/// side would wait for nobody); a group call drops them, and ends if none
/// is left. Returns whether anything changed.
pub fn lose_legs(rec: &mut CallRec, lost: &[DevKey], now: i64, idle_ms: i64) -> bool {
    if rec.state == State::Ended || !rec.legs.iter().any(|l| lost.contains(&l.dev)) {
        return false;
    }
    match rec.kind {
        Kind::Direct => end(rec, End::ConnectionLost, now),
        Kind::Group => {
            rec.legs.retain(|l| !lost.contains(&l.dev));
            if rec.legs.is_empty() {
                end(rec, End::ConnectionLost, now);
            } else {
                after_group_change(rec, now, idle_ms);
            }
        }
    }
    true
}

/// Timers: ringing that ran out, idle group calls. Returns whether anything
/// changed.
pub fn tick(rec: &mut CallRec, now: i64) -> bool {
    if rec.state == State::Ended {
        return false;
    }
    let mut changed = false;
    if rec.ring_deadline_ms > 0 && now >= rec.ring_deadline_ms {
        match rec.kind {
            Kind::Direct => end(rec, End::NoAnswer, now),
            Kind::Group => {
                for p in &mut rec.parties {
                    if p.ring == Ring::Ringing {
                        p.ring = Ring::TimedOut;
                    }
                }
                rec.ring_deadline_ms = 0;
            }
        }
        changed = true;
    }
    if rec.kind == Kind::Group && rec.idle_deadline_ms > 0 && now >= rec.idle_deadline_ms && rec.legs.len() < 2 {
        end(rec, End::Idle, now);
        changed = true;
    }
    changed
}

/// Whether a callee who is already `occupied` (in that many other calls)
/// can be rung: free, waiting (in one call, so this one rings as call
/// waiting), or busy (in a call with another already waiting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Free,
    Waiting,
    Busy,
}

pub fn availability(occupied: usize) -> Availability {
    match occupied {
        0 => Availability::Free,
        1 => Availability::Waiting,
        _ => Availability::Busy,
    }
}

/// What a new direct call meets when its pair already has a live call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairTaken {
    /// The same request again: answer with the call it made.
    Retry,
    /// The callee is ringing the caller at the same time: the second
    /// start answers the first call.
    Glare,
    /// A live call between the two: ALREADY_EXISTS.
    Exists,
}

/// Decides a direct call start by `caller` (request `request`) to
/// `callee` against the pair's live call `existing`.
pub fn pair_taken(
    existing: &CallRec,
    request: &str,
    caller: &crate::model::AccountKey,
    callee: &crate::model::AccountKey,
) -> PairTaken {
    if existing.request == request {
        return PairTaken::Retry;
    }
    let glare = existing.state == State::Ringing
        && existing.caller().is_some_and(|p| &p.who == callee)
        && existing.callee().is_some_and(|p| &p.who == caller);
    if glare { PairTaken::Glare } else { PairTaken::Exists }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AccountKey, Party};

    fn dev(a: &str, d: &str) -> DevKey {
        DevKey { tenant: "tn_t".into(), account: a.into(), device: d.into() }
    }

    fn direct() -> CallRec {
        CallRec {
            id: "cl_x".into(),
            kind: Kind::Direct,
            video: false,
            state: State::Ringing,
            end: None,
            home: "n".into(),
            request: "r".into(),
            started_ms: 0,
            answered_ms: None,
            ended_ms: None,
            ring_deadline_ms: 45_000,
            idle_deadline_ms: 0,
            waiting: false,
            parties: vec![
                Party {
                    who: AccountKey { tenant: "tn_t".into(), account: "a".into() },
                    role: Role::Caller,
                    ring: Ring::None,
                    devices: vec![],
                    handle: None,
                },
                Party {
                    who: AccountKey { tenant: "tn_t".into(), account: "b".into() },
                    role: Role::Callee,
                    ring: Ring::Ringing,
                    devices: vec![],
                    handle: None,
                },
            ],
            legs: vec![Leg { id: "lg_a".into(), dev: dev("a", "a1"), leaf: 0, joined_ms: 0 }],
            group: None,
        }
    }

    #[test]
    fn answer_then_second_device_cannot() {
        let mut r = direct();
        answer(&mut r, &dev("b", "b1"), 10).unwrap();
        assert_eq!(r.state, State::Active);
        assert_eq!(r.callee().unwrap().ring, Ring::Answered("b1".into()));
        answer(&mut r, &dev("b", "b1"), 11).unwrap(); // retry
        assert_eq!(r.legs.len(), 2);
        assert!(matches!(answer(&mut r, &dev("b", "b2"), 12), Err(CallError::Precondition { .. })));
        // The caller cannot answer its own call; a stranger learns nothing.
        assert!(matches!(answer(&mut r, &dev("a", "a2"), 12), Err(CallError::Precondition { .. })));
        assert!(matches!(answer(&mut r, &dev("z", "z1"), 12), Err(CallError::NotFound)));
    }

    #[test]
    fn cancel_decline_timeout_each_end_the_ring() {
        let mut r = direct();
        hang_up(&mut r, &dev("a", "a1"), 5, 0).unwrap();
        assert_eq!(
            (r.state, r.end, r.callee().unwrap().ring.clone()),
            (State::Ended, Some(End::Cancelled), Ring::Cancelled)
        );
        let mut r = direct();
        decline(&mut r, &dev("b", "b2"), 5).unwrap();
        assert_eq!((r.end, r.callee().unwrap().ring.clone()), (Some(End::Declined), Ring::Declined("b2".into())));
        let mut r = direct();
        assert!(!tick(&mut r, 44_999));
        assert!(tick(&mut r, 45_000));
        assert_eq!((r.end, r.callee().unwrap().ring.clone()), (Some(End::NoAnswer), Ring::TimedOut));
        // A ringing callee device hangs up: it must decline instead.
        let mut r = direct();
        assert!(matches!(hang_up(&mut r, &dev("b", "b1"), 5, 0), Err(CallError::Precondition { .. })));
    }

    #[test]
    fn lost_devices_leave_and_the_last_one_ends_the_call() {
        // One-to-one: either side lost ends it, ringing or answered.
        let mut r = direct();
        assert!(!lose_legs(&mut r, &[dev("b", "b1")], 5, 0), "a ringing device has no leg to lose");
        assert!(lose_legs(&mut r, &[dev("a", "a1")], 5, 0));
        assert_eq!(
            (r.state, r.end, r.callee().unwrap().ring.clone()),
            (State::Ended, Some(End::ConnectionLost), Ring::Cancelled)
        );
        let mut r = direct();
        answer(&mut r, &dev("b", "b1"), 1).unwrap();
        assert!(lose_legs(&mut r, &[dev("b", "b1")], 5, 0));
        assert_eq!(r.end, Some(End::ConnectionLost));
        assert!(!lose_legs(&mut r, &[dev("a", "a1")], 6, 0), "ended calls stay as they are");

        // Group: lost legs are dropped; the last one ends the call.
        let mut g = direct();
        g.kind = Kind::Group;
        g.state = State::Active;
        g.ring_deadline_ms = 0;
        g.legs.push(Leg { id: "lg_b".into(), dev: dev("b", "b1"), leaf: 1, joined_ms: 0 });
        g.legs.push(Leg { id: "lg_c".into(), dev: dev("c", "c1"), leaf: 2, joined_ms: 0 });
        assert!(lose_legs(&mut g, &[dev("c", "c1")], 5, 1000));
        assert_eq!((g.state, g.legs.len(), g.idle_deadline_ms), (State::Active, 2, 0));
        assert!(lose_legs(&mut g, &[dev("b", "b1")], 6, 1000));
        assert_eq!((g.state, g.legs.len(), g.idle_deadline_ms), (State::Active, 1, 1006));
        assert!(lose_legs(&mut g, &[dev("a", "a1")], 7, 1000));
        assert_eq!((g.state, g.end), (State::Ended, Some(End::ConnectionLost)));
    }

    fn group(legs: usize) -> CallRec {
        let mut g = direct();
        g.kind = Kind::Group;
        g.state = State::Active;
        g.ring_deadline_ms = 0;
        g.legs.truncate(0);
        for (i, a) in ["a", "b", "c"].iter().take(legs).enumerate() {
            g.legs.push(Leg { id: format!("lg_{a}"), dev: dev(a, &format!("{a}1")), leaf: i as u32, joined_ms: 0 });
        }
        g
    }

    #[test]
    fn ring_timeout_ends_a_direct_call_and_stops_a_group_ringing() {
        let mut r = direct();
        assert!(!tick(&mut r, 44_999), "nothing before the deadline");
        assert!(tick(&mut r, 45_000));
        assert_eq!((r.state, r.end, r.ended_ms), (State::Ended, Some(End::NoAnswer), Some(45_000)));
        assert!(!tick(&mut r, 90_000), "an ended call does not change again");
        // A group call keeps running; only the ringing stops.
        let mut g = group(2);
        g.ring_deadline_ms = 10;
        g.parties[1].ring = Ring::Ringing;
        assert!(tick(&mut g, 10));
        assert_eq!((g.state, g.parties[1].ring.clone(), g.ring_deadline_ms), (State::Active, Ring::TimedOut, 0));
    }

    #[test]
    fn glare_answers_the_first_call_and_a_retry_returns_it() {
        let a = AccountKey { tenant: "tn_t".into(), account: "a".into() };
        let b = AccountKey { tenant: "tn_t".into(), account: "b".into() };
        let r = direct(); // a rings b
        assert_eq!(pair_taken(&r, "r", &a, &b), PairTaken::Retry);
        assert_eq!(pair_taken(&r, "other", &a, &b), PairTaken::Exists, "a calls b twice");
        assert_eq!(pair_taken(&r, "from-b", &b, &a), PairTaken::Glare, "b calls a while a rings b");
        // Glare is resolved by answering the first call from b's device.
        let mut r = direct();
        answer(&mut r, &dev("b", "b1"), 3).unwrap();
        assert_eq!(r.state, State::Active);
        // Once answered, a new call either way is a live call, not glare.
        assert_eq!(pair_taken(&r, "from-b", &b, &a), PairTaken::Exists);
    }

    #[test]
    fn busy_and_waiting_follow_the_callees_other_calls() {
        assert_eq!(availability(0), Availability::Free);
        assert_eq!(availability(1), Availability::Waiting, "one call: this one rings as call waiting");
        assert_eq!(availability(2), Availability::Busy, "a call and one waiting: busy");
        assert_eq!(availability(7), Availability::Busy);
    }

    #[test]
    fn a_decline_on_any_device_ends_the_ring_on_all_of_them() {
        let mut r = direct();
        r.parties[1].devices = vec!["b1".into(), "b2".into()];
        decline(&mut r, &dev("b", "b2"), 4).unwrap();
        assert_eq!((r.state, r.end), (State::Ended, Some(End::Declined)));
        // The other device can neither answer nor decline any more.
        assert!(matches!(answer(&mut r, &dev("b", "b1"), 5), Err(CallError::Precondition { .. })));
        assert!(matches!(decline(&mut r, &dev("b", "b1"), 5), Err(CallError::Precondition { .. })));
        // In a group call a decline stops the ringing for that account only.
        let mut g = group(2);
        g.parties[1].ring = Ring::Ringing;
        g.parties[1].devices = vec!["b1".into(), "b2".into()];
        decline(&mut g, &dev("b", "b2"), 4).unwrap();
        assert_eq!((g.state, g.parties[1].ring.clone()), (State::Active, Ring::Declined("b2".into())));
        assert!(matches!(decline(&mut g, &dev("b", "b1"), 5), Err(CallError::Precondition { .. })));
    }

    #[test]
    fn an_answer_elsewhere_stops_the_other_devices() {
        let mut r = direct();
        r.parties[1].devices = vec!["b1".into(), "b2".into()];
        answer(&mut r, &dev("b", "b1"), 7).unwrap();
        assert_eq!((r.answered_ms, r.ring_deadline_ms), (Some(7), 0));
        assert!(matches!(answer(&mut r, &dev("b", "b2"), 8), Err(CallError::Precondition { .. })));
        assert!(matches!(decline(&mut r, &dev("b", "b2"), 8), Err(CallError::Precondition { .. })));
        assert!(!tick(&mut r, 1_000_000), "an answered call does not time out");
        hang_up(&mut r, &dev("b", "b1"), 9, 0).unwrap();
        assert_eq!(r.end, Some(End::HungUp));
    }

    #[test]
    fn a_group_call_alone_for_the_idle_time_ends() {
        let mut g = group(2);
        hang_up(&mut g, &dev("b", "b1"), 100, 1000).unwrap();
        assert_eq!((g.state, g.idle_deadline_ms), (State::Active, 1100));
        assert!(!tick(&mut g, 1099));
        // Someone joins in time: the deadline is gone.
        join(&mut g, &dev("c", "c1"), Some(2), 1050, 1000).unwrap();
        assert_eq!(g.idle_deadline_ms, 0);
        assert!(!tick(&mut g, 5000));
        hang_up(&mut g, &dev("c", "c1"), 6000, 1000).unwrap();
        assert!(tick(&mut g, 7000));
        assert_eq!((g.state, g.end), (State::Ended, Some(End::Idle)));
        // The last one leaving ends it at once.
        let mut g = group(1);
        hang_up(&mut g, &dev("a", "a1"), 5, 1000).unwrap();
        assert_eq!(g.end, Some(End::EveryoneLeft));
        // Joining needs a roster leaf; a one-to-one call cannot be joined.
        let mut g = group(1);
        assert!(matches!(join(&mut g, &dev("z", "z1"), None, 5, 1000), Err(CallError::NotFound)));
        assert!(matches!(join(&mut direct(), &dev("b", "b1"), Some(1), 5, 1000), Err(CallError::Precondition { .. })));
    }
}
