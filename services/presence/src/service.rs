//! The gRPC face of presence: Announce, Query and Watch, served by the
//! owner of each account, forwarded there from any node.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use spine_proto::presence::v1::presence_client::PresenceClient;
use spine_proto::presence::v1::presence_server::Presence;
use spine_proto::presence::v1::{self as pb, PresenceState, Status as PStatus};
use spine_read_models::directory;
use spine_runtime::ids::{self, Kind};
use spine_runtime::{Caller, Principal};
use tokio::sync::mpsc;
use tonic::metadata::{Ascii, MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status};

use crate::error::{PresenceError, invalid};
use crate::outbox::Outbox;
use crate::state::render;
use crate::visibility::{self, AccountKey, key_str};
use crate::{MAX_TTL, Node};

const ANNOUNCE: &str = "/spine.presence.v1.Presence/Announce";
const QUERY: &str = "/spine.presence.v1.Presence/Query";
const WATCH: &str = "/spine.presence.v1.Presence/Watch";
/// Most targets per Watch or Query.
const MAX_TARGETS: usize = 256;
/// States buffered per watch stream before it counts as too slow.
const WATCH_BUFFER: usize = 256;

pub struct PresenceApi(pub(crate) Arc<Node>);

struct Me {
    account: AccountKey,
    device: String,
}

fn device<T>(req: &Request<T>) -> Result<Me, PresenceError> {
    match Caller::of(req).map_err(PresenceError::Caller)?.principal() {
        Principal::Device { tenant, account_id, device_id, .. } => {
            Ok(Me { account: (tenant.to_string(), account_id.clone()), device: device_id.clone() })
        }
        _ => Err(PresenceError::DevicesOnly),
    }
}

/// Whether a peer node forwarded this request to this node, as the owner
/// (then it is served here, never forwarded again). Only a proof made with
/// the deployment's peer secret counts: a client cannot set it.
fn forwarded(node: &Node, meta: &MetadataMap, path: &str) -> bool {
    spine_runtime::secrets::forwarded_by_peer(&node.secrets, meta, path)
}

/// A request to the owner node, carrying the caller's own credential and
/// this node's forwarding proof.
fn forward<T>(node: &Node, auth: Option<&MetadataValue<Ascii>>, path: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(a) = auth {
        r.metadata_mut().insert("authorization", a.clone());
        let mark = node.secrets.peer_mark(path, a.as_bytes());
        r.metadata_mut().insert(spine_runtime::secrets::FORWARDED, mark.parse().expect("ascii"));
    }
    r
}

/// A watch stream counted against its device's limit until dropped.
struct WatchSlot {
    node: Arc<Node>,
    device: (String, String),
}

impl WatchSlot {
    fn take(node: &Arc<Node>, me: &Me) -> Result<WatchSlot, PresenceError> {
        let device = (me.account.0.clone(), me.device.clone());
        let mut watches = node.watches.lock().expect("watch slots lock");
        let n = watches.entry(device.clone()).or_default();
        if *n >= node.max_watches_per_device {
            return Err(PresenceError::TooManyWatches(node.max_watches_per_device));
        }
        *n += 1;
        Ok(WatchSlot { node: node.clone(), device })
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut watches = self.node.watches.lock().expect("watch slots lock");
        if let Some(n) = watches.get_mut(&self.device) {
            *n -= 1;
            if *n == 0 {
                watches.remove(&self.device);
            }
        }
    }
}

fn unavailable(target: u32) -> PresenceState {
    render(target, None, 0, None)
}

/// Resolves targets to accounts: `None` for what cannot be seen at all (an
/// interop reference that does not resolve for the caller's tenant).
async fn resolve(node: &Node, me: &Me, targets: &[pb::Target]) -> Result<Vec<Option<AccountKey>>, PresenceError> {
    if targets.is_empty() || targets.len() > MAX_TARGETS {
        return Err(invalid("targets", "1 to 256 targets"));
    }
    // The same target twice is refused (as written: two references that
    // turn out to name one account are not, or the refusal would say so).
    let mut seen = std::collections::HashSet::new();
    if !targets.iter().all(|t| seen.insert(t.target.clone().map(|t| format!("{t:?}")))) {
        return Err(invalid("targets", "a target is named twice"));
    }
    let sys = node.rt.system_store();
    let caller_tenant =
        ids::TenantId::parse(&me.account.0).ok_or(PresenceError::Internal("a tenant id that does not parse"))?;
    let mut out = Vec::with_capacity(targets.len());
    for t in targets {
        out.push(match t.target.as_ref() {
            Some(pb::target::Target::AccountId(a)) => {
                ids::parse(Kind::Account, a).ok_or_else(|| invalid("targets.account_id", "not an account id"))?;
                Some((me.account.0.clone(), a.clone()))
            }
            Some(pb::target::Target::Interop(r)) => {
                ids::parse(Kind::InteropHandle, &r.handle)
                    .ok_or_else(|| invalid("targets.interop.handle", "not a handle"))?;
                match directory::resolve_handle(&sys, &r.handle, &caller_tenant).await? {
                    Some((tenant, account)) if tenant.as_str() == r.tenant_id => Some((tenant.to_string(), account)),
                    _ => None,
                }
            }
            None => return Err(invalid("targets", "empty target")),
        });
    }
    Ok(out)
}

