//! Two `spine serve` processes on one real etcd; the one owning an account's
//! presence is killed with SIGKILL (no drain, no lease revoked). Its lease
//! expires, the other node takes the account over, the device's regular
//! re-announcements land there, and the watcher never sees it offline.

mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use spine_proto::common::v1::{PeerRef, peer_ref};
use spine_proto::identity::v1 as ipb;
use spine_proto::identity::v1::identity_client::IdentityClient;
use spine_proto::identity::v1::tenant_admin_client::TenantAdminClient;
use spine_proto::presence::v1::presence_client::PresenceClient;
use spine_proto::presence::v1::{self as pb, Status};
use spine_testing::{EtcdServer, free_port};
use support::{connect, device, operator, req, serve};

#[tokio::test]
async fn a_crashed_owner_hands_presence_over_without_a_false_offline() {
    let etcd = EtcdServer::start().await;
    let operator = operator(etcd.endpoint());
    let (addr_a, addr_b) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let mut a = Some(serve(etcd.endpoint(), &addr_a, "identity,presence", &[]));
    let mut b = Some(serve(etcd.endpoint(), &addr_b, "identity,presence", &[]));
    let (ch_a, ch_b) = (connect(&addr_a).await, connect(&addr_b).await);
    let store = etcd.store().await;
    let nodes = || async {
        store
            .range_all("/spine/sys/presence/nodes/")
            .await
            .unwrap()
            .into_iter()
            .map(|kv| (kv.key.rsplit('/').next().unwrap().to_string(), String::from_utf8(kv.value).unwrap()))
            .collect::<Vec<_>>()
    };
    assert!(spine_testing::eventually(Duration::from_secs(10), || async { nodes().await.len() == 2 }).await);

    let tenant = TenantAdminClient::new(ch_a.clone())
        .create_tenant(req(ipb::CreateTenantRequest { request_id: "t".into(), display_name: "t".into() }, &operator))
        .await
        .unwrap()
        .into_inner();
    let (tenant_id, cred) = (tenant.tenant.unwrap().tenant_id, tenant.credential.unwrap().secret);
    let mut id = IdentityClient::new(ch_a.clone());
    let (target, _, target_token) = device(&mut id, &cred).await;
    let (watcher, _, watcher_token) = device(&mut id, &cred).await;
    id.add_contact(req(
        ipb::AddContactRequest {
            account_id: String::new(),
            peer: Some(PeerRef { peer: Some(peer_ref::Peer::AccountId(watcher)) }),
        },
        &target_token,
    ))
    .await
    .unwrap();

    // Who owns the target? Kill that one; use the other.
    let ring = nodes().await;
    let owner = spine_presence::owner_of(ring.iter().map(|(id, _)| id.as_str()), &format!("{tenant_id}/{target}"))
        .unwrap()
        .to_string();
    let owner_addr = ring.iter().find(|(id, _)| *id == owner).unwrap().1.clone();
    let (doomed, survivor) = if owner_addr == addr_a { (a.take().unwrap(), ch_b) } else { (b.take().unwrap(), ch_a) };

    let announce = |status: Status| {
        let (ch, token) = (survivor.clone(), target_token.clone());
        async move {
            PresenceClient::new(ch)
                .announce(req(pb::AnnounceRequest { status: status as i32, ttl_seconds: 10 }, &token))
                .await
        }
    };
    announce(Status::Online).await.unwrap();
    let mut stream = PresenceClient::new(survivor.clone())
        .watch(req(
            pb::WatchRequest {
                targets: vec![pb::Target { target: Some(pb::target::Target::AccountId(target.clone())) }],
            },
            &watcher_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), stream.next()).await.unwrap().unwrap().unwrap().states[0].status,
        Status::Online as i32
    );
    // The device re-announces every second (TTL 10 s), as clients do;
    // failures while the dead owner is still in the ring are retried.
    let keep = {
        let (ch, token) = (survivor.clone(), target_token.clone());
        tokio::spawn(async move {
            loop {
                let _ = PresenceClient::new(ch.clone())
                    .announce(req(pb::AnnounceRequest { status: Status::Online as i32, ttl_seconds: 10 }, &token))
                    .await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    // SIGKILL: no drain, no lease revoked.
    let mut doomed = doomed;
    doomed.0.kill().unwrap();
    let _ = doomed.0.wait();
    assert!(
        spine_testing::eventually(Duration::from_secs(15), || async { nodes().await.len() == 1 }).await,
        "the dead node's lease did not expire"
    );
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        match tokio::time::timeout(until - Instant::now(), stream.next()).await {
            Ok(Some(Ok(u))) => {
                assert_eq!(u.states[0].status, Status::Online as i32, "the watcher saw {:?}", u.states[0]);
            }
            Ok(other) => panic!("watch ended: {other:?}"),
            Err(_) => break,
        }
    }
    keep.abort();
    announce(Status::Away).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), stream.next()).await.unwrap().unwrap().unwrap().states[0];
    assert_eq!(next.status, Status::Away as i32);
    drop((a, b));
}
