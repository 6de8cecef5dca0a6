//! Janus's configuration for a media node: the files `janus` reads
//! (`janus.jcfg`, the VideoRoom plugin's with its `admin_key`, the HTTP
//! transport's), for tests, `spine dev --media` and anyone running Janus by
//! hand (deploy/ has the same settings for a pod).

const PLUGINS_OFF: &str = "libjanus_audiobridge.so,libjanus_duktape.so,libjanus_echotest.so,libjanus_lua.so,\
libjanus_nosip.so,libjanus_recordplay.so,libjanus_sip.so,libjanus_streaming.so,libjanus_textroom.so,\
libjanus_videocall.so,libjanus_voicemail.so";
const TRANSPORTS_OFF: &str =
    "libjanus_mqtt.so,libjanus_nanomsg.so,libjanus_pfunix.so,libjanus_rabbitmq.so,libjanus_websockets.so";

/// Where Debian's janus package keeps its plugins.
pub const JANUS_LIB: &str = "/usr/lib/x86_64-linux-gnu/janus";

/// The files (name, contents) of a Janus whose HTTP API listens on
/// `127.0.0.1:http_port`, with RTP ports `rtp_min..=rtp_max`, VideoRoom
/// rooms creatable only with `admin_key`, and every other plugin and
/// transport off. Janus gathers ICE candidates on the host's interfaces,
/// never on loopback.
pub fn janus_config(http_port: u16, rtp_min: u16, rtp_max: u16, admin_key: &str) -> Vec<(&'static str, String)> {
    let lib = JANUS_LIB;
    vec![
        (
            "janus.jcfg",
            format!(
                "general: {{\n  plugins_folder = \"{lib}/plugins\"\n  transports_folder = \"{lib}/transports\"\n  \
                 events_folder = \"{lib}/events\"\n  loggers_folder = \"{lib}/loggers\"\n  debug_level = 3\n  \
                 session_timeout = 60\n}}\n\
                 media: {{\n  rtp_port_range = \"{rtp_min}-{rtp_max}\"\n}}\n\
                 nat: {{\n  ice_ignore_list = \"vmnet,docker,veth\"\n}}\n\
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

/// A Janus process started by [`spawn`], killed when dropped.
#[derive(Debug)]
pub struct JanusProcess {
    child: std::process::Child,
    /// Its HTTP API (`http://127.0.0.1:<port>/janus`).
    pub url: String,
}

impl JanusProcess {
    /// Kills it now (as a crash would).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for JanusProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes [`janus_config`] into `dir`, starts `janus` (`$JANUS_BIN`, else
/// from `PATH`) on it, and waits up to 20 s for its HTTP API to answer.
pub async fn spawn(
    dir: &std::path::Path,
    http_port: u16,
    rtp_min: u16,
    rtp_max: u16,
    admin_key: &str,
) -> std::io::Result<JanusProcess> {
    for (name, text) in janus_config(http_port, rtp_min, rtp_max, admin_key) {
        std::fs::write(dir.join(name), text)?;
    }
    let child = std::process::Command::new(std::env::var("JANUS_BIN").unwrap_or_else(|_| "janus".into()))
        .arg("--config")
        .arg(dir.join("janus.jcfg"))
        .arg("--configs-folder")
        .arg(dir)
        .arg("--disable-colors")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut janus = JanusProcess { child, url: format!("http://127.0.0.1:{http_port}/janus") };
    let api = crate::Janus::new(&janus.url);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while api.info().await.is_err() {
        if std::time::Instant::now() > deadline || janus.child.try_wait()?.is_some() {
            return Err(std::io::Error::other(format!("janus did not answer on {}", janus.url)));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Ok(janus)
}
