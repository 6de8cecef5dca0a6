//! The identity service end to end over gRPC, on both stores.

use prost_types::FieldMask;
use spine_proto::common::v1::{PeerRef, peer_ref, retention};
use spine_proto::identity::v1 as pb;
use spine_runtime::config::Backend;
use spine_testing::{Env, assert_code, req, start};
use tonic::Code;

macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod embedded { $( #[tokio::test] async fn $name() { super::$name(super::start(spine_runtime::config::Backend::Embedded).await).await } )* }
        mod etcd { $( #[tokio::test] async fn $name() { super::$name(super::start(spine_runtime::config::Backend::Etcd).await).await } )* }
    };
}

on_both_stores!(
    tenants_accounts_devices_and_tokens,
    settings_have_private_defaults_and_update_by_mask,
    contacts_and_blocks,
    interop_handles_resolve_only_for_named_tenants,
    data_report_and_account_deletion,
    tenant_credentials_rotate,
    signing_keys_rotate_without_downtime,
    a_leaked_signing_key_is_revoked_at_once,
);

fn local(a: &str) -> Option<PeerRef> {
    Some(PeerRef { peer: Some(peer_ref::Peer::AccountId(a.into())) })
}

async fn tenants_accounts_devices_and_tokens(env: Env) {
    let t = env.tenant("messenger").await;
    let listed =
        env.admin().list_tenants(req(pb::ListTenantsRequest::default(), &env.operator)).await.unwrap().into_inner();
    assert_eq!(listed.tenants.len(), 1);
    assert_eq!(listed.tenants[0].display_name, "messenger");

    // Idempotent account creation: same key, same answer; different request, refused.
    let mut id = env.identity();
    let a1 = id
        .create_account(req(pb::CreateAccountRequest { request_id: "acct-1".into() }, &t.cred))
        .await
        .unwrap()
        .into_inner();
    let a2 = id
        .create_account(req(pb::CreateAccountRequest { request_id: "acct-1".into() }, &t.cred))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a1, a2);

    let d = env.device_of(&t, &a1.account_id).await;
    // The device acts on its own account with its token.
    let me = id.get_account(req(pb::GetAccountRequest::default(), &d.token)).await.unwrap().into_inner();
    assert_eq!(me.account_id, a1.account_id);
    let devices = id.list_devices(req(pb::ListDevicesRequest::default(), &d.token)).await.unwrap().into_inner().devices;
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].signature_public_key, d.key.verifying_key().to_bytes().to_vec());

    // Devices cannot provision: that is the tenant server's job.
    assert_code(
        id.create_account(req(pb::CreateAccountRequest { request_id: "x".into() }, &d.token)).await,
        Code::PermissionDenied,
    );
    assert_code(
        id.issue_device_token(req(
            pb::IssueDeviceTokenRequest {
                account_id: d.account.clone(),
                device_id: d.device.clone(),
                ..Default::default()
            },
            &d.token,
        ))
        .await,
        Code::PermissionDenied,
    );
    // Operators manage tenants but cannot read accounts.
    assert_code(
        id.get_account(req(pb::GetAccountRequest { account_id: d.account.clone() }, &env.operator)).await,
        Code::PermissionDenied,
    );
    // Tenant credentials cannot administer.
    assert_code(
        env.admin().list_tenants(req(pb::ListTenantsRequest::default(), &t.cred)).await,
        Code::PermissionDenied,
    );

    // A token scoped to presence only cannot call identity.
    let narrow = id
        .issue_device_token(req(
            pb::IssueDeviceTokenRequest {
                account_id: d.account.clone(),
                device_id: d.device.clone(),
                scopes: vec!["presence".into()],
                ttl_seconds: 60,
            },
            &t.cred,
        ))
        .await
        .unwrap()
        .into_inner()
        .token;
    assert_code(id.get_account(req(pb::GetAccountRequest::default(), &narrow)).await, Code::PermissionDenied);

    // Revoking the device kills its tokens at once.
    id.revoke_device(req(
        pb::RevokeDeviceRequest { account_id: d.account.clone(), device_id: d.device.clone() },
        &t.cred,
    ))
    .await
    .unwrap();
    assert_code(id.get_account(req(pb::GetAccountRequest::default(), &d.token)).await, Code::Unauthenticated);
    assert_code(
        id.issue_device_token(req(
            pb::IssueDeviceTokenRequest {
                account_id: d.account.clone(),
                device_id: d.device.clone(),
                ..Default::default()
            },
            &t.cred,
        ))
        .await,
        Code::NotFound,
    );
    assert!(
        id.list_devices(req(pb::ListDevicesRequest { account_id: d.account.clone(), ..Default::default() }, &t.cred))
            .await
            .unwrap()
            .into_inner()
            .devices
            .is_empty()
    );
}

