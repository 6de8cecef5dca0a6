//! The production store: etcd v3 through etcd-client.

use std::time::Duration;

use async_trait::async_trait;
use etcd_client as etcd;
use futures::StreamExt;

use super::{
    Compare, EventKind, KeyValue, LeaseId, Op, RangePage, Store, StoreError, Txn, TxnOutcome, WatchEvent, WatchStream,
    prefix_end,
};

/// A store backed by an etcd cluster.
#[derive(Clone)]
pub struct EtcdStore {
    client: etcd::Client,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EtcdStore")
    }
}

impl EtcdStore {
    /// Connects to the given endpoints (`http://host:port`).
    pub async fn connect(endpoints: &[String], connect_timeout: Duration) -> Result<Self, StoreError> {
        let opts = etcd::ConnectOptions::new()
            .with_connect_timeout(connect_timeout)
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let client = etcd::Client::connect(endpoints, Some(opts)).await.map_err(map_err)?;
        Ok(Self { client })
    }
}

fn map_err(e: etcd::Error) -> StoreError {
    match e {
        etcd::Error::TransportError(t) => StoreError::Unavailable(t.to_string()),
        etcd::Error::IoError(t) => StoreError::Unavailable(t.to_string()),
        etcd::Error::GRpcStatus(s) => match s.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                StoreError::Unavailable(s.message().to_string())
            }
            tonic::Code::NotFound if s.message().contains("lease not found") => StoreError::LeaseNotFound,
            tonic::Code::InvalidArgument if s.message().contains("too large") => StoreError::TooLarge,
            _ => StoreError::Backend(format!("{}: {}", s.code(), s.message())),
        },
        etcd::Error::LeaseKeepAliveError(m) if m.contains("not found") => StoreError::LeaseNotFound,
        other => StoreError::Backend(other.to_string()),
    }
}

fn kv_of(kv: &etcd::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: kv.lease(),
    }
}

fn txn_op(op: &Op) -> etcd::TxnOp {
    match op {
        Op::Put { key, value, lease } => {
            let opts = lease.map(|l| etcd::PutOptions::new().with_lease(l));
            etcd::TxnOp::put(key.as_bytes(), value.clone(), opts)
        }
        Op::Delete(key) => etcd::TxnOp::delete(key.as_bytes(), None),
        Op::DeletePrefix(prefix) => {
            etcd::TxnOp::delete(prefix.as_bytes(), Some(etcd::DeleteOptions::new().with_range(prefix_end(prefix))))
        }
    }
}

