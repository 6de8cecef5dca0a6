//! spine-mls end to end, without a server: clients make a group, the
//! verifier checks every handshake as the delivery service will, and SFrame
//! keys behave as RFC 9605 section 5.2 says.

use sframe::frame::MonotonicCounter;
use spine_mls::client::{Client, CommitBundle, Incoming};
use spine_mls::verifier::{DeliveryService, Sender, Verified, Verifier};
use spine_mls::{DeviceName, MlsError, Refusal};

fn client(t: &str, a: &str, d: &str) -> Client {
    Client::new(DeviceName::new(t, a, d)).unwrap()
}

/// The server's half of a commit: verify, apply, check the new GroupInfo.
fn accept(v: &mut Verifier, b: &CommitBundle) -> Verified {
    let verdict = v.verify(&b.commit).unwrap();
    let signer = match &verdict {
        Verified::Commit { sender: Sender::Member { index, .. }, .. } => *index,
        Verified::Commit { sender: Sender::NewMember { name, .. }, .. } => {
            v.apply().unwrap();
            let idx = v.index_of(name).unwrap();
            v.check_group_info(&b.group_info, idx).unwrap();
            return verdict;
        }
        other => panic!("not a member commit: {other:?}"),
    };
    v.apply().unwrap();
    v.check_group_info(&b.group_info, signer).unwrap();
    verdict
}

#[test]
fn group_lifecycle_with_sframe_keys() {
    let ds = DeliveryService::generate().unwrap();
    let alice = client("tn_m", "ac_alice", "dv_a1");
    let bob = client("tn_i", "ac_bob", "dv_b1");
    let carol = client("tn_m", "ac_carol", "dv_c1");

    let mut ga = alice.create_group(b"group-1", &ds.public_key()).unwrap();
    let mut v = Verifier::from_group_info(&alice.group_info(&ga).unwrap()).unwrap();
    assert_eq!(v.external_sender_index(&ds.public_key()), Some(0));
    assert_eq!(v.epoch(), 0);

    // Alice adds Bob and Carol from their key packages.
    let kps = vec![bob.key_packages(1, false).unwrap().remove(0), carol.key_packages(1, false).unwrap().remove(0)];
    let add = alice.add(&mut ga, &kps).unwrap();
    match accept(&mut v, &add) {
        Verified::Commit { added, from_epoch: 0, .. } => {
            let names: Vec<_> = added.iter().map(|m| m.name.clone()).collect();
            assert_eq!(names, vec![bob.name().clone(), carol.name().clone()]);
            assert_eq!(added[0].signature_key, bob.signature_public_key());
        }
        other => panic!("{other:?}"),
    }
    alice.merge_pending(&mut ga).unwrap();
    let welcome = add.welcome.as_ref().unwrap();
    let mut gb = bob.join(welcome).unwrap();
    let mut gc = carol.join(welcome).unwrap();
    for g in [&ga, &gb, &gc] {
        assert_eq!(g.epoch(), 1);
        assert_eq!(g.epoch_authenticator(), ga.epoch_authenticator());
    }
    assert_eq!(v.members().len(), 3);

    // Application messages are PrivateMessage; the verifier sees only framing.
    let m = bob.send(&mut gb, b"hello from bob").unwrap();
    assert_eq!(v.check_application(&m).unwrap().epoch, 1);
    assert_eq!(v.verify(&m).unwrap_err().refusal(), Some(Refusal::NotAllowed), "a PrivateMessage is never a handshake");
    for (c, g) in [(&alice, &mut ga), (&carol, &mut gc)] {
        assert_eq!(
            c.process(g, &m).unwrap(),
            Incoming::Application { sender: Some(bob.name().clone()), plaintext: b"hello from bob".to_vec() }
        );
    }

    // SFrame: every member derives the same key for each sender, key ids
    // carry sender index and epoch.
    let mut counter = MonotonicCounter::default();
    let frame = alice.sframe(&ga).encrypt(&mut counter, b"video frame").unwrap();
    for (c, g) in [(&bob, &gb), (&carol, &gc)] {
        assert_eq!(c.sframe(g).decrypt(&frame).unwrap(), b"video frame");
        let kid = c.sframe(g).key_id(ga.own_index()).unwrap();
        assert_eq!((kid.member_index(), kid.epoch_lsb()), (u64::from(ga.own_index()), 1));
    }
    let bob_frame = bob.sframe(&gb).encrypt(&mut MonotonicCounter::default(), b"bob video").unwrap();
    assert_eq!(alice.sframe(&ga).decrypt(&bob_frame).unwrap(), b"bob video");
    assert_ne!(frame[..4], bob_frame[..4], "different senders, different key ids");

    // Bob self-updates; everyone follows.
    let upd = bob.self_update(&mut gb).unwrap();
    accept(&mut v, &upd);
    bob.merge_pending(&mut gb).unwrap();
    assert_eq!(alice.process(&mut ga, &upd.commit).unwrap(), Incoming::Commit { epoch: 2 });
    assert_eq!(carol.process(&mut gc, &upd.commit).unwrap(), Incoming::Commit { epoch: 2 });
    assert_eq!(ga.epoch_authenticator(), gb.epoch_authenticator());
    // A frame from the old epoch no longer decrypts with current keys.
    assert!(matches!(bob.sframe(&gb).decrypt(&frame), Err(MlsError::WrongEpoch { .. })));

    // Alice removes Carol; Carol learns it and cannot decrypt new frames.
    let rm = alice.remove(&mut ga, std::slice::from_ref(carol.name())).unwrap();
    match accept(&mut v, &rm) {
        Verified::Commit { removed, .. } => assert_eq!(removed[0].name, *carol.name()),
        other => panic!("{other:?}"),
    }
    alice.merge_pending(&mut ga).unwrap();
    assert_eq!(bob.process(&mut gb, &rm.commit).unwrap(), Incoming::Commit { epoch: 3 });
    assert_eq!(carol.process(&mut gc, &rm.commit).unwrap(), Incoming::Removed);
    let secret = alice.sframe(&ga).encrypt(&mut MonotonicCounter::default(), b"after removal").unwrap();
    assert_eq!(bob.sframe(&gb).decrypt(&secret).unwrap(), b"after removal");
    assert!(carol.sframe(&gc).decrypt(&secret).is_err(), "a removed member decrypted a new-epoch frame");
    assert_eq!(v.members().len(), 2);

    // The verifier's state survives serialization.
    let restored = Verifier::from_bytes(&v.to_bytes()).unwrap();
    assert_eq!((restored.epoch(), restored.members()), (v.epoch(), v.members()));
    assert_eq!(restored.to_bytes(), v.to_bytes());
}

