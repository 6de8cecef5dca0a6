//! Two `spine serve` processes on one real etcd; the node running a call
//! (its home) is killed with SIGKILL mid-call. Its registration lease runs
//! out, the survivor adopts the call before the call's own lease would,
//! the caller reconnects to the survivor and finds the call there, the
//! callee never sees it end, and hanging up ends it for both with nothing
//! left in the store: no ghost call.

mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use prost_types::FieldMask;
use spine_proto::calls::v1 as pb;
use spine_proto::calls::v1::calls_client::CallsClient;
use spine_proto::common::v1::{PeerRef, peer_ref};
use spine_proto::identity::v1 as ipb;
use spine_proto::identity::v1::identity_client::IdentityClient;
use spine_proto::identity::v1::tenant_admin_client::TenantAdminClient;
use spine_testing::{EtcdServer, eventually, free_port};
use support::{connect, device, operator, req, serve};
use tonic::transport::Channel;

type Events = tonic::Streaming<pb::ServerEvent>;

async fn session(ch: &Channel, token: &str) -> (tokio::sync::mpsc::Sender<pb::ClientMessage>, Events, Vec<pb::Call>) {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut events = CallsClient::new(ch.clone())
        .session(req(tokio_stream::wrappers::ReceiverStream::new(rx), token))
        .await
        .unwrap()
        .into_inner();
    match events.next().await.unwrap().unwrap().event {
        Some(pb::server_event::Event::Synced(s)) => (tx, events, s.calls),
        other => panic!("expected synced, got {other:?}"),
    }
}

async fn call_event(events: &mut Events, within: Duration) -> Option<pb::Call> {
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), events.next()).await {
            Ok(Some(Ok(pb::ServerEvent { event: Some(pb::server_event::Event::Call(c)) }))) => return Some(c),
            Ok(Some(Ok(_))) => continue,
            Ok(other) => panic!("stream ended: {other:?}"),
            Err(_) => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_s_call_continues_on_the_survivor() {
    let etcd = EtcdServer::start().await;
    let operator = operator(etcd.endpoint());
    let (addr_a, addr_b) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    // Leases: a node's registration 2 s, its calls' state 6 s.
    let env = [("SPINE_CALLS__NODE_TTL_SECS", "2")];
    let a = serve(etcd.endpoint(), &addr_a, "identity,calls", &env);
    let _b = serve(etcd.endpoint(), &addr_b, "identity,calls", &env);
    let (ch_a, ch_b) = (connect(&addr_a).await, connect(&addr_b).await);
    let store = etcd.store().await;
    let count = |p: &'static str| {
        let store = store.clone();
        async move { store.count(p).await.unwrap() }
    };
    assert!(eventually(Duration::from_secs(10), || async { count("/spine/sys/calls/nodes/").await == 2 }).await);

    let tenant = TenantAdminClient::new(ch_b.clone())
        .create_tenant(req(ipb::CreateTenantRequest { request_id: "t".into(), display_name: "t".into() }, &operator))
        .await
        .unwrap()
        .into_inner();
    let cred = tenant.credential.unwrap().secret;
    let mut id = IdentityClient::new(ch_b.clone());
    let (_, _, alice) = device(&mut id, &cred).await;
    let (bob_acct, _, bob) = device(&mut id, &cred).await;
    id.update_settings(req(
        ipb::UpdateSettingsRequest {
            account_id: bob_acct.clone(),
            settings: Some(ipb::PrivacySettings {
                who_can_call: ipb::WhoCanCall::Everyone as i32,
                ..Default::default()
            }),
            update_mask: Some(FieldMask { paths: vec!["who_can_call".into()] }),
        },
        &cred,
    ))
    .await
    .unwrap();

    // Alice on node A starts the call there (its home); Bob on B answers.
    let (_a_tx, mut a_events, _) = session(&ch_a, &alice).await;
    let (_b_tx, mut b_events, _) = session(&ch_b, &bob).await;
    let call = CallsClient::new(ch_a.clone())
        .start_call(req(
            pb::StartCallRequest {
                request_id: "c".into(),
                callee: Some(PeerRef { peer: Some(peer_ref::Peer::AccountId(bob_acct)) }),
                video: true,
                caller_handle: String::new(),
            },
            &alice,
        ))
        .await
        .unwrap()
        .into_inner();
    let id_ = call.call_id.clone();
    call_event(&mut b_events, Duration::from_secs(10)).await.expect("bob rings");
    CallsClient::new(ch_b.clone()).answer(req(pb::AnswerRequest { call_id: id_.clone() }, &bob)).await.unwrap();
    while call_event(&mut a_events, Duration::from_secs(10)).await.expect("alice hears the answer").state
        != pb::CallState::Active as i32
    {}
    let home = || async {
        let kv = store.get(&format!("/spine/sys/calls/c/{id_}")).await.unwrap()?;
        serde_json::from_slice::<serde_json::Value>(&kv.value).ok()?["home"].as_str().map(String::from)
    };
    let home_a = home().await.unwrap();

    // SIGKILL the call's home: no drain, no lease revoked.
    let killed = Instant::now();
    drop(a);
    // Alice's stream breaks; she reconnects to the survivor.
    assert!(matches!(tokio::time::timeout(Duration::from_secs(10), a_events.next()).await, Ok(Some(Err(_)) | None)));
    let (_a_tx, mut a_events, synced) = session(&ch_b, &alice).await;
    assert_eq!(
        synced.iter().map(|c| (c.call_id.as_str(), c.state)).collect::<Vec<_>>(),
        vec![(id_.as_str(), pb::CallState::Active as i32)]
    );
    // The survivor adopts the call once the dead node's registration lapses.
    assert!(
        eventually(Duration::from_secs(10), || async { home().await.is_some_and(|h| h != home_a) }).await,
        "the call was not adopted"
    );
    // Past the dead node's state lease (6 s), the call lives on and nobody
    // was told it ended.
    tokio::time::sleep(Duration::from_secs(7).saturating_sub(killed.elapsed())).await;
    assert!(home().await.is_some(), "the call was lost with its node");
    for events in [&mut a_events, &mut b_events] {
        if let Some(c) = call_event(events, Duration::from_millis(200)).await {
            assert_eq!(c.state, pb::CallState::Active as i32, "a device saw {c:?}");
        }
    }
    // Hanging up ends it for both, and leaves nothing behind.
    CallsClient::new(ch_b.clone()).hang_up(req(pb::HangUpRequest { call_id: id_.clone() }, &alice)).await.unwrap();
    let c = loop {
        let c = call_event(&mut b_events, Duration::from_secs(10)).await.expect("bob hears the end");
        if c.state == pb::CallState::Ended as i32 {
            break c;
        }
    };
    assert_eq!(c.end_reason, pb::EndReason::HungUp as i32);
    assert!(
        eventually(Duration::from_secs(5), || async {
            count("/spine/sys/calls/c/").await == 0 && count("/spine/sys/calls/pair/").await == 0
        })
        .await
    );
    // The dead node's sessions went with its lease.
    assert!(eventually(Duration::from_secs(5), || async { count("/spine/sys/calls/nodes/").await == 1 }).await);
}
