//! Signalling sessions: opening a device's stream (registered under the
//! node's lease), replacing an older one, and closing it when the device
//! goes or its credential ends.

use super::*;

impl Cluster {
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
            tx.try_send(Box::new(synced)).expect("empty channel");
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
}

/// Unregisters a session when its stream goes away.
pub(crate) struct SessionGuard {
    cluster: Weak<Cluster>,
    dev: DevKey,
    sid: String,
    key: spine_runtime::store::Key,
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
    rx: mpsc::Receiver<Box<pb::ServerEvent>>,
    /// For the reader of the client's half (signal results).
    pub tx: EventTx,
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
            Poll::Ready(Some(ev)) => Poll::Ready(Some(Ok(*ev))),
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