#[test]
fn delivery_service_removal_and_external_join() {
    let ds = DeliveryService::generate().unwrap();
    let alice = client("tn_m", "ac_alice", "dv_a1");
    let bob = client("tn_m", "ac_bob", "dv_b1");
    let mut ga = alice.create_group(b"group-2", &ds.public_key()).unwrap();
    let mut v = Verifier::from_group_info(&alice.group_info(&ga).unwrap()).unwrap();
    let add = alice.add(&mut ga, &bob.key_packages(1, false).unwrap()).unwrap();
    accept(&mut v, &add);
    alice.merge_pending(&mut ga).unwrap();
    let mut gb = bob.join(add.welcome.as_ref().unwrap()).unwrap();

    // Bob's account is deleted: the service proposes his removal; Alice's
    // next commit includes it.
    let bob_leaf = v.index_of(bob.name()).unwrap();
    let proposal = ds.propose_remove(&mut v, bob_leaf, 0).unwrap();
    assert_eq!(alice.process(&mut ga, &proposal).unwrap(), Incoming::Proposal);
    assert_eq!(bob.process(&mut gb, &proposal).unwrap(), Incoming::Proposal);
    let commit = alice.self_update(&mut ga).unwrap();
    match accept(&mut v, &commit) {
        Verified::Commit { removed, .. } => assert_eq!(removed[0].name, *bob.name()),
        other => panic!("{other:?}"),
    }
    alice.merge_pending(&mut ga).unwrap();
    assert_eq!(bob.process(&mut gb, &commit.commit).unwrap(), Incoming::Removed);
    assert_eq!(v.members().len(), 1);

    // Bob's new device joins by external commit from the current GroupInfo.
    let bob2 = client("tn_m", "ac_bob", "dv_b2");
    let (mut gb2, join) = bob2.join_external(&alice.group_info(&ga).unwrap()).unwrap();
    match accept(&mut v, &join) {
        Verified::Commit { sender: Sender::NewMember { name, signature_key }, .. } => {
            assert_eq!(name, *bob2.name());
            assert_eq!(signature_key, bob2.signature_public_key());
        }
        other => panic!("{other:?}"),
    }
    // Epochs: 0 created, 1 Bob added, 2 Bob removed, 3 Bob's new device in.
    assert_eq!(alice.process(&mut ga, &join.commit).unwrap(), Incoming::Commit { epoch: 3 });
    assert_eq!(ga.epoch_authenticator(), gb2.epoch_authenticator());
    let m = bob2.send(&mut gb2, b"back").unwrap();
    assert!(matches!(alice.process(&mut ga, &m).unwrap(), Incoming::Application { .. }));
}

