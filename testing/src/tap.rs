//! [`StoreTap`]: a store for tests and benchmarks that watch what a node
//! asks of its store or break it: it counts every round trip by kind
//! ([`Counts`]) and reads under a prefix, and its watches can lose events
//! and then end, as a broken connection to etcd (or a compacted revision)
//! makes them.

use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use spine_runtime::store::{KeyValue, LeaseId, RangePage, Store, StoreError, Txn, TxnOutcome, WatchStream};

use crate::counts::Counts;

/// Wraps a store; what it is not told to count or break passes through
/// unchanged.
#[derive(Debug)]
pub struct StoreTap {
    inner: Arc<dyn Store>,
    /// Every round trip, by kind.
    counts: Arc<Counts>,
    /// Counters of reads under a prefix: gets, and ranges too if `true`.
    counted: Mutex<Vec<(String, bool, Arc<AtomicUsize>)>>,
    deaf: Arc<AtomicBool>,
    cuts: tokio::sync::watch::Sender<u64>,
}

impl StoreTap {
    pub fn new(inner: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            counts: Arc::default(),
            counted: Mutex::default(),
            deaf: Arc::default(),
            cuts: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Every round trip made through this tap since it was made, by kind.
    pub fn counts(&self) -> Arc<Counts> {
        self.counts.clone()
    }

    /// Counts, from now on, the gets of keys under `prefix`.
    pub fn count_gets(&self, prefix: &str) -> Arc<AtomicUsize> {
        self.counter(prefix, false)
    }

    /// Counts, from now on, the reads of keys under `prefix`: gets of such
    /// keys, and ranges within it.
    pub fn count_reads(&self, prefix: &str) -> Arc<AtomicUsize> {
        self.counter(prefix, true)
    }

    fn counter(&self, prefix: &str, ranges: bool) -> Arc<AtomicUsize> {
        let n = Arc::new(AtomicUsize::new(0));
        self.counted.lock().expect("counted reads lock").push((prefix.to_string(), ranges, n.clone()));
        n
    }

    fn read(&self, key: &str, range: bool) {
        for (prefix, ranges, n) in self.counted.lock().expect("counted reads lock").iter() {
            if key.starts_with(prefix.as_str()) && (*ranges || !range) {
                n.fetch_add(1, Ordering::SeqCst);
            }
        }
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
impl Store for StoreTap {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.read(key, false);
        let _f = self.counts.start(false);
        self.inner.get(key).await
    }
    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<KeyValue>>, StoreError> {
        for k in keys {
            self.read(k, false);
        }
        let _f = self.counts.start(false);
        self.inner.get_many(keys).await
    }
    async fn range(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<RangePage, StoreError> {
        self.read(prefix, true);
        let _f = self.counts.start(false);
        self.inner.range(prefix, start_after, limit).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let _f = self.counts.start(true);
        self.counts.wrote(&txn);
        self.inner.txn(txn).await
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.counts.lease();
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<bool, StoreError> {
        self.counts.lease();
        self.inner.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.counts.lease();
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
        let _f = self.counts.start(false);
        self.inner.revision().await
    }
    async fn count(&self, prefix: &str) -> Result<u64, StoreError> {
        let _f = self.counts.start(false);
        self.inner.count(prefix).await
    }
}
