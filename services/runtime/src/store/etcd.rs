//! The production store: etcd v3 through etcd-client, one connection per
//! cluster member, so the loss of one member is invisible to callers.
//!
//! etcd-client's own balancing keeps handing requests to a member that is
//! gone until its connection times out, so one dead member of three failed
//! a large share of every node's requests. Here each member has its own
//! client, and every request:
//!
//! - goes to the member that answered last (each node starts on a
//!   different one, which spreads nodes over the members), and never to a
//!   member that failed, until a background probe finds it answering again
//!   (unless every member failed: then all are tried);
//! - has a deadline per attempt (`store.attempt_timeout_ms`) and one overall
//!   (`store.request_timeout_ms`), with retries on the next member between;
//! - asks for a member with a leader (etcd's `hasleader` metadata), so a
//!   member cut off from the others refuses at once instead of hanging.
//!
//! Reads, leases and watch creation are retried freely. A transaction is
//! retried freely when it certainly did not reach etcd (refused connection,
//! no leader); when it may have (a timeout, a connection lost mid-request),
//! its outcome is checked first: its first put's key holding exactly the
//! value it wrote, at a revision newer than any this client had seen before
//! sending, means it applied; a delete-only transaction whose keys are all
//! gone is taken as applied. Only then is it sent again.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use etcd_client as etcd;
use futures::StreamExt;

use super::{
    Compare, EventKind, KeyValue, LeaseId, Op, RangePage, Store, StoreError, Txn, TxnOutcome, WatchEvent, WatchStream,
    check_many, prefix_end,
};

mod ops;

/// How a node reaches etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Client URLs of the members (`http://` or `https://`).
    pub endpoints: Vec<String>,
    /// How long start-up waits for a member with a leader.
    pub connect_timeout: Duration,
    /// Longest wait for one member's answer before trying the next.
    pub attempt_timeout: Duration,
    /// Longest a request may take across all its attempts.
    pub request_timeout: Duration,
    /// TLS towards the members; required for `https://` endpoints.
    pub tls: Option<EtcdTls>,
}

impl EtcdOptions {
    /// Options with the defaults for everything but the endpoints.
    pub fn new(endpoints: &[String], connect_timeout: Duration) -> Self {
        Self {
            endpoints: endpoints.to_vec(),
            connect_timeout,
            attempt_timeout: Duration::from_millis(2000),
            request_timeout: Duration::from_millis(10_000),
            tls: None,
        }
    }
}

/// PEM material for TLS to etcd: the CA that signed the members'
/// certificates and, for client-certificate auth, this node's certificate
/// and key.
#[derive(Clone)]
pub struct EtcdTls {
    pub ca_pem: Vec<u8>,
    pub client_cert_pem: Option<Vec<u8>>,
    pub client_key_pem: Option<Vec<u8>>,
    /// The name the members' certificates carry, when it differs from the
    /// endpoints' host names.
    pub domain_name: Option<String>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("client_cert", &self.client_cert_pem.is_some())
            .field("domain_name", &self.domain_name)
            .finish_non_exhaustive()
    }
}

/// How often members that failed are probed.
const PROBE_EVERY: Duration = Duration::from_millis(500);

struct Member {
    url: String,
    client: etcd::Client,
    /// Milliseconds since `Inner::epoch` of the failure that made the
    /// member suspect, 0 while it is healthy. Requests go to suspect
    /// members only when every member is suspect.
    failed_at: AtomicI64,
}

struct Inner {
    members: Vec<Member>,
    preferred: AtomicUsize,
    /// The newest store revision any answer carried.
    seen_revision: AtomicI64,
    attempt_timeout: Duration,
    request_timeout: Duration,
    epoch: Instant,
}

/// A store backed by an etcd cluster.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("members", &self.inner.members.len()).finish()
    }
}

/// What one failed attempt means for the next.
enum Failure {
    /// The request never reached a member that could apply it: any request
    /// may be sent again.
    NotApplied(StoreError),
    /// The request may or may not have been applied.
    Unknown(StoreError),
    /// The answer is final: retrying cannot change it.
    Final(StoreError),
}

