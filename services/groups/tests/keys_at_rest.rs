//! Private keys at rest: the delivery service's key and the token signing
//! keys are sealed with the key-encryption key, survive its rotation
//! (sealed again under the new key by whichever node reads them), and a node
//! without a key-encryption key, or with a malformed one, refuses to start.

use std::sync::Arc;

use base64::Engine;
use spine_proto::groups::v1 as pb;
use spine_proto::groups::v1::groups_client::GroupsClient;
use spine_proto::identity::v1 as ipb;
use spine_runtime::Runtime;
use spine_runtime::sealing::Sealer;
use spine_runtime::store::{EmbeddedStore, Store};
use spine_testing::{TEST_KEK, req, start_on_with, test_config};

fn kek(byte: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode([byte; 32])
}

async fn node(store: Arc<dyn Store>, current: &str, previous: &[&str]) -> spine_testing::Env {
    let mut config = test_config();
    config.auth.key_encryption_key = Some(current.to_string());
    config.auth.previous_key_encryption_keys = previous.iter().map(|k| k.to_string()).collect();
    start_on_with(store, None, config, |rt, mut routes, _| async move {
        let names = spine_runtime::service::install::<spine_groups::Groups>(&rt, &mut routes, String::new())
            .await
            .map(|(n, ())| n)
            .expect("groups install");
        (routes, names)
    })
    .await
}

async fn sealed_values(store: &Arc<dyn Store>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let ds = store.get("/spine/sys/groups/delivery-service").await.unwrap().unwrap();
    out.push((ds.key.clone(), String::from_utf8(ds.value).unwrap()));
    for kv in store.range_all("/spine/sys/secrets/").await.unwrap() {
        out.push((kv.key.clone(), String::from_utf8(kv.value).unwrap()));
    }
    for kv in store.range_all("/spine/sys/signing/").await.unwrap() {
        let v: serde_json::Value = serde_json::from_slice(&kv.value).unwrap();
        out.push((kv.key.clone(), v["seed"].as_str().unwrap().to_string()));
    }
    out
}

async fn ds_key(env: &spine_testing::Env, token: &str) -> Vec<u8> {
    GroupsClient::new(env.channel.clone())
        .get_service_info(req(pb::GetServiceInfoRequest {}, token))
        .await
        .unwrap()
        .into_inner()
        .external_sender_signature_key
}

#[tokio::test]
async fn private_keys_are_sealed_and_survive_a_key_encryption_key_rotation() {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory());
    let first = node(store.clone(), TEST_KEK, &[]).await;
    first.rt.secrets().await.unwrap();
    let t = first.tenant("t").await;
    let d = first.device(&t).await;
    let ds_public = ds_key(&first, &d.token).await;

    let sealed = sealed_values(&store).await;
    assert_eq!(sealed.len(), 4, "the delivery service key, two deployment secrets, one signing key");
    let old = Sealer::new(Some(TEST_KEK)).unwrap();
    for (key, value) in &sealed {
        assert!(value.starts_with("v1:"), "{key} is not sealed: {value}");
        assert!(Sealer::new(None).unwrap().open(key, value).is_err());
        assert!(old.open(key, value).is_ok());
    }

    // A node with the new key first and the old one as previous reads both
    // keys and seals them again under the new one.
    let new = kek(0x5a);
    let second = node(store.clone(), &new, &[TEST_KEK]).await;
    second.rt.secrets().await.unwrap();
    let d2 = second.device(&t).await;
    assert_eq!(ds_key(&second, &d2.token).await, ds_public, "the same delivery service key");
    let resealed = sealed_values(&store).await;
    let new_sealer = Sealer::new(Some(&new)).unwrap();
    for (key, value) in &resealed {
        assert!(new_sealer.open(key, value).is_ok(), "{key} was not sealed again under the new key");
        assert!(old.open(key, value).is_err(), "{key} still opens with the retired key");
    }
    assert_eq!(
        store.range_all("/spine/sys/signing/").await.unwrap().len(),
        1,
        "the rotation kept the signing key rather than making a new one"
    );

    // The old key can go: a node with the new key alone works, and tokens
    // signed before the rotation still verify.
    let third = node(store.clone(), &new, &[]).await;
    assert_eq!(ds_key(&third, &d.token).await, ds_public);
    third.identity().get_account(req(ipb::GetAccountRequest::default(), &d.token)).await.unwrap();

    // A node with an unrelated key cannot open the sealed values (the
    // deployment secrets, the delivery service key): groups refuses to
    // start (with an error, not a panic).
    let mut config = test_config();
    config.auth.key_encryption_key = Some(kek(0x77));
    let rt = Runtime::with_store(config, store.clone()).unwrap();
    let mut routes = tonic::service::RoutesBuilder::default();
    let err = spine_runtime::service::install::<spine_groups::Groups>(&rt, &mut routes, String::new())
        .await
        .map(|(n, ())| n)
        .expect_err("must not start");
    assert!(err.to_string().contains("does not open with this key-encryption key"), "{err}");
}

#[tokio::test]
async fn a_node_without_a_usable_key_encryption_key_refuses_to_start() {
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory());
    let mut config = test_config();
    config.auth.key_encryption_key = None;
    let err = Runtime::with_store(config.clone(), store.clone()).expect_err("no key: no start");
    assert!(err.to_string().contains("allow_plain_keys"), "{err}");
    for bad in ["not base64!", "c2hvcnQ=", ""] {
        config.auth.key_encryption_key = Some(bad.into());
        let err = Runtime::with_store(config.clone(), store.clone()).expect_err("malformed key: no start");
        assert!(err.to_string().contains("key_encryption_key"), "{err}");
    }
    config.auth.key_encryption_key = Some(TEST_KEK.into());
    config.auth.previous_key_encryption_keys = vec!["nope".into()];
    assert!(Runtime::with_store(config.clone(), store.clone()).is_err());
    // Plain storage only where asked for, and then it says so in the store.
    config.auth.key_encryption_key = None;
    config.auth.previous_key_encryption_keys = vec![];
    config.auth.allow_plain_keys = true;
    let rt = Runtime::with_store(config, store.clone()).unwrap();
    assert!(!rt.sealer.is_sealing());
}