fn compare(c: &Compare) -> etcd::Compare {
    match c {
        Compare::Absent(k) => etcd::Compare::version(k.as_bytes(), etcd::CompareOp::Equal, 0),
        Compare::Present(k) => etcd::Compare::version(k.as_bytes(), etcd::CompareOp::Greater, 0),
        Compare::ModRevision(k, rev) => etcd::Compare::mod_revision(k.as_bytes(), etcd::CompareOp::Equal, *rev),
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let resp = self.client.kv_client().get(key, None).await.map_err(map_err)?;
        Ok(resp.kvs().first().map(kv_of))
    }

    async fn range(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<RangePage, StoreError> {
        let start: Vec<u8> = match start_after {
            Some(a) if a >= prefix => {
                let mut s = a.as_bytes().to_vec();
                s.push(0);
                s
            }
            _ => prefix.as_bytes().to_vec(),
        };
        let mut opts = etcd::GetOptions::new().with_range(prefix_end(prefix));
        if limit != 0 {
            opts = opts.with_limit(limit as i64);
        }
        let resp = self.client.kv_client().get(start, Some(opts)).await.map_err(map_err)?;
        Ok(RangePage { kvs: resp.kvs().iter().map(kv_of).collect(), more: resp.more() })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        txn.validate()?;
        let t = etcd::Txn::new()
            .when(txn.compares.iter().map(compare).collect::<Vec<_>>())
            .and_then(txn.success.iter().map(txn_op).collect::<Vec<_>>())
            .or_else(txn.failure.iter().map(txn_op).collect::<Vec<_>>());
        let resp = self.client.kv_client().txn(t).await.map_err(map_err)?;
        let revision = resp.header().map_or(0, |h| h.revision());
        Ok(TxnOutcome { succeeded: resp.succeeded(), revision })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let secs = ttl.as_secs_f64().ceil().max(1.0) as i64;
        let resp = self.client.lease_client().grant(secs, None).await.map_err(map_err)?;
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<bool, StoreError> {
        let attempt = async {
            let (mut keeper, mut stream) = self.client.lease_client().keep_alive(lease).await.map_err(map_err)?;
            keeper.keep_alive().await.map_err(map_err)?;
            match stream.message().await.map_err(map_err)? {
                Some(resp) => Ok(resp.ttl() > 0),
                None => Err(StoreError::Unavailable("lease keep-alive stream closed".into())),
            }
        };
        match attempt.await {
            Err(StoreError::LeaseNotFound) => Ok(false),
            other => other,
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        match self.client.lease_client().revoke(lease).await.map_err(map_err) {
            Ok(_) | Err(StoreError::LeaseNotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<WatchStream, StoreError> {
        let mut opts = etcd::WatchOptions::new().with_range(prefix_end(prefix));
        if from_revision > 0 {
            opts = opts.with_start_revision(from_revision);
        }
        let mut stream = self.client.watch_client().watch(prefix, Some(opts)).await.map_err(map_err)?;
        // The first response confirms creation, or reports a compacted start.
        match stream.message().await.map_err(map_err)? {
            Some(r) if r.canceled() && r.compact_revision() > 0 => {
                return Err(StoreError::Compacted { requested: from_revision, oldest: r.compact_revision() });
            }
            Some(r) if r.canceled() => {
                return Err(StoreError::Backend(format!("watch refused: {}", r.cancel_reason())));
            }
            Some(_) => {}
            None => return Err(StoreError::Unavailable("watch stream closed".into())),
        }
        let events = futures::stream::unfold(Some(stream), move |stream| async move {
            let mut stream = stream?;
            loop {
                match stream.message().await {
                    Ok(Some(resp)) => {
                        if resp.canceled() {
                            let err = if resp.compact_revision() > 0 {
                                StoreError::Compacted { requested: from_revision, oldest: resp.compact_revision() }
                            } else {
                                StoreError::Unavailable(resp.cancel_reason().to_string())
                            };
                            return Some((futures::stream::iter(vec![Err(err)]), None));
                        }
                        let evs: Vec<_> = resp
                            .events()
                            .iter()
                            .filter_map(|e| {
                                let kv = e.kv()?;
                                let kind = match e.event_type() {
                                    etcd::EventType::Put => EventKind::Put,
                                    etcd::EventType::Delete => EventKind::Delete,
                                };
                                Some(Ok(WatchEvent {
                                    kind,
                                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                                    value: kv.value().to_vec(),
                                    revision: kv.mod_revision(),
                                }))
                            })
                            .collect();
                        if !evs.is_empty() {
                            return Some((futures::stream::iter(evs), Some(stream)));
                        }
                    }
                    Ok(None) => {
                        return Some((
                            futures::stream::iter(vec![Err(StoreError::Unavailable("watch stream closed".into()))]),
                            None,
                        ));
                    }
                    Err(e) => return Some((futures::stream::iter(vec![Err(map_err(e))]), None)),
                }
            }
        })
        .flatten();
        Ok(Box::pin(events))
    }

    async fn revision(&self) -> Result<i64, StoreError> {
        let resp =
            self.client.kv_client().get("/", Some(etcd::GetOptions::new().with_count_only())).await.map_err(map_err)?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    async fn count(&self, prefix: &str) -> Result<u64, StoreError> {
        let opts = etcd::GetOptions::new().with_range(prefix_end(prefix)).with_count_only();
        let resp = self.client.kv_client().get(prefix, Some(opts)).await.map_err(map_err)?;
        Ok(resp.count().max(0) as u64)
    }
}