fn classify(e: etcd::Error) -> Failure {
    match e {
        etcd::Error::TransportError(t) => Failure::NotApplied(StoreError::Unavailable(t.to_string())),
        etcd::Error::IoError(t) => Failure::Unknown(StoreError::Unavailable(t.to_string())),
        etcd::Error::GRpcStatus(s) => {
            let msg = s.message().to_string();
            match s.code() {
                // A member without a leader refuses before proposing; a
                // channel that could not connect sent nothing.
                tonic::Code::Unavailable if msg.contains("no leader") || connect_failed(&s) => {
                    Failure::NotApplied(StoreError::Unavailable(msg))
                }
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown
                | tonic::Code::Aborted => Failure::Unknown(StoreError::Unavailable(msg)),
                tonic::Code::NotFound if msg.contains("lease not found") => Failure::Final(StoreError::LeaseNotFound),
                tonic::Code::InvalidArgument if msg.contains("too large") => Failure::Final(StoreError::TooLarge),
                // "database space exceeded": writes wait for an operator's
                // defragmentation; clients may retry later.
                tonic::Code::ResourceExhausted => Failure::Final(StoreError::Unavailable(msg)),
                _ => Failure::Final(StoreError::Backend(format!("{}: {}", s.code(), msg))),
            }
        }
        etcd::Error::LeaseKeepAliveError(m) if m.contains("not found") => Failure::Final(StoreError::LeaseNotFound),
        etcd::Error::LeaseKeepAliveError(m) => Failure::Unknown(StoreError::Unavailable(m)),
        etcd::Error::WatchError(m) => Failure::Unknown(StoreError::Unavailable(m)),
        other => Failure::Final(StoreError::Backend(other.to_string())),
    }
}

/// Whether a status is the channel's own "could not connect".
/// After a round over the members: waits (doubling up to 500 ms) before
/// the next, or gives up with the last failure once the deadline passed.
async fn next_round(deadline: Instant, backoff: &mut Duration, last: Option<StoreError>) -> Result<(), StoreError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(last.unwrap_or_else(|| StoreError::Unavailable("etcd: request deadline passed".into())));
    }
    tokio::time::sleep((*backoff).min(left)).await;
    *backoff = (*backoff * 2).min(Duration::from_millis(500));
    Ok(())
}

fn connect_failed(s: &tonic::Status) -> bool {
    let mut text = s.message().to_ascii_lowercase();
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        text.push(' ');
        text.push_str(&e.to_string().to_ascii_lowercase());
        source = e.source();
    }
    ["connection refused", "tcp connect error", "error trying to connect", "dns error", "connect timeout"]
        .iter()
        .any(|m| text.contains(m))
}

fn tls_options(tls: &EtcdTls) -> Result<etcd::TlsOptions, StoreError> {
    let mut opts = etcd::TlsOptions::new().ca_certificate(etcd::Certificate::from_pem(&tls.ca_pem));
    match (&tls.client_cert_pem, &tls.client_key_pem) {
        (Some(cert), Some(key)) => opts = opts.identity(etcd::Identity::from_pem(cert, key)),
        (None, None) => {}
        _ => {
            return Err(StoreError::Backend(
                "etcd TLS: a client certificate needs its key, and a key its certificate".into(),
            ));
        }
    }
    if let Some(name) = &tls.domain_name {
        opts = opts.domain_name(name.clone());
    }
    Ok(opts)
}

impl EtcdStore {
    /// Connects to the given endpoints with default timeouts and no TLS.
    pub async fn connect(endpoints: &[String], connect_timeout: Duration) -> Result<Self, StoreError> {
        Self::open(EtcdOptions::new(endpoints, connect_timeout)).await
    }

