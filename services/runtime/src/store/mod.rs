//! Storage: one trait over what etcd offers (keys with revisions, prefix
//! ranges, transactions with compares, leases, watches) and two
//! implementations: [`EtcdStore`] for production and [`EmbeddedStore`] for
//! `spine dev` and single-node use. Both pass the same conformance suite.
//!
//! Handlers never see a [`Store`]: they get a [`TenantStore`] scoped to the
//! caller's tenant (see [`scoped`]), so a key of another tenant cannot be
//! named by handler code.

mod embedded;
mod etcd;
mod key;
pub mod scoped;

use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;

pub use embedded::EmbeddedStore;
pub use etcd::{EtcdOptions, EtcdStore, EtcdTls};
pub use key::Key;
pub use scoped::{SharedSpace, SystemStore, TenantStore};

/// Largest value a put may carry (etcd's default request limit is 1.5 MiB).
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Most operations one transaction may hold (etcd's default `--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;

/// A lease id. Keys attached to a lease are deleted when it expires.
pub type LeaseId = i64;

/// A stored key with its value and revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the store when the key was (last) created.
    pub create_revision: i64,
    /// Revision of the store when the key was last modified.
    pub mod_revision: i64,
    /// Number of writes since the key was created (1 after creation).
    pub version: i64,
    /// Lease the key is attached to, 0 for none.
    pub lease: LeaseId,
}

impl KeyValue {
    /// The key of this stored record, to write it again (compare-and-swap
    /// on it, update or delete it). Records come from reads through a
    /// handle, so this names only what the reader could already reach; a
    /// tenant handle's transaction still refuses it outside the tenant.
    pub fn stored_key(&self) -> Key {
        Key::new(self.key.clone())
    }
}

/// One page of a prefix range.
#[derive(Debug, Clone, Default)]
pub struct RangePage {
    pub kvs: Vec<KeyValue>,
    /// Whether more keys follow the last one returned.
    pub more: bool,
}

/// A condition a transaction checks before choosing its branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(Key),
    /// The key exists.
    Present(Key),
    /// The key was last modified at exactly this revision (0: absent).
    ModRevision(Key, i64),
}

/// A write inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put { key: Key, value: Vec<u8>, lease: Option<LeaseId> },
    Delete(Key),
    DeletePrefix(Key),
}

impl Op {
    pub fn put(key: Key, value: impl Into<Vec<u8>>) -> Self {
        Op::Put { key, value: value.into(), lease: None }
    }
    pub fn put_leased(key: Key, value: impl Into<Vec<u8>>, lease: LeaseId) -> Self {
        Op::Put { key, value: value.into(), lease: Some(lease) }
    }
    pub fn delete(key: Key) -> Self {
        Op::Delete(key)
    }
    pub fn delete_prefix(prefix: Key) -> Self {
        Op::DeletePrefix(prefix)
    }

    /// The key (or prefix) the operation writes.
    pub fn key(&self) -> &Key {
        match self {
            Op::Put { key, .. } | Op::Delete(key) | Op::DeletePrefix(key) => key,
        }
    }
}

/// A transaction: if every compare holds, apply `success`, else `failure`.
#[derive(Debug, Clone, Default)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

impl Compare {
    pub fn key(&self) -> &Key {
        match self {
            Compare::Absent(k) | Compare::Present(k) | Compare::ModRevision(k, _) => k,
        }
    }
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every key the transaction compares or writes.
    pub fn keys(&self) -> impl Iterator<Item = &Key> {
        self.compares.iter().map(Compare::key).chain(self.success.iter().chain(&self.failure).map(Op::key))
    }
    pub fn when(mut self, c: Compare) -> Self {
        self.compares.push(c);
        self
    }
    pub fn then(mut self, op: Op) -> Self {
        self.success.push(op);
        self
    }
    pub fn then_all(mut self, ops: impl IntoIterator<Item = Op>) -> Self {
        self.success.extend(ops);
        self
    }
    pub fn otherwise(mut self, op: Op) -> Self {
        self.failure.push(op);
        self
    }

