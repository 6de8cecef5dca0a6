//! The identity harness: an identity server, plus any other
//! services a test installs, on a free loopback port over either store, with
//! an operator credential and helpers that make tenants, accounts and
//! devices through the public API.

use std::sync::Arc;

use crate::{EtcdServer, TestServer};
use ed25519_dalek::SigningKey;
use spine_proto::identity::v1 as pb;
use spine_proto::identity::v1::identity_client::IdentityClient;
use spine_proto::identity::v1::tenant_admin_client::TenantAdminClient;
use spine_runtime::Runtime;
use spine_runtime::config::{Backend, Config};
use spine_runtime::store::{EmbeddedStore, Store};
use tonic::service::RoutesBuilder;
use tonic::transport::Channel;
use tonic::{Code, Request};

pub struct Env {
    pub rt: Arc<Runtime>,
    pub server: TestServer,
    pub operator: String,
    pub channel: Channel,
    pub etcd: Option<EtcdServer>,
}

/// The key-encryption key of every test node (nodes sharing a store must
/// share it), so tests run with private keys sealed, as in production.
pub const TEST_KEK: &str = "c3BpbmUtdGVzdC1rZXktZW5jcnlwdGlvbi1rZXkhISE=";

/// A test node's config: keys sealed with [`TEST_KEK`], signing keys
/// active at once, and rate limits far above what a test's bursts of
/// calls need (the tests of the limits set their own).
pub fn test_config() -> Config {
    let mut c = Config::default();
    c.auth.key_activation_delay_secs = 0;
    c.auth.key_encryption_key = Some(TEST_KEK.into());
    // Shared by every node of a test, as a deployment's nodes share it.
    c.telemetry.id_hash_key = Some("test id hash key".into());
    // Rate limits out of the way (the services' own sections; tests of the
    // limits set theirs tight).
    let generous = serde_json::json!({
        "account": { "per_second": 100_000.0, "burst": 100_000.0 },
        "tenant": { "per_second": 1_000_000.0, "burst": 1_000_000.0 },
    });
    let huge = serde_json::json!({
        "account": { "per_second": 1e12, "burst": 1e12 },
        "tenant": { "per_second": 1e12, "burst": 1e12 },
    });
    c.sections.insert(
        "groups".into(),
        serde_json::json!({ "rates": {
            "group_messages": generous, "group_message_bytes": huge, "commits": generous,
            "key_package_uploads": generous, "key_package_claims": generous, "disputes": generous,
        }}),
    );
    c.sections.insert("calls".into(), serde_json::json!({ "rates": { "call_starts": generous, "signals": generous } }));
    c
}

pub async fn start(backend: Backend) -> Env {
    start_with(backend, test_config()).await
}

pub async fn start_with(backend: Backend, config: Config) -> Env {
    start_with_services(backend, config, |_, r, _| async move { (r, vec![]) }).await
}