    /// Connects to the members and waits until one of them answers with a
    /// leader (a quorum is enough: members that are down are tried again
    /// later, on their own).
    pub async fn open(opts: EtcdOptions) -> Result<Self, StoreError> {
        if opts.endpoints.is_empty() {
            return Err(StoreError::Backend("no etcd endpoints configured".into()));
        }
        let tls = opts.tls.as_ref().map(tls_options).transpose()?;
        let mut members = Vec::with_capacity(opts.endpoints.len());
        for url in &opts.endpoints {
            let mut co = etcd::ConnectOptions::new()
                .with_connect_timeout(opts.attempt_timeout.min(opts.connect_timeout))
                .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
                .with_keep_alive_while_idle(true)
                .with_require_leader(true);
            if let Some(tls) = &tls {
                co = co.with_tls(tls.clone());
            }
            // Connecting is lazy: this fails only on a malformed URL or TLS
            // setting, never because the member is down.
            let client = etcd::Client::connect([url.as_str()], Some(co))
                .await
                .map_err(|e| StoreError::Backend(format!("etcd endpoint {url}: {e}")))?;
            members.push(Member { url: url.clone(), client, failed_at: AtomicI64::new(0) });
        }
        // Nodes start on different members, spreading the load.
        let first = rand::random::<u32>() as usize % members.len();
        let store = Self {
            inner: Arc::new(Inner {
                members,
                preferred: AtomicUsize::new(first),
                seen_revision: AtomicI64::new(0),
                attempt_timeout: opts.attempt_timeout,
                request_timeout: opts.request_timeout.max(opts.attempt_timeout),
                epoch: Instant::now(),
            }),
        };
        store
            .run_within(opts.connect_timeout, |c| async move { c.kv_client().get("/", None).await.map(|_| ()) })
            .await?;
        store.spawn_prober();
        Ok(store)
    }

