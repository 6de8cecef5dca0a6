//! The embedded store: etcd's data model in one process, for `spine dev` and
//! single-node deployments.
//!
//! State lives in memory. With a data directory, every committed change to a
//! key without a lease is appended to a log (`store.log`, one JSON line per
//! revision, fsynced) that is replayed and compacted at start. Keys with a
//! lease are soft state and are never persisted: after a restart their leases
//! are gone, exactly as if they had expired.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::{
    Compare, EventKind, KeyValue, LeaseId, Op, RangePage, Store, StoreError, Txn, TxnOutcome, WatchEvent, WatchStream,
    check_many,
};

/// Events kept for watches that start in the past: at most this many ...
const HISTORY: usize = 16_384;
/// ... and none older than this, so a deleted value does not linger in
/// memory (like etcd's history until compaction). A watcher that falls
/// further behind gets `Compacted` and reads again.
const HISTORY_AGE: Duration = Duration::from_secs(600);
/// Buffered events per live watcher before it is cancelled as lagging.
const WATCH_BUFFER: usize = 8_192;

#[derive(Debug, Clone)]
struct Entry {
    value: Vec<u8>,
    create_revision: i64,
    mod_revision: i64,
    version: i64,
    lease: LeaseId,
}

#[derive(Debug)]
struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct State {
    kv: BTreeMap<String, Entry>,
    revision: i64,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    history: VecDeque<(Instant, WatchEvent)>,
    log: Option<Log>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    events: broadcast::Sender<Arc<Vec<WatchEvent>>>,
}

/// The in-process store. Clones share the same data.
#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

/// One line of the log: the persistent effects of one revision.
#[derive(Debug, Serialize, Deserialize)]
struct LogRecord {
    r: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    put: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    del: Vec<String>,
}

#[derive(Debug)]
struct Log {
    file: File,
    dir: PathBuf,
    /// Lines appended since the log was last compacted.
    appended: usize,
}

/// The log is rewritten (compacted) once it has this many lines more than
/// live keys, so deleted values do not linger on disk: deletion in the
/// embedded store reaches the disk within this many writes, and at every
/// start.
const COMPACT_AFTER: usize = 1024;

impl Log {
    /// Rewrites the log as one record per live persistent key (atomically:
    /// a new file renamed over the old one) and opens it for appending.
    fn compact(dir: &Path, kv: &BTreeMap<String, Entry>, revision: i64) -> Result<Log, StoreError> {
        let path = dir.join("store.log");
        let tmp: PathBuf = dir.join("store.log.tmp");
        {
            let mut f = std::io::BufWriter::new(private_file(&tmp)?);
            for (k, e) in kv.iter().filter(|(_, e)| e.lease == 0) {
                let rec = LogRecord { r: e.mod_revision, put: vec![(k.clone(), B64.encode(&e.value))], del: vec![] };
                writeln!(f, "{}", serde_json::to_string(&rec).expect("serialize log record")).map_err(io_err)?;
            }
            // Keep the revision even if the last change was a delete.
            let rec = LogRecord { r: revision, put: vec![], del: vec![] };
            writeln!(f, "{}", serde_json::to_string(&rec).expect("serialize log record")).map_err(io_err)?;
            f.into_inner().map_err(|e| io_err(e.into_error()))?.sync_all().map_err(io_err)?;
        }
        std::fs::rename(&tmp, &path).map_err(io_err)?;
        let file = OpenOptions::new().append(true).open(&path).map_err(io_err)?;
        Ok(Log { file, dir: dir.to_path_buf(), appended: 0 })
    }
}

impl EmbeddedStore {
    /// A store held in memory only. Must be called inside a tokio runtime
    /// (lease expiry runs as a task).
    pub fn in_memory() -> Self {
        Self::from_state(State { next_lease: 1, ..State::default() })
    }

    /// A store persisted under `dir` (created if needed). The directory and
    /// its files are readable by their owner only (mode 0700 and 0600).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).map_err(io_err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err)?;
        let path = dir.join("store.log");
        let mut state = State { next_lease: 1, ..State::default() };
        if path.exists() {
            let reader = BufReader::new(File::open(&path).map_err(io_err)?);
            for line in reader.lines() {
                let line = line.map_err(io_err)?;
                if line.trim().is_empty() {
                    continue;
                }
                // A torn last line (crash mid-append) is dropped, like an
                // uncommitted write.
                let Ok(rec) = serde_json::from_str::<LogRecord>(&line) else { break };
                for (k, v) in rec.put {
                    let value = B64.decode(v).map_err(|e| StoreError::Backend(format!("corrupt log: {e}")))?;
                    let (create, version) = match state.kv.get(&k) {
                        Some(e) => (e.create_revision, e.version + 1),
                        None => (rec.r, 1),
                    };
                    state
                        .kv
                        .insert(k, Entry { value, create_revision: create, mod_revision: rec.r, version, lease: 0 });
                }
                for k in rec.del {
                    state.kv.remove(&k);
                }
                state.revision = rec.r;
            }
        }
        state.log = Some(Log::compact(dir, &state.kv, state.revision)?);
        Ok(Self::from_state(state))
    }

    fn from_state(state: State) -> Self {
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        let inner = Arc::new(Inner { state: Mutex::new(state), events });
        tokio::spawn(expire_leases(Arc::downgrade(&inner)));
        Self { inner }
    }
}