/// Identity plus the services `extra` installs.
pub async fn start_with_services<F, Fut>(backend: Backend, config: Config, extra: F) -> Env
where
    F: FnOnce(Arc<Runtime>, RoutesBuilder, std::net::SocketAddr) -> Fut,
    Fut: Future<Output = (RoutesBuilder, Vec<&'static str>)>,
{
    let (store, etcd): (Arc<dyn Store>, _) = match backend {
        Backend::Embedded => (Arc::new(EmbeddedStore::in_memory()), None),
        Backend::Etcd => {
            let e = EtcdServer::start().await;
            (e.store().await, Some(e))
        }
    };
    start_on_with(store, etcd, config, extra).await
}

pub async fn start_on(store: Arc<dyn Store>, etcd: Option<EtcdServer>, config: Config) -> Env {
    start_on_with(store, etcd, config, |_, r, _| async move { (r, vec![]) }).await
}

pub async fn start_on_with<F, Fut>(store: Arc<dyn Store>, etcd: Option<EtcdServer>, config: Config, extra: F) -> Env
where
    F: FnOnce(Arc<Runtime>, RoutesBuilder, std::net::SocketAddr) -> Fut,
    Fut: Future<Output = (RoutesBuilder, Vec<&'static str>)>,
{
    let rt = Runtime::with_store(config, store).expect("test config starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let mut routes = RoutesBuilder::default();
    let (mut names, ()) =
        spine_runtime::service::install::<spine_identity::Identity>(&rt, &mut routes, addr.to_string())
            .await
            .expect("identity starts");
    let (routes, more) = extra(rt.clone(), routes, addr).await;
    names.extend(more);
    let server = TestServer::start_on(listener, rt.clone(), routes.routes(), names).await;
    let operator = spine_identity::bootstrap_operator(&rt, "test").await.unwrap();
    let channel = server.channel().await;
    Env { rt, server, operator, channel, etcd }
}

/// A request carrying `Bearer <cred>`.
pub fn req<T>(msg: T, cred: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("authorization", format!("Bearer {cred}").parse().unwrap());
    r
}

pub struct Tenant {
    pub id: String,
    pub cred: String,
}

#[derive(Clone)]
pub struct Device {
    pub tenant: String,
    pub account: String,
    pub device: String,
    pub key: SigningKey,
    pub token: String,
}

impl Env {
    pub fn admin(&self) -> TenantAdminClient<Channel> {
        TenantAdminClient::new(self.channel.clone())
    }

    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }

    pub async fn tenant(&self, name: &str) -> Tenant {
        let r = self
            .admin()
            .create_tenant(req(
                pb::CreateTenantRequest { request_id: format!("t-{name}"), display_name: name.into() },
                &self.operator,
            ))
            .await
            .unwrap()
            .into_inner();
        Tenant { id: r.tenant.unwrap().tenant_id, cred: r.credential.unwrap().secret }
    }

    pub async fn account(&self, t: &Tenant) -> String {
        let rid = spine_runtime::ids::new(spine_runtime::ids::Kind::Account);
        self.identity()
            .create_account(req(pb::CreateAccountRequest { request_id: rid }, &t.cred))
            .await
            .unwrap()
            .into_inner()
            .account_id
    }

    pub async fn device_of(&self, t: &Tenant, account: &str) -> Device {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let (device, token) = self.register(t, account, &key.verifying_key().to_bytes()).await;
        Device { tenant: t.id.clone(), account: account.into(), device, key, token }
    }

    /// Registers a device with a given signature key (an MLS client's) and
    /// issues its token: (device id, token).
    pub async fn register(&self, t: &Tenant, account: &str, public_key: &[u8]) -> (String, String) {
        let d = self
            .identity()
            .register_device(req(
                pb::RegisterDeviceRequest {
                    request_id: format!("d-{}", rand::random::<u64>()),
                    account_id: account.into(),
                    signature_scheme: pb::SignatureScheme::Ed25519 as i32,
                    signature_public_key: public_key.to_vec(),
                },
                &t.cred,
            ))
            .await
            .unwrap()
            .into_inner();
        let token = self
            .identity()
            .issue_device_token(req(
                pb::IssueDeviceTokenRequest {
                    account_id: account.into(),
                    device_id: d.device_id.clone(),
                    scopes: vec![],
                    ttl_seconds: 0,
                },
                &t.cred,
            ))
            .await
            .unwrap()
            .into_inner()
            .token;
        (d.device_id, token)
    }

    /// The device's account lists `peer` as a contact.
    pub async fn add_contact(&self, device_token: &str, peer: Option<spine_proto::common::v1::PeerRef>) {
        self.identity()
            .add_contact(req(pb::AddContactRequest { account_id: String::new(), peer }, device_token))
            .await
            .unwrap();
    }

    /// An interop handle of the device's account, open to `tenants`.
    pub async fn interop_handle(&self, device_token: &str, tenants: Vec<String>) -> String {
        self.identity()
            .create_interop_handle(req(
                pb::CreateInteropHandleRequest {
                    request_id: format!("h{}", rand::random::<u64>()),
                    account_id: String::new(),
                    allowed_tenant_ids: tenants,
                },
                device_token,
            ))
            .await
            .unwrap()
            .into_inner()
            .handle
    }

    pub async fn device(&self, t: &Tenant) -> Device {
        let a = self.account(t).await;
        self.device_of(t, &a).await
    }
}

/// Asserts a call failed with `code`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>, code: Code) {
    match r {
        Ok(v) => panic!("expected {code:?}, got Ok({v:?})"),
        Err(s) => assert_eq!(s.code(), code, "message: {}", s.message()),
    }
}
