//! TLS everywhere: two nodes serving TLS with certificates from one CA; the
//! clients reach them over TLS, and the nodes reach each other over TLS too
//! (calls relaying a payload to the node holding the callee's stream,
//! presence forwarding to an account's owner). A plaintext client gets in
//! nowhere.

mod support;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use spine_proto::calls::v1 as pb;
use spine_proto::presence::v1 as ppb;
use spine_proto::presence::v1::presence_client::PresenceClient;
use spine_runtime::config::{Backend, TlsConfig};
use spine_testing::req;
use support::*;

const PEER_NAME: &str = "spine-peer.test";

/// A CA and a node certificate for `PEER_NAME`, written to `dir`.
fn certificates(dir: &std::path::Path) -> TlsConfig {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![PEER_NAME.to_string()]).unwrap().signed_by(&key, &ca, &ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("node.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("node.key"), key.serialize_pem()).unwrap();
    TlsConfig {
        cert: dir.join("node.pem"),
        key: dir.join("node.key"),
        peer_ca: Some(dir.join("ca.pem")),
        peer_name: Some(PEER_NAME.into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_reach_each_other_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let tls = certificates(dir.path());
    let n = nodes(Backend::Embedded, 2, |_, c| c.tls = Some(tls.clone())).await;
    let t = n[0].tenant("messenger").await;
    let (a, b) = (n[0].account(&t).await, n[0].account(&t).await);
    everyone_can_call(&n[0], &t, &b).await;

    // A payload relayed from node 0 to the callee's stream on node 1.
    let mut alice = Phone::connect(&n[0], n[0].device_of(&t, &a).await).await;
    let mut bob = Phone::connect(&n[1], n[0].device_of(&t, &b).await).await;
    let call = alice.start(account_ref(&b), false).await.unwrap();
    bob.call_where(&call.call_id, |c| ring(c) == pb::RingState::Ringing).await;
    let r = alice.send_signal(&call.call_id, "", b"offer".to_vec()).await;
    // A ringing device is not counted in `delivered`; the payload arrives.
    assert_eq!((r.code, r.delivered), (0, 0), "relayed across nodes over TLS: {}", r.message);
    assert_eq!(bob.signal().await.payload, b"offer");

    // Presence: announced and queried on both nodes, so one of each pair is
    // forwarded to the account's owner, over TLS.
    for env in &n {
        PresenceClient::new(env.channel.clone())
            .announce(req(ppb::AnnounceRequest { status: ppb::Status::Online as i32, ttl_seconds: 60 }, &bob.dev.token))
            .await
            .unwrap();
        let q = PresenceClient::new(env.channel.clone())
            .query(req(
                ppb::QueryRequest {
                    targets: vec![ppb::Target { target: Some(ppb::target::Target::AccountId(b.clone())) }],
                },
                &bob.dev.token,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(q.states[0].status, ppb::Status::Online as i32);
    }

    // Plaintext gets nowhere.
    let plain =
        tonic::transport::Endpoint::from_shared(format!("http://{}", n[0].server.addr)).unwrap().connect().await;
    if let Ok(ch) = plain {
        let r = spine_proto::calls::v1::calls_client::CallsClient::new(ch)
            .get_call(req(pb::GetCallRequest { call_id: call.call_id.clone() }, &alice.dev.token))
            .await;
        assert!(r.is_err());
    }
    alice.hang_up(&call.call_id).await.unwrap();
}

#[tokio::test]
async fn tls_without_a_peer_ca_fails_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut tls = certificates(dir.path());
    tls.peer_ca = None;
    let mut config = config();
    config.tls = Some(tls);
    let rt = spine_runtime::Runtime::with_store(
        config,
        std::sync::Arc::new(spine_runtime::store::EmbeddedStore::in_memory()),
    )
    .unwrap();
    let mut routes = tonic::service::RoutesBuilder::default();
    let err = spine_runtime::service::install::<spine_calls::Calls>(&rt, &mut routes, "127.0.0.1:1".into())
        .await
        .err()
        .expect("must not start");
    assert!(err.to_string().contains("tls.peer_ca"), "{err}");
}
