//! Two `spine serve` processes on one real etcd; the one owning an account's
//! presence is killed with SIGKILL (no drain, no lease revoked). Its lease
//! expires, the other node takes the account over, the device's regular
//! re-announcements land there, and the watcher never sees it offline.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use spine_proto::common::v1::{PeerRef, peer_ref};
use spine_proto::identity::v1 as ipb;
use spine_proto::identity::v1::identity_client::IdentityClient;
use spine_proto::identity::v1::tenant_admin_client::TenantAdminClient;
use spine_proto::presence::v1::presence_client::PresenceClient;
use spine_proto::presence::v1::{self as pb, Status};
use spine_runtime::testing::{EtcdServer, free_port};
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_spine");

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn req<T>(m: T, cred: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut().insert("authorization", format!("Bearer {cred}").parse().unwrap());
    r
}

async fn connect(addr: &str) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(c) = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await {
            let mut h = tonic_health::pb::health_client::HealthClient::new(c.clone());
            if let Ok(r) = h.check(tonic_health::pb::HealthCheckRequest { service: "readiness".into() }).await
                && r.into_inner().status == 1
            {
                return c;
            }
        }
        assert!(Instant::now() < deadline, "{addr} not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn serve(etcd: &str, addr: &str) -> Proc {
    Proc(
        Command::new(BIN)
            .args(["serve", "--store", "etcd", "--etcd", etcd, "--listen", addr, "--services", "identity,presence"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

async fn device(id: &mut IdentityClient<Channel>, cred: &str) -> (String, String) {
    let rid = format!("r{}", rand::random::<u64>());
    let account = id
        .create_account(req(ipb::CreateAccountRequest { request_id: rid.clone() }, cred))
        .await
        .unwrap()
        .into_inner()
        .account_id;
    let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng).verifying_key().to_bytes().to_vec();
    let device = id
        .register_device(req(
            ipb::RegisterDeviceRequest {
                request_id: rid,
                account_id: account.clone(),
                signature_scheme: 1,
                signature_public_key: key,
            },
            cred,
        ))
        .await
        .unwrap()
        .into_inner()
        .device_id;
    let token = id
        .issue_device_token(req(
            ipb::IssueDeviceTokenRequest { account_id: account.clone(), device_id: device, ..Default::default() },
            cred,
        ))
        .await
        .unwrap()
        .into_inner()
        .token;
    (account, token)
}

#[tokio::test]
async fn a_crashed_owner_hands_presence_over_without_a_false_offline() {
    let etcd = EtcdServer::start().await;
    let out = Command::new(BIN)
        .args(["admin", "operator", "create", "--label", "t", "--store", "etcd", "--etcd", etcd.endpoint()])
        .output()
        .unwrap();
    let operator = String::from_utf8(out.stdout).unwrap().rsplit(' ').next().unwrap().trim().to_string();
    let (addr_a, addr_b) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let mut a = Some(serve(etcd.endpoint(), &addr_a));
    let mut b = Some(serve(etcd.endpoint(), &addr_b));
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
    assert!(spine_runtime::testing::eventually(Duration::from_secs(10), || async { nodes().await.len() == 2 }).await);

    let tenant = TenantAdminClient::new(ch_a.clone())
        .create_tenant(req(ipb::CreateTenantRequest { request_id: "t".into(), display_name: "t".into() }, &operator))
        .await
        .unwrap()
        .into_inner();
    let (tenant_id, cred) = (tenant.tenant.unwrap().tenant_id, tenant.credential.unwrap().secret);
    let mut id = IdentityClient::new(ch_a.clone());
    let (target, target_token) = device(&mut id, &cred).await;
    let (watcher, watcher_token) = device(&mut id, &cred).await;
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
        spine_runtime::testing::eventually(Duration::from_secs(15), || async { nodes().await.len() == 1 }).await,
        "the dead node's lease did not expire"
    );
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        match tokio::time::timeout(until - Instant::now(), stream.next()).await {
            Ok(Some(Ok(u))) => {
                assert_eq!(u.states[0].status, Status::Online as i32, "the watcher saw {:?}", u.states[0])
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
