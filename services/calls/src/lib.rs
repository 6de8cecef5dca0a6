//! spine-calls: one call infrastructure for every product.
//!
//! Devices hold one signalling stream each, registered in the store under
//! their node's lease. Calls are state machines run by the server: each
//! live call is one record in the store (under its home node's lease),
//! changed by compare-and-swap from whichever node a request reaches, and
//! pushed to every device concerned by the node holding its stream, from
//! that node's mirror of the store. Signalling payloads are relayed as
//! opaque bytes, node to node when needed, and never stored. Group calls
//! are bound to MLS groups of the groups service: only roster devices may
//! join, and media keys come from the group's exporter on the devices.
//!
//! It must never parse, log or store a signalling payload, hold a media
//! key, or keep anything about a call after it ends beyond what the
//! tenant's record policy names.

mod admission;
pub mod clock;
mod cluster;
pub mod config;
mod data;
mod error;
mod machine;
mod media;
mod metrics;
mod model;
mod placement;
mod records;
mod relay;
mod rules;
mod service;
mod turn;
mod view;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{CallsConfig, TurnConfig};
use spine_proto::calls::v1::call_records_server::CallRecordsServer;
use spine_proto::calls::v1::calls_server::CallsServer;
use spine_proto::calls::v1::media_nodes_server::MediaNodesServer;
use spine_runtime::service::{Installer, SpineService};
use spine_runtime::store::{SharedSpace, StoreError};
use spine_runtime::{Runtime, StartError};

pub use relay::MAX_PAYLOAD;
pub use turn::mint as mint_turn_credentials;

pub(crate) struct Node {
    rt: Arc<Runtime>,
    cluster: Arc<cluster::Cluster>,
    groups: SharedSpace,
    /// Lease for idempotency answers (media-node credentials).
    idem_lease: spine_runtime::store::SharedLease,
    /// Legs of the calls this node runs whose device has no signalling
    /// session: since when (ms). Kept in memory by the call's home: a call
    /// adopted by another node starts counting again there.
    unattended: std::sync::Mutex<HashMap<(String, String), i64>>,
    /// The `[calls]` section.
    config: CallsConfig,
    /// Time, for every timer and timestamp (tests drive it).
    clock: Arc<dyn Clock>,
    /// Rate limits (`[calls.rates]`).
    limits: spine_runtime::rate::RateLimits<config::CallsRate>,
}

/// How a calls node sees the cluster (for tests and tools).
pub struct CallsView(Arc<Node>);

impl CallsView {
    /// Deletes every call record of every tenant that expired by `now`
    /// (unix seconds); the upkeep does this with the current time.
    pub async fn expire_records(&self, now: i64) -> Result<usize, StoreError> {
        expire_all(&self.0.rt, now).await
    }
}

async fn expire_all(rt: &Runtime, now: i64) -> Result<usize, StoreError> {
    let sys = rt.system_store();
    let mut n = 0;
    for tenant in sys.tenant_ids().await? {
        n += records::expire(&sys.tenant(&tenant), now).await?;
    }
    Ok(n)
}

