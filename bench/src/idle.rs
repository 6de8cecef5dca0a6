//! What a connected idle device costs a node: one TCP connection (plain,
//! then TLS) carrying one calls signalling session (`Calls.Session`) and
//! one presence watch (`Presence.Watch`), with the server's HTTP/2
//! keepalive ping every 30 s, beside a raw tonic server holding the same
//! two streams per connection.
//!
//! The node runs in a process of its own (`spine serve` on an etcd of its
//! own; the raw server is `spine bench-raw-server`), so its resident memory
//! and CPU time are its own. Devices connect from 127.0.0.2 and up, 20,000
//! per source address, so ports do not run out. Clients are lean HTTP/2
//! connections (the `h2` crate) in this process; what they cost is not
//! measured.
//!
//! Per device: the server's resident-set growth from before the first
//! connection, divided by the devices connected; CPU: the server's CPU
//! time over an idle window, per device and second.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use prost::Message;
use spine_proto::identity::v1 as ipb;
use spine_proto::identity::v1::identity_client::IdentityClient;
use spine_proto::identity::v1::tenant_admin_client::TenantAdminClient;
use spine_proto::presence::v1 as ppb;
use spine_testing::req;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls;

use crate::{Aim, Options, Plot, Row, Section, cpu_time, rss_bytes};

/// Devices per loopback source address.
const PER_SOURCE: usize = 20_000;

/// The aim: a million idle devices in 24 GiB.
const AIM_KIB: f64 = 24.0;

/// One device's two streams; dropping it closes the connection.
struct Conn {
    _send: h2::client::SendRequest<Bytes>,
    _session_half: h2::SendStream<Bytes>,
    _session: h2::RecvStream,
    _watch: h2::RecvStream,
    _task: tokio::task::JoinHandle<()>,
}

/// Where devices connect, and how.
#[derive(Clone)]
struct Target {
    name: String,
    addr: SocketAddr,
    tls: Option<(Arc<rustls::ClientConfig>, rustls::pki_types::ServerName<'static>)>,
}

#[derive(Clone)]
pub(crate) struct Dev {
    pub(crate) token: String,
    /// The account this device's presence watch is on.
    pub(crate) watches: String,
}

fn grpc_frame(msg: &impl Message) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.encoded_len());
    b.put_u8(0);
    b.put_u32(msg.encoded_len() as u32);
    msg.encode(&mut b).expect("a buffer with room");
    b.freeze()
}

fn request(target: &Target, path: &str, token: &str) -> anyhow::Result<http::Request<()>> {
    let scheme = if target.tls.is_some() { "https" } else { "http" };
    Ok(http::Request::post(format!("{scheme}://localhost:{}{path}", target.addr.port()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {token}"))
        .body(())?)
}

/// Waits for the first message on a response body (the stream is up).
async fn first_message(r: h2::client::ResponseFuture) -> anyhow::Result<h2::RecvStream> {
    let resp = r.await?;
    anyhow::ensure!(resp.status() == 200, "HTTP {}", resp.status());
    let mut body = resp.into_body();
    let chunk = body.data().await.ok_or_else(|| anyhow::anyhow!("the stream ended before its first message"))??;
    let _ = body.flow_control().release_capacity(chunk.len());
    Ok(body)
}

async fn handshake<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: T,
) -> anyhow::Result<(h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>)> {
    let (send, conn) = h2::client::Builder::new().handshake::<_, Bytes>(io).await?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((send, task))
}

/// Connects device `i` from its source address and opens its two streams.
async fn connect(target: &Target, i: usize, dev: &Dev) -> anyhow::Result<Conn> {
    let src = Ipv4Addr::new(127, 0, 0, 2 + (i / PER_SOURCE) as u8);
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(src.into(), 0))?;
    let tcp = tokio::time::timeout(Duration::from_secs(30), sock.connect(target.addr)).await??;
    tcp.set_nodelay(true)?;
    let (send, task) = match &target.tls {
        None => handshake(tcp).await?,
        Some((cfg, name)) => {
            let tls = tokio_rustls::TlsConnector::from(cfg.clone()).connect(name.clone(), tcp).await?;
            handshake(tls).await?
        }
    };
    let mut send = send.ready().await?;
    let (session, session_half) =
        send.send_request(request(target, "/spine.calls.v1.Calls/Session", &dev.token)?, false)?;
    let mut send = send.ready().await?;
    let watch_req = ppb::WatchRequest {
        targets: vec![ppb::Target { target: Some(ppb::target::Target::AccountId(dev.watches.clone())) }],
    };
    let (watch, mut watch_body) =
        send.send_request(request(target, "/spine.presence.v1.Presence/Watch", &dev.token)?, false)?;
    watch_body.send_data(grpc_frame(&watch_req), true)?;
    let (session, watch) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::try_join!(first_message(session), first_message(watch))
    })
    .await??;
    Ok(Conn { _send: send, _session_half: session_half, _session: session, _watch: watch, _task: task })
}

