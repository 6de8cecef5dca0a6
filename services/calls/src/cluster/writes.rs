//! Store writes of calls: create, update and delete, each one transaction
//! with the call's pair key and in-call markers, on the lease of the
//! node that runs the call.

use super::*;

impl Cluster {
    /// The lease and home for a write of a call whose home is `home`: its
    /// home's if that node is alive, else this node's (it adopts the call).
    /// A draining node gives its own calls, and new ones, to another live
    /// node instead: its lease is about to be revoked, taking with it every
    /// key under it.
    pub(crate) fn home_lease(&self, home: &str) -> Result<(String, LeaseId)> {
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
            self.observe_own(&rec, out.revision);
            crate::metrics::started(&rec);
            tracing::debug!(call = %self.rt.redact(&rec.id), kind = ?rec.kind, "call started");
            return Ok(Ok((rec, out.revision)));
        }
        match sys.get(&aux).await? {
            Some(kv) => Ok(Err(String::from_utf8_lossy(&kv.value).into_owned())),
            None => Ok(Err(String::new())),
        }
    }

    /// Takes this node's own committed write of a call into the mirror at
    /// once, pushing it to this node's streams without waiting for the
    /// store's watch to bring it back (a watch delivery per transition on
    /// the setup's path). Skipped if the mirror has already seen this
    /// revision or a later one of the calls records: the watch delivers in
    /// revision order, so it has applied this write (and anything after it,
    /// such as the call's deletion) already. The watch's own copy of the
    /// write is then a no-op (same revision), and each stream gets a
    /// version once.
    fn observe_own(&self, rec: &CallRec, rev: i64) {
        let mut v = self.view.lock().expect("view lock");
        if v.calls_rev >= rev {
            return;
        }
        self.apply_call(&mut v, &rec.id, || Some(rec.clone()), rev);
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
            // The pair or group key lives and dies with the call: freed when
            // it ends, moved to the new home's lease when it moves (on the
            // same home it holds the call's id on the same lease already).
            let moved = rec.home != before.home;
            if let Some(aux) = aux_key(&self.secrets, &rec) {
                if rec.state == State::Ended {
                    txn = txn.then(Op::delete(sys.key(&aux)));
                } else if moved {
                    txn = txn.then(Op::put_leased(sys.key(&aux), rec.id.clone().into_bytes(), lease));
                }
            }
            txn = txn.then_all(in_call_ops(&sys, Some(&before), &rec, lease, moved));
            let out = sys.txn(txn).await?;
            if !out.succeeded {
                continue;
            }
            self.observe_own(&rec, out.revision);
            if rec.state == State::Ended {
                crate::records::keep(&self.rt, &rec).await;
                let _ = sys
                    .txn(Txn::new().when(Compare::ModRevision(key.clone(), out.revision)).then(Op::delete(key)))
                    .await;
            }
            crate::metrics::transition(&before, &rec);
            tracing::debug!(
                call = %self.rt.redact(&rec.id),
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
}

/// Most in-call markers one call keeps (its transactions stay within the
/// store's operation limit); participants past it are not shown in call.
pub(crate) const MAX_IN_CALL_MARKERS: usize = 100;

/// The accounts presence shows IN_CALL for this call: those with a device
/// in it once it is answered (or, for group calls, running).
pub(crate) fn in_call(rec: &CallRec) -> std::collections::BTreeSet<AccountKey> {
    if rec.state != State::Active {
        return Default::default();
    }
    rec.legs.iter().map(|l| l.dev.account_key()).take(MAX_IN_CALL_MARKERS).collect()
}

/// The writes that bring the in-call markers from `before` to `after`
/// (all of `after`'s again when the lease changes).
pub(crate) fn in_call_ops(
    sys: &spine_runtime::store::SystemStore,
    before: Option<&CallRec>,
    after: &CallRec,
    lease: LeaseId,
    relet: bool,
) -> Vec<Op> {
    let old = before.map(in_call).unwrap_or_default();
    let new = in_call(after);
    let key = |a: &AccountKey| sys.key(&spine_read_models::in_call::in_call_key(&a.tenant, &a.account, &after.id));
    let mut ops: Vec<Op> = old.difference(&new).map(|a| Op::delete(key(a))).collect();
    ops.extend(new.iter().filter(|a| relet || !old.contains(*a)).map(|a| Op::put_leased(key(a), Vec::new(), lease)));
    ops
}
