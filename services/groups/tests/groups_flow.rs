//! The MLS flow over gRPC with spine-mls clients of two tenants: key
//! packages, a group across products, adds, application messages, an
//! offline device catching up from its mailbox, self-updates, a removal,
//! and everyone ending in the same epoch with the same keys.

mod support;

use sframe::frame::MonotonicCounter;
use spine_mls::client::Incoming;
use spine_proto::common::v1::InteropRef;
use spine_proto::groups::v1 as pb;
use spine_proto::identity::v1 as ipb;
use spine_runtime::config::Backend;
use spine_testing::req;
use support::*;

async fn full_flow(backend: Backend) {
    let env = start(backend).await;
    let messenger = env.tenant("messenger").await;
    let insta = env.tenant("insta").await;
    let alice_acct = env.account(&messenger).await;
    let carol_acct = env.account(&messenger).await;
    let bob_acct = env.account(&insta).await;
    let mut alice = member(&env, &messenger, &alice_acct).await;
    let mut carol = member(&env, &messenger, &carol_acct).await;
    let mut bob = member(&env, &insta, &bob_acct).await;
    // Carol and Bob let others add them to groups (the default is contacts
    // only, and for Bob, of another product, his contacts there).
    let_anyone_add(&env, &messenger, &carol_acct).await;
    let_anyone_add(&env, &insta, &bob_acct).await;

    // Bob (Instagram-style) opens himself to Messenger with a handle.
    let handle = env
        .identity()
        .create_interop_handle(req(
            ipb::CreateInteropHandleRequest {
                request_id: "h".into(),
                account_id: String::new(),
                allowed_tenant_ids: vec![messenger.id.clone()],
            },
            &bob.token,
        ))
        .await
        .unwrap()
        .into_inner()
        .handle;

    for m in [&alice, &carol, &bob] {
        let c = m.upload(&env, 3).await;
        assert_eq!((c.remaining, c.has_last_resort), (3, true));
    }

    let created = create_group(&env, &mut alice, b"family-call", vec![messenger.id.clone(), insta.id.clone()]).await;
    assert_eq!((created.epoch, created.members.len()), (0, 1));

    // Alice claims Bob's package through the interop reference and Carol's by account.
    let claimed = alice
        .groups(&env)
        .claim_key_packages(req(
            pb::ClaimKeyPackagesRequest {
                targets: vec![
                    pb::Target {
                        target: Some(pb::target::Target::Interop(InteropRef {
                            tenant_id: insta.id.clone(),
                            handle: handle.clone(),
                        })),
                    },
                    pb::Target { target: Some(pb::target::Target::AccountId(carol.account.clone())) },
                ],
            },
            &alice.token,
        ))
        .await
        .unwrap()
        .into_inner()
        .key_packages;
    assert_eq!(
        claimed.iter().map(|k| (k.target, k.device_id.as_str(), k.last_resort)).collect::<Vec<_>>(),
        // Bob is of another product: his device id is not handed out.
        vec![(0, "", false), (1, carol.device.as_str(), false)]
    );
    assert_eq!(
        bob.groups(&env)
            .count_key_packages(req(pb::CountKeyPackagesRequest {}, &bob.token))
            .await
            .unwrap()
            .into_inner()
            .remaining,
        2
    );

    let kps: Vec<Vec<u8>> = claimed.into_iter().map(|k| k.key_package).collect();
    let add = alice.act(|c, g| c.add(g, &kps)).unwrap();
    assert_eq!(alice.send_commit(&env, &add).await.unwrap(), 1);
    alice.act(|c, g| c.merge_pending(g)).unwrap();

    // Bob and Carol find the Welcome in their mailboxes.
    for m in [&mut bob, &mut carol] {
        let entries = m.receive(&env, 1).await;
        assert_eq!(entries[0].kind, pb::EntryKind::Welcome as i32);
        m.group = Some(m.client.join(&entries[0].message).unwrap());
    }
    let g = env.rt.store.clone();
    let _ = g;

    // Application messages across products.
    let msg = bob.act(|c, g| c.send(g, b"hi from insta")).unwrap();
    bob.groups(&env)
        .send_application(req(
            pb::SendApplicationRequest { group_id: b"family-call".to_vec(), message: msg },
            &bob.token,
        ))
        .await
        .unwrap();
    for m in [&mut alice, &mut carol] {
        let e = m.receive(&env, 1).await.remove(0);
        assert_eq!(e.kind, pb::EntryKind::Application as i32);
        let Member { client, group, .. } = m;
        assert_eq!(
            client.process(group.as_mut().unwrap(), &e.message).unwrap(),
            Incoming::Application { sender: Some(bob.client.name().clone()), plaintext: b"hi from insta".to_vec() }
        );
    }

    // Carol goes offline during two commits.
    let upd = alice.act(|c, g| c.self_update(g)).unwrap();
    assert_eq!(alice.send_commit(&env, &upd).await.unwrap(), 2);
    alice.act(|c, g| c.merge_pending(g)).unwrap();
    let e = bob.receive(&env, 1).await.remove(0);
    assert_eq!(bob.act(|c, g| c.process(g, &e.message)).unwrap(), Incoming::Commit { epoch: 2 });
    let upd = bob.act(|c, g| c.self_update(g)).unwrap();
    assert_eq!(bob.send_commit(&env, &upd).await.unwrap(), 3);
    bob.act(|c, g| c.merge_pending(g)).unwrap();
    let e = alice.receive(&env, 1).await.remove(0);
    assert_eq!(alice.act(|c, g| c.process(g, &e.message)).unwrap(), Incoming::Commit { epoch: 3 });
    // Carol reconnects from where she stopped and catches up in order.
    let missed = carol.receive(&env, 2).await;
    for e in &missed {
        assert_eq!(e.kind, pb::EntryKind::Commit as i32);
        let Member { client, group, .. } = &mut carol;
        client.process(group.as_mut().unwrap(), &e.message).unwrap();
    }
    assert_eq!(carol.g().epoch(), 3);
    assert_eq!(carol.g().epoch_authenticator(), alice.g().epoch_authenticator());

    // Alice removes Carol.
    let rm = alice.act(|c, g| c.remove(g, &[carol.client.name().clone()])).unwrap();
    assert_eq!(alice.send_commit(&env, &rm).await.unwrap(), 4);
    alice.act(|c, g| c.merge_pending(g)).unwrap();
    let e = bob.receive(&env, 1).await.remove(0);
    assert_eq!(bob.act(|c, g| c.process(g, &e.message)).unwrap(), Incoming::Commit { epoch: 4 });
    let e = carol.receive(&env, 1).await.remove(0);
    {
        let Member { client, group, .. } = &mut carol;
        assert_eq!(client.process(group.as_mut().unwrap(), &e.message).unwrap(), Incoming::Removed);
    }
    // Carol's device is out of the group for the service too.
    assert_eq!(
        carol
            .groups(&env)
            .get_group(req(pb::GetGroupRequest { group_id: b"family-call".to_vec() }, &carol.token))
            .await
            .unwrap_err()
            .code(),
        tonic::Code::NotFound
    );

    // Everyone left agrees: epoch, authenticator, SFrame keys.
    let group = get_group(&env, &alice.token, b"family-call").await;
    assert_eq!((group.epoch, group.members.len()), (4, 2));
    assert_eq!(alice.g().epoch(), 4);
    assert_eq!(bob.g().epoch(), 4);
    assert_eq!(alice.g().epoch_authenticator(), bob.g().epoch_authenticator());
    let frame =
        alice.client.sframe(alice.group.as_ref().unwrap()).encrypt(&mut MonotonicCounter::default(), b"media").unwrap();
    assert_eq!(bob.client.sframe(bob.group.as_ref().unwrap()).decrypt(&frame).unwrap(), b"media");
    assert!(carol.client.sframe(carol.group.as_ref().unwrap()).decrypt(&frame).is_err());

    // Acknowledged entries are gone; new ones still arrive.
    let last = bob.next_seq - 1;
    bob.groups(&env).ack(req(pb::AckRequest { up_to_seq: last }, &bob.token)).await.unwrap();
    let left =
        env.rt.store.range_all(&format!("/spine/t/{}/mbox/{}/{}/", insta.id, bob.account, bob.device)).await.unwrap();
    assert!(left.is_empty(), "{} entries left after ack", left.len());
}

#[tokio::test]
async fn full_flow_embedded() {
    full_flow(Backend::Embedded).await;
}

#[tokio::test]
async fn full_flow_etcd() {
    full_flow(Backend::Etcd).await;
}