/// Creates (or truncates) a file only its owner can read.
fn private_file(path: &Path) -> Result<File, StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).map_err(io_err)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
    Ok(f)
}

fn io_err(e: std::io::Error) -> StoreError {
    StoreError::Backend(format!("embedded store I/O: {e}"))
}

/// Deletes the keys of expired leases, until the store is dropped.
async fn expire_leases(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        let mut st = inner.state.lock().expect("store lock");
        while st.history.front().is_some_and(|(at, _)| now.duration_since(*at) > HISTORY_AGE) {
            st.history.pop_front();
        }
        let expired: Vec<LeaseId> = st.leases.iter().filter(|(_, l)| l.deadline <= now).map(|(id, _)| *id).collect();
        for id in expired {
            let keys = st.leases.remove(&id).map(|l| l.keys).unwrap_or_default();
            let ops: Vec<Op> = keys.into_iter().map(|k| Op::Delete(super::Key::new(k))).collect();
            if !ops.is_empty() {
                // Lease expiry cannot fail: it only deletes keys that exist.
                let _ = apply(&inner, &mut st, &ops);
            }
        }
    }
}

fn kv_of(key: &str, e: &Entry) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: e.value.clone(),
        create_revision: e.create_revision,
        mod_revision: e.mod_revision,
        version: e.version,
        lease: e.lease,
    }
}

fn holds(st: &State, c: &Compare) -> bool {
    match c {
        Compare::Absent(k) => !st.kv.contains_key(k.as_str()),
        Compare::Present(k) => st.kv.contains_key(k.as_str()),
        Compare::ModRevision(k, rev) => st.kv.get(k.as_str()).map_or(0, |e| e.mod_revision) == *rev,
    }
}

/// Applies writes as one revision, logs and publishes them.
fn apply(inner: &Inner, st: &mut State, ops: &[Op]) -> Result<i64, StoreError> {
    for op in ops {
        if let Op::Put { lease: Some(l), .. } = op
            && !st.leases.contains_key(l)
        {
            return Err(StoreError::LeaseNotFound);
        }
    }
    let rev = st.revision + 1;
    let mut events = Vec::new();
    let mut rec = LogRecord { r: rev, put: vec![], del: vec![] };
    for op in ops {
        match op {
            Op::Put { key, value, lease } => {
                let key = &key.to_string();
                let lease = lease.unwrap_or(0);
                let prev = st.kv.get(key).cloned();
                if let Some(p) = &prev
                    && p.lease != 0
                    && p.lease != lease
                    && let Some(l) = st.leases.get_mut(&p.lease)
                {
                    l.keys.remove(key);
                }
                let (create, version) = prev.map_or((rev, 1), |p| (p.create_revision, p.version + 1));
                st.kv.insert(
                    key.clone(),
                    Entry { value: value.clone(), create_revision: create, mod_revision: rev, version, lease },
                );
                if lease != 0 {
                    st.leases.get_mut(&lease).expect("checked above").keys.insert(key.clone());
                } else {
                    rec.put.push((key.clone(), B64.encode(value)));
                }
                events.push(WatchEvent { kind: EventKind::Put, key: key.clone(), value: value.clone(), revision: rev });
            }
            Op::Delete(key) => {
                let key = &key.to_string();
                if let Some(e) = st.kv.remove(key) {
                    forget_lease(st, key, e.lease);
                    rec.del.push(key.clone());
                    events.push(WatchEvent { kind: EventKind::Delete, key: key.clone(), value: vec![], revision: rev });
                }
            }
            Op::DeletePrefix(prefix) => {
                let keys: Vec<String> = st
                    .kv
                    .range(prefix.to_string()..)
                    .take_while(|(k, _)| k.starts_with(prefix.as_str()))
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in keys {
                    let e = st.kv.remove(&key).expect("key just listed");
                    forget_lease(st, &key, e.lease);
                    rec.del.push(key.clone());
                    events.push(WatchEvent { kind: EventKind::Delete, key, value: vec![], revision: rev });
                }
            }
        }
    }
    if events.is_empty() {
        return Ok(st.revision);
    }
    st.revision = rev;
    if let Some(log) = &mut st.log
        && !(rec.put.is_empty() && rec.del.is_empty())
    {
        let line = serde_json::to_string(&rec).expect("serialize log record");
        writeln!(log.file, "{line}").and_then(|_| log.file.sync_data()).map_err(io_err)?;
        log.appended += 1;
    }
    if let Some(dir) = st.log.as_ref().filter(|l| l.appended >= COMPACT_AFTER).map(|l| l.dir.clone()) {
        st.log = Some(Log::compact(&dir, &st.kv, rev)?);
    }
    let now = Instant::now();
    for e in &events {
        if st.history.len() == HISTORY {
            st.history.pop_front();
        }
        st.history.push_back((now, e.clone()));
    }
    // No receivers is fine: nobody watches.
    let _ = inner.events.send(Arc::new(events));
    Ok(rev)
}