async fn settings_have_private_defaults_and_update_by_mask(env: Env) {
    let t = env.tenant("insta").await;
    let d = env.device(&t).await;
    let mut id = env.identity();
    let s = id.get_settings(req(pb::GetSettingsRequest::default(), &d.token)).await.unwrap().into_inner();
    assert_eq!(s.who_can_call, pb::WhoCanCall::Contacts as i32);
    assert_eq!(s.presence_visibility, pb::PresenceVisibility::Contacts as i32);
    assert_eq!(s.cross_app, pb::CrossAppReachability::Contacts as i32);
    assert!(s.video_calling_enabled && s.last_seen_reciprocal && !s.auto_answer_hint);
    assert!(!s.do_not_disturb.unwrap().enabled);

    let update = pb::PrivacySettings {
        who_can_call: pb::WhoCanCall::Nobody as i32,
        video_calling_enabled: false,
        presence_visibility: pb::PresenceVisibility::Everyone as i32, // not in the mask: ignored
        do_not_disturb: Some(pb::DoNotDisturb {
            enabled: true,
            until: Some(prost_types::Timestamp { seconds: 4_000_000_000, nanos: 0 }),
        }),
        ..Default::default()
    };
    let mask =
        FieldMask { paths: vec!["who_can_call".into(), "video_calling_enabled".into(), "do_not_disturb".into()] };
    let s = id
        .update_settings(req(
            pb::UpdateSettingsRequest {
                account_id: String::new(),
                settings: Some(update.clone()),
                update_mask: Some(mask),
            },
            &d.token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.who_can_call, pb::WhoCanCall::Nobody as i32);
    assert!(!s.video_calling_enabled);
    assert_eq!(s.presence_visibility, pb::PresenceVisibility::Contacts as i32);
    assert!(s.do_not_disturb.as_ref().unwrap().enabled);
    let again = id
        .get_settings(req(pb::GetSettingsRequest { account_id: d.account.clone() }, &t.cred))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.who_can_call, pb::WhoCanCall::Nobody as i32);
    assert!(again.updated_at.is_some());

    // Bad masks and values change nothing.
    for (mask, field) in
        [(vec!["account_id"], "update_mask"), (vec![], "update_mask"), (vec!["nonsense"], "update_mask")]
    {
        let r = id
            .update_settings(req(
                pb::UpdateSettingsRequest {
                    account_id: String::new(),
                    settings: Some(update.clone()),
                    update_mask: Some(FieldMask { paths: mask.into_iter().map(Into::into).collect() }),
                },
                &d.token,
            ))
            .await;
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}");
    }
    let bad = pb::PrivacySettings { who_can_call: 99, ..Default::default() };
    assert_code(
        id.update_settings(req(
            pb::UpdateSettingsRequest {
                account_id: String::new(),
                settings: Some(bad),
                update_mask: Some(FieldMask { paths: vec!["video_calling_enabled".into(), "who_can_call".into()] }),
            },
            &d.token,
        ))
        .await,
        Code::InvalidArgument,
    );
    let after = id.get_settings(req(pb::GetSettingsRequest::default(), &d.token)).await.unwrap().into_inner();
    assert_eq!(after, again, "a refused update must not half-apply");
}

