//! Membership and the watch loop: registering this node and its sessions,
//! leaving on drain, adopting a dead node's calls, and following
//! `/spine/sys/calls/` into the mirror.

use super::*;

impl Cluster {
    pub(crate) async fn register(&self) -> Result<(), StoreError> {
        let rec = NodeRec { addr: self.addr.clone(), region: self.region.clone(), state_lease: self.state_lease() };
        let sys = self.rt.system_store();
        sys.txn(Txn::new().then(Op::put_leased(sys.key(&node_key(&self.me)), json(&rec), self.reg_lease()))).await?;
        Ok(())
    }

    /// Registers every stream this node holds again (after its
    /// registration lease, which they hang on, was lost).
    pub(crate) async fn register_sessions(&self) -> Result<(), StoreError> {
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
    pub(crate) async fn leave(&self) {
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
    pub(crate) async fn relocate(
        &self,
        id: &str,
        to: &str,
        lease: LeaseId,
        cond: impl Fn(&CallRec) -> bool,
    ) -> Result<bool> {
        let sys = self.rt.system_store();
        for _ in 0..4 {
            let Some(kv) = sys.get(&call_key(id)).await? else { return Ok(false) };
            let mut rec: CallRec = parse(&kv)?;
            if !cond(&rec) {
                return Ok(false);
            }
            rec.home = to.to_string();
            let mut txn = Txn::new().when(Compare::ModRevision(kv.stored_key(), kv.mod_revision)).then(Op::put_leased(
                kv.stored_key(),
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
    pub(crate) async fn follow(&self) -> Result<(), StoreError> {
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
        self.watched.send_replace(rev);
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
            self.watched.send_if_modified(|r| {
                let newer = ev.revision > *r;
                *r = (*r).max(ev.revision);
                newer
            });
            if node_gone {
                self.adopt_orphans().await;
            }
        }
        Err(StoreError::Unavailable("calls watch ended".into()))
    }

    /// Applies one stored change (`value` None: deleted) at `rev`.
    pub(crate) fn apply(&self, v: &mut View, rel: &str, value: Option<&[u8]>, rev: i64) {
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
            self.apply_call(v, id, || value.and_then(|b| serde_json::from_slice::<CallRec>(b).ok()), rev);
        }
    }

    /// Applies one stored change of a call (`rec` None: deleted) at `rev`:
    /// from the watch, or from this node's own committed write. `rec` is
    /// only made (parsed) if the view has not taken in `rev` already, as it
    /// has this node's own writes when the watch brings them back.
    pub(crate) fn apply_call(&self, v: &mut View, id: &str, rec: impl FnOnce() -> Option<CallRec>, rev: i64) {
        if v.calls.get(id).is_some_and(|(_, r)| *r >= rev) {
            return;
        }
        let rec = rec();
        v.calls_rev = v.calls_rev.max(rev);
        match rec {
            Some(rec) => {
                let old = v.calls.insert(id.to_string(), (rec.clone(), rev)).map(|(o, _)| o);
                if let Some(o) = &old {
                    v.index_call(o, false);
                }
                v.index_call(&rec, true);
                // A call moving to another node changes nothing devices see.
                let moved_only = old.as_ref().is_some_and(|o| CallRec { home: rec.home.clone(), ..o.clone() } == rec);
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
                    crate::machine::end(&mut old, crate::model::End::ServiceLost, self.clock.now_ms());
                    v.push(Some(&before), &old, rev);
                    crate::metrics::observe(&self.me, Some(&before), None);
                }
            }
        }
    }

    /// Waits until the mirror is loaded.
    pub async fn wait_ready(&self) {
        let mut r = self.ready.subscribe();
        let _ = r.wait_for(|x| *x).await;
    }

    /// Waits, at most `within`, until the mirror's watch has taken in the
    /// store up to `rev`, so what it holds of sessions and nodes is at least
    /// as new as a record written at `rev`: a call this node wrote is in its
    /// mirror at once (`observe_own`), the sessions its watch brings may
    /// still be on their way. Whether it got there.
    pub async fn caught_up(&self, rev: i64, within: Duration) -> bool {
        let mut w = self.watched.subscribe();
        if *w.borrow_and_update() >= rev {
            return true;
        }
        matches!(tokio::time::timeout(within, w.wait_for(|r| *r >= rev)).await, Ok(Ok(_)))
    }
}
