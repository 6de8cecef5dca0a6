//! spine-runtime: what every Spine service stands on.
//!
//! - [`config`]: layered configuration (defaults, file, environment, flags).
//! - [`auth`]: credentials to [`auth::Caller`], as a layer before every service.
//! - [`store`]: the storage trait, its etcd and embedded implementations, and
//!   the tenant-scoped handles handlers must use.
//! - [`telemetry`]: logs, OTLP traces and metrics, keyed hashing of ids.
//! - [`server`]: the gRPC server with health, reflection and graceful drain.
//! - [`error`]: shared shapes for mapping domain errors to gRPC statuses.
//! - [`data`]: the hook through which services report and delete account data.
//!
//! This crate must never know any service's domain: no accounts, calls or
//! groups here beyond the ids that auth carries.

pub mod auth;
pub mod config;
pub mod conn;
pub mod data;
pub mod error;
pub mod frames;
pub mod idempotency;
pub mod ids;
pub mod rate;
pub mod sealing;
pub mod secrets;
pub mod server;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod web;

use std::sync::{Arc, RwLock};
use std::time::Duration;

pub use auth::{Caller, Principal, Scope};
pub use config::Config;

use crate::auth::AuthRing;
use crate::config::Backend;
use crate::data::AccountData;
use crate::store::{EmbeddedStore, EtcdOptions, EtcdStore, EtcdTls, Store, StoreError, SystemStore};