async fn contacts_and_blocks(env: Env) {
    let t = env.tenant("wa").await;
    let alice = env.device(&t).await;
    let bob = env.account(&t).await;
    let carol = env.account(&t).await;
    let mut id = env.identity();
    for who in [&bob, &carol, &bob] {
        id.add_contact(req(pb::AddContactRequest { account_id: String::new(), peer: local(who) }, &alice.token))
            .await
            .unwrap();
    }
    let page1 = id
        .list_contacts(req(pb::ListContactsRequest { page_size: 1, ..Default::default() }, &alice.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page1.contacts.len(), 1);
    assert!(!page1.next_page_token.is_empty());
    let page2 = id
        .list_contacts(req(
            pb::ListContactsRequest { page_size: 1, page_token: page1.next_page_token, ..Default::default() },
            &alice.token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page2.contacts.len(), 1);
    assert!(page2.next_page_token.is_empty());
    assert_ne!(page1.contacts, page2.contacts);

    // Unknown accounts and oneself cannot be listed.
    let ghost = spine_runtime::ids::new(spine_runtime::ids::Kind::Account);
    assert_code(
        id.add_contact(req(pb::AddContactRequest { account_id: String::new(), peer: local(&ghost) }, &alice.token))
            .await,
        Code::NotFound,
    );
    assert_code(
        id.add_contact(req(
            pb::AddContactRequest { account_id: String::new(), peer: local(&alice.account) },
            &alice.token,
        ))
        .await,
        Code::InvalidArgument,
    );

    id.block(req(pb::BlockRequest { account_id: String::new(), peer: local(&carol) }, &alice.token)).await.unwrap();
    let blocked =
        id.list_blocks(req(pb::ListBlocksRequest::default(), &alice.token)).await.unwrap().into_inner().blocked;
    assert_eq!(blocked, vec![local(&carol).unwrap()]);
    id.unblock(req(pb::UnblockRequest { account_id: String::new(), peer: local(&carol) }, &alice.token)).await.unwrap();
    id.remove_contact(req(pb::RemoveContactRequest { account_id: String::new(), peer: local(&bob) }, &alice.token))
        .await
        .unwrap();
    assert!(
        id.list_blocks(req(pb::ListBlocksRequest::default(), &alice.token))
            .await
            .unwrap()
            .into_inner()
            .blocked
            .is_empty()
    );
    assert_eq!(
        id.list_contacts(req(pb::ListContactsRequest::default(), &alice.token)).await.unwrap().into_inner().contacts,
        vec![local(&carol).unwrap()]
    );
}

async fn interop_handles_resolve_only_for_named_tenants(env: Env) {
    let messenger = env.tenant("messenger").await;
    let insta = env.tenant("insta").await;
    let wa = env.tenant("wa").await;
    let alice = env.device(&messenger).await;
    let bob = env.device(&insta).await;
    let carl = env.device(&wa).await;
    let mut id = env.identity();
    let h = id
        .create_interop_handle(req(
            pb::CreateInteropHandleRequest {
                request_id: "h1".into(),
                account_id: String::new(),
                allowed_tenant_ids: vec![insta.id.clone()],
            },
            &alice.token,
        ))
        .await
        .unwrap()
        .into_inner();
    // Bob's app (device or server) resolves it: tenant and handle, nothing else.
    for cred in [&bob.token, &insta.cred] {
        let r = id
            .resolve_interop_handle(req(pb::ResolveInteropHandleRequest { handle: h.handle.clone() }, cred))
            .await
            .unwrap()
            .into_inner();
        let r = r.r#ref.unwrap();
        assert_eq!((r.tenant_id.as_str(), r.handle.as_str()), (messenger.id.as_str(), h.handle.as_str()));
    }
    // Not named: the same NOT_FOUND as an unknown handle.
    let unknown = spine_runtime::ids::new(spine_runtime::ids::Kind::InteropHandle);
    let e1 = id
        .resolve_interop_handle(req(pb::ResolveInteropHandleRequest { handle: h.handle.clone() }, &carl.token))
        .await
        .unwrap_err();
    let e2 = id
        .resolve_interop_handle(req(pb::ResolveInteropHandleRequest { handle: unknown }, &carl.token))
        .await
        .unwrap_err();
    assert_eq!((e1.code(), e1.message()), (e2.code(), e2.message()));
    assert_eq!(e1.code(), Code::NotFound);

    // Bob can list Alice as a contact through the reference.
    let peer = Some(PeerRef {
        peer: Some(peer_ref::Peer::Interop(spine_proto::common::v1::InteropRef {
            tenant_id: messenger.id.clone(),
            handle: h.handle.clone(),
        })),
    });
    id.add_contact(req(pb::AddContactRequest { account_id: String::new(), peer: peer.clone() }, &bob.token))
        .await
        .unwrap();
    assert_code(
        id.add_contact(req(pb::AddContactRequest { account_id: String::new(), peer: peer.clone() }, &carl.token)).await,
        Code::NotFound,
    );

    // Cross-app off: resolving stops working, identically.
    let off = pb::PrivacySettings { cross_app: pb::CrossAppReachability::Off as i32, ..Default::default() };
    id.update_settings(req(
        pb::UpdateSettingsRequest {
            account_id: String::new(),
            settings: Some(off),
            update_mask: Some(FieldMask { paths: vec!["cross_app".into()] }),
        },
        &alice.token,
    ))
    .await
    .unwrap();
    let e3 = id
        .resolve_interop_handle(req(pb::ResolveInteropHandleRequest { handle: h.handle.clone() }, &bob.token))
        .await
        .unwrap_err();
    assert_eq!((e3.code(), e3.message()), (e2.code(), e2.message()));
    let on = pb::PrivacySettings { cross_app: pb::CrossAppReachability::HandleHolders as i32, ..Default::default() };
    id.update_settings(req(
        pb::UpdateSettingsRequest {
            account_id: String::new(),
            settings: Some(on),
            update_mask: Some(FieldMask { paths: vec!["cross_app".into()] }),
        },
        &alice.token,
    ))
    .await
    .unwrap();
    id.resolve_interop_handle(req(pb::ResolveInteropHandleRequest { handle: h.handle.clone() }, &bob.token))
        .await
        .unwrap();

    // Revoked: NOT_FOUND, the same answer again.
    let handles = id
        .list_interop_handles(req(pb::ListInteropHandlesRequest::default(), &alice.token))
        .await
        .unwrap()
        .into_inner()
        .handles;
    assert_eq!(handles, vec![h.clone()]);
    id.revoke_interop_handle(req(
        pb::RevokeInteropHandleRequest { account_id: String::new(), handle: h.handle.clone() },
        &alice.token,
    ))
    .await
    .unwrap();
    let e4 = id
        .resolve_interop_handle(req(pb::ResolveInteropHandleRequest { handle: h.handle.clone() }, &bob.token))
        .await
        .unwrap_err();
    assert_eq!((e4.code(), e4.message()), (e2.code(), e2.message()));
    assert_code(
        id.revoke_interop_handle(req(
            pb::RevokeInteropHandleRequest { account_id: String::new(), handle: h.handle.clone() },
            &alice.token,
        ))
        .await,
        Code::NotFound,
    );

    // A handle cannot name the account's own tenant or an unknown one.
    for bad in [
        vec![messenger.id.clone()],
        vec![spine_runtime::ids::TenantId::generate().to_string()],
        vec![],
        vec!["tn_/../x".into()],
    ] {
        assert_code(
            id.create_interop_handle(req(
                pb::CreateInteropHandleRequest {
                    request_id: "h2".into(),
                    account_id: String::new(),
                    allowed_tenant_ids: bad,
                },
                &alice.token,
            ))
            .await,
            Code::InvalidArgument,
        );
    }
}

async fn data_report_and_account_deletion(env: Env) {
    let t = env.tenant("messenger").await;
    let other = env.tenant("insta").await;
    let d = env.device(&t).await;
    let second = env.device_of(&t, &d.account).await;
    let friend = env.account(&t).await;
    let mut id = env.identity();
    id.add_contact(req(pb::AddContactRequest { account_id: String::new(), peer: local(&friend) }, &d.token))
        .await
        .unwrap();
    let h = id
        .create_interop_handle(req(
            pb::CreateInteropHandleRequest {
                request_id: "h".into(),
                account_id: String::new(),
                allowed_tenant_ids: vec![other.id.clone()],
            },
            &d.token,
        ))
        .await
        .unwrap()
        .into_inner();

    let report = id.get_data_report(req(pb::GetDataReportRequest::default(), &d.token)).await.unwrap().into_inner();
    assert_eq!(report.account_id, d.account);
    let identity = report.sections.iter().find(|s| s.service == "identity").unwrap();
    let item = |k: &str| identity.items.iter().find(|i| i.kind == k).unwrap_or_else(|| panic!("no {k} in report"));
    assert_eq!(item("device").count, 2);
    assert!(item("device").values.iter().any(|v| v.contains(&second.device)));
    assert_eq!(item("contact").count, 1);
    assert!(item("contact").values[0].contains(&friend));
    assert_eq!(item("interop_handle").count, 1);
    assert!(matches!(
        item("account").retention.as_ref().unwrap().kind,
        Some(retention::Kind::UntilAccountDeleted(true))
    ));
    assert!(identity.items.iter().all(|i| !i.location.is_empty() && i.retention.is_some() && !i.readers.is_empty()));

    id.delete_account(req(pb::DeleteAccountRequest::default(), &d.token)).await.unwrap();
    // Every token of every device is dead; the account is gone everywhere.
    for tok in [&d.token, &second.token] {
        assert_code(id.get_account(req(pb::GetAccountRequest::default(), tok)).await, Code::Unauthenticated);
    }
    assert_code(
        id.get_account(req(pb::GetAccountRequest { account_id: d.account.clone() }, &t.cred)).await,
        Code::NotFound,
    );
    assert_code(
        id.get_data_report(req(pb::GetDataReportRequest { account_id: d.account.clone() }, &t.cred)).await,
        Code::NotFound,
    );
    assert_code(
        id.resolve_interop_handle(req(pb::ResolveInteropHandleRequest { handle: h.handle }, &other.cred)).await,
        Code::NotFound,
    );
    // Nothing about the account remains in its tenant but the tombstone,
    // which names only the id (so other services finish their deletion).
    let prefix = format!("/spine/t/{}/", t.id);
    let left: Vec<String> = env
        .rt
        .store
        .range_all(&prefix)
        .await
        .unwrap()
        .into_iter()
        .map(|kv| kv.key)
        .filter(|k| k.contains(&d.account))
        .collect();
    assert_eq!(left, vec![format!("{prefix}deleted/{}", d.account)]);
    let sys: Vec<String> = env
        .rt
        .store
        .range_all("/spine/sys/")
        .await
        .unwrap()
        .into_iter()
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
        .collect();
    assert!(sys.iter().all(|v| !v.contains(&d.account)), "control plane still names the account");
}

async fn tenant_credentials_rotate(env: Env) {
    let t = env.tenant("messenger").await;
    let mut id = env.identity();
    // The tenant issues its next credential with the one it holds.
    let new = id
        .issue_tenant_credential(req(
            pb::IssueTenantCredentialRequest {
                request_id: "rot-1".into(),
                tenant_id: String::new(),
                label: "rotation".into(),
            },
            &t.cred,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(new.secret.starts_with(&new.credential_id));
    // A retry gets the same credential, without its secret.
    let again = id
        .issue_tenant_credential(req(
            pb::IssueTenantCredentialRequest {
                request_id: "rot-1".into(),
                tenant_id: String::new(),
                label: "rotation".into(),
            },
            &t.cred,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.credential_id.as_str(), again.secret.as_str()), (new.credential_id.as_str(), ""));
    // Both work during rotation.
    env.account(&t).await;
    env.account(&spine_testing::Tenant { id: t.id.clone(), cred: new.secret.clone() }).await;
    let creds = id
        .list_tenant_credentials(req(pb::ListTenantCredentialsRequest::default(), &new.secret))
        .await
        .unwrap()
        .into_inner()
        .credentials;
    assert_eq!(creds.len(), 2);
    assert!(creds.iter().all(|c| c.secret.is_empty()), "secrets are never listed");
    let old_id = t.cred.split('.').next().unwrap().to_string();
    id.revoke_tenant_credential(req(
        pb::RevokeTenantCredentialRequest { tenant_id: String::new(), credential_id: old_id.clone() },
        &new.secret,
    ))
    .await
    .unwrap();
    assert_code(
        env.identity().create_account(req(pb::CreateAccountRequest { request_id: "z".into() }, &t.cred)).await,
        Code::Unauthenticated,
    );
    env.account(&spine_testing::Tenant { id: t.id.clone(), cred: new.secret.clone() }).await;
    // The last credential cannot be revoked by the tenant itself.
    let last = id
        .revoke_tenant_credential(req(
            pb::RevokeTenantCredentialRequest { tenant_id: String::new(), credential_id: new.credential_id.clone() },
            &new.secret,
        ))
        .await;
    assert_code(last, Code::FailedPrecondition);
    // The audit log tells the tenant who did what: the operator created the
    // tenant, the tenant issued and revoked.
    let events = id
        .list_audit_events(req(pb::ListAuditEventsRequest::default(), &new.secret))
        .await
        .unwrap()
        .into_inner()
        .events;
    let summary: Vec<(i32, &str, &str)> =
        events.iter().map(|e| (e.action, e.actor_kind.as_str(), e.credential_id.as_str())).collect();
    assert_eq!(
        summary,
        vec![
            (pb::AuditAction::TenantCreated as i32, "operator", old_id.as_str()),
            (pb::AuditAction::CredentialIssued as i32, "tenant", new.credential_id.as_str()),
            (pb::AuditAction::CredentialRevoked as i32, "tenant", old_id.as_str()),
        ]
    );
    assert_eq!(events[0].actor_id, env.operator.split('.').next().unwrap());
    assert_eq!(events[1].actor_id, old_id);
    // The stored records hold hashes, never a secret, in any encoding.
    let dump = spine_testing::dump(&env.rt.store).await;
    for secret in [&t.cred, &new.secret] {
        spine_testing::assert_absent(&dump, secret.split('.').nth(1).unwrap(), "a tenant secret");
    }
}

async fn signing_keys_rotate_without_downtime(env: Env) {
    let t = env.tenant("messenger").await;
    let before = env.device(&t).await;
    let mut admin = env.admin();
    let keys =
        admin.list_signing_keys(req(pb::ListSigningKeysRequest {}, &env.operator)).await.unwrap().into_inner().keys;
    assert_eq!(keys.len(), 1);
    let rotated =
        admin.rotate_signing_key(req(pb::RotateSigningKeyRequest {}, &env.operator)).await.unwrap().into_inner();
    assert_ne!(rotated.key_id, keys[0].key_id);
    let after = env.device(&t).await;
    let mut id = env.identity();
    // Old tokens keep working; new ones are signed by the new key.
    id.get_account(req(pb::GetAccountRequest::default(), &before.token)).await.unwrap();
    id.get_account(req(pb::GetAccountRequest::default(), &after.token)).await.unwrap();
    assert!(after.token.starts_with(&format!("sdt1.{}.", rotated.key_id)));
    let keys =
        admin.list_signing_keys(req(pb::ListSigningKeysRequest {}, &env.operator)).await.unwrap().into_inner().keys;
    assert_eq!(keys.len(), 2);
    let old = keys.iter().find(|k| k.key_id != rotated.key_id).unwrap();
    assert!(old.retires_at.is_some(), "the old key is scheduled for retirement");
    assert!(keys.iter().find(|k| k.key_id == rotated.key_id).unwrap().retires_at.is_none());
}

async fn a_leaked_signing_key_is_revoked_at_once(env: Env) {
    let t = env.tenant("messenger").await;
    let d = env.device(&t).await;
    let mut admin = env.admin();
    let keys =
        admin.list_signing_keys(req(pb::ListSigningKeysRequest {}, &env.operator)).await.unwrap().into_inner().keys;
    let leaked = keys[0].key_id.clone();
    // Rotated first (as operators do routinely): the leaked key is retiring
    // but would verify for another hour.
    admin.rotate_signing_key(req(pb::RotateSigningKeyRequest {}, &env.operator)).await.unwrap();
    env.identity().get_account(req(pb::GetAccountRequest::default(), &d.token)).await.unwrap();
    // Tenants and devices cannot revoke keys.
    assert_code(
        admin.revoke_signing_key(req(pb::RevokeSigningKeyRequest { key_id: leaked.clone() }, &t.cred)).await,
        Code::PermissionDenied,
    );
    admin.revoke_signing_key(req(pb::RevokeSigningKeyRequest { key_id: leaked.clone() }, &env.operator)).await.unwrap();
    assert_code(
        env.identity().get_account(req(pb::GetAccountRequest::default(), &d.token)).await,
        Code::Unauthenticated,
    );
    assert_code(
        admin.revoke_signing_key(req(pb::RevokeSigningKeyRequest { key_id: leaked.clone() }, &env.operator)).await,
        Code::NotFound,
    );
    // Revoking the key that signs now: a fresh one takes over at once.
    let current =
        admin.list_signing_keys(req(pb::ListSigningKeysRequest {}, &env.operator)).await.unwrap().into_inner().keys;
    let signing = current.iter().find(|k| k.retires_at.is_none()).unwrap().key_id.clone();
    let fresh = env.device(&t).await;
    admin
        .revoke_signing_key(req(pb::RevokeSigningKeyRequest { key_id: signing.clone() }, &env.operator))
        .await
        .unwrap();
    assert_code(
        env.identity().get_account(req(pb::GetAccountRequest::default(), &fresh.token)).await,
        Code::Unauthenticated,
    );
    let after = env.device(&t).await;
    env.identity().get_account(req(pb::GetAccountRequest::default(), &after.token)).await.unwrap();
    let keys =
        admin.list_signing_keys(req(pb::ListSigningKeysRequest {}, &env.operator)).await.unwrap().into_inner().keys;
    assert!(keys.iter().all(|k| k.key_id != leaked && k.key_id != signing), "{keys:?}");
}

/// A second node on the same etcd verifies tokens the first issued, and
/// learns revocations, from the store alone.
#[tokio::test]
async fn a_second_node_verifies_and_revokes_from_the_store() {
    let env = start(Backend::Etcd).await;
    let t = env.tenant("messenger").await;
    let d = env.device(&t).await;
    let store2 = env.etcd.as_ref().unwrap().store().await;
    let node2 = spine_testing::start_on(store2, None, spine_testing::test_config()).await;
    let mut id2 = node2.identity();
    id2.get_account(req(pb::GetAccountRequest::default(), &d.token)).await.unwrap();
    env.identity()
        .revoke_device(req(
            pb::RevokeDeviceRequest { account_id: d.account.clone(), device_id: d.device.clone() },
            &t.cred,
        ))
        .await
        .unwrap();
    let refused = spine_testing::eventually(std::time::Duration::from_secs(5), || {
        let mut id2 = id2.clone();
        let tok = d.token.clone();
        async move {
            id2.get_account(req(pb::GetAccountRequest::default(), &tok))
                .await
                .is_err_and(|e| e.code() == Code::Unauthenticated)
        }
    })
    .await;
    assert!(refused, "node 2 still accepts a revoked device's token");
}

/// With a key-encryption key, private signing keys are sealed in the store,
/// bound to their key: the stored value reveals nothing, and tokens work.
#[tokio::test]
async fn signing_keys_are_sealed_at_rest() {
    use base64::Engine;
    let mut config = spine_testing::test_config();
    config.auth.key_encryption_key = Some(base64::engine::general_purpose::STANDARD.encode([42u8; 32]));
    let env = spine_testing::start_with(Backend::Embedded, config).await;
    let t = env.tenant("t").await;
    let d = env.device(&t).await;
    env.identity().get_account(req(pb::GetAccountRequest::default(), &d.token)).await.unwrap();
    let stored = env.rt.store.range_all("/spine/sys/signing/").await.unwrap();
    assert_eq!(stored.len(), 1);
    let v: serde_json::Value = serde_json::from_slice(&stored[0].value).unwrap();
    let sealed = v["seed"].as_str().unwrap();
    assert!(sealed.starts_with("v1:"), "{sealed}");
    assert!(spine_runtime::sealing::Sealer::new(None).unwrap().open(&stored[0].key, sealed).is_err());
    assert!(env.rt.sealer.open(&stored[0].key, sealed).is_ok());
}