#[test]
fn the_verifier_refuses_what_it_must() {
    let ds = DeliveryService::generate().unwrap();
    let alice = client("tn_m", "ac_alice", "dv_a1");
    let bob = client("tn_m", "ac_bob", "dv_b1");
    let eve = client("tn_m", "ac_eve", "dv_e1");
    let mut ga = alice.create_group(b"group-3", &ds.public_key()).unwrap();
    let mut v = Verifier::from_group_info(&alice.group_info(&ga).unwrap()).unwrap();

    // Garbage and truncated bytes.
    for bad in [&b""[..], b"\x00\x01garbage", &[0xff; 64]] {
        assert_eq!(v.verify(bad).unwrap_err().refusal(), Some(Refusal::Malformed), "{bad:?}");
    }
    // A commit of a group Eve made herself, with the same id, signed by a
    // non-member: refused.
    let mut ge = eve.create_group(b"group-3", &ds.public_key()).unwrap();
    let forged = eve.self_update(&mut ge).unwrap();
    assert!(v.verify(&forged.commit).is_err());

    let add = alice.add(&mut ga, &bob.key_packages(1, false).unwrap()).unwrap();
    accept(&mut v, &add);
    alice.merge_pending(&mut ga).unwrap();
    // The same commit again is for an old epoch now.
    assert!(matches!(v.verify(&add.commit), Err(MlsError::WrongEpoch { message: 0, current: 1 })));
    // A GroupInfo of the previous epoch does not match the state.
    assert!(v.check_group_info(&alice.group_info(&ga).unwrap(), 0).is_ok());
    let stale = Verifier::from_group_info(&add.group_info).unwrap();
    assert_eq!(stale.epoch(), 1);
    // Tampering a byte of a commit's signed content breaks its signature.
    let upd = alice.self_update(&mut ga).unwrap();
    let mut tampered = upd.commit.clone();
    let n = tampered.len();
    tampered[n / 2] ^= 1;
    assert!(v.verify(&tampered).is_err());
    // A GroupInfo for the new epoch, checked against the wrong signer.
    v.verify(&upd.commit).unwrap();
    v.apply().unwrap();
    assert!(v.check_group_info(&upd.group_info, 1).is_err());
    v.check_group_info(&upd.group_info, 0).unwrap();
}

/// What DESIGN.md says the delivery service cannot check, measured: a
/// commit whose membership tag (a MAC under a group secret, the last 32
/// bytes of the PublicMessage) is corrupted verifies at the server, and
/// every member refuses it. Members report such commits (groups service).
#[test]
fn a_corrupted_membership_tag_passes_the_verifier_and_fails_at_members() {
    let ds = DeliveryService::generate().unwrap();
    let alice = client("tn_m", "ac_alice", "dv_a1");
    let bob = client("tn_m", "ac_bob", "dv_b1");
    let mut ga = alice.create_group(b"group-4", &ds.public_key()).unwrap();
    let mut v = Verifier::from_group_info(&alice.group_info(&ga).unwrap()).unwrap();
    let add = alice.add(&mut ga, &bob.key_packages(1, false).unwrap()).unwrap();
    accept(&mut v, &add);
    alice.merge_pending(&mut ga).unwrap();
    let mut gb = bob.join(add.welcome.as_ref().unwrap()).unwrap();

    let upd = alice.self_update(&mut ga).unwrap();
    let mut bad = upd.commit.clone();
    let n = bad.len();
    bad[n - 1] ^= 0x80;
    assert!(matches!(v.verify(&bad).unwrap(), Verified::Commit { .. }), "the verifier cannot see the membership tag");
    assert!(bob.process(&mut gb, &bad).is_err(), "a member must refuse a bad membership tag");
    // The genuine commit still works for Bob afterwards.
    assert_eq!(bob.process(&mut gb, &upd.commit).unwrap(), Incoming::Commit { epoch: 2 });
}
