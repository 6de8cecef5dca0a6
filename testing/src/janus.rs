//! A real Janus (the SFU, Debian's `janus`) for tests: a generated
//! configuration ([`spine_janus::config`]) in a temporary directory (HTTP
//! API on a free loopback port, a small RTP port range, VideoRoom with an
//! `admin_key`, every other plugin and transport off), started per test and
//! killed when dropped. Janus never offers loopback ICE candidates, so media
//! flows over the host's own interface address; it never leaves the host.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running Janus.
#[derive(Debug)]
pub struct JanusServer {
    child: Child,
    /// The HTTP API (`http://127.0.0.1:<port>/janus`).
    pub url: String,
    /// The VideoRoom `admin_key` (rooms are created only with it).
    pub admin_key: String,
    _dir: tempfile::TempDir,
}

impl JanusServer {
    /// Starts Janus (100 RTP ports: a few dozen peer connections) and
    /// waits until its HTTP API answers.
    pub async fn start() -> Self {
        Self::start_with(100).await
    }

    /// Starts Janus with `rtp_ports` RTP ports (one per peer connection).
    pub async fn start_with(rtp_ports: u16) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = crate::free_port();
        let rtp_ports = rtp_ports.clamp(10, 10_000);
        let slots = 20_000 / rtp_ports;
        let rtp_min = 40_000 + (rand::random::<u16>() % slots) * rtp_ports;
        let admin_key = format!("room-admin-{:016x}", rand::random::<u64>());
        for (name, text) in spine_janus::config::janus_config(port, rtp_min, rtp_min + rtp_ports - 1, &admin_key) {
            std::fs::write(dir.path().join(name), text).expect("write janus config");
        }
        let child = Command::new(std::env::var("JANUS_BIN").unwrap_or_else(|_| "janus".into()))
            .arg("--config")
            .arg(dir.path().join("janus.jcfg"))
            .arg("--configs-folder")
            .arg(dir.path())
            .arg("--disable-colors")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("janus is installed (scripts/setup installs it)");
        let url = format!("http://127.0.0.1:{port}/janus");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "janus did not start on port {port}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self { child, url, admin_key, _dir: dir }
    }

    /// Kills it now (as a crash would).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for JanusServer {
    fn drop(&mut self) {
        self.kill();
    }
}