fn forget_lease(st: &mut State, key: &str, lease: LeaseId) {
    if lease != 0
        && let Some(l) = st.leases.get_mut(&lease)
    {
        l.keys.remove(key);
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let st = self.inner.state.lock().expect("store lock");
        Ok(st.kv.get(key).map(|e| kv_of(key, e)))
    }

    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<KeyValue>>, StoreError> {
        check_many(keys)?;
        let st = self.inner.state.lock().expect("store lock");
        Ok(keys.iter().map(|k| st.kv.get(*k).map(|e| kv_of(k, e))).collect())
    }

    async fn range(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<RangePage, StoreError> {
        let st = self.inner.state.lock().expect("store lock");
        let start = match start_after {
            Some(a) if a >= prefix => std::ops::Bound::Excluded(a.to_string()),
            _ => std::ops::Bound::Included(prefix.to_string()),
        };
        let mut iter = st.kv.range((start, std::ops::Bound::Unbounded)).take_while(|(k, _)| k.starts_with(prefix));
        let mut kvs = Vec::new();
        for (k, e) in iter.by_ref() {
            kvs.push(kv_of(k, e));
            if limit != 0 && kvs.len() == limit {
                break;
            }
        }
        let more = iter.next().is_some();
        Ok(RangePage { kvs, more })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        txn.validate()?;
        let mut st = self.inner.state.lock().expect("store lock");
        let succeeded = txn.compares.iter().all(|c| holds(&st, c));
        let ops = if succeeded { &txn.success } else { &txn.failure };
        let revision = apply(&self.inner, &mut st, ops)?;
        Ok(TxnOutcome { succeeded, revision })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let ttl = Duration::from_secs(ttl.as_secs_f64().ceil().max(1.0) as u64);
        let mut st = self.inner.state.lock().expect("store lock");
        let id = st.next_lease;
        st.next_lease += 1;
        st.leases.insert(id, Lease { ttl, deadline: Instant::now() + ttl, keys: BTreeSet::new() });
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<bool, StoreError> {
        let mut st = self.inner.state.lock().expect("store lock");
        match st.leases.get_mut(&lease) {
            Some(l) if l.deadline > Instant::now() => {
                l.deadline = Instant::now() + l.ttl;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut st = self.inner.state.lock().expect("store lock");
        if let Some(l) = st.leases.remove(&lease) {
            let ops: Vec<Op> = l.keys.into_iter().map(|k| Op::Delete(super::Key::new(k))).collect();
            apply(&self.inner, &mut st, &ops)?;
        }
        Ok(())
    }

    async fn watch(&self, prefix: &str, from_revision: i64) -> Result<WatchStream, StoreError> {
        let st = self.inner.state.lock().expect("store lock");
        // Subscribe under the lock so no revision falls between replay and live.
        let rx = self.inner.events.subscribe();
        let mut backlog = Vec::new();
        if from_revision > 0 && from_revision <= st.revision {
            let oldest = st.history.front().map_or(st.revision + 1, |(_, e)| e.revision);
            if from_revision < oldest {
                return Err(StoreError::Compacted { requested: from_revision, oldest });
            }
            backlog.extend(
                st.history
                    .iter()
                    .map(|(_, e)| e)
                    .filter(|e| e.revision >= from_revision && e.key.starts_with(prefix))
                    .cloned(),
            );
        }
        let live_after = st.revision.max(from_revision - 1);
        drop(st);
        let prefix = prefix.to_string();
        let live = futures::stream::unfold(Some(rx), move |rx| {
            let prefix = prefix.clone();
            async move {
                let mut rx = rx?;
                loop {
                    match rx.recv().await {
                        Ok(batch) => {
                            let evs: Vec<_> = batch
                                .iter()
                                .filter(|e| e.revision > live_after && e.key.starts_with(&prefix))
                                .cloned()
                                .map(Ok)
                                .collect();
                            if !evs.is_empty() {
                                return Some((futures::stream::iter(evs), Some(rx)));
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            return Some((futures::stream::iter(vec![Err(StoreError::WatchLagged)]), None));
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        })
        .flatten();
        Ok(Box::pin(futures::stream::iter(backlog.into_iter().map(Ok)).chain(live)))
    }

    async fn revision(&self) -> Result<i64, StoreError> {
        Ok(self.inner.state.lock().expect("store lock").revision)
    }

    async fn count(&self, prefix: &str) -> Result<u64, StoreError> {
        let st = self.inner.state.lock().expect("store lock");
        Ok(st.kv.range(prefix.to_string()..).take_while(|(k, _)| k.starts_with(prefix)).count() as u64)
    }
}
