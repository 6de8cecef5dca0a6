//! The data report is complete: after an account has used every service
//! (devices, one revoked; settings, contacts, blocks, an interop handle; MLS
//! key packages, a group across products with messages, a commit and a
//! dispute; a live call and a signalling stream), every key in the store
//! whose key or value names the account or one of its devices (plainly or
//! in base64, MLS credentials included) matches a location an item of the
//! account's report gives.
//!
//! Left out, by rule (docs/privacy.md, "What the report leaves out"): other
//! accounts' own contact and block lists (their data; listing them would
//! tell a person who blocked them) and other members' mailboxes (their
//! messages; listing them would tell when they read).
//!
//! Then the account is deleted, and the same dump holds nothing naming it
//! beyond what privacy.md bounds.

mod support;

#[path = "../../groups/tests/support/mod.rs"]
#[allow(unused_imports)]
mod groups_support;

use groups_support::{create_group, let_anyone_add, member};
use spine_proto::common::v1::DataReport;
use spine_proto::groups::v1 as gpb;
use spine_proto::identity::v1 as ipb;
use spine_runtime::config::Backend;
use spine_runtime::store::KeyValue;
use spine_testing::{Device, req};
use support::*;

/// Whether `key` matches a location pattern (`<name>` stands for one
/// or more characters other than `/`).
fn glob(pattern: &str, key: &str) -> bool {
    let Some(start) = pattern.find('<') else { return pattern == key };
    let Some(end) = pattern[start..].find('>').map(|e| start + e) else { return pattern == key };
    let (lit, rest) = (&pattern[..start], &pattern[end + 1..]);
    let Some(tail) = key.strip_prefix(lit) else { return false };
    // The placeholder takes 1.. characters of one path segment.
    let seg_end = tail.find('/').unwrap_or(tail.len());
    (1..=seg_end).any(|n| glob(rest, &tail[n..]))
}

/// The store key patterns a report's items name in their `location`.
fn locations(report: &DataReport) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for section in &report.sections {
        for item in &section.items {
            for word in item.location.split_whitespace() {
                if let Some(p) = word.strip_prefix("etcd:") {
                    let p = p.trim_end_matches([',', ')', ';', '.']);
                    out.push((format!("{}/{}", section.service, item.kind), p.to_string()));
                }
            }
        }
    }
    out
}

fn naming(dump: &[KeyValue], needles: &[&str]) -> Vec<KeyValue> {
    dump.iter().filter(|kv| needles.iter().any(|n| spine_testing::mentions(kv, n))).cloned().collect()
}

/// Keys that name the account but are other accounts' data (see above).
fn others_data(key: &str, account: &str) -> bool {
    let Some(rel) = key.strip_prefix("/spine/t/").and_then(|r| r.split_once('/')).map(|(_, r)| r) else {
        return false;
    };
    let mut parts = rel.split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("contacts" | "blocks" | "mbox"), Some(owner), _) => owner != account,
        (Some("peer-refs"), Some(_), Some(entry)) => !entry.ends_with(&format!(".{account}")),
        _ => false,
    }
}