    /// Probes suspect members in the background until the store is
    /// dropped, marking each healthy again once it answers with a leader.
    fn spawn_prober(&self) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                let Some(inner) = weak.upgrade() else { return };
                let store = EtcdStore { inner };
                let suspects: Vec<usize> = (0..store.inner.members.len())
                    .filter(|&i| store.inner.members[i].failed_at.load(Ordering::Relaxed) != 0)
                    .collect();
                let probes = suspects.into_iter().map(|i| {
                    let store = store.clone();
                    async move {
                        let c = store.inner.members[i].client.clone();
                        let probe = async move {
                            c.kv_client().get("/", Some(etcd::GetOptions::new().with_count_only())).await
                        };
                        if let Ok(Ok(resp)) = tokio::time::timeout(store.inner.attempt_timeout, probe).await {
                            store.saw(resp.header());
                            store.mark_up(i, false);
                        }
                    }
                });
                futures::future::join_all(probes).await;
            }
        });
    }

    fn now_ms(&self) -> i64 {
        self.inner.epoch.elapsed().as_millis() as i64
    }

    fn saw(&self, header: Option<&etcd::ResponseHeader>) {
        if let Some(h) = header {
            self.inner.seen_revision.fetch_max(h.revision(), Ordering::Relaxed);
        }
    }

    /// Members in the order to try: the preferred one, then the other
    /// healthy ones; suspect members only when none is healthy (the one
    /// that failed longest ago first).
    fn order(&self) -> Vec<usize> {
        let n = self.inner.members.len();
        let start = self.inner.preferred.load(Ordering::Relaxed) % n;
        let idx = (0..n).map(|i| (start + i) % n);
        let failed = |i: usize| self.inner.members[i].failed_at.load(Ordering::Relaxed);
        let healthy: Vec<usize> = idx.clone().filter(|&i| failed(i) == 0).collect();
        if !healthy.is_empty() {
            return healthy;
        }
        let mut all: Vec<usize> = idx.collect();
        all.sort_by_key(|&i| failed(i));
        all
    }

    fn mark_down(&self, i: usize, why: &StoreError) {
        let m = &self.inner.members[i];
        let now = self.now_ms().max(1);
        if m.failed_at.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            tracing::warn!(member = %m.url, error = %why, "etcd member failing; using the others until it answers");
        }
    }

    fn mark_up(&self, i: usize, prefer: bool) {
        if prefer {
            self.inner.preferred.store(i, Ordering::Relaxed);
        }
        let m = &self.inner.members[i];
        if m.failed_at.swap(0, Ordering::Relaxed) != 0 {
            tracing::info!(member = %m.url, "etcd member answering again");
        }
    }

    /// How many members are healthy now (for health reports and tests).
    pub fn healthy_members(&self) -> usize {
        self.inner.members.iter().filter(|m| m.failed_at.load(Ordering::Relaxed) == 0).count()
    }

    /// Runs an operation that may be repeated (a read, a lease call, a
    /// watch's creation) on the members until one answers or the request
    /// deadline passes.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnMut(etcd::Client) -> Fut,
        Fut: Future<Output = Result<T, etcd::Error>>,
    {
        self.run_within(self.inner.request_timeout, op).await
    }

    async fn run_within<T, F, Fut>(&self, budget: Duration, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut(etcd::Client) -> Fut,
        Fut: Future<Output = Result<T, etcd::Error>>,
    {
        let deadline = Instant::now() + budget;
        let mut backoff = Duration::from_millis(25);
        loop {
            let mut last = None;
            for i in self.order() {
                match self.attempt(i, deadline, &mut op).await {
                    Ok(v) => return Ok(v),
                    Err(Failure::Final(e)) => return Err(e),
                    Err(Failure::NotApplied(e) | Failure::Unknown(e)) => last = Some(e),
                }
                if Instant::now() >= deadline {
                    break;
                }
            }
            next_round(deadline, &mut backoff, last.take()).await?;
        }
    }

    /// One attempt on member `i`, marking it down or up by the result.
    async fn attempt<T, F, Fut>(&self, i: usize, deadline: Instant, op: &mut F) -> Result<T, Failure>
    where
        F: FnMut(etcd::Client) -> Fut,
        Fut: Future<Output = Result<T, etcd::Error>>,
    {
        let left = deadline.saturating_duration_since(Instant::now());
        let wait = self.inner.attempt_timeout.min(left).max(Duration::from_millis(1));
        let member = &self.inner.members[i];
        let result = match tokio::time::timeout(wait, op(member.client.clone())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(classify(e)),
            Err(_) => Err(Failure::Unknown(StoreError::Unavailable(format!(
                "etcd member {} did not answer in {wait:?}",
                member.url
            )))),
        };
        match &result {
            Ok(_) | Err(Failure::Final(_)) => self.mark_up(i, true),
            Err(Failure::NotApplied(e) | Failure::Unknown(e)) => self.mark_down(i, e),
        }
        result
    }

    /// Whether a transaction whose answer was lost applied, judged from
    /// the store now (see the module docs); `None` if that cannot be told.
    #[doc(hidden)] // public for the store tests in tests/etcd_members.rs
    pub async fn applied(&self, txn: &Txn, seen_before: i64) -> Result<Option<TxnOutcome>, StoreError> {
        if let Some((key, value)) = txn.success.iter().find_map(|op| match op {
            Op::Put { key, value, .. } => Some((key, value)),
            _ => None,
        }) {
            let now = self.get(key).await?;
            return Ok(match now {
                Some(kv) if kv.mod_revision > seen_before && &kv.value == value => {
                    Some(TxnOutcome { succeeded: true, revision: kv.mod_revision })
                }
                _ => None,
            });
        }
        if txn.success.is_empty() {
            return Ok(None);
        }
        for op in &txn.success {
            let gone = match op {
                Op::Delete(key) => self.get(key).await?.is_none(),
                Op::DeletePrefix(prefix) => self.count(prefix).await? == 0,
                Op::Put { .. } => unreachable!("puts are handled above"),
            };
            if !gone {
                return Ok(None);
            }
        }
        let revision = self.revision().await?;
        Ok(Some(TxnOutcome { succeeded: true, revision }))
    }
}
