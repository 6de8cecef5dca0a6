//! The calls nodes, the devices' signalling sessions and the live calls,
//! as every node sees them.
//!
//! Each node registers itself (`calls/nodes/<id>`) under a short
//! registration lease, and holds a second, longer state lease that its calls
//! are stored under. Every node watches `/spine/sys/calls/` and mirrors the
//! nodes, the sessions and the live calls in memory; each change of a call
//! is pushed, from that mirror, to the streams of the call's devices this
//! node holds. So call events reach a device whichever node changed the
//! call; only opaque payloads, which are never stored, travel node to node.
//!
//! A node that drains hands its calls to another live node. A node that
//! dies stops renewing its registration; when that lease runs out every
//! node sees it go and one of them adopts its calls (compare-and-swap on
//! each call) before the state lease runs out too. If no node is left, the
//! state lease expires, the calls vanish, and every device that was told of
//! them learns they ended (SERVICE_LOST): never a ghost call.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::{Stream, StreamExt};
use spine_proto::calls::v1 as pb;
use spine_runtime::Runtime;
use spine_runtime::error::with_reason;
use spine_runtime::store::{Compare, EventKind, KeyValue, LeaseId, Op, StoreError, Txn};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::error::{CallError, Result};
use crate::model::{
    AccountKey, CALLS, CallRec, DevKey, Kind, NODES, NodeRec, SESSIONS, SessionRec, State, call_key, group_call_key,
    json, node_key, pair_key, session_key,
};
use crate::view::render;

/// Events buffered per signalling stream before its device counts as too
/// slow and is told to reconnect.
pub const SESSION_BUFFER: usize = 512;

struct Local {
    sid: String,
    /// The credential the stream opened with (its expiry, key, device).
    principal: spine_runtime::Principal,
    tx: mpsc::Sender<pb::ServerEvent>,
    end: Option<oneshot::Sender<Status>>,
    /// The version of each call last sent, so nothing goes out twice or
    /// out of order.
    sent: HashMap<String, i64>,
}

impl Local {
    fn kill(mut self, status: Status) {
        if let Some(end) = self.end.take() {
            let _ = end.send(status);
        }
    }
}

#[derive(Default)]
struct View {
    nodes: HashMap<String, (NodeRec, i64)>,
    sessions: HashMap<DevKey, (SessionRec, i64)>,
    session_devices: HashMap<AccountKey, HashSet<String>>,
    calls: HashMap<String, (CallRec, i64)>,
    by_account: HashMap<AccountKey, HashSet<String>>,
    local: HashMap<AccountKey, HashMap<String, Local>>,
}

fn replaced() -> Status {
    with_reason(Code::Aborted, "a newer stream of this device replaced this one", "SESSION_REPLACED")
}

fn too_slow() -> Status {
    with_reason(
        Code::ResourceExhausted,
        "stream too slow: reconnect to resume from the current state",
        "STREAM_TOO_SLOW",
    )
}

fn draining() -> Status {
    spine_runtime::error::draining("node draining: reconnect")
}

impl View {
    fn index_call(&mut self, rec: &CallRec, add: bool) {
        for a in rec.audience() {
            if add {
                self.by_account.entry(a).or_default().insert(rec.id.clone());
            } else if let Some(s) = self.by_account.get_mut(&a) {
                s.remove(&rec.id);
                if s.is_empty() {
                    self.by_account.remove(&a);
                }
            }
        }
    }

    /// Sends `rec` at `version` to this node's streams of its audience (and
    /// of `old`'s, so a device removed from a call learns it).
    fn push(&mut self, old: Option<&CallRec>, rec: &CallRec, version: i64) {
        let mut accounts: HashSet<AccountKey> = rec.audience().collect();
        if let Some(o) = old {
            accounts.extend(o.audience());
        }
        for a in accounts {
            let Some(devices) = self.local.get_mut(&a) else { continue };
            let mut slow = Vec::new();
            for (device, l) in devices.iter_mut() {
                if l.sent.get(&rec.id).is_some_and(|v| *v >= version) {
                    continue;
                }
                let dev = DevKey { tenant: a.tenant.clone(), account: a.account.clone(), device: device.clone() };
                let event = pb::ServerEvent { event: Some(pb::server_event::Event::Call(render(rec, version, &dev))) };
                if l.tx.try_send(event).is_err() {
                    slow.push(device.clone());
                } else if rec.state == State::Ended {
                    l.sent.remove(&rec.id);
                } else {
                    l.sent.insert(rec.id.clone(), version);
                }
            }
            for d in slow {
                if let Some(l) = devices.remove(&d) {
                    l.kill(too_slow());
                }
            }
        }
    }

