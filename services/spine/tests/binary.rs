//! The `spine` binary as operators use it: `serve` on a real etcd configured
//! by file, environment and flags; admin commands; `dev`; drain on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use spine_testing::{EtcdServer, free_port};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const BIN: &str = env!("CARGO_BIN_EXE_spine");
const KEK: &str = "c3BpbmUtdGVzdC1rZXktZW5jcnlwdGlvbi1rZXkhISE=";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn health(endpoint: &str, service: &str) -> Option<i32> {
    let ch = tonic::transport::Endpoint::from_shared(endpoint.to_string()).ok()?.connect().await.ok()?;
    let r = HealthClient::new(ch).check(HealthCheckRequest { service: service.into() }).await.ok()?;
    Some(r.into_inner().status)
}

async fn wait_ready(endpoint: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if health(endpoint, "readiness").await == Some(ServingStatus::Serving as i32) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{endpoint} not ready");
}

fn admin(endpoint: &str, token: &str, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(["admin", "--endpoint", endpoint])
        .args(args)
        .env("SPINE_OPERATOR_TOKEN", token)
        .output()
        .expect("run spine admin");
    assert!(out.status.success(), "spine admin {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn serve_on_etcd_with_layered_config_admin_and_drain() {
    let etcd = EtcdServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    // File says embedded on a wrong port; environment says etcd; flags give
    // the port: each layer overrides the one before.
    let file = dir.path().join("spine.toml");
    std::fs::write(
        &file,
        format!(
            "listen = \"127.0.0.1:1\"\nservices = [\"identity\"]\n[store]\nbackend = \"embedded\"\n[drain]\nready_delay_ms = 1500\ngrace_secs = 5\n[auth]\nkey_encryption_key = \"{KEK}\"\n"
        ),
    )
    .unwrap();

    // Bootstrap an operator straight into etcd.
    let out = Command::new(BIN)
        .args(["admin", "operator", "create", "--label", "ops", "--store", "etcd", "--etcd", etcd.endpoint()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().rsplit(' ').next().unwrap().trim().to_string();
    assert!(token.starts_with("op_"));

    let child = Command::new(BIN)
        .args(["serve", "--config", file.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")])
        .env("SPINE_STORE__BACKEND", "etcd")
        .env("SPINE_STORE__ETCD_ENDPOINTS", format!("[{}]", etcd.endpoint()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut proc = Proc(child);
    wait_ready(&endpoint).await;
    assert_eq!(health(&endpoint, "liveness").await, Some(ServingStatus::Serving as i32));
    assert_eq!(health(&endpoint, "spine.identity.v1.Identity").await, Some(ServingStatus::Serving as i32));

    let created = admin(&endpoint, &token, &["tenant", "create", "messenger"]);
    let tenant = created.lines().find_map(|l| l.strip_prefix("tenant_id: ")).unwrap().to_string();
    assert!(created.contains("credential: tc_"));
    let listed = admin(&endpoint, &token, &["tenant", "list"]);
    assert!(listed.contains(&tenant) && listed.contains("messenger"));
    // Operators do not issue a tenant's credentials (the tenant does); in
    // an emergency they revoke one, and a tenant left with none gets a new
    // one written straight into the store. Both land in its audit log.
    let cred_id = created.lines().find_map(|l| l.strip_prefix("credential_id: ")).unwrap().to_string();
    assert!(admin(&endpoint, &token, &["credential", "list", &tenant]).contains(&cred_id));
    admin(&endpoint, &token, &["credential", "revoke", &tenant, &cred_id]);
    assert!(!admin(&endpoint, &token, &["credential", "list", &tenant]).contains(&cred_id));
    let out = Command::new(BIN)
        .args(["admin", "credential", "recover", &tenant, "--store", "etcd", "--etcd", etcd.endpoint()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let recovered = String::from_utf8(out.stdout).unwrap();
    let recovered_id =
        recovered.lines().find_map(|l| l.strip_prefix("credential: ")).unwrap().split('.').next().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !admin(&endpoint, &token, &["credential", "list", &tenant]).contains(recovered_id) {
        assert!(Instant::now() < deadline, "the recovered credential never showed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Operator credentials: list and revoke, straight on the store.
    let op = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(["admin", "operator"])
            .args(args)
            .args(["--store", "etcd", "--etcd", etcd.endpoint()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let second = op(&["create", "--label", "second"]).rsplit(' ').next().unwrap().trim().to_string();
    let listed = op(&["list"]);
    assert!(listed.contains("\tops\n") && listed.contains("\tsecond\n"), "{listed}");
    assert!(!listed.contains(second.split('.').nth(1).unwrap()), "a secret was listed");
    op(&["revoke", second.split('.').next().unwrap()]);
    // The serving node learns it from etcd's watch (milliseconds).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new(BIN)
            .args(["admin", "--endpoint", &endpoint, "tenant", "list"])
            .env("SPINE_OPERATOR_TOKEN", &second)
            .output()
            .unwrap();
        if !out.status.success() {
            assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"));
            break;
        }
        assert!(Instant::now() < deadline, "a revoked operator credential still works");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The data is in etcd, not in an embedded store.
    let store = etcd.store().await;
    assert!(store.get(&format!("/spine/sys/tenants/{tenant}")).await.unwrap().is_some());

    // SIGTERM: not ready at once, still answering during the ready delay,
    // then a clean exit within the grace period.
    let pid = proc.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut saw_not_serving = false;
    while Instant::now() < deadline {
        if health(&endpoint, "readiness").await == Some(ServingStatus::NotServing as i32) {
            saw_not_serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_not_serving, "readiness never went NOT_SERVING while draining");
    assert_eq!(health(&endpoint, "liveness").await, Some(ServingStatus::Serving as i32));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = proc.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "did not exit after drain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success());
    let mut log = String::new();
    std::io::Read::read_to_string(proc.0.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(log.contains("draining") && log.contains("drained"), "{log}");
}

/// A production node stores private keys sealed: without a key-encryption
/// key (and without saying plain storage is wanted) or with a malformed
/// one, `spine serve` refuses to start, with an error naming the setting.
#[tokio::test]
async fn serve_refuses_to_start_without_a_usable_key_encryption_key() {
    let etcd = EtcdServer::start().await;
    for (kek, expect) in [(None, "allow_plain_keys"), (Some("bm90IDMyIGJ5dGVz"), "key_encryption_key")] {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--store", "etcd", "--etcd", etcd.endpoint(), "--listen", "127.0.0.1:0"])
            .args(["--services", "identity"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(k) = kek {
            cmd.env("SPINE_AUTH__KEY_ENCRYPTION_KEY", k);
        }
        let mut proc = Proc(cmd.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = proc.0.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "serve started without a usable key-encryption key");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(!status.success());
        let mut log = String::new();
        std::io::Read::read_to_string(proc.0.stderr.as_mut().unwrap(), &mut log).unwrap();
        assert!(log.contains(expect) && !log.contains("panicked"), "{log}");
    }
}

#[tokio::test]
async fn dev_prints_where_to_start_and_writes_a_private_token() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let data = dir.path().join("data");
    let child = Command::new(BIN)
        .args(["dev", "--listen", &format!("127.0.0.1:{port}"), "--state-dir"])
        .arg(dir.path())
        .arg("--data-dir")
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut proc = Proc(child);
    let started = Instant::now();
    let mut banner = String::new();
    let mut lines = BufReader::new(proc.0.stdout.take().unwrap()).lines();
    while let Some(Ok(l)) = lines.next() {
        banner.push_str(&l);
        banner.push('\n');
        if l.contains("Ctrl-C") {
            break;
        }
    }
    let ready_in = started.elapsed();
    assert!(banner.contains(&format!("http://127.0.0.1:{port}")), "{banner}");
    assert!(banner.contains("tenant create"), "{banner}");
    let token_path = dir.path().join("operator-token");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&token_path).unwrap().permissions().mode() & 0o777, 0o600);
    let token = std::fs::read_to_string(&token_path).unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    assert!(admin(&endpoint, token.trim(), &["tenant", "list"]).contains("no tenants"));
    // The embedded store's files are the owner's alone.
    assert_eq!(std::fs::metadata(&data).unwrap().permissions().mode() & 0o777, 0o700);
    assert_eq!(std::fs::metadata(data.join("store.log")).unwrap().permissions().mode() & 0o777, 0o600);
    eprintln!("spine dev was ready in {ready_in:?}");
}
