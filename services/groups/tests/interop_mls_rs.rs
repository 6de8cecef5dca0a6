//! Any RFC 9420 client works through Spine: mls-rs 0.57 (its own code and
//! its pure-Rust crypto provider) as a member beside spine-mls's openmls
//! clients, three products, through the groups API only, as a frontend team
//! would use it. Adds across products by interop handle, Welcomes through
//! mailboxes (from either implementation), updates, a removal and a re-add,
//! application messages both ways, and at every epoch the same epoch
//! authenticator for everyone and SFrame frames that decrypt across
//! implementations (equal exporter secrets). Then a fork: mls-rs commits
//! with a corrupted membership tag, the openmls members dispute it, the
//! service voids it, mls-rs rejoins by external commit and keeps its place
//! in its account's membership index, and messages flow again at one epoch.

mod support;

use mls_rs::client_builder::MlsConfig;
use mls_rs::crypto::{SignaturePublicKey, SignatureSecretKey};
use mls_rs::extension::ExtensionType;
use mls_rs::group::ReceivedMessage;
use mls_rs::identity::SigningIdentity;
use mls_rs::identity::basic::{BasicCredential, BasicIdentityProvider};
use mls_rs::mls_rules::{CommitOptions, DefaultMlsRules};
use mls_rs::{CipherSuite, CipherSuiteProvider, Client, CryptoProvider, Extension, ExtensionList, MlsMessage};
use sframe::frame::{EncryptedFrame, MediaFrame, MonotonicCounter};
use sframe::key::{DecryptionKey, EncryptionKey};
use sframe::mls::{MlsExporter, MlsKeyId};
use spine_mls::DeviceName;
use spine_mls::client::Incoming;
use spine_proto::common::v1::InteropRef;
use spine_proto::groups::v1 as pb;
use spine_proto::groups::v1::groups_client::GroupsClient;
use spine_proto::identity::v1 as ipb;
use spine_runtime::config::Backend;
use spine_testing::{Env, req};
use support::*;
use tonic::Code;
use tonic_types::StatusExt;

/// Spine's ciphersuite, 0x0001.
const CS: CipherSuite = CipherSuite::CURVE25519_AES128;
/// The last_resort extension (MLS extensions draft).
const LAST_RESORT: u16 = 0x000A;

fn provider() -> mls_rs_crypto_rustcrypto::RustCryptoProvider {
    mls_rs_crypto_rustcrypto::RustCryptoProvider::default()
}

/// An mls-rs client as a Spine device: basic credential naming the device,
/// its registered key, key packages within Spine's lifetime limit, the
/// last-resort capability, and a GroupInfo with the tree on every commit.
fn rs_client(
    name: &DeviceName,
    secret: SignatureSecretKey,
    public: SignaturePublicKey,
    lifetime_secs: u64,
    last_resort: bool,
) -> Client<impl MlsConfig> {
    let identity = SigningIdentity::new(BasicCredential::new(name.to_identity()).into_credential(), public);
    let rules = DefaultMlsRules::new()
        .with_commit_options(CommitOptions::new().with_allow_external_commit(true).with_path_required(true));
    let b = Client::builder()
        .identity_provider(BasicIdentityProvider)
        .crypto_provider(provider())
        .mls_rules(rules)
        .key_package_lifetime(std::time::Duration::from_secs(lifetime_secs));
    let b = if last_resort { b.extension_type(ExtensionType::new(LAST_RESORT)) } else { b.extension_types(vec![]) };
    b.signing_identity(identity, secret, CS).build()
}

fn bytes(m: &MlsMessage) -> Vec<u8> {
    m.to_bytes().unwrap()
}

fn msg(b: &[u8]) -> MlsMessage {
    MlsMessage::from_bytes(b).unwrap()
}

/// mls-rs's exporter, for the `sframe` crate's MLS key schedule.
struct RsExporter<'a, C: MlsConfig>(&'a mls_rs::Group<C>);

#[derive(Debug, thiserror::Error)]
#[error("mls-rs exporter: {0}")]
struct RsExportError(String);

impl<C: MlsConfig> MlsExporter for RsExporter<'_, C> {
    type BaseKey = Vec<u8>;
    type Error = RsExportError;
    fn export_secret(&self, label: &str, context: &[u8], len: usize) -> Result<Vec<u8>, RsExportError> {
        self.0
            .export_secret(label.as_bytes(), context, len)
            .map(|s| s.as_bytes().to_vec())
            .map_err(|e| RsExportError(e.to_string()))
    }
}