/// A server process, killed when dropped.
pub(crate) struct Server {
    child: Child,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        // Stopped as an operator stops a node (SIGTERM: drain, then leave
        // the cluster), so the next node on this etcd does not find it in
        // its rings until its lease lapses; killed if it will not stop.
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = log.len().saturating_sub(3000);
        log[log.ceil_char_boundary(start)..].to_string()
    }

    pub(crate) async fn start(mut cmd: Command, addr: SocketAddr, log: PathBuf) -> anyhow::Result<Self> {
        // SPINE_* variables are config: the benchmark's own must not leak in.
        for (k, _) in std::env::vars() {
            if k.starts_with("SPINE_") {
                cmd.env_remove(k);
            }
        }
        let out = std::fs::File::create(&log)?;
        cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out).env("RUST_LOG", "info");
        let mut s = Server { child: cmd.spawn()?, log };
        let t = Instant::now();
        loop {
            if let Some(status) = s.child.try_wait()? {
                anyhow::bail!("server exited ({status}); log: {}", std::fs::read_to_string(&s.log).unwrap_or_default());
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break;
            }
            anyhow::ensure!(t.elapsed() < Duration::from_secs(60), "server not listening on {addr} after 60 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(s)
    }
}

pub(crate) fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], spine_testing::free_port()))
}

pub(crate) struct Files {
    dir: tempfile::TempDir,
    cert_der: rustls::pki_types::CertificateDer<'static>,
}

impl Files {
    pub(crate) fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])?;
        std::fs::write(dir.path().join("cert.pem"), ck.cert.pem())?;
        std::fs::write(dir.path().join("key.pem"), ck.key_pair.serialize_pem())?;
        Ok(Self { cert_der: ck.cert.der().clone(), dir })
    }
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn client_tls(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert_der.clone())?;
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// The node's config: the deployment defaults, with keys sealed, rate
/// limits out of the way of a burst of registrations, and TLS if asked;
/// then `edit`, and written to `name` in `files`.
pub(crate) fn node_config(
    files: &Files,
    etcd: &str,
    listen: SocketAddr,
    tls: bool,
    name: &str,
    edit: impl FnOnce(&mut spine_runtime::config::Config),
) -> anyhow::Result<PathBuf> {
    let mut c = spine_testing::test_config();
    c.listen = listen;
    c.store.backend = spine_runtime::config::Backend::Etcd;
    c.store.etcd_endpoints = vec![etcd.to_string()];
    c.services = vec!["identity".into(), "presence".into(), "calls".into()];
    c.auth.default_token_ttl_secs = c.auth.max_token_ttl_secs;
    if tls {
        c.tls = Some(spine_runtime::config::TlsConfig {
            cert: files.path("cert.pem"),
            key: files.path("key.pem"),
            peer_ca: Some(files.path("cert.pem")),
            peer_name: Some("localhost".into()),
        });
    }
    edit(&mut c);
    let path = files.path(name);
    std::fs::write(&path, toml::to_string(&c)?)?;
    Ok(path)
}

