//! Spine's test support, for the tests of every crate in the workspace:
//! - real etcd servers and clusters on free loopback ports (plain or TLS),
//!   started per test and stopped when dropped ([`EtcdServer`],
//!   [`EtcdCluster`]);
//! - a node's services on a free port ([`TestServer`]), and the identity
//!   harness most tests start from ([`Env`]: an operator credential and
//!   helpers that make tenants, accounts and devices through the public API);
//! - a real Janus (the SFU) on loopback ([`JanusServer`]);
//! - what privacy tests need: log capture, store dumps and the readings of
//!   stored values a secret could hide in.
//!
//! It is a dev-dependency only; nothing here ships in the binary.

mod env;
pub use env::*;
mod tap;
pub use tap::StoreTap;
pub mod counts;
mod janus;
pub use janus::JanusServer;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use spine_runtime::store::{EtcdStore, Store};

/// A free TCP port on 127.0.0.1 (bound then released), chosen at random
/// below Linux's ephemeral range: the kernel's own choices for port 0 come
/// in sequence, so tests in parallel processes would often get the same one
/// (or one an outgoing connection is about to take) between release and use.
pub fn free_port() -> u16 {
    use rand::Rng;
    for _ in 0..1000 {
        let port = rand::thread_rng().gen_range(20_000..32_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind an ephemeral port")
}

/// A running single-member etcd with a temporary data directory.
#[derive(Debug)]
pub struct EtcdServer {
    cluster: EtcdCluster,
}

impl EtcdServer {
    /// Starts `etcd` (from `$ETCD_BIN` or `PATH`) and waits until it answers.
    pub async fn start() -> Self {
        Self { cluster: EtcdCluster::start(1).await }
    }

    /// The client URL.
    pub fn endpoint(&self) -> &str {
        &self.cluster.members[0].client_url
    }

    /// A new client connection.
    pub async fn store(&self) -> Arc<dyn Store> {
        self.cluster.store().await
    }

    /// The etcd process's id (for benchmarks reading its memory).
    pub fn pid(&self) -> Option<u32> {
        self.cluster.members[0].child.as_ref().map(Child::id)
    }
}

/// TLS material for an etcd cluster with client-certificate auth, made by
/// a throwaway CA: the members' certificate (for 127.0.0.1 and localhost),
/// and a client certificate a node presents.
#[derive(Debug, Clone)]
pub struct EtcdTlsFiles {
    pub ca: std::path::PathBuf,
    pub server_cert: std::path::PathBuf,
    pub server_key: std::path::PathBuf,
    pub client_cert: std::path::PathBuf,
    pub client_key: std::path::PathBuf,
}

impl EtcdTlsFiles {
    /// Writes a CA, a server and a client certificate into `dir`.
    pub fn generate(dir: &std::path::Path) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).expect("CA certificate");
        let issue = |names: Vec<String>, usage: Vec<ExtendedKeyUsagePurpose>| {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(names).expect("params");
            params.extended_key_usages = usage;
            let cert = params.signed_by(&key, &ca, &ca_key).expect("certificate");
            (cert.pem(), key.serialize_pem())
        };
        // etcd's peer listener also presents this certificate, as server
        // and as client.
        let (server_cert, server_key) = issue(
            vec!["127.0.0.1".into(), "localhost".into()],
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        );
        let (client_cert, client_key) = issue(vec!["spine-node".into()], vec![ExtendedKeyUsagePurpose::ClientAuth]);
        let files = Self {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        };
        for (path, pem) in [
            (&files.ca, ca.pem()),
            (&files.server_cert, server_cert),
            (&files.server_key, server_key),
            (&files.client_cert, client_cert),
            (&files.client_key, client_key),
        ] {
            std::fs::write(path, pem).expect("write TLS material");
        }
        files
    }

    /// What a node needs to reach the cluster.
    pub fn client(&self) -> spine_runtime::store::EtcdTls {
        let read = |p: &std::path::Path| std::fs::read(p).expect("read TLS material");
        spine_runtime::store::EtcdTls {
            ca_pem: read(&self.ca),
            client_cert_pem: Some(read(&self.client_cert)),
            client_key_pem: Some(read(&self.client_key)),
            domain_name: None,
        }
    }
}