/// Raises this process's open-file limit to its hard limit (each
/// connected device holds a descriptor; soft limits are often 1,024).
/// Returns the limit now in force.
pub fn raise_open_files_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        l.current = l.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, l) {
            tracing::warn!(error = %e, "could not raise the open-file limit");
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Unix seconds now.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// A node's shared state: config, store, auth mirror, drain signal and the
/// account-data hooks of the services it runs.
pub struct Runtime {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub auth: Arc<AuthRing>,
    /// Cancelled when the node starts draining: long-lived streams watch it
    /// and tell their clients to reconnect elsewhere.
    pub drain: tokio_util::sync::CancellationToken,
    /// Seals private keys kept in the store.
    pub sealer: sealing::Sealer,
    redactor: telemetry::Redactor,
    secrets: secrets::SecretsCell,
    data: RwLock<Vec<Arc<dyn AccountData>>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("listen", &self.config.listen).finish()
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The configuration is unusable; the message names the key.
    #[error("config: {0}")]
    Config(String),
}

impl Runtime {
    /// The keyed hash standing for an identifier in logs, traces and
    /// metrics (`telemetry.id_hash_key`).
    pub fn redact(&self, id: &str) -> String {
        self.redactor.redact(id)
    }

    /// Opens the configured store and starts the auth mirror.
    pub async fn start(config: Config) -> Result<Arc<Self>, StartError> {
        let store = Self::open_store(&config).await?;
        Self::with_store(config, store)
    }

    /// Opens the configured store alone (for tools that only read or write
    /// control-plane records, such as `spine admin operator`).
    pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, StartError> {
        Ok(match config.store.backend {
            Backend::Etcd => Arc::new(EtcdStore::open(Self::etcd_options(config)?).await?),
            Backend::Embedded => match &config.store.data_dir {
                Some(dir) => Arc::new(EmbeddedStore::open(dir)?),
                None => Arc::new(EmbeddedStore::in_memory()),
            },
        })
    }

    /// How the configuration says to reach etcd (reading the TLS files).
    pub fn etcd_options(config: &Config) -> Result<EtcdOptions, StartError> {
        let c = &config.store;
        let mut o = EtcdOptions::new(&c.etcd_endpoints, Duration::from_millis(c.connect_timeout_ms));
        o.attempt_timeout = Duration::from_millis(c.attempt_timeout_ms.max(1));
        o.request_timeout = Duration::from_millis(c.request_timeout_ms.max(1));
        if let Some(t) = &c.etcd_tls {
            let read = |key: &str, p: &std::path::Path| {
                std::fs::read(p).map_err(|e| StartError::Config(format!("store.etcd_tls.{key} ({}): {e}", p.display())))
            };
            if t.cert.is_some() != t.key.is_some() {
                return Err(StartError::Config("store.etcd_tls: cert and key go together".into()));
            }
            o.tls = Some(EtcdTls {
                ca_pem: read("ca", &t.ca)?,
                client_cert_pem: t.cert.as_deref().map(|p| read("cert", p)).transpose()?,
                client_key_pem: t.key.as_deref().map(|p| read("key", p)).transpose()?,
                domain_name: t.domain_name.clone(),
            });
        } else if c.etcd_endpoints.iter().any(|e| e.starts_with("https://")) {
            return Err(StartError::Config("store.etcd_endpoints use https: set store.etcd_tls.ca".into()));
        }
        Ok(o)
    }

    /// The sealer the configuration asks for: a key-encryption key, or
    /// plain storage only where `auth.allow_plain_keys` says so.
    pub fn sealer_of(config: &Config) -> Result<sealing::Sealer, StartError> {
        let auth = &config.auth;
        // A configured but unusable key must never silently mean "plain".
        let sealer = sealing::Sealer::rotating(auth.key_encryption_key.as_deref(), &auth.previous_key_encryption_keys)
            .map_err(|e| StartError::Config(format!("auth.key_encryption_key / previous_key_encryption_keys: {e}")))?;
        if !sealer.is_sealing() {
            if !auth.allow_plain_keys {
                return Err(StartError::Config(
                    "auth.key_encryption_key is not set: private keys would be stored unsealed. Set it (32 bytes, \
                     base64, from a secret store), or set auth.allow_plain_keys = true where plain storage is \
                     acceptable (development only)"
                        .into(),
                ));
            }
            tracing::warn!("auth.allow_plain_keys: private keys are stored unsealed (development only)");
        }
        Ok(sealer)
    }

    /// A runtime over an existing store (tests, several nodes on one store).
    pub fn with_store(config: Config, store: Arc<dyn Store>) -> Result<Arc<Self>, StartError> {
        let sealer = Self::sealer_of(&config)?;
        let redactor = telemetry::Redactor::new(config.telemetry.id_hash_key.as_deref().map(str::as_bytes));
        let auth = AuthRing::new(store.clone(), i64::from(config.auth.max_token_ttl_secs));
        auth.start();
        Ok(Arc::new(Self {
            config,
            store,
            auth,
            drain: Default::default(),
            sealer,
            redactor,
            secrets: Default::default(),
            data: RwLock::new(Vec::new()),
        }))
    }

    /// The deployment's shared secrets (loaded, or made, on first use).
    pub async fn secrets(&self) -> Result<&secrets::Secrets, StoreError> {
        self.secrets.get(&self.system_store(), &self.sealer).await
    }

    /// Runs a transaction across handles (a tenant's records with the
    /// control plane's, say). Its keys are [`store::Key`]s, so each was made
    /// by a handle the caller holds; a single handle's transaction goes
    /// through that handle, which refuses keys outside its root.
    pub async fn txn(&self, txn: store::Txn) -> Result<store::TxnOutcome, StoreError> {
        self.store.txn(txn).await
    }

    /// The control-plane handle: the one way to the system keyspace.
    pub fn system_store(&self) -> SystemStore {
        SystemStore::new(self.store.clone())
    }

    /// Registers a service's account-data hook.
    pub fn register_account_data(&self, holder: Arc<dyn AccountData>) {
        self.data.write().expect("data hooks lock").push(holder);
    }

    /// Keeps `follow` running for as long as `owner` lives and the node is
    /// not draining: a mirror that reads the store, then follows a watch
    /// until it fails. On failure it logs under `name` and starts again
    /// (with a fresh read) 200 ms later.
    pub fn spawn_follower<T, F, Fut>(self: &Arc<Self>, owner: std::sync::Weak<T>, name: &'static str, follow: F)
    where
        T: Send + Sync + 'static,
        F: Fn(Arc<T>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), StoreError>> + Send,
    {
        let rt = self.clone();
        tokio::spawn(async move {
            loop {
                let Some(o) = owner.upgrade() else { return };
                if let Err(e) = follow(o).await {
                    tracing::warn!(mirror = name, error = %e, "watch lost; re-reading");
                }
                tokio::select! {
                    _ = rt.drain.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        });
    }

    /// Runs `work` every `every` for as long as `owner` lives, logging
    /// failures under `name`: a service's upkeep.
    pub fn spawn_upkeep<T, F, Fut, E>(owner: std::sync::Weak<T>, every: Duration, name: &'static str, work: F)
    where
        T: Send + Sync + 'static,
        F: Fn(Arc<T>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send,
        E: std::fmt::Display,
    {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(owner) = owner.upgrade() else { return };
                if let Err(e) = work(owner).await {
                    tracing::warn!(upkeep = name, error = %e, "upkeep failed; will retry");
                }
            }
        });
    }

    /// Every registered account-data hook, in registration order.
    pub fn account_data(&self) -> Vec<Arc<dyn AccountData>> {
        self.data.read().expect("data hooks lock").clone()
    }
}
