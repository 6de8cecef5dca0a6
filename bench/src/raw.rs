//! The raw baselines: bare tonic servers of Spine's own protos, with no
//! auth, no store and no bookkeeping, so a benchmark shows what Spine's
//! work adds to what tonic itself costs.
//!
//! - Calls: `GetCall` answers a fixed call (the round trip); `Session` and
//!   `Events` send one `synced` and hold the stream (reading the client's
//!   half, which it ignores).
//! - Presence: `Announce` publishes a state to a target's broadcast
//!   channel (the target's index travels in `ttl_seconds`); `Watch` sends
//!   the target's current state, then every state published.

use std::net::SocketAddr;
use std::pin::Pin;

use futures::{Stream, StreamExt};
use spine_proto::calls::v1 as cpb;
use spine_proto::calls::v1::calls_server::{Calls, CallsServer};
use spine_proto::presence::v1 as ppb;
use spine_proto::presence::v1::presence_server::{Presence, PresenceServer};
use tokio::sync::broadcast;
use tonic::{Request, Response, Status, Streaming};

pub struct RawCalls;

type EventStream = Pin<Box<dyn Stream<Item = Result<cpb::ServerEvent, Status>> + Send>>;

fn synced() -> cpb::ServerEvent {
    cpb::ServerEvent { event: Some(cpb::server_event::Event::Synced(cpb::Synced { calls: vec![] })) }
}

#[tonic::async_trait]
impl Calls for RawCalls {
    type SessionStream = EventStream;
    async fn session(&self, r: Request<Streaming<cpb::ClientMessage>>) -> Result<Response<EventStream>, Status> {
        let inbound = r.into_inner();
        // The client's half is read (and ignored) in the response's own
        // poll, so the stream holds without a task of its own.
        let rest = futures::stream::unfold(inbound, |mut i| async move {
            while let Some(Ok(_)) = i.next().await {}
            None::<(Result<cpb::ServerEvent, Status>, _)>
        });
        Ok(Response::new(Box::pin(futures::stream::once(async { Ok(synced()) }).chain(rest))))
    }
    type EventsStream = EventStream;
    async fn events(&self, _: Request<cpb::EventsRequest>) -> Result<Response<EventStream>, Status> {
        Ok(Response::new(Box::pin(futures::stream::once(async { Ok(synced()) }).chain(futures::stream::pending()))))
    }
    async fn get_media_admission(
        &self,
        _: Request<cpb::GetMediaAdmissionRequest>,
    ) -> Result<Response<cpb::MediaAdmission>, Status> {
        Err(Status::unimplemented("raw baseline"))
    }
    async fn start_call(&self, _: Request<cpb::StartCallRequest>) -> Result<Response<cpb::Call>, Status> {
        Err(Status::unimplemented("raw baseline"))
    }
    async fn start_group_call(&self, _: Request<cpb::StartGroupCallRequest>) -> Result<Response<cpb::Call>, Status> {
        Err(Status::unimplemented("raw baseline"))
    }
    async fn answer(&self, _: Request<cpb::AnswerRequest>) -> Result<Response<cpb::Call>, Status> {
        Err(Status::unimplemented("raw baseline"))
    }
    async fn decline(&self, _: Request<cpb::DeclineRequest>) -> Result<Response<cpb::Call>, Status> {
        Err(Status::unimplemented("raw baseline"))
    }
    async fn join(&self, _: Request<cpb::JoinRequest>) -> Result<Response<cpb::Call>, Status> {
        Err(Status::unimplemented("raw baseline"))
    }
    async fn hang_up(&self, _: Request<cpb::HangUpRequest>) -> Result<Response<cpb::Call>, Status> {
        Err(Status::unimplemented("raw baseline"))
    }
    async fn get_call(&self, r: Request<cpb::GetCallRequest>) -> Result<Response<cpb::Call>, Status> {
        Ok(Response::new(cpb::Call {
            call_id: r.into_inner().call_id,
            state: cpb::CallState::Active as i32,
            your_leg_id: "lg_aaaaaaaaaaaaaaaaaaaaaaaaaa".into(),
            ..Default::default()
        }))
    }
    async fn signal(&self, _: Request<cpb::SignalRequest>) -> Result<Response<cpb::SignalResponse>, Status> {
        Err(Status::unimplemented("raw baseline"))
    }
    async fn get_turn_credentials(
        &self,
        _: Request<cpb::GetTurnCredentialsRequest>,
    ) -> Result<Response<cpb::TurnCredentials>, Status> {
        Err(Status::unimplemented("raw baseline"))
    }
}

pub struct RawPresence {
    topics: Vec<broadcast::Sender<ppb::PresenceState>>,
}

impl RawPresence {
    pub fn new(targets: usize) -> Self {
        Self { topics: (0..targets.max(1)).map(|_| broadcast::channel(16).0).collect() }
    }
}

fn state(status: i32) -> ppb::PresenceState {
    ppb::PresenceState { target: 0, status, last_seen: 1, last_seen_at: None }
}

#[tonic::async_trait]
impl Presence for RawPresence {
    async fn announce(&self, r: Request<ppb::AnnounceRequest>) -> Result<Response<ppb::AnnounceResponse>, Status> {
        let i = r.get_ref().ttl_seconds as usize % self.topics.len();
        let _ = self.topics[i].send(state(r.get_ref().status));
        Ok(Response::new(ppb::AnnounceResponse { ttl_seconds: 0 }))
    }
    async fn query(&self, _: Request<ppb::QueryRequest>) -> Result<Response<ppb::QueryResponse>, Status> {
        Err(Status::unimplemented("raw baseline"))
    }
    type WatchStream = Pin<Box<dyn Stream<Item = Result<ppb::PresenceUpdate, Status>> + Send>>;
    async fn watch(&self, r: Request<ppb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let i = match r.get_ref().targets.first().and_then(|t| t.target.as_ref()) {
            Some(ppb::target::Target::AccountId(a)) => a.parse::<usize>().unwrap_or(0) % self.topics.len(),
            _ => 0,
        };
        let rx = self.topics[i].subscribe();
        let first = futures::stream::once(async { Ok(ppb::PresenceUpdate { states: vec![state(1)] }) });
        let rest = tokio_stream::wrappers::BroadcastStream::new(rx)
            .filter_map(|m| async move { m.ok().map(|s| Ok(ppb::PresenceUpdate { states: vec![s] })) });
        Ok(Response::new(Box::pin(first.chain(rest))))
    }
}

/// TLS for a server: (certificate PEM, key PEM).
pub type TlsPair = (Vec<u8>, Vec<u8>);

/// Serves the raw Calls and Presence on `listener` with tonic's defaults
/// (and the same keepalive and no-delay settings as Spine's server).
pub async fn serve(listener: tokio::net::TcpListener, targets: usize, tls: Option<TlsPair>) -> anyhow::Result<()> {
    let mut b = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)));
    if let Some((cert, key)) = tls {
        b = b.tls_config(
            tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(cert, key)),
        )?;
    }
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
        s.and_then(|s| {
            s.set_nodelay(true)?;
            Ok(s)
        })
    });
    b.add_service(CallsServer::new(RawCalls))
        .add_service(PresenceServer::new(RawPresence::new(targets)))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

/// [`serve`] on a free loopback port, in this process: its address.
pub async fn spawn(targets: usize) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(serve(listener, targets, None));
    addr
}