#[derive(Debug)]
struct EtcdMember {
    name: String,
    client_url: String,
    peer_url: String,
    data_dir: std::path::PathBuf,
    child: Option<Child>,
}

/// A running etcd cluster of one or more members on loopback, each with its
/// own data directory, stopped when dropped. Members can be killed and
/// restarted, to test what a node sees when one goes away.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<EtcdMember>,
    tls: Option<EtcdTlsFiles>,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `n` members (from `$ETCD_BIN` or `PATH`) and waits until the
    /// cluster has a leader.
    pub async fn start(n: usize) -> Self {
        Self::start_with(n, false).await
    }

    /// As [`EtcdCluster::start`], with TLS and client-certificate auth on
    /// the client and peer listeners (see [`EtcdCluster::tls`]).
    pub async fn start_tls(n: usize) -> Self {
        Self::start_with(n, true).await
    }

    async fn start_with(n: usize, tls: bool) -> Self {
        // Free ports can collide with another test's choice between release
        // and bind; start again on fresh ports if a member exits at once.
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("temp dir");
            let tls = tls.then(|| EtcdTlsFiles::generate(dir.path()));
            let scheme = if tls.is_some() { "https" } else { "http" };
            let members: Vec<EtcdMember> = (0..n)
                .map(|i| EtcdMember {
                    name: format!("m{i}"),
                    client_url: format!("{scheme}://127.0.0.1:{}", free_port()),
                    peer_url: format!("{scheme}://127.0.0.1:{}", free_port()),
                    data_dir: dir.path().join(format!("m{i}")),
                    child: None,
                })
                .collect();
            let mut cluster = Self { members, tls, _dir: dir };
            for i in 0..n {
                cluster.spawn(i, "new");
            }
            if cluster.wait_ready().await {
                return cluster;
            }
        }
        panic!("etcd did not start");
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let bin = std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let initial: Vec<String> = self.members.iter().map(|m| format!("{}={}", m.name, m.peer_url)).collect();
        let m = &self.members[i];
        let mut cmd = Command::new(&bin);
        cmd.arg(format!("--name={}", m.name))
            .arg(format!("--data-dir={}", m.data_dir.display()))
            .arg(format!("--listen-client-urls={}", m.client_url))
            .arg(format!("--advertise-client-urls={}", m.client_url))
            .arg(format!("--listen-peer-urls={}", m.peer_url))
            .arg(format!("--initial-advertise-peer-urls={}", m.peer_url))
            .arg(format!("--initial-cluster={}", initial.join(",")))
            .arg(format!("--initial-cluster-state={state}"))
            .arg("--initial-cluster-token=spine-test")
            .arg("--log-level=error")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cert-file={}", t.server_cert.display()))
                .arg(format!("--key-file={}", t.server_key.display()))
                .arg(format!("--trusted-ca-file={}", t.ca.display()))
                .arg("--client-cert-auth")
                .arg(format!("--peer-cert-file={}", t.server_cert.display()))
                .arg(format!("--peer-key-file={}", t.server_key.display()))
                .arg(format!("--peer-trusted-ca-file={}", t.ca.display()))
                .arg("--peer-client-cert-auth");
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin} (install etcd-server, or run scripts/test): {e}"));
        self.members[i].child = Some(child);
    }

    /// Polls until the cluster serves requests; false if a member died.
    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            for m in &mut self.members {
                if let Some(c) = &mut m.child
                    && let Ok(Some(_)) = c.try_wait()
                {
                    return false;
                }
            }
            if self.leader().await.is_some() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("etcd cluster {:?} not ready after 30 s", self.endpoints());
    }

    /// The members' client URLs.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// The TLS material, for a cluster started with [`EtcdCluster::start_tls`].
    pub fn tls(&self) -> Option<&EtcdTlsFiles> {
        self.tls.as_ref()
    }

    /// Options reaching every member (with TLS if the cluster has it).
    pub fn options(&self) -> spine_runtime::store::EtcdOptions {
        let mut o = spine_runtime::store::EtcdOptions::new(&self.endpoints(), Duration::from_secs(5));
        o.tls = self.tls.as_ref().map(EtcdTlsFiles::client);
        o
    }

    /// A new client connection to every member.
    pub async fn store(&self) -> Arc<dyn Store> {
        Arc::new(EtcdStore::open(self.options()).await.expect("connect to test etcd"))
    }

    /// A raw etcd-client connection to member `i` alone.
    async fn member_client(&self, i: usize) -> Option<etcd_client::Client> {
        let mut o = etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_millis(300));
        if let Some(t) = &self.tls {
            let c = t.client();
            o = o.with_tls(
                etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(c.ca_pem)).identity(
                    etcd_client::Identity::from_pem(
                        c.client_cert_pem.expect("client certificate"),
                        c.client_key_pem.expect("client key"),
                    ),
                ),
            );
        }
        etcd_client::Client::connect([self.members[i].client_url.as_str()], Some(o)).await.ok()
    }

    /// The index of the member that leads now, if one does.
    pub async fn leader(&self) -> Option<usize> {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                continue;
            }
            let Some(mut c) = self.member_client(i).await else { continue };
            let Ok(Ok(status)) = tokio::time::timeout(Duration::from_millis(500), c.status()).await else { continue };
            if status.leader() == 0 {
                continue;
            }
            // Member ids are only known to the cluster: find the leader's
            // client URL in the member list.
            let Ok(Ok(list)) = tokio::time::timeout(Duration::from_millis(500), c.member_list()).await else {
                continue;
            };
            let url = list
                .members()
                .iter()
                .find(|m| m.id() == status.leader())
                .and_then(|m| m.client_urls().first().cloned())?;
            return self.members.iter().position(|m| m.client_url == url);
        }
        None
    }

    /// Kills member `i` at once (SIGKILL), as a crash would.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes member `i` (SIGSTOP): it keeps its connections open but
    /// answers nothing, as a member on a machine that hangs.
    pub fn pause(&self, i: usize) {
        assert!(self.signal(i, "STOP"), "kill -STOP etcd member {i}");
    }

    /// Lets a paused member run again (SIGCONT).
    pub fn resume(&self, i: usize) {
        assert!(self.signal(i, "CONT"), "kill -CONT etcd member {i}");
    }

    fn signal(&self, i: usize, sig: &str) -> bool {
        let Some(child) = self.members[i].child.as_ref() else { return false };
        Command::new("kill").arg(format!("-{sig}")).arg(child.id().to_string()).status().is_ok_and(|s| s.success())
    }

    /// Starts member `i` again on its data directory, and waits until the
    /// cluster has a leader.
    pub async fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i, "existing");
        assert!(self.wait_ready().await, "etcd member {i} did not come back");
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            // A paused member must run again to die of SIGKILL's reaping.
            self.signal(i, "CONT");
            self.kill(i);
        }
    }
}

