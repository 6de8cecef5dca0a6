//! Calls test support: several nodes (identity, groups and calls each) on
//! one store, and phones: registered devices holding a real signalling
//! stream to one of the nodes.
#![allow(dead_code)]

use std::time::Duration;

use futures::StreamExt;
use prost_types::FieldMask;
use spine_proto::calls::v1 as pb;
use spine_proto::calls::v1::calls_client::CallsClient;
use spine_proto::common::v1::{InteropRef, PeerRef, peer_ref};
use spine_proto::identity::v1 as ipb;
use spine_runtime::config::{Backend, Config};
use spine_runtime::store::{EmbeddedStore, Store};
use spine_testing::EtcdServer;
use spine_testing::{Device, Env, Tenant, req};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Code, Status};

pub fn config() -> Config {
    let mut c = spine_testing::test_config();
    c.edit_section(|s: &mut spine_calls::CallsConfig| s.ring_timeout_secs = 30);
    c.edit_section(|s: &mut spine_calls::CallsConfig| s.node_ttl_secs = 2);
    c
}

/// `n` nodes on one store, each running identity, groups, calls and presence; the
/// first holds the etcd server if any. `tweak` adjusts node i's config.
pub async fn nodes(backend: Backend, n: usize, tweak: impl Fn(usize, &mut Config)) -> Vec<Env> {
    nodes_with_views(backend, n, tweak).await.0
}

/// [`nodes`], all reading one manual clock: timers fire when the test
/// moves it, not when real time passes.
pub async fn nodes_on_clock(
    backend: Backend,
    n: usize,
    clock: spine_calls::ManualClock,
    tweak: impl Fn(usize, &mut Config),
) -> Vec<Env> {
    nodes_with(backend, n, Some(std::sync::Arc::new(clock)), tweak).await.0
}

/// [`nodes`], with each node's view of the calls cluster.
pub async fn nodes_with_views(
    backend: Backend,
    n: usize,
    tweak: impl Fn(usize, &mut Config),
) -> (Vec<Env>, Vec<spine_calls::CallsView>) {
    nodes_with(backend, n, None, tweak).await
}

async fn nodes_with(
    backend: Backend,
    n: usize,
    clock: Option<std::sync::Arc<dyn spine_calls::Clock>>,
    tweak: impl Fn(usize, &mut Config),
) -> (Vec<Env>, Vec<spine_calls::CallsView>) {
    let (store, etcd): (std::sync::Arc<dyn Store>, _) = match backend {
        Backend::Embedded => (std::sync::Arc::new(EmbeddedStore::in_memory()), None),
        Backend::Etcd => {
            let e = EtcdServer::start().await;
            (e.store().await, Some(e))
        }
    };
    nodes_on(store, etcd, n, clock, tweak).await
}

/// `n` nodes on a given store (the first holding `etcd`, if any).
pub async fn nodes_on(
    store: std::sync::Arc<dyn Store>,
    etcd: Option<EtcdServer>,
    n: usize,
    clock: Option<std::sync::Arc<dyn spine_calls::Clock>>,
    tweak: impl Fn(usize, &mut Config),
) -> (Vec<Env>, Vec<spine_calls::CallsView>) {
    nodes_on_each(vec![store; n], etcd, clock, tweak).await
}

