//! Calls, presence and groups streams from an attacker's side: every
//! long-lived stream ends with its credential (token expiry, device
//! revocation, account deletion, signing-key revocation) with one status
//! and reason; a client cannot pass itself off as a peer node; a signalling
//! answer does not count a ringing callee's devices; group calls ring only
//! those who would take the caller's call; call starts and signalling are
//! rate limited.

mod support;

#[path = "../../groups/tests/support/mod.rs"]
#[allow(unused_imports)]
mod groups_support;

use std::time::Duration;

use futures::StreamExt;
use spine_proto::calls::v1 as pb;
use spine_proto::groups::v1 as gpb;
use spine_proto::groups::v1::groups_client::GroupsClient;
use spine_proto::identity::v1 as ipb;
use spine_proto::presence::v1 as ppb;
use spine_proto::presence::v1::presence_client::PresenceClient;
use spine_runtime::config::Backend;
use spine_testing::{Device, Env, req};
use support::*;
use tonic::{Code, Status};

/// The three long-lived streams of a device: a presence watch, its group
/// mailbox, its signalling session. Each resolves to the status it ends
/// with.
fn streams(env: &Env, d: &Device, token: &str) -> Vec<tokio::task::JoinHandle<(&'static str, Status)>> {
    let (ch, tok, account) = (env.channel.clone(), token.to_string(), d.account.clone());
    let watch = tokio::spawn(async move {
        let target = ppb::Target { target: Some(ppb::target::Target::AccountId(account)) };
        let mut s = PresenceClient::new(ch)
            .watch(req(ppb::WatchRequest { targets: vec![target] }, &tok))
            .await
            .expect("watch opens")
            .into_inner();
        loop {
            match s.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return ("presence watch", e),
                None => return ("presence watch", Status::ok("ended without a status")),
            }
        }
    });
    let (ch, tok) = (env.channel.clone(), token.to_string());
    let mailbox = tokio::spawn(async move {
        let mut s = GroupsClient::new(ch)
            .receive(req(gpb::ReceiveRequest { from_seq: 0, ..Default::default() }, &tok))
            .await
            .expect("receive opens")
            .into_inner();
        loop {
            match s.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return ("group mailbox", e),
                None => return ("group mailbox", Status::ok("ended without a status")),
            }
        }
    });
    let dev = Device { token: token.to_string(), ..d.clone() };
    let ch = env.channel.clone();
    let session = tokio::spawn(async move {
        let mut phone = Phone::connect_to(ch, dev).await;
        loop {
            match phone.next(Duration::from_secs(60)).await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return ("calls session", e),
                None => return ("calls session", Status::ok("ended without a status")),
            }
        }
    });
    vec![watch, mailbox, session]
}