    fn remove_local(&mut self, dev: &DevKey) -> Option<Local> {
        let a = dev.account_key();
        let devices = self.local.get_mut(&a)?;
        let l = devices.remove(&dev.device);
        if devices.is_empty() {
            self.local.remove(&a);
        }
        l
    }
}

pub struct Cluster {
    pub rt: Arc<Runtime>,
    pub me: String,
    pub addr: String,
    pub region: String,
    ttl: Duration,
    reg_lease: Mutex<LeaseId>,
    state_lease: Mutex<LeaseId>,
    view: Mutex<View>,
    ready: watch::Sender<bool>,
    peers: spine_runtime::server::PeerChannels,
    /// The deployment's secrets (pair keys, forwarding proofs).
    pub secrets: spine_runtime::secrets::Secrets,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("me", &self.me).finish()
    }
}

impl Cluster {
    /// Registers this node (reachable by peers at `addr`) and starts
    /// following the others; ready once the mirror is loaded.
    pub async fn start(rt: &Arc<Runtime>, addr: String) -> Result<Arc<Cluster>, StoreError> {
        // Misconfigured peer TLS fails the start, not the first relay.
        spine_runtime::server::peer_endpoint(&rt.config, &addr).map_err(StoreError::Backend)?;
        let ttl = Duration::from_secs(rt.config.calls.node_ttl_secs.max(1));
        let reg = rt.store.grant_lease(ttl).await?;
        let state = rt.store.grant_lease(ttl * 3).await?;
        let c = Arc::new(Cluster {
            rt: rt.clone(),
            me: format!("cn_{:016x}", rand::random::<u64>()),
            addr,
            region: rt.config.calls.region.clone(),
            ttl,
            reg_lease: Mutex::new(reg),
            state_lease: Mutex::new(state),
            view: Mutex::new(View::default()),
            ready: watch::channel(false).0,
            peers: Default::default(),
            secrets: rt.secrets().await?.clone(),
        });
        c.register().await?;
        tokio::spawn(Self::keep_alive(Arc::downgrade(&c), rt.clone()));
        rt.spawn_follower(Arc::downgrade(&c), "calls", |c: Arc<Cluster>| async move { c.follow().await });
        let mut ready = c.ready.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|r| *r)).await;
        Ok(c)
    }

    fn reg_lease(&self) -> LeaseId {
        *self.reg_lease.lock().expect("lease lock")
    }

    pub fn state_lease(&self) -> LeaseId {
        *self.state_lease.lock().expect("lease lock")
    }

    async fn register(&self) -> Result<(), StoreError> {
        let rec = NodeRec { addr: self.addr.clone(), region: self.region.clone(), state_lease: self.state_lease() };
        let sys = self.rt.system_store();
        sys.txn(Txn::new().then(Op::put_leased(sys.key(&node_key(&self.me)), json(&rec), self.reg_lease()))).await?;
        Ok(())
    }

    /// Renews both leases; re-creates a lost one; on drain hands the calls
    /// over, ends the streams and leaves.
    async fn keep_alive(weak: Weak<Cluster>, rt: Arc<Runtime>) {
        let every = weak.upgrade().map_or(Duration::from_secs(1), |c| c.ttl / 5);
        loop {
            tokio::select! {
                _ = rt.drain.cancelled() => {
                    if let Some(c) = weak.upgrade() {
                        c.leave().await;
                    }
                    return;
                }
                _ = tokio::time::sleep(every) => {}
            }
            let Some(c) = weak.upgrade() else { return };
            for (state, lease) in [(false, c.reg_lease()), (true, c.state_lease())] {
                match rt.store.keep_alive(lease).await {
                    Ok(true) => {}
                    Ok(false) => {
                        let ttl = if state { c.ttl * 3 } else { c.ttl };
                        match rt.store.grant_lease(ttl).await {
                            Ok(l) => {
                                let slot = if state { &c.state_lease } else { &c.reg_lease };
                                *slot.lock().expect("lease lock") = l;
                                tracing::warn!(state, "calls node lease was lost; registered again");
                                if let Err(e) = c.register().await {
                                    tracing::warn!(error = %e, "calls node re-registration failed");
                                }
                                if !state && let Err(e) = c.register_sessions().await {
                                    tracing::warn!(error = %e, "sessions not registered again");
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "calls node lease grant failed"),
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "calls node lease keep-alive failed"),
                }
            }
        }
    }

    /// Registers every stream this node holds again (after its
    /// registration lease, which they hang on, was lost).
    async fn register_sessions(&self) -> Result<(), StoreError> {
        let sessions: Vec<(DevKey, String)> = {
            let v = self.view.lock().expect("view lock");
            v.local
                .iter()
                .flat_map(|(a, d)| {
                    d.iter().map(|(dev, l)| {
                        (
                            DevKey { tenant: a.tenant.clone(), account: a.account.clone(), device: dev.clone() },
                            l.sid.clone(),
                        )
                    })
                })
                .collect()
        };
        let sys = self.rt.system_store();
        for (dev, sid) in sessions {
            let rec = SessionRec { node: self.me.clone(), sid, region: self.region.clone() };
            sys.txn(Txn::new().then(Op::put_leased(sys.key(&session_key(&dev)), json(&rec), self.reg_lease()))).await?;
        }
        Ok(())
    }

    /// Draining: hand every call this node runs to another live node, end
    /// the streams (UNAVAILABLE: reconnect), then leave.
    async fn leave(&self) {
        let (mine, target) = {
            let v = self.view.lock().expect("view lock");
            let mine: Vec<String> =
                v.calls.values().filter(|(r, _)| r.home == self.me).map(|(r, _)| r.id.clone()).collect();
            let target = v.nodes.iter().find(|(id, _)| **id != self.me).map(|(id, (n, _))| (id.clone(), n.clone()));
            (mine, target)
        };
        if let Some((id, node)) = &target {
            for call in &mine {
                if let Err(e) = self.relocate(call, id, node.state_lease, |r| r.home == self.me).await {
                    tracing::warn!(error = %e, "could not hand a call over while draining");
                }
            }
            tracing::info!(calls = mine.len(), "calls handed over to another node");
        }
        let locals: Vec<Local> = {
            let mut v = self.view.lock().expect("view lock");
            v.local.drain().flat_map(|(_, d)| d.into_values()).collect()
        };
        for l in locals {
            l.kill(draining());
        }
        let _ = self.rt.store.revoke_lease(self.reg_lease()).await;
        if target.is_some() || mine.is_empty() {
            let _ = self.rt.store.revoke_lease(self.state_lease()).await;
        }
    }

    /// Moves a call to node `to` (its lease `lease`) if `cond` holds of it.
    async fn relocate(&self, id: &str, to: &str, lease: LeaseId, cond: impl Fn(&CallRec) -> bool) -> Result<bool> {
        let sys = self.rt.system_store();
        for _ in 0..4 {
            let Some(kv) = sys.get(&call_key(id)).await? else { return Ok(false) };
            let mut rec: CallRec = parse(&kv)?;
            if !cond(&rec) {
                return Ok(false);
            }
            rec.home = to.to_string();
            let mut txn = Txn::new().when(Compare::ModRevision(kv.key.clone(), kv.mod_revision)).then(Op::put_leased(
                kv.key.clone(),
                json(&rec),
                lease,
            ));
            if let Some(aux) = aux_key(&self.secrets, &rec) {
                txn = txn.then(Op::put_leased(sys.key(&aux), rec.id.clone().into_bytes(), lease));
            }
            txn = txn.then_all(in_call_ops(&sys, None, &rec, lease, true));
            if sys.txn(txn).await?.succeeded {
                return Ok(true);
            }
        }
        Err(CallError::Contended)
    }

    /// Adopts the calls of nodes that are gone.
    pub async fn adopt_orphans(&self) {
        let orphans: Vec<String> = {
            let v = self.view.lock().expect("view lock");
            v.calls.values().filter(|(r, _)| !v.nodes.contains_key(&r.home)).map(|(r, _)| r.id.clone()).collect()
        };
        let sys = self.rt.system_store();
        let mut gone: HashMap<String, bool> = HashMap::new();
        for id in orphans {
            let Some((rec, _)) = self.call(&id) else { continue };
            // The mirror may not have seen a node that just joined: adopt
            // only from a node whose registration the store lacks too.
            let absent = match gone.get(&rec.home) {
                Some(g) => *g,
                None => {
                    let g = matches!(sys.get(&node_key(&rec.home)).await, Ok(None));
                    gone.insert(rec.home.clone(), g);
                    g
                }
            };
            if !absent {
                continue;
            }
            let lease = self.state_lease();
            let orphan = |r: &CallRec| r.home == rec.home;
            match self.relocate(&id, &self.me, lease, orphan).await {
                Ok(true) => tracing::info!("adopted a call of a node that is gone"),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "could not adopt a call"),
            }
        }
    }

    /// Loads the mirror, then follows the watch until it fails.
    async fn follow(&self) -> Result<(), StoreError> {
        let sys = self.rt.system_store();
        let rev = self.rt.store.revision().await?;
        let nodes = sys.range_all(NODES).await?;
        let sessions = sys.range_all(SESSIONS).await?;
        let calls = sys.range_all(CALLS).await?;
        let mut events = self.rt.store.watch(&sys.key("calls/"), rev + 1).await?;
        {
            let mut v = self.view.lock().expect("view lock");
            v.nodes.clear();
            for kv in &nodes {
                if let Ok(n) = serde_json::from_slice::<NodeRec>(&kv.value) {
                    v.nodes.insert(sys.relative(&kv.key).trim_start_matches(NODES).to_string(), (n, kv.mod_revision));
                }
            }
            v.sessions.clear();
            v.session_devices.clear();
            for kv in &sessions {
                self.apply(&mut v, sys.relative(&kv.key), Some(&kv.value), kv.mod_revision);
            }
            let live: HashSet<String> =
                calls.iter().map(|kv| sys.relative(&kv.key).trim_start_matches(CALLS).to_string()).collect();
            let gone: Vec<(String, i64)> =
                v.calls.iter().filter(|(id, _)| !live.contains(*id)).map(|(id, (_, r))| (id.clone(), *r)).collect();
            for (id, r) in gone {
                self.apply(&mut v, &call_key(&id), None, r + 1);
            }
            for kv in &calls {
                self.apply(&mut v, sys.relative(&kv.key), Some(&kv.value), kv.mod_revision);
            }
        }
        self.ready.send_replace(true);
        while let Some(ev) = events.next().await {
            let ev = ev?;
            let rel = sys.relative(&ev.key).to_string();
            let node_gone = ev.kind == EventKind::Delete && rel.starts_with(NODES);
            {
                let mut v = self.view.lock().expect("view lock");
                let value = (ev.kind == EventKind::Put).then_some(ev.value.as_slice());
                self.apply(&mut v, &rel, value, ev.revision);
            }
            if node_gone {
                self.adopt_orphans().await;
            }
        }
        Err(StoreError::Unavailable("calls watch ended".into()))
    }

    /// Applies one stored change (`value` None: deleted) at `rev`.
    fn apply(&self, v: &mut View, rel: &str, value: Option<&[u8]>, rev: i64) {
        if let Some(id) = rel.strip_prefix(NODES) {
            match value.and_then(|b| serde_json::from_slice::<NodeRec>(b).ok()) {
                Some(n) => {
                    v.nodes.insert(id.to_string(), (n, rev));
                }
                None => {
                    if v.nodes.get(id).is_some_and(|(_, r)| *r < rev) {
                        v.nodes.remove(id);
                    }
                }
            }
        } else if let Some(rest) = rel.strip_prefix(SESSIONS) {
            let Some(dev) = DevKey::parse(rest) else { return };
            if v.sessions.get(&dev).is_some_and(|(_, r)| *r >= rev) {
                return;
            }
            match value.and_then(|b| serde_json::from_slice::<SessionRec>(b).ok()) {
                Some(s) => {
                    let replaced_here = v
                        .local
                        .get(&dev.account_key())
                        .and_then(|d| d.get(&dev.device))
                        .is_some_and(|l| l.sid != s.sid);
                    if replaced_here && let Some(l) = v.remove_local(&dev) {
                        l.kill(replaced());
                    }
                    v.session_devices.entry(dev.account_key()).or_default().insert(dev.device.clone());
                    v.sessions.insert(dev, (s, rev));
                }
                None => {
                    if let Some(set) = v.session_devices.get_mut(&dev.account_key()) {
                        set.remove(&dev.device);
                    }
                    v.sessions.remove(&dev);
                }
            }
        } else if let Some(id) = rel.strip_prefix(CALLS) {
            if v.calls.get(id).is_some_and(|(_, r)| *r >= rev) {
                return;
            }
            match value.and_then(|b| serde_json::from_slice::<CallRec>(b).ok()) {
                Some(rec) => {
                    let old = v.calls.insert(id.to_string(), (rec.clone(), rev)).map(|(o, _)| o);
                    if let Some(o) = &old {
                        v.index_call(o, false);
                    }
                    v.index_call(&rec, true);
                    // A call moving to another node changes nothing devices see.
                    let moved_only =
                        old.as_ref().is_some_and(|o| CallRec { home: rec.home.clone(), ..o.clone() } == rec);
                    if !moved_only {
                        v.push(old.as_ref(), &rec, rev);
                    }
                    crate::metrics::observe(&self.me, old.as_ref(), Some(&rec));
                }
                None => {
                    let Some((mut old, _)) = v.calls.remove(id) else { return };
                    v.index_call(&old, false);
                    if old.state != State::Ended {
                        // Lost with every node that could hold it.
                        let before = old.clone();
                        crate::machine::end(&mut old, crate::model::End::ServiceLost, crate::model::now_ms());
                        v.push(Some(&before), &old, rev);
                        crate::metrics::observe(&self.me, Some(&before), None);
                    }
                }
            }
        }
    }

    /// Waits until the mirror is loaded.
    pub async fn wait_ready(&self) {
        let mut r = self.ready.subscribe();
        let _ = r.wait_for(|x| *x).await;
    }

    /// The mirrored call and its version.
    pub fn call(&self, id: &str) -> Option<(CallRec, i64)> {
        self.view.lock().expect("view lock").calls.get(id).cloned()
    }

    /// A call, read from the store (not the mirror, which may lag).
    pub async fn read_call(&self, id: &str) -> Result<Option<(CallRec, i64)>> {
        let sys = self.rt.system_store();
        match sys.get(&call_key(id)).await? {
            Some(kv) => Ok(Some((parse(&kv)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    /// The live calls an account takes part in.
    pub fn calls_of(&self, a: &AccountKey) -> Vec<(CallRec, i64)> {
        let v = self.view.lock().expect("view lock");
        v.by_account
            .get(a)
            .map(|ids| ids.iter().filter_map(|id| v.calls.get(id).cloned()).collect())
            .unwrap_or_default()
    }

    /// Every live call this node runs (or that no live node runs).
    pub fn my_calls(&self) -> Vec<(CallRec, i64)> {
        let v = self.view.lock().expect("view lock");
        v.calls.values().filter(|(r, _)| r.home == self.me || !v.nodes.contains_key(&r.home)).cloned().collect()
    }

    /// Where an account's devices hold streams: (device, node id, node
    /// address, region).
    pub fn sessions_of(&self, a: &AccountKey) -> Vec<(String, String, String, String)> {
        let v = self.view.lock().expect("view lock");
        let Some(devices) = v.session_devices.get(a) else { return vec![] };
        devices
            .iter()
            .filter_map(|d| {
                let dev = DevKey { tenant: a.tenant.clone(), account: a.account.clone(), device: d.clone() };
                let (s, _) = v.sessions.get(&dev)?;
                let addr = v.nodes.get(&s.node).map(|(n, _)| n.addr.clone()).unwrap_or_default();
                Some((d.clone(), s.node.clone(), addr, s.region.clone()))
            })
            .collect()
    }

    /// The session of one device: (node id, node address, region).
    pub fn session_of(&self, d: &DevKey) -> Option<(String, String, String)> {
        let v = self.view.lock().expect("view lock");
        let (s, _) = v.sessions.get(d)?;
        let addr = v.nodes.get(&s.node).map(|(n, _)| n.addr.clone()).unwrap_or_default();
        Some((s.node.clone(), addr, s.region.clone()))
    }

    /// Sends an event to a device's stream on this node. False if this node
    /// holds no stream of it.
    pub fn deliver_local(&self, d: &DevKey, event: pb::ServerEvent) -> bool {
        let mut v = self.view.lock().expect("view lock");
        let Some(l) = v.local.get(&d.account_key()).and_then(|m| m.get(&d.device)) else { return false };
        if l.tx.try_send(event).is_ok() {
            return true;
        }
        if let Some(l) = v.remove_local(d) {
            l.kill(too_slow());
        }
        false
    }

    /// The lease and home for a write of a call whose home is `home`: its
    /// home's if that node is alive, else this node's (it adopts the call).
    /// A draining node gives its own calls, and new ones, to another live
    /// node instead: its lease is about to be revoked, taking with it every
    /// key under it.
    fn home_lease(&self, home: &str) -> Result<(String, LeaseId)> {
        let v = self.view.lock().expect("view lock");
        if home != self.me
            && let Some((n, _)) = v.nodes.get(home)
        {
            return Ok((home.to_string(), n.state_lease));
        }
        if self.rt.drain.is_cancelled() {
            return v
                .nodes
                .iter()
                .find(|(id, _)| **id != self.me)
                .map(|(id, (n, _))| (id.clone(), n.state_lease))
                .ok_or(CallError::Draining);
        }
        Ok((self.me.clone(), self.state_lease()))
    }

    /// Creates a call if its pair or group key is free: `Ok(None)` if it
    /// is taken (by the call it names).
    pub async fn create(&self, mut rec: CallRec) -> Result<Result<(CallRec, i64), String>> {
        let sys = self.rt.system_store();
        let aux = aux_key(&self.secrets, &rec).expect("new calls have a pair or group key");
        let (home, lease) = self.home_lease(&self.me)?;
        rec.home = home;
        let txn = Txn::new()
            .when(Compare::Absent(sys.key(&aux)))
            .then(Op::put_leased(sys.key(&call_key(&rec.id)), json(&rec), lease))
            .then(Op::put_leased(sys.key(&aux), rec.id.clone().into_bytes(), lease))
            .then_all(in_call_ops(&sys, None, &rec, lease, true));
        let out = sys.txn(txn).await?;
        if out.succeeded {
            crate::metrics::started(&rec);
            tracing::debug!(call = %spine_runtime::telemetry::redact(&rec.id), kind = ?rec.kind, "call started");
            return Ok(Ok((rec, out.revision)));
        }
        match sys.get(&aux).await? {
            Some(kv) => Ok(Err(String::from_utf8_lossy(&kv.value).into_owned())),
            None => Ok(Err(String::new())),
        }
    }

    /// Frees a pair or group key left by a call that is gone or ended.
    pub async fn clear_aux(&self, aux: &str, holder: &str) -> Result<()> {
        let sys = self.rt.system_store();
        if let Some(kv) = sys.get(aux).await?
            && String::from_utf8_lossy(&kv.value) == holder
        {
            let live = self.read_call(holder).await?.is_some_and(|(r, _)| r.state != State::Ended);
            if !live {
                sys.txn(
                    Txn::new().when(Compare::ModRevision(sys.key(aux), kv.mod_revision)).then(Op::delete(sys.key(aux))),
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Applies a transition with compare-and-swap: reads the call, runs `f`,
    /// writes it back if it changed. An ended call is written once (so every
    /// node pushes its end), its record kept if the tenants' policies say
    /// so, then deleted.
    pub async fn update<F>(&self, id: &str, f: F) -> Result<(CallRec, i64)>
    where
        F: Fn(&mut CallRec) -> Result<()>,
    {
        let sys = self.rt.system_store();
        // First from the mirror (usually current: no read), then from the
        // store whenever the compare-and-swap finds it stale.
        let mut cached = self.call(id);
        for _ in 0..16 {
            let (before, rev, mirrored) = match cached.take() {
                Some((c, r)) => (c, r, true),
                None => {
                    let Some(kv) = sys.get(&call_key(id)).await? else { return Err(CallError::NotFound) };
                    (parse::<CallRec>(&kv)?, kv.mod_revision, false)
                }
            };
            let key = sys.key(&call_key(id));
            let mut rec = before.clone();
            // A refusal or a no-op on a mirrored copy is checked again on
            // the stored call: the mirror may lag a change made elsewhere.
            match f(&mut rec) {
                Err(_) if mirrored => continue,
                Err(e) => return Err(e),
                Ok(()) if rec == before && mirrored => continue,
                Ok(()) if rec == before => return Ok((rec, rev)),
                Ok(()) => {}
            }
            let (home, lease) = self.home_lease(&rec.home)?;
            rec.home = home;
            let mut txn = Txn::new().when(Compare::ModRevision(key.clone(), rev)).then(Op::put_leased(
                key.clone(),
                json(&rec),
                lease,
            ));
            if let Some(aux) = aux_key(&self.secrets, &rec) {
                txn = txn.then(if rec.state == State::Ended {
                    Op::delete(sys.key(&aux))
                } else {
                    Op::put_leased(sys.key(&aux), rec.id.clone().into_bytes(), lease)
                });
            }
            txn = txn.then_all(in_call_ops(&sys, Some(&before), &rec, lease, rec.home != before.home));
            let out = sys.txn(txn).await?;
            if !out.succeeded {
                continue;
            }
            if rec.state == State::Ended {
                crate::records::keep(&self.rt, &rec).await;
                let _ = sys
                    .txn(Txn::new().when(Compare::ModRevision(key.clone(), out.revision)).then(Op::delete(key)))
                    .await;
            }
            crate::metrics::transition(&before, &rec);
            tracing::debug!(
                call = %spine_runtime::telemetry::redact(&rec.id),
                from = ?before.state,
                to = ?rec.state,
                end = ?rec.end,
                legs = rec.legs.len(),
                "call changed"
            );
            return Ok((rec, out.revision));
        }
        Err(CallError::Contended)
    }

    /// Deletes an ended call that lingered (its ender failed before
    /// deleting it).
    pub async fn delete_ended(&self, id: &str, rev: i64) -> Result<()> {
        let sys = self.rt.system_store();
        let key = sys.key(&call_key(id));
        sys.txn(Txn::new().when(Compare::ModRevision(key.clone(), rev)).then(Op::delete(key))).await?;
        Ok(())
    }

    /// Opens a device's signalling session: the `synced` snapshot first,
    /// then every change, from this node's mirror; registered in the store
    /// so payloads and replacements find it.
    pub async fn open(
        self: &Arc<Self>,
        dev: DevKey,
        principal: spine_runtime::Principal,
    ) -> std::result::Result<SessionOut, Status> {
        if self.rt.drain.is_cancelled() {
            return Err(draining());
        }
        self.wait_ready().await;
        let sid = format!("{:016x}", rand::random::<u64>());
        let (tx, rx) = mpsc::channel(SESSION_BUFFER);
        let (end_tx, end_rx) = oneshot::channel();
        {
            let mut v = self.view.lock().expect("view lock");
            if let Some(old) = v.remove_local(&dev) {
                old.kill(replaced());
            }
            let mut sent = HashMap::new();
            let mut calls = Vec::new();
            if let Some(ids) = v.by_account.get(&dev.account_key()) {
                for id in ids {
                    if let Some((rec, ver)) = v.calls.get(id)
                        && rec.state != State::Ended
                    {
                        calls.push(render(rec, *ver, &dev));
                        sent.insert(id.clone(), *ver);
                    }
                }
            }
            calls.sort_by_key(|c| c.version);
            let synced = pb::ServerEvent { event: Some(pb::server_event::Event::Synced(pb::Synced { calls })) };
            tx.try_send(synced).expect("empty channel");
            v.local.entry(dev.account_key()).or_default().insert(
                dev.device.clone(),
                Local { sid: sid.clone(), principal, tx: tx.clone(), end: Some(end_tx), sent },
            );
        }
        let sys = self.rt.system_store();
        let rec = SessionRec { node: self.me.clone(), sid: sid.clone(), region: self.region.clone() };
        let key = sys.key(&session_key(&dev));
        match sys.txn(Txn::new().then(Op::put_leased(key.clone(), json(&rec), self.reg_lease()))).await {
            Ok(_) => {}
            Err(e) => {
                let mut v = self.view.lock().expect("view lock");
                if v.local.get(&dev.account_key()).and_then(|m| m.get(&dev.device)).is_some_and(|l| l.sid == sid) {
                    v.remove_local(&dev);
                }
                return Err(CallError::from(e).into());
            }
        }
        crate::metrics::sessions(1);
        Ok(SessionOut {
            rx,
            tx,
            end: Some(end_rx),
            done: false,
            _guard: SessionGuard { cluster: Arc::downgrade(self), dev, sid, key },
        })
    }

    /// Ends the streams whose credential no longer holds (the token
    /// expired, the device was revoked or its account deleted, the token's
    /// signing key withdrawn), with the status every service's streams end
    /// with. The device reconnects with a fresh token and `synced` brings it
    /// up to date.
    pub fn close_unauthenticated(&self) {
        let now = spine_runtime::now_secs();
        let mut v = self.view.lock().expect("view lock");
        let mut ended: Vec<(DevKey, Status)> = Vec::new();
        for (a, devices) in &v.local {
            for (d, l) in devices {
                if let Err(status) = self.rt.auth.still_valid(&l.principal, now) {
                    ended.push((
                        DevKey { tenant: a.tenant.clone(), account: a.account.clone(), device: d.clone() },
                        status,
                    ));
                }
            }
        }
        for (d, status) in ended {
            if let Some(l) = v.remove_local(&d) {
                l.kill(status);
            }
        }
    }

    /// A channel to another calls node.
    pub fn peer(&self, addr: &str) -> Result<Channel, Status> {
        self.peers.get(&self.rt.config, addr)
    }
}

/// Most in-call markers one call keeps (its transactions stay within the
/// store's operation limit); participants past it are not shown in call.
const MAX_IN_CALL_MARKERS: usize = 100;

/// The accounts presence shows IN_CALL for this call: those with a device
/// in it once it is answered (or, for group calls, running).
fn in_call(rec: &CallRec) -> std::collections::BTreeSet<AccountKey> {
    if rec.state != State::Active {
        return Default::default();
    }
    rec.legs.iter().map(|l| l.dev.account_key()).take(MAX_IN_CALL_MARKERS).collect()
}

/// The writes that bring the in-call markers from `before` to `after`
/// (all of `after`'s again when the lease changes).
fn in_call_ops(
    sys: &spine_runtime::store::SystemStore,
    before: Option<&CallRec>,
    after: &CallRec,
    lease: LeaseId,
    relet: bool,
) -> Vec<Op> {
    let old = before.map(in_call).unwrap_or_default();
    let new = in_call(after);
    let key = |a: &AccountKey| sys.key(&spine_runtime::directory::in_call_key(&a.tenant, &a.account, &after.id));
    let mut ops: Vec<Op> = old.difference(&new).map(|a| Op::delete(key(a))).collect();
    ops.extend(new.iter().filter(|a| relet || !old.contains(*a)).map(|a| Op::put_leased(key(a), Vec::new(), lease)));
    ops
}

/// The pair key of a direct call, the group key of a group call.
pub fn aux_key(secrets: &spine_runtime::secrets::Secrets, rec: &CallRec) -> Option<String> {
    match rec.kind {
        Kind::Direct => Some(pair_key(secrets, &rec.caller()?.who, &rec.callee()?.who)),
        Kind::Group => Some(group_call_key(&rec.group.as_ref()?.gid)),
    }
}

pub fn parse<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Result<T> {
    serde_json::from_slice(&kv.value).map_err(|e| StoreError::Backend(format!("stored call state: {e}")).into())
}

/// Unregisters a session when its stream goes away.
struct SessionGuard {
    cluster: Weak<Cluster>,
    dev: DevKey,
    sid: String,
    key: String,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let Some(c) = self.cluster.upgrade() else { return };
        crate::metrics::sessions(-1);
        {
            let mut v = c.view.lock().expect("view lock");
            if v.local
                .get(&self.dev.account_key())
                .and_then(|m| m.get(&self.dev.device))
                .is_some_and(|l| l.sid == self.sid)
            {
                v.remove_local(&self.dev);
            }
        }
        let (key, sid) = (self.key.clone(), self.sid.clone());
        tokio::spawn(async move {
            // Only this stream's registration: a newer stream of the device
            // (here or on another node) has its own session id.
            let result = async {
                let Some(kv) = c.rt.store.get(&key).await? else { return Ok(()) };
                if serde_json::from_slice::<SessionRec>(&kv.value).is_ok_and(|s| s.sid == sid) {
                    let txn = Txn::new().when(Compare::ModRevision(key.clone(), kv.mod_revision)).then(Op::delete(key));
                    c.rt.store.txn(txn).await?;
                }
                Ok::<(), StoreError>(())
            };
            if let Err(e) = result.await {
                tracing::debug!(error = %e, "session key left to its lease");
            }
        });
    }
}

/// The server half of a signalling stream.
pub struct SessionOut {
    rx: mpsc::Receiver<pb::ServerEvent>,
    /// For the reader of the client's half (signal results).
    pub tx: mpsc::Sender<pb::ServerEvent>,
    end: Option<oneshot::Receiver<Status>>,
    done: bool,
    /// Unregisters the session when the stream is dropped.
    _guard: SessionGuard,
}

impl Stream for SessionOut {
    type Item = std::result::Result<pb::ServerEvent, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        use std::future::Future;
        use std::task::Poll;
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(end) = self.end.as_mut()
            && let Poll::Ready(r) = Pin::new(end).poll(cx)
        {
            self.end = None;
            if let Ok(status) = r {
                self.done = true;
                return Poll::Ready(Some(Err(status)));
            }
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(ev)) => Poll::Ready(Some(Ok(ev))),
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
