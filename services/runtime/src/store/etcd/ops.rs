//! The `Store` operations on etcd, each through `run` (failover and
//! deadlines) and, for transactions, the lost-answer check.

use super::*;

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
        let resp = self.run(|c| async move { c.kv_client().get(key, None).await }).await?;
        self.saw(resp.header());
        Ok(resp.kvs().first().map(kv_of))
    }

    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<KeyValue>>, StoreError> {
        check_many(keys)?;
        // A transaction of reads alone: etcd serves it as one linearizable
        // read, at one revision.
        let t =
            etcd::Txn::new().and_then(keys.iter().map(|k| etcd::TxnOp::get(k.as_bytes(), None)).collect::<Vec<_>>());
        let resp = self
            .run(|c| {
                let t = t.clone();
                async move { c.kv_client().txn(t).await }
            })
            .await?;
        self.saw(resp.header());
        let out: Vec<Option<KeyValue>> = resp
            .op_responses()
            .iter()
            .map(|r| match r {
                etcd::TxnOpResponse::Get(g) => Ok(g.kvs().first().map(kv_of)),
                _ => Err(StoreError::Backend("a read transaction answered with a write".into())),
            })
            .collect::<Result<_, _>>()?;
        if out.len() != keys.len() {
            return Err(StoreError::Backend(format!("{} keys read, {} answers", keys.len(), out.len())));
        }
        Ok(out)
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
        let resp = self
            .run(|c| {
                let (start, opts) = (start.clone(), opts.clone());
                async move { c.kv_client().get(start, Some(opts)).await }
            })
            .await?;
        self.saw(resp.header());
        Ok(RangePage { kvs: resp.kvs().iter().map(kv_of).collect(), more: resp.more() })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        txn.validate()?;
        let build = || {
            etcd::Txn::new()
                .when(txn.compares.iter().map(compare).collect::<Vec<_>>())
                .and_then(txn.success.iter().map(txn_op).collect::<Vec<_>>())
                .or_else(txn.failure.iter().map(txn_op).collect::<Vec<_>>())
        };
        let deadline = Instant::now() + self.inner.request_timeout;
        let mut backoff = Duration::from_millis(25);
        let mut last = None;
        loop {
            for i in self.order() {
                let seen_before = self.inner.seen_revision.load(Ordering::Relaxed);
                let t = build();
                match self
                    .attempt(i, deadline, &mut |c: etcd::Client| {
                        let t = t.clone();
                        async move { c.kv_client().txn(t).await }
                    })
                    .await
                {
                    Ok(resp) => {
                        self.saw(resp.header());
                        let revision = resp.header().map_or(0, |h| h.revision());
                        return Ok(TxnOutcome { succeeded: resp.succeeded(), revision });
                    }
                    Err(Failure::Final(e)) => return Err(e),
                    Err(Failure::NotApplied(e)) => last = Some(e),
                    Err(Failure::Unknown(e)) => {
                        // The reads below retry on the other members.
                        match self.applied(&txn, seen_before).await {
                            Ok(Some(outcome)) => return Ok(outcome),
                            // Not applied, or a transaction with nothing to
                            // tell by: sending it again is safe.
                            Ok(None) => last = Some(e),
                            // The outcome cannot be told: sending again
                            // could apply it twice.
                            Err(_) => return Err(e),
                        }
                    }
                }
                if Instant::now() >= deadline {
                    break;
                }
            }
            next_round(deadline, &mut backoff, last.take()).await?;
        }
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let secs = ttl.as_secs_f64().ceil().max(1.0) as i64;
        // A retry after a lost answer may leave an unused lease behind; it
        // holds no keys and expires after `ttl`.
        let resp = self.run(|c| async move { c.lease_client().grant(secs, None).await }).await?;
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<bool, StoreError> {
        let attempt = self
            .run(|c| async move {
                let (mut keeper, mut stream) = c.lease_client().keep_alive(lease).await?;
                keeper.keep_alive().await?;
                match stream.message().await? {
                    Some(resp) => Ok(resp.ttl() > 0),
                    None => Err(etcd::Error::LeaseKeepAliveError("lease keep-alive stream closed".into())),
                }
            })
            .await;
        match attempt {
            Err(StoreError::LeaseNotFound) => Ok(false),
            other => other,
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        match self.run(|c| async move { c.lease_client().revoke(lease).await }).await {
            Ok(_) | Err(StoreError::LeaseNotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<WatchStream, StoreError> {
        let mut opts = etcd::WatchOptions::new().with_range(prefix_end(prefix));
        if from_revision > 0 {
            opts = opts.with_start_revision(from_revision);
        }
        // Creation, with the first response (which confirms it or reports a
        // compacted start), is retried on the other members.
        let (stream, first) = self
            .run(|c| {
                let opts = opts.clone();
                async move {
                    let mut stream = c.watch_client().watch(prefix, Some(opts)).await?;
                    let first = stream.message().await?;
                    Ok((stream, first))
                }
            })
            .await?;
        match first {
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
                    Err(e) => {
                        let err = match classify(e) {
                            Failure::NotApplied(e) | Failure::Unknown(e) | Failure::Final(e) => e,
                        };
                        return Some((futures::stream::iter(vec![Err(err)]), None));
                    }
                }
            }
        })
        .flatten();
        Ok(Box::pin(events))
    }

    async fn revision(&self) -> Result<i64, StoreError> {
        let resp = self
            .run(|c| async move { c.kv_client().get("/", Some(etcd::GetOptions::new().with_count_only())).await })
            .await?;
        self.saw(resp.header());
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    async fn count(&self, prefix: &str) -> Result<u64, StoreError> {
        let opts = etcd::GetOptions::new().with_range(prefix_end(prefix)).with_count_only();
        let resp = self
            .run(|c| {
                let opts = opts.clone();
                async move { c.kv_client().get(prefix, Some(opts)).await }
            })
            .await?;
        self.saw(resp.header());
        Ok(resp.count().max(0) as u64)
    }
}
