//! Least privilege: every role against every method of every service. Each
//! role (operator, tenant server, device, media node) calls every method the
//! descriptor set lists with an empty request; a method the role may not
//! call answers PERMISSION_DENIED, one it may call answers anything else
//! (usually INVALID_ARGUMENT for the empty request). A method added without
//! a line in the table below fails the test.

use std::collections::BTreeMap;
use std::sync::Arc;

use prost::Message;
use spine_proto::calls::v1 as cpb;
use spine_proto::calls::v1::media_nodes_client::MediaNodesClient;
use spine_proto::identity::v1 as ipb;
use spine_proto::identity::v1::identity_client::IdentityClient;
use spine_proto::identity::v1::tenant_admin_client::TenantAdminClient;
use spine_runtime::store::EmbeddedStore;
use spine_runtime::testing::TestServer;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

/// Raw protobuf bytes in and out, for calling any method by path.
#[derive(Default, Clone)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Operator,
    Tenant,
    Device,
    MediaNode,
}

use Role::*;

/// Who may call each method.
fn allowed(service: &str, method: &str) -> &'static [Role] {
    match (service, method) {
        ("spine.identity.v1.TenantAdmin", _) => &[Operator],
        (
            "spine.identity.v1.Identity",
            "CreateAccount"
            | "RegisterDevice"
            | "IssueDeviceToken"
            | "IssueTenantCredential"
            | "ListTenantCredentials"
            | "RevokeTenantCredential"
            | "ListAuditEvents"
            | "GetTenantDataReport",
        ) => &[Tenant],
        ("spine.identity.v1.Identity", _) => &[Tenant, Device],
        ("spine.groups.v1.Groups" | "spine.presence.v1.Presence" | "spine.calls.v1.Calls", _) => &[Device],
        ("spine.calls.v1.CallRecords", _) => &[Tenant],
        ("spine.calls.v1.MediaNodes", "RegisterMediaNode" | "DeregisterMediaNode") => &[MediaNode],
        ("spine.calls.v1.MediaNodes", _) => &[Operator],
        (s, m) => panic!("{s}/{m} has no line in the role table: decide who may call it"),
    }
}

fn req<T>(m: T, cred: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut().insert("authorization", format!("Bearer {cred}").parse().unwrap());
    r
}

/// Calls `path` with an empty request as `cred`: the status code (OK for a
/// stream that opened).
async fn call(ch: &Channel, path: &str, streaming: (bool, bool), cred: &str) -> Code {
    let mut g = tonic::client::Grpc::new(ch.clone());
    g.ready().await.unwrap();
    let path = path.parse::<http::uri::PathAndQuery>().unwrap();
    let result = match streaming {
        (false, false) => g.unary(req(Vec::new(), cred), path, Raw).await.map(|_| ()),
        (false, true) => g.server_streaming(req(Vec::new(), cred), path, Raw).await.map(|_| ()),
        (true, _) => {
            // A client stream that sends nothing and stays open.
            let (_tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1);
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
            let r = g.streaming(req(stream, cred), path, Raw).await.map(|_| ());
            drop(_tx);
            r
        }
    };
    match result {
        Ok(()) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test]
async fn every_role_against_every_method() {
    let store = Arc::new(EmbeddedStore::in_memory());
    let rt = spine_runtime::Runtime::with_store(spine_identity::testing::test_config(), store).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (routes, names) = spine::node::assemble(&rt, addr).await.unwrap();
    let server = TestServer::start_on(listener, rt.clone(), routes, names).await;
    let ch = server.channel().await;
    let operator = spine_identity::bootstrap_operator(&rt, "roles").await.unwrap();

    // A tenant, a device of one of its accounts, a media node.
    let created = TenantAdminClient::new(ch.clone())
        .create_tenant(req(ipb::CreateTenantRequest { request_id: "t".into(), display_name: "t".into() }, &operator))
        .await
        .unwrap()
        .into_inner();
    let tenant = created.credential.unwrap().secret;
    let id = IdentityClient::new(ch.clone());
    // A fresh device (of a fresh account) for every call: some methods a
    // device may call delete its account or revoke it.
    let fresh_device = |mut id: IdentityClient<Channel>, tenant: String| async move {
        let rid = format!("r{}", rand::random::<u64>());
        let account = id
            .create_account(req(ipb::CreateAccountRequest { request_id: rid.clone() }, &tenant))
            .await
            .unwrap()
            .into_inner()
            .account_id;
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let device = id
            .register_device(req(
                ipb::RegisterDeviceRequest {
                    request_id: rid,
                    account_id: account.clone(),
                    signature_scheme: ipb::SignatureScheme::Ed25519 as i32,
                    signature_public_key: key.verifying_key().to_bytes().to_vec(),
                },
                &tenant,
            ))
            .await
            .unwrap()
            .into_inner()
            .device_id;
        id.issue_device_token(req(
            ipb::IssueDeviceTokenRequest { account_id: account, device_id: device, ..Default::default() },
            &tenant,
        ))
        .await
        .unwrap()
        .into_inner()
        .token
    };
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
                    let code = call(&ch, &path, (m.client_streaming(), m.server_streaming()), &cred).await;
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
    server.stop().await.unwrap();
}
