//! spine-presence: who is online, told only to those allowed to know.
//!
//! Presence is soft state. Each account is owned by one node (rendezvous
//! hashing over the live presence nodes registered in the store); the owner
//! holds its devices' announcements in memory and streams changes to its
//! watchers, coalesced. Requests reaching another node are forwarded to the
//! owner with the caller's own credential, so the owner authenticates and
//! authorizes them like any request.
//!
//! It must never write presence to disk or to the store, and never let a
//! watcher tell an account it may not see from one that does not exist.

pub mod config;
mod data;
pub mod error;
mod in_call;
mod outbox;
mod review;
mod ring;
mod service;
mod state;
mod visibility;

use std::sync::Arc;
use std::time::Duration;

pub use config::PresenceConfig;
use spine_proto::presence::v1::presence_server::PresenceServer;
use spine_runtime::server::PeerChannels;
use spine_runtime::service::{Installer, SpineService};
use spine_runtime::{Runtime, StartError};
use tonic::transport::Channel;

pub use ring::owner_of;

/// Longest announcement TTL; also how long a node that just took over an
/// account waits for its devices before calling it offline.
pub const MAX_TTL: Duration = Duration::from_secs(300);

pub(crate) struct Node {
    rt: Arc<Runtime>,
    ring: Arc<ring::Ring>,
    owner: Arc<state::Owner>,
    peers: PeerChannels,
    /// Forwarding proofs between presence nodes.
    secrets: spine_runtime::secrets::Secrets,
    /// Watch streams open on this node, per device.
    watches: std::sync::Mutex<std::collections::HashMap<(String, String), usize>>,
    /// Most watch streams one device may hold open on this node.
    max_watches_per_device: usize,
}

impl Node {
    /// A channel to another presence node.
    fn peer(&self, addr: &str) -> Result<Channel, tonic::Status> {
        self.peers.get(&self.rt.config, addr)
    }
}

/// The node ids of the presence ring this node sees (for tests and tools).
pub struct RingView(Arc<ring::Ring>, Arc<state::Owner>);

impl RingView {
    pub fn me(&self) -> &str {
        &self.0.me
    }
    pub fn members(&self) -> Vec<String> {
        self.0.members()
    }
    pub fn owner(&self, tenant: &str, account: &str) -> String {
        self.0.owner(&format!("{tenant}/{account}")).0
    }
    /// How many accounts this node holds in memory (announced, watched,
    /// in a call, or with a last-seen).
    pub fn accounts_held(&self) -> usize {
        self.1.held()
    }
}

/// The presence service: soft state owned by one node per account.
#[derive(Debug)]
pub struct Presence;

#[async_trait::async_trait]
impl SpineService for Presence {
    const NAME: &'static str = "presence";
    type Handle = RingView;
    type Options = ();

    /// Adds the presence service (this node reachable by peers at
    /// `at.advertise`), registers its account-data hook and starts its
    /// upkeep.
    async fn install(at: &mut Installer<'_>, (): ()) -> Result<RingView, StartError> {
        let rt = at.rt;
        let config: PresenceConfig = rt.config.section().map_err(StartError::Config)?;
        // Misconfigured peer TLS fails the start, not the first forward.
        spine_runtime::server::peer_endpoint(&rt.config, &at.advertise).map_err(StartError::Config)?;
        let ring = ring::Ring::start(rt, at.advertise.clone()).await?;
        let node = Arc::new(Node {
            rt: rt.clone(),
            ring: ring.clone(),
            owner: state::Owner::new(),
            peers: PeerChannels::default(),
            secrets: rt.secrets().await?.clone(),
            watches: Default::default(),
            max_watches_per_device: config.max_watches_per_device,
        });
        rt.register_account_data(Arc::new(data::PresenceData(node.owner.clone())));
        rt.spawn_follower(Arc::downgrade(&node.owner), "presence-in-call", {
            let rt = rt.clone();
            move |owner| in_call::follow(rt.clone(), owner)
        });
        spine_runtime::add_service!(at, PresenceServer::new(service::PresenceApi(node.clone())));
        Runtime::spawn_upkeep(
            Arc::downgrade(&node.owner),
            Duration::from_millis(250),
            "presence-expiry",
            |o: Arc<state::Owner>| async move {
                o.expire();
                Ok::<(), String>(())
            },
        );
        // Views follow the records that decide them (settings, contacts,
        // blocks, the account itself), re-checked as they change.
        rt.spawn_follower(Arc::downgrade(&node), "presence-consent", review::follow);
        Ok(RingView(ring, node.owner.clone()))
    }
}
