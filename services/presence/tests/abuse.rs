//! Presence from an attacker's side: one device cannot hold more than its
//! share of watch streams, nor name a target twice; what a closed stream
//! held is freed (watching made-up ids leaves nothing behind); a block on
//! another product's person holds after they revoke the handle it named.

use std::time::Duration;

use futures::StreamExt;
use spine_proto::common::v1::{InteropRef, PeerRef, peer_ref};
use spine_proto::identity::v1 as ipb;
use spine_proto::presence::v1 as pb;
use spine_proto::presence::v1::presence_client::PresenceClient;
use spine_runtime::config::Backend;
use spine_testing::{Env, req};
use tonic::Code;
use tonic_types::StatusExt;

async fn start() -> (Env, spine_presence::RingView) {
    let view = std::sync::Arc::new(std::sync::Mutex::new(None));
    let v = view.clone();
    let env = spine_testing::start_with_services(
        Backend::Embedded,
        spine_testing::test_config(),
        |rt, mut routes, addr| async move {
            let (names, ring) =
                spine_runtime::service::install::<spine_presence::Presence>(&rt, &mut routes, addr.to_string())
                    .await
                    .expect("presence");
            *v.lock().unwrap() = Some(ring);
            (routes, names)
        },
    )
    .await;
    let ring = view.lock().unwrap().take().unwrap();
    (env, ring)
}

fn client(env: &Env) -> PresenceClient<tonic::transport::Channel> {
    PresenceClient::new(env.channel.clone())
}

fn made_up(n: usize) -> Vec<pb::Target> {
    (0..n)
        .map(|_| pb::Target {
            target: Some(pb::target::Target::AccountId(spine_runtime::ids::new(spine_runtime::ids::Kind::Account))),
        })
        .collect()
}

#[tokio::test]
async fn a_device_holds_a_bounded_number_of_watches_and_frees_what_they_held() {
    let (env, ring) = start().await;
    let t = env.tenant("t").await;
    let d = env.device(&t).await;
    assert_eq!(ring.accounts_held(), 0);
    // Eight streams of 256 made-up ids each: the limit.
    let mut open = Vec::new();
    for _ in 0..8 {
        let mut s =
            client(&env).watch(req(pb::WatchRequest { targets: made_up(256) }, &d.token)).await.unwrap().into_inner();
        // The first update says each target is unavailable.
        tokio::time::timeout(Duration::from_secs(5), s.next()).await.unwrap().unwrap().unwrap();
        open.push(s);
    }
    assert!(ring.accounts_held() >= 8 * 256, "held {}", ring.accounts_held());
    // A ninth is refused, with a reason; another device is not affected.
    let refused = client(&env).watch(req(pb::WatchRequest { targets: made_up(1) }, &d.token)).await;
    let refused = match refused {
        Err(s) => s,
        Ok(r) => r.into_inner().next().await.unwrap().unwrap_err(),
    };
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(refused.get_details_error_info().unwrap().reason, "TOO_MANY_WATCHES");
    let other = env.device(&t).await;
    client(&env).watch(req(pb::WatchRequest { targets: made_up(1) }, &other.token)).await.unwrap();
    // Closing the streams frees everything they held, and a new stream of
    // the device is accepted again.
    drop(open);
    let freed = spine_testing::eventually(Duration::from_secs(5), || async { ring.accounts_held() <= 1 }).await;
    assert!(freed, "closed watches left {} accounts in memory", ring.accounts_held());
    client(&env).watch(req(pb::WatchRequest { targets: made_up(1) }, &d.token)).await.unwrap();
    // A target named twice in one watch (or query) is refused.
    let one = made_up(1);
    let twice = vec![one[0].clone(), one[0].clone()];
    let s = client(&env).watch(req(pb::WatchRequest { targets: twice.clone() }, &d.token)).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let s = client(&env).query(req(pb::QueryRequest { targets: twice }, &d.token)).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
}

/// Alice blocks a person of another product by the handle they gave her;
/// the person revokes that handle (and makes another): still blocked.
#[tokio::test]
async fn a_block_follows_the_person_not_the_handle() {
    let (env, _) = start().await;
    let messenger = env.tenant("messenger").await;
    let whatsapp = env.tenant("whatsapp").await;
    let alice = env.device(&messenger).await;
    let bob = env.device(&whatsapp).await;
    // Alice shows her presence to everyone holding her handle.
    env.identity()
        .update_settings(req(
            ipb::UpdateSettingsRequest {
                account_id: String::new(),
                settings: Some(ipb::PrivacySettings {
                    presence_visibility: ipb::PresenceVisibility::Everyone as i32,
                    cross_app: ipb::CrossAppReachability::HandleHolders as i32,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["presence_visibility".into(), "cross_app".into()],
                }),
            },
            &alice.token,
        ))
        .await
        .unwrap();
    client(&env)
        .announce(req(pb::AnnounceRequest { status: pb::Status::Online as i32, ttl_seconds: 60 }, &alice.token))
        .await
        .unwrap();
    let alice_handle = env.interop_handle(&alice.token, vec![whatsapp.id.clone()]).await;
    let target = pb::Target {
        target: Some(pb::target::Target::Interop(InteropRef { tenant_id: messenger.id.clone(), handle: alice_handle })),
    };
    let seen = |token: String, target: pb::Target| {
        let env = &env;
        async move {
            client(env)
                .query(req(pb::QueryRequest { targets: vec![target] }, &token))
                .await
                .unwrap()
                .into_inner()
                .states[0]
                .status
        }
    };
    assert_eq!(seen(bob.token.clone(), target.clone()).await, pb::Status::Online as i32);
    let bob_handle = env.interop_handle(&bob.token, vec![messenger.id.clone()]).await;
    env.identity()
        .block(req(
            ipb::BlockRequest {
                account_id: String::new(),
                peer: Some(PeerRef {
                    peer: Some(peer_ref::Peer::Interop(InteropRef {
                        tenant_id: whatsapp.id.clone(),
                        handle: bob_handle.clone(),
                    })),
                }),
            },
            &alice.token,
        ))
        .await
        .unwrap();
    assert_eq!(seen(bob.token.clone(), target.clone()).await, pb::Status::Unavailable as i32);
    env.identity()
        .revoke_interop_handle(req(
            ipb::RevokeInteropHandleRequest { account_id: String::new(), handle: bob_handle },
            &bob.token,
        ))
        .await
        .unwrap();
    env.interop_handle(&bob.token, vec![messenger.id.clone()]).await;
    assert_eq!(
        seen(bob.token.clone(), target.clone()).await,
        pb::Status::Unavailable as i32,
        "revoking the blocked handle escaped the block"
    );
    // Alice's list still shows the block (by the handle it was made with),
    // and unblocking it lifts it.
    let blocks = env
        .identity()
        .list_blocks(req(ipb::ListBlocksRequest::default(), &alice.token))
        .await
        .unwrap()
        .into_inner()
        .blocked;
    assert_eq!(blocks.len(), 1);
    env.identity()
        .unblock(req(ipb::UnblockRequest { account_id: String::new(), peer: Some(blocks[0].clone()) }, &alice.token))
        .await
        .unwrap();
    assert_eq!(seen(bob.token.clone(), target).await, pb::Status::Online as i32);
}
