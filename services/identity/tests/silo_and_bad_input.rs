//! Silos, credentials and bad input: for every identity method, a caller of
//! tenant B reaching for tenant A's things gets NOT_FOUND or
//! PERMISSION_DENIED and the store does not change; bad credentials get
//! UNAUTHENTICATED; bad bytes and fields get INVALID_ARGUMENT (or
//! RESOURCE_EXHAUSTED past the message limit) and nothing is half-written.

use std::collections::BTreeMap;

use base64::Engine;
use bytes::{Buf, BufMut};
use ed25519_dalek::SigningKey;
use prost_types::FieldMask;
use spine_proto::common::v1::{InteropRef, PeerRef, peer_ref};
use spine_proto::identity::v1 as pb;
use spine_runtime::auth::token::{self, Claims};
use spine_runtime::config::Backend;
use spine_testing::{Device, Env, Tenant, assert_code, req, start};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Everything under /spine/ except soft state that legitimately moves.
async fn snapshot(env: &Env) -> BTreeMap<String, Vec<u8>> {
    env.rt.store.range_all("/spine/").await.unwrap().into_iter().map(|kv| (kv.key, kv.value)).collect()
}

struct World {
    a: Tenant,
    b: Tenant,
    alice: Device,
    alice_friend: String,
    bob: Device,
    handle: String,
}

async fn world(env: &Env) -> World {
    let a = env.tenant("a").await;
    let b = env.tenant("b").await;
    let alice = env.device(&a).await;
    let alice_friend = env.account(&a).await;
    let bob = env.device(&b).await;
    let mut id = env.identity();
    id.add_contact(req(pb::AddContactRequest { account_id: String::new(), peer: local(&alice_friend) }, &alice.token))
        .await
        .unwrap();
    // A handle of Alice open to a third tenant only, not to B.
    let c = env.tenant("c").await;
    let handle = id
        .create_interop_handle(req(
            pb::CreateInteropHandleRequest {
                request_id: "h".into(),
                account_id: String::new(),
                allowed_tenant_ids: vec![c.id],
            },
            &alice.token,
        ))
        .await
        .unwrap()
        .into_inner()
        .handle;
    World { a, b, alice, alice_friend, bob, handle }
}

fn local(a: &str) -> Option<PeerRef> {
    Some(PeerRef { peer: Some(peer_ref::Peer::AccountId(a.into())) })
}

macro_rules! refused {
    ($call:expr) => {{
        let r = $call.await;
        match r {
            Ok(v) => panic!("{} succeeded: {:?}", stringify!($call), v),
            Err(s) => assert!(
                matches!(s.code(), Code::NotFound | Code::PermissionDenied),
                "{}: {:?} {}",
                stringify!($call),
                s.code(),
                s.message()
            ),
        }
    }};
}

