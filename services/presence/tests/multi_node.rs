//! Two presence nodes on one real etcd: a watcher on one node sees what a
//! device announces through the other, and when the node owning the account
//! leaves, presence moves to the other within a TTL while the device keeps
//! announcing, without the watcher ever seeing it offline.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use spine_proto::common::v1::{PeerRef, peer_ref};
use spine_proto::presence::v1::presence_client::PresenceClient;
use spine_proto::presence::v1::{self as pb, Status};
use spine_runtime::config::Backend;
use spine_runtime::store::Store;
use spine_testing::{Env, req};

type Slot = Arc<Mutex<Option<spine_presence::RingView>>>;

type Installed = (tonic::service::RoutesBuilder, Vec<&'static str>);
type InstallFuture = std::pin::Pin<Box<dyn Future<Output = Installed> + Send>>;

/// Installs presence and keeps the node's ring view in `slot`.
fn installer(
    slot: Slot,
) -> impl FnOnce(Arc<spine_runtime::Runtime>, tonic::service::RoutesBuilder, std::net::SocketAddr) -> InstallFuture {
    move |rt, mut routes, addr| {
        Box::pin(async move {
            let (names, ring) =
                spine_runtime::service::install::<spine_presence::Presence>(&rt, &mut routes, addr.to_string())
                    .await
                    .expect("presence");
            *slot.lock().unwrap() = Some(ring);
            (routes, names)
        })
    }
}

async fn announce(env: &Env, token: &str, status: Status) -> Result<(), tonic::Status> {
    PresenceClient::new(env.channel.clone())
        .announce(req(pb::AnnounceRequest { status: status as i32, ttl_seconds: 10 }, token))
        .await
        .map(drop)
}

#[tokio::test]
async fn presence_moves_when_its_owner_leaves_without_a_false_offline() {
    let (slot_a, slot_b): (Slot, Slot) = Default::default();
    let a = spine_testing::start_with_services(Backend::Etcd, spine_testing::test_config(), installer(slot_a.clone()))
        .await;
    let store_b: Arc<dyn Store> = a.etcd.as_ref().unwrap().store().await;
    let b = spine_testing::start_on_with(store_b, None, spine_testing::test_config(), installer(slot_b.clone())).await;
    let ring = |s: &Slot| s.lock().unwrap().as_ref().map(|r| (r.me().to_string(), r.members())).unwrap();
    let both = spine_testing::eventually(Duration::from_secs(10), || async {
        ring(&slot_a).1.len() == 2 && ring(&slot_b).1.len() == 2
    })
    .await;
    assert!(both, "the nodes do not see each other");

    let t = a.tenant("t").await;
    let target = a.device(&t).await;
    let watcher = a.device(&t).await;
    a.add_contact(&target.token, Some(PeerRef { peer: Some(peer_ref::Peer::AccountId(watcher.account.clone())) }))
        .await;
    let owner = slot_a.lock().unwrap().as_ref().unwrap().owner(&t.id, &target.account);
    let (owner_env, other_env) = if owner == ring(&slot_a).0 { (a, b) } else { (b, a) };

    // The device announces through the node that does not own it; the
    // watcher watches there too: both forwarded to the owner.
    announce(&other_env, &target.token, Status::Online).await.unwrap();
    let mut stream = PresenceClient::new(other_env.channel.clone())
        .watch(req(
            pb::WatchRequest {
                targets: vec![pb::Target { target: Some(pb::target::Target::AccountId(target.account.clone())) }],
            },
            &watcher.token,
        ))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next()).await.unwrap().unwrap().unwrap().states[0];
    assert_eq!(first.status, Status::Online as i32);

    // The device re-announces every second, as a client does (TTL 10 s).
    let keep = {
        let (env_channel, token) = (other_env.channel.clone(), target.token.clone());
        tokio::spawn(async move {
            loop {
                let _ = PresenceClient::new(env_channel.clone())
                    .announce(req(pb::AnnounceRequest { status: Status::Online as i32, ttl_seconds: 10 }, &token))
                    .await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    // The owner leaves.
    owner_env.server.stop().await.unwrap();
    let moved = spine_testing::eventually(Duration::from_secs(10), || async {
        other_env.rt.store.range_all("/spine/sys/presence/nodes/").await.map(|k| k.len() == 1).unwrap_or(false)
    })
    .await;
    assert!(moved, "the leaving node is still registered");
    // For a full TTL, the watcher sees nothing but online.
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        match tokio::time::timeout(until - Instant::now(), stream.next()).await {
            Ok(Some(Ok(u))) => {
                assert_eq!(u.states[0].status, Status::Online as i32, "the watcher saw {:?}", u.states[0]);
            }
            Ok(Some(Err(e))) => panic!("watch ended: {e:?}"),
            Ok(None) => panic!("watch ended"),
            Err(_) => break,
        }
    }
    keep.abort();
    // The surviving node serves the account now: a change still arrives.
    announce(&other_env, &target.token, Status::Away).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), stream.next()).await.unwrap().unwrap().unwrap().states[0];
    assert_eq!(next.status, Status::Away as i32);
}

/// A block made through one node reaches a watch held on the other at once:
/// the owner of the target (either node) re-checks the view on the change.
/// The tenant exists before the second node starts (it finds the tenant in
/// its first read) and another is created after (it follows the new one).
#[tokio::test]
async fn a_block_through_one_node_darkens_a_watch_on_the_other_at_once() {
    use spine_proto::identity::v1 as ipb;
    let (slot_a, slot_b): (Slot, Slot) = Default::default();
    let a = spine_testing::start_with_services(Backend::Etcd, spine_testing::test_config(), installer(slot_a.clone()))
        .await;
    let early = a.tenant("early").await;
    let store_b: Arc<dyn Store> = a.etcd.as_ref().unwrap().store().await;
    let b = spine_testing::start_on_with(store_b, None, spine_testing::test_config(), installer(slot_b.clone())).await;
    let members = |s: &Slot| s.lock().unwrap().as_ref().map(|r| r.members().len()).unwrap();
    assert!(
        spine_testing::eventually(Duration::from_secs(10), || async { members(&slot_a) == 2 && members(&slot_b) == 2 })
            .await
    );
    let late = a.tenant("late").await;
    let ring_b = slot_b.lock().unwrap().as_ref().map(|r| r.me().to_string()).unwrap();

    for t in [&early, &late] {
        // One target owned by each node, each watched through the other node.
        let mut targets = Vec::new();
        while targets.len() < 2 {
            let d = a.device(t).await;
            let owned_by_b = slot_a.lock().unwrap().as_ref().unwrap().owner(&t.id, &d.account) == ring_b;
            if targets.iter().all(|(_, b)| *b != owned_by_b) {
                targets.push((d, owned_by_b));
            }
        }
        for (target, owned_by_b) in targets {
            let watcher = a.device(t).await;
            let watcher_peer = Some(PeerRef { peer: Some(peer_ref::Peer::AccountId(watcher.account.clone())) });
            a.add_contact(&target.token, watcher_peer.clone()).await;
            let (watch_on, block_on) = if owned_by_b { (&a, &b) } else { (&b, &a) };
            let mut stream = PresenceClient::new(watch_on.channel.clone())
                .watch(req(
                    pb::WatchRequest {
                        targets: vec![pb::Target {
                            target: Some(pb::target::Target::AccountId(target.account.clone())),
                        }],
                    },
                    &watcher.token,
                ))
                .await
                .unwrap()
                .into_inner();
            let first = tokio::time::timeout(Duration::from_secs(10), stream.next()).await.unwrap().unwrap().unwrap();
            assert_eq!(first.states[0].status, Status::Offline as i32);
            block_on
                .identity()
                .block(req(ipb::BlockRequest { account_id: String::new(), peer: watcher_peer }, &target.token))
                .await
                .unwrap();
            let dark = tokio::time::timeout(Duration::from_secs(3), stream.next())
                .await
                .expect("no update within 3 s of the block")
                .unwrap()
                .unwrap();
            assert_eq!(dark.states[0].status, Status::Unavailable as i32);
        }
    }
}
