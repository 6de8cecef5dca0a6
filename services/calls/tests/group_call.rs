//! A group call bound to an MLS group, devices of two products on two
//! nodes: media-node choice by region and load, group rings by opt-in,
//! joins, SFrame media keyed by the group's exporter and relayed as opaque
//! bytes by Spine, a removal that rekeys the call, leaving, and idle end.

mod support;

#[path = "../../groups/tests/support/mod.rs"]
#[allow(unused_imports)]
mod groups_support;

use std::time::Duration;

use groups_support::{Member, create_group, let_anyone_add, member};
use sframe::frame::MonotonicCounter;
use spine_mls::DeviceName;
use spine_proto::calls::v1 as pb;
use spine_proto::calls::v1::media_nodes_client::MediaNodesClient;
use spine_proto::identity::v1 as ipb;
use spine_runtime::config::Backend;
use spine_testing::{Device, req};
use support::*;
use tonic::Code;

fn device_of(m: &Member) -> Device {
    Device {
        tenant: m.tenant.clone(),
        account: m.account.clone(),
        device: m.device.clone(),
        key: ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng),
        token: m.token.clone(),
    }
}

/// Registers a media node with a credential of its own (issued by the
/// operator), which is returned.
async fn register_sfu(env: &spine_testing::Env, id: &str, region: &str, capacity: u32, load: u32, ttl: u32) -> String {
    let cred = media_credential(env, id).await;
    MediaNodesClient::new(env.channel.clone())
        .register_media_node(req(
            pb::RegisterMediaNodeRequest {
                node_id: id.into(),
                address: format!("{id}.example:443"),
                region: region.into(),
                capacity,
                load,
                ttl_seconds: ttl,
            },
            &cred,
        ))
        .await
        .unwrap();
    cred
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_call_keyed_by_mls() {
    let n = nodes(Backend::Etcd, 2, |i, c| {
        c.edit_section(|s: &mut spine_calls::CallsConfig| s.region = if i == 0 { "eu".into() } else { "us".into() });
        c.edit_section(|s: &mut spine_calls::CallsConfig| s.group_idle_secs = 3);
    })
    .await;
    let env = &n[0];
    // Media nodes: one about to lapse (least loaded of all), a busy one,
    // a full one, and one in another region.
    register_sfu(env, "sfu-eu-lapsing", "eu", 10, 0, 5).await;
    let mut sfus = std::collections::HashMap::new();
    sfus.insert("sfu-eu-busy", register_sfu(env, "sfu-eu-busy", "eu", 10, 9, 60).await);
    sfus.insert("sfu-eu-full", register_sfu(env, "sfu-eu-full", "eu", 5, 5, 60).await);
    sfus.insert("sfu-eu-ok", register_sfu(env, "sfu-eu-ok", "eu", 10, 2, 60).await);
    sfus.insert("sfu-us", register_sfu(env, "sfu-us", "us", 100, 0, 60).await);
    let lapse_from = std::time::Instant::now();

    let messenger = env.tenant("messenger").await;
    let insta = env.tenant("insta").await;
    let (alice_acct, carol_acct, bob_acct) =
        (env.account(&messenger).await, env.account(&messenger).await, env.account(&insta).await);
    let mut alice = member(env, &messenger, &alice_acct).await;
    let mut carol = member(env, &messenger, &carol_acct).await;
    let mut bob = member(env, &insta, &bob_acct).await;
    // Bob and Carol let others add them to groups. Bob opts in to group
    // rings and takes calls from anyone; Carol does not.
    let_anyone_add(env, &insta, &bob_acct).await;
    let_anyone_add(env, &messenger, &carol_acct).await;
    set(
        env,
        &insta,
        &bob_acct,
        "group_call_rings",
        ipb::PrivacySettings { group_call_rings: true, ..Default::default() },
    )
    .await;
    everyone_can_call(env, &insta, &bob_acct).await;

    // An MLS group across the two products: Alice adds Bob and Carol.
    for m in [&alice, &carol, &bob] {
        m.upload(env, 2).await;
    }
    let gid = b"family-call".to_vec();
    create_group(env, &mut alice, &gid, vec![messenger.id.clone(), insta.id.clone()]).await;
    let mut kps = Vec::new();
    for m in [&bob, &carol] {
        let kp = m.client.key_packages(1, false).unwrap().remove(0);
        kps.push(kp);
    }
    let add = alice.act(|c, g| c.add(g, &kps)).unwrap();
    alice.send_commit(env, &add).await.unwrap();
    alice.act(|c, g| c.merge_pending(g)).unwrap();
    for m in [&mut bob, &mut carol] {
        let e = m.receive(env, 1).await;
        m.group = Some(m.client.join(&e[0].message).unwrap());
    }

    // Streams: Alice and Bob in the eu node, Carol in the us node.
    let mut pa = Phone::connect(&n[0], device_of(&alice)).await;
    let mut pb_ = Phone::connect(&n[0], device_of(&bob)).await;
    let mut pc = Phone::connect(&n[1], device_of(&carol)).await;

    // Not a member: nothing to find.
    let dave = env.device(&messenger).await;
    let s = calls(env)
        .start_group_call(req(
            pb::StartGroupCallRequest { request_id: "d".into(), group_id: gid.clone(), video: false },
            &dave.token,
        ))
        .await
        .unwrap_err();
    assert_eq!((s.code(), s.message()), (Code::NotFound, "group not found"));

    // The lapsed node is never chosen.
    assert!(
        spine_testing::eventually(Duration::from_secs(15), || async {
            env.rt.store.get("/spine/sys/calls/media/sfu-eu-lapsing").await.unwrap().is_none()
        })
        .await
    );
    assert!(lapse_from.elapsed() >= Duration::from_secs(4));

    let start = pa.start_group("g1", &gid).await.unwrap();
    let id = start.call_id.clone();
    assert_eq!((state(&start), start.epoch, start.group_id.clone()), (pb::CallState::Active, 1, gid.clone()));
    let media = start.media.clone().unwrap();
    assert_eq!((media.node_id.as_str(), media.region.as_str()), ("sfu-eu-ok", "eu"), "most members are in eu");
    assert_eq!(start.participants.len(), 1);
    // Bob's device rings; Carol's shows the call without ringing.
    let c = pb_.call_where(&id, |_| true).await;
    assert_eq!((ring(&c), c.role), (pb::RingState::Ringing, pb::Role::Member as i32));
    let c = pc.call_where(&id, |_| true).await;
    assert_eq!(ring(&c), pb::RingState::NotRinging);

    // Both join (Bob across the other product; Carol from the us node).
    let joined = pb_.join(&id).await.unwrap();
    assert_eq!((ring(&joined), joined.participants.len()), (pb::RingState::AnsweredHere, 2));
    let joined = pc.join(&id).await.unwrap();
    assert_eq!(joined.participants.len(), 3);
    let c = pa.call_where(&id, |c| c.participants.len() == 3).await;
    let leaf_of = |d: &str| c.participants.iter().find(|p| p.leg_id == d).map(|p| p.leaf_index);
    assert_eq!(leaf_of(&start.your_leg_id), Some(alice.g().own_index()));

    // Media: Alice encrypts with SFrame keys from the group's exporter; the
    // frame travels through Spine as opaque bytes; Bob and Carol decrypt.
    let secret_audio = b"secret audio frame 0001".to_vec();
    let frame = alice
        .client
        .sframe(alice.group.as_ref().unwrap())
        .encrypt(&mut MonotonicCounter::default(), &secret_audio)
        .unwrap();
    let r = pa.send_signal(&id, "", frame.clone()).await;
    assert_eq!((r.code, r.delivered), (0, 2));
    for (p, m) in [(&mut pb_, &bob), (&mut pc, &carol)] {
        let got = p.signal().await;
        assert_eq!(got.from_leg_id, start.your_leg_id);
        assert_eq!(m.client.sframe(m.group.as_ref().unwrap()).decrypt(&got.payload).unwrap(), secret_audio);
    }
    // Everything the server holds, and the frame itself, lack the plaintext;
    // no key the server holds decrypts it (it holds none).
    let held = env.rt.store.range_all("/").await.unwrap();
    let dump: Vec<u8> = held.iter().flat_map(|kv| kv.key.bytes().chain(kv.value.iter().copied())).collect();
    assert!(!dump.windows(secret_audio.len()).any(|w| w == secret_audio.as_slice()));
    assert!(!frame.windows(secret_audio.len()).any(|w| w == secret_audio.as_slice()));

    // Alice removes Carol from the group: the call follows the roster and
    // the new epoch; Carol is out and cannot decrypt the new epoch's media.
    let carol_name = DeviceName::new(&carol.tenant, &carol.account, &carol.device);
    let rm = alice.act(|c, g| c.remove(g, std::slice::from_ref(&carol_name))).unwrap();
    alice.send_commit(env, &rm).await.unwrap();
    alice.act(|c, g| c.merge_pending(g)).unwrap();
    let e = bob.receive(env, 1).await;
    bob.act(|c, g| c.process(g, &e[0].message)).unwrap();
    let c = pa.call_where(&id, |c| c.epoch == 2 && c.participants.len() == 2).await;
    assert!(c.participants.iter().all(|p| p.leg_id != joined.your_leg_id));
    pb_.call_where(&id, |c| c.epoch == 2).await;
    let out = pc.call_where(&id, |c| c.your_leg_id.is_empty()).await;
    assert_eq!(out.participants.len(), 2);
    let s = pc.join(&id).await.unwrap_err();
    assert_eq!((s.code(), reason(&s).as_str()), (Code::FailedPrecondition, "NOT_A_MEMBER"));
    let frame2 = alice
        .client
        .sframe(alice.group.as_ref().unwrap())
        .encrypt(&mut MonotonicCounter::default(), b"epoch two")
        .unwrap();
    assert_eq!(pa.send_signal(&id, "", frame2.clone()).await.delivered, 1);
    assert_eq!(
        bob.client.sframe(bob.group.as_ref().unwrap()).decrypt(&pb_.signal().await.payload).unwrap(),
        b"epoch two"
    );
    assert!(carol.client.sframe(carol.group.as_ref().unwrap()).decrypt(&frame2).is_err());

    // Leaving: the call ends with its last participant.
    pb_.hang_up(&id).await.unwrap();
    let ended = pa.hang_up(&id).await.unwrap();
    assert_eq!((state(&ended), end(&ended)), (pb::CallState::Ended, pb::EndReason::EveryoneLeft));

    // A call nobody joins ends when the idle time (3 s here) passes.
    let lonely = pa.start_group("g2", &gid).await.unwrap();
    assert_ne!(lonely.call_id, id);
    // Starting again while it lives joins it rather than making another.
    let again = pb_.start_group("g3", &gid).await.unwrap();
    assert_eq!((again.call_id.clone(), again.participants.len()), (lonely.call_id.clone(), 2));
    pb_.hang_up(&lonely.call_id).await.unwrap();
    let e = pa.call_where(&lonely.call_id, |c| state(c) == pb::CallState::Ended).await;
    assert_eq!(end(&e), pb::EndReason::Idle);

    // No media node with room: no group call.
    for id in ["sfu-eu-busy", "sfu-eu-full", "sfu-eu-ok", "sfu-us"] {
        MediaNodesClient::new(env.channel.clone())
            .deregister_media_node(req(pb::DeregisterMediaNodeRequest { node_id: id.into() }, &sfus[id]))
            .await
            .unwrap();
    }
    let s = pa.start_group("g4", &gid).await.unwrap_err();
    assert_eq!((s.code(), reason(&s).as_str()), (Code::Unavailable, "NO_MEDIA_NODE"));
}
