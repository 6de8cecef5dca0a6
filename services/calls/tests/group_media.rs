//! Group calls with media through a real SFU: Janus on loopback as the
//! media node, registered and kept by the media-node agent; devices of
//! three products join the call's room with their admissions and exchange
//! frames over real WebRTC (str0m), every frame SFrame-encrypted with keys
//! from the call's MLS group. What the SFU forwards is ciphertext; a
//! removed member is kicked and decrypts nothing new; admissions are
//! refused without the right token; calls spread over two media nodes and
//! leave a dead one.

mod support;

#[path = "../../groups/tests/support/mod.rs"]
#[allow(unused_imports)]
mod groups_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use groups_support::{Member, create_group, let_anyone_add, member};
use serde_json::json;
use sframe::frame::MonotonicCounter;
use spine_media_device::{FrameCrypto, MediaDevice};
use spine_mls::DeviceName;
use spine_proto::calls::v1 as pb;
use spine_proto::calls::v1::media_nodes_client::MediaNodesClient;
use spine_runtime::config::Backend;
use spine_testing::{Env, JanusServer, req};
use support::*;
use tonic::Code;

/// Seals and opens frames with a member's MLS group as it is now (a commit
/// the member processes moves it to the new epoch's keys).
struct MlsFrames {
    m: Arc<Mutex<Member>>,
    counter: Mutex<(u64, MonotonicCounter)>,
}

impl MlsFrames {
    fn new(m: &Arc<Mutex<Member>>) -> Arc<Self> {
        Arc::new(Self { m: m.clone(), counter: Mutex::new((0, MonotonicCounter::default())) })
    }
}

impl FrameCrypto for MlsFrames {
    fn seal(&self, payload: &[u8]) -> Option<Vec<u8>> {
        let m = self.m.lock().unwrap();
        let g = m.group.as_ref()?;
        let mut c = self.counter.lock().unwrap();
        if c.0 != g.epoch() {
            *c = (g.epoch(), MonotonicCounter::default());
        }
        m.client.sframe(g).encrypt(&mut c.1, payload).ok()
    }

    fn open(&self, frame: &[u8]) -> Option<Vec<u8>> {
        let m = self.m.lock().unwrap();
        m.client.sframe(m.group.as_ref()?).decrypt(frame).ok()
    }
}

/// A media node: a Janus and its agent, registered with a credential of
/// its own. Dropping it stops the agent (which deregisters) and Janus.
struct MediaNode {
    janus: JanusServer,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    agent: tokio::task::JoinHandle<Result<(), spine_janus::AgentError>>,
}

async fn media_node(env: &Env, id: &str, ttl: u32) -> MediaNode {
    let janus = JanusServer::start().await;
    let credential = media_credential(env, id).await;
    let config = spine_janus::AgentConfig {
        node_id: id.into(),
        credential,
        janus: janus.url.clone(),
        public_address: janus.url.clone(),
        region: "default".into(),
        capacity: 50,
        room_admin_key: janus.admin_key.clone(),
        ttl_secs: ttl,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(spine_janus::run(config, env.channel.clone(), async move {
        let _ = stopped.await;
    }));
    assert!(
        spine_testing::eventually(Duration::from_secs(15), || async {
            registered(env).await.iter().any(|n| n.node_id == id)
        })
        .await,
        "media node {id} registered"
    );
    MediaNode { janus, stop: Some(stop), agent }
}

impl MediaNode {
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.agent).await;
    }
}

async fn registered(env: &Env) -> Vec<pb::RegisteredMediaNode> {
    MediaNodesClient::new(env.channel.clone())
        .list_media_nodes(req(pb::ListMediaNodesRequest {}, &env.operator))
        .await
        .unwrap()
        .into_inner()
        .nodes
}

