//! Least privilege: every role against every method of every service. Each
//! role (operator, tenant server, device, media node) calls every method the
//! descriptor set lists with an empty request; a method the role may not
//! call answers PERMISSION_DENIED, one it may call answers anything else
//! (usually INVALID_ARGUMENT for the empty request). A method added without
//! a line in the table (support::allowed) fails the test.

mod support;

use std::collections::BTreeMap;

use prost::Message;
use spine_proto::calls::v1 as cpb;
use spine_proto::calls::v1::media_nodes_client::MediaNodesClient;
use spine_proto::identity::v1::identity_client::IdentityClient;
use support::Role::*;
use support::{Role, allowed, call_raw as call, req};
use tonic::Code;
use tonic::transport::Channel;

#[tokio::test]
async fn every_role_against_every_method() {
    let (server, ch, operator) = support::in_process_node().await;

    // A tenant, a device of one of its accounts, a media node.
    let (_, tenant) = support::tenant(&ch, &operator, "t").await;
    let id = IdentityClient::new(ch.clone());
    // A fresh device (of a fresh account) for every call: some methods a
    // device may call delete its account or revoke it.
    let fresh_device =
        |mut id: IdentityClient<Channel>, tenant: String| async move { support::device(&mut id, &tenant).await.2 };
    let token = fresh_device(id.clone(), tenant.clone()).await;
    let media = MediaNodesClient::new(ch.clone())
        .issue_media_node_credential(req(
            cpb::IssueMediaNodeCredentialRequest { request_id: "m".into(), node_id: "sfu-1".into(), label: "".into() },
            &operator,
        ))
        .await
        .unwrap()
        .into_inner()
        .secret;
    let creds: BTreeMap<Role, String> =
        [(Operator, operator), (Tenant, tenant), (Device, token), (MediaNode, media)].into_iter().collect();

    let fds = prost_types::FileDescriptorSet::decode(spine_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut checked = 0;
    let mut wrong = Vec::new();
    for file in fds.file.iter().filter(|f| f.package().starts_with("spine.")) {
        for service in &file.service {
            let full = format!("{}.{}", file.package(), service.name());
            for m in &service.method {
                let path = format!("/{full}/{}", m.name());
                let who = allowed(&full, m.name());
                for (role, cred) in &creds {
                    let cred = match role {
                        Device => fresh_device(id.clone(), creds[&Tenant].clone()).await,
                        _ => cred.clone(),
                    };
                    let code = call(&ch, &path, (m.client_streaming(), m.server_streaming()), &cred, None).await;
                    let may = who.contains(role);
                    let ok = if may {
                        !matches!(code, Code::PermissionDenied | Code::Unauthenticated | Code::Unimplemented)
                    } else {
                        code == Code::PermissionDenied
                    };
                    if !ok {
                        wrong.push(format!("{path} as {role:?}: {code:?} (allowed: {may})"));
                    }
                    checked += 1;
                }
            }
        }
    }
    assert!(wrong.is_empty(), "roles not enforced:\n{}", wrong.join("\n"));
    assert!(checked >= 4 * 60, "only {checked} calls made");
    // A media-node credential registers its own node only.
    let mut m = MediaNodesClient::new(ch.clone());
    let register = |node_id: &str| cpb::RegisterMediaNodeRequest {
        node_id: node_id.into(),
        address: "sfu.example:443".into(),
        region: "eu".into(),
        capacity: 10,
        load: 0,
        ttl_seconds: 0,
    };
    m.register_media_node(req(register("sfu-1"), &creds[&MediaNode])).await.unwrap();
    let other = m.register_media_node(req(register("sfu-2"), &creds[&MediaNode])).await.unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied);
    let other = m
        .deregister_media_node(req(cpb::DeregisterMediaNodeRequest { node_id: "sfu-2".into() }, &creds[&MediaNode]))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied);
    // Nor may it watch another node's rooms.
    let other =
        m.watch_rooms(req(cpb::WatchRoomsRequest { node_id: "sfu-2".into() }, &creds[&MediaNode])).await.unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied);
    server.stop().await.unwrap();
}
