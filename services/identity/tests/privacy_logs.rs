//! No raw account id, device id, token, secret or public key in anything
//! logged while the whole identity API is exercised, at debug level for
//! every crate and trace level for Spine's own.

use prost_types::FieldMask;
use spine_proto::common::v1::{PeerRef, peer_ref};
use spine_proto::identity::v1 as pb;
use spine_runtime::config::Backend;
use spine_testing::{req, start};

#[tokio::test]
async fn logs_carry_no_identifiers_tokens_or_secrets() {
    let capture = spine_testing::LogCapture::install(
        "debug,spine_runtime=trace,spine_identity=trace,h2=info,hyper=info,tower=info",
    );

    let env = start(Backend::Embedded).await;
    let a = env.tenant("a").await;
    let b = env.tenant("b").await;
    let d = env.device(&a).await;
    let friend = env.account(&a).await;
    let mut id = env.identity();
    let peer = Some(PeerRef { peer: Some(peer_ref::Peer::AccountId(friend.clone())) });
    id.add_contact(req(pb::AddContactRequest { account_id: String::new(), peer: peer.clone() }, &d.token))
        .await
        .unwrap();
    id.block(req(pb::BlockRequest { account_id: String::new(), peer }, &d.token)).await.unwrap();
    id.update_settings(req(
        pb::UpdateSettingsRequest {
            account_id: String::new(),
            settings: Some(pb::PrivacySettings::default()),
            update_mask: Some(FieldMask { paths: vec!["auto_answer_hint".into()] }),
        },
        &d.token,
    ))
    .await
    .unwrap();
    let h = id
        .create_interop_handle(req(
            pb::CreateInteropHandleRequest {
                request_id: "h".into(),
                account_id: String::new(),
                allowed_tenant_ids: vec![b.id.clone()],
            },
            &d.token,
        ))
        .await
        .unwrap()
        .into_inner()
        .handle;
    id.resolve_interop_handle(req(pb::ResolveInteropHandleRequest { handle: h.clone() }, &b.cred)).await.unwrap();
    id.get_data_report(req(pb::GetDataReportRequest::default(), &d.token)).await.unwrap();
    // Refused calls log too: a bad token, another tenant's account.
    let _ = id.get_account(req(pb::GetAccountRequest::default(), &format!("{}x", d.token))).await;
    let _ = id.get_account(req(pb::GetAccountRequest { account_id: d.account.clone() }, &b.cred)).await;
    id.revoke_device(req(
        pb::RevokeDeviceRequest { account_id: d.account.clone(), device_id: d.device.clone() },
        &a.cred,
    ))
    .await
    .unwrap();
    id.delete_account(req(pb::DeleteAccountRequest { account_id: d.account.clone() }, &a.cred)).await.unwrap();

    let logs = capture.contents();
    assert!(logs.contains("account deleted"), "the flow logged nothing: the test would prove nothing");
    let secret_of = |c: &str| c.split('.').nth(1).unwrap().to_string();
    let public_key =
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, d.key.verifying_key().to_bytes());
    for (what, needle) in [
        ("account id", d.account.clone()),
        ("friend account id", friend.clone()),
        ("device id", d.device.clone()),
        ("device token", d.token.clone()),
        ("token signature", d.token.rsplit('.').next().unwrap().to_string()),
        ("tenant secret", secret_of(&a.cred)),
        ("operator secret", secret_of(&env.operator)),
        ("interop handle", h.clone()),
        ("public key", public_key),
    ] {
        assert!(!logs.contains(&needle), "{what} appears in the logs");
    }
    // Hashed ids are there, so operators can still correlate.
    assert!(logs.contains(&env.rt.redact(&d.account)));
}