/// An MLS group of `creator` and `others` (their Spine groups are open to
/// `tenants`).
async fn group_of(env: &Env, creator: &mut Member, others: &mut [&mut Member], gid: &[u8], tenants: Vec<String>) {
    create_group(env, creator, gid, tenants).await;
    let kps: Vec<Vec<u8>> = others.iter().map(|m| m.client.key_packages(1, false).unwrap().remove(0)).collect();
    let add = creator.act(|c, g| c.add(g, &kps)).unwrap();
    creator.send_commit(env, &add).await.unwrap();
    creator.act(|c, g| c.merge_pending(g)).unwrap();
    for m in others.iter_mut() {
        let e = m.receive(env, 1).await;
        let last = e.last().unwrap();
        m.group = Some(m.client.join(&last.message).unwrap());
    }
}

fn token_of(m: &Arc<Mutex<Member>>) -> String {
    m.lock().unwrap().token.clone()
}

async fn join_call(env: &Env, m: &Arc<Mutex<Member>>, call: &str) -> pb::Call {
    calls(env).join(req(pb::JoinRequest { call_id: call.into() }, &token_of(m))).await.unwrap().into_inner()
}

async fn admission(env: &Env, m: &Arc<Mutex<Member>>, call: &str) -> Result<pb::MediaAdmission, tonic::Status> {
    Ok(calls(env)
        .get_media_admission(req(pb::GetMediaAdmissionRequest { call_id: call.into() }, &token_of(m)))
        .await?
        .into_inner())
}

/// Waits until `d` has opened at least `n` frames from each of `from`.
async fn opens_from(d: &MediaDevice, from: &[u64], n: u64, what: &str) {
    let ok = spine_testing::eventually(Duration::from_secs(20), || async {
        let s = d.stats();
        from.iter().all(|f| s.opened_count.get(f).copied().unwrap_or(0) >= n)
    })
    .await;
    assert!(ok, "{what}: {:?}", d.stats());
}

/// Janus's own view of a room's publishers (the test knows the admin key).
async fn in_room(janus: &JanusServer, room: u64) -> Vec<u64> {
    let session = spine_janus::Janus::new(&janus.url).session().await.unwrap();
    let h = session.attach(spine_janus::agent::VIDEOROOM).await.unwrap();
    let r = h.request(json!({"request": "listparticipants", "room": room})).await.unwrap();
    let _ = session.destroy().await;
    r["participants"].as_array().into_iter().flatten().filter_map(|p| p["id"].as_u64()).collect()
}

/// One account and device in each of three products, each letting anyone
/// add it to groups, with key packages uploaded.
async fn three_products(env: &Env) -> (Vec<Member>, Vec<spine_testing::Tenant>) {
    let mut tenants = Vec::new();
    let mut members = Vec::new();
    for name in ["messenger", "insta", "whatsapp"] {
        let t = env.tenant(name).await;
        let acct = env.account(&t).await;
        let_anyone_add(env, &t, &acct).await;
        let m = member(env, &t, &acct).await;
        m.upload(env, 4).await;
        tenants.push(t);
        members.push(m);
    }
    (members, tenants)
}

fn shared(ms: Vec<Member>) -> Vec<Arc<Mutex<Member>>> {
    ms.into_iter().map(|m| Arc::new(Mutex::new(m))).collect()
}

/// Sends a commit of `m`'s group, without holding its lock across the call.
async fn send_commit(env: &Env, m: &Arc<Mutex<Member>>, b: &spine_mls::client::CommitBundle) {
    let (token, gid) = {
        let m = m.lock().unwrap();
        (m.token.clone(), m.group.as_ref().unwrap().group_id())
    };
    spine_proto::groups::v1::groups_client::GroupsClient::new(env.channel.clone())
        .max_encoding_message_size(16 << 20)
        .send_commit(req(
            spine_proto::groups::v1::SendCommitRequest {
                group_id: gid,
                commit: b.commit.clone(),
                welcome: b.welcome.clone().unwrap_or_default(),
                group_info: b.group_info.clone(),
            },
            &token,
        ))
        .await
        .unwrap();
}

