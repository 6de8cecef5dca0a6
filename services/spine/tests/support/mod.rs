//! Support for tests that run `spine serve` processes on a real etcd.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use spine_proto::identity::v1 as ipb;
use spine_proto::identity::v1::identity_client::IdentityClient;
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
    let rid = format!("r{}", rand::random::<u64>());
    let account = id
        .create_account(req(ipb::CreateAccountRequest { request_id: rid.clone() }, cred))
        .await
        .unwrap()
        .into_inner()
        .account_id;
    let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng).verifying_key().to_bytes().to_vec();
    let device = id
        .register_device(req(
            ipb::RegisterDeviceRequest {
                request_id: rid,
                account_id: account.clone(),
                signature_scheme: 1,
                signature_public_key: key.clone(),
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
    (account, device, token, key)
}
