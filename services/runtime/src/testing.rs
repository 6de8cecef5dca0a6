//! Test support: a real etcd server on free loopback ports, started per test
//! and stopped when dropped.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::store::{EtcdStore, Store};

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

/// A running etcd with a temporary data directory.
#[derive(Debug)]
pub struct EtcdServer {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts `etcd` (from `$ETCD_BIN` or `PATH`) and waits until it answers.
    pub async fn start() -> Self {
        let bin = std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        // Two free ports can collide with another test's choice between
        // release and bind; retry with fresh ports if etcd exits at once.
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("temp dir");
            let (client, peer) = (free_port(), free_port());
            let endpoint = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let child = Command::new(&bin)
                .arg("--name=spine-test")
                .arg(format!("--data-dir={}", dir.path().display()))
                .arg(format!("--listen-client-urls={endpoint}"))
                .arg(format!("--advertise-client-urls={endpoint}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster=spine-test={peer_url}"))
                .arg("--log-level=error")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {bin} (install etcd-server, or run scripts/test): {e}"));
            let mut server = EtcdServer { child, endpoint, _dir: dir };
            if server.wait_ready().await {
                return server;
            }
        }
        panic!("etcd did not start");
    }

    /// Polls until etcd serves requests; false if the process died.
    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok(store) =
                EtcdStore::connect(std::slice::from_ref(&self.endpoint), Duration::from_millis(500)).await
                && store.revision().await.is_ok()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("etcd at {} not ready after 30 s", self.endpoint);
    }

    /// The client URL.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A new client connection.
    pub async fn store(&self) -> Arc<dyn Store> {
        Arc::new(
            EtcdStore::connect(std::slice::from_ref(&self.endpoint), Duration::from_secs(5))
                .await
                .expect("connect to test etcd"),
        )
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `cond` until it holds (every 20 ms, for at most `within`).
pub async fn eventually<F, Fut>(within: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
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
    config: crate::Config,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), crate::server::ServeError>>,
}

impl TestServer {
    /// Serves `routes` through the full runtime stack (auth, metrics,
    /// health, reflection) and returns once credentials can be verified.
    pub async fn start(rt: Arc<crate::Runtime>, routes: tonic::service::Routes, names: Vec<&'static str>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        Self::start_on(listener, rt, routes, names).await
    }

    /// As [`TestServer::start`], on a listener bound beforehand (for
    /// services that must know their own address).
    pub async fn start_on(
        listener: tokio::net::TcpListener,
        rt: Arc<crate::Runtime>,
        routes: tonic::service::Routes,
        names: Vec<&'static str>,
    ) -> Self {
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(crate::server::serve(rt.clone(), routes, names, listener, async {
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
        crate::server::peer_endpoint(&self.config, &self.addr.to_string())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to test server")
    }

    /// Drains and stops the server (as on SIGTERM).
    pub async fn stop(mut self) -> Result<(), crate::server::ServeError> {
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
pub async fn dump(store: &Arc<dyn Store>) -> Vec<crate::store::KeyValue> {
    store.range_all(crate::store::scoped::ROOT).await.expect("dump the store")
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
pub fn mentions(kv: &crate::store::KeyValue, needle: &str) -> bool {
    let n = needle.as_bytes();
    let has = |hay: &[u8]| hay.windows(n.len()).any(|w| w == n);
    has(kv.key.as_bytes()) || readings(&kv.value).iter().any(|r| has(r))
}

/// Fails the test if any stored key or value holds `needle` (named `what`
/// in the message), in any encoding [`readings`] knows.
#[track_caller]
pub fn assert_absent(dump: &[crate::store::KeyValue], needle: &str, what: &str) {
    for kv in dump {
        assert!(!mentions(kv, needle), "{what} is stored under {}", kv.key);
    }
}
