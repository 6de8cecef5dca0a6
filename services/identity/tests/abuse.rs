//! Identity and the node's front door from an attacker's side: limits hold
//! under concurrent requests; unauthenticated requests naming made-up
//! signing keys cannot make the node read the store at will; idle
//! connections are closed (busy ones are not); names cannot hide behind
//! bidirectional formatting; times out of range are refused.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use spine_proto::identity::v1 as pb;
use spine_runtime::config::Backend;
use spine_runtime::store::EmbeddedStore;
use spine_testing::{assert_code, req, start, start_on, start_with, test_config};
use tokio::io::AsyncReadExt;
use tonic::Code;

#[tokio::test]
async fn made_up_signing_key_ids_cost_a_bounded_number_of_store_reads() {
    let store = spine_testing::StoreTap::new(Arc::new(EmbeddedStore::in_memory()));
    let reads = store.count_gets("/spine/sys/auth/keys/");
    let env = start_on(store, None, test_config()).await;
    let mut id = env.identity();
    let forged = |kid: &str| format!("sdt1.{kid}.eyJ4IjoxfQ.AAAA");
    // The same made-up id, 100 times: read once.
    let kid = spine_runtime::ids::new(spine_runtime::ids::Kind::SigningKey);
    for _ in 0..100 {
        assert_code(id.get_account(req(pb::GetAccountRequest::default(), &forged(&kid))).await, Code::Unauthenticated);
    }
    assert_eq!(reads.load(Ordering::SeqCst), 1);
    // 300 different ones as fast as possible: the node-wide budget (a burst
    // of 50, then 20 a second) bounds the reads.
    let started = std::time::Instant::now();
    for _ in 0..300 {
        let kid = spine_runtime::ids::new(spine_runtime::ids::Kind::SigningKey);
        assert_code(id.get_account(req(pb::GetAccountRequest::default(), &forged(&kid))).await, Code::Unauthenticated);
    }
    let bound = 1 + 50 + (started.elapsed().as_secs_f64() * 20.0).ceil() as usize + 1;
    let n = reads.load(Ordering::SeqCst);
    assert!(n <= bound, "{n} store reads for 300 made-up key ids (bound {bound})");
}

#[tokio::test]
async fn per_account_limits_hold_under_concurrent_requests() {
    let env = start(Backend::Etcd).await;
    let a = env.tenant("a").await;
    let b = env.tenant("b").await;
    let d = env.device(&a).await;
    let creates = (0..48).map(|i| {
        let mut id = env.identity();
        let (token, other) = (d.token.clone(), b.id.clone());
        async move {
            id.create_interop_handle(req(
                pb::CreateInteropHandleRequest {
                    request_id: format!("h{i}"),
                    account_id: String::new(),
                    allowed_tenant_ids: vec![other],
                },
                &token,
            ))
            .await
        }
    });
    let results = futures::future::join_all(creates).await;
    let made = results.iter().filter(|r| r.is_ok()).count();
    assert!(results.iter().all(|r| r.as_ref().is_ok_and(|_| true)
        || matches!(r.as_ref().unwrap_err().code(), Code::ResourceExhausted | Code::Aborted)));
    let listed = env
        .identity()
        .list_interop_handles(req(pb::ListInteropHandlesRequest::default(), &d.token))
        .await
        .unwrap()
        .into_inner()
        .handles
        .len();
    assert_eq!(listed, made);
    assert!(made <= spine_identity::MAX_HANDLES as usize, "{made} handles against a limit of 32");
    // Revoking one frees a place.
    let h = env
        .identity()
        .list_interop_handles(req(pb::ListInteropHandlesRequest::default(), &d.token))
        .await
        .unwrap()
        .into_inner()
        .handles
        .remove(0)
        .handle;
    env.identity()
        .revoke_interop_handle(req(pb::RevokeInteropHandleRequest { account_id: String::new(), handle: h }, &d.token))
        .await
        .unwrap();
    if made == spine_identity::MAX_HANDLES as usize {
        env.interop_handle(&d.token, vec![b.id.clone()]).await;
    }
}

#[tokio::test]
async fn names_and_times_are_checked() {
    let env = start(Backend::Embedded).await;
    // A display name that would show reversed.
    let s = env
        .admin()
        .create_tenant(req(
            pb::CreateTenantRequest { request_id: "bidi".into(), display_name: "abc\u{202e}exe.txt".into() },
            &env.operator,
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let t = env.tenant("t").await;
    let s = env
        .identity()
        .issue_tenant_credential(req(
            pb::IssueTenantCredentialRequest {
                request_id: "c".into(),
                tenant_id: String::new(),
                label: "ops\u{2066}".into(),
            },
            &t.cred,
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    // A do-not-disturb end past year 9999.
    let d = env.device(&t).await;
    let s = env
        .identity()
        .update_settings(req(
            pb::UpdateSettingsRequest {
                account_id: String::new(),
                settings: Some(pb::PrivacySettings {
                    do_not_disturb: Some(pb::DoNotDisturb {
                        enabled: true,
                        until: Some(prost_types::Timestamp { seconds: i64::MAX, nanos: 0 }),
                    }),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths: vec!["do_not_disturb".into()] }),
            },
            &d.token,
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
}

/// A connection that holds no request is closed after the idle time; one
/// with an open stream is not.
#[tokio::test]
async fn idle_connections_are_closed_busy_ones_are_not() {
    let mut config = test_config();
    config.limits.idle_connection_secs = 1;
    let env = start_with(Backend::Embedded, config).await;
    // A bare TCP connection that never sends a request.
    let mut idle = tokio::net::TcpStream::connect(env.server.addr).await.unwrap();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match idle.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "an idle connection was kept past the idle time");
    // A health watch stream (server streaming) keeps its connection.
    let channel = tonic::transport::Endpoint::from_shared(env.server.endpoint()).unwrap().connect().await.unwrap();
    let mut watch = tonic_health::pb::health_client::HealthClient::new(channel)
        .watch(tonic_health::pb::HealthCheckRequest { service: "liveness".into() })
        .await
        .unwrap()
        .into_inner();
    use futures::StreamExt;
    watch.next().await.unwrap().unwrap();
    let quiet = tokio::time::timeout(Duration::from_secs(3), watch.next()).await;
    assert!(quiet.is_err(), "a connection with an open stream was closed: {quiet:?}");
}