/// Reads `m`'s next mailbox entry and processes it in its group.
async fn process_next(env: &Env, m: &Arc<Mutex<Member>>) {
    let (token, mut seq) = {
        let m = m.lock().unwrap();
        (m.token.clone(), m.next_seq)
    };
    let e = groups_support::receive_entries(env, &token, &mut seq, 1).await;
    let mut m = m.lock().unwrap();
    m.next_seq = seq;
    m.act(|c, g| c.process(g, &e[0].message)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_products_in_one_call_through_janus_and_a_removal() {
    let n = nodes(Backend::Embedded, 1, |_, _| {}).await;
    let env = &n[0];
    let sfu = media_node(env, "sfu-1", 15).await;
    let (mut ms, ts) = three_products(env).await;
    let tenants: Vec<String> = ts.iter().map(|t| t.id.clone()).collect();
    // The group: Alice (messenger) adds Bob (insta) and Carol (whatsapp).
    {
        let (a, rest) = ms.split_at_mut(1);
        let (b, c) = rest.split_at_mut(1);
        group_of(env, &mut a[0], &mut [&mut b[0], &mut c[0]], b"media-call", tenants.clone()).await;
    }
    let ms = shared(ms);

    let start = calls(env)
        .start_group_call(req(
            pb::StartGroupCallRequest { request_id: "m1".into(), group_id: b"media-call".to_vec(), video: false },
            &token_of(&ms[0]),
        ))
        .await
        .unwrap()
        .into_inner();
    let id = start.call_id.clone();
    assert_eq!(start.media.as_ref().unwrap().node_id, "sfu-1");
    for m in &ms[1..] {
        join_call(env, m, &id).await;
    }
    let mut devices = Vec::new();
    let mut admissions = Vec::new();
    for (m, name) in ms.iter().zip(["alice", "bob", "carol"]) {
        let a = admission(env, m, &id).await.unwrap();
        assert_eq!(a.address, sfu.janus.url);
        devices.push(MediaDevice::join(&a, name, MlsFrames::new(m)).await.unwrap());
        admissions.push(a);
    }
    let pid: Vec<u64> = admissions.iter().map(|a| a.participant_id).collect();
    assert_eq!(admissions.iter().map(|a| a.room_id).collect::<std::collections::HashSet<_>>().len(), 1, "one room");

    // Each device opens the other two's frames, with the payloads they sent.
    for (i, d) in devices.iter().enumerate() {
        let others: Vec<u64> = pid.iter().copied().filter(|p| *p != pid[i]).collect();
        opens_from(d, &others, 25, "every device decrypts the two others").await;
        let s = d.stats();
        for (j, name) in ["alice", "bob", "carol"].iter().enumerate() {
            if j != i {
                let got = &s.opened[&pid[j]];
                assert!(got.iter().all(|p| p.starts_with(format!("{name}|").as_bytes())), "{got:?}");
            }
        }
    }

    // An eavesdropper the room admits (a token the test adds itself, with
    // the room's secret) but with no MLS membership: it receives the
    // frames and opens none; no plaintext crosses the SFU.
    let room = admissions[0].room_id;
    let secret = spine_janus::agent::room_secret(&sfu.janus.admin_key, room);
    {
        let session = spine_janus::Janus::new(&sfu.janus.url).session().await.unwrap();
        let h = session.attach(spine_janus::agent::VIDEOROOM).await.unwrap();
        h.request(
            json!({"request": "allowed", "room": room, "secret": secret, "action": "add", "allowed": ["eavesdrop"]}),
        )
        .await
        .unwrap();
    }
    let outsider_t = env.tenant("outsider").await;
    let outsider_acct = env.account(&outsider_t).await;
    let mut outsider = member(env, &outsider_t, &outsider_acct).await;
    outsider.group =
        Some(outsider.client.create_group(b"other", &groups_support::ds_key(env, &outsider).await).unwrap());
    let outsider = Arc::new(Mutex::new(outsider));
    let spy = Arc::new(Spy { keys: MlsFrames::new(&outsider), plaintext_seen: Mutex::new(false) });
    let eavesdrop = pb::MediaAdmission { token: "eavesdrop".into(), ..admissions[0].clone() };
    let listener = MediaDevice::listen(&eavesdrop, &pid, spy.clone()).await.unwrap();
    assert!(
        spine_testing::eventually(Duration::from_secs(15), || async {
            let s = listener.stats();
            pid.iter().all(|p| s.unopened.get(p).copied().unwrap_or(0) >= 20)
        })
        .await,
        "the eavesdropper receives frames: {:?}",
        listener.stats()
    );
    let s = listener.stats();
    assert!(s.opened_count.is_empty(), "it opens none: {s:?}");
    assert!(!*spy.plaintext_seen.lock().unwrap(), "no plaintext through the SFU");

    // Alice removes Carol: a new epoch; Alice and Bob move to its keys;
    // Spine drops Carol's leg, and the agent kicks her from the room.
    let carol_name = {
        let c = ms[2].lock().unwrap();
        DeviceName::new(&c.tenant, &c.account, &c.device)
    };
    let rm = ms[0].lock().unwrap().act(|c, g| c.remove(g, std::slice::from_ref(&carol_name))).unwrap();
    send_commit(env, &ms[0], &rm).await;
    ms[0].lock().unwrap().act(|c, g| c.merge_pending(g)).unwrap();
    process_next(env, &ms[1]).await;
    assert!(
        spine_testing::eventually(Duration::from_secs(15), || async {
            !in_room(&sfu.janus, room).await.contains(&pid[2])
        })
        .await,
        "Carol is kicked from the room"
    );
    let refused = admission(env, &ms[2], &id).await.unwrap_err();
    assert_eq!(
        (refused.code(), reason(&refused).as_str()),
        (Code::FailedPrecondition, "NOT_IN_CALL"),
        "no new admission"
    );
    // Alice and Bob keep hearing each other at the new epoch...
    let before: Vec<u64> = (0..2).map(|i| devices[i].stats().opened_count[&pid[1 - i]]).collect();
    for i in 0..2 {
        opens_from(&devices[i], &[pid[1 - i]], before[i] + 25, "the rest decrypt after the removal").await;
    }
    // ...and Carol opens nothing sent since.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let carol_then = devices[2].stats().opened_count.clone();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(devices[2].stats().opened_count, carol_then, "Carol decrypts nothing new");

    // Bob's device is revoked: he is out of the call and kicked from the
    // room at once, not after the unattended time.
    let (bob_account, bob_device) = {
        let b = ms[1].lock().unwrap();
        (b.account.clone(), b.device.clone())
    };
    env.identity()
        .revoke_device(req(
            spine_proto::identity::v1::RevokeDeviceRequest { account_id: bob_account, device_id: bob_device },
            &ts[1].cred,
        ))
        .await
        .unwrap();
    assert!(
        spine_testing::eventually(Duration::from_secs(10), || async {
            !in_room(&sfu.janus, room).await.contains(&pid[1])
        })
        .await,
        "a revoked device is kicked from the room"
    );
    for d in devices {
        d.leave().await;
    }
    drop(listener);
    sfu.stop().await;
}

/// An eavesdropper's keys: a group of its own, and a check that no frame
/// it receives carries a payload in the clear.
struct Spy {
    keys: Arc<MlsFrames>,
    plaintext_seen: Mutex<bool>,
}

impl FrameCrypto for Spy {
    fn seal(&self, payload: &[u8]) -> Option<Vec<u8>> {
        self.keys.seal(payload)
    }

    fn open(&self, frame: &[u8]) -> Option<Vec<u8>> {
        for name in [&b"alice|"[..], b"bob|", b"carol|"] {
            if frame.windows(name.len()).any(|w| w == name) {
                *self.plaintext_seen.lock().unwrap() = true;
            }
        }
        self.keys.open(frame)
    }
}

/// Two members (of two products) in an MLS group of their own.
async fn pair_group(env: &Env, a: &mut Member, b: &mut Member, gid: &[u8], tenants: &[String]) {
    group_of(env, a, &mut [b], gid, tenants.to_vec()).await;
}

async fn start_group_call(env: &Env, m: &Arc<Mutex<Member>>, gid: &[u8]) -> pb::Call {
    calls(env)
        .start_group_call(req(
            pb::StartGroupCallRequest {
                request_id: format!("start-{}", hex(gid)),
                group_id: gid.to_vec(),
                video: false,
            },
            &token_of(m),
        ))
        .await
        .unwrap()
        .into_inner()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admission_refusals_leave_the_call_running() {
    // Tokens roll over every 2 s here, so one expires within 4 s.
    let n = nodes(Backend::Embedded, 1, |_, c| {
        c.edit_section(|s: &mut spine_calls::CallsConfig| s.media_admission_secs = 2);
    })
    .await;
    let env = &n[0];
    let sfu = media_node(env, "sfu-1", 15).await;
    let (mut ms, ts) = three_products(env).await;
    let tenants: Vec<String> = ts.iter().map(|t| t.id.clone()).collect();
    {
        let (a, rest) = ms.split_at_mut(1);
        pair_group(env, &mut a[0], &mut rest[0], b"call-one", &tenants).await;
    }
    // Alice also has a group of her own, with a call of its own.
    let mut alice_alone = member(env, &ts[0], &ms[0].account).await;
    alice_alone.upload(env, 2).await;
    create_group(env, &mut alice_alone, b"call-two", tenants.clone()).await;
    let ms = shared(ms);
    let alone = Arc::new(Mutex::new(alice_alone));

    let call = start_group_call(env, &ms[0], b"call-one").await;
    let id = call.call_id.clone();
    join_call(env, &ms[1], &id).await;
    let other_call = start_group_call(env, &alone, b"call-two").await;

    let alice_adm = admission(env, &ms[0], &id).await.unwrap();
    let alice = MediaDevice::join(&alice_adm, "alice", MlsFrames::new(&ms[0])).await.unwrap();
    let bob_adm = admission(env, &ms[1], &id).await.unwrap();

    // No token, another call's token: refused by the room.
    let refused = |r: Result<MediaDevice, spine_media_device::DeviceError>| match r {
        Err(spine_media_device::DeviceError::Refused { .. }) => {}
        other => panic!("expected a refusal, got {other:?}"),
    };
    refused(
        MediaDevice::join(
            &pb::MediaAdmission { token: String::new(), ..bob_adm.clone() },
            "bob",
            MlsFrames::new(&ms[1]),
        )
        .await,
    );
    let other_adm = admission(env, &alone, &other_call.call_id).await.unwrap();
    assert_ne!(other_adm.room_id, bob_adm.room_id);
    refused(
        MediaDevice::join(
            &pb::MediaAdmission { token: other_adm.token.clone(), ..bob_adm.clone() },
            "bob",
            MlsFrames::new(&ms[1]),
        )
        .await,
    );
    // A non-member: no admission, no join.
    let carol = ms[2].clone();
    let s = admission(env, &carol, &id).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    let s = calls(env).join(req(pb::JoinRequest { call_id: id.clone() }, &token_of(&carol))).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound);

    // An expired token: two periods later the room no longer takes it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    refused(MediaDevice::join(&bob_adm, "bob", MlsFrames::new(&ms[1])).await);

    // A good token under another participant id: let in by Janus, then
    // kicked by the agent.
    let fresh = admission(env, &ms[1], &id).await.unwrap();
    let impostor = MediaDevice::join_as(&fresh, fresh.participant_id + 1, "bob", MlsFrames::new(&ms[1])).await.unwrap();
    assert!(
        spine_testing::eventually(Duration::from_secs(10), || async {
            !in_room(&sfu.janus, fresh.room_id).await.contains(&(fresh.participant_id + 1))
        })
        .await,
        "a participant under an id it was not given is kicked"
    );
    drop(impostor);

    // The call carries on: Bob, properly admitted, hears Alice.
    let fresh = admission(env, &ms[1], &id).await.unwrap();
    let bob = MediaDevice::join(&fresh, "bob", MlsFrames::new(&ms[1])).await.unwrap();
    opens_from(&bob, &[alice_adm.participant_id], 25, "Bob hears Alice").await;
    opens_from(&alice, &[fresh.participant_id], 25, "Alice hears Bob").await;
    // Bob hangs up: his admission goes, and Janus is told to let him go.
    calls(env).hang_up(req(pb::HangUpRequest { call_id: id.clone() }, &token_of(&ms[1]))).await.unwrap();
    assert!(
        spine_testing::eventually(Duration::from_secs(10), || async {
            !in_room(&sfu.janus, fresh.room_id).await.contains(&fresh.participant_id)
        })
        .await,
        "a device that left the call is kicked from the room"
    );
    alice.leave().await;
    bob.leave().await;
    sfu.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_spread_over_two_media_nodes_and_leave_a_dead_one() {
    let n = nodes(Backend::Embedded, 1, |_, _| {}).await;
    let env = &n[0];
    let mut sfus = vec![media_node(env, "sfu-a", 5).await, media_node(env, "sfu-b", 5).await];
    let (mut ms, ts) = three_products(env).await;
    let tenants: Vec<String> = ts.iter().map(|t| t.id.clone()).collect();
    for gid in [&b"g-1"[..], b"g-2", b"g-3"] {
        let (a, rest) = ms.split_at_mut(1);
        pair_group(env, &mut a[0], &mut rest[0], gid, &tenants).await;
        // Keep the latest group for media keys; earlier ones are only for
        // placing calls.
    }
    let ms = shared(ms);

    // The first call, with two devices in its room, loads its node...
    let first = start_group_call(env, &ms[0], b"g-3").await;
    join_call(env, &ms[1], &first.call_id).await;
    let first_node = first.media.clone().unwrap().node_id;
    let mut devices = Vec::new();
    for (m, name) in ms[..2].iter().zip(["alice", "bob"]) {
        let a = admission(env, m, &first.call_id).await.unwrap();
        devices.push(MediaDevice::join(&a, name, MlsFrames::new(m)).await.unwrap());
    }
    assert!(
        spine_testing::eventually(Duration::from_secs(10), || async {
            registered(env).await.iter().any(|n| n.node_id == first_node && n.load == 2)
        })
        .await,
        "the agent reports its load: {:?}",
        registered(env).await
    );
    // ...so the next call goes to the other one.
    let second = start_group_call(env, &ms[0], b"g-1").await;
    let second_node = second.media.clone().unwrap().node_id;
    assert_ne!(first_node, second_node, "calls spread by load");

    // The second call's Janus dies: its agent stops refreshing, the
    // registration lapses, and new calls go to the survivor.
    let dead = if second_node == "sfu-a" { 0 } else { 1 };
    sfus[dead].janus.kill();
    assert!(
        spine_testing::eventually(Duration::from_secs(15), || async {
            !registered(env).await.iter().any(|n| n.node_id == second_node)
        })
        .await,
        "a dead Janus's registration lapses"
    );
    calls(env).hang_up(req(pb::HangUpRequest { call_id: second.call_id.clone() }, &token_of(&ms[0]))).await.unwrap();
    let third = start_group_call(env, &ms[0], b"g-2").await;
    assert_eq!(third.media.unwrap().node_id, first_node, "new calls go to the live node");
    for d in devices {
        d.leave().await;
    }
    for s in sfus {
        s.stop().await;
    }
}