/// Targets grouped by the node that owns them: owner id -> (address, [(index, key)]).
type Plan = BTreeMap<String, (String, Vec<(u32, AccountKey)>)>;

fn plan(node: &Node, keys: &[Option<AccountKey>], local_only: bool) -> Plan {
    let mut p: Plan = BTreeMap::new();
    for (i, k) in keys.iter().enumerate() {
        let Some(k) = k else { continue };
        let (id, addr) = if local_only { (node.ring.me.clone(), String::new()) } else { node.ring.owner(&key_str(k)) };
        p.entry(id).or_insert_with(|| (addr, Vec::new())).1.push((i as u32, k.clone()));
    }
    p
}

impl PresenceApi {
    fn node(&self) -> &Node {
        &self.0
    }

    /// The local owner's answer for one target.
    async fn local_state(&self, me: &Me, index: u32, key: &AccountKey) -> Result<PresenceState, PresenceError> {
        let node = self.node();
        let view = visibility::view(&node.rt, &node.secrets, &me.account, key).await?;
        let warming = node.ring.recently_moved(&key_str(key), MAX_TTL);
        Ok(node.owner.current(key, index, view, warming).unwrap_or_else(|| unavailable(index)))
    }
}

#[tonic::async_trait]
impl Presence for PresenceApi {
    async fn announce(&self, req: Request<pb::AnnounceRequest>) -> Result<Response<pb::AnnounceResponse>, Status> {
        let me = device(&req)?;
        let status = PStatus::try_from(req.get_ref().status).unwrap_or(PStatus::Unspecified);
        if !matches!(status, PStatus::Online | PStatus::Away | PStatus::Offline) {
            return Err(invalid("status", "ONLINE, AWAY or OFFLINE (IN_CALL comes from the calls service)").into());
        }
        let ttl = match req.get_ref().ttl_seconds {
            0 => 60,
            t @ 10..=300 => t,
            _ => return Err(invalid("ttl_seconds", "10 to 300").into()),
        };
        let (owner, addr) = self.node().ring.owner(&key_str(&me.account));
        if owner == self.node().ring.me || forwarded(self.node(), req.metadata(), ANNOUNCE) {
            self.node().owner.announce(me.account, me.device, status, Duration::from_secs(u64::from(ttl)));
            return Ok(Response::new(pb::AnnounceResponse { ttl_seconds: ttl }));
        }
        let mut peer = PresenceClient::new(self.node().peer(&addr)?);
        peer.announce(forward(self.node(), req.metadata().get("authorization"), ANNOUNCE, *req.get_ref())).await
    }

