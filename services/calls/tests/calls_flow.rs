//! One-to-one calls over real streams on two nodes sharing one etcd: a
//! multi-device callee, answer, decline, cancel, timeout, busy and waiting,
//! glare, a cross-tenant call through an interop handle, reconnects and
//! stream replacement.

mod support;

use std::time::Duration;

use spine_proto::calls::v1 as pb;
use spine_proto::calls::v1::calls_client::CallsClient;
use spine_proto::common::v1::peer_ref;
use spine_runtime::config::Backend;
use spine_testing::req;
use support::*;
use tonic::Code;

/// The caller's node writes a call and has it in its mirror at once, but
/// learns of the callee's sessions on other nodes by its watch: an offer
/// sent to the ringing callee must reach a session that watch has not
/// brought yet. Node 0's watch is made deaf before Bob connects on node 1,
/// and comes back (as after a lost connection) while Alice's offer waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_offer_reaches_a_ringing_session_the_callers_node_has_not_seen_yet() {
    let etcd = spine_testing::EtcdServer::start().await;
    let store = etcd.store().await;
    let tap = spine_testing::StoreTap::new(store.clone());
    let (n, _) = nodes_on_each(vec![tap.clone(), store], Some(etcd), None, |_, _| {}).await;
    let t = n[0].tenant("messenger").await;
    let alice_acct = n[0].account(&t).await;
    let bob_acct = n[0].account(&t).await;
    everyone_can_call(&n[0], &t, &bob_acct).await;
    let mut alice = Phone::connect(&n[0], n[0].device_of(&t, &alice_acct).await).await;
    tap.deafen();
    let mut bob = Phone::connect(&n[1], n[0].device_of(&t, &bob_acct).await).await;
    let call = alice.start(account_ref(&bob_acct), false).await.unwrap();
    bob.call_where(&call.call_id, |c| state(c) == pb::CallState::Ringing).await;
    let heal = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        tap.cut();
    });
    let offer = b"v=0 (opaque offer)".to_vec();
    alice.send_signal(&call.call_id, "", offer.clone()).await;
    assert_eq!(bob.signal().await.payload, offer);
    heal.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_to_one_across_nodes() {
    let n = nodes(Backend::Etcd, 2, |_, _| {}).await;
    let t = n[0].tenant("messenger").await;
    let alice_acct = n[0].account(&t).await;
    let bob_acct = n[0].account(&t).await;
    everyone_can_call(&n[0], &t, &bob_acct).await;

    let mut alice = Phone::connect(&n[0], n[0].device_of(&t, &alice_acct).await).await;
    let mut b1 = Phone::connect(&n[1], n[0].device_of(&t, &bob_acct).await).await;
    let mut b2 = Phone::connect(&n[0], n[0].device_of(&t, &bob_acct).await).await;
    assert!(alice.synced.is_empty() && b1.synced.is_empty());

    // Alice calls Bob: both of his devices ring, on either node.
    let call = alice.start(account_ref(&bob_acct), true).await.unwrap();
    assert_eq!((state(&call), ring(&call)), (pb::CallState::Ringing, pb::RingState::NotRinging));
    assert!(!call.your_leg_id.is_empty());
    assert_eq!(call.peer, account_ref(&bob_acct));
    let id = call.call_id.clone();
    for b in [&mut b1, &mut b2] {
        let c = b.call_where(&id, |c| state(c) == pb::CallState::Ringing).await;
        assert_eq!((ring(&c), c.role, c.video), (pb::RingState::Ringing, pb::Role::Callee as i32, true));
        assert_eq!(c.peer, account_ref(&alice_acct));
    }
    // The offer reaches every ringing device, across nodes, as opaque bytes
    // (`delivered` counts only devices in the call, not ringing ones).
    let offer = b"v=0 o=- 1 1 IN IP4 198.51.100.7 (opaque)".to_vec();
    let r = alice.send_signal(&id, "", offer.clone()).await;
    assert_eq!((r.code, r.delivered), (0, 0));
    for b in [&mut b1, &mut b2] {
        let s = b.signal().await;
        assert_eq!((s.payload.clone(), s.from_leg_id.clone()), (offer.clone(), call.your_leg_id.clone()));
    }

    // b1 answers on node 1: the caller learns it; b2 stops ringing.
    let answered = b1.answer(&id).await.unwrap();
    assert_eq!((state(&answered), ring(&answered)), (pb::CallState::Active, pb::RingState::AnsweredHere));
    let c = alice.call_where(&id, |c| state(c) == pb::CallState::Active).await;
    assert_eq!(c.participants.len(), 2);
    let c2 = b2.call_where(&id, |c| state(c) == pb::CallState::Active).await;
    assert_eq!(ring(&c2), pb::RingState::AnsweredElsewhere);
    assert!(c2.your_leg_id.is_empty());
    // A second answer is refused; the answer is relayed to the caller's leg.
    let late = b2.answer(&id).await.unwrap_err();
    assert_eq!((late.code(), reason(&late).as_str()), (Code::FailedPrecondition, "NOT_RINGING"));
    let r = b1.send_signal(&id, &call.your_leg_id, b"answer".to_vec()).await;
    assert_eq!((r.code, r.delivered), (0, 1));
    assert_eq!(alice.signal().await.from_leg_id, answered.your_leg_id);
    // Unary Signal too.
    let u = b1
        .calls()
        .signal(b1.req(pb::SignalRequest {
            call_id: id.clone(),
            to_leg_id: call.your_leg_id.clone(),
            payload: b"ice".to_vec(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(u.delivered, 1);
    assert_eq!(alice.signal().await.payload, b"ice");

    // b2 reconnects to the other node: it learns the live call there.
    let b2_dev = b2.dev;
    drop(b2.out);
    drop(b2.events);
    let b2 = Phone::connect(&n[1], b2_dev).await;
    assert_eq!(b2.synced.len(), 1);
    assert_eq!((b2.synced[0].call_id.clone(), ring(&b2.synced[0])), (id.clone(), pb::RingState::AnsweredElsewhere));

    // A second stream of Alice's device replaces the first, by rule.
    let alice_dev = clone_dev(&alice.dev);
    let mut alice2 = Phone::connect(&n[1], alice_dev).await;
    assert_eq!(alice2.synced.len(), 1);
    match alice.next(Duration::from_secs(10)).await {
        Some(Err(s)) => assert_eq!((s.code(), reason(&s).as_str()), (Code::Aborted, "SESSION_REPLACED")),
        other => panic!("the replaced stream must end: {other:?}"),
    }

    // Hang-up ends it for everyone; the live state is gone from the store.
    let ended = b1.hang_up(&id).await.unwrap();
    assert_eq!((state(&ended), end(&ended)), (pb::CallState::Ended, pb::EndReason::HungUp));
    let c = alice2.call_where(&id, |c| state(c) == pb::CallState::Ended).await;
    assert_eq!(end(&c), pb::EndReason::HungUp);
    assert!(spine_testing::eventually(Duration::from_secs(5), || async { live_state(&n[0]).await.is_empty() }).await);
    let gone = alice2.calls().get_call(alice2.req(pb::GetCallRequest { call_id: id.clone() })).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    // Open streams are registered once each; closed ones leave nothing.
    let sessions = || async { n[0].rt.store.count("/spine/sys/calls/sess/").await.unwrap() };
    assert_eq!(sessions().await, 3, "alice (replaced once), b1, b2");
    drop((alice, alice2, b1, b2));
    assert!(spine_testing::eventually(Duration::from_secs(5), || async { sessions().await == 0 }).await);
}

fn clone_dev(d: &spine_testing::Device) -> spine_testing::Device {
    spine_testing::Device {
        tenant: d.tenant.clone(),
        account: d.account.clone(),
        device: d.device.clone(),
        key: d.key.clone(),
        token: d.token.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decline_cancel_timeout_busy_glare() {
    // The nodes' clock moves only when the test says: the ring timeout (30 s
    // in these tests' config) passes without waiting for it.
    let clock = spine_calls::ManualClock::new();
    let n = nodes_on_clock(Backend::Etcd, 2, clock.clone(), |_, _| {}).await;
    let t = n[0].tenant("messenger").await;
    let accts: Vec<String> = futures::future::join_all((0..4).map(|_| n[0].account(&t))).await;
    for a in &accts {
        everyone_can_call(&n[0], &t, a).await;
    }
    let (a, b, c, d) = (&accts[0], &accts[1], &accts[2], &accts[3]);
    let mut alice = Phone::connect(&n[0], n[0].device_of(&t, a).await).await;
    let mut b1 = Phone::connect(&n[1], n[0].device_of(&t, b).await).await;
    let mut b2 = Phone::connect(&n[0], n[0].device_of(&t, b).await).await;
    let mut carol = Phone::connect(&n[1], n[0].device_of(&t, c).await).await;
    let dave = Phone::connect(&n[0], n[0].device_of(&t, d).await).await;

    // Decline on one device: the call ends; each device learns how.
    let id = alice.start(account_ref(b), false).await.unwrap().call_id;
    b1.call_where(&id, |c| ring(c) == pb::RingState::Ringing).await;
    b2.call_where(&id, |c| ring(c) == pb::RingState::Ringing).await;
    b2.decline(&id).await.unwrap();
    assert_eq!(end(&alice.call_where(&id, |c| state(c) == pb::CallState::Ended).await), pb::EndReason::Declined);
    assert_eq!(ring(&b1.call_where(&id, |c| state(c) == pb::CallState::Ended).await), pb::RingState::DeclinedElsewhere);
    assert_eq!(ring(&b2.call_where(&id, |c| state(c) == pb::CallState::Ended).await), pb::RingState::DeclinedHere);

    // Cancel: the caller hangs up while ringing.
    let id = alice.start(account_ref(b), false).await.unwrap().call_id;
    b1.call_where(&id, |c| ring(c) == pb::RingState::Ringing).await;
    b2.call_where(&id, |c| ring(c) == pb::RingState::Ringing).await;
    assert_eq!(end(&alice.hang_up(&id).await.unwrap()), pb::EndReason::Cancelled);
    for p in [&mut b1, &mut b2] {
        let e = p.call_where(&id, |c| state(c) == pb::CallState::Ended).await;
        assert_eq!((end(&e), ring(&e)), (pb::EndReason::Cancelled, pb::RingState::Cancelled));
    }

    // Ring timeout: nothing ends before the 30 s have passed on the clock;
    // once they have, nobody keeps ringing.
    let started = std::time::Instant::now();
    let id = alice.start(account_ref(b), false).await.unwrap().call_id;
    b1.call_where(&id, |c| ring(c) == pb::RingState::Ringing).await;
    clock.advance(Duration::from_secs(29));
    b1.quiet(Duration::from_millis(600)).await;
    clock.advance(Duration::from_secs(2));
    for p in [&mut b1, &mut b2] {
        let e = p.call_where(&id, |c| state(c) == pb::CallState::Ended).await;
        assert_eq!((end(&e), ring(&e)), (pb::EndReason::NoAnswer, pb::RingState::TimedOut));
    }
    assert_eq!(end(&alice.call_where(&id, |c| state(c) == pb::CallState::Ended).await), pb::EndReason::NoAnswer);
    assert!(started.elapsed() < Duration::from_secs(20), "the timeout followed the clock, not real time");

    // Busy: Bob in a call with Carol gets Alice's call as waiting, and
    // Dave's, with one already waiting, as busy (nothing stored).
    let cb = carol.start(account_ref(b), false).await.unwrap().call_id;
    b1.call_where(&cb, |c| ring(c) == pb::RingState::Ringing).await;
    b1.answer(&cb).await.unwrap();
    carol.call_where(&cb, |c| state(c) == pb::CallState::Active).await;
    let waiting = alice.start(account_ref(b), false).await.unwrap();
    let w = b2.call_where(&waiting.call_id, |c| ring(c) == pb::RingState::Ringing).await;
    assert!(w.waiting && !waiting.waiting);
    let before = live_state(&n[0]).await;
    let busy = dave.start(account_ref(b), false).await.unwrap();
    assert_eq!((state(&busy), end(&busy)), (pb::CallState::Ended, pb::EndReason::Busy));
    assert_eq!(live_state(&n[0]).await, before);
    alice.hang_up(&waiting.call_id).await.unwrap();
    carol.hang_up(&cb).await.unwrap();
    b2.call_where(&cb, |c| state(c) == pb::CallState::Ended).await;

    // Glare: Alice and Carol call each other at once, through different
    // nodes: one call, answered.
    let (x, y) = tokio::join!(alice.start(account_ref(c), false), carol.start(account_ref(a), false));
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x.call_id, y.call_id, "glare ends in one call");
    let id = x.call_id;
    alice.call_where(&id, |c| state(c) == pb::CallState::Active).await;
    carol.call_where(&id, |c| state(c) == pb::CallState::Active).await;
    assert_eq!(
        live_state(&n[0]).await.iter().filter(|(k, _)| k.starts_with("/spine/sys/calls/c/")).count(),
        1,
        "exactly one live call"
    );
    // A second call between the same two while it lives is refused.
    let dup = alice.start(account_ref(c), false).await.unwrap_err();
    assert_eq!((dup.code(), reason(&dup).as_str()), (Code::AlreadyExists, "CALL_EXISTS"));
    alice.hang_up(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cross_tenant_through_an_interop_handle() {
    let n = nodes(Backend::Etcd, 2, |_, _| {}).await;
    let messenger = n[0].tenant("messenger").await;
    let whats = n[0].tenant("whats").await;
    let alice_acct = n[0].account(&messenger).await;
    let erin_acct = n[0].account(&whats).await;
    let alice = Phone::connect(&n[0], n[0].device_of(&messenger, &alice_acct).await).await;
    let mut erin = Phone::connect(&n[1], n[0].device_of(&whats, &erin_acct).await).await;
    let erin_h = n[0].interop_handle(&erin.dev.token, vec![messenger.id.clone()]).await;
    let alice_h = n[0].interop_handle(&alice.dev.token, vec![whats.id.clone()]).await;
    let start = |caller_handle: String| {
        let mut client = alice.calls();
        let r = alice.req(pb::StartCallRequest {
            request_id: format!("x{}", rand::random::<u32>()),
            callee: interop_ref(&whats.id, &erin_h),
            video: false,
            caller_handle,
        });
        async move { client.start_call(r).await }
    };
    // Erin's defaults: other apps only for contacts, calls from contacts.
    assert_not_placed(start(alice_h.clone()).await.map(|r| r.into_inner()));
    erin.quiet(Duration::from_millis(300)).await;
    // She lists Alice (by Alice's handle) as a contact: now it rings.
    n[0].add_contact(&erin.dev.token, interop_ref(&messenger.id, &alice_h)).await;
    // A handle that is not the caller's own is refused.
    let bad = start(erin_h.clone()).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let call = start(alice_h.clone()).await.unwrap().into_inner();
    assert_eq!(call.peer, interop_ref(&whats.id, &erin_h));
    let c = erin.call_where(&call.call_id, |c| ring(c) == pb::RingState::Ringing).await;
    // Erin sees Alice by the handle Alice consented to, never her account id.
    assert_eq!(c.peer, interop_ref(&messenger.id, &alice_h));
    let answered = erin.answer(&call.call_id).await.unwrap();
    for p in &answered.participants {
        if let Some(peer_ref::Peer::AccountId(a)) = p.who.as_ref().and_then(|w| w.peer.clone()) {
            assert_eq!(a, erin_acct, "only her own account appears by id");
        }
    }
    assert!(format!("{answered:?}").find(&alice_acct).is_none());
    erin.hang_up(&call.call_id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_draining_node_hands_its_calls_over() {
    // Node 0 keeps serving 1.5 s into its drain (as behind a load balancer
    // that has not yet seen it go unready).
    let mut n = nodes(Backend::Etcd, 2, |i, c| {
        if i == 0 {
            c.drain.ready_delay_ms = 1500;
        }
    })
    .await;
    let t = n[0].tenant("messenger").await;
    let (a, b) = (n[0].account(&t).await, n[0].account(&t).await);
    let (c, d) = (n[0].account(&t).await, n[0].account(&t).await);
    everyone_can_call(&n[0], &t, &b).await;
    everyone_can_call(&n[0], &t, &d).await;
    let carol = Phone::connect(&n[1], n[0].device_of(&t, &c).await).await;
    let _dave = Phone::connect(&n[1], n[0].device_of(&t, &d).await).await;
    let mut alice = Phone::connect(&n[0], n[0].device_of(&t, &a).await).await;
    let mut bob = Phone::connect(&n[1], n[0].device_of(&t, &b).await).await;
    // Started on node 0, so node 0 runs it.
    let id = answered_call(&mut alice, &mut bob, &b).await;

    // Node 0 drains: Alice's stream is told to reconnect; the call moves.
    // Calls started through node 0 meanwhile succeed (run by node 1) or get
    // UNAVAILABLE with a retry hint: never INTERNAL.
    let first = n.remove(0);
    let through_first = CallsClient::new(first.channel.clone());
    let stopping = tokio::spawn(async move { first.server.stop().await });
    let starts = tokio::spawn({
        let (carol_token, hang_up) = (carol.dev.token.clone(), carol.calls());
        async move {
            let (mut ok, mut unavailable) = (0, 0);
            for i in 0..40 {
                let r = through_first
                    .clone()
                    .start_call(req(
                        pb::StartCallRequest {
                            request_id: format!("drain-{i}"),
                            callee: account_ref(&d),
                            ..Default::default()
                        },
                        &carol_token,
                    ))
                    .await;
                match r {
                    Ok(call) => {
                        ok += 1;
                        hang_up
                            .clone()
                            .hang_up(req(pb::HangUpRequest { call_id: call.into_inner().call_id }, &carol_token))
                            .await
                            .unwrap();
                    }
                    Err(s) if s.code() == Code::Unavailable => {
                        unavailable += 1;
                        if !s.message().contains("transport") && !s.message().contains("connect") {
                            assert!(
                                tonic_types::StatusExt::get_details_retry_info(&s).is_some(),
                                "UNAVAILABLE without a retry hint: {s:?}"
                            );
                        }
                    }
                    Err(s) => panic!("StartCall during drain: {s:?}"),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (ok, unavailable)
        }
    });
    match alice.next(Duration::from_secs(10)).await {
        Some(Err(s)) => assert_eq!(s.code(), Code::Unavailable),
        other => panic!("the draining node's stream must end with UNAVAILABLE: {other:?}"),
    }
    stopping.await.unwrap().unwrap();
    let (ok, unavailable) = starts.await.unwrap();
    assert!(ok > 0, "calls started on a draining node while it still serves are handed to another node");
    eprintln!("StartCall during drain: {ok} succeeded, {unavailable} UNAVAILABLE, 0 other");
    let alice = Phone::connect(&n[0], clone_dev(&alice.dev)).await;
    assert_eq!(alice.synced.len(), 1);
    assert_eq!(state(&alice.synced[0]), pb::CallState::Active);
    // Well past node 0's leases, the call is alive and Bob saw no end.
    tokio::time::sleep(Duration::from_secs(7)).await;
    bob.quiet(Duration::from_millis(100)).await;
    alice.hang_up(&id).await.unwrap();
    assert_eq!(end(&bob.call_where(&id, |c| state(c) == pb::CallState::Ended).await), pb::EndReason::HungUp);
}

/// Devices that leave without hanging up (streams closed, no reconnect):
/// after `calls.unattended_secs` the call ends for everyone with
/// CONNECTION_LOST, and its pair key goes with it. A device back within the
/// window keeps its call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_end_when_their_devices_vanish() {
    let n =
        nodes(Backend::Etcd, 2, |_, c| c.edit_section(|s: &mut spine_calls::CallsConfig| s.unattended_secs = 2)).await;
    let t = n[0].tenant("messenger").await;
    let (a, b, c) = (n[0].account(&t).await, n[0].account(&t).await, n[0].account(&t).await);
    for x in [&a, &b, &c] {
        everyone_can_call(&n[0], &t, x).await;
    }
    let mut alice = Phone::connect(&n[0], n[0].device_of(&t, &a).await).await;
    let mut bob = Phone::connect(&n[1], n[0].device_of(&t, &b).await).await;
    let id = answered_call(&mut alice, &mut bob, &b).await;

    // Alice's stream drops and comes back within the window (to the other
    // node): the call goes on, well past the window.
    let dev = clone_dev(&alice.dev);
    drop(alice);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let alice = Phone::connect(&n[1], dev).await;
    assert_eq!(alice.synced.len(), 1);
    tokio::time::sleep(Duration::from_secs(4)).await;
    bob.quiet(Duration::from_millis(100)).await;

    // Alice vanishes for good: Bob, still there, learns the call is over.
    drop(alice);
    let e = bob.call_where(&id, |c| state(c) == pb::CallState::Ended).await;
    assert_eq!(end(&e), pb::EndReason::ConnectionLost);
    assert!(
        spine_testing::eventually(Duration::from_secs(5), || async { live_state(&n[0]).await.is_empty() }).await,
        "no call or pair key outlives the call"
    );

    // Both vanish: the call ends all the same, and a new call between the
    // two is not refused as a duplicate.
    let mut bob = Phone::connect(&n[0], clone_dev(&bob.dev)).await;
    let mut carol = Phone::connect(&n[1], n[0].device_of(&t, &c).await).await;
    let id = bob.start(account_ref(&c), false).await.unwrap().call_id;
    carol.call_where(&id, |c| ring(c) == pb::RingState::Ringing).await;
    carol.answer(&id).await.unwrap();
    bob.call_where(&id, |c| state(c) == pb::CallState::Active).await;
    let (bob_dev, carol_dev) = (clone_dev(&bob.dev), clone_dev(&carol.dev));
    drop((bob, carol));
    assert!(
        spine_testing::eventually(Duration::from_secs(10), || async { live_state(&n[0]).await.is_empty() }).await,
        "an answered call whose devices all left is gone"
    );
    let bob = Phone::connect(&n[0], bob_dev).await;
    assert!(bob.synced.is_empty());
    let mut carol = Phone::connect(&n[0], carol_dev).await;
    let again = bob.start(account_ref(&c), false).await.unwrap();
    assert_ne!(again.call_id, id);
    carol.call_where(&again.call_id, |c| ring(c) == pb::RingState::Ringing).await;
    bob.hang_up(&again.call_id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn presence_shows_in_call_while_a_call_is_answered() {
    use spine_proto::presence::v1 as ppb;
    use spine_proto::presence::v1::presence_client::PresenceClient;
    let n = nodes(Backend::Etcd, 2, |_, _| {}).await;
    let t = n[0].tenant("messenger").await;
    let (a, b, w) = (n[0].account(&t).await, n[0].account(&t).await, n[0].account(&t).await);
    everyone_can_call(&n[0], &t, &b).await;
    let alice = Phone::connect(&n[0], n[0].device_of(&t, &a).await).await;
    let mut bob = Phone::connect(&n[1], n[0].device_of(&t, &b).await).await;
    let watcher = n[0].device_of(&t, &w).await;
    // Bob shows his presence to his contacts; the watcher is one.
    n[0].add_contact(&bob.dev.token, account_ref(&w)).await;
    PresenceClient::new(n[1].channel.clone())
        .announce(req(ppb::AnnounceRequest { status: ppb::Status::Online as i32, ttl_seconds: 60 }, &bob.dev.token))
        .await
        .unwrap();
    let mut watch = PresenceClient::new(n[0].channel.clone())
        .watch(req(
            ppb::WatchRequest {
                targets: vec![ppb::Target { target: Some(ppb::target::Target::AccountId(b.clone())) }],
            },
            &watcher.token,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut next_status = async |step: &str| {
        use futures::StreamExt;
        let u = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .unwrap_or_else(|_| panic!("no presence update for {step}"))
            .unwrap()
            .unwrap();
        ppb::Status::try_from(u.states[0].status).unwrap()
    };
    assert_eq!(next_status("online").await, ppb::Status::Online);
    let id = alice.start(account_ref(&b), false).await.unwrap().call_id;
    bob.call_where(&id, |c| ring(c) == pb::RingState::Ringing).await;
    bob.answer(&id).await.unwrap();
    assert_eq!(next_status("in call").await, ppb::Status::InCall, "an answered call shows");
    alice.hang_up(&id).await.unwrap();
    assert_eq!(next_status("call over").await, ppb::Status::Online, "and goes with the call");
}

/// `caller` calls `callee` (account `callee_account`), who answers; both
/// see the call active. Returns its id.
async fn answered_call(caller: &mut Phone, callee: &mut Phone, callee_account: &str) -> String {
    let id = caller.start(account_ref(callee_account), false).await.unwrap().call_id;
    callee.call_where(&id, |c| ring(c) == pb::RingState::Ringing).await;
    callee.answer(&id).await.unwrap();
    caller.call_where(&id, |c| state(c) == pb::CallState::Active).await;
    callee.call_where(&id, |c| state(c) == pb::CallState::Active).await;
    id
}
