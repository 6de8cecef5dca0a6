//! A forked epoch, repaired by the service. The delivery service cannot
//! check a commit's membership tag (it needs a group secret), so it accepts
//! a commit whose tag is corrupted; every other member refuses it and is
//! stuck. They dispute it: the first dispute freezes commits on top of it,
//! a majority of the other members voids it, the group is back at the
//! epoch before for everyone, the committer rejoins by external commit and
//! messages flow again at one epoch. A commit that works (another member
//! writes in its epoch) cannot be voided by a lying minority.

mod support;

use spine_groups::model::{self, Slot};
use spine_mls::client::Incoming;
use spine_proto::groups::v1 as pb;
use spine_runtime::config::Backend;
use spine_testing::req;
use support::*;
use tonic::Code;
use tonic_types::StatusExt;

async fn dispute(env: &spine_testing::Env, m: &Member, gid: &[u8], epoch: u64) {
    m.groups(env)
        .report_dispute(req(pb::ReportDisputeRequest { group_id: gid.to_vec(), epoch }, &m.token))
        .await
        .unwrap();
}

async fn send(env: &spine_testing::Env, m: &mut Member, text: &str) {
    let gid = m.g().group_id();
    let bytes = m.act(|c, g| c.send(g, text.as_bytes())).unwrap();
    m.groups(env)
        .send_application(req(pb::SendApplicationRequest { group_id: gid, message: bytes }, &m.token))
        .await
        .unwrap();
}

/// The group's stored slot for `epoch`, if it holds that epoch.
async fn slot(env: &spine_testing::Env, gid: &[u8], epoch: u64) -> Option<Slot> {
    let kv =
        env.rt.store.get(&format!("/spine/g/{}{}", hex::encode(gid), model::slot_key("", epoch))).await.unwrap()?;
    Some(Slot::from_bytes(&kv.value).unwrap()).filter(|s| s.epoch == epoch)
}

fn reason(s: &tonic::Status) -> String {
    s.get_details_error_info().map(|i| i.reason).unwrap_or_default()
}

