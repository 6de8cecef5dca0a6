//! The live presence nodes, and which one owns an account.
//!
//! Each node registers `/spine/sys/presence/nodes/<node id>` = its address
//! under a short lease and keeps it alive; every node watches the prefix.
//! An account belongs to the node with the highest rendezvous hash of
//! (node id, account), so when a node joins or leaves only the accounts it
//! owned (or takes) move.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use sha2::{Digest, Sha256};
use spine_runtime::Runtime;
use spine_runtime::store::{EventKind, Op, StoreError, Txn};
use tokio::sync::watch;

const NODES: &str = "presence/nodes/";
/// Lease of a node's registration: a node that dies silently is gone from
/// every ring after at most this long.
pub const NODE_TTL: Duration = Duration::from_secs(5);

/// The rendezvous winner among `nodes` for `key`.
pub fn owner_of<'a>(nodes: impl IntoIterator<Item = &'a str>, key: &str) -> Option<&'a str> {
    nodes.into_iter().max_by_key(|n| {
        let d = Sha256::new().chain_update(n.as_bytes()).chain_update([0]).chain_update(key.as_bytes()).finalize();
        (u64::from_be_bytes(d[..8].try_into().expect("8 bytes")), *n)
    })
}

pub struct Ring {
    pub me: String,
    nodes: RwLock<BTreeMap<String, String>>,
    /// The ring before the last change, to tell which accounts moved.
    previous: RwLock<BTreeMap<String, String>>,
    generation: watch::Sender<u64>,
    changed_at: RwLock<Instant>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").field("me", &self.me).finish()
    }
}

impl Ring {
    /// Registers this node at `addr` and follows the others. Leaves the
    /// ring when the node drains.
    pub async fn start(rt: &Arc<Runtime>, addr: String) -> Result<Arc<Ring>, StoreError> {
        let me = format!("pn_{:016x}", rand::random::<u64>());
        let ring = Arc::new(Ring {
            me: me.clone(),
            nodes: RwLock::new(BTreeMap::from([(me.clone(), addr.clone())])),
            previous: RwLock::new(BTreeMap::new()),
            generation: watch::channel(0).0,
            changed_at: RwLock::new(Instant::now()),
        });
        let sys = rt.system_store();
        let key = sys.key(&format!("{NODES}{me}"));
        let lease = rt.store.grant_lease(NODE_TTL).await?;
        rt.store.txn(Txn::new().then(Op::put_leased(key.clone(), addr.clone().into_bytes(), lease))).await?;
        // Keep the registration alive; re-register if the lease was lost.
        {
            let (rt, key, addr) = (rt.clone(), key.clone(), addr.clone());
            tokio::spawn(async move {
                let mut lease = lease;
                loop {
                    tokio::select! {
                        _ = rt.drain.cancelled() => {
                            let _ = rt.store.revoke_lease(lease).await;
                            return;
                        }
                        _ = tokio::time::sleep(NODE_TTL / 5) => {}
                    }
                    match rt.store.keep_alive(lease).await {
                        Ok(true) => {}
                        Ok(false) => {
                            if let Ok(l) = rt.store.grant_lease(NODE_TTL).await
                                && rt
                                    .store
                                    .txn(Txn::new().then(Op::put_leased(key.clone(), addr.clone().into_bytes(), l)))
                                    .await
                                    .is_ok()
                            {
                                lease = l;
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "presence node lease keep-alive failed"),
                    }
                }
            });
        }
        // Follow the ring: a full read, then a watch; read again on failure.
        rt.spawn_follower(Arc::downgrade(&ring), "presence-ring", {
            let rt = rt.clone();
            move |r: Arc<Ring>| {
                let rt = rt.clone();
                async move { r.follow(&rt).await }
            }
        });
        Ok(ring)
    }

    async fn follow(&self, rt: &Arc<Runtime>) -> Result<(), StoreError> {
        let sys = rt.system_store();
        let rev = rt.store.revision().await?;
        let mut nodes = BTreeMap::new();
        for kv in sys.range_all(NODES).await? {
            nodes.insert(
                sys.relative(&kv.key).trim_start_matches(NODES).to_string(),
                String::from_utf8_lossy(&kv.value).into_owned(),
            );
        }
        let mut events = rt.store.watch(&sys.key(NODES), rev + 1).await?;
        if self.previous.read().expect("ring lock").is_empty() {
            // First read: the cluster as it was before this node joined.
            let mut before = nodes.clone();
            before.remove(&self.me);
            *self.previous.write().expect("ring lock") = before;
        }
        self.replace(nodes);
        while let Some(ev) = events.next().await {
            let ev = ev?;
            let id = sys.relative(&ev.key).trim_start_matches(NODES).to_string();
            let mut nodes = self.nodes.read().expect("ring lock").clone();
            match ev.kind {
                EventKind::Put => nodes.insert(id, String::from_utf8_lossy(&ev.value).into_owned()),
                EventKind::Delete => nodes.remove(&id),
            };
            self.replace(nodes);
        }
        Err(StoreError::Unavailable("ring watch ended".into()))
    }

    fn replace(&self, mut nodes: BTreeMap<String, String>) {
        let mut cur = self.nodes.write().expect("ring lock");
        // Until the store lists this node, it still serves what it owns.
        if nodes.is_empty()
            && let Some(mine) = cur.get(&self.me)
        {
            nodes.insert(self.me.clone(), mine.clone());
        }
        if *cur != nodes {
            *self.previous.write().expect("ring lock") = std::mem::replace(&mut *cur, nodes);
            *self.changed_at.write().expect("ring lock") = Instant::now();
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// The owner of an account key: (node id, address).
    pub fn owner(&self, key: &str) -> (String, String) {
        let nodes = self.nodes.read().expect("ring lock");
        let id = owner_of(nodes.keys().map(String::as_str), key).unwrap_or(&self.me).to_string();
        let addr = nodes.get(&id).cloned().unwrap_or_default();
        (id, addr)
    }

    pub fn members(&self) -> Vec<String> {
        self.nodes.read().expect("ring lock").keys().cloned().collect()
    }

    /// Notified whenever the set of nodes changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Whether `key` changed owner within `window`: its new owner may not
    /// have heard from its devices yet, so it must not call it offline.
    pub fn recently_moved(&self, key: &str, window: Duration) -> bool {
        if self.changed_at.read().expect("ring lock").elapsed() >= window {
            return false;
        }
        let prev = self.previous.read().expect("ring lock");
        let cur = self.nodes.read().expect("ring lock");
        !prev.is_empty()
            && owner_of(prev.keys().map(String::as_str), key) != owner_of(cur.keys().map(String::as_str), key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_moves_only_what_the_leaving_node_owned() {
        let nodes = ["a", "b", "c"];
        let keys: Vec<String> = (0..1000).map(|i| format!("t/{i}")).collect();
        let before: Vec<&str> = keys.iter().map(|k| owner_of(nodes, k).unwrap()).collect();
        let counts = |o: &[&str], n: &str| o.iter().filter(|x| **x == n).count();
        for n in nodes {
            assert!(counts(&before, n) > 250, "{n} owns {} of 1000", counts(&before, n));
        }
        let after: Vec<&str> = keys.iter().map(|k| owner_of(["a", "c"], k).unwrap()).collect();
        for (b, a) in before.iter().zip(&after) {
            if *b != "b" {
                assert_eq!(a, b, "a key moved though its owner stayed");
            }
        }
    }
}