    async fn query(&self, req: Request<pb::QueryRequest>) -> Result<Response<pb::QueryResponse>, Status> {
        let me = device(&req)?;
        let keys = resolve(self.node(), &me, &req.get_ref().targets).await?;
        let mut states: Vec<PresenceState> = (0..keys.len() as u32).map(unavailable).collect();
        let local_only = forwarded(self.node(), req.metadata(), QUERY);
        for (owner, (addr, targets)) in plan(self.node(), &keys, local_only) {
            if owner == self.node().ring.me || local_only {
                for (i, k) in &targets {
                    states[*i as usize] = self.local_state(&me, *i, k).await?;
                }
            } else {
                let subset = pb::QueryRequest {
                    targets: targets.iter().map(|(i, _)| req.get_ref().targets[*i as usize].clone()).collect(),
                };
                let answer = PresenceClient::new(self.node().peer(&addr)?)
                    .query(forward(self.node(), req.metadata().get("authorization"), QUERY, subset))
                    .await?
                    .into_inner();
                for (j, mut s) in answer.states.into_iter().enumerate() {
                    if let Some((i, _)) = targets.get(j) {
                        s.target = *i;
                        states[*i as usize] = s;
                    }
                }
            }
        }
        Ok(Response::new(pb::QueryResponse { states }))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::PresenceUpdate, Status>> + Send>>;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let me = device(&req)?;
        let principal = Caller::of(&req)?.principal().clone();
        let keys = resolve(self.node(), &me, &req.get_ref().targets).await?;
        let slot = WatchSlot::take(&self.0, &me)?;
        let outbox = Outbox::new(WATCH_BUFFER);
        let node = self.0.clone();
        // Keep only what forwarding needs, not every request header.
        let auth = req.metadata().get("authorization").cloned();
        let local_only = forwarded(&node, req.metadata(), WATCH);
        let targets = req.into_inner().targets;
        let out = outbox.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let open = spine_runtime::telemetry::metrics();
            let attrs = [opentelemetry::KeyValue::new("rpc.method", WATCH)];
            open.open_streams.add(1, &attrs);
            let watch = Watch {
                me: &me,
                principal: &principal,
                keys: &keys,
                targets: &targets,
                auth: auth.as_ref(),
                local_only,
            };
            let end = manage(&node, &watch, &out).await;
            open.open_streams.add(-1, &attrs);
            // Delivered at the stream's next poll, even if its queue is
            // full (a slow watcher).
            out.finish(end.err());
        });
        Ok(Response::new(Box::pin(WatchOut { out: outbox, last: HashMap::new(), done: false })))
    }
}

/// A watch's response stream. It reads the states the owner (or a
/// forwarder) pushes, drops repeats, and ends with the error that ended the
/// watch, which takes precedence over anything still buffered.
struct WatchOut {
    out: Outbox,
    last: HashMap<u32, PresenceState>,
    done: bool,
}

impl Drop for WatchOut {
    fn drop(&mut self) {
        // The client left: the watch's manager ends it.
        self.out.close();
    }
}