#[tokio::test]
async fn a_corrupted_commit_is_disputed_voided_and_the_group_heals() {
    let env = start(Backend::Embedded).await;
    let gid = b"forked".to_vec();
    let (_, mut m) = group_of(&env, 4, &gid).await;
    let e0 = m[0].g().epoch();

    // Alice commits with a corrupted membership tag (the last bytes of a
    // PublicMessage commit): the service cannot tell, and accepts it.
    let mut bad = m[0].act(|c, g| c.self_update(g)).unwrap();
    let last = bad.commit.len() - 1;
    bad.commit[last] ^= 0x55;
    assert_eq!(m[0].send_commit(&env, &bad).await.unwrap(), e0 + 1);
    m[0].act(|c, g| c.merge_pending(g)).unwrap();

    // Every other member refuses it, and stays at e0.
    for x in m[1..].iter_mut() {
        let e = x.receive(&env, 1).await.remove(0);
        assert_eq!(e.kind, pb::EntryKind::Commit as i32);
        assert!(x.act(|c, g| c.process(g, &e.message)).is_err(), "a corrupted tag is refused by members");
        assert_eq!(x.g().epoch(), e0);
    }
    // Their own commits now lose (WRONG_EPOCH): they are stuck.
    let stuck = m[1].act(|c, g| c.self_update(g)).unwrap();
    assert!(wrong_epoch(&m[1].send_commit(&env, &stuck).await.unwrap_err()).is_some());
    m[1].act(|c, g| c.discard_pending(g)).unwrap();

    // Bob disputes: commits on top of the disputed epoch are frozen, and
    // everyone sees it.
    dispute(&env, &m[1], &gid, e0 + 1).await;
    let g = get_group(&env, &m[2].token, &gid).await;
    assert_eq!((g.epoch, g.disputes.len(), g.disputes[0].reports), (e0 + 1, 1, 1));
    assert_eq!(g.disputes[0].committer_leaf_index, m[0].g().own_index(), "the dispute names the committer");
    assert!(g.commits_frozen_until.is_some(), "a disputed epoch freezes commits on top of it");
    let on_top = m[0].act(|c, g| c.self_update(g)).unwrap();
    let frozen = m[0].send_commit(&env, &on_top).await.unwrap_err();
    assert_eq!((frozen.code(), reason(&frozen).as_str()), (Code::FailedPrecondition, "EPOCH_DISPUTED"));
    assert!(frozen.get_details_retry_info().is_some());
    m[0].act(|c, g| c.discard_pending(g)).unwrap();
    // The committer's own dispute does not count.
    dispute(&env, &m[0], &gid, e0 + 1).await;
    assert_eq!(get_group(&env, &m[1].token, &gid).await.epoch, e0 + 1);

    // Carol disputes too: two of the three other members, a majority. The
    // commit is voided: the group is back at e0 and everyone is told.
    dispute(&env, &m[2], &gid, e0 + 1).await;
    let g = get_group(&env, &m[3].token, &gid).await;
    assert_eq!(g.epoch, e0, "the group is back at the epoch before");
    assert_eq!(g.members.len(), 4);
    assert!(g.commits_frozen_until.is_none());
    assert_eq!(g.voided.len(), 1);
    assert_eq!((g.voided[0].epoch, g.voided[0].committer_leaf_index), (e0 + 1, m[0].g().own_index()));
    assert!(g.disputes.iter().all(|d| d.epoch != e0 + 1), "the voided epoch's disputes are settled");
    for x in m.iter_mut() {
        let e = x.receive(&env, 1).await.remove(0);
        assert_eq!((e.kind, e.epoch, e.group_id.clone()), (pb::EntryKind::EpochVoided as i32, e0 + 1, gid.clone()));
    }
    let info = group_info(&env, &m[0].token, &gid).await;
    assert_eq!(info.epoch, e0, "GetGroupInfo serves the epoch before again");

    // The next commit wins as usual: Alice, who had merged the voided
    // commit, rejoins by external commit from the restored GroupInfo.
    let (rejoined, join) = m[0].client.join_external(&info.group_info).unwrap();
    m[0].group = Some(rejoined);
    assert_eq!(m[0].send_commit(&env, &join).await.unwrap(), e0 + 1);
    for x in m[1..].iter_mut() {
        let e = x.receive(&env, 1).await.remove(0);
        assert!(matches!(x.act(|c, g| c.process(g, &e.message)).unwrap(), Incoming::Commit { .. }));
    }
    // One epoch for everyone, and messages flow both ways.
    let auth = m[0].g().epoch_authenticator();
    for x in m[1..].iter_mut() {
        assert_eq!(x.g().epoch_authenticator(), auth);
    }
    send(&env, &mut m[0], "back together").await;
    for x in m[1..].iter_mut() {
        let e = x.receive(&env, 1).await.remove(0);
        assert!(matches!(
            x.act(|c, g| c.process(g, &e.message)).unwrap(),
            Incoming::Application { plaintext, .. } if plaintext == b"back together"
        ));
    }
    send(&env, &mut m[3], "and back").await;
    let e = m[0].receive(&env, 1).await;
    let last = e.last().unwrap();
    assert!(matches!(
        m[0].act(|c, g| c.process(g, &last.message)).unwrap(),
        Incoming::Application { plaintext, .. } if plaintext == b"and back"
    ));
    // A commit on the healed group goes through.
    let next = m[1].act(|c, g| c.self_update(g)).unwrap();
    assert_eq!(m[1].send_commit(&env, &next).await.unwrap(), e0 + 2);
}

#[tokio::test]
async fn a_commit_that_works_cannot_be_voided() {
    let env = start(Backend::Embedded).await;
    let gid = b"honest".to_vec();
    let (_, mut m) = group_of(&env, 4, &gid).await;
    let e0 = m[0].g().epoch();
    let good = m[0].act(|c, g| c.self_update(g)).unwrap();
    m[0].send_commit(&env, &good).await.unwrap();
    m[0].act(|c, g| c.merge_pending(g)).unwrap();
    for x in m[1..].iter_mut() {
        let e = x.receive(&env, 1).await.remove(0);
        x.act(|c, g| c.process(g, &e.message)).unwrap();
    }
    // One member lies: the epoch freezes, but one vote of three is no
    // majority.
    dispute(&env, &m[1], &gid, e0 + 1).await;
    assert!(get_group(&env, &m[0].token, &gid).await.commits_frozen_until.is_some());
    // Another member writes in the new epoch: the commit is confirmed, the
    // freeze lifts, and a second liar cannot void it. The epoch before,
    // kept only to void the commit, goes.
    assert!(slot(&env, &gid, e0).await.is_some());
    send(&env, &mut m[3], "it works for me").await;
    assert!(get_group(&env, &m[0].token, &gid).await.commits_frozen_until.is_none());
    assert!(slot(&env, &gid, e0).await.is_none(), "a confirmed epoch keeps no epoch before it");
    assert_eq!(slot(&env, &gid, e0 + 1).await.map(|s| s.epoch), Some(e0 + 1));
    dispute(&env, &m[2], &gid, e0 + 1).await;
    let g = get_group(&env, &m[0].token, &gid).await;
    assert_eq!((g.epoch, g.voided.len()), (e0 + 1, 0));
    let next = m[2].act(|c, g| c.self_update(g)).unwrap();
    assert_eq!(m[2].send_commit(&env, &next).await.unwrap(), e0 + 2);
    // Disputing an older epoch only records it.
    dispute(&env, &m[1], &gid, e0 + 1).await;
    assert_eq!(get_group(&env, &m[0].token, &gid).await.epoch, e0 + 2);
}

