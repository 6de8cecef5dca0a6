//! The groups service from an attacker's side: nobody is added to a group,
//! nor has their key packages taken, without their consent (and a refusal
//! looks like an absence); a member cannot smuggle in a credential that is
//! not a Spine device, change who a member is, or push the delivery service
//! out; a device cannot fill another's mailbox or flood the service; limits
//! hold under concurrency; disputes are bounded; upkeep and deletion go on
//! past a broken group.

mod support;

use std::time::Duration;

use spine_mls::DeviceName;
use spine_mls::client::{Client, DeviceKey};
use spine_proto::groups::v1 as pb;
use spine_proto::identity::v1 as ipb;
use spine_runtime::config::Backend;
use spine_testing::{Env, req};
use support::*;
use tonic::Code;
use tonic_types::StatusExt;

fn account_target(a: &str) -> pb::Target {
    pb::Target { target: Some(pb::target::Target::AccountId(a.into())) }
}

async fn claim(env: &Env, m: &Member, targets: Vec<pb::Target>) -> Result<Vec<pb::ClaimedKeyPackage>, tonic::Status> {
    m.groups(env)
        .claim_key_packages(req(pb::ClaimKeyPackagesRequest { targets }, &m.token))
        .await
        .map(|r| r.into_inner().key_packages)
}

async fn remaining(env: &Env, m: &Member) -> u32 {
    m.groups(env)
        .count_key_packages(req(pb::CountKeyPackagesRequest {}, &m.token))
        .await
        .unwrap()
        .into_inner()
        .remaining
}

fn reason(s: &tonic::Status) -> String {
    s.get_details_error_info().map(|i| i.reason).unwrap_or_default()
}

/// Key-package claims follow the target's consent: a stranger, a blocked
/// account and another product's device without cross-app consent get
/// exactly what a target with no package gives (nothing; no package is
/// consumed), the same as an account that does not exist; a contact gets
/// one; another product's claimer never sees device ids.
#[tokio::test]
async fn claims_follow_consent_and_refusals_look_like_absence() {
    let env = start(Backend::Embedded).await;
    let messenger = env.tenant("messenger").await;
    let whatsapp = env.tenant("whatsapp").await;
    let (target_acct, friend_acct, stranger_acct) =
        (env.account(&messenger).await, env.account(&messenger).await, env.account(&messenger).await);
    let target = member(&env, &messenger, &target_acct).await;
    let friend = member(&env, &messenger, &friend_acct).await;
    let stranger = member(&env, &messenger, &stranger_acct).await;
    let other_acct = env.account(&whatsapp).await;
    let other = member(&env, &whatsapp, &other_acct).await;
    target.upload(&env, 5).await;
    env.add_contact(
        &target.token,
        Some(spine_proto::common::v1::PeerRef {
            peer: Some(spine_proto::common::v1::peer_ref::Peer::AccountId(friend_acct.clone())),
        }),
    )
    .await;
    let handle = env.interop_handle(&target.token, vec![whatsapp.id.clone()]).await;
    let via_handle = pb::Target {
        target: Some(pb::target::Target::Interop(spine_proto::common::v1::InteropRef {
            tenant_id: messenger.id.clone(),
            handle: handle.clone(),
        })),
    };

    // A stranger (default: contacts only) and a made-up account: the same.
    let refused = claim(&env, &stranger, vec![account_target(&target_acct)]).await.unwrap();
    let absent =
        claim(&env, &stranger, vec![account_target(&spine_runtime::ids::new(spine_runtime::ids::Kind::Account))])
            .await
            .unwrap();
    assert!(refused.is_empty() && absent.is_empty());
    // Another product, cross-app reach "contacts" and not one: nothing.
    assert!(claim(&env, &other, vec![via_handle.clone()]).await.unwrap().is_empty());
    assert_eq!(remaining(&env, &target).await, 5, "a refused claim consumed a package");

    // A contact may add: one package, the device named.
    let got = claim(&env, &friend, vec![account_target(&target_acct)]).await.unwrap();
    assert_eq!((got.len(), got[0].device_id.as_str()), (1, target.device.as_str()));
    assert_eq!(remaining(&env, &target).await, 4);

    // Blocking the friend stops it, in the same form.
    env.identity()
        .block(req(
            ipb::BlockRequest {
                account_id: String::new(),
                peer: Some(spine_proto::common::v1::PeerRef {
                    peer: Some(spine_proto::common::v1::peer_ref::Peer::AccountId(friend_acct.clone())),
                }),
            },
            &target.token,
        ))
        .await
        .unwrap();
    assert!(claim(&env, &friend, vec![account_target(&target_acct)]).await.unwrap().is_empty());

    // Opened to anyone holding a handle: the other product gets a package
    // but no device id; blocking that person through the handle stops it,
    // and still after the handle is revoked and replaced (the block is on
    // the person, not the handle).
    let_anyone_add(&env, &messenger, &target_acct).await;
    let got = claim(&env, &other, vec![via_handle.clone()]).await.unwrap();
    assert_eq!((got.len(), got[0].device_id.as_str()), (1, ""), "another product sees no device id");
    let other_handle = env.interop_handle(&other.token, vec![messenger.id.clone()]).await;
    env.identity()
        .block(req(
            ipb::BlockRequest {
                account_id: String::new(),
                peer: Some(spine_proto::common::v1::PeerRef {
                    peer: Some(spine_proto::common::v1::peer_ref::Peer::Interop(spine_proto::common::v1::InteropRef {
                        tenant_id: whatsapp.id.clone(),
                        handle: other_handle.clone(),
                    })),
                }),
            },
            &target.token,
        ))
        .await
        .unwrap();
    assert!(claim(&env, &other, vec![via_handle.clone()]).await.unwrap().is_empty());
    env.identity()
        .revoke_interop_handle(req(
            ipb::RevokeInteropHandleRequest { account_id: String::new(), handle: other_handle },
            &other.token,
        ))
        .await
        .unwrap();
    env.interop_handle(&other.token, vec![messenger.id.clone()]).await;
    assert!(claim(&env, &other, vec![via_handle]).await.unwrap().is_empty(), "a new handle escaped the block");
}

