//! Settings refusing calls before anything rings, bad input, the silo
//! between tenants, and call records under a tenant's policy: on the
//! embedded store and on a real etcd.

mod support;

use std::time::Duration;

use prost_types::Timestamp;
use spine_proto::calls::v1 as pb;
use spine_proto::calls::v1::call_records_client::CallRecordsClient;
use spine_proto::calls::v1::media_nodes_client::MediaNodesClient;
use spine_proto::common::v1::PeerRef;
use spine_proto::identity::v1 as ipb;
use spine_runtime::config::Backend;
use spine_testing::req;
use support::*;
use tonic::Code;

async fn settings_refuse(backend: Backend) {
    // Two nodes on one store: Alice calls through one, Bob listens on the other.
    let n = nodes(backend, 2, |_, _| {}).await;
    let env = &n[0];
    let t = env.tenant("messenger").await;
    let other = env.tenant("whats").await;
    let (a, b) = (env.account(&t).await, env.account(&t).await);
    let alice = Phone::connect(env, env.device_of(&t, &a).await).await;
    let mut bob = Phone::connect(&n[1], env.device_of(&t, &b).await).await;
    let placed_ids = std::sync::Mutex::new(Vec::new());
    let placed = |video: bool| {
        let (alice, ids) = (&alice, &placed_ids);
        let b = b.clone();
        async move {
            let r = alice.start(account_ref(&b), video).await;
            if let Ok(c) = &r {
                ids.lock().unwrap().push(c.call_id.clone());
                alice.hang_up(&c.call_id).await.unwrap();
            }
            r
        }
    };
    let silent = Duration::from_millis(300);
    // Default: calls from contacts only; Alice is a stranger.
    assert_not_placed(placed(false).await);
    bob.quiet(silent).await;
    // A contact may call.
    let alice_ref = account_ref(&a);
    env.add_contact(&bob.dev.token, alice_ref.clone()).await;
    let c = placed(false).await.unwrap();
    bob.call_where(&c.call_id, |c| state(c) == pb::CallState::Ended).await;
    // Nobody.
    let s = ipb::PrivacySettings { who_can_call: ipb::WhoCanCall::Nobody as i32, ..Default::default() };
    set(env, &t, &b, "who_can_call", s).await;
    assert_not_placed(placed(false).await);
    everyone_can_call(env, &t, &b).await;
    placed(false).await.unwrap();
    // Video calling off refuses video calls only.
    set(
        env,
        &t,
        &b,
        "video_calling_enabled",
        ipb::PrivacySettings { video_calling_enabled: false, ..Default::default() },
    )
    .await;
    assert_not_placed(placed(true).await);
    placed(false).await.unwrap();
    // Do-not-disturb, until a time in the future; one in the past is over.
    let dnd = |until: i64| ipb::PrivacySettings {
        do_not_disturb: Some(ipb::DoNotDisturb { enabled: true, until: Some(Timestamp { seconds: until, nanos: 0 }) }),
        ..Default::default()
    };
    set(env, &t, &b, "do_not_disturb", dnd(spine_runtime::now_secs() + 3600)).await;
    assert_not_placed(placed(false).await);
    set(env, &t, &b, "do_not_disturb", dnd(spine_runtime::now_secs() - 60)).await;
    placed(false).await.unwrap();
    // A block, even with everyone allowed.
    env.identity()
        .block(req(ipb::BlockRequest { account_id: String::new(), peer: alice_ref }, &bob.dev.token))
        .await
        .unwrap();
    assert_not_placed(placed(false).await);
    // An account that does not exist gets the very same answer.
    let ghost = spine_runtime::ids::new(spine_runtime::ids::Kind::Account);
    assert_not_placed(alice.start(account_ref(&ghost), false).await);
    // Cross-app reach off hides the account behind its handle.
    let x = env.account(&other).await;
    let xd = env.device_of(&other, &x).await;
    let h = env.interop_handle(&xd.token, vec![t.id.clone()]).await;
    everyone_can_call(env, &other, &x).await;
    let reach = |c: ipb::CrossAppReachability| ipb::PrivacySettings { cross_app: c as i32, ..Default::default() };
    set(env, &other, &x, "cross_app", reach(ipb::CrossAppReachability::HandleHolders)).await;
    let c = alice.start(interop_ref(&other.id, &h), false).await.unwrap();
    alice.hang_up(&c.call_id).await.unwrap();
    set(env, &other, &x, "cross_app", reach(ipb::CrossAppReachability::Off)).await;
    assert_not_placed(alice.start(interop_ref(&other.id, &h), false).await);
    // Throughout, Bob's device only ever heard of the calls placed.
    assert!(live_state(env).await.is_empty());
    let mut heard = std::collections::BTreeSet::new();
    while let Some(Ok(e)) = bob.next(Duration::from_millis(300)).await {
        if let Some(pb::server_event::Event::Call(c)) = e.event {
            heard.insert(c.call_id);
        }
    }
    let placed: std::collections::BTreeSet<String> = placed_ids.lock().unwrap().iter().skip(1).cloned().collect();
    assert_eq!(heard, placed, "Bob's device heard of exactly the calls placed (after the first, already awaited)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_refuse_embedded() {
    settings_refuse(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_refuse_etcd() {
    settings_refuse(Backend::Etcd).await;
}

async fn bad_input_and_silo(backend: Backend) {
    let n = nodes(backend, 1, |_, _| {}).await;
    let env = &n[0];
    let t = env.tenant("messenger").await;
    let other = env.tenant("insta").await;
    let (a, b) = (env.account(&t).await, env.account(&t).await);
    everyone_can_call(env, &t, &b).await;
    let mut alice = Phone::connect(env, env.device_of(&t, &a).await).await;
    let mut bob = Phone::connect(env, env.device_of(&t, &b).await).await;
    let dave = env.device_of(&t, &env.account(&t).await).await;
    let mallory = env.device(&other).await;
    let call = alice.start(account_ref(&b), false).await.unwrap();
    bob.call_where(&call.call_id, |c| ring(c) == pb::RingState::Ringing).await;
    let id = call.call_id.clone();
    let unknown = format!("cl_{}", &spine_runtime::ids::new(spine_runtime::ids::Kind::Account)[3..]);

    let before = env.rt.store.range_all("/spine/").await.unwrap();
    // Every call method, by a device of the same tenant not in the call
    // and by a device of another tenant, on a live call and an unknown one.
    for (who, token) in [("dave", &dave.token), ("mallory", &mallory.token)] {
        for cid in [&id, &unknown] {
            let mut c = calls(env);
            let codes = vec![
                c.answer(req(pb::AnswerRequest { call_id: cid.clone() }, token)).await.map(|_| ()),
                c.decline(req(pb::DeclineRequest { call_id: cid.clone() }, token)).await.map(|_| ()),
                c.join(req(pb::JoinRequest { call_id: cid.clone() }, token)).await.map(|_| ()),
                c.hang_up(req(pb::HangUpRequest { call_id: cid.clone() }, token)).await.map(|_| ()),
                c.get_call(req(pb::GetCallRequest { call_id: cid.clone() }, token)).await.map(|_| ()),
                c.signal(req(
                    pb::SignalRequest { call_id: cid.clone(), to_leg_id: String::new(), payload: b"x".to_vec() },
                    token,
                ))
                .await
                .map(|_| ()),
                c.get_turn_credentials(req(pb::GetTurnCredentialsRequest { call_id: cid.clone() }, token))
                    .await
                    .map(|_| ()),
            ];
            for (i, r) in codes.into_iter().enumerate() {
                let s = r.expect_err("must fail");
                assert_eq!((s.code(), s.message()), (Code::NotFound, "call not found"), "{who} method {i}");
            }
        }
    }
    // Another tenant's account id names nothing in mallory's tenant.
    let m = calls(env)
        .start_call(req(
            pb::StartCallRequest {
                request_id: "m".into(),
                callee: account_ref(&a),
                video: false,
                caller_handle: String::new(),
            },
            &mallory.token,
        ))
        .await;
    assert_not_placed(m.map(|r| r.into_inner()));
    // The other tenant's servers see none of this tenant's records.
    let list = CallRecordsClient::new(env.channel.clone())
        .list_call_records(req(pb::ListCallRecordsRequest::default(), &other.cred))
        .await
        .unwrap()
        .into_inner();
    assert!(list.records.is_empty());

    // Malformed and oversized input.
    let mut c = calls(env);
    let s = c.answer(alice.req(pb::AnswerRequest { call_id: "cl_../x".into() })).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let big = vec![7u8; spine_calls::MAX_PAYLOAD + 1];
    let s = c
        .signal(alice.req(pb::SignalRequest { call_id: id.clone(), to_leg_id: String::new(), payload: big.clone() }))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let s = c
        .signal(alice.req(pb::SignalRequest { call_id: id.clone(), to_leg_id: String::new(), payload: vec![] }))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let s = c
        .signal(alice.req(pb::SignalRequest {
            call_id: id.clone(),
            to_leg_id: "lg_nope".into(),
            payload: b"x".to_vec(),
        }))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let r = alice.send_signal(&id, "", big).await;
    assert_eq!((r.code, r.delivered), (Code::InvalidArgument as i32, 0));
    let s = alice.start_with("", account_ref(&b), false).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let s = alice.start_with("self", account_ref(&a), false).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let s = alice.start_with("none", Some(PeerRef { peer: None }), false).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    // Wrong principals.
    let s = c
        .start_call(req(
            pb::StartCallRequest {
                request_id: "srv".into(),
                callee: account_ref(&b),
                video: false,
                caller_handle: String::new(),
            },
            &t.cred,
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    let s = CallRecordsClient::new(env.channel.clone())
        .get_record_policy(alice.req(pb::GetRecordPolicyRequest {}))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    let s = MediaNodesClient::new(env.channel.clone())
        .list_media_nodes(req(pb::ListMediaNodesRequest {}, &t.cred))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    let s = CallRecordsClient::new(env.channel.clone())
        .set_record_policy(req(pb::SetRecordPolicyRequest { fields: vec![99], retention_seconds: 3600 }, &t.cred))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    // A stream without a valid token never opens.
    for token in ["", "sdt1.forged.x.y", &mallory.token[..mallory.token.len() - 2]] {
        let (_tx, rx) = tokio::sync::mpsc::channel::<pb::ClientMessage>(1);
        let mut r = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if !token.is_empty() {
            r.metadata_mut().insert("authorization", format!("Bearer {token}x").parse().unwrap());
        }
        let s = calls(env).session(r).await.unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated);
    }
    // Nothing changed: the store is byte for byte as before.
    let after = env.rt.store.range_all("/spine/").await.unwrap();
    let strip = |v: Vec<spine_runtime::store::KeyValue>| -> Vec<(String, Vec<u8>)> {
        v.into_iter()
            .filter(|kv| !kv.key.contains("/idem/") && !kv.key.contains("/calls/nodes/"))
            .map(|kv| (kv.key, kv.value))
            .collect()
    };
    assert_eq!(strip(after), strip(before));
    // And the call still works for its parties.
    bob.answer(&id).await.unwrap();
    alice.call_where(&id, |c| state(c) == pb::CallState::Active).await;
    alice.hang_up(&id).await.unwrap();

    // A revoked device's open stream ends (its token was checked when the
    // stream opened; revocation must not wait for the token to expire).
    env.identity()
        .revoke_device(req(
            ipb::RevokeDeviceRequest { account_id: b.clone(), device_id: bob.dev.device.clone() },
            &t.cred,
        ))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match bob.next(deadline.saturating_duration_since(tokio::time::Instant::now())).await {
            Some(Ok(_)) => continue,
            Some(Err(s)) => {
                assert_eq!(s.code(), Code::Unauthenticated);
                break;
            }
            None => panic!("the revoked device's stream stayed open"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_silo_embedded() {
    bad_input_and_silo(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_silo_etcd() {
    bad_input_and_silo(Backend::Etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_follow_the_tenants_policy() {
    let (n, views) = nodes_with_views(Backend::Etcd, 1, |_, _| {}).await;
    let env = &n[0];
    let t = env.tenant("messenger").await;
    let quiet_tenant = env.tenant("whats").await;
    let (a, b) = (env.account(&t).await, env.account(&t).await);
    everyone_can_call(env, &t, &b).await;
    let alice = Phone::connect(env, env.device_of(&t, &a).await).await;
    let mut bob = Phone::connect(env, env.device_of(&t, &b).await).await;
    let mut records = CallRecordsClient::new(env.channel.clone());
    // Alice calls Bob (video).
    let call = |alice: &Phone| {
        let mut c = alice.calls();
        let r = alice.req(pb::StartCallRequest {
            request_id: format!("r{}", rand::random::<u32>()),
            callee: account_ref(&b),
            video: true,
            caller_handle: String::new(),
        });
        async move { c.start_call(r).await.unwrap().into_inner() }
    };

    // Default policy: nothing is kept.
    let p = records.get_record_policy(req(pb::GetRecordPolicyRequest {}, &t.cred)).await.unwrap().into_inner();
    assert!(p.fields.is_empty());
    let c = call(&alice).await;
    alice.hang_up(&c.call_id).await.unwrap();
    bob.call_where(&c.call_id, |c| state(c) == pb::CallState::Ended).await;
    assert!(env.rt.store.range_all(&format!("/spine/t/{}/calls/", t.id)).await.unwrap().is_empty());

    // A policy: start time, duration and participants, for an hour.
    let fields =
        vec![pb::RecordField::StartTime as i32, pb::RecordField::Duration as i32, pb::RecordField::Participants as i32];
    records
        .set_record_policy(req(pb::SetRecordPolicyRequest { fields: fields.clone(), retention_seconds: 3600 }, &t.cred))
        .await
        .unwrap();
    let c = call(&alice).await;
    bob.call_where(&c.call_id, |c| ring(c) == pb::RingState::Ringing).await;
    bob.answer(&c.call_id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    bob.hang_up(&c.call_id).await.unwrap();
    let list =
        records.list_call_records(req(pb::ListCallRecordsRequest::default(), &t.cred)).await.unwrap().into_inner();
    assert_eq!(list.records.len(), 1);
    let r = &list.records[0];
    assert_eq!(r.participants.len(), 2);
    assert!(r.started_at.is_some() && r.duration_seconds >= 1);
    // Not named, not kept.
    assert_eq!((r.kind, r.video, r.outcome, r.answered), (0, false, 0, false));
    // Stored: no account or device id, no address, nothing unnamed.
    let stored = env.rt.store.range_all(&format!("/spine/t/{}/calls/", t.id)).await.unwrap();
    let text: String = stored.iter().map(|kv| format!("{} {}\n", kv.key, String::from_utf8_lossy(&kv.value))).collect();
    for secret in [a.as_str(), b.as_str(), &alice.dev.device, &bob.dev.device, "127.0.0.1", "video", "hung_up"] {
        assert!(!text.contains(secret), "record store holds {secret}: {text}");
    }
    // The quiet tenant kept nothing.
    assert!(env.rt.store.range_all(&format!("/spine/t/{}/calls/", quiet_tenant.id)).await.unwrap().is_empty());

    // The data report lists the record; account deletion deletes it.
    let report = env
        .identity()
        .get_data_report(req(ipb::GetDataReportRequest { account_id: a.clone() }, &t.cred))
        .await
        .unwrap()
        .into_inner();
    let section = report.sections.iter().find(|s| s.service == "calls").expect("calls section");
    let item = section.items.iter().find(|i| i.kind == "call_record").unwrap();
    assert_eq!(item.count, 1);
    assert!(section.items.iter().all(|i| !i.location.is_empty() && i.retention.is_some() && !i.readers.is_empty()));
    let privacy = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/privacy.md")).unwrap();
    assert!(privacy.contains("## Calls"));
    for i in &section.items {
        assert!(privacy.contains(&format!("| `{}` |", i.kind)), "docs/privacy.md does not list `{}`", i.kind);
    }
    // Expiry: a second record, expired by the sweep an hour on.
    let c = call(&alice).await;
    alice.hang_up(&c.call_id).await.unwrap();
    let list = records
        .list_call_records(req(pb::ListCallRecordsRequest { page_size: 1, page_token: String::new() }, &t.cred))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.records.len(), 1);
    assert!(!list.next_page_token.is_empty());
    assert_eq!(views[0].expire_records(spine_runtime::now_secs() + 1800).await.unwrap(), 0);
    assert_eq!(views[0].expire_records(spine_runtime::now_secs() + 3601).await.unwrap(), 2);
    let c = call(&alice).await;
    alice.hang_up(&c.call_id).await.unwrap();
    env.identity().delete_account(req(ipb::DeleteAccountRequest { account_id: a.clone() }, &t.cred)).await.unwrap();
    let left: Vec<_> = env.rt.store.range_all(&format!("/spine/t/{}/calls/rec", t.id)).await.unwrap();
    assert!(left.is_empty(), "records of a deleted account remain: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_end_with_their_token_or_when_too_slow() {
    let n = nodes(Backend::Embedded, 1, |_, _| {}).await;
    let env = &n[0];
    let t = env.tenant("messenger").await;
    let (a, b) = (env.account(&t).await, env.account(&t).await);
    everyone_can_call(env, &t, &b).await;

    // A stream does not outlive the token it opened with.
    let mut short = env.device_of(&t, &a).await;
    short.token = env
        .identity()
        .issue_device_token(req(
            ipb::IssueDeviceTokenRequest {
                account_id: a.clone(),
                device_id: short.device.clone(),
                scopes: vec![],
                ttl_seconds: 2,
            },
            &t.cred,
        ))
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut p = Phone::connect(env, short).await;
    match p.next(Duration::from_secs(6)).await {
        Some(Err(s)) => {
            assert_eq!((s.code(), s.message()), (Code::Unauthenticated, "token expired: reconnect with a fresh token"));
        }
        other => panic!("the stream outlived its token: {other:?}"),
    }

    // A device that stops reading is dropped, not waited for.
    let mut alice = Phone::connect(env, env.device_of(&t, &a).await).await;
    let mut bob = Phone::connect(env, env.device_of(&t, &b).await).await;
    let call = alice.start(account_ref(&b), false).await.unwrap();
    bob.call_where(&call.call_id, |c| ring(c) == pb::RingState::Ringing).await;
    let answered = bob.answer(&call.call_id).await.unwrap();
    let mut sent = 0;
    loop {
        let r = alice.send_signal(&call.call_id, &answered.your_leg_id, vec![1u8; 32 * 1024]).await;
        assert_eq!(r.code, 0);
        if r.delivered == 0 {
            break;
        }
        sent += 1;
        assert!(sent < 5000, "a device that never reads was never dropped");
    }
    assert!(sent >= 512, "dropped after only {sent} events");
    loop {
        match bob.next(Duration::from_secs(10)).await {
            Some(Ok(_)) => continue,
            Some(Err(s)) => {
                assert_eq!((s.code(), reason(&s).as_str()), (Code::ResourceExhausted, "STREAM_TOO_SLOW"));
                break;
            }
            None => panic!("the slow stream neither ended nor failed"),
        }
    }
    // Reconnecting brings it back up to date.
    let bob = Phone::connect(env, bob.dev).await;
    assert_eq!(bob.synced.iter().map(|c| c.call_id.as_str()).collect::<Vec<_>>(), vec![call.call_id.as_str()]);
}
