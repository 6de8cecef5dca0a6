//! One-to-one call setup beside a raw tonic unary round trip, measured in
//! the same run on the same machine:
//!
//! - **raw tonic**: a bare server of the same proto answering `GetCall`
//!   with a fixed message: no auth, no store, nothing else;
//! - **setup**: StartCall (unary) -> the ring reaches the callee's stream ->
//!   Answer (unary) -> the answer reaches the caller's stream, through the
//!   whole stack (auth, settings, store transactions, the mirror's push).
//!   Each call is then hung up (not timed) so the pair is free again.
//!
//! Latency: one pair, sequential calls, p50 and p99. Throughput: `workers`
//! pairs calling at once for `seconds`, setups completed per second on one
//! node, beside raw round trips per second at the same concurrency.
//!
//! Run: `cargo bench -p spine-calls --bench call_setup -- [calls] [workers] [seconds]`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::Stream;
use spine_proto::calls::v1 as pb;
use spine_proto::calls::v1::calls_client::CallsClient;
use spine_proto::calls::v1::calls_server::{Calls, CallsServer};
use spine_runtime::config::Backend;
use support::{Phone, account_ref, everyone_can_call, state};
use tonic::{Request, Response, Status, Streaming};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// (p50, p99) in ms, printed.
fn report(name: &str, mut lat: Vec<Duration>) -> (f64, f64) {
    lat.sort();
    let (p50, p99) = (percentile(&lat, 0.5).as_secs_f64() * 1e3, percentile(&lat, 0.99).as_secs_f64() * 1e3);
    println!("{name:<22} p50 {p50:>7.3} ms   p99 {p99:>7.3} ms   ({} samples)", lat.len());
    (p50, p99)
}

/// The baseline: GetCall answered with a fixed call.
struct Raw;

#[tonic::async_trait]
impl Calls for Raw {
    type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::ServerEvent, Status>> + Send>>;
    async fn session(&self, _: Request<Streaming<pb::ClientMessage>>) -> Result<Response<Self::SessionStream>, Status> {
        Err(Status::unimplemented("bench"))
    }
    type EventsStream = Pin<Box<dyn Stream<Item = Result<pb::ServerEvent, Status>> + Send>>;
    async fn events(&self, _: Request<pb::EventsRequest>) -> Result<Response<Self::EventsStream>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn get_media_admission(
        &self,
        _: Request<pb::GetMediaAdmissionRequest>,
    ) -> Result<Response<pb::MediaAdmission>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn start_call(&self, _: Request<pb::StartCallRequest>) -> Result<Response<pb::Call>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn start_group_call(&self, _: Request<pb::StartGroupCallRequest>) -> Result<Response<pb::Call>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn answer(&self, _: Request<pb::AnswerRequest>) -> Result<Response<pb::Call>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn decline(&self, _: Request<pb::DeclineRequest>) -> Result<Response<pb::Call>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn join(&self, _: Request<pb::JoinRequest>) -> Result<Response<pb::Call>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn hang_up(&self, _: Request<pb::HangUpRequest>) -> Result<Response<pb::Call>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn get_call(&self, r: Request<pb::GetCallRequest>) -> Result<Response<pb::Call>, Status> {
        Ok(Response::new(pb::Call {
            call_id: r.into_inner().call_id,
            state: pb::CallState::Active as i32,
            your_leg_id: "lg_aaaaaaaaaaaaaaaaaaaaaaaaaa".into(),
            ..Default::default()
        }))
    }
    async fn signal(&self, _: Request<pb::SignalRequest>) -> Result<Response<pb::SignalResponse>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn get_turn_credentials(
        &self,
        _: Request<pb::GetTurnCredentialsRequest>,
    ) -> Result<Response<pb::TurnCredentials>, Status> {
        Err(Status::unimplemented("bench"))
    }
}

async fn raw_server() -> tonic::transport::Channel {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CallsServer::new(Raw))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

/// Sequential raw round trips; then `workers` at once for `secs`: (latencies, per second).
async fn raw(calls: usize, workers: usize, secs: u64) -> (Vec<Duration>, f64) {
    let ch = raw_server().await;
    let mut client = CallsClient::new(ch.clone());
    let mut lat = Vec::with_capacity(calls);
    for i in 0..calls + 50 {
        let t = Instant::now();
        client.get_call(pb::GetCallRequest { call_id: format!("cl_{i}") }).await.unwrap();
        if i >= 50 {
            lat.push(t.elapsed());
        }
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let mut c = CallsClient::new(ch.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    c.get_call(pb::GetCallRequest { call_id: "cl_x".into() }).await.unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    (lat, total as f64 / start.elapsed().as_secs_f64())
}

/// One full setup; the call is then hung up and its end awaited.
async fn setup(caller: &mut Phone, callee: &mut Phone, callee_acct: &str) -> Duration {
    let t = Instant::now();
    let call = caller.start(account_ref(callee_acct), false).await.unwrap();
    callee.call_where(&call.call_id, |c| state(c) == pb::CallState::Ringing).await;
    callee.answer(&call.call_id).await.unwrap();
    caller.call_where(&call.call_id, |c| state(c) == pb::CallState::Active).await;
    let took = t.elapsed();
    callee.hang_up(&call.call_id).await.unwrap();
    caller.call_where(&call.call_id, |c| state(c) == pb::CallState::Ended).await;
    callee.call_where(&call.call_id, |c| state(c) == pb::CallState::Ended).await;
    took
}

async fn spine(backend: Backend, calls: usize, workers: usize, secs: u64) -> (Vec<Duration>, f64) {
    let n = support::nodes(backend, 1, |_, _| {}).await;
    let env = &n[0];
    let t = env.tenant("bench").await;
    let mut pairs = Vec::new();
    for _ in 0..workers {
        let (a, b) = (env.account(&t).await, env.account(&t).await);
        everyone_can_call(env, &t, &b).await;
        let caller = Phone::connect(env, env.device_of(&t, &a).await).await;
        let callee = Phone::connect(env, env.device_of(&t, &b).await).await;
        pairs.push((caller, callee, b));
    }
    let mut lat = Vec::with_capacity(calls);
    {
        let (caller, callee, b) = &mut pairs[0];
        for i in 0..calls + 20 {
            let d = setup(caller, callee, b).await;
            if i >= 20 {
                lat.push(d);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let tasks: Vec<_> = pairs
        .into_iter()
        .map(|(mut caller, mut callee, b)| {
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    setup(&mut caller, &mut callee, &b).await;
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    (lat, total as f64 / start.elapsed().as_secs_f64())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let calls: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(300);
    let workers: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(16);
    let secs: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(5);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        println!("{calls} sequential calls; then {workers} concurrent pairs for {secs} s; one node");
        let (raw_lat, raw_rate) = raw(calls, workers, secs).await;
        let (raw50, raw99) = report("raw tonic round trip", raw_lat);
        println!("{:<22} {raw_rate:>8.0} round trips/s", "");
        for (name, backend) in [("setup, embedded", Backend::Embedded), ("setup, etcd", Backend::Etcd)] {
            let (lat, rate) = spine(backend, calls, workers, secs).await;
            let (p50, p99) = report(name, lat);
            println!(
                "{:<22} {rate:>8.0} setups/s   p50 {:.1}x raw, p99 {:.1}x raw (aim on embedded: p50 within 4x)",
                "",
                p50 / raw50,
                p99 / raw99
            );
        }
    });
}