/// A node on each of `stores` (handles to one store, such as a
/// `StoreTap` for one node), the first holding `etcd`, if any.
pub async fn nodes_on_each(
    stores: Vec<std::sync::Arc<dyn Store>>,
    mut etcd: Option<EtcdServer>,
    clock: Option<std::sync::Arc<dyn spine_calls::Clock>>,
    tweak: impl Fn(usize, &mut Config),
) -> (Vec<Env>, Vec<spine_calls::CallsView>) {
    let n = stores.len();
    let views = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let rings = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut out = Vec::new();
    for (i, store) in stores.into_iter().enumerate() {
        let mut c = config();
        tweak(i, &mut c);
        let (v, r, clock) = (views.clone(), rings.clone(), clock.clone());
        let env = spine_testing::start_on_with(store, etcd.take(), c, |rt, mut routes, addr| async move {
            let mut names = spine_runtime::service::install::<spine_groups::Groups>(&rt, &mut routes, String::new())
                .await
                .map(|(n, ())| n)
                .expect("groups install");
            let (more, view) = spine_runtime::service::install_with::<spine_calls::Calls>(
                &rt,
                &mut routes,
                addr.to_string(),
                spine_calls::CallsOptions { clock },
            )
            .await
            .expect("calls install");
            v.lock().unwrap().push(view);
            names.extend(more);
            let (more, ring) =
                spine_runtime::service::install::<spine_presence::Presence>(&rt, &mut routes, addr.to_string())
                    .await
                    .expect("presence install");
            r.lock().unwrap().push(ring);
            names.extend(more);
            (routes, names)
        })
        .await;
        out.push(env);
    }
    // Every node sees every other.
    for env in &out {
        assert!(
            spine_testing::eventually(Duration::from_secs(10), || async {
                env.rt.store.count("/spine/sys/calls/nodes/").await.unwrap() as usize == n
                    && env.rt.store.count("/spine/sys/presence/nodes/").await.unwrap() as usize == n
            })
            .await
        );
    }
    // And every presence node's ring has every node (so all agree who owns
    // an account before a test announces or watches).
    let all_rings = std::mem::take(&mut *rings.lock().unwrap());
    assert!(
        spine_testing::eventually(Duration::from_secs(10), || async {
            all_rings.iter().all(|r| r.members().len() == n)
        })
        .await
    );
    let views = std::mem::take(&mut *views.lock().unwrap());
    (out, views)
}

pub fn calls(env: &Env) -> CallsClient<Channel> {
    CallsClient::new(env.channel.clone())
}

pub fn account_ref(a: &str) -> Option<PeerRef> {
    Some(PeerRef { peer: Some(peer_ref::Peer::AccountId(a.into())) })
}

pub fn interop_ref(tenant: &str, handle: &str) -> Option<PeerRef> {
    Some(PeerRef {
        peer: Some(peer_ref::Peer::Interop(InteropRef { tenant_id: tenant.into(), handle: handle.into() })),
    })
}

/// Sets one settings field of `account` (tenant credential).
pub async fn set(env: &Env, t: &Tenant, account: &str, field: &str, s: ipb::PrivacySettings) {
    env.identity()
        .update_settings(req(
            ipb::UpdateSettingsRequest {
                account_id: account.into(),
                settings: Some(s),
                update_mask: Some(FieldMask { paths: vec![field.into()] }),
            },
            &t.cred,
        ))
        .await
        .unwrap();
}

pub async fn everyone_can_call(env: &Env, t: &Tenant, account: &str) {
    let s = ipb::PrivacySettings { who_can_call: ipb::WhoCanCall::Everyone as i32, ..Default::default() };
    set(env, t, account, "who_can_call", s).await;
}

/// A device with a signalling stream open to one node.
pub struct Phone {
    pub dev: Device,
    pub channel: Channel,
    pub out: mpsc::Sender<pb::ClientMessage>,
    pub events: tonic::Streaming<pb::ServerEvent>,
    /// The calls of the first `synced` message.
    pub synced: Vec<pb::Call>,
    next_ref: u64,
}

impl Phone {
    pub async fn connect(env: &Env, dev: Device) -> Phone {
        Self::connect_to(env.channel.clone(), dev).await
    }

    pub async fn connect_to(channel: Channel, dev: Device) -> Phone {
        let (out, rx) = mpsc::channel(64);
        let events = CallsClient::new(channel.clone())
            .session(req(tokio_stream::wrappers::ReceiverStream::new(rx), &dev.token))
            .await
            .expect("session opens")
            .into_inner();
        Self::synced(channel, dev, out, events).await
    }

    /// A device on the server-streaming form (Calls.Events, as browsers
    /// hold it): it sends signals with the unary Signal only.
    pub async fn connect_events_to(channel: Channel, dev: Device) -> Phone {
        let events = CallsClient::new(channel.clone())
            .events(req(pb::EventsRequest {}, &dev.token))
            .await
            .expect("events stream opens")
            .into_inner();
        let (out, _) = mpsc::channel(1);
        Self::synced(channel, dev, out, events).await
    }