/// Registers `n` devices (an account each, presence visible to everyone),
/// each watching the next one's account.
pub(crate) async fn register(endpoint: &str, operator: &str, n: usize) -> anyhow::Result<Vec<Dev>> {
    let ch = tonic::transport::Endpoint::from_shared(endpoint.to_string())?.connect().await?;
    // The node answers once its signing keys are published; the request id
    // makes the retries one tenant.
    let started = Instant::now();
    let t = loop {
        let r = TenantAdminClient::new(ch.clone())
            .create_tenant(req(
                ipb::CreateTenantRequest { request_id: "bench-idle".into(), display_name: "idle".into() },
                operator,
            ))
            .await;
        match r {
            Ok(t) => break t.into_inner(),
            Err(e) if started.elapsed() < Duration::from_secs(30) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => anyhow::bail!("creating the tenant: {e}"),
        }
    };
    let cred = Arc::new(t.credential.ok_or_else(|| anyhow::anyhow!("no credential"))?.secret);
    let bar = crate::bar(n as u64, "idle: registering devices");
    let accounts_tokens: Vec<(String, String)> = futures::stream::iter(0..n)
        .map(|_| {
            let (ch, cred, bar) = (ch.clone(), cred.clone(), bar.clone());
            async move {
                let mut id = IdentityClient::new(ch.clone());
                let rid = spine_runtime::ids::new(spine_runtime::ids::Kind::Account);
                let account = id
                    .create_account(req(ipb::CreateAccountRequest { request_id: rid }, &cred))
                    .await?
                    .into_inner()
                    .account_id;
                let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
                let d = id
                    .register_device(req(
                        ipb::RegisterDeviceRequest {
                            request_id: format!("d-{}", rand::random::<u64>()),
                            account_id: account.clone(),
                            signature_scheme: ipb::SignatureScheme::Ed25519 as i32,
                            signature_public_key: key.verifying_key().to_bytes().to_vec(),
                        },
                        &cred,
                    ))
                    .await?
                    .into_inner();
                let token = id
                    .issue_device_token(req(
                        ipb::IssueDeviceTokenRequest {
                            account_id: account.clone(),
                            device_id: d.device_id,
                            scopes: vec![],
                            ttl_seconds: 0,
                        },
                        &cred,
                    ))
                    .await?
                    .into_inner()
                    .token;
                crate::everyone_sees_presence(ch.clone(), &token).await?;
                bar.inc(1);
                anyhow::Ok((account, token))
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    bar.finish_and_clear();
    Ok((0..n)
        .map(|i| Dev { token: accounts_tokens[i].1.clone(), watches: accounts_tokens[(i + 1) % n].0.clone() })
        .collect())
}

/// One step's figures.
#[derive(Debug, Clone, Copy)]
struct Step {
    devices: usize,
    kib_per_device: f64,
    /// Server CPU per device, in microseconds per second.
    cpu_us_per_device_s: f64,
}

/// Connects devices to `server` in `steps`, measuring at each.
async fn measure(
    server: &Server,
    target: &Target,
    devs: &[Dev],
    steps: &[usize],
    window: Duration,
    what: &str,
) -> anyhow::Result<Vec<Step>> {
    // Settle, then the baseline.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let base = rss_bytes(Some(server.pid()));
    let mut conns: Vec<Conn> = Vec::with_capacity(*steps.last().unwrap_or(&0));
    let mut out = vec![];
    for &n in steps {
        let bar = crate::bar((n - conns.len()) as u64, &format!("idle: {what} to {n}"));
        let from = conns.len();
        let more: Vec<anyhow::Result<Conn>> = futures::stream::iter(from..n)
            .map(|i| {
                let (t, d, bar) = (target.clone(), devs[i].clone(), bar.clone());
                async move {
                    let c = match tokio::time::timeout(Duration::from_secs(60), connect(&t, i, &d)).await {
                        Ok(c) => c.map_err(|e| anyhow::anyhow!("device {i}: {e:#}")),
                        Err(_) => Err(anyhow::anyhow!("{}: device {i}: not connected within 60 s", t.name)),
                    };
                    bar.inc(1);
                    c
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        bar.finish_and_clear();
        for c in more {
            conns.push(c.map_err(|e| anyhow::anyhow!("{e}; the server's log ends: {}", server.log_tail()))?);
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let rss = rss_bytes(Some(server.pid()));
        let cpu0 = cpu_time(Some(server.pid()));
        let t0 = Instant::now();
        {
            let _bar = crate::Timed::start(window, &format!("idle: {what}, {n} idle"));
            tokio::time::sleep(window).await;
        }
        let cpu = (cpu_time(Some(server.pid())) - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
        anyhow::ensure!(server_alive(server), "the server died; its log ends: {}", server.log_tail());
        out.push(Step {
            devices: n,
            kib_per_device: rss.saturating_sub(base) as f64 / n as f64 / 1024.0,
            cpu_us_per_device_s: cpu * 1e6 / n as f64,
        });
    }
    drop(conns);
    Ok(out)
}

fn server_alive(s: &Server) -> bool {
    Path::new(&format!("/proc/{}", s.pid())).exists()
}

/// The open-file limit of this process (soft, hard).
fn nofile() -> (u64, u64) {
    let l = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    (l.current.unwrap_or(u64::MAX), l.maximum.unwrap_or(u64::MAX))
}

pub async fn run(opts: &Options) -> anyhow::Result<Result<Section, String>> {
    let Some(exe) = opts.spine_exe.clone() else {
        return Ok(Err("needs the spine executable (run it as `spine bench`)".into()));
    };
    spine_runtime::raise_open_files_limit();
    let (soft, hard) = nofile();
    let wanted: Vec<usize> = if !opts.idle_devices.is_empty() {
        opts.idle_devices.clone()
    } else if opts.quick {
        vec![1_000, 2_000]
    } else {
        vec![10_000, 50_000, 100_000]
    };
    // Each side of a connection holds a descriptor in its own process; the
    // node's own (etcd, listeners) need a few hundred more.
    let cap = (soft.min(hard) as usize).saturating_sub(500);
    let steps: Vec<usize> = {
        let mut s: Vec<usize> = wanted.iter().map(|&n| n.min(cap)).collect();
        s.dedup();
        s
    };
    let mut s = Section::new(
        "idle",
        "A connected idle device: one connection, a calls session and a presence watch",
        "Node (`spine serve` on its own etcd) and raw tonic server each in a process of their own; \
         devices from 127.0.0.2 and up; server keepalive pings every 30 s. Per device: server resident-set \
         growth / devices; CPU: server CPU time over an idle window.",
    );
    if steps.iter().zip(&wanted).any(|(a, b)| a != b) {
        s.notes.push(format!(
            "asked for {wanted:?} devices; this machine allows {hard} open files per process (hard limit, not \
             raisable here), so the largest step is {}",
            steps.last().copied().unwrap_or(0)
        ));
    }
    let n = *steps.last().unwrap_or(&0);
    anyhow::ensure!(n > 0, "no devices to connect");
    let window = opts.idle_window.unwrap_or(if opts.quick { Duration::from_secs(5) } else { Duration::from_secs(30) });

    let files = Files::new()?;
    let etcd = spine_testing::EtcdServer::start().await;
    let store = etcd.store().await;
    let operator =
        spine_identity::bootstrap_operator_in(&spine_runtime::store::SystemStore::new(store.clone()), "bench").await?;
    let tls_client = files.client_tls()?;
    let localhost = rustls::pki_types::ServerName::try_from("localhost")?;

    let mut results: Vec<(String, Vec<Step>)> = vec![];
    let mut devs: Vec<Dev> = vec![];
    for (kind, tls) in [("spine", false), ("spine", true), ("raw tonic", false), ("raw tonic", true)] {
        let addr = free_addr();
        let log = files.path(&format!("{}-{}.log", kind.replace(' ', "-"), if tls { "tls" } else { "plain" }));
        let mut cmd = Command::new(&exe);
        if kind == "spine" {
            let name = if tls { "node-tls.toml" } else { "node.toml" };
            cmd.arg("serve").arg("--config").arg(node_config(&files, etcd.endpoint(), addr, tls, name, |_| {})?);
        } else {
            cmd.arg("bench-raw-server").arg("--listen").arg(addr.to_string());
            if tls {
                cmd.arg("--tls-cert").arg(files.path("cert.pem")).arg("--tls-key").arg(files.path("key.pem"));
            }
        }
        if kind == "spine" {
            // The node before this one must have left the cluster (its ring
            // and calls membership), or this one would forward to it.
            let t = Instant::now();
            while store.count("/spine/sys/presence/nodes/").await? + store.count("/spine/sys/calls/nodes/").await? > 0 {
                anyhow::ensure!(t.elapsed() < Duration::from_secs(90), "the last node is still registered after 90 s");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let server = Server::start(cmd, addr, log).await?;
        if kind == "spine" && devs.is_empty() {
            devs = register(&format!("http://{addr}"), &operator, n).await?;
        }
        let raw_devs: Vec<Dev>;
        let use_devs = if kind == "spine" {
            &devs
        } else {
            raw_devs = (0..n).map(|i| Dev { token: "x".into(), watches: (i % 100).to_string() }).collect();
            &raw_devs
        };
        let what = format!("{kind}, {}", if tls { "TLS" } else { "plain" });
        let target = Target { name: what.clone(), addr, tls: tls.then(|| (tls_client.clone(), localhost.clone())) };
        let steps_out = measure(&server, &target, use_devs, &steps, window, &what).await?;
        results.push((what, steps_out));
        drop(server);
    }

    let find = |name: &str| results.iter().find(|(w, _)| w == name).map(|(_, s)| s.clone()).unwrap_or_default();
    for tls in ["plain", "TLS"] {
        let raw = find(&format!("raw tonic, {tls}"));
        let spine = find(&format!("spine, {tls}"));
        for (r, sp) in raw.iter().zip(&spine) {
            let base = Row::baseline(format!("raw tonic, {tls}, {} devices", r.devices))
                .value(r.kib_per_device, "KiB/device")
                .rate(r.cpu_us_per_device_s, "µs CPU/device/s");
            let row = Row::new(format!("Spine, {tls}, {} devices", sp.devices))
                .value(sp.kib_per_device, "KiB/device")
                .rate(sp.cpu_us_per_device_s, "µs CPU/device/s")
                .against(&base, "value");
            s.rows.extend([base, row]);
        }
        if let Some(last) = spine.last() {
            s.aims.push(Aim::at_most(
                format!("KiB per idle device, Spine {tls}, {} devices / {AIM_KIB} KiB", last.devices),
                last.kib_per_device / AIM_KIB,
                1.0,
            ));
        }
    }
    s.plots.push(Plot::Lines {
        file: "idle-memory.svg".into(),
        title: "Server memory against connected idle devices".into(),
        x_label: "connected devices".into(),
        y_label: "resident memory growth (MiB)".into(),
        series: results
            .iter()
            .map(|(w, st)| {
                (
                    w.clone(),
                    st.iter().map(|x| (x.devices as f64, x.kib_per_device * x.devices as f64 / 1024.0)).collect(),
                )
            })
            .collect(),
    });
    drop(etcd);
    Ok(Ok(s))
}
