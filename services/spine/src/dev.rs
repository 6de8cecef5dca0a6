//! `spine dev`: every service in one process on the embedded store, with a
//! demo operator credential written to a file, ready in about a second.

use std::path::{Path, PathBuf};

use anyhow::Context;
use spine_runtime::Config;
use spine_runtime::config::Backend;

/// Config for `spine dev`: loopback, embedded store, quick drain.
pub fn config(listen: std::net::SocketAddr, data_dir: Option<PathBuf>) -> Config {
    let mut c = Config { listen, ..Config::default() };
    c.store.backend = Backend::Embedded;
    c.store.data_dir = data_dir;
    c.auth.key_activation_delay_secs = 0;
    // A development store on this machine only: keys may be stored plain.
    c.auth.allow_plain_keys = true;
    c.drain.grace_secs = 2;
    c.web.allowed_origins = DEMO_ORIGINS.iter().map(|o| (*o).to_string()).collect();
    c
}

/// The origins of the demo's three product pages (`scripts/demo` at its
/// default ports), the only web pages `spine dev` lets call by default.
pub const DEMO_ORIGINS: [&str; 3] = ["http://127.0.0.1:7411", "http://127.0.0.1:7412", "http://127.0.0.1:7413"];

/// Writes the operator credential to `dir/operator-token`, readable by the
/// owner only.
pub fn write_token(dir: &Path, token: &str) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("operator-token");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)?;
    writeln!(f, "{token}")?;
    Ok(path)
}

/// What `spine dev` prints once it is ready.
pub fn banner(addr: std::net::SocketAddr, token_path: &Path, web_origins: &[String]) -> String {
    format!(
        "\nSpine dev is ready on http://{addr} (services: {services}; embedded store)\n\
         Operator credential: {token} (send as `authorization: Bearer <contents>`)\n\n\
         Try it, in another terminal:\n  \
         cargo run -p spine -- admin --endpoint http://{addr} tenant create demo\n  \
         cargo run -p spine -- admin --endpoint http://{addr} tenant list\n\n\
         gRPC-Web (browsers) from: {origins}\n\
         Health: grpc.health.v1 service `readiness`; reflection is on. Ctrl-C to stop.\n",
        origins = if web_origins.is_empty() { "no web origin".to_string() } else { web_origins.join(", ") },
        services = crate::node::SERVICES.join(", "),
        token = token_path.display(),
    )
}

/// A media node for `spine dev --media`: a Janus started here with a
/// generated configuration (free HTTP port, 100 RTP ports), registered by
/// an agent running in this process with a media-node credential it was
/// issued at start. Dropping it kills Janus and stops the agent.
pub struct DevMedia {
    janus: spine_janus::config::JanusProcess,
    agent: tokio::task::JoinHandle<()>,
}

impl DevMedia {
    /// Janus's HTTP API.
    pub fn url(&self) -> &str {
        &self.janus.url
    }
}

impl Drop for DevMedia {
    fn drop(&mut self) {
        self.agent.abort();
    }
}

/// Starts Janus and its agent beside `spine dev` at `addr` (the operator
/// credential `operator` issues the node's credential).
pub async fn start_media(addr: std::net::SocketAddr, operator: &str, state_dir: &Path) -> anyhow::Result<DevMedia> {
    use spine_proto::calls::v1 as pb;
    use spine_proto::calls::v1::media_nodes_client::MediaNodesClient;
    let dir = state_dir.join("janus");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let rtp_min = 40_000 + (rand::random::<u16>() % 200) * 100;
    let admin_key = format!("dev-{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>());
    let janus = spine_janus::config::spawn(&dir, port, rtp_min, rtp_min + 99, &admin_key)
        .await
        .context("starting janus (Debian: apt-get install janus; or run spine dev without --media)")?;
    let url = janus.url.clone();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
    let mut issue = tonic::Request::new(pb::IssueMediaNodeCredentialRequest {
        request_id: format!("dev-media-{}", rand::random::<u64>()),
        node_id: "dev-media".into(),
        label: "spine dev".into(),
    });
    issue.metadata_mut().insert("authorization", format!("Bearer {operator}").parse()?);
    let credential =
        MediaNodesClient::new(channel.clone()).issue_media_node_credential(issue).await?.into_inner().secret;
    let config = spine_janus::AgentConfig {
        node_id: "dev-media".into(),
        credential,
        janus: url.clone(),
        public_address: url.clone(),
        region: "default".into(),
        capacity: 50,
        room_admin_key: admin_key,
        ttl_secs: 10,
    };
    let agent = tokio::spawn(async move {
        if let Err(e) = spine_janus::run(config, channel, std::future::pending()).await {
            tracing::warn!(error = %e, "media agent stopped");
        }
    });
    Ok(DevMedia { janus, agent })
}
