//! Configuration: defaults, then a TOML file, then `SPINE_*` environment
//! variables (`__` separates levels: `SPINE_STORE__BACKEND=etcd`), then
//! command-line flags. Every field is in `docs/operations.md`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Which store backs the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// etcd, for every multi-node deployment.
    Etcd,
    /// The in-process store, for `spine dev` and single nodes.
    Embedded,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    pub backend: Backend,
    /// etcd client URLs.
    pub etcd_endpoints: Vec<String>,
    /// Where the embedded store persists; none keeps it in memory only.
    pub data_dir: Option<PathBuf>,
    /// How long to wait for etcd at start, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Longest wait for one etcd member's answer before the next member is
    /// tried, in milliseconds.
    pub attempt_timeout_ms: u64,
    /// Longest one store request may take across members and retries, in
    /// milliseconds; past it the caller gets UNAVAILABLE.
    pub request_timeout_ms: u64,
    /// TLS towards etcd (with `https://` endpoints).
    pub etcd_tls: Option<EtcdTlsConfig>,
}

/// TLS towards etcd: the CA that signed the members' certificates and, where
/// etcd requires client certificates (`--client-cert-auth`), this node's.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTlsConfig {
    /// PEM CA certificate(s) of the etcd members.
    pub ca: PathBuf,
    /// PEM client certificate.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM client key.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// The name the members' certificates carry, when it is not the
    /// endpoints' host name.
    #[serde(default)]
    pub domain_name: Option<String>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Etcd,
            etcd_endpoints: vec!["http://127.0.0.1:2379".into()],
            data_dir: None,
            connect_timeout_ms: 5000,
            attempt_timeout_ms: 2000,
            request_timeout_ms: 10_000,
            etcd_tls: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA certificate(s) that signed the other nodes' certificates:
    /// presence and calls nodes reach each other over TLS, verified
    /// against it. Required with TLS for those services.
    #[serde(default)]
    pub peer_ca: Option<PathBuf>,
    /// The name the nodes' certificates carry for each other (nodes are
    /// reached by address, so one shared name, e.g. `spine-peer.spine.svc`).
    #[serde(default)]
    pub peer_name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Lifetime of a device token when the request asks for none.
    pub default_token_ttl_secs: u32,
    /// Longest device token lifetime.
    pub max_token_ttl_secs: u32,
    /// Delay between publishing a new signing key and signing with it, so
    /// every node has it before any token it signed arrives.
    pub key_activation_delay_secs: u32,
    /// Key-encryption key (32 bytes, base64) sealing private keys kept in
    /// the store. Required unless `allow_plain_keys` is set.
    pub key_encryption_key: Option<String>,
    /// Older key-encryption keys, during a rotation: values sealed with them
    /// still open and are sealed again under `key_encryption_key`.
    pub previous_key_encryption_keys: Vec<String>,
    /// Store private keys unsealed when no key-encryption key is set. Only
    /// for `spine dev` and tests: a node without a key-encryption key
    /// refuses to start unless this says plain storage is wanted.
    pub allow_plain_keys: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            default_token_ttl_secs: 900,
            max_token_ttl_secs: 3600,
            key_activation_delay_secs: 10,
            key_encryption_key: None,
            previous_key_encryption_keys: Vec::new(),
            allow_plain_keys: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DrainConfig {
    /// After SIGTERM, how long to keep serving while reporting not-ready, so
    /// load balancers stop sending new work (milliseconds).
    pub ready_delay_ms: u64,
    /// Then, how long in-flight requests and streams get to finish.
    pub grace_secs: u64,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self { ready_delay_ms: 0, grace_secs: 20 }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Key for hashing ids in telemetry; set the same on every node so hashes
    /// correlate. Random per process if unset.
    pub id_hash_key: Option<String>,
    /// Log as JSON lines instead of text.
    pub json_logs: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request message in bytes; larger ones get INVALID_ARGUMENT.
    pub max_message_bytes: usize,
    /// Most concurrent streams (RPCs) one HTTP/2 connection may hold.
    pub max_streams_per_connection: u32,
    /// A connection with no request or stream open for this long is closed
    /// (seconds; 0: never). Clients reconnect transparently.
    pub idle_connection_secs: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            // Large enough for an MLS commit bundle (commit, Welcome,
            // GroupInfo with the ratchet tree) of a ~1000-member group;
            // per-field bounds are far smaller elsewhere.
            max_message_bytes: 2 * 1024 * 1024,
            max_streams_per_connection: 256,
            idle_connection_secs: 60,
        }
    }
}