fn rs_key_id<C: MlsConfig>(g: &mls_rs::Group<C>, sender: u32) -> MlsKeyId {
    MlsKeyId::try_new(0u64, g.current_epoch(), u64::from(sender), spine_mls::sframe::bit_range()).unwrap()
}

fn rs_sframe_encrypt<C: MlsConfig>(g: &mls_rs::Group<C>, payload: &[u8]) -> Vec<u8> {
    let kid = rs_key_id(g, g.current_member_index());
    let key = EncryptionKey::derive_from_mls(spine_mls::sframe::SFRAME_SUITE, &RsExporter(g), kid).unwrap();
    let frame = MediaFrame::try_new(&mut MonotonicCounter::default(), payload).unwrap();
    frame.encrypt(&key).unwrap().as_ref().to_vec()
}

fn rs_sframe_decrypt<C: MlsConfig>(g: &mls_rs::Group<C>, sender: u32, frame: &[u8]) -> Vec<u8> {
    let key =
        DecryptionKey::derive_from_mls(spine_mls::sframe::SFRAME_SUITE, &RsExporter(g), rs_key_id(g, sender)).unwrap();
    EncryptedFrame::try_from(frame).unwrap().decrypt(&key).unwrap().payload().to_vec()
}

/// Everyone at one epoch: the same epoch authenticator, and SFrame frames
/// from each implementation decrypt in the other (equal exporter secrets).
fn same_epoch<C: MlsConfig>(rs: &mls_rs::Group<C>, members: &mut [&mut Member]) {
    let auth = rs.epoch_authenticator().unwrap().as_bytes().to_vec();
    for m in members.iter_mut() {
        assert_eq!(m.g().epoch(), rs.current_epoch(), "{} is at another epoch", m.device);
        assert_eq!(m.g().epoch_authenticator(), auth, "{} has another epoch authenticator", m.device);
        let from_rs = rs_sframe_encrypt(rs, b"frame from mls-rs");
        let g = m.group.as_ref().expect("a member");
        assert_eq!(m.client.sframe(g).decrypt(&from_rs).unwrap(), b"frame from mls-rs");
        let from_openmls = m.client.sframe(g).encrypt(&mut MonotonicCounter::default(), b"frame from openmls").unwrap();
        let sender = g.own_index();
        assert_eq!(rs_sframe_decrypt(rs, sender, &from_openmls), b"frame from openmls");
    }
}

fn reason(s: &tonic::Status) -> String {
    s.get_details_error_info().map(|i| i.reason).unwrap_or_default()
}

async fn send_commit_raw(
    env: &Env,
    token: &str,
    gid: &[u8],
    commit: Vec<u8>,
    welcome: Vec<u8>,
    info: Vec<u8>,
) -> Result<u64, tonic::Status> {
    GroupsClient::new(env.channel.clone())
        .max_encoding_message_size(16 << 20)
        .send_commit(req(pb::SendCommitRequest { group_id: gid.to_vec(), commit, welcome, group_info: info }, token))
        .await
        .map(|r| r.into_inner().epoch)
}

async fn send_app(env: &Env, token: &str, gid: &[u8], message: Vec<u8>) {
    GroupsClient::new(env.channel.clone())
        .send_application(req(pb::SendApplicationRequest { group_id: gid.to_vec(), message }, token))
        .await
        .unwrap();
}

async fn dispute(env: &Env, token: &str, gid: &[u8], epoch: u64) {
    GroupsClient::new(env.channel.clone())
        .report_dispute(req(pb::ReportDisputeRequest { group_id: gid.to_vec(), epoch }, token))
        .await
        .unwrap();
}

fn interop(tenant: &str, handle: &str) -> pb::Target {
    pb::Target {
        target: Some(pb::target::Target::Interop(InteropRef { tenant_id: tenant.into(), handle: handle.into() })),
    }
}

