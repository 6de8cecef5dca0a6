//! [`WatchFaults`]: a store whose watches can lose events and then end, as
//! a broken connection to etcd (or a compacted revision) makes them, for
//! tests of what follows the store.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use spine_runtime::store::{KeyValue, LeaseId, RangePage, Store, StoreError, Txn, TxnOutcome, WatchStream};

/// Wraps a store; everything but its watches passes through unchanged.
#[derive(Debug)]
pub struct WatchFaults {
    inner: Arc<dyn Store>,
    deaf: Arc<AtomicBool>,
    cuts: tokio::sync::watch::Sender<u64>,
}

impl WatchFaults {
    pub fn new(inner: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self { inner, deaf: Arc::default(), cuts: tokio::sync::watch::Sender::new(0) })
    }

    /// From now on every watch, open or new, drops what it sees.
    pub fn deafen(&self) {
        self.deaf.store(true, Ordering::SeqCst);
    }

    /// Every open watch ends (without an error, as a closed stream does);
    /// watches opened after this hear again.
    pub fn cut(&self) {
        self.deaf.store(false, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }
}

#[async_trait]
impl Store for WatchFaults {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.inner.get(key).await
    }
    async fn range(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<RangePage, StoreError> {
        self.inner.range(prefix, start_after, limit).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        self.inner.txn(txn).await
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<bool, StoreError> {
        self.inner.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.revoke_lease(lease).await
    }
    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<WatchStream, StoreError> {
        let events = self.inner.watch(prefix, from_revision).await?;
        let deaf = self.deaf.clone();
        let mut cuts = self.cuts.subscribe();
        cuts.mark_unchanged();
        Ok(Box::pin(events.filter(move |_| futures::future::ready(!deaf.load(Ordering::SeqCst))).take_until(
            async move {
                let _ = cuts.changed().await;
            },
        )))
    }
    async fn revision(&self) -> Result<i64, StoreError> {
        self.inner.revision().await
    }
    async fn count(&self, prefix: &str) -> Result<u64, StoreError> {
        self.inner.count(prefix).await
    }
}
