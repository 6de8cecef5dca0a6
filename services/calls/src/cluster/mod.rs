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

mod leases;
mod membership;
mod mirror;
mod sessions;
mod writes;

use mirror::{Local, View, draining, replaced};
use writes::in_call_ops;

/// Events buffered per signalling stream before its device counts as too
/// slow and is told to reconnect.
pub const SESSION_BUFFER: usize = 512;

/// A session's outgoing events. Boxed: a channel allocates its slots in
/// blocks of 32, and an event is 328 bytes inline, 8 boxed; an idle
/// session holds one block.
pub type EventTx = mpsc::Sender<Box<pb::ServerEvent>>;

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
    /// The store revision the mirror's watch has taken in (this node's own
    /// writes, taken in at once, do not move it).
    watched: watch::Sender<i64>,
    peers: spine_runtime::server::PeerChannels,
    /// The deployment's secrets (pair keys, forwarding proofs).
    pub secrets: spine_runtime::secrets::Secrets,
    /// The service's clock.
    pub clock: Arc<dyn crate::Clock>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("me", &self.me).finish()
    }
}

impl Cluster {
    /// Registers this node (reachable by peers at `addr`) and starts
    /// following the others; ready once the mirror is loaded.
    pub async fn start(
        rt: &Arc<Runtime>,
        config: &crate::CallsConfig,
        addr: String,
        clock: Arc<dyn crate::Clock>,
    ) -> Result<Arc<Cluster>, StoreError> {
        // Misconfigured peer TLS fails the start, not the first relay.
        spine_runtime::server::peer_endpoint(&rt.config, &addr).map_err(StoreError::Backend)?;
        let ttl = Duration::from_secs(config.node_ttl_secs.max(1));
        let reg = rt.store.grant_lease(ttl).await?;
        let state = rt.store.grant_lease(ttl * 3).await?;
        let c = Arc::new(Cluster {
            rt: rt.clone(),
            me: format!("cn_{:016x}", rand::random::<u64>()),
            addr,
            region: config.region.clone(),
            ttl,
            reg_lease: Mutex::new(reg),
            state_lease: Mutex::new(state),
            view: Mutex::new(View::default()),
            ready: watch::channel(false).0,
            watched: watch::channel(0).0,
            peers: Default::default(),
            secrets: rt.secrets().await?.clone(),
            clock,
        });
        c.register().await?;
        tokio::spawn(Self::keep_alive(Arc::downgrade(&c), rt.clone()));
        rt.spawn_follower(Arc::downgrade(&c), "calls", |c: Arc<Cluster>| async move { c.follow().await });
        let mut ready = c.ready.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|r| *r)).await;
        Ok(c)
    }

    /// A channel to another calls node.
    pub fn peer(&self, addr: &str) -> Result<Channel, Status> {
        self.peers.get(&self.rt.config, addr)
    }
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
