//! Presence over gRPC: who sees what (the visibility matrix, last-seen
//! precision), coalescing of a flapping device, a watcher too slow to keep
//! up, bad input and silos. Multi-node behaviour is in `multi_node.rs`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use prost_types::FieldMask;
use spine_proto::common::v1::{InteropRef, PeerRef, peer_ref};
use spine_proto::identity::v1 as ipb;
use spine_proto::presence::v1::presence_client::PresenceClient;
use spine_proto::presence::v1::{self as pb, LastSeen, Status};
use spine_runtime::config::Backend;
use spine_testing::{Env, Tenant, req};
use tonic::Code;

async fn start() -> Env {
    spine_testing::start_with_services(Backend::Embedded, spine_testing::test_config(), with_presence).await
}

async fn with_presence(
    rt: Arc<spine_runtime::Runtime>,
    mut routes: tonic::service::RoutesBuilder,
    addr: std::net::SocketAddr,
) -> (tonic::service::RoutesBuilder, Vec<&'static str>) {
    let (names, _) = spine_runtime::service::install::<spine_presence::Presence>(&rt, &mut routes, addr.to_string())
        .await
        .expect("presence");
    (routes, names)
}

fn client(env: &Env) -> PresenceClient<tonic::transport::Channel> {
    PresenceClient::new(env.channel.clone())
}

fn local(a: &str) -> pb::Target {
    pb::Target { target: Some(pb::target::Target::AccountId(a.into())) }
}

fn interop(tenant: &str, handle: &str) -> pb::Target {
    pb::Target {
        target: Some(pb::target::Target::Interop(InteropRef { tenant_id: tenant.into(), handle: handle.into() })),
    }
}

fn peer(a: &str) -> Option<PeerRef> {
    Some(PeerRef { peer: Some(peer_ref::Peer::AccountId(a.into())) })
}

async fn announce(env: &Env, token: &str, status: Status) {
    client(env).announce(req(pb::AnnounceRequest { status: status as i32, ttl_seconds: 60 }, token)).await.unwrap();
}

async fn query(env: &Env, token: &str, target: pb::Target) -> pb::PresenceState {
    client(env).query(req(pb::QueryRequest { targets: vec![target] }, token)).await.unwrap().into_inner().states[0]
}

async fn set(env: &Env, token: &str, settings: ipb::PrivacySettings, paths: &[&str]) {
    env.identity()
        .update_settings(req(
            ipb::UpdateSettingsRequest {
                account_id: String::new(),
                settings: Some(settings),
                update_mask: Some(FieldMask { paths: paths.iter().map(|p| p.to_string()).collect() }),
            },
            token,
        ))
        .await
        .unwrap();
}