/// Every stream ends within a few seconds, UNAUTHENTICATED, with `reason`.
async fn all_end(handles: Vec<tokio::task::JoinHandle<(&'static str, Status)>>, reason: &str) {
    for h in handles {
        let (what, status) = tokio::time::timeout(Duration::from_secs(8), h)
            .await
            .unwrap_or_else(|_| panic!("a stream outlived its credential ({reason})"))
            .unwrap();
        assert_eq!(
            (status.code(), support::reason(&status).as_str()),
            (Code::Unauthenticated, reason),
            "{what}: {status:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stream_ends_with_its_credential() {
    let n = nodes(Backend::Embedded, 1, |_, _| {}).await;
    let env = &n[0];
    let t = env.tenant("t").await;

    // Expiry: a 3-second token.
    let d = env.device(&t).await;
    let short = device_token(env, &t, &d, 3).await;
    let opened = std::time::Instant::now();
    all_end(streams(env, &d, &short), "TOKEN_EXPIRED").await;
    assert!(opened.elapsed() >= Duration::from_secs(2), "ended before the token expired");

    // Revocation of the device.
    let d = env.device(&t).await;
    let handles = streams(env, &d, &d.token);
    tokio::time::sleep(Duration::from_millis(500)).await;
    revoke_device(env, &t, &d).await;
    all_end(handles, "CREDENTIAL_REVOKED").await;

    // Deletion of the account.
    let d = env.device(&t).await;
    let handles = streams(env, &d, &d.token);
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.identity()
        .delete_account(req(ipb::DeleteAccountRequest { account_id: d.account.clone() }, &t.cred))
        .await
        .unwrap();
    all_end(handles, "CREDENTIAL_REVOKED").await;

    // Revocation of the signing key the token was signed with.
    let d = env.device(&t).await;
    let handles = streams(env, &d, &d.token);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let kid = d.token.split('.').nth(1).unwrap().to_string();
    env.admin().revoke_signing_key(req(ipb::RevokeSigningKeyRequest { key_id: kid }, &env.operator)).await.unwrap();
    all_end(handles, "CREDENTIAL_REVOKED").await;
}

/// A client that sets the forwarding marker itself (the headers nodes used
/// to trust from anyone) is treated like any client: its request still goes
/// to the right node, and its signal is relayed as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_cannot_pass_for_peer_nodes() {
    let (n, _) = nodes_with_views(Backend::Etcd, 2, |_, _| {}).await;
    let t = n[0].tenant("t").await;
    // An account owned by node 1, announced through node 0 with forged
    // markers: the owner must still get it.
    let mut announced = None;
    for _ in 0..50 {
        let d = n[0].device(&t).await;
        let ring = n[0].rt.store.range_all("/spine/sys/presence/nodes/").await.unwrap();
        let nodes: Vec<String> = ring.iter().map(|kv| kv.key.rsplit('/').next().unwrap().to_string()).collect();
        let owner = spine_presence::owner_of(nodes.iter().map(String::as_str), &format!("{}/{}", d.tenant, d.account))
            .unwrap()
            .to_string();
        let node0 = String::from_utf8_lossy(
            &n[0]
                .rt
                .store
                .range_all("/spine/sys/presence/nodes/")
                .await
                .unwrap()
                .iter()
                .find(|kv| kv.key.ends_with(&owner))
                .unwrap()
                .value,
        )
        .into_owned();
        if node0 != n[0].server.addr.to_string() {
            announced = Some(d);
            break;
        }
    }
    let d = announced.expect("an account owned by the other node");
    let mut forged = req(ppb::AnnounceRequest { status: ppb::Status::Online as i32, ttl_seconds: 60 }, &d.token);
    for (h, v) in [("x-spine-forwarded", "1700000000.00ff"), ("x-spine-presence-forwarded", "1")] {
        forged.metadata_mut().insert(h, v.parse().unwrap());
    }
    PresenceClient::new(n[0].channel.clone()).announce(forged).await.unwrap();
    // The owner (asked through the other node) shows the device online.
    let target = ppb::Target { target: Some(ppb::target::Target::AccountId(d.account.clone())) };
    let seen = PresenceClient::new(n[1].channel.clone())
        .query(req(ppb::QueryRequest { targets: vec![target] }, &d.token))
        .await
        .unwrap()
        .into_inner()
        .states
        .remove(0);
    assert_eq!(seen.status, ppb::Status::Online as i32, "a forged marker kept the announcement on the wrong node");

    // Calls: a signal with forged markers to node 0, for a callee whose
    // stream is on node 1, still reaches it.
    let (alice, bob) = (n[0].device(&t).await, n[0].device(&t).await);
    everyone_can_call(&n[0], &t, &bob.account).await;
    let mut alice_phone = Phone::connect(&n[0], alice.clone()).await;
    let mut bob_phone = Phone::connect(&n[1], bob.clone()).await;
    let call = alice_phone.start(account_ref(&bob.account), false).await.unwrap();
    bob_phone.answer(&call.call_id).await.unwrap();
    alice_phone.call_where(&call.call_id, |c| state(c) == pb::CallState::Active).await;
    let mut forged = req(
        pb::SignalRequest { call_id: call.call_id.clone(), to_leg_id: String::new(), payload: b"sdp".to_vec() },
        &alice.token,
    );
    for (h, v) in [("x-spine-forwarded", "garbage"), ("x-spine-calls-forwarded", "1")] {
        forged.metadata_mut().insert(h, v.parse().unwrap());
    }
    let delivered = calls(&n[0]).signal(forged).await.unwrap().into_inner().delivered;
    assert_eq!(delivered, 1, "a forged marker kept the payload on the first node");
    assert_eq!(bob_phone.signal().await.payload, b"sdp");
}

/// A caller's payload to a ringing callee reaches each of its devices, but
/// the answer does not say how many are connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_does_not_count_a_ringing_callees_devices() {
    let n = nodes(Backend::Embedded, 1, |_, _| {}).await;
    let env = &n[0];
    let t = env.tenant("t").await;
    let alice = env.device(&t).await;
    let bob1 = env.device(&t).await;
    let bob2 = env.device_of(&t, &bob1.account).await;
    everyone_can_call(env, &t, &bob1.account).await;
    let mut alice_phone = Phone::connect(env, alice.clone()).await;
    let mut p1 = Phone::connect(env, bob1.clone()).await;
    let mut p2 = Phone::connect(env, bob2.clone()).await;
    let call = alice_phone.start(account_ref(&bob1.account), false).await.unwrap();
    p1.call_where(&call.call_id, |c| ring(c) == pb::RingState::Ringing).await;
    let result = alice_phone.send_signal(&call.call_id, "", b"offer".to_vec()).await;
    assert_eq!((result.code, result.delivered), (0, 0));
    assert_eq!(p1.signal().await.payload, b"offer");
    assert_eq!(p2.signal().await.payload, b"offer");
    // Once answered, the answering device is in the call: counted.
    p1.answer(&call.call_id).await.unwrap();
    alice_phone.call_where(&call.call_id, |c| state(c) == pb::CallState::Active).await;
    let result = alice_phone.send_signal(&call.call_id, "", b"more".to_vec()).await;
    assert_eq!(result.delivered, 1);
}

/// Group calls ring a member only if the caller could call it directly:
/// a member who opted in to group rings but blocked the caller and lets
/// nobody call is not rung.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_rings_follow_blocks_and_call_settings() {
    use groups_support::{create_group, let_anyone_add, member};
    let n = nodes(Backend::Embedded, 1, |_, _| {}).await;
    let env = &n[0];
    let t = env.tenant("t").await;
    let (a, b, c) = (env.account(&t).await, env.account(&t).await, env.account(&t).await);
    let mut alice = member(env, &t, &a).await;
    let mut bob = member(env, &t, &b).await;
    let mut carol = member(env, &t, &c).await;
    for (m, acct) in [(&bob, &b), (&carol, &c)] {
        let_anyone_add(env, &t, acct).await;
        set(env, &t, acct, "group_call_rings", ipb::PrivacySettings { group_call_rings: true, ..Default::default() })
            .await;
        m.upload(env, 1).await;
    }
    everyone_can_call(env, &t, &b).await;
    let gid = b"rings".to_vec();
    create_group(env, &mut alice, &gid, vec![t.id.clone()]).await;
    let kps: Vec<Vec<u8>> = [&bob, &carol].iter().map(|m| m.client.key_packages(1, false).unwrap().remove(0)).collect();
    let add = alice.act(|cl, g| cl.add(g, &kps)).unwrap();
    alice.send_commit(env, &add).await.unwrap();
    for m in [&mut bob, &mut carol] {
        let w = m.receive(env, 1).await.remove(0);
        m.group = Some(m.client.join(&w.message).unwrap());
    }
    // Once in the group, Carol lets nobody call her and blocks Alice.
    set(
        env,
        &t,
        &c,
        "who_can_call",
        ipb::PrivacySettings { who_can_call: ipb::WhoCanCall::Nobody as i32, ..Default::default() },
    )
    .await;
    env.identity()
        .block(req(ipb::BlockRequest { account_id: String::new(), peer: account_ref(&a) }, &carol.token))
        .await
        .unwrap();
    let sfu = spine_proto::calls::v1::media_nodes_client::MediaNodesClient::new(env.channel.clone())
        .issue_media_node_credential(req(
            pb::IssueMediaNodeCredentialRequest {
                request_id: "sfu".into(),
                node_id: "sfu".into(),
                label: String::new(),
            },
            &env.operator,
        ))
        .await
        .unwrap()
        .into_inner()
        .secret;
    // An address with control or formatting characters is refused.
    for bad in ["sfu.example:443\nX-Injected: 1", "sfu\u{202e}.example:443", "sfu example:443"] {
        let s = spine_proto::calls::v1::media_nodes_client::MediaNodesClient::new(env.channel.clone())
            .register_media_node(req(
                pb::RegisterMediaNodeRequest {
                    node_id: "sfu".into(),
                    address: bad.into(),
                    region: "default".into(),
                    capacity: 10,
                    load: 0,
                    ttl_seconds: 60,
                },
                &sfu,
            ))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{bad:?}");
    }
    spine_proto::calls::v1::media_nodes_client::MediaNodesClient::new(env.channel.clone())
        .register_media_node(req(
            pb::RegisterMediaNodeRequest {
                node_id: "sfu".into(),
                address: "sfu.example:443".into(),
                region: "default".into(),
                capacity: 10,
                load: 0,
                ttl_seconds: 60,
            },
            &sfu,
        ))
        .await
        .unwrap();
    let dev = |m: &groups_support::Member| Device {
        tenant: m.tenant.clone(),
        account: m.account.clone(),
        device: m.device.clone(),
        key: ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng),
        token: m.token.clone(),
    };
    let pa = Phone::connect(env, dev(&alice)).await;
    let mut pb_ = Phone::connect(env, dev(&bob)).await;
    let mut pc = Phone::connect(env, dev(&carol)).await;
    let call = pa.start_group("g", &gid).await.unwrap();
    let at_bob = pb_.call_where(&call.call_id, |_| true).await;
    assert_eq!(ring(&at_bob), pb::RingState::Ringing);
    let at_carol = pc.call_where(&call.call_id, |_| true).await;
    assert_eq!(ring(&at_carol), pb::RingState::NotRinging, "a member who blocked the caller was rung");
}