    /// Checks the limits both backends enforce, so they fail alike.
    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        for ops in [&self.success, &self.failure] {
            if ops.len() > MAX_TXN_OPS {
                return Err(StoreError::InvalidTxn(format!("more than {MAX_TXN_OPS} operations")));
            }
            let mut seen = std::collections::BTreeSet::new();
            for op in ops {
                let key = match op {
                    Op::Put { key, value, .. } => {
                        if value.len() > MAX_VALUE_BYTES {
                            return Err(StoreError::TooLarge);
                        }
                        key
                    }
                    Op::Delete(key) | Op::DeletePrefix(key) => key,
                };
                if key.is_empty() {
                    return Err(StoreError::InvalidTxn("empty key".into()));
                }
                if !seen.insert(key.as_str()) {
                    return Err(StoreError::InvalidTxn(format!("key {key} written twice")));
                }
            }
            // etcd refuses a put inside a range the same txn deletes.
            for op in ops {
                if let Op::DeletePrefix(prefix) = op {
                    for other in ops {
                        if let Op::Put { key, .. } = other
                            && key.starts_with(prefix.as_str())
                        {
                            return Err(StoreError::InvalidTxn(format!("put of {key} inside deleted prefix")));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// What a transaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnOutcome {
    /// Whether every compare held (so `success` ran).
    pub succeeded: bool,
    /// Store revision after the transaction.
    pub revision: i64,
}

/// Kind of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    pub key: String,
    /// The new value (empty for deletes).
    pub value: Vec<u8>,
    /// Revision of the change.
    pub revision: i64,
}

/// Changes under a prefix, in revision order. It ends with an error when the
/// watcher fell too far behind or the backend went away; the consumer then
/// re-reads the range and watches again.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, StoreError>> + Send>>;

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("revision {requested} is compacted (oldest kept: {oldest})")]
    Compacted { requested: i64, oldest: i64 },
    #[error("watch fell behind and was cancelled")]
    WatchLagged,
    #[error("invalid transaction: {0}")]
    InvalidTxn(String),
    #[error("value too large")]
    TooLarge,
    #[error("lease not found")]
    LeaseNotFound,
    #[error("store backend error: {0}")]
    Backend(String),
}

/// Keys are stored in etcd, so a range over a prefix ends at the prefix with
/// its last byte incremented.
pub(crate) fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Checks a [`Store::get_many`] request against the limit both backends
/// enforce, so they fail alike.
pub(crate) fn check_many(keys: &[&str]) -> Result<(), StoreError> {
    if keys.len() > MAX_TXN_OPS {
        return Err(StoreError::InvalidTxn(format!("more than {MAX_TXN_OPS} keys in one read")));
    }
    Ok(())
}

/// The store. Implementations are cheap to share (`Arc<dyn Store>`).
#[async_trait]
pub trait Store: std::fmt::Debug + Send + Sync + 'static {
    /// Reads one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// Reads several keys in one round trip, at one revision: one answer
    /// per key, in the order asked. At most [`MAX_TXN_OPS`] keys.
    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<KeyValue>>, StoreError>;
    /// Reads keys under `prefix` in key order, strictly after `start_after`
    /// if given, at most `limit` of them (0: no limit).
    async fn range(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<RangePage, StoreError>;
    /// Runs a transaction atomically.
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError>;
    /// Grants a lease of at least `ttl` (rounded up to whole seconds).
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError>;
    /// Renews a lease; `Ok(false)` if it has already expired or never existed.
    async fn keep_alive(&self, lease: LeaseId) -> Result<bool, StoreError>;
    /// Revokes a lease, deleting its keys. Revoking an unknown lease succeeds.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError>;
    /// Watches changes under `prefix` from `from_revision` (inclusive), or
    /// from now if it is 0. A start revision older than the oldest kept one
    /// fails with [`StoreError::Compacted`], either at once or as the
    /// stream's first item.
    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<WatchStream, StoreError>;
    /// Current revision of the store.
    async fn revision(&self) -> Result<i64, StoreError>;
    /// Number of keys under `prefix`.
    async fn count(&self, prefix: &str) -> Result<u64, StoreError>;

    /// Writes one key unconditionally.
    async fn put(&self, key: &Key, value: Vec<u8>) -> Result<i64, StoreError> {
        Ok(self.txn(Txn::new().then(Op::put(key.clone(), value))).await?.revision)
    }
    /// Deletes one key unconditionally.
    async fn delete(&self, key: &Key) -> Result<i64, StoreError> {
        Ok(self.txn(Txn::new().then(Op::delete(key.clone()))).await?.revision)
    }
    /// Reads every key under `prefix`, page by page.
    async fn range_all(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.range(prefix, after.as_deref(), 512).await?;
            after = page.kvs.last().map(|kv| kv.key.clone());
            out.extend(page.kvs);
            if !page.more {
                return Ok(out);
            }
        }
    }
}

/// One lease shared by many short-lived records that expire at about the
/// same age (idempotency answers, revocation entries): a new lease every
/// `renew_every`, each lasting `ttl`, so a record attached to it lives
/// between `ttl - renew_every` and `ttl`. One lease per node and period,
/// instead of one per record.
#[derive(Debug)]
pub struct SharedLease {
    store: std::sync::Arc<dyn Store>,
    ttl: Duration,
    renew_every: Duration,
    current: tokio::sync::Mutex<Option<(LeaseId, std::time::Instant)>>,
}

impl SharedLease {
    pub fn new(store: std::sync::Arc<dyn Store>, ttl: Duration, renew_every: Duration) -> Self {
        Self { store, ttl, renew_every, current: tokio::sync::Mutex::new(None) }
    }

    async fn get(&self, fresh: bool) -> Result<LeaseId, StoreError> {
        let mut cur = self.current.lock().await;
        match *cur {
            Some((id, at)) if !fresh && at.elapsed() < self.renew_every => Ok(id),
            _ => {
                let id = self.store.grant_lease(self.ttl).await?;
                *cur = Some((id, std::time::Instant::now()));
                Ok(id)
            }
        }
    }

    /// Runs the transaction `build(lease)`; if the lease vanished (expired,
    /// or the embedded store restarted), once more with a new lease.
    pub async fn txn(&self, build: impl Fn(LeaseId) -> Txn) -> Result<TxnOutcome, StoreError> {
        let lease = self.get(false).await?;
        match self.store.txn(build(lease)).await {
            Err(StoreError::LeaseNotFound) => {
                let lease = self.get(true).await?;
                self.store.txn(build(lease)).await
            }
            other => other,
        }
    }
}