/// Polls `cond` until it holds (every 20 ms, for at most `within`).
pub async fn eventually<F, Fut>(within: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Spine gRPC server on a free loopback port, for tests.
#[derive(Debug)]
pub struct TestServer {
    pub addr: std::net::SocketAddr,
    config: spine_runtime::Config,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), spine_runtime::server::ServeError>>,
}

impl TestServer {
    /// Serves `routes` through the full runtime stack (auth, metrics,
    /// health, reflection) and returns once credentials can be verified.
    pub async fn start(
        rt: Arc<spine_runtime::Runtime>,
        routes: tonic::service::Routes,
        names: Vec<&'static str>,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        Self::start_on(listener, rt, routes, names).await
    }

    /// As [`TestServer::start`], on a listener bound beforehand (for
    /// services that must know their own address).
    pub async fn start_on(
        listener: tokio::net::TcpListener,
        rt: Arc<spine_runtime::Runtime>,
        routes: tonic::service::Routes,
        names: Vec<&'static str>,
    ) -> Self {
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(spine_runtime::server::serve(rt.clone(), routes, names, listener, async {
            let _ = rx.await;
        }));
        rt.auth.wait_synced().await;
        Self { addr, config: rt.config.clone(), stop: Some(tx), task }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A connected channel.
    /// A connected channel (over TLS, as a peer node would connect, when
    /// the server serves TLS).
    pub async fn channel(&self) -> tonic::transport::Channel {
        spine_runtime::server::peer_endpoint(&self.config, &self.addr.to_string())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to test server")
    }

    /// Drains and stops the server (as on SIGTERM).
    pub async fn stop(mut self) -> Result<(), spine_runtime::server::ServeError> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        (&mut self.task).await.expect("server task")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if self.stop.is_some() {
            self.task.abort();
        }
    }
}