async fn handle(env: &Env, token: &str, open_to: &Tenant) -> String {
    env.identity()
        .create_interop_handle(req(
            ipb::CreateInteropHandleRequest {
                request_id: format!("h{}", rand::random::<u32>()),
                account_id: String::new(),
                allowed_tenant_ids: vec![open_to.id.clone()],
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner()
        .handle
}

#[tokio::test]
async fn the_visibility_matrix() {
    let env = start().await;
    let (a, b, c) = (env.tenant("a").await, env.tenant("b").await, env.tenant("c").await);
    let target = env.device(&a).await;
    let contact = env.device(&a).await;
    let stranger = env.device(&a).await;
    let blocked = env.device(&a).await;
    let x_contact = env.device(&b).await; // another app, listed as a contact through its handle
    let x_other = env.device(&b).await; // another app, not a contact
    let x_unnamed = env.device(&c).await; // a tenant the target's handle does not name
    let mut id = env.identity();
    id.add_contact(req(
        ipb::AddContactRequest { account_id: String::new(), peer: peer(&contact.account) },
        &target.token,
    ))
    .await
    .unwrap();
    id.add_contact(req(
        ipb::AddContactRequest { account_id: String::new(), peer: peer(&blocked.account) },
        &target.token,
    ))
    .await
    .unwrap();
    id.block(req(ipb::BlockRequest { account_id: String::new(), peer: peer(&blocked.account) }, &target.token))
        .await
        .unwrap();
    let xh = handle(&env, &x_contact.token, &a).await;
    id.add_contact(req(
        ipb::AddContactRequest {
            account_id: String::new(),
            peer: Some(PeerRef {
                peer: Some(peer_ref::Peer::Interop(InteropRef { tenant_id: b.id.clone(), handle: xh })),
            }),
        },
        &target.token,
    ))
    .await
    .unwrap();
    let th = handle(&env, &target.token, &b).await;
    announce(&env, &target.token, Status::Online).await;

    let ghost = spine_runtime::ids::new(spine_runtime::ids::Kind::Account);
    let hidden = query(&env, &stranger.token, local(&ghost)).await;
    assert_eq!(hidden.status, Status::Unavailable as i32);
    // (visibility, cross-app) -> who sees ONLINE: contact, stranger, blocked, x_contact, x_other.
    let cases: [(ipb::PresenceVisibility, ipb::CrossAppReachability, [bool; 5]); 5] = [
        (ipb::PresenceVisibility::Everyone, ipb::CrossAppReachability::HandleHolders, [true, true, false, true, true]),
        (ipb::PresenceVisibility::Everyone, ipb::CrossAppReachability::Contacts, [true, true, false, true, false]),
        (
            ipb::PresenceVisibility::Contacts,
            ipb::CrossAppReachability::HandleHolders,
            [true, false, false, true, false],
        ),
        (
            ipb::PresenceVisibility::Nobody,
            ipb::CrossAppReachability::HandleHolders,
            [false, false, false, false, false],
        ),
        (ipb::PresenceVisibility::Everyone, ipb::CrossAppReachability::Off, [true, true, false, false, false]),
    ];
    for (vis, cross, expect) in cases {
        set(
            &env,
            &target.token,
            ipb::PrivacySettings { presence_visibility: vis as i32, cross_app: cross as i32, ..Default::default() },
            &["presence_visibility", "cross_app"],
        )
        .await;
        let watchers = [
            (&contact, local(&target.account)),
            (&stranger, local(&target.account)),
            (&blocked, local(&target.account)),
            (&x_contact, interop(&a.id, &th)),
            (&x_other, interop(&a.id, &th)),
        ];
        for ((w, t), sees) in watchers.into_iter().zip(expect) {
            let s = query(&env, &w.token, t).await;
            if sees {
                assert_eq!(s.status, Status::Online as i32, "{vis:?}/{cross:?}: {} should see", w.account);
            } else {
                assert_eq!(
                    s,
                    pb::PresenceState { target: 0, ..hidden },
                    "{vis:?}/{cross:?}: {} must learn nothing",
                    w.account
                );
            }
        }
        // A tenant the handle does not name, and a made-up handle: nothing.
        assert_eq!(query(&env, &x_unnamed.token, interop(&a.id, &th)).await, hidden);
        // The target always sees itself.
        assert_eq!(query(&env, &target.token, local(&target.account)).await.status, Status::Online as i32);
    }
}

#[tokio::test]
async fn last_seen_keeps_the_chosen_precision_and_reciprocity() {
    let env = start().await;
    let a = env.tenant("a").await;
    let target = env.device(&a).await;
    let watcher = env.device(&a).await;
    env.add_contact(&target.token, peer(&watcher.account)).await;
    announce(&env, &target.token, Status::Online).await;
    announce(&env, &target.token, Status::Offline).await;
    // Defaults: coarse, reciprocal; the watcher's own default is coarse too.
    let s = query(&env, &watcher.token, local(&target.account)).await;
    assert_eq!((s.status, s.last_seen), (Status::Offline as i32, LastSeen::Recently as i32));
    // The target shows minutes; the watcher still shows only coarse, so
    // reciprocity keeps it coarse.
    set(
        &env,
        &target.token,
        ipb::PrivacySettings { last_seen: ipb::LastSeenGranularity::Exact as i32, ..Default::default() },
        &["last_seen"],
    )
    .await;
    assert_eq!(query(&env, &watcher.token, local(&target.account)).await.last_seen, LastSeen::Recently as i32);
    set(
        &env,
        &watcher.token,
        ipb::PrivacySettings { last_seen: ipb::LastSeenGranularity::Exact as i32, ..Default::default() },
        &["last_seen"],
    )
    .await;
    let s = query(&env, &watcher.token, local(&target.account)).await;
    assert_eq!(s.last_seen, LastSeen::At as i32);
    let at = s.last_seen_at.unwrap().seconds;
    assert_eq!(at % 60, 0, "rounded to the minute");
    assert!((spine_runtime::now_secs() - at).abs() < 120);
    // A watcher hiding its own last-seen sees no one's.
    set(
        &env,
        &watcher.token,
        ipb::PrivacySettings { last_seen: ipb::LastSeenGranularity::Hidden as i32, ..Default::default() },
        &["last_seen"],
    )
    .await;
    assert_eq!(query(&env, &watcher.token, local(&target.account)).await.last_seen, LastSeen::Hidden as i32);
}

#[tokio::test]
async fn watchers_see_changes_and_lose_sight_when_settings_close() {
    let env = start().await;
    let a = env.tenant("a").await;
    let target = env.device(&a).await;
    let watcher = env.device(&a).await;
    env.add_contact(&target.token, peer(&watcher.account)).await;
    let mut stream = client(&env)
        .watch(req(pb::WatchRequest { targets: vec![local(&target.account)] }, &watcher.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut stream).await.status, Status::Offline as i32);
    announce(&env, &target.token, Status::Online).await;
    assert_eq!(next(&mut stream).await.status, Status::Online as i32);
    announce(&env, &target.token, Status::Away).await;
    assert_eq!(next(&mut stream).await.status, Status::Away as i32);
    // Presence closed to everyone: the open watch goes dark at once, as if
    // the account did not exist.
    set(
        &env,
        &target.token,
        ipb::PrivacySettings { presence_visibility: ipb::PresenceVisibility::Nobody as i32, ..Default::default() },
        &["presence_visibility"],
    )
    .await;
    assert_eq!(next(&mut stream).await.status, Status::Unavailable as i32);
}

async fn next(stream: &mut tonic::Streaming<pb::PresenceUpdate>) -> pb::PresenceState {
    tokio::time::timeout(Duration::from_secs(20), stream.next()).await.expect("an update").unwrap().unwrap().states[0]
}

/// How soon a consent change reaches an open watch: the view follows the
/// change itself, not a periodic re-check (which took up to 10 s).
const PROMPTLY: Duration = Duration::from_secs(3);

async fn next_within(stream: &mut tonic::Streaming<pb::PresenceUpdate>, what: &str) -> pb::PresenceState {
    tokio::time::timeout(PROMPTLY, stream.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: no update within {PROMPTLY:?}"))
        .unwrap()
        .unwrap()
        .states[0]
}

/// The consent follow starts again when its store watches end (a broken
/// connection to etcd, a compacted revision), and its first review catches
/// what changed while it heard nothing: a block made then darkens the open
/// watch once the follow is back.
#[tokio::test]
async fn a_block_the_consent_follow_missed_darkens_the_watch_once_it_starts_again() {
    let faults = spine_testing::StoreTap::new(Arc::new(spine_runtime::store::EmbeddedStore::in_memory()));
    let env = spine_testing::start_on_with(faults.clone(), None, spine_testing::test_config(), with_presence).await;
    let a = env.tenant("a").await;
    let (target, watcher) = (env.device(&a).await, env.device(&a).await);
    env.add_contact(&target.token, peer(&watcher.account)).await;
    announce(&env, &target.token, Status::Online).await;
    let mut stream = client(&env)
        .watch(req(pb::WatchRequest { targets: vec![local(&target.account)] }, &watcher.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut stream).await.status, Status::Online as i32);
    let unknown = query(&env, &watcher.token, local(&spine_runtime::ids::new(spine_runtime::ids::Kind::Account))).await;

    // Every store watch now loses what it sees: the block is stored, but
    // the follow does not hear of it, and the open watch stays lit.
    faults.deafen();
    env.identity()
        .block(req(ipb::BlockRequest { account_id: String::new(), peer: peer(&watcher.account) }, &target.token))
        .await
        .unwrap();
    let missed = tokio::time::timeout(Duration::from_millis(1500), stream.next()).await;
    assert!(missed.is_err(), "the watch changed although the follow heard nothing: {missed:?}");
    // The watches end; the follow starts again and reviews every pair.
    faults.cut();
    let dark = next_within(&mut stream, "blocked while the follow was deaf").await;
    assert_eq!((dark.status, dark.last_seen, dark.last_seen_at), (unknown.status, unknown.last_seen, None));
}

#[tokio::test]
async fn open_watches_follow_blocks_contacts_deletion_and_the_watchers_own_settings_at_once() {
    let env = start().await;
    let (a, b) = (env.tenant("a").await, env.tenant("b").await);
    let target = env.device(&a).await;
    let watcher = env.device(&a).await;
    let x = env.device(&b).await; // another app's person
    let mut id = env.identity();
    env.add_contact(&target.token, peer(&watcher.account)).await;
    let exact = ipb::PrivacySettings { last_seen: ipb::LastSeenGranularity::Exact as i32, ..Default::default() };
    set(&env, &target.token, exact.clone(), &["last_seen"]).await;
    set(&env, &watcher.token, exact.clone(), &["last_seen"]).await;
    announce(&env, &target.token, Status::Online).await;
    announce(&env, &target.token, Status::Offline).await;
    tokio::time::sleep(Duration::from_millis(700)).await; // past the coalescing window
    let mut stream = client(&env)
        .watch(req(pb::WatchRequest { targets: vec![local(&target.account)] }, &watcher.token))
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await;
    assert_eq!((first.status, first.last_seen), (Status::Offline as i32, LastSeen::At as i32));

    // Reciprocal last-seen reads the watcher's own settings: hiding its own
    // hides the target's on its open watch.
    let hidden = ipb::PrivacySettings { last_seen: ipb::LastSeenGranularity::Hidden as i32, ..Default::default() };
    set(&env, &watcher.token, hidden, &["last_seen"]).await;
    let s = next_within(&mut stream, "the watcher hid its own last-seen").await;
    assert_eq!((s.status, s.last_seen), (Status::Offline as i32, LastSeen::Hidden as i32));
    set(&env, &watcher.token, exact, &["last_seen"]).await;
    assert_eq!(next_within(&mut stream, "the watcher showed it again").await.last_seen, LastSeen::At as i32);

    // Blocked: dark at once, exactly as an account that does not exist.
    let unknown = query(&env, &watcher.token, local(&spine_runtime::ids::new(spine_runtime::ids::Kind::Account))).await;
    id.block(req(ipb::BlockRequest { account_id: String::new(), peer: peer(&watcher.account) }, &target.token))
        .await
        .unwrap();
    let dark = next_within(&mut stream, "blocked").await;
    assert_eq!((dark.status, dark.last_seen, dark.last_seen_at), (unknown.status, unknown.last_seen, None));
    id.unblock(req(ipb::UnblockRequest { account_id: String::new(), peer: peer(&watcher.account) }, &target.token))
        .await
        .unwrap();
    assert_eq!(next_within(&mut stream, "unblocked").await.status, Status::Offline as i32);
    // No longer a contact (presence shown to contacts only): dark; again a
    // contact: seen.
    id.remove_contact(req(
        ipb::RemoveContactRequest { account_id: String::new(), peer: peer(&watcher.account) },
        &target.token,
    ))
    .await
    .unwrap();
    assert_eq!(next_within(&mut stream, "contact removed").await.status, Status::Unavailable as i32);
    env.add_contact(&target.token, peer(&watcher.account)).await;
    assert_eq!(next_within(&mut stream, "contact added back").await.status, Status::Offline as i32);

    // Another app's person, a contact through their handle, then blocked
    // through it (the lists by person).
    let xh = handle(&env, &x.token, &a).await;
    let x_peer =
        Some(PeerRef { peer: Some(peer_ref::Peer::Interop(InteropRef { tenant_id: b.id.clone(), handle: xh })) });
    env.add_contact(&target.token, x_peer.clone()).await;
    let th = handle(&env, &target.token, &b).await;
    let mut x_stream = client(&env)
        .watch(req(pb::WatchRequest { targets: vec![interop(&a.id, &th)] }, &x.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut x_stream).await.status, Status::Offline as i32);
    id.block(req(ipb::BlockRequest { account_id: String::new(), peer: x_peer }, &target.token)).await.unwrap();
    assert_eq!(next_within(&mut x_stream, "blocked across apps").await.status, Status::Unavailable as i32);

    // The target deletes its account: dark.
    id.delete_account(req(ipb::DeleteAccountRequest { account_id: String::new() }, &target.token)).await.unwrap();
    assert_eq!(next_within(&mut stream, "account deleted").await.status, Status::Unavailable as i32);
}

#[tokio::test]
async fn a_flapping_device_cannot_storm_its_watchers() {
    let env = start().await;
    let a = env.tenant("a").await;
    let target = env.device(&a).await;
    let watcher = env.device(&a).await;
    env.add_contact(&target.token, peer(&watcher.account)).await;
    let stream = client(&env)
        .watch(req(pb::WatchRequest { targets: vec![local(&target.account)] }, &watcher.token))
        .await
        .unwrap()
        .into_inner();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let reader = tokio::spawn(async move {
        let mut stream = stream;
        while let Some(Ok(u)) = stream.next().await {
            s2.lock().unwrap().push(u.states[0].status);
        }
    });
    let started = Instant::now();
    for i in 0..60 {
        announce(&env, &target.token, if i % 2 == 0 { Status::Online } else { Status::Away }).await;
    }
    announce(&env, &target.token, Status::Online).await;
    let elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    reader.abort();
    let seen = seen.lock().unwrap().clone();
    // 61 announcements; at most one change per half second reaches the
    // watcher (plus the initial state), and the last one is the truth.
    let bound = (elapsed.as_millis() / 500) as usize + 3;
    assert!(seen.len() <= bound, "{} updates in {elapsed:?} (bound {bound})", seen.len());
    assert_eq!(*seen.last().unwrap(), Status::Online as i32);
}

#[tokio::test]
async fn a_slow_watcher_is_dropped_without_slowing_others() {
    let env = start().await;
    let a = env.tenant("a").await;
    let mut targets = Vec::new();
    let mut tokens = Vec::new();
    for i in 0..256 {
        let acct = env.account(&a).await;
        if i < 100 {
            let d = env.device_of(&a, &acct).await;
            set(
                &env,
                &d.token,
                ipb::PrivacySettings {
                    presence_visibility: ipb::PresenceVisibility::Everyone as i32,
                    ..Default::default()
                },
                &["presence_visibility"],
            )
            .await;
            tokens.push(d.token);
        }
        targets.push(local(&acct));
    }
    let watcher = env.device(&a).await;
    // The slow one: a connection whose flow-control window holds almost
    // nothing, and a client that never reads.
    let tiny = tonic::transport::Endpoint::from_shared(env.server.endpoint())
        .unwrap()
        .initial_stream_window_size(64)
        .initial_connection_window_size(64)
        .connect()
        .await
        .unwrap();
    let mut slow = PresenceClient::new(tiny)
        .watch(req(pb::WatchRequest { targets: targets.clone() }, &watcher.token))
        .await
        .unwrap()
        .into_inner();
    let mut fast = client(&env)
        .watch(req(pb::WatchRequest { targets: targets[..100].to_vec() }, &watcher.token))
        .await
        .unwrap()
        .into_inner();
    let mut fast_seen = 0;
    while fast_seen < 100 {
        tokio::time::timeout(Duration::from_secs(10), fast.next()).await.unwrap().unwrap().unwrap();
        fast_seen += 1;
    }
    // The fast watcher reads all along.
    let counted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c2 = counted.clone();
    let reader = tokio::spawn(async move {
        while let Some(Ok(_)) = fast.next().await {
            c2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    // Enough changes to overrun the slow stream's buffer and what the
    // transport holds for it (about 8 KiB).
    for round in 0..8 {
        for t in &tokens {
            announce(&env, t, if round % 2 == 0 { Status::Online } else { Status::Away }).await;
        }
        tokio::time::sleep(Duration::from_millis(550)).await;
    }
    let got_all = spine_testing::eventually(Duration::from_secs(10), || async {
        counted.load(std::sync::atomic::Ordering::Relaxed) >= 100 * 7
    })
    .await;
    reader.abort();
    assert!(got_all, "the fast watcher was slowed: {} updates", counted.load(std::sync::atomic::Ordering::Relaxed));
    // The slow one, once it reads, finds the resumable error.
    let mut ended = None;
    while let Ok(Some(item)) = tokio::time::timeout(Duration::from_secs(10), slow.next()).await {
        if let Err(e) = item {
            ended = Some(e);
            break;
        }
    }
    let e = ended.expect("the slow watcher was not dropped");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("watch again"));
}

#[tokio::test]
async fn bad_input_and_silos() {
    let env = start().await;
    let (a, b) = (env.tenant("a").await, env.tenant("b").await);
    let d = env.device(&a).await;
    let other = env.device(&b).await;
    let mut p = client(&env);
    for (what, r) in [
        (
            "in-call from a device",
            p.announce(req(pb::AnnounceRequest { status: Status::InCall as i32, ttl_seconds: 60 }, &d.token))
                .await
                .map(drop),
        ),
        ("unspecified", p.announce(req(pb::AnnounceRequest { status: 0, ttl_seconds: 60 }, &d.token)).await.map(drop)),
        (
            "ttl too long",
            p.announce(req(pb::AnnounceRequest { status: Status::Online as i32, ttl_seconds: 301 }, &d.token))
                .await
                .map(drop),
        ),
        (
            "ttl too short",
            p.announce(req(pb::AnnounceRequest { status: Status::Online as i32, ttl_seconds: 5 }, &d.token))
                .await
                .map(drop),
        ),
        ("no targets", p.query(req(pb::QueryRequest { targets: vec![] }, &d.token)).await.map(drop)),
        (
            "too many targets",
            p.query(req(pb::QueryRequest { targets: vec![local(&d.account); 257] }, &d.token)).await.map(drop),
        ),
        ("malformed id", p.query(req(pb::QueryRequest { targets: vec![local("ac_../x")] }, &d.token)).await.map(drop)),
    ] {
        assert_eq!(r.unwrap_err().code(), Code::InvalidArgument, "{what}");
    }
    // Not for tenant servers or operators.
    assert_eq!(
        p.announce(req(pb::AnnounceRequest { status: Status::Online as i32, ttl_seconds: 60 }, &a.cred))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        p.query(req(pb::QueryRequest { targets: vec![local(&d.account)] }, &env.operator)).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    // Another tenant's account id is no account at all for this caller.
    announce(&env, &d.token, Status::Online).await;
    let ghost = spine_runtime::ids::new(spine_runtime::ids::Kind::Account);
    let seen = query(&env, &other.token, local(&d.account)).await;
    assert_eq!(seen, query(&env, &other.token, local(&ghost)).await);
    assert_eq!(seen.status, Status::Unavailable as i32);
    // The data report says presence stores nothing durable.
    let report =
        env.identity().get_data_report(req(ipb::GetDataReportRequest::default(), &d.token)).await.unwrap().into_inner();
    let section = report.sections.iter().find(|s| s.service == "presence").unwrap();
    assert!(matches!(
        section.items[0].retention.as_ref().unwrap().kind,
        Some(spine_proto::common::v1::retention::Kind::InMemoryOnly(true))
    ));
    assert_eq!(section.items[0].count, 1);
    let privacy = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/privacy.md")).unwrap();
    assert!(privacy.contains("| `presence_state` |"));
    // Nothing of presence is in the store.
    assert!(
        env.rt
            .store
            .range_all("/spine/")
            .await
            .unwrap()
            .iter()
            .all(|kv| !kv.key.contains("presence") || kv.key.contains("/presence/nodes/"))
    );
}