/// Account deletions recorded by identity (possibly in another process)
/// that calls has not finished yet.
async fn finish_deletions(node: &Node) -> Result<(), String> {
    let sys = node.rt.system_store();
    for tenant in sys.tenant_ids().await.map_err(|e| e.to_string())? {
        let t = sys.tenant(&tenant);
        for account in spine_runtime::data::pending_deletions(&t, "calls").await.map_err(|e| e.to_string())? {
            data::delete_account(node, &t, &account).await.map_err(|e| e.message().to_string())?;
            spine_runtime::data::mark_done(&t, &account, "calls").await.map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// Every 200 ms: ring timeouts and idle ends of the calls this node runs,
/// and ended calls left behind.
async fn timers(node: &Node) -> Result<(), String> {
    let now = node.clock.now_ms();
    for (rec, rev) in node.cluster.my_calls() {
        if rec.state == model::State::Ended {
            if rec.ended_ms.is_some_and(|e| e + 3000 < now) {
                node.cluster.delete_ended(&rec.id, rev).await.map_err(|e| e.to_string())?;
            }
            continue;
        }
        // A copy first: most ticks change nothing and need no store work.
        if machine::tick(&mut rec.clone(), now) {
            let r = node.cluster.update(&rec.id, |c| {
                machine::tick(c, node.clock.now_ms());
                Ok(())
            });
            if let Err(e) = r.await {
                tracing::debug!(error = %e, "call timer not applied");
            }
        }
    }
    Ok(())
}

/// The legs of this node's calls whose device has had no signalling session
/// for `calls.unattended_secs`, by call; the clock of every other leg is
/// reset.
fn lost_legs(node: &Node, calls: &[(model::CallRec, i64)], now: i64) -> HashMap<String, Vec<model::DevKey>> {
    let limit = (node.config.unattended_secs * 1000) as i64;
    let mut since = node.unattended.lock().expect("unattended lock");
    let mut seen = std::collections::HashSet::new();
    let mut lost: HashMap<String, Vec<model::DevKey>> = HashMap::new();
    for (rec, _) in calls.iter().filter(|(r, _)| r.state != model::State::Ended) {
        for leg in &rec.legs {
            // A revoked device (or one of a deleted account) is out at once.
            if node.rt.auth.is_revoked(&leg.dev.tenant, &leg.dev.device) {
                lost.entry(rec.id.clone()).or_default().push(leg.dev.clone());
                continue;
            }
            if node.cluster.session_of(&leg.dev).is_some() {
                continue;
            }
            let key = (rec.id.clone(), leg.id.clone());
            let first = *since.entry(key.clone()).or_insert(now);
            seen.insert(key);
            if now - first >= limit {
                lost.entry(rec.id.clone()).or_default().push(leg.dev.clone());
            }
        }
    }
    since.retain(|k, _| seen.contains(k));
    lost
}

/// Every second: streams whose token expired or device was revoked, calls
/// of nodes that are gone, devices that left calls without a word or were
/// revoked, and
/// roster changes of group calls this node runs.
async fn housekeeping(node: &Node) -> Result<(), String> {
    node.cluster.close_unauthenticated();
    node.cluster.adopt_orphans().await;
    let idle = node.idle_ms();
    let mine = node.cluster.my_calls();
    for (id, lost) in lost_legs(node, &mine, node.clock.now_ms()) {
        let r = node.cluster.update(&id, |c| {
            machine::lose_legs(c, &lost, node.clock.now_ms(), idle);
            Ok(())
        });
        match r.await {
            Ok(_) => tracing::debug!(
                call = %node.rt.redact(&id),
                legs = lost.len(),
                "devices lost their signalling session; left the call"
            ),
            Err(e) => tracing::debug!(error = %e, "lost legs not applied"),
        }
    }
    for (rec, _) in node.cluster.my_calls() {
        let Some(g) = rec.group.as_ref().filter(|_| rec.state != model::State::Ended) else { continue };
        let roster = spine_read_models::roster::group_roster(&node.groups, &g.gid).await.map_err(|e| e.to_string())?;
        let roster = roster.unwrap_or(spine_read_models::roster::GroupRoster { epoch: g.epoch, roster: vec![] });
        if machine::apply_roster(&mut rec.clone(), &roster, node.clock.now_ms(), idle) {
            let r = node.cluster.update(&rec.id, |c| {
                machine::apply_roster(c, &roster, node.clock.now_ms(), idle);
                Ok(())
            });
            if let Err(e) = r.await {
                tracing::debug!(error = %e, "group call roster change not applied");
            }
        }
    }
    Ok(())
}

/// What tests and tools may choose when installing calls.
#[derive(Debug, Default)]
pub struct CallsOptions {
    /// The clock timers and records read (default: the wall clock).
    pub clock: Option<Arc<dyn Clock>>,
}

/// The calls service: `Calls` (signalling and call state),
/// `CallRecords` (tenant servers) and `MediaNodes` (media nodes and
/// operators).
#[derive(Debug)]
pub struct Calls;

#[async_trait::async_trait]
impl SpineService for Calls {
    const NAME: &'static str = "calls";
    type Handle = CallsView;
    type Options = CallsOptions;

    /// Adds the calls services (this node reachable by peers at
    /// `at.advertise`), registers the account-data hook and starts the
    /// upkeep.
    async fn install(at: &mut Installer<'_>, options: CallsOptions) -> Result<CallsView, StartError> {
        let clock = options.clock.unwrap_or_else(|| Arc::new(SystemClock));
        let rt = at.rt;
        let config: CallsConfig = rt.config.section().map_err(StartError::Config)?;
        let cluster = cluster::Cluster::start(rt, &config, at.advertise.clone(), clock.clone()).await?;
        let limits = config.rates.limiter();
        let node = Arc::new(Node {
            rt: rt.clone(),
            cluster,
            groups: spine_read_models::roster::group_space(rt.store.clone()),
            idem_lease: spine_runtime::idempotency::lease(rt.store.clone()),
            unattended: Default::default(),
            config,
            clock,
            limits,
        });
        rt.register_account_data(Arc::new(data::CallsData(node.clone())));
        spine_runtime::add_service!(at, CallsServer::new(service::CallsApi(node.clone())));
        spine_runtime::add_service!(at, CallRecordsServer::new(service::CallRecordsApi));
        spine_runtime::add_service!(at, MediaNodesServer::new(service::MediaNodesApi(node.clone())));
        Runtime::spawn_upkeep(
            Arc::downgrade(&node),
            Duration::from_millis(200),
            "calls-timers",
            |n: Arc<Node>| async move { timers(&n).await },
        );
        Runtime::spawn_upkeep(
            Arc::downgrade(&node),
            Duration::from_secs(1),
            "calls-housekeeping",
            |n: Arc<Node>| async move { housekeeping(&n).await },
        );
        Runtime::spawn_upkeep(
            Arc::downgrade(&node),
            Duration::from_secs(30),
            "calls-records",
            |n: Arc<Node>| async move {
                expire_all(&n.rt, spine_runtime::now_secs()).await.map_err(|e| e.to_string())?;
                finish_deletions(&n).await
            },
        );
        Ok(CallsView(node))
    }
}