async fn every_identity_method_is_siloed(env: Env) {
    let w = world(&env).await;
    let before = snapshot(&env).await;
    let mut id = env.identity();
    let acc = w.alice.account.clone();
    let dev = w.alice.device.clone();
    // Tenant B's server and B's device, each aimed at Alice in tenant A.
    for cred in [w.b.cred.as_str(), w.bob.token.as_str()] {
        refused!(id.get_account(req(pb::GetAccountRequest { account_id: acc.clone() }, cred)));
        refused!(id.delete_account(req(pb::DeleteAccountRequest { account_id: acc.clone() }, cred)));
        refused!(id.register_device(req(
            pb::RegisterDeviceRequest {
                request_id: "x".into(),
                account_id: acc.clone(),
                signature_scheme: 1,
                signature_public_key: SigningKey::from_bytes(&[7; 32]).verifying_key().to_bytes().to_vec()
            },
            cred
        )));
        refused!(id.list_devices(req(pb::ListDevicesRequest { account_id: acc.clone(), ..Default::default() }, cred)));
        refused!(
            id.revoke_device(req(pb::RevokeDeviceRequest { account_id: acc.clone(), device_id: dev.clone() }, cred))
        );
        refused!(id.issue_device_token(req(
            pb::IssueDeviceTokenRequest { account_id: acc.clone(), device_id: dev.clone(), ..Default::default() },
            cred
        )));
        refused!(id.get_settings(req(pb::GetSettingsRequest { account_id: acc.clone() }, cred)));
        refused!(id.update_settings(req(
            pb::UpdateSettingsRequest {
                account_id: acc.clone(),
                settings: Some(pb::PrivacySettings::default()),
                update_mask: Some(FieldMask { paths: vec!["auto_answer_hint".into()] })
            },
            cred
        )));
        refused!(
            id.add_contact(req(pb::AddContactRequest { account_id: acc.clone(), peer: local(&w.alice_friend) }, cred))
        );
        refused!(id.remove_contact(req(
            pb::RemoveContactRequest { account_id: acc.clone(), peer: local(&w.alice_friend) },
            cred
        )));
        refused!(
            id.list_contacts(req(pb::ListContactsRequest { account_id: acc.clone(), ..Default::default() }, cred))
        );
        refused!(id.block(req(pb::BlockRequest { account_id: acc.clone(), peer: local(&w.alice_friend) }, cred)));
        refused!(id.unblock(req(pb::UnblockRequest { account_id: acc.clone(), peer: local(&w.alice_friend) }, cred)));
        refused!(id.list_blocks(req(pb::ListBlocksRequest { account_id: acc.clone(), ..Default::default() }, cred)));
        refused!(id.create_interop_handle(req(
            pb::CreateInteropHandleRequest {
                request_id: "y".into(),
                account_id: acc.clone(),
                allowed_tenant_ids: vec![w.b.id.clone()]
            },
            cred
        )));
        refused!(id.list_interop_handles(req(pb::ListInteropHandlesRequest { account_id: acc.clone() }, cred)));
        refused!(id.revoke_interop_handle(req(
            pb::RevokeInteropHandleRequest { account_id: acc.clone(), handle: w.handle.clone() },
            cred
        )));
        refused!(id.resolve_interop_handle(req(pb::ResolveInteropHandleRequest { handle: w.handle.clone() }, cred)));
        refused!(id.get_data_report(req(pb::GetDataReportRequest { account_id: acc.clone() }, cred)));
        // B's own account cannot reach into A by naming A's accounts as peers.
        let own = if cred.starts_with("sdt1.") { String::new() } else { w.bob.account.clone() };
        refused!(id.add_contact(req(pb::AddContactRequest { account_id: own.clone(), peer: local(&acc) }, cred)));
        refused!(id.block(req(pb::BlockRequest { account_id: own.clone(), peer: local(&acc) }, cred)));
        let forged_ref = Some(PeerRef {
            peer: Some(peer_ref::Peer::Interop(InteropRef { tenant_id: w.a.id.clone(), handle: w.handle.clone() })),
        });
        refused!(id.add_contact(req(pb::AddContactRequest { account_id: own, peer: forged_ref }, cred)));
    }
    // Within tenant A, a device reaches only its own account.
    let friend_device = env.device_of(&w.a, &w.alice_friend).await;
    let before_device = snapshot(&env).await;
    refused!(id.get_settings(req(pb::GetSettingsRequest { account_id: acc.clone() }, &friend_device.token)));
    refused!(id.revoke_device(req(
        pb::RevokeDeviceRequest { account_id: acc.clone(), device_id: dev.clone() },
        &friend_device.token
    )));
    refused!(id.delete_account(req(pb::DeleteAccountRequest { account_id: acc.clone() }, &friend_device.token)));
    refused!(id.get_data_report(req(pb::GetDataReportRequest { account_id: acc.clone() }, &friend_device.token)));
    assert_eq!(snapshot(&env).await, before_device, "a refused call changed the store");
    // And the operator administers tenants only.
    refused!(id.get_account(req(pb::GetAccountRequest { account_id: acc.clone() }, &env.operator)));
    refused!(id.get_data_report(req(pb::GetDataReportRequest { account_id: acc.clone() }, &env.operator)));
    // Tenant-admin calls from tenants are refused.
    let mut admin = env.admin();
    for cred in [w.b.cred.as_str(), w.bob.token.as_str()] {
        refused!(admin.get_tenant(req(pb::GetTenantRequest { tenant_id: w.a.id.clone() }, cred)));
        // Tenant B's server cannot issue or list A's credentials either.
        refused!(id.issue_tenant_credential(req(
            pb::IssueTenantCredentialRequest {
                request_id: "c".into(),
                tenant_id: w.a.id.clone(),
                label: String::new()
            },
            cred
        )));
        refused!(id.list_tenant_credentials(req(pb::ListTenantCredentialsRequest { tenant_id: w.a.id.clone() }, cred)));
        refused!(
            admin.list_tenant_credentials(req(pb::ListTenantCredentialsRequest { tenant_id: w.a.id.clone() }, cred))
        );
        refused!(admin.rotate_signing_key(req(pb::RotateSigningKeyRequest {}, cred)));
    }
    let mut after = snapshot(&env).await;
    // The only new keys: friend_device's registration (made above, by A).
    after.retain(|k, _| {
        !k.contains(&friend_device.device)
            && !k.contains(&format!("idem/{}", w.alice_friend))
            && !k.ends_with(&format!("accounts/{}", w.alice_friend))
    });
    let mut before = before;
    before.retain(|k, _| !k.ends_with(&format!("accounts/{}", w.alice_friend)));
    assert_eq!(after, before, "a refused call changed the store");
    // Alice is untouched and still works.
    id.get_account(req(pb::GetAccountRequest::default(), &w.alice.token)).await.unwrap();
}

