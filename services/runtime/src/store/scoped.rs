//! Handles that confine a caller to its own part of the key space.
//!
//! Every key Spine writes lives under `/spine/`:
//! - `/spine/t/<tenant>/...` holds one tenant's data. A [`TenantStore`] is
//!   made only from an authenticated tenant (see `auth::Caller`), and it
//!   builds only keys under that tenant's prefix.
//! - `/spine/sys/...` holds the control plane (tenants, credentials hashes,
//!   signing keys, revocations, the interop handle index). Only code that
//!   must cross tenants (auth, the tenant admin service, handle resolution)
//!   gets a [`SystemStore`].

use std::sync::Arc;

use super::{Key, KeyValue, RangePage, Store, StoreError, Txn, TxnOutcome};
use crate::ids::TenantId;

/// Root of every key Spine writes.
pub const ROOT: &str = "/spine/";
/// Prefix of the control plane.
pub const SYS_PREFIX: &str = "/spine/sys/";

fn tenant_prefix(tenant: &TenantId) -> String {
    format!("/spine/t/{}/", tenant.as_str())
}

/// Shared operations of a handle rooted at a prefix.
#[derive(Clone)]
struct Rooted {
    store: Arc<dyn Store>,
    prefix: String,
}

impl Rooted {
    fn key(&self, rel: &str) -> Key {
        debug_assert!(!rel.starts_with('/'), "relative keys do not start with /");
        Key::new(format!("{}{}", self.prefix, rel))
    }

    /// The key of a record this handle read (its absolute key), if it lies
    /// under this handle's root.
    fn key_of(&self, kv: &KeyValue) -> Result<Key, StoreError> {
        if kv.key.starts_with(&self.prefix) {
            Ok(Key::new(kv.key.clone()))
        } else {
            Err(StoreError::Backend(format!("key {} is outside {}", kv.key, self.prefix)))
        }
    }
}

macro_rules! rooted_ops {
    ($t:ty, silo) => {
        rooted_ops!(@common $t);
        impl $t {
            /// Runs a transaction whose every key (written or compared, in
            /// either branch) lies in this tenant's silo; a key made by any
            /// other handle (another tenant's, the control plane's, a
            /// shared space's) is refused and nothing is written. Work that
            /// must span silos (the control plane acting for a tenant) goes
            /// through [`crate::Runtime::txn`] or the [`SystemStore`].
            pub async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
                if let Some(k) = txn.keys().find(|k| !k.starts_with(self.0.prefix.as_str())) {
                    return Err(StoreError::InvalidTxn(format!("key {k} is outside {}", self.0.prefix)));
                }
                self.0.store.txn(txn).await
            }
        }
    };
    ($t:ty) => {
        rooted_ops!(@common $t);
        impl $t {
            /// Runs a transaction. Its keys are [`Key`]s: each was made by a
            /// handle the caller holds (see [`TenantStore::txn`] for the
            /// tenant's stricter rule).
            pub async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
                self.0.store.txn(txn).await
            }
        }
    };
    (@common $t:ty) => {
        impl $t {
            /// The absolute key for a key relative to this handle's root:
            /// the only way to make a [`Key`] to write under it.
            pub fn key(&self, rel: &str) -> Key {
                self.0.key(rel)
            }
            /// The key of a record read through this handle, to write it
            /// back; an error if it lies outside this handle's root.
            pub fn key_of(&self, kv: &KeyValue) -> Result<Key, StoreError> {
                self.0.key_of(kv)
            }
            /// The key relative to this handle's root.
            pub fn relative<'a>(&self, key: &'a str) -> &'a str {
                key.strip_prefix(self.0.prefix.as_str()).unwrap_or(key)
            }
            pub async fn get(&self, rel: &str) -> Result<Option<KeyValue>, StoreError> {
                self.0.store.get(self.0.key(rel).as_str()).await
            }
            /// Reads several keys (relative to this handle's root) in one
            /// round trip, at one revision: one answer per key, in order.
            pub async fn get_many(&self, rels: &[&str]) -> Result<Vec<Option<KeyValue>>, StoreError> {
                let keys: Vec<Key> = rels.iter().map(|r| self.0.key(r)).collect();
                let keys: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
                self.0.store.get_many(&keys).await
            }
            pub async fn range(
                &self,
                rel_prefix: &str,
                start_after_rel: Option<&str>,
                limit: usize,
            ) -> Result<RangePage, StoreError> {
                let after = start_after_rel.map(|a| self.0.key(a));
                self.0.store.range(self.0.key(rel_prefix).as_str(), after.as_deref(), limit).await
            }
            pub async fn count(&self, rel_prefix: &str) -> Result<u64, StoreError> {
                self.0.store.count(self.0.key(rel_prefix).as_str()).await
            }
            pub async fn range_all(&self, rel_prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
                self.0.store.range_all(self.0.key(rel_prefix).as_str()).await
            }
            /// Every key under the prefix strictly after `start_after_rel`.
            pub async fn range_all_after(
                &self,
                rel_prefix: &str,
                start_after_rel: Option<&str>,
            ) -> Result<Vec<KeyValue>, StoreError> {
                let mut out = Vec::new();
                let mut after: Option<String> = start_after_rel.map(|a| self.0.key(a).into());
                loop {
                    let page = self.0.store.range(self.0.key(rel_prefix).as_str(), after.as_deref(), 512).await?;
                    after = page.kvs.last().map(|kv| kv.key.clone());
                    out.extend(page.kvs);
                    if !page.more {
                        return Ok(out);
                    }
                }
            }
        }
    };
}

