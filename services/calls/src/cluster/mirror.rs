//! The mirror of nodes, sessions and live calls, and this node's streams,
//! under one lock: each change of a call is pushed from here to the
//! streams of its devices, in version order, at most once.

use super::*;

impl Cluster {
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

    /// The store revision of the last call change the mirror took in: the
    /// rooms of every media node are the same while it is.
    pub fn calls_revision(&self) -> i64 {
        self.view.lock().expect("view lock").calls_rev
    }

    /// The rooms media node `node` must hold now (from the mirror).
    pub fn rooms_on(&self, node: &str, now_secs: i64, period: Duration) -> pb::MediaRooms {
        let v = self.view.lock().expect("view lock");
        crate::admission::rooms_on(&self.secrets, node, v.calls.values().map(|(r, _)| r), now_secs, period)
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
        if l.tx.try_send(Box::new(event)).is_ok() {
            return true;
        }
        if let Some(l) = v.remove_local(d) {
            l.kill(too_slow());
        }
        false
    }
}

pub(crate) struct Local {
    pub(crate) sid: String,
    /// The credential the stream opened with (its expiry, key, device).
    pub(crate) principal: spine_runtime::Principal,
    pub(crate) tx: EventTx,
    pub(crate) end: Option<oneshot::Sender<Status>>,
    /// The version of each call last sent, so nothing goes out twice or
    /// out of order.
    pub(crate) sent: HashMap<String, i64>,
}

impl Local {
    pub(crate) fn kill(mut self, status: Status) {
        if let Some(end) = self.end.take() {
            let _ = end.send(status);
        }
    }
}

#[derive(Default)]
pub(crate) struct View {
    pub(crate) nodes: HashMap<String, (NodeRec, i64)>,
    pub(crate) sessions: HashMap<DevKey, (SessionRec, i64)>,
    pub(crate) session_devices: HashMap<AccountKey, HashSet<String>>,
    pub(crate) calls: HashMap<String, (CallRec, i64)>,
    /// The revision of the last call change taken in.
    pub(crate) calls_rev: i64,
    pub(crate) by_account: HashMap<AccountKey, HashSet<String>>,
    pub(crate) local: HashMap<AccountKey, HashMap<String, Local>>,
}

pub(crate) fn replaced() -> Status {
    with_reason(Code::Aborted, "a newer stream of this device replaced this one", "SESSION_REPLACED")
}

pub(crate) fn too_slow() -> Status {
    with_reason(
        Code::ResourceExhausted,
        "stream too slow: reconnect to resume from the current state",
        "STREAM_TOO_SLOW",
    )
}

pub(crate) fn draining() -> Status {
    spine_runtime::error::draining("node draining: reconnect")
}

impl View {
    pub(crate) fn index_call(&mut self, rec: &CallRec, add: bool) {
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
    pub(crate) fn push(&mut self, old: Option<&CallRec>, rec: &CallRec, version: i64) {
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
                if l.tx.try_send(Box::new(event)).is_err() {
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

    pub(crate) fn remove_local(&mut self, dev: &DevKey) -> Option<Local> {
        let a = dev.account_key();
        let devices = self.local.get_mut(&a)?;
        let l = devices.remove(&dev.device);
        if devices.is_empty() {
            self.local.remove(&a);
        }
        l
    }
}