/// A service's own configuration section (`[groups]`, `[presence]`,
/// `[calls]`): defined by the service's crate, not here, and parsed by it
/// when it is installed, with unknown keys refused there.
pub trait Section: Serialize + serde::de::DeserializeOwned + Default {
    /// The section's name in the file and in `SPINE_<NAME>__*` variables.
    const NAME: &'static str;
}

/// A node's configuration: what the runtime itself needs, plus each
/// service's section, kept raw until the service parses it
/// ([`Config::section`]). Unknown keys are refused: in the runtime's
/// sections by serde, in services' sections when they are parsed, and
/// unknown section names by [`Config::check_sections`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Address the gRPC server listens on.
    pub listen: SocketAddr,
    /// A second, plaintext listener serving only `grpc.health.v1` (for
    /// Kubernetes' built-in gRPC probes, which speak plaintext, while
    /// `listen` serves TLS). None: health only on `listen`.
    pub health_listen: Option<SocketAddr>,
    /// Services this node runs (`identity`, ...); empty means all.
    pub services: Vec<String>,
    pub store: StoreConfig,
    pub tls: Option<TlsConfig>,
    pub auth: AuthConfig,
    pub drain: DrainConfig,
    pub telemetry: TelemetryConfig,
    pub limits: LimitsConfig,
    /// Web origins allowed to call over gRPC-Web ([`crate::web`]).
    pub web: crate::web::WebConfig,
    /// Services' sections by name, as read.
    #[serde(flatten)]
    pub sections: std::collections::BTreeMap<String, serde_json::Value>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:50051".parse().expect("valid default address"),
            health_listen: None,
            services: vec![],
            store: StoreConfig::default(),
            tls: None,
            auth: AuthConfig::default(),
            drain: DrainConfig::default(),
            telemetry: TelemetryConfig::default(),
            limits: LimitsConfig::default(),
            web: crate::web::WebConfig::default(),
            sections: Default::default(),
        }
    }
}

impl Config {
    /// A service's section: its defaults where absent, an error naming the
    /// key where it does not parse (unknown keys included).
    pub fn section<S: Section>(&self) -> Result<S, String> {
        match self.sections.get(S::NAME) {
            None | Some(serde_json::Value::Null) => Ok(S::default()),
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| format!("[{}]: {e}", S::NAME)),
        }
    }

    /// Replaces a service's section (tools and tests that build configs).
    pub fn set_section<S: Section>(&mut self, section: &S) {
        let mut v = serde_json::to_value(section).expect("sections serialize");
        // Unset options are left out (they read back as unset), so the
        // config still writes as TOML, which has no null.
        drop_nulls(&mut v);
        self.sections.insert(S::NAME.to_string(), v);
    }

    /// Changes a service's section in place (from its defaults if absent).
    ///
    /// # Panics
    /// If the present section does not parse.
    pub fn edit_section<S: Section>(&mut self, f: impl FnOnce(&mut S)) {
        let mut s: S = self.section().unwrap_or_else(|e| panic!("{e}"));
        f(&mut s);
        self.set_section(&s);
    }

    /// Refuses sections no service of this build owns (a misspelt
    /// `[cals]` would otherwise be ignored silently).
    pub fn check_sections(&self, known: &[&str]) -> Result<(), String> {
        match self.sections.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(format!("unknown key `{k}`; sections of this build: {}", known.join(", "))),
            None => Ok(()),
        }
    }

    /// Layers defaults, `file` (if given), `SPINE_*` variables and `flags`
    /// (a serializable struct whose `None` fields are skipped).
    pub fn load(defaults: Config, file: Option<&Path>, flags: impl Serialize) -> Result<Config, Box<figment::Error>> {
        let mut fig = Figment::from(Serialized::defaults(defaults));
        if let Some(f) = file {
            fig = fig.merge(Toml::file_exact(f));
        }
        fig.merge(Env::prefixed("SPINE_").split("__")).merge(Serialized::defaults(flags)).extract().map_err(Box::new)
    }
}

