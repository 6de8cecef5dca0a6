//! spine-groups: the MLS key-package directory and delivery service.
//!
//! It orders and delivers MLS messages and checks every handshake against
//! the group's public state (spine-mls's verifier): exactly one commit wins
//! each epoch (a compare-and-swap on the group's record), its Welcome and
//! GroupInfo are accepted with it or not at all, and every message reaches
//! each member device's mailbox in order, even while the device is offline.
//!
//! It must never hold a group secret or a message's plaintext, and never let
//! a device into a group its tenant's policy, or the member's reachability,
//! does not allow.

pub mod config;
mod data;
mod delivery;
pub mod error;
mod keypackages;
mod mailbox;
mod metrics;
pub mod model;
mod service;

use std::sync::Arc;
use std::time::Duration;

pub use config::GroupsConfig;
use spine_mls::verifier::DeliveryService;
use spine_proto::groups::v1::groups_server::GroupsServer;
use spine_runtime::service::{Installer, SpineService};
use spine_runtime::store::{Compare, Op, SharedLease, SharedSpace, StoreError, Txn};
use spine_runtime::{Runtime, StartError};

/// Most single-use key packages a device may hold.
pub const MAX_KEY_PACKAGES: u32 = 100;
/// Longest accepted key-package lifetime (RFC 9420 suggests about 3 months).
pub const MAX_KEY_PACKAGE_LIFETIME_SECS: u64 = 90 * 86_400 + 3600;
/// How long mailbox entries and undelivered log entries are kept.
pub const MAILBOX_RETENTION_SECS: u64 = 14 * 86_400;
/// Application messages are accepted for the current epoch and this many
/// before it (members that have not processed the latest commit yet).
pub const APPLICATION_EPOCH_WINDOW: u64 = 3;
/// Control-plane key of the delivery service's signing key.
const DS_KEY: &str = "groups/delivery-service";

pub(crate) struct Node {
    rt: Arc<Runtime>,
    /// For consent checks on other tenants' persons.
    secrets: spine_runtime::secrets::Secrets,
    ds: DeliveryService,
    groups: SharedSpace,
    mailbox_lease: Arc<SharedLease>,
    /// Per-device mailbox quota (`[groups]`).
    quota: mailbox::Quota,
    /// Rate limits (`[groups.rates]`).
    limits: spine_runtime::rate::RateLimits<config::GroupsRate>,
    /// Registered signature keys of calling devices. A device's key never
    /// changes, and a revoked device cannot authenticate, so the caller's
    /// own key can be cached; other devices' keys are always read (a
    /// deleted device must not be admitted).
    own_keys: std::sync::Mutex<std::collections::HashMap<(String, String, String), Vec<u8>>>,
    /// Groups' verifiers kept between requests (`verifier_cache_mib`).
    verifiers: delivery::verifiers::Verifiers,
}

impl Node {
    pub(crate) async fn own_key(
        &self,
        t: &spine_runtime::store::TenantStore,
        me: &model::Device,
    ) -> error::Result<Vec<u8>> {
        let k = (me.tenant.clone(), me.account.clone(), me.device.clone());
        if let Some(v) = self.own_keys.lock().expect("key cache").get(&k) {
            return Ok(v.clone());
        }
        let v = keypackages::registered_key(t, me).await?;
        let mut cache = self.own_keys.lock().expect("key cache");
        if cache.len() >= 100_000 {
            cache.clear();
        }
        cache.insert(k, v.clone());
        Ok(v)
    }
}

/// Loads (or, the first time, creates) the delivery service's key, sealed
/// with the key-encryption key like the token signing keys. A key sealed
/// under a key-encryption key being rotated out is sealed again under the
/// current one; a key stored unsealed by an older version is sealed now.
async fn delivery_service(rt: &Runtime) -> Result<DeliveryService, StoreError> {
    let sys = rt.system_store();
    let key = sys.key(DS_KEY);
    let backend = |e: &dyn std::fmt::Display| StoreError::Backend(format!("delivery service key: {e}"));
    for _ in 0..3 {
        if let Some(kv) = sys.get(DS_KEY).await? {
            let stored =
                String::from_utf8(kv.value.clone()).ok().filter(|v| v.starts_with("v1:") || v.starts_with("plain:"));
            let (bytes, reseal) = match stored {
                Some(sealed) => rt.sealer.open_current(&key, &sealed).map_err(|e| backend(&e))?,
                // Written unsealed by an earlier version.
                None => (kv.value.clone(), true),
            };
            let ds = DeliveryService::from_bytes(&bytes).map_err(|e| backend(&e))?;
            if reseal {
                let txn = Txn::new()
                    .when(Compare::ModRevision(key.clone(), kv.mod_revision))
                    .then(Op::put(key.clone(), rt.sealer.seal(&key, &bytes)));
                sys.txn(txn).await?;
                tracing::info!("delivery service key sealed under the current key-encryption key");
            }
            return Ok(ds);
        }
        let ds = DeliveryService::generate().map_err(|e| backend(&e))?;
        let bytes = ds.to_bytes().map_err(|e| backend(&e))?;
        // Nodes starting together agree on one key: the first write wins.
        sys.txn(Txn::new().when(Compare::Absent(key.clone())).then(Op::put(key.clone(), rt.sealer.seal(&key, &bytes))))
            .await?;
    }
    Err(StoreError::Backend("delivery service key did not settle".into()))
}

/// The groups service: the MLS key-package directory and delivery service.
#[derive(Debug)]
pub struct Groups;

#[async_trait::async_trait]
impl SpineService for Groups {
    const NAME: &'static str = "groups";
    type Handle = ();
    type Options = ();

    /// Adds the groups service, registers its account-data hook and starts
    /// its upkeep.
    async fn install(at: &mut Installer<'_>, (): ()) -> Result<(), StartError> {
        let rt = at.rt;
        let config: GroupsConfig = rt.config.section().map_err(StartError::Config)?;
        let node = Arc::new(Node {
            rt: rt.clone(),
            secrets: rt.secrets().await?.clone(),
            ds: delivery_service(rt).await?,
            groups: spine_read_models::roster::group_space(rt.store.clone()),
            mailbox_lease: Arc::new(SharedLease::new(
                rt.store.clone(),
                Duration::from_secs(MAILBOX_RETENTION_SECS + 86_400),
                Duration::from_secs(86_400),
            )),
            quota: mailbox::Quota { entries: config.mailbox_max_entries, bytes: config.mailbox_max_bytes },
            limits: config.rates.limiter(),
            own_keys: Default::default(),
            verifiers: delivery::verifiers::Verifiers::new(
                (config.verifier_cache_mib as usize).saturating_mul(1 << 20),
            ),
        });
        rt.register_account_data(Arc::new(data::GroupsData(Arc::downgrade(&node))));
        spine_runtime::add_service!(at, GroupsServer::new(service::GroupsApi(node.clone())));
        let every = Duration::from_secs(config.upkeep_secs.max(1));
        Runtime::spawn_upkeep(Arc::downgrade(&node), every, "groups", move |node: Arc<Node>| async move {
            if node.rt.drain.is_cancelled() {
                return Ok(());
            }
            delivery::sweep(&node, every).await
        });
        Ok(())
    }
}