/// A member cannot add someone who did not consent by building the commit
/// from a key package it obtained earlier: the commit is refused. Group
/// creation with such a member is refused too.
#[tokio::test]
async fn adding_needs_the_members_consent_whatever_the_key_package_route() {
    let env = start(Backend::Embedded).await;
    let t = env.tenant("t").await;
    let (a, b) = (env.account(&t).await, env.account(&t).await);
    let mut alice = member(&env, &t, &a).await;
    let bob = member(&env, &t, &b).await;
    // Bob's package reaches Alice outside the directory (or was claimed
    // before Bob closed the door): Bob allows only contacts (the default).
    let kp = bob.client.key_packages(1, false).unwrap();
    create_group(&env, &mut alice, b"no-consent", vec![t.id.clone()]).await;
    let add = alice.act(|c, g| c.add(g, &kp)).unwrap();
    let refused = alice.send_commit(&env, &add).await.unwrap_err();
    assert_eq!((refused.code(), reason(&refused).as_str()), (Code::PermissionDenied, "POLICY_REFUSED"));
    alice.act(|c, g| c.discard_pending(g)).unwrap();
    // With Bob's consent the same add goes through.
    let_anyone_add(&env, &t, &b).await;
    let add = alice.act(|c, g| c.add(g, &kp)).unwrap();
    alice.send_commit(&env, &add).await.unwrap();
    alice.act(|c, g| c.merge_pending(g)).unwrap();

    // A group created with a member already inside who does not consent.
    let c_acct = env.account(&t).await;
    let carol = member(&env, &t, &c_acct).await;
    let ds = ds_key(&env, &alice).await;
    let mut g = alice.client.create_group(b"made-with-carol", &ds).unwrap();
    let with_carol = alice.client.add(&mut g, &carol.client.key_packages(1, false).unwrap()).unwrap();
    drop(with_carol);
    alice.client.merge_pending(&mut g).unwrap();
    let info = alice.client.group_info(&g).unwrap();
    let refused = alice
        .groups(&env)
        .create_group(req(
            pb::CreateGroupRequest { group_info: info, allowed_tenant_ids: vec![t.id.clone()] },
            &alice.token,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
}

/// A credential that is not a Spine device identity never enters a group
/// (as a created group's member); the delivery service cannot be dropped
/// or replaced as external sender.
#[tokio::test]
async fn no_foreign_credentials_and_the_delivery_service_keeps_its_place() {
    let env = start(Backend::Embedded).await;
    let t = env.tenant("t").await;
    let a = env.account(&t).await;
    let mut alice = member(&env, &t, &a).await;
    let ds = ds_key(&env, &alice).await;

    // A group whose tree holds a member with a plain "mallory" credential.
    let key = DeviceKey::generate().unwrap();
    let mallory = Client::with_raw_identity(key, b"mallory".to_vec(), DeviceName::new("x", "y", "z")).unwrap();
    let mut g = alice.client.create_group(b"smuggled", &ds).unwrap();
    alice.client.add(&mut g, &mallory.key_packages(1, false).unwrap()).unwrap();
    alice.client.merge_pending(&mut g).unwrap();
    let info = alice.client.group_info(&g).unwrap();
    let refused = alice
        .groups(&env)
        .create_group(req(
            pb::CreateGroupRequest { group_info: info, allowed_tenant_ids: vec![t.id.clone()] },
            &alice.token,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{}", refused.message());

    // A commit removing the delivery service from the external senders,
    // and one replacing it with another key: both refused.
    create_group(&env, &mut alice, b"keep-ds", vec![t.id.clone()]).await;
    let other_ds = spine_mls::verifier::DeliveryService::generate().unwrap().public_key();
    for senders in [vec![], vec![other_ds]] {
        let commit = alice.act(|c, g| c.set_external_senders(g, &senders)).unwrap();
        let refused = alice.send_commit(&env, &commit).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{}", refused.message());
        alice.act(|c, g| c.discard_pending(g)).unwrap();
    }
    // Keeping it (and adding nothing else) is fine.
    let commit = alice.act(|c, g| c.set_external_senders(g, std::slice::from_ref(&ds))).unwrap();
    alice.send_commit(&env, &commit).await.unwrap();
}

/// A device cannot fill another's mailbox: past the quota, application
/// messages for it are dropped and it is told how many; handshakes still
/// arrive. And sends are rate limited per account, with a retry hint.
#[tokio::test]
async fn mailboxes_have_quotas_and_sends_are_rate_limited() {
    let mut config = spine_testing::test_config();
    config.edit_section(|s: &mut spine_groups::GroupsConfig| s.mailbox_max_entries = 6);
    config.edit_section(|s: &mut spine_groups::GroupsConfig| {
        s.rates.group_messages.account = spine_runtime::rate::Rate::new(1.0, 30.0);
    });
    let env = start_with(Backend::Embedded, config).await;
    let t = env.tenant("t").await;
    let (a, b) = (env.account(&t).await, env.account(&t).await);
    let mut alice = member(&env, &t, &a).await;
    let mut bob = member(&env, &t, &b).await;
    let_anyone_add(&env, &t, &b).await;
    bob.upload(&env, 1).await;
    create_group(&env, &mut alice, b"flood", vec![t.id.clone()]).await;
    let kps: Vec<Vec<u8>> =
        claim(&env, &alice, vec![account_target(&b)]).await.unwrap().into_iter().map(|k| k.key_package).collect();
    let add = alice.act(|c, g| c.add(g, &kps)).unwrap();
    alice.send_commit(&env, &add).await.unwrap();
    alice.act(|c, g| c.merge_pending(g)).unwrap();
    let welcome = bob.receive(&env, 1).await.remove(0);
    bob.group = Some(bob.client.join(&welcome.message).unwrap());

    // Bob does not read: Alice sends 20 messages; his mailbox (the Welcome
    // and 5 messages fill it) keeps a marker of the rest.
    for i in 0..20 {
        let m = alice.act(|c, g| c.send(g, format!("m{i}").as_bytes())).unwrap();
        alice
            .groups(&env)
            .send_application(req(pb::SendApplicationRequest { group_id: b"flood".to_vec(), message: m }, &alice.token))
            .await
            .unwrap();
    }
    // A commit still gets through past the quota.
    let update = alice.act(|c, g| c.self_update(g)).unwrap();
    alice.send_commit(&env, &update).await.unwrap();
    alice.act(|c, g| c.merge_pending(g)).unwrap();
    let entries = bob.receive(&env, 7).await;
    let kinds: Vec<i32> = entries.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [vec![pb::EntryKind::Application as i32; 5], vec![pb::EntryKind::Dropped as i32, pb::EntryKind::Commit as i32]]
            .concat()
    );
    assert_eq!(entries[5].dropped, 15);
    for e in &entries[..5] {
        bob.act(|c, g| c.process(g, &e.message)).unwrap();
    }
    bob.act(|c, g| c.process(g, &entries[6].message)).unwrap();
    let stored = env.rt.store.range_all(&format!("/spine/t/{}/mbox/{b}/", t.id)).await.unwrap();
    // The quota (6: the Welcome and 5 messages), the marker, the commit.
    assert_eq!(stored.len(), 8);
    // Once Bob reads and acknowledges, messages flow again.
    bob.groups(&env).ack(req(pb::AckRequest { up_to_seq: bob.next_seq - 1 }, &bob.token)).await.unwrap();
    let m = alice.act(|c, g| c.send(g, b"after")).unwrap();
    alice
        .groups(&env)
        .send_application(req(pb::SendApplicationRequest { group_id: b"flood".to_vec(), message: m }, &alice.token))
        .await
        .unwrap();
    let after = bob.receive(&env, 1).await.remove(0);
    assert_eq!(after.kind, pb::EntryKind::Application as i32);

    // The flood itself: past the burst (30 here), RATE_LIMITED.
    let mut limited = None;
    for _ in 0..20 {
        let m = alice.act(|c, g| c.send(g, b"x")).unwrap();
        if let Err(s) = alice
            .groups(&env)
            .send_application(req(pb::SendApplicationRequest { group_id: b"flood".to_vec(), message: m }, &alice.token))
            .await
        {
            limited = Some(s);
            break;
        }
    }
    let s = limited.expect("never rate limited");
    assert_eq!((s.code(), reason(&s).as_str()), (Code::ResourceExhausted, "RATE_LIMITED"));
    let info = s.get_details_error_info().unwrap();
    assert_eq!(info.metadata["limit"], "group_messages");
    assert!(s.get_details_retry_info().is_some());
}

/// Every limited kind of work answers RATE_LIMITED once its account's
/// bucket is empty: commits, key-package uploads and claims, disputes.
#[tokio::test]
async fn commits_uploads_claims_and_disputes_are_rate_limited() {
    use spine_runtime::rate::{Limit, Rate};
    let tight = Limit { account: Rate::new(0.01, 2.0), tenant: Rate::new(1000.0, 1000.0) };
    let mut config = spine_testing::test_config();
    config.edit_section(|s: &mut spine_groups::GroupsConfig| {
        s.rates.commits = tight;
        s.rates.key_package_uploads = tight;
        s.rates.key_package_claims = tight;
        s.rates.disputes = tight;
    });
    let env = start_with(Backend::Embedded, config).await;
    let t = env.tenant("t").await;
    let a = env.account(&t).await;
    let mut alice = member(&env, &t, &a).await;
    for _ in 0..2 {
        alice.upload(&env, 1).await;
    }
    let s = alice
        .groups(&env)
        .upload_key_packages(req(
            pb::UploadKeyPackagesRequest {
                key_packages: alice.client.key_packages(1, false).unwrap(),
                last_resort: vec![],
            },
            &alice.token,
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&s), "RATE_LIMITED");
    claim(&env, &alice, vec![account_target(&a), account_target(&a)]).await.unwrap();
    assert_eq!(reason(&claim(&env, &alice, vec![account_target(&a)]).await.unwrap_err()), "RATE_LIMITED");
    create_group(&env, &mut alice, b"rl", vec![t.id.clone()]).await; // commit 1
    let c = alice.act(|c, g| c.self_update(g)).unwrap();
    alice.send_commit(&env, &c).await.unwrap(); // commit 2
    alice.act(|c, g| c.merge_pending(g)).unwrap();
    let c = alice.act(|c, g| c.self_update(g)).unwrap();
    assert_eq!(reason(&alice.send_commit(&env, &c).await.unwrap_err()), "RATE_LIMITED");
    for i in 0..3 {
        let r = alice
            .groups(&env)
            .report_dispute(req(pb::ReportDisputeRequest { group_id: b"rl".to_vec(), epoch: 1 }, &alice.token))
            .await;
        if i < 2 {
            r.unwrap();
        } else {
            assert_eq!(reason(&r.unwrap_err()), "RATE_LIMITED");
        }
    }
    // Disputes are kept under a lease (they expire with the group's
    // messages), never forever.
    let disputes = env.rt.store.range_all(&format!("/spine/g/{}/disputes/", hex::encode(b"rl"))).await.unwrap();
    assert!(!disputes.is_empty() && disputes.iter().all(|kv| kv.lease != 0));
}

/// The per-device key-package limit holds against concurrent uploads on
/// etcd (it was counted, then written: a race overran it).
#[tokio::test]
async fn the_key_package_limit_holds_under_concurrent_uploads() {
    let mut config = spine_testing::test_config();
    config.edit_section(|s: &mut spine_groups::GroupsConfig| {
        s.rates.key_package_uploads.account = spine_runtime::rate::Rate::new(100.0, 100.0);
    });
    let env = start_with(Backend::Etcd, config).await;
    let t = env.tenant("t").await;
    let a = env.account(&t).await;
    let m = member(&env, &t, &a).await;
    let uploads = (0..15).map(|_| {
        let kps = m.client.key_packages(10, false).unwrap();
        let mut g = m.groups(&env);
        let token = m.token.clone();
        async move {
            g.upload_key_packages(req(pb::UploadKeyPackagesRequest { key_packages: kps, last_resort: vec![] }, &token))
                .await
        }
    });
    let results = futures::future::join_all(uploads).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().is_ok_and(|_| true) || r.as_ref().unwrap_err().code() == Code::ResourceExhausted)
    );
    assert_eq!(ok, 10, "exactly ten uploads of ten fit");
    assert_eq!(remaining(&env, &m).await, spine_groups::MAX_KEY_PACKAGES);
}

/// A group whose state is broken does not stop the upkeep from serving
/// the others, nor an account's deletion from removing its groups data.
#[tokio::test]
async fn upkeep_and_deletion_go_on_past_a_broken_group() {
    let mut config = spine_testing::test_config();
    config.edit_section(|s: &mut spine_groups::GroupsConfig| s.upkeep_secs = 1);
    let env = start_with(Backend::Embedded, config).await;
    let t = env.tenant("t").await;
    let (a, b) = (env.account(&t).await, env.account(&t).await);
    let mut alice = member(&env, &t, &a).await;
    let bob = member(&env, &t, &b).await;
    let_anyone_add(&env, &t, &b).await;
    // Two groups, "aaa" (broken below, swept first) and "zzz".
    for gid in [b"aaa".as_slice(), b"zzz"] {
        alice.group = None;
        bob.upload(&env, 1).await;
        create_group(&env, &mut alice, gid, vec![t.id.clone()]).await;
        let kps: Vec<Vec<u8>> =
            claim(&env, &alice, vec![account_target(&b)]).await.unwrap().into_iter().map(|k| k.key_package).collect();
        let add = alice.act(|c, g| c.add(g, &kps)).unwrap();
        alice.send_commit(&env, &add).await.unwrap();
    }
    // The test breaks a stored group on purpose (both its epoch slots),
    // reaching past every handle.
    for slot in 0..2 {
        #[allow(clippy::disallowed_methods)]
        let broken = spine_runtime::store::Key::unchecked(format!("/spine/g/{}/s/slot/{slot}", hex::encode(b"aaa")));
        env.rt.store.put(&broken, b"broken".to_vec()).await.unwrap();
    }
    // Bob's device is revoked: the upkeep proposes its removal from "zzz"
    // although "aaa" fails on the way.
    #[allow(clippy::disallowed_methods)]
    let index = spine_runtime::store::Key::unchecked(format!(
        "/spine/t/{}/gm/{b}/{}/{}",
        t.id,
        bob.device,
        hex::encode(b"zzz")
    ));
    env.rt.store.delete(&index).await.unwrap();
    env.identity()
        .revoke_device(req(ipb::RevokeDeviceRequest { account_id: b.clone(), device_id: bob.device.clone() }, &t.cred))
        .await
        .unwrap();
    let proposed = spine_testing::eventually(Duration::from_secs(10), || async {
        env.rt.store.range_all(&format!("/spine/g/{}/gone/", hex::encode(b"zzz"))).await.unwrap().len() == 1
            && env.rt.store.range_all(&format!("/spine/t/{}/mbox/{a}/", t.id)).await.unwrap().iter().any(|kv| {
                String::from_utf8_lossy(&kv.value).contains(&format!("\"kind\":{}", pb::EntryKind::Proposal as i32))
            })
    })
    .await;
    assert!(proposed, "the upkeep stopped at the broken group");
    // Alice's account is deleted: her groups data goes, broken group or not.
    env.identity().delete_account(req(ipb::DeleteAccountRequest { account_id: a.clone() }, &t.cred)).await.unwrap();
    let gone = spine_testing::eventually(Duration::from_secs(10), || async {
        let left = env.rt.store.range_all(&format!("/spine/t/{}/", t.id)).await.unwrap();
        !left.iter().any(|kv| {
            ["kp/", "kpl/", "mbox/", "mbox-head/", "mbox-grp/", "gm/"]
                .iter()
                .any(|p| kv.key.contains(&format!("/{p}{a}/")))
        })
    })
    .await;
    assert!(gone, "a broken group kept the deleted account's data");
}