#[tokio::test]
async fn every_identity_method_is_siloed_embedded() {
    every_identity_method_is_siloed(start(Backend::Embedded).await).await;
}

#[tokio::test]
async fn every_identity_method_is_siloed_etcd() {
    every_identity_method_is_siloed(start(Backend::Etcd).await).await;
}

/// The real signing key, read from the store as an attacker with a stolen
/// key would hold it; and its id.
async fn signing_key(env: &Env) -> (String, SigningKey) {
    let kv = env.rt.store.range_all("/spine/sys/signing/").await.unwrap().pop().unwrap();
    let kid = kv.key.rsplit('/').next().unwrap().to_string();
    let v: serde_json::Value = serde_json::from_slice(&kv.value).unwrap();
    // The attacker holds the key-encryption key too.
    let sealed = v["seed"].as_str().unwrap();
    let seed = env.rt.sealer.open(&kv.key, sealed).unwrap();
    (kid, SigningKey::from_bytes(&seed.try_into().unwrap()))
}

#[tokio::test]
async fn expired_forged_and_wrong_key_tokens_are_unauthenticated() {
    let env = start(Backend::Embedded).await;
    let a = env.tenant("a").await;
    let b = env.tenant("b").await;
    let d = env.device(&a).await;
    let (kid, key) = signing_key(&env).await;
    let now = spine_runtime::now_secs();
    let claims = Claims {
        t: a.id.clone(),
        a: d.account.clone(),
        d: d.device.clone(),
        s: vec!["identity".into()],
        iat: now - 100,
        exp: now + 100,
    };
    let mut id = env.identity();
    // Sanity: a token made with the real key works (so the refusals below are about the one change each makes).
    id.get_account(req(pb::GetAccountRequest::default(), &token::sign(&kid, &key, &claims))).await.unwrap();

    let expired = token::sign(&kid, &key, &Claims { exp: now - 1, ..claims.clone() });
    let future = token::sign(&kid, &key, &Claims { iat: now + 600, ..claims.clone() });
    let other_key = SigningKey::generate(&mut rand::rngs::OsRng);
    let forged = token::sign(&kid, &other_key, &claims);
    let unknown_kid = token::sign("sk_aaaaaaaaaaaaaaaaaaaaaaaaaa", &other_key, &claims);
    // Re-pointed at tenant B by editing claims: the signature no longer holds.
    let mut parts: Vec<String> = d.token.split('.').map(String::from).collect();
    let mut c: Claims =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&parts[2]).unwrap()).unwrap();
    c.t = b.id.clone();
    parts[2] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&c).unwrap());
    let retargeted = parts.join(".");
    let tenant_secret_wrong = format!("{}.{}", a.cred.split('.').next().unwrap(), "A".repeat(43));
    let operator_wrong = format!("{}.{}", env.operator.split('.').next().unwrap(), "A".repeat(43));
    for (what, cred) in [
        ("expired", expired.as_str()),
        ("not yet valid", future.as_str()),
        ("forged", forged.as_str()),
        ("unknown key", unknown_kid.as_str()),
        ("retargeted", retargeted.as_str()),
        ("garbage", "sdt1.nope"),
        ("empty", ""),
        ("wrong tenant secret", tenant_secret_wrong.as_str()),
        ("wrong operator secret", operator_wrong.as_str()),
    ] {
        let e = id.get_account(req(pb::GetAccountRequest::default(), cred)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{what}");
        // The message never echoes the credential or says which check failed.
        assert_eq!(e.message(), "invalid credentials", "{what}");
    }
    // No credential at all.
    let e = id.get_account(tonic::Request::new(pb::GetAccountRequest::default())).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // Health and reflection need none.
    let mut health = tonic_health::pb::health_client::HealthClient::new(env.channel.clone());
    let s =
        health.check(tonic_health::pb::HealthCheckRequest { service: "readiness".into() }).await.unwrap().into_inner();
    assert_eq!(s.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
}

/// Sends raw bytes as a request message.
#[derive(Clone, Default)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;
impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}
impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        buf.put_slice(&item);
        Ok(())
    }
}
impl Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let v = buf.chunk().to_vec();
        buf.advance(v.len());
        Ok(Some(v))
    }
}