impl Stream for WatchOut {
    type Item = Result<pb::PresenceUpdate, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            match self.out.poll_next(cx) {
                Poll::Ready(Some(Ok(s))) => {
                    if self.last.get(&s.target) == Some(&s) {
                        continue;
                    }
                    self.last.insert(s.target, s);
                    return Poll::Ready(Some(Ok(pb::PresenceUpdate { states: vec![s] })));
                }
                Poll::Ready(Some(Err(status))) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(None) => {
                    self.done = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Why a subscription round ended.
enum Round {
    Replan,
    Done,
}

/// Whether a forwarded watch ended with the owner's own answer (to pass to
/// the client), rather than because the owner went away (to re-plan).
fn owner_answered(e: &Status) -> bool {
    matches!(
        e.code(),
        Code::ResourceExhausted
            | Code::InvalidArgument
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::NotFound
    )
}

/// What a watch stream watches, and for whom.
struct Watch<'a> {
    me: &'a Me,
    principal: &'a Principal,
    keys: &'a [Option<AccountKey>],
    targets: &'a [pb::Target],
    auth: Option<&'a MetadataValue<Ascii>>,
    /// Forwarded here by a peer: every target is served locally.
    local_only: bool,
}

/// One round's subscriptions at the local owner and forwarded watches to
/// remote owners, ended when dropped.
struct Subscriptions<'a> {
    owner: &'a crate::state::Owner,
    subs: Vec<(AccountKey, u64)>,
    forwarders: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Subscriptions<'_> {
    fn drop(&mut self) {
        for (k, id) in self.subs.drain(..) {
            self.owner.unsubscribe(&k, id);
        }
        for f in self.forwarders.drain(..) {
            f.abort();
        }
    }
}

/// Keeps a watch's subscriptions: each target subscribed where it is
/// owned (locally, or through a forwarded watch to its owner), re-planned
/// when the ring changes; ends on drain, overflow, the client leaving, or
/// its credential ending (token expiry, revocation, account deletion).
async fn manage(node: &Arc<Node>, w: &Watch<'_>, outbox: &Outbox) -> Result<(), Status> {
    let (keys, local_only) = (w.keys, w.local_only);
    // What cannot be resolved is unavailable, once and for good.
    for (i, k) in keys.iter().enumerate() {
        if k.is_none() && !outbox.push(unavailable(i as u32)) {
            return Ok(());
        }
    }
    loop {
        let mut ring_changes = node.ring.changes();
        ring_changes.borrow_and_update();
        let plan = plan(node, keys, local_only);
        // Forwarders report how their owner's stream ended; only a watch
        // with remote owners needs the channel.
        let remote = plan.keys().any(|o| *o != node.ring.me) && !local_only;
        let (err_tx, mut err_rx) = if remote {
            let (tx, rx) = mpsc::channel::<Status>(1);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        // Dropped however this round ends (an error setting it up too).
        let mut subs = Subscriptions { owner: &node.owner, subs: Vec::new(), forwarders: Vec::new() };
        // Boxed: the watch's task lives as long as the stream, and an idle
        // one should not hold a round's setup (store reads, peer calls)
        // inline.
        Box::pin(subscribe_round(node, w, outbox, plan, err_tx.as_ref(), &mut subs)).await?;
        drop(err_tx);
        let round = loop {
            tokio::select! {
                _ = node.rt.drain.cancelled() => {
                    break Err(spine_runtime::error::draining("server draining: reconnect and watch again"));
                }
                status = node.rt.auth.stream_end(w.principal) => break Err(status),
                changed = ring_changes.changed() => {
                    if changed.is_err() { break Ok(Round::Done) }
                    break Ok(Round::Replan);
                }
                _ = outbox.alarm() => {
                    if outbox.gone() {
                        break Ok(Round::Done);
                    }
                    if outbox.overflowed() {
                        break Err(PresenceError::TooSlow.into());
                    }
                }
                Some(e) = async {
                    match err_rx.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if owner_answered(&e) {
                        break Err(e);
                    }
                    // The owner left, crashed, or cannot be reached: the
                    // ring will move its accounts (at the latest when its
                    // lease expires); plan again shortly.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break Ok(Round::Replan);
                }
            }
        };
        drop(subs);
        match round? {
            Round::Done => return Ok(()),
            Round::Replan => continue,
        }
    }
}

/// Subscribes a watch's targets for one round: each where it is owned
/// (locally, or through a watch forwarded to its owner, which reports how
/// it ended on `err_tx`), sending each local target's current state.
async fn subscribe_round<'a>(
    node: &'a Arc<Node>,
    w: &Watch<'_>,
    outbox: &Outbox,
    plan: Plan,
    err_tx: Option<&mpsc::Sender<Status>>,
    subs: &mut Subscriptions<'a>,
) -> Result<(), Status> {
    let (me, targets, local_only) = (w.me, w.targets, w.local_only);
    for (owner, (addr, group)) in plan {
        if owner == node.ring.me || local_only {
            for (i, k) in group {
                let epoch = node.owner.consent_epoch();
                let mut view = visibility::view(&node.rt, &node.secrets, &me.account, &k).await?;
                let id = node.owner.subscribe(k.clone(), me.account.clone(), i, view, outbox.clone());
                subs.subs.push((k.clone(), id));
                if node.owner.consent_epoch() != epoch {
                    // Consent changed while this view was read, and the
                    // review may have run before this subscription was
                    // there to find: read it again.
                    view = visibility::view(&node.rt, &node.secrets, &me.account, &k).await?;
                    node.owner.set_view(&k, id, view);
                }
                let warming = node.ring.recently_moved(&key_str(&k), MAX_TTL);
                if let Some(s) = node.owner.current(&k, i, view, warming) {
                    outbox.push(s);
                }
            }
        } else {
            let subset =
                pb::WatchRequest { targets: group.iter().map(|(i, _)| targets[*i as usize].clone()).collect() };
            let indices: Vec<u32> = group.iter().map(|(i, _)| *i).collect();
            let channel = node.peer(&addr)?;
            let request = forward(node, w.auth, WATCH, subset);
            let (tx, err_tx) = (outbox.clone(), err_tx.cloned().expect("remote plan has an error channel"));
            subs.forwarders.push(tokio::spawn(async move {
                let mut stream = match PresenceClient::new(channel).watch(request).await {
                    Ok(s) => s.into_inner(),
                    Err(e) => {
                        let _ = err_tx.send(e).await;
                        return;
                    }
                };
                loop {
                    match stream.next().await {
                        Some(Ok(update)) => {
                            for mut s in update.states {
                                let Some(i) = indices.get(s.target as usize) else { continue };
                                s.target = *i;
                                if !tx.push(s) {
                                    return;
                                }
                            }
                        }
                        Some(Err(e)) => {
                            let _ = err_tx.send(e).await;
                            return;
                        }
                        None => {
                            let _ = err_tx
                                .send(spine_runtime::error::unavailable(
                                    "owner stream ended: watch again",
                                    "STREAM_INTERRUPTED",
                                    spine_runtime::error::DRAIN_RETRY_AFTER,
                                ))
                                .await;
                            return;
                        }
                    }
                }
            }));
        }
    }
    Ok(())
}