/// Call starts and signalling payloads are rate limited per account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_starts_and_signals_are_rate_limited() {
    use spine_runtime::rate::{Limit, Rate};
    let tight = Limit { account: Rate::new(0.01, 3.0), tenant: Rate::new(1000.0, 1000.0) };
    let n = nodes(Backend::Embedded, 1, |_, c| {
        c.edit_section(|s: &mut spine_calls::CallsConfig| {
            s.rates.call_starts = tight;
            s.rates.signals = tight;
        });
    })
    .await;
    let env = &n[0];
    let t = env.tenant("t").await;
    let alice = env.device(&t).await;
    let mut alice_phone = Phone::connect(env, alice.clone()).await;
    let mut outcomes = Vec::new();
    for i in 0..4 {
        let callee = env.device(&t).await;
        everyone_can_call(env, &t, &callee.account).await;
        outcomes.push(alice_phone.start_with(&format!("r{i}"), account_ref(&callee.account), false).await);
    }
    assert!(outcomes[..3].iter().all(|o| o.is_ok()));
    let s = outcomes[3].as_ref().unwrap_err();
    assert_eq!((s.code(), reason(s).as_str()), (Code::ResourceExhausted, "RATE_LIMITED"));
    let call = outcomes[0].as_ref().unwrap();
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(alice_phone.send_signal(&call.call_id, "", b"x".to_vec()).await.code);
    }
    assert_eq!(codes, vec![0, 0, 0, Code::ResourceExhausted as i32]);
}