    async fn synced(
        channel: Channel,
        dev: Device,
        out: mpsc::Sender<pb::ClientMessage>,
        mut events: tonic::Streaming<pb::ServerEvent>,
    ) -> Phone {
        let first = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("synced in time")
            .expect("stream open")
            .expect("first event");
        let Some(pb::server_event::Event::Synced(s)) = first.event else {
            panic!("first event is not synced: {first:?}")
        };
        Phone { dev, channel, out, events, synced: s.calls, next_ref: 1 }
    }

    pub fn calls(&self) -> CallsClient<Channel> {
        CallsClient::new(self.channel.clone())
    }

    pub fn req<T>(&self, msg: T) -> tonic::Request<T> {
        req(msg, &self.dev.token)
    }

    /// The next event within `within`, or None.
    pub async fn next(&mut self, within: Duration) -> Option<Result<pb::ServerEvent, Status>> {
        tokio::time::timeout(within, self.events.next()).await.ok().flatten()
    }

    /// Waits up to 15 s for the first event `pick` takes (skipping others).
    pub async fn wait_for<T>(&mut self, what: &str, pick: impl Fn(pb::server_event::Event) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(Ok(pb::ServerEvent { event: Some(e) })) => {
                    if let Some(t) = pick(e) {
                        return t;
                    }
                }
                Some(Ok(_)) => continue,
                Some(Err(s)) => panic!("{} stream failed waiting for {what}: {s:?}", self.dev.device),
                None => panic!("{} saw no {what}", self.dev.device),
            }
        }
    }

    /// Waits for a call event of `id` matching `pred` (skipping others).
    pub async fn call_where(&mut self, id: &str, pred: impl Fn(&pb::Call) -> bool) -> pb::Call {
        self.wait_for(&format!("matching event of {id}"), |e| match e {
            pb::server_event::Event::Call(c) if c.call_id == id && pred(&c) => Some(c),
            _ => None,
        })
        .await
    }

    /// Waits for a relayed payload.
    pub async fn signal(&mut self) -> pb::IncomingSignal {
        self.wait_for("signal", |e| match e {
            pb::server_event::Event::Signal(s) => Some(s),
            _ => None,
        })
        .await
    }

    /// Sends a payload with the unary Signal.
    pub async fn signal_unary(&self, call_id: &str, to_leg: &str, payload: Vec<u8>) -> Result<u32, Status> {
        let r = pb::SignalRequest { call_id: call_id.into(), to_leg_id: to_leg.into(), payload };
        Ok(self.calls().signal(self.req(r)).await?.into_inner().delivered)
    }

    /// Sends a payload on the stream and waits for its result.
    pub async fn send_signal(&mut self, call_id: &str, to_leg: &str, payload: Vec<u8>) -> pb::SignalResult {
        let r = self.next_ref;
        self.next_ref += 1;
        let msg = pb::ClientMessage {
            r#ref: r,
            message: Some(pb::client_message::Message::Signal(pb::SignalRequest {
                call_id: call_id.into(),
                to_leg_id: to_leg.into(),
                payload,
            })),
        };
        self.out.send(msg).await.expect("stream open");
        self.wait_for("signal result", |e| match e {
            pb::server_event::Event::SignalResult(s) if s.r#ref == r => Some(s),
            _ => None,
        })
        .await
    }

    /// Asserts that no call event arrives within `d`.
    pub async fn quiet(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                None => return,
                Some(Ok(pb::ServerEvent { event: Some(pb::server_event::Event::Call(c)) })) => {
                    panic!("{} got an unexpected call event: {c:?}", self.dev.device)
                }
                Some(Ok(_)) => continue,
                Some(Err(s)) => panic!("{} stream failed: {s:?}", self.dev.device),
            }
        }
    }

    pub async fn start(&self, callee: Option<PeerRef>, video: bool) -> Result<pb::Call, Status> {
        self.start_with(&format!("r{}", rand::random::<u32>()), callee, video).await
    }

    pub async fn start_with(&self, request_id: &str, callee: Option<PeerRef>, video: bool) -> Result<pb::Call, Status> {
        let r = pb::StartCallRequest { request_id: request_id.into(), callee, video, caller_handle: String::new() };
        self.calls().start_call(self.req(r)).await.map(|r| r.into_inner())
    }

    pub async fn start_group(&self, request_id: &str, group_id: &[u8]) -> Result<pb::Call, Status> {
        let r = pb::StartGroupCallRequest { request_id: request_id.into(), group_id: group_id.to_vec(), video: false };
        self.calls().start_group_call(self.req(r)).await.map(|r| r.into_inner())
    }

    pub async fn answer(&self, id: &str) -> Result<pb::Call, Status> {
        self.calls().answer(self.req(pb::AnswerRequest { call_id: id.into() })).await.map(|r| r.into_inner())
    }

    pub async fn decline(&self, id: &str) -> Result<pb::Call, Status> {
        self.calls().decline(self.req(pb::DeclineRequest { call_id: id.into() })).await.map(|r| r.into_inner())
    }

    pub async fn hang_up(&self, id: &str) -> Result<pb::Call, Status> {
        self.calls().hang_up(self.req(pb::HangUpRequest { call_id: id.into() })).await.map(|r| r.into_inner())
    }

    pub async fn join(&self, id: &str) -> Result<pb::Call, Status> {
        self.calls().join(self.req(pb::JoinRequest { call_id: id.into() })).await.map(|r| r.into_inner())
    }
}