async fn raw(env: &Env, method: &'static str, body: Vec<u8>, cred: &str) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(env.channel.clone()).max_encoding_message_size(usize::MAX);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static(method);
    grpc.unary(req(body, cred), path, RawCodec).await.unwrap_err()
}

#[tokio::test]
async fn bad_input_is_refused_and_writes_nothing() {
    let env = start(Backend::Embedded).await;
    let a = env.tenant("a").await;
    let d = env.device(&a).await;
    let before = snapshot(&env).await;

    // Malformed protobuf: INVALID_ARGUMENT, not INTERNAL.
    for body in [vec![0xff, 0xff, 0xff], vec![0x0a, 0x05, b'a'], vec![0x08]] {
        let s = raw(&env, "/spine.identity.v1.Identity/CreateAccount", body, &a.cred).await;
        assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());
    }
    // Over the message limit: INVALID_ARGUMENT, before any handler runs,
    // and past tonic's transport cap the same.
    let limit = env.rt.config.limits.max_message_bytes;
    let huge = pb::CreateAccountRequest { request_id: "x".repeat(limit + 1024) };
    let s = raw(&env, "/spine.identity.v1.Identity/CreateAccount", prost::Message::encode_to_vec(&huge), &a.cred).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());
    assert!(s.message().contains(&format!("exceeds the limit of {limit} bytes")), "{}", s.message());
    let absurd =
        pb::CreateAccountRequest { request_id: "x".repeat(spine_proto::codec::TRANSPORT_MAX_MESSAGE_BYTES + 1) };
    let s =
        raw(&env, "/spine.identity.v1.Identity/CreateAccount", prost::Message::encode_to_vec(&absurd), &a.cred).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());

    // The limit is the node's own: a node in the same process with a
    // smaller one refuses what this one takes.
    let mut small = spine_testing::test_config();
    small.limits.max_message_bytes = 4096;
    let other = spine_testing::start_with(Backend::Embedded, small).await;
    let o = other.tenant("o").await;
    let mid = pb::CreateAccountRequest { request_id: "x".repeat(8000) };
    let s =
        raw(&other, "/spine.identity.v1.Identity/CreateAccount", prost::Message::encode_to_vec(&mid), &o.cred).await;
    assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());
    assert!(s.message().contains("exceeds the limit of 4096 bytes"), "{}", s.message());
    let s = raw(&env, "/spine.identity.v1.Identity/CreateAccount", prost::Message::encode_to_vec(&mid), &a.cred).await;
    assert!(!s.message().contains("exceeds the limit"), "8000 bytes are within this node's limit: {}", s.message());

    let mut id = env.identity();
    let mut admin = env.admin();
    // Field bounds: INVALID_ARGUMENT naming the field.
    let cases: Vec<(&str, Result<(), tonic::Status>)> = vec![
        (
            "request_id",
            id.create_account(req(pb::CreateAccountRequest { request_id: "a/b".into() }, &a.cred)).await.map(drop),
        ),
        (
            "request_id",
            id.create_account(req(pb::CreateAccountRequest { request_id: "x".repeat(65) }, &a.cred)).await.map(drop),
        ),
        (
            "request_id",
            id.create_account(req(pb::CreateAccountRequest { request_id: String::new() }, &a.cred)).await.map(drop),
        ),
        (
            "display_name",
            admin
                .create_tenant(req(
                    pb::CreateTenantRequest { request_id: "t".into(), display_name: "x".repeat(65) },
                    &env.operator,
                ))
                .await
                .map(drop),
        ),
        (
            "display_name",
            admin
                .create_tenant(req(
                    pb::CreateTenantRequest { request_id: "t".into(), display_name: "bad\nname".into() },
                    &env.operator,
                ))
                .await
                .map(drop),
        ),
        (
            "tenant_id",
            admin
                .get_tenant(req(pb::GetTenantRequest { tenant_id: "../../sys".into() }, &env.operator))
                .await
                .map(drop),
        ),
        (
            "account_id",
            id.get_account(req(pb::GetAccountRequest { account_id: "ac_../../x".into() }, &a.cred)).await.map(drop),
        ),
        (
            "account_id",
            id.get_account(req(pb::GetAccountRequest { account_id: String::new() }, &a.cred)).await.map(drop),
        ),
        (
            "signature_public_key",
            id.register_device(req(
                pb::RegisterDeviceRequest {
                    request_id: "r".into(),
                    account_id: d.account.clone(),
                    signature_scheme: 1,
                    signature_public_key: vec![1; 31],
                },
                &a.cred,
            ))
            .await
            .map(drop),
        ),
        (
            "signature_public_key",
            id.register_device(req(
                pb::RegisterDeviceRequest {
                    request_id: "r".into(),
                    account_id: d.account.clone(),
                    signature_scheme: 1,
                    signature_public_key: vec![0; 32],
                },
                &a.cred,
            ))
            .await
            .map(drop),
        ),
        (
            "signature_scheme",
            id.register_device(req(
                pb::RegisterDeviceRequest {
                    request_id: "r".into(),
                    account_id: d.account.clone(),
                    signature_scheme: 0,
                    signature_public_key: d.key.verifying_key().to_bytes().to_vec(),
                },
                &a.cred,
            ))
            .await
            .map(drop),
        ),
        (
            "ttl_seconds",
            id.issue_device_token(req(
                pb::IssueDeviceTokenRequest {
                    account_id: d.account.clone(),
                    device_id: d.device.clone(),
                    scopes: vec![],
                    ttl_seconds: 3601,
                },
                &a.cred,
            ))
            .await
            .map(drop),
        ),
        (
            "scopes",
            id.issue_device_token(req(
                pb::IssueDeviceTokenRequest {
                    account_id: d.account.clone(),
                    device_id: d.device.clone(),
                    scopes: vec!["admin".into()],
                    ttl_seconds: 0,
                },
                &a.cred,
            ))
            .await
            .map(drop),
        ),
        (
            "page_size",
            id.list_devices(req(
                pb::ListDevicesRequest { account_id: d.account.clone(), page_size: 1001, page_token: String::new() },
                &a.cred,
            ))
            .await
            .map(drop),
        ),
        (
            "page_token",
            id.list_devices(req(
                pb::ListDevicesRequest { account_id: d.account.clone(), page_size: 0, page_token: "%%%".into() },
                &a.cred,
            ))
            .await
            .map(drop),
        ),
        (
            "peer",
            id.add_contact(req(pb::AddContactRequest { account_id: String::new(), peer: None }, &d.token))
                .await
                .map(drop),
        ),
        (
            "allowed_tenant_ids",
            id.create_interop_handle(req(
                pb::CreateInteropHandleRequest {
                    request_id: "h".into(),
                    account_id: String::new(),
                    allowed_tenant_ids: (0..17).map(|_| spine_runtime::ids::TenantId::generate().to_string()).collect(),
                },
                &d.token,
            ))
            .await
            .map(drop),
        ),
        (
            "handle",
            id.resolve_interop_handle(req(pb::ResolveInteropHandleRequest { handle: "x".into() }, &d.token))
                .await
                .map(drop),
        ),
    ];
    for (field, r) in cases {
        let s = r.expect_err(field);
        assert_eq!(s.code(), Code::InvalidArgument, "{field}: {}", s.message());
        assert!(s.message().starts_with(field), "{field}: {}", s.message());
    }
    // A handle naming one good tenant and one bad one: nothing written.
    let b = env.tenant("b").await;
    let before_handle = snapshot(&env).await;
    let s = id
        .create_interop_handle(req(
            pb::CreateInteropHandleRequest {
                request_id: "h".into(),
                account_id: String::new(),
                allowed_tenant_ids: vec![b.id.clone(), "tn_bad".into()],
            },
            &d.token,
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert_eq!(snapshot(&env).await, before_handle);
    // An idempotency key reused for another request is refused.
    id.create_account(req(pb::CreateAccountRequest { request_id: "same".into() }, &a.cred)).await.unwrap();
    let s = admin
        .create_tenant(req(
            pb::CreateTenantRequest { request_id: "t-a".into(), display_name: "different".into() },
            &env.operator,
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition);
    let mut after = snapshot(&env).await;
    after.retain(|k, _| before.contains_key(k));
    assert_eq!(after, before, "bad input changed existing data");
    // Device limit: RESOURCE_EXHAUSTED once the account has the most devices.
    for _ in 1..spine_identity::MAX_DEVICES {
        env.device_of(&a, &d.account).await;
    }
    let s = id
        .register_device(req(
            pb::RegisterDeviceRequest {
                request_id: "one-more".into(),
                account_id: d.account.clone(),
                signature_scheme: 1,
                signature_public_key: d.key.verifying_key().to_bytes().to_vec(),
            },
            &a.cred,
        ))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted);
    let _ = assert_code::<()>;
}