/// Captures everything logged in this test binary, for privacy tests:
/// install once per binary (it sets the global subscriber).
#[derive(Clone, Default)]
pub struct LogCapture(Arc<std::sync::Mutex<Vec<u8>>>);

impl LogCapture {
    /// Installs a global subscriber with `filter` writing into the capture.
    pub fn install(filter: &str) -> Self {
        let capture = Self::default();
        let writer = capture.clone();
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(move || writer.clone()).with_ansi(false).init();
        capture
    }

    /// Everything logged so far.
    pub fn contents(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log capture lock")).into_owned()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log capture lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every key and value under `/spine/`, for tests that search the store.
pub async fn dump(store: &Arc<dyn Store>) -> Vec<spine_runtime::store::KeyValue> {
    store.range_all(spine_runtime::store::scoped::ROOT).await.expect("dump the store")
}

/// The byte strings a stored value may hide `needle` in: the value itself,
/// and every run of base64 (standard or URL-safe) in it decoded, once more
/// for base64 inside that (protobuf in base64 in JSON, and the like). A
/// secret inside base64 at an unaligned offset does not show in the raw
/// value: decoding the run does.
pub fn readings(value: &[u8]) -> Vec<Vec<u8>> {
    use base64::Engine;
    fn runs(v: &[u8]) -> Vec<&[u8]> {
        let is_b64 = |b: &u8| b.is_ascii_alphanumeric() || b"+/-_=".contains(b);
        v.split(|b| !is_b64(b)).filter(|r| r.len() >= 16).collect()
    }
    let decode = |r: &[u8]| -> Vec<Vec<u8>> {
        use base64::alphabet::{STANDARD, URL_SAFE};
        use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
        let config = GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(DecodePaddingMode::Indifferent);
        let trimmed: Vec<u8> = r.iter().copied().filter(|b| *b != b'=').collect();
        let mut out = Vec::new();
        for alphabet in [&STANDARD, &URL_SAFE] {
            let engine = GeneralPurpose::new(alphabet, config);
            // Every start offset mod 4, so a run glued to other text still
            // decodes somewhere.
            for skip in 0..4.min(trimmed.len()) {
                let mut part = &trimmed[skip..];
                if part.len() % 4 == 1 {
                    part = &part[..part.len() - 1];
                }
                if let Ok(d) = engine.decode(part) {
                    out.push(d);
                }
            }
        }
        out
    };
    let mut out = vec![value.to_vec()];
    for r in runs(value) {
        for d in decode(r) {
            for r2 in runs(&d) {
                out.extend(decode(r2));
            }
            out.push(d);
        }
    }
    out
}

/// Whether a stored key or value holds `needle`, plainly or in base64.
pub fn mentions(kv: &spine_runtime::store::KeyValue, needle: &str) -> bool {
    let n = needle.as_bytes();
    let has = |hay: &[u8]| hay.windows(n.len()).any(|w| w == n);
    has(kv.key.as_bytes()) || readings(&kv.value).iter().any(|r| has(r))
}

/// Fails the test if any stored key or value holds `needle` (named `what`
/// in the message), in any encoding [`readings`] knows.
#[track_caller]
pub fn assert_absent(dump: &[spine_runtime::store::KeyValue], needle: &str, what: &str) {
    for kv in dump {
        assert!(!mentions(kv, needle), "{what} is stored under {}", kv.key);
    }
}
