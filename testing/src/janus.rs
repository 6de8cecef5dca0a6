//! A real Janus (the SFU, Debian's `janus`) on loopback for tests: a
//! generated configuration in a temporary directory (HTTP API and admin API
//! on free ports, a small RTP port range, ICE on loopback only, VideoRoom
//! with an `admin_key`, every other plugin and transport off), started per
//! test and killed when dropped.

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

const PLUGINS_OFF: &str = "libjanus_audiobridge.so,libjanus_duktape.so,libjanus_echotest.so,libjanus_lua.so,\
libjanus_nosip.so,libjanus_recordplay.so,libjanus_sip.so,libjanus_streaming.so,libjanus_textroom.so,\
libjanus_videocall.so,libjanus_voicemail.so";
const TRANSPORTS_OFF: &str =
    "libjanus_mqtt.so,libjanus_nanomsg.so,libjanus_pfunix.so,libjanus_rabbitmq.so,libjanus_websockets.so";

/// Janus's configuration for a media node on loopback: what the tests run
/// and what `deploy/` renders for a pod (there with the pod's interface).
pub fn janus_config(
    http_port: u16,
    rtp_min: u16,
    rtp_max: u16,
    admin_key: &str,
    interface: &str,
) -> Vec<(&'static str, String)> {
    let lib = "/usr/lib/x86_64-linux-gnu/janus";
    vec![
        (
            "janus.jcfg",
            format!(
                "general: {{\n  plugins_folder = \"{lib}/plugins\"\n  transports_folder = \"{lib}/transports\"\n  \
                 events_folder = \"{lib}/events\"\n  loggers_folder = \"{lib}/loggers\"\n  debug_level = 3\n  \
                 session_timeout = 60\n}}\n\
                 media: {{\n  rtp_port_range = \"{rtp_min}-{rtp_max}\"\n}}\n\
                 nat: {{\n  ice_enforce_list = \"{interface}\"\n}}\n\
                 plugins: {{\n  disable = \"{PLUGINS_OFF}\"\n}}\n\
                 transports: {{\n  disable = \"{TRANSPORTS_OFF}\"\n}}\n\
                 events: {{\n  broadcast = false\n}}\n\
                 loggers: {{\n  disable = \"libjanus_jsonlog.so\"\n}}\n"
            ),
        ),
        ("janus.plugin.videoroom.jcfg", format!("general: {{\n  admin_key = \"{admin_key}\"\n}}\n")),
        (
            "janus.transport.http.jcfg",
            format!(
                "general: {{\n  json = \"plain\"\n  base_path = \"/janus\"\n  http = true\n  port = {http_port}\n  \
                 ip = \"127.0.0.1\"\n  https = false\n}}\nadmin: {{\n  admin_http = false\n}}\ncors: {{\n}}\n"
            ),
        ),
    ]
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
        for (name, text) in janus_config(port, rtp_min, rtp_min + rtp_ports - 1, &admin_key, "127.0.0.1") {
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