#[tokio::test]
async fn receive_marks_the_end_of_the_backlog() {
    use futures::StreamExt;
    let env = start(Backend::Embedded).await;
    let gid = b"marker".to_vec();
    let (_, mut m) = group_of(&env, 2, &gid).await;
    send(&env, &mut m[0], "one").await;
    send(&env, &mut m[0], "two").await;
    let mut s = m[1]
        .groups(&env)
        .receive(req(pb::ReceiveRequest { from_seq: m[1].next_seq, mark_caught_up: true }, &m[1].token))
        .await
        .unwrap()
        .into_inner();
    let mut kinds = Vec::new();
    for _ in 0..3 {
        let e = s.next().await.unwrap().unwrap();
        kinds.push((e.kind, e.seq));
    }
    let n = m[1].next_seq;
    assert_eq!(
        kinds,
        vec![
            (pb::EntryKind::Application as i32, n),
            (pb::EntryKind::Application as i32, n + 1),
            (pb::EntryKind::CaughtUp as i32, n + 1)
        ]
    );
    // What comes after the marker arrives live.
    send(&env, &mut m[0], "three").await;
    let e = s.next().await.unwrap().unwrap();
    assert_eq!((e.kind, e.seq), (pb::EntryKind::Application as i32, n + 2));
}

/// A group stored before epoch slots (current state at `s/state`, GroupInfo
/// at `info`, the epoch before copied into `prev`) is moved into slots on
/// first use, and goes on: its GroupInfo is served, and the commit the
/// legacy `prev` kept can still be voided.
#[tokio::test]
async fn a_group_stored_before_epoch_slots_is_moved_into_them() {
    let env = start(Backend::Embedded).await;
    let gid = b"legacy".to_vec();
    let (_, mut m) = group_of(&env, 3, &gid).await;
    let e0 = m[0].g().epoch();
    let up = m[0].act(|c, g| c.self_update(g)).unwrap();
    assert_eq!(m[0].send_commit(&env, &up).await.unwrap(), e0 + 1);
    m[0].act(|c, g| c.merge_pending(g)).unwrap();
    let (now, before) = (slot(&env, &gid, e0 + 1).await.unwrap(), slot(&env, &gid, e0).await.unwrap());

    // Rewrite it as the layout before slots wrote it, past every handle.
    let space = format!("/spine/g/{}/", hex::encode(&gid));
    let meta = env.rt.store.get(&format!("{space}s/meta")).await.unwrap().unwrap();
    let roster: serde_json::Value = serde_json::from_slice::<serde_json::Value>(&meta.value).unwrap()["roster"].clone();
    let b64 = |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b);
    let info_of = |e: u64| {
        let k = format!("{space}info/{}", e % 2);
        let store = env.rt.store.clone();
        async move { store.get(&k).await.unwrap().map(|kv| kv.value) }
    };
    let (now_info, before_info) = (info_of(e0 + 1).await.unwrap(), info_of(e0).await.unwrap());
    let prev = serde_json::json!({
        "epoch": e0, "state": b64(&before.state), "info": b64(&before_info),
        "roster": roster, "committer_leaf": now.committer_leaf,
    });
    #[allow(clippy::disallowed_methods)]
    let key = |rel: &str| spine_runtime::store::Key::unchecked(format!("{space}{rel}"));
    env.rt.store.put(&key("s/state"), now.state.clone()).await.unwrap();
    env.rt.store.put(&key("info"), now_info.clone()).await.unwrap();
    env.rt.store.put(&key("prev"), serde_json::to_vec(&prev).unwrap()).await.unwrap();
    for p in 0..2 {
        env.rt.store.delete(&key(&format!("s/slot/{p}"))).await.unwrap();
        env.rt.store.delete(&key(&format!("info/{p}"))).await.unwrap();
    }

    // The first read moves it; the old records are gone.
    let info = group_info(&env, &m[1].token, &gid).await;
    assert_eq!((info.epoch, &info.group_info), (e0 + 1, &now_info));
    for old in ["s/state", "info", "prev"] {
        assert!(env.rt.store.get(&format!("{space}{old}")).await.unwrap().is_none(), "{old} left behind");
    }
    assert_eq!(slot(&env, &gid, e0 + 1).await.unwrap(), now);
    assert_eq!(slot(&env, &gid, e0).await.unwrap(), Slot { committer_leaf: u32::MAX, ..before.clone() });
    assert_eq!((info_of(e0 + 1).await.unwrap(), info_of(e0).await.unwrap()), (now_info.clone(), before_info.clone()));

    // The epoch before is still there to void the commit: both other
    // members dispute it, and the group is back at e0 with its GroupInfo
    // and roster.
    for x in &m[1..] {
        dispute(&env, x, &gid, e0 + 1).await;
    }
    let g = get_group(&env, &m[2].token, &gid).await;
    assert_eq!((g.epoch, g.members.len(), g.voided.len()), (e0, 3, 1));
    assert_eq!(g.voided[0].committer_leaf_index, now.committer_leaf);
    let info = group_info(&env, &m[0].token, &gid).await;
    assert_eq!((info.epoch, &info.group_info), (e0, &before_info));
    // And the group goes on from there: Alice rejoins by external commit.
    let (rejoined, join) = m[0].client.join_external(&info.group_info).unwrap();
    m[0].group = Some(rejoined);
    assert_eq!(m[0].send_commit(&env, &join).await.unwrap(), e0 + 1);
}