fn rs_process<C: MlsConfig>(g: &mut mls_rs::Group<C>, bytes: &[u8]) -> ReceivedMessage {
    g.process_incoming_message(msg(bytes)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mls_rs_and_openmls_share_groups_through_spine() {
    let env = start(Backend::Embedded).await;
    let (ta, tb, tc) = (env.tenant("messenger").await, env.tenant("instagram").await, env.tenant("whatsapp").await);
    let (a, b, c) = (env.account(&ta).await, env.account(&tb).await, env.account(&tc).await);
    let_anyone_add(&env, &tb, &b).await;
    let_anyone_add(&env, &tc, &c).await;
    let mut alice = member(&env, &ta, &a).await;
    let mut carol = member(&env, &tc, &c).await;
    alice.upload(&env, 2).await;
    carol.upload(&env, 3).await;

    // Bob on mls-rs: generate the key, register the device, then build the
    // client naming it (docs/api.md, "In this order").
    let (secret, public) = provider().cipher_suite_provider(CS).unwrap().signature_key_generate().unwrap();
    let (bob_dev, bob_token) = env.register(&tb, &b, public.as_bytes()).await;
    let bob_name = DeviceName::new(&tb.id, &b, &bob_dev);
    let bob = rs_client(&bob_name, secret.clone(), public.clone(), 30 * 86_400, true);
    let mut bob_seq = 1u64;
    let kps: Vec<Vec<u8>> = (0..3)
        .map(|_| bytes(&bob.generate_key_package_message(ExtensionList::new(), ExtensionList::new(), None).unwrap()))
        .collect();
    let mut lr_ext = ExtensionList::new();
    lr_ext.set(Extension::new(ExtensionType::new(LAST_RESORT), vec![]));
    let last_resort = bytes(&bob.generate_key_package_message(lr_ext.clone(), ExtensionList::new(), None).unwrap());
    let mut groups = GroupsClient::new(env.channel.clone());
    let up = groups
        .upload_key_packages(req(pb::UploadKeyPackagesRequest { key_packages: kps, last_resort }, &bob_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((up.remaining, up.has_last_resort), (3, true));
    // mls-rs's default key-package lifetime (365 days) is over the limit;
    // a last-resort package whose leaf lacks the capability is refused.
    let default_life = rs_client(&bob_name, secret.clone(), public.clone(), 365 * 86_400, true);
    let long =
        bytes(&default_life.generate_key_package_message(ExtensionList::new(), ExtensionList::new(), None).unwrap());
    let refused = groups
        .upload_key_packages(req(
            pb::UploadKeyPackagesRequest { key_packages: vec![long], last_resort: vec![] },
            &bob_token,
        ))
        .await
        .unwrap_err();
    assert_eq!((refused.code(), reason(&refused).as_str()), (Code::InvalidArgument, "MLS_LIFETIME"));
    let no_capability = rs_client(&bob_name, secret.clone(), public.clone(), 30 * 86_400, false);
    // (mls-rs lets a client mark a package with an extension its leaf does
    // not advertise; Spine does not.)
    let kp = no_capability.generate_key_package_message(lr_ext.clone(), ExtensionList::new(), None).unwrap();
    let refused = groups
        .upload_key_packages(req(
            pb::UploadKeyPackagesRequest { key_packages: vec![], last_resort: bytes(&kp) },
            &bob_token,
        ))
        .await
        .unwrap_err();
    assert_eq!((refused.code(), reason(&refused).as_str()), (Code::InvalidArgument, "MLS_UNSUPPORTED"));

    // Handles: Bob's and Carol's, open to the other products.
    let handle_b = env.interop_handle(&bob_token, vec![ta.id.clone(), tc.id.clone()]).await;
    let handle_c = env.interop_handle(&carol.token, vec![ta.id.clone(), tb.id.clone()]).await;

    // Alice (openmls) makes a group of three products, adds Bob and Carol
    // by interop handle; the Welcomes come through the mailboxes.
    let gid = b"interop".to_vec();
    create_group(&env, &mut alice, &gid, vec![ta.id.clone(), tb.id.clone(), tc.id.clone()]).await;
    let kps = claim(&env, &alice.token, vec![interop(&tb.id, &handle_b), interop(&tc.id, &handle_c)]).await;
    assert_eq!(kps.len(), 2);
    let add = alice.act(|cl, g| cl.add(g, &kps)).unwrap();
    alice.send_commit(&env, &add).await.unwrap();
    alice.act(|cl, g| cl.merge_pending(g)).unwrap();
    let w = receive_entries(&env, &bob_token, &mut bob_seq, 1).await.remove(0);
    assert_eq!(w.kind, pb::EntryKind::Welcome as i32);
    let (mut bg, _) = bob.join_group(None, &msg(&w.message), None).unwrap();
    let w = carol.receive(&env, 1).await.remove(0);
    carol.group = Some(carol.client.join(&w.message).unwrap());
    same_epoch(&bg, &mut [&mut alice, &mut carol]);

    // Application messages both ways.
    let hello = bytes(&bg.encrypt_application_message(b"hi from mls-rs", vec![]).unwrap());
    send_app(&env, &bob_token, &gid, hello).await;
    for x in [&mut alice, &mut carol] {
        let e = x.receive(&env, 1).await.remove(0);
        assert!(matches!(x.act(|cl, g| cl.process(g, &e.message)).unwrap(),
            Incoming::Application { plaintext, sender } if plaintext == b"hi from mls-rs" && sender == Some(bob_name.clone())));
    }
    let back = alice.act(|cl, g| cl.send(g, b"hi from openmls")).unwrap();
    send_app(&env, &alice.token, &gid, back).await;
    let _ = carol.receive(&env, 1).await;
    let e = receive_entries(&env, &bob_token, &mut bob_seq, 1).await.remove(0);
    match rs_process(&mut bg, &e.message) {
        ReceivedMessage::ApplicationMessage(m) => assert_eq!(m.data(), b"hi from openmls"),
        other => panic!("expected an application message, got {other:?}"),
    }

    // Bob commits an update: mls-rs's GroupInfo (allow_external_commit)
    // goes with it; the openmls members follow.
    let update = bg.commit_builder().build().unwrap();
    let info = bytes(update.external_commit_group_info.as_ref().expect("a GroupInfo with every commit"));
    let e1 = send_commit_raw(&env, &bob_token, &gid, bytes(&update.commit_message), vec![], info).await.unwrap();
    bg.apply_pending_commit().unwrap();
    assert_eq!(e1, bg.current_epoch());
    for x in [&mut alice, &mut carol] {
        let e = x.receive(&env, 1).await.remove(0);
        assert!(matches!(x.act(|cl, g| cl.process(g, &e.message)).unwrap(), Incoming::Commit { .. }));
    }
    same_epoch(&bg, &mut [&mut alice, &mut carol]);

    // Alice removes Carol; Bob follows.
    let carol_leaf = carol.g().own_index();
    let carol_name = DeviceName::new(&tc.id, &c, &carol.device);
    let rm = alice.act(|cl, g| cl.remove(g, std::slice::from_ref(&carol_name))).unwrap();
    alice.send_commit(&env, &rm).await.unwrap();
    alice.act(|cl, g| cl.merge_pending(g)).unwrap();
    let e = receive_entries(&env, &bob_token, &mut bob_seq, 1).await.remove(0);
    rs_process(&mut bg, &e.message);
    assert_eq!(bg.roster().members().len(), 2);
    assert!(bg.roster().members().iter().all(|m| m.index != carol_leaf));
    let e = carol.receive(&env, 1).await.remove(0);
    assert_eq!(carol.act(|cl, g| cl.process(g, &e.message)).unwrap(), Incoming::Removed);
    same_epoch(&bg, &mut [&mut alice]);

    // Bob (mls-rs) adds her back, by her handle: an mls-rs Welcome that
    // openmls joins from.
    let kp = claim(&env, &bob_token, vec![interop(&tc.id, &handle_c)]).await.remove(0);
    let readd = bg.commit_builder().add_member(msg(&kp)).unwrap().build().unwrap();
    let welcome = bytes(&readd.welcome_messages[0]);
    let info = bytes(readd.external_commit_group_info.as_ref().unwrap());
    send_commit_raw(&env, &bob_token, &gid, bytes(&readd.commit_message), welcome, info).await.unwrap();
    bg.apply_pending_commit().unwrap();
    let e = alice.receive(&env, 1).await.remove(0);
    alice.act(|cl, g| cl.process(g, &e.message)).unwrap();
    let w = carol.receive(&env, 1).await.remove(0);
    assert_eq!(w.kind, pb::EntryKind::Welcome as i32);
    carol.group = Some(carol.client.join(&w.message).unwrap());
    same_epoch(&bg, &mut [&mut alice, &mut carol]);

    // Refusals carry stable reasons: an application message sent as a
    // commit, and garbage.
    let private = bytes(&bg.encrypt_application_message(b"not a commit", vec![]).unwrap());
    let info = alice.act(|cl, g| cl.group_info(g)).unwrap();
    let s = send_commit_raw(&env, &bob_token, &gid, private, vec![], info.clone()).await.unwrap_err();
    assert_eq!((s.code(), reason(&s).as_str()), (Code::InvalidArgument, "MLS_NOT_ALLOWED"));
    assert!(!s.message().contains("ValidationError") && !s.message().contains("LeafNode"), "{}", s.message());
    let s = send_commit_raw(&env, &bob_token, &gid, vec![0, 1, 0, 3, 9], vec![], info).await.unwrap_err();
    assert_eq!(reason(&s), "MLS_MALFORMED");

    // The fork: Bob's next commit carries a corrupted membership tag. The
    // service cannot tell and accepts it; the openmls members cannot
    // process it, dispute it, and the service voids it.
    let before = bg.current_epoch();
    let bob_leaf = bg.current_member_index();
    let mut forked = bg.commit_builder().build().unwrap();
    let mut commit = bytes(&forked.commit_message);
    let last = commit.len() - 1;
    commit[last] ^= 0x5a;
    let info = bytes(forked.external_commit_group_info.take().as_ref().unwrap());
    assert_eq!(send_commit_raw(&env, &bob_token, &gid, commit, vec![], info).await.unwrap(), before + 1);
    bg.apply_pending_commit().unwrap();
    for x in [&mut alice, &mut carol] {
        let e = x.receive(&env, 1).await.remove(0);
        assert!(x.act(|cl, g| cl.process(g, &e.message)).is_err());
        assert_eq!(x.g().epoch(), before);
        dispute(&env, &x.token, &gid, before + 1).await;
    }
    let g = get_group(&env, &alice.token, &gid).await;
    assert_eq!(g.epoch, before, "voided: the group is back at the epoch before");
    assert_eq!((g.voided[0].epoch, g.voided[0].committer_leaf_index), (before + 1, bob_leaf));
    let e = receive_entries(&env, &bob_token, &mut bob_seq, 1).await.remove(0);
    assert_eq!((e.kind, e.epoch), (pb::EntryKind::EpochVoided as i32, before + 1));
    for x in [&mut alice, &mut carol] {
        let e = x.receive(&env, 1).await.remove(0);
        assert_eq!(e.kind, pb::EntryKind::EpochVoided as i32);
    }

    // Bob rejoins by external commit (mls-rs), replacing his own leaf,
    // from the restored GroupInfo.
    let info = group_info(&env, &bob_token, &gid).await;
    assert_eq!(info.epoch, before);
    let (mut bg, join) =
        bob.external_commit_builder().unwrap().with_removal(bob_leaf).build(msg(&info.group_info)).unwrap();
    let new_info = bytes(&bg.group_info_message_allowing_ext_commit(true).unwrap());
    assert_eq!(send_commit_raw(&env, &bob_token, &gid, bytes(&join), vec![], new_info).await.unwrap(), before + 1);
    for x in [&mut alice, &mut carol] {
        let e = x.receive(&env, 1).await.remove(0);
        assert!(matches!(x.act(|cl, g| cl.process(g, &e.message)).unwrap(), Incoming::Commit { .. }));
    }
    same_epoch(&bg, &mut [&mut alice, &mut carol]);
    // Messages flow again, both ways, at one epoch.
    let again = bytes(&bg.encrypt_application_message(b"healed", vec![]).unwrap());
    send_app(&env, &bob_token, &gid, again).await;
    for x in [&mut alice, &mut carol] {
        let e = x.receive(&env, 1).await.remove(0);
        assert!(matches!(x.act(|cl, g| cl.process(g, &e.message)).unwrap(),
            Incoming::Application { plaintext, .. } if plaintext == b"healed"));
    }
    let reply = carol.act(|cl, g| cl.send(g, b"welcome back")).unwrap();
    send_app(&env, &carol.token, &gid, reply).await;
    let e = receive_entries(&env, &bob_token, &mut bob_seq, 1).await.remove(0);
    match rs_process(&mut bg, &e.message) {
        ReceivedMessage::ApplicationMessage(m) => assert_eq!(m.data(), b"welcome back"),
        other => panic!("expected an application message, got {other:?}"),
    }

    // The rejoin kept Bob's device in his account's membership index.
    let report = env
        .identity()
        .get_data_report(req(ipb::GetDataReportRequest::default(), &bob_token))
        .await
        .unwrap()
        .into_inner();
    let groups_section = report.sections.iter().find(|s| s.service == "groups").unwrap();
    let memberships = groups_section.items.iter().find(|i| i.kind == "group_membership").unwrap();
    assert_eq!(memberships.count, 1, "a device that rejoins by external commit stays indexed");

    // And so revoking it proposes its removal at once, not at the next
    // upkeep (15 s): the proposal reaches Alice within 3 s, after Carol's
    // message she has not read yet.
    env.identity()
        .revoke_device(req(ipb::RevokeDeviceRequest { account_id: b.clone(), device_id: bob_dev.clone() }, &tb.cred))
        .await
        .unwrap();
    let e = tokio::time::timeout(std::time::Duration::from_secs(3), alice.receive(&env, 2))
        .await
        .expect("the removal was proposed at once");
    assert_eq!((e[0].kind, e[1].kind), (pb::EntryKind::Application as i32, pb::EntryKind::Proposal as i32));
    println!("interop: mls-rs and openmls through Spine, epoch {} reached", bg.current_epoch());
}
