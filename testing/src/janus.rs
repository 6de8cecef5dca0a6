//! A real Janus (the SFU, Debian's `janus`) for tests: a generated
//! configuration ([`spine_janus::config`]) in a temporary directory (HTTP
//! API on a free loopback port, a small RTP port range, VideoRoom with an
//! `admin_key`, every other plugin and transport off), started per test and
//! killed when dropped. Janus never offers loopback ICE candidates, so media
//! flows over the host's own interface address; it never leaves the host.

/// A running Janus.
#[derive(Debug)]
pub struct JanusServer {
    process: spine_janus::config::JanusProcess,
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
        let rtp_ports = rtp_ports.clamp(10, 10_000);
        let slots = 20_000 / rtp_ports;
        let rtp_min = 40_000 + (rand::random::<u16>() % slots) * rtp_ports;
        let admin_key = format!("room-admin-{:016x}", rand::random::<u64>());
        let process =
            spine_janus::config::spawn(dir.path(), crate::free_port(), rtp_min, rtp_min + rtp_ports - 1, &admin_key)
                .await
                .expect("janus starts (scripts/setup installs it)");
        Self { url: process.url.clone(), process, admin_key, _dir: dir }
    }

    /// Kills it now (as a crash would).
    pub fn kill(&mut self) {
        self.process.kill();
    }
}