/// Removes the null members of every object in `v`, at any depth.
fn drop_nulls(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(drop_nulls);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail API returns figment::Error
mod tests {
    use super::*;

    #[derive(Serialize, Default)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        listen: Option<String>,
    }

    #[test]
    fn layers_apply_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "spine.toml",
                "listen = \"127.0.0.1:1\"\n[store]\nbackend = \"embedded\"\n[drain]\ngrace_secs = 7\n",
            )?;
            jail.set_env("SPINE_DRAIN__GRACE_SECS", "9");
            jail.set_env("SPINE_LISTEN", "127.0.0.1:2");
            let path = jail.directory().join("spine.toml");
            let c = Config::load(Config::default(), Some(&path), Flags::default()).unwrap();
            assert_eq!(c.store.backend, Backend::Embedded); // file
            assert_eq!(c.drain.grace_secs, 9); // env over file
            assert_eq!(c.listen.port(), 2); // env over file
            let c = Config::load(Config::default(), Some(&path), Flags { listen: Some("127.0.0.1:3".into()) }).unwrap();
            assert_eq!(c.listen.port(), 3); // flag over env
            assert_eq!(c.auth.max_token_ttl_secs, 3600); // default
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_errors() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "[store]\nbakend = \"etcd\"\n")?;
            let path = jail.directory().join("bad.toml");
            assert!(Config::load(Config::default(), Some(&path), Flags::default()).is_err());
            Ok(())
        });
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Demo {
        ttl_secs: u64,
        region: String,
        advertise: Option<String>,
    }

    impl Default for Demo {
        fn default() -> Self {
            Self { ttl_secs: 5, region: "default".into(), advertise: None }
        }
    }

    impl Section for Demo {
        const NAME: &'static str = "demo";
    }

    #[test]
    fn services_parse_their_own_sections() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("spine.toml", "[demo]\nregion = \"eu\"\n")?;
            jail.set_env("SPINE_DEMO__TTL_SECS", "9");
            let path = jail.directory().join("spine.toml");
            let mut c = Config::load(Config::default(), Some(&path), Flags::default()).unwrap();
            assert_eq!(c.section::<Demo>().unwrap(), Demo { ttl_secs: 9, region: "eu".into(), advertise: None });
            assert!(c.check_sections(&["demo"]).is_ok());
            assert!(c.check_sections(&["other"]).unwrap_err().contains("`demo`"));
            c.edit_section(|d: &mut Demo| d.ttl_secs = 1);
            assert_eq!(c.section::<Demo>().unwrap().ttl_secs, 1);
            // An edited section with an unset option still writes as TOML
            // and reads back the same.
            jail.create_file("written.toml", &toml::to_string(&c).expect("the config writes as TOML"))?;
            jail.clear_env();
            let back = Config::load(Config::default(), Some(&jail.directory().join("written.toml")), Flags::default())
                .unwrap();
            assert_eq!(back.section::<Demo>().unwrap(), Demo { ttl_secs: 1, region: "eu".into(), advertise: None });
            assert_eq!(Config::default().section::<Demo>().unwrap(), Demo::default());

            jail.create_file("bad.toml", "[demo]\nregoin = \"eu\"\n")?;
            let path = jail.directory().join("bad.toml");
            let c = Config::load(Config::default(), Some(&path), Flags::default()).unwrap();
            assert!(c.section::<Demo>().unwrap_err().contains("regoin"));
            Ok(())
        });
    }
}
