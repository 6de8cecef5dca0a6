//! Calls.Events, the server-streaming form of the signalling stream that
//! browsers hold over gRPC-Web: the same session as Session (synced first,
//! every change, payloads relayed), signals sent with the unary Signal; it
//! replaces and is replaced by the device's Session; it ends like Session
//! when its node drains, its token expires or its device is revoked.

mod support;

use std::time::Duration;

use spine_proto::calls::v1 as pb;
use spine_runtime::config::Backend;
use spine_testing::req;
use support::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_browser_on_events_calls_a_phone_on_session_and_survives_a_drain() {
    let mut n = nodes(Backend::Etcd, 2, |i, c| {
        if i == 0 {
            c.drain.ready_delay_ms = 500;
        }
    })
    .await;
    let t = n[0].tenant("messenger").await;
    let (a, b) = (n[0].account(&t).await, n[0].account(&t).await);
    everyone_can_call(&n[0], &t, &b).await;
    let alice_dev = n[0].device_of(&t, &a).await;
    let mut alice = Phone::connect_events_to(n[0].channel.clone(), alice_dev.clone()).await;
    let mut bob = Phone::connect(&n[1], n[0].device_of(&t, &b).await).await;
    assert!(alice.synced.is_empty());

    // Alice (Events) calls; Bob (Session, the other node) rings and answers;
    // Alice learns it on her stream.
    let call = alice.start(account_ref(&b), true).await.unwrap();
    let id = call.call_id.clone();
    bob.call_where(&id, |c| ring(c) == pb::RingState::Ringing).await;
    let answered = bob.answer(&id).await.unwrap();
    alice.call_where(&id, |c| state(c) == pb::CallState::Active).await;

    // Payloads both ways: Alice's by the unary Signal, Bob's on his stream.
    assert_eq!(alice.signal_unary(&id, &answered.your_leg_id, b"offer".to_vec()).await.unwrap(), 1);
    let s = bob.signal().await;
    assert_eq!((s.payload.as_slice(), s.from_leg_id.as_str()), (&b"offer"[..], call.your_leg_id.as_str()));
    let r = bob.send_signal(&id, &call.your_leg_id, b"answer".to_vec()).await;
    assert_eq!((r.code, r.delivered), (0, 1));
    let s = alice.signal().await;
    assert_eq!(s.payload, b"answer");
    // No signal_result events on Events: nothing was sent on it.
    alice.quiet(Duration::from_millis(300)).await;

    // Node 0 drains: Alice's Events stream ends with UNAVAILABLE, and she
    // reconnects to the other node, where `synced` has the live call.
    let first = n.remove(0);
    let stopping = tokio::spawn(async move { first.server.stop().await });
    match alice.next(Duration::from_secs(10)).await {
        Some(Err(s)) => assert_eq!((s.code(), reason(&s).as_str()), (Code::Unavailable, "NODE_DRAINING")),
        other => panic!("the draining node's Events stream must end with UNAVAILABLE: {other:?}"),
    }
    stopping.await.unwrap().unwrap();
    let mut alice = Phone::connect_events_to(n[0].channel.clone(), alice_dev).await;
    assert_eq!(alice.synced.len(), 1);
    assert_eq!((alice.synced[0].call_id.as_str(), state(&alice.synced[0])), (id.as_str(), pb::CallState::Active));
    // Nothing is lost between the snapshot and what follows.
    bob.hang_up(&id).await.unwrap();
    let c = alice.call_where(&id, |c| state(c) == pb::CallState::Ended).await;
    assert_eq!(end(&c), pb::EndReason::HungUp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_and_session_replace_each_other_and_end_with_their_credential() {
    let n = nodes(Backend::Embedded, 1, |_, _| {}).await;
    let env = &n[0];
    let t = env.tenant("t").await;
    let d = env.device(&t).await;

    // Session, then Events for the same device: the Session ends, replaced.
    let mut session = Phone::connect(env, d.clone()).await;
    let mut events = Phone::connect_events_to(env.channel.clone(), d.clone()).await;
    match session.next(Duration::from_secs(10)).await {
        Some(Err(s)) => assert_eq!((s.code(), reason(&s).as_str()), (Code::Aborted, "SESSION_REPLACED")),
        other => panic!("the Session must end when Events replaces it: {other:?}"),
    }
    // And the other way round.
    let _session = Phone::connect(env, d.clone()).await;
    match events.next(Duration::from_secs(10)).await {
        Some(Err(s)) => assert_eq!((s.code(), reason(&s).as_str()), (Code::Aborted, "SESSION_REPLACED")),
        other => panic!("Events must end when a Session replaces it: {other:?}"),
    }

    // A 3-second token: the stream ends with TOKEN_EXPIRED, not before.
    let short = device_token(env, &t, &d, 3).await;
    let opened = std::time::Instant::now();
    let mut expiring =
        Phone::connect_events_to(env.channel.clone(), spine_testing::Device { token: short, ..d.clone() }).await;
    match expiring.next(Duration::from_secs(10)).await {
        Some(Err(s)) => assert_eq!((s.code(), reason(&s).as_str()), (Code::Unauthenticated, "TOKEN_EXPIRED")),
        other => panic!("Events must end when its token expires: {other:?}"),
    }
    assert!(opened.elapsed() >= Duration::from_secs(2), "ended before the token expired");

    // Revoking the device ends its Events stream within a second or so.
    let mut events = Phone::connect_events_to(env.channel.clone(), d.clone()).await;
    revoke_device(env, &t, &d).await;
    match events.next(Duration::from_secs(5)).await {
        Some(Err(s)) => assert_eq!((s.code(), reason(&s).as_str()), (Code::Unauthenticated, "CREDENTIAL_REVOKED")),
        other => panic!("Events must end when its device is revoked: {other:?}"),
    }
    // Operators and tenant servers have no signalling stream.
    let refused = calls(env).events(req(pb::EventsRequest {}, &t.cred)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
}