pub fn state(c: &pb::Call) -> pb::CallState {
    pb::CallState::try_from(c.state).unwrap()
}

pub fn ring(c: &pb::Call) -> pb::RingState {
    pb::RingState::try_from(c.ring).unwrap()
}

pub fn end(c: &pb::Call) -> pb::EndReason {
    pb::EndReason::try_from(c.end_reason).unwrap()
}

/// The ErrorInfo reason of a status.
pub fn reason(s: &Status) -> String {
    use tonic_types::StatusExt;
    s.get_details_error_info().map(|i| i.reason).unwrap_or_default()
}

#[track_caller]
pub fn assert_not_placed(r: Result<pb::Call, Status>) {
    let s = r.expect_err("call must not be placed");
    assert_eq!(
        (s.code(), s.message(), reason(&s).as_str()),
        (Code::FailedPrecondition, "the call could not be placed", "CALL_NOT_PLACED")
    );
}

/// Every key under `/spine/sys/calls/c/` and `pair/` (live call state).
pub async fn live_state(env: &Env) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for p in ["/spine/sys/calls/c/", "/spine/sys/calls/pair/", "/spine/sys/calls/group/"] {
        out.extend(env.rt.store.range_all(p).await.unwrap().into_iter().map(|kv| (kv.key, kv.value)));
    }
    out
}

/// A device token for `d` living `ttl` seconds.
pub async fn device_token(env: &Env, t: &Tenant, d: &Device, ttl: u32) -> String {
    let r = ipb::IssueDeviceTokenRequest {
        account_id: d.account.clone(),
        device_id: d.device.clone(),
        scopes: vec![],
        ttl_seconds: ttl,
    };
    env.identity().issue_device_token(req(r, &t.cred)).await.unwrap().into_inner().token
}

/// Revokes `d` with its tenant's credential.
pub async fn revoke_device(env: &Env, t: &Tenant, d: &Device) {
    let r = ipb::RevokeDeviceRequest { account_id: d.account.clone(), device_id: d.device.clone() };
    env.identity().revoke_device(req(r, &t.cred)).await.unwrap();
}

/// A media-node credential for node `id`, issued by the operator.
pub async fn media_credential(env: &Env, id: &str) -> String {
    use spine_proto::calls::v1::media_nodes_client::MediaNodesClient;
    let r = pb::IssueMediaNodeCredentialRequest { request_id: id.into(), node_id: id.into(), label: id.into() };
    MediaNodesClient::new(env.channel.clone())
        .issue_media_node_credential(req(r, &env.operator))
        .await
        .unwrap()
        .into_inner()
        .secret
}