/// A store handle confined to one tenant's keys.
#[derive(Clone)]
pub struct TenantStore(Rooted, TenantId);

impl std::fmt::Debug for TenantStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TenantStore({})", self.1.as_str())
    }
}

rooted_ops!(TenantStore, silo);

impl TenantStore {
    /// Only the auth layer's `Caller` and the account-deletion machinery
    /// construct tenant handles; handlers get theirs from the caller.
    pub(crate) fn new(store: Arc<dyn Store>, tenant: TenantId) -> Self {
        let prefix = tenant_prefix(&tenant);
        Self(Rooted { store, prefix }, tenant)
    }

    pub fn tenant(&self) -> &TenantId {
        &self.1
    }
}

/// A store handle on a shared space, `/spine/<name>/`: data that spans
/// tenants by a service's own policy (MLS groups, whose members come from
/// several tenants). The service that owns the space checks its policy
/// before touching it; the runtime only keeps it apart from every tenant's
/// silo and from the control plane (`t` and `sys` are refused as names).
#[derive(Clone)]
pub struct SharedSpace(Rooted);

impl std::fmt::Debug for SharedSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedSpace({})", self.0.prefix)
    }
}

rooted_ops!(SharedSpace);

impl SharedSpace {
    /// # Panics
    /// If `name` is `t` or `sys`, or not a single lowercase word: those are
    /// the tenants' silos and the control plane, never a shared space.
    pub fn new(store: Arc<dyn Store>, name: &'static str) -> Self {
        assert!(
            !matches!(name, "t" | "sys") && !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase()),
            "{name:?} cannot name a shared space"
        );
        Self(Rooted { store, prefix: format!("{ROOT}{name}/") })
    }
}

/// A store handle on the control plane (`/spine/sys/`).
#[derive(Clone)]
pub struct SystemStore(Rooted);

impl std::fmt::Debug for SystemStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SystemStore")
    }
}

rooted_ops!(SystemStore);

impl SystemStore {
    /// The one way to the control plane: nodes call it through
    /// `Runtime::system_store`, admin tools on the store they opened. Its
    /// holders are listed in docs/architecture.md ("Storage and silos").
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self(Rooted { store, prefix: SYS_PREFIX.to_string() })
    }

    /// Every tenant's id (the control plane's `tenants/` records), for work
    /// that sweeps all tenants.
    pub async fn tenant_ids(&self) -> Result<Vec<TenantId>, StoreError> {
        Ok(self
            .range_all("tenants/")
            .await?
            .iter()
            .filter_map(|kv| TenantId::parse(self.relative(&kv.key).trim_start_matches("tenants/")))
            .collect())
    }

    /// The underlying store, for watches and leases on control-plane keys.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.0.store
    }

    /// The handle of a tenant the control plane works in with no caller
    /// of that tenant present: the one way from the control plane into a
    /// tenant's silo. For reading what interop needs after an interop
    /// handle resolved for the caller (the target's settings), for
    /// delivering to or checking a group's member devices in the tenants
    /// the group's policy admitted, and for the control plane's own work
    /// (tenant creation, the deletion sweep). Never to serve a caller of
    /// that tenant: those get theirs from `Caller::tenant_store`.
    pub fn tenant(&self, tenant: &TenantId) -> TenantStore {
        TenantStore::new(self.0.store.clone(), tenant.clone())
    }
}