async fn report(env: &spine_testing::Env, token: &str) -> DataReport {
    env.identity().get_data_report(req(ipb::GetDataReportRequest::default(), token)).await.unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_naming_the_account_is_in_its_report() {
    let n = nodes(Backend::Embedded, 1, |_, _| {}).await;
    let env = &n[0];
    let messenger = env.tenant("messenger").await;
    let whatsapp = env.tenant("whatsapp").await;
    let alice_acct = env.account(&messenger).await;
    let bob_acct = env.account(&messenger).await;
    let carol_acct = env.account(&whatsapp).await;

    // Identity: two devices with MLS clients, a third one revoked.
    let mut a1 = member(env, &messenger, &alice_acct).await;
    let mut a2 = member(env, &messenger, &alice_acct).await;
    let a3 = env.device_of(&messenger, &alice_acct).await;
    env.identity()
        .revoke_device(req(
            ipb::RevokeDeviceRequest { account_id: alice_acct.clone(), device_id: a3.device.clone() },
            &messenger.cred,
        ))
        .await
        .unwrap();
    let mut bob = member(env, &messenger, &bob_acct).await;
    let mut carol = member(env, &whatsapp, &carol_acct).await;
    everyone_can_call(env, &messenger, &bob_acct).await;
    let_anyone_add(env, &messenger, &bob_acct).await;
    let_anyone_add(env, &whatsapp, &carol_acct).await;
    set(
        env,
        &messenger,
        &alice_acct,
        "cross_app",
        ipb::PrivacySettings { cross_app: ipb::CrossAppReachability::HandleHolders as i32, ..Default::default() },
    )
    .await;
    env.add_contact(&a1.token, account_ref(&bob_acct)).await;
    env.add_contact(&bob.token, account_ref(&alice_acct)).await;
    let stranger = env.account(&messenger).await;
    env.identity()
        .block(req(ipb::BlockRequest { account_id: String::new(), peer: account_ref(&stranger) }, &a1.token))
        .await
        .unwrap();
    let handle = env.interop_handle(&a1.token, vec![whatsapp.id.clone()]).await;
    env.add_contact(&carol.token, interop_ref(&messenger.id, &handle)).await;

    // Groups: key packages, a group across both products, messages, a
    // commit by Alice's second device, a dispute.
    for m in [&a1, &a2, &bob, &carol] {
        m.upload(env, 2).await;
    }
    let gid = b"report-group".to_vec();
    create_group(env, &mut a1, &gid, vec![messenger.id.clone(), whatsapp.id.clone()]).await;
    let kps: Vec<Vec<u8>> = a1
        .groups(env)
        .claim_key_packages(req(
            gpb::ClaimKeyPackagesRequest {
                targets: vec![
                    gpb::Target { target: Some(gpb::target::Target::AccountId(bob_acct.clone())) },
                    gpb::Target {
                        target: Some(gpb::target::Target::Interop(spine_proto::common::v1::InteropRef {
                            tenant_id: whatsapp.id.clone(),
                            handle: env.interop_handle(&carol.token, vec![messenger.id.clone()]).await,
                        })),
                    },
                    gpb::Target { target: Some(gpb::target::Target::AccountId(alice_acct.clone())) },
                ],
            },
            &a1.token,
        ))
        .await
        .unwrap()
        .into_inner()
        .key_packages
        .into_iter()
        .filter(|k| k.device_id != a1.device)
        .map(|k| k.key_package)
        .collect();
    assert_eq!(kps.len(), 3, "Bob, Carol and Alice's second device");
    let bundle = a1.act(|c, g| c.add(g, &kps)).unwrap();
    a1.send_commit(env, &bundle).await.unwrap();
    a1.act(|c, g| c.merge_pending(g)).unwrap();
    for m in [&mut a2, &mut bob, &mut carol] {
        let welcome = m.receive(env, 1).await.pop().unwrap();
        m.group = Some(m.client.join(&welcome.message).unwrap());
    }
    let update = a2.act(|c, g| c.self_update(g)).unwrap();
    a2.send_commit(env, &update).await.unwrap();
    a2.act(|c, g| c.merge_pending(g)).unwrap();
    let hello = bob.act(|c, g| c.send(g, b"hello")).unwrap();
    bob.groups(env)
        .send_application(req(gpb::SendApplicationRequest { group_id: gid.clone(), message: hello }, &bob.token))
        .await
        .unwrap();
    a1.groups(env)
        .report_dispute(req(gpb::ReportDisputeRequest { group_id: gid.clone(), epoch: 2 }, &a1.token))
        .await
        .unwrap();

    // Calls: a live, answered call and a signalling stream.
    let alice_dev = Device {
        tenant: messenger.id.clone(),
        account: alice_acct.clone(),
        device: a1.device.clone(),
        key: ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng),
        token: a1.token.clone(),
    };
    let bob_dev = Device {
        tenant: messenger.id.clone(),
        account: bob_acct.clone(),
        device: bob.device.clone(),
        key: ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng),
        token: bob.token.clone(),
    };
    let alice_phone = Phone::connect(env, alice_dev).await;
    let mut bob_phone = Phone::connect(env, bob_dev).await;
    let call = alice_phone.start(account_ref(&bob_acct), false).await.unwrap();
    bob_phone.answer(&call.call_id).await.unwrap();

    let needles = [alice_acct.as_str(), a1.device.as_str(), a2.device.as_str(), a3.device.as_str()];
    let report = report(env, &a1.token).await;
    let patterns = locations(&report);
    let dump = spine_testing::dump(&env.rt.store).await;
    let mut missing = Vec::new();
    let mut kinds = std::collections::BTreeSet::new();
    for kv in naming(&dump, &needles) {
        if others_data(&kv.key, &alice_acct) {
            continue;
        }
        match patterns.iter().find(|(_, p)| glob(p, &kv.key)) {
            Some((kind, _)) => {
                kinds.insert(kind.clone());
            }
            None => missing.push(kv.key.clone()),
        }
    }
    assert!(missing.is_empty(), "keys naming the account that its report does not list:\n{}", missing.join("\n"));
    // The scenario reached every kind of place it should.
    for kind in [
        "identity/account",
        "identity/device",
        "identity/revoked_device",
        "identity/contact",
        "identity/block",
        "identity/interop_handle",
        "identity/idempotency_answer",
        "groups/key_package",
        "groups/mailbox_entry",
        "groups/mailbox_cursor",
        "groups/group_membership",
        "groups/dispute",
        "calls/live_call",
        "calls/signalling_session",
    ] {
        assert!(kinds.contains(kind), "no key of {kind} in the dump: {kinds:?}");
    }
    // What the report says matches what is there.
    let item = |kind: &str| {
        report.sections.iter().flat_map(|s| &s.items).find(|i| i.kind == kind).unwrap_or_else(|| panic!("{kind}"))
    };
    assert_eq!(item("revoked_device").values, vec![a3.device.clone()]);
    assert_eq!(item("group_membership").count, 2, "both of Alice's devices");
    assert_eq!(item("committed_epoch").count, 2, "epoch 1 by the first device, 2 by the second");
    assert_eq!(item("dispute").count, 1);
    let live = &item("live_call").values[0];
    assert!(live.contains(&format!("account {bob_acct}")) && live.contains(&a1.device), "{live}");
    assert!(item("account").values[0].contains("by request"), "the creation request id is reported");

    // Deletion: Alice's account goes. Her call ends, the lists naming her in
    // both products go, and her devices leave the group once a member
    // commits the removals Spine proposes.
    env.identity()
        .delete_account(req(ipb::DeleteAccountRequest { account_id: alice_acct.clone() }, &messenger.cred))
        .await
        .unwrap();
    let ended = bob_phone.call_where(&call.call_id, |c| state(c) == spine_proto::calls::v1::CallState::Ended).await;
    assert_eq!(end(&ended), spine_proto::calls::v1::EndReason::AccountDeleted);
    let entries = bob.receive(env, 3).await;
    for e in &entries {
        bob.act(|c, g| c.process(g, &e.message)).unwrap();
    }
    let removal = bob.act(|c, g| c.self_update(g)).unwrap();
    bob.send_commit(env, &removal).await.unwrap();
    bob.act(|c, g| c.merge_pending(g)).unwrap();
    assert_eq!(bob.act(|_, g| g.members().len()), 2, "Bob and Carol are left");
    bob.groups(env).ack(req(gpb::AckRequest { up_to_seq: bob.next_seq - 1 }, &bob.token)).await.unwrap();
    // What may still name her, each bounded (docs/privacy.md): the deletion
    // tombstone (7 days), the revocations of her devices (until their tokens
    // expire), and group messages in other members' mailboxes not yet
    // acknowledged (at most 15 days).
    let allowed = |key: &str| {
        key == format!("/spine/t/{}/deleted/{alice_acct}", messenger.id)
            || key.starts_with(&format!("/spine/sys/auth/revoked/{}/", messenger.id))
            || others_data(key, &alice_acct)
    };
    let left = spine_testing::eventually(std::time::Duration::from_secs(10), || async {
        let dump = spine_testing::dump(&env.rt.store).await;
        naming(&dump, &needles).iter().all(|kv| allowed(&kv.key))
    })
    .await;
    let dump = spine_testing::dump(&env.rt.store).await;
    let rest: Vec<String> = naming(&dump, &needles).into_iter().map(|kv| kv.key).filter(|k| !allowed(k)).collect();
    assert!(left, "after deletion the store still names the account:\n{}", rest.join("\n"));
    drop((alice_phone, bob_phone));
}
