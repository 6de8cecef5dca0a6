//! Support for tests that run `spine serve` processes on a real etcd.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use spine_proto::identity::v1 as ipb;
use spine_proto::identity::v1::identity_client::IdentityClient;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_spine");
/// The key-encryption key every test node is given (nodes sharing a store
/// must share it).
pub const KEK: &str = "c3BpbmUtdGVzdC1rZXktZW5jcnlwdGlvbi1rZXkhISE=";

/// A child process killed (SIGKILL) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn req<T>(m: T, cred: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut().insert("authorization", format!("Bearer {cred}").parse().unwrap());
    r
}

/// A channel to `addr` once its readiness check passes.
pub async fn connect(addr: &str) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(c) = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await {
            let mut h = tonic_health::pb::health_client::HealthClient::new(c.clone());
            if let Ok(r) = h.check(tonic_health::pb::HealthCheckRequest { service: "readiness".into() }).await
                && r.into_inner().status == 1
            {
                return c;
            }
        }
        assert!(Instant::now() < deadline, "{addr} not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `spine serve` of `services` on etcd at `addr`, with extra environment.
pub fn serve(etcd: &str, addr: &str, services: &str, env: &[(&str, &str)]) -> Proc {
    Proc(
        Command::new(BIN)
            .args(["serve", "--store", "etcd", "--etcd", etcd, "--listen", addr, "--services", services])
            .env("SPINE_AUTH__KEY_ENCRYPTION_KEY", KEK)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// An operator credential made with the admin CLI.
pub fn operator(etcd: &str) -> String {
    let out = Command::new(BIN)
        .args(["admin", "operator", "create", "--label", "t", "--store", "etcd", "--etcd", etcd])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().rsplit(' ').next().unwrap().trim().to_string()
}

/// A new account with one device: (account id, device id, device token).
pub async fn device(id: &mut IdentityClient<Channel>, cred: &str) -> (String, String, String) {
    let d = device_with_key(id, cred).await;
    (d.0, d.1, d.2)
}

/// [`device`], with the device's raw public key last.
pub async fn device_with_key(id: &mut IdentityClient<Channel>, cred: &str) -> (String, String, String, Vec<u8>) {
    let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng).verifying_key().to_bytes().to_vec();
    let (account, device, token) = device_holding(id, cred, key.clone()).await;
    (account, device, token, key)
}

/// A new tenant: (its id, its first credential). An operator credential
/// written straight into the store (`spine admin operator create`) is
/// accepted once the node's credential mirror has seen it: until then the
/// request is retried.
pub async fn tenant(ch: &Channel, operator: &str, name: &str) -> (String, String) {
    let mut admin = spine_proto::identity::v1::tenant_admin_client::TenantAdminClient::new(ch.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    let t = loop {
        let r = admin
            .create_tenant(req(
                ipb::CreateTenantRequest { request_id: name.into(), display_name: name.into() },
                operator,
            ))
            .await;
        match r {
            Err(s) if s.code() == Code::Unauthenticated && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            r => break r.unwrap().into_inner(),
        }
    };
    (t.tenant.unwrap().tenant_id, t.credential.unwrap().secret)
}

/// A new account with one device holding the raw Ed25519 public `key` (an
/// MLS client's): (account id, device id, device token).
pub async fn device_holding(id: &mut IdentityClient<Channel>, cred: &str, key: Vec<u8>) -> (String, String, String) {
    let rid = format!("r{}", rand::random::<u64>());
    let account = id
        .create_account(req(ipb::CreateAccountRequest { request_id: rid.clone() }, cred))
        .await
        .unwrap()
        .into_inner()
        .account_id;
    let device = id
        .register_device(req(
            ipb::RegisterDeviceRequest {
                request_id: rid,
                account_id: account.clone(),
                signature_scheme: 1,
                signature_public_key: key,
            },
            cred,
        ))
        .await
        .unwrap()
        .into_inner()
        .device_id;
    let token = id
        .issue_device_token(req(
            ipb::IssueDeviceTokenRequest {
                account_id: account.clone(),
                device_id: device.clone(),
                ..Default::default()
            },
            cred,
        ))
        .await
        .unwrap()
        .into_inner()
        .token;
    (account, device, token)
}

/// Raw protobuf bytes in and out, for calling any method by path.
#[derive(Default, Clone)]
pub struct Raw;

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
pub enum Role {
    Operator,
    Tenant,
    Device,
    MediaNode,
}

/// Who may call each method.
pub fn allowed(service: &str, method: &str) -> &'static [Role] {
    use Role::*;
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
        ("spine.calls.v1.MediaNodes", "RegisterMediaNode" | "DeregisterMediaNode" | "WatchRooms") => &[MediaNode],
        ("spine.calls.v1.MediaNodes", _) => &[Operator],
        (s, m) => panic!("{s}/{m} has no line in the role table: decide who may call it"),
    }
}

/// Calls `path` as `cred` with `body` (the raw request bytes; for a client
/// stream, its one message, after which it ends), or with nothing (an empty
/// request; a client stream that sends nothing and stays open): the status
/// code, OK for a stream that opened.
pub async fn call_raw(ch: &Channel, path: &str, streaming: (bool, bool), cred: &str, body: Option<Vec<u8>>) -> Code {
    let mut g = tonic::client::Grpc::new(ch.clone());
    g.ready().await.unwrap();
    let path = path.parse::<http::uri::PathAndQuery>().unwrap();
    let result = match streaming {
        (false, false) => g.unary(req(body.unwrap_or_default(), cred), path, Raw).await.map(|_| ()),
        (false, true) => g.server_streaming(req(body.unwrap_or_default(), cred), path, Raw).await.map(|_| ()),
        (true, _) => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1);
            let open = body.is_none();
            if let Some(b) = body {
                tx.send(b).await.unwrap();
            }
            let tx = open.then_some(tx);
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
            let r = g.streaming(req(stream, cred), path, Raw).await.map(|_| ());
            drop(tx);
            r
        }
    };
    match result {
        Ok(()) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// Every service in this process on an in-memory embedded store, as
/// `spine serve` assembles them: (the server, a channel to it, an operator
/// credential).
pub async fn in_process_node() -> (spine_testing::TestServer, Channel, String) {
    let store = std::sync::Arc::new(spine_runtime::store::EmbeddedStore::in_memory());
    let rt = spine_runtime::Runtime::with_store(spine_testing::test_config(), store).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (routes, names) = spine::node::assemble(&rt, addr).await.unwrap();
    let server = spine_testing::TestServer::start_on(listener, rt.clone(), routes, names).await;
    let ch = server.channel().await;
    let operator = spine_identity::bootstrap_operator(&rt, "test").await.unwrap();
    (server, ch, operator)
}