/// Who committed an epoch is kept only while the epoch is (its slot), and
/// in disputes of it. Groups committed to before kept every epoch's
/// committer under `committers/<epoch>`: GetGroup still reads it for a
/// dispute that names none, and upkeep deletes every one of them.
#[tokio::test]
async fn every_epochs_committer_is_no_longer_kept() {
    let mut config = spine_testing::test_config();
    config.edit_section(|s: &mut spine_groups::GroupsConfig| s.upkeep_secs = 1);
    let env = start_with(Backend::Embedded, config).await;
    let gid = b"committers".to_vec();
    let (t, mut m) = group_of(&env, 3, &gid).await;
    let e0 = m[0].g().epoch();
    for _ in 0..2 {
        let up = m[0].act(|c, g| c.self_update(g)).unwrap();
        m[0].send_commit(&env, &up).await.unwrap();
        m[0].act(|c, g| c.merge_pending(g)).unwrap();
    }
    let space = format!("/spine/g/{}/", hex::encode(&gid));
    let left = |prefix: &'static str| {
        let (store, space) = (env.rt.store.clone(), space.clone());
        async move { store.range_all(&format!("{space}{prefix}")).await.unwrap().len() }
    };
    assert_eq!(left("committers/").await, 0, "commits write no per-epoch committer");

    // As the layout before wrote them: a committer for every epoch, and a
    // dispute record that names none. Past every handle.
    let me = m[0].g().own_index();
    #[allow(clippy::disallowed_methods)]
    let key = |rel: String| spine_runtime::store::Key::unchecked(format!("{space}{rel}"));
    for e in 1..=e0 + 2 {
        env.rt.store.put(&key(format!("committers/{e:020}")), me.to_string().into_bytes()).await.unwrap();
    }
    env.rt.store.put(&key(format!("disputes/{e0:020}/{}.{}", t.id, m[1].device)), b"{}".to_vec()).await.unwrap();
    let g = get_group(&env, &m[2].token, &gid).await;
    assert_eq!((g.disputes.len(), g.disputes[0].epoch, g.disputes[0].committer_leaf_index), (1, e0, me));

    // Upkeep deletes them all; the old dispute then names no committer.
    let swept =
        spine_testing::eventually(std::time::Duration::from_secs(10), || async { left("committers/").await == 0 })
            .await;
    assert!(swept, "upkeep left the per-epoch committers");
    let g = get_group(&env, &m[2].token, &gid).await;
    assert_eq!(g.disputes[0].committer_leaf_index, u32::MAX);

    // A dispute of an epoch the group keeps names its committer, from the
    // slot: the current epoch and the one before.
    dispute(&env, &m[1], &gid, e0 + 1).await;
    let g = get_group(&env, &m[2].token, &gid).await;
    let named: Vec<(u64, u32)> = g.disputes.iter().map(|d| (d.epoch, d.committer_leaf_index)).collect();
    assert_eq!(named, vec![(e0, u32::MAX), (e0 + 1, me)]);
}
