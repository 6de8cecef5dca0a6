//! Presence fan-out beside raw tonic server streaming, in the same run:
//!
//! - **raw tonic**: a bare Watch server on the same proto that forwards each
//!   published state to its subscribers through tokio broadcast channels;
//! - **spine**: the presence service (auth, visibility, coalescing, dedup).
//!
//! 10,000 watch streams (100 connections x 100 streams), each on one of 100
//! target accounts. A round changes every target once; the rate is
//! deliveries per second from the round's start to its last delivery.
//! Memory per idle watch stream is the process's resident-set growth while
//! the 10,000 streams are opened, divided by 10,000 (client and server both
//! in this process, for both alike).
//!
//! Run: `cargo bench -p spine-presence --bench fanout -- [streams] [rounds]`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use spine_proto::identity::v1 as ipb;
use spine_proto::presence::v1::presence_client::PresenceClient;
use spine_proto::presence::v1::presence_server::{Presence, PresenceServer};
use spine_proto::presence::v1::{self as pb, Status};
use spine_testing::req;
use tokio::sync::broadcast;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response};

const TARGETS: usize = 100;
const CONNECTIONS: usize = 100;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).unwrap_or(0) * 4096
}

/// The baseline: a Watch that relays broadcast states, nothing else.
struct Raw {
    topics: Vec<broadcast::Sender<pb::PresenceState>>,
}

#[tonic::async_trait]
impl Presence for Raw {
    async fn announce(&self, r: Request<pb::AnnounceRequest>) -> Result<Response<pb::AnnounceResponse>, tonic::Status> {
        // The target index travels in ttl_seconds: a bench-only shortcut.
        let i = r.get_ref().ttl_seconds as usize;
        let _ = self.topics[i].send(pb::PresenceState {
            target: 0,
            status: r.get_ref().status,
            last_seen: 1,
            last_seen_at: None,
        });
        Ok(Response::new(pb::AnnounceResponse { ttl_seconds: 0 }))
    }
    async fn query(&self, _: Request<pb::QueryRequest>) -> Result<Response<pb::QueryResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("bench"))
    }
    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::PresenceUpdate, tonic::Status>> + Send>>;
    async fn watch(&self, r: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, tonic::Status> {
        let i = match r.get_ref().targets[0].target.as_ref() {
            Some(pb::target::Target::AccountId(a)) => a.parse::<usize>().unwrap_or(0),
            _ => 0,
        };
        let rx = self.topics[i].subscribe();
        let s = tokio_stream::wrappers::BroadcastStream::new(rx)
            .filter_map(|m| async move { m.ok().map(|s| Ok(pb::PresenceUpdate { states: vec![s] })) });
        Ok(Response::new(Box::pin(s)))
    }
}

async fn channels(endpoint: &str) -> Vec<Channel> {
    let mut out = Vec::new();
    for _ in 0..CONNECTIONS {
        out.push(Endpoint::from_shared(endpoint.to_string()).unwrap().connect().await.unwrap());
    }
    out
}

/// Opens `streams` watches (target i % TARGETS) and counts deliveries.
async fn open(
    chans: &[Channel],
    streams: usize,
    token: &str,
    target: impl Fn(usize) -> pb::Target,
    delivered: Arc<AtomicU64>,
) -> u64 {
    let before = rss_bytes();
    let opened = Arc::new(AtomicU64::new(0));
    for s in 0..streams {
        let mut client = PresenceClient::new(chans[s % chans.len()].clone());
        let mut stream = client
            .watch(req(pb::WatchRequest { targets: vec![target(s % TARGETS)] }, token))
            .await
            .unwrap()
            .into_inner();
        let (d, o) = (delivered.clone(), opened.clone());
        tokio::spawn(async move {
            o.fetch_add(1, Ordering::Relaxed);
            while let Some(Ok(_)) = stream.next().await {
                d.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while opened.load(Ordering::Relaxed) < streams as u64 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    rss_bytes().saturating_sub(before)
}

/// Runs `rounds` rounds; returns deliveries per second (median round).
async fn rounds(
    n: usize,
    streams: usize,
    delivered: &AtomicU64,
    publish: impl Fn(usize, usize) -> Pin<Box<dyn Future<Output = ()> + Send>>,
) -> f64 {
    let mut rates = Vec::new();
    for r in 0..n {
        let start_count = delivered.load(Ordering::Relaxed);
        let t = Instant::now();
        let pubs: Vec<_> = (0..TARGETS).map(|i| tokio::spawn(publish(r, i))).collect();
        for p in pubs {
            p.await.unwrap();
        }
        let want = start_count + streams as u64;
        while delivered.load(Ordering::Relaxed) < want {
            if t.elapsed() > Duration::from_secs(60) {
                panic!("round {r}: {} of {streams} delivered", delivered.load(Ordering::Relaxed) - start_count);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        rates.push(streams as f64 / t.elapsed().as_secs_f64());
        // Spine coalesces to one change per account per 500 ms.
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
    rates[rates.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().filter(|a| !a.starts_with("--")).collect();
    let streams: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let n: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(5);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        // Raw tonic.
        let raw = Raw { topics: (0..TARGETS).map(|_| broadcast::channel(1024).0).collect() };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(PresenceServer::new(raw))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let chans = channels(&format!("http://{addr}")).await;
        let delivered = Arc::new(AtomicU64::new(0));
        let raw_mem = open(
            &chans,
            streams,
            "x",
            |i| pb::Target { target: Some(pb::target::Target::AccountId(i.to_string())) },
            delivered.clone(),
        )
        .await;
        let raw_rate = rounds(n, streams, &delivered, |r, i| {
            let mut c = PresenceClient::new(chans[i % chans.len()].clone());
            Box::pin(async move {
                c.announce(pb::AnnounceRequest { status: if r % 2 == 0 { 3 } else { 4 }, ttl_seconds: i as u32 })
                    .await
                    .unwrap();
            })
        })
        .await;

        // Spine presence on the embedded store.
        let env = spine_testing::start_with_services(
            spine_runtime::config::Backend::Embedded,
            {
                // One device holds every stream here: the per-device cap
                // (a defence, 8 by default) would stop the measurement.
                let mut c = spine_testing::test_config();
                c.edit_section(|p: &mut spine_presence::PresenceConfig| p.max_watches_per_device = usize::MAX);
                c
            },
            |rt, mut routes, addr| async move {
                let (names, _) =
                    spine_runtime::service::install::<spine_presence::Presence>(&rt, &mut routes, addr.to_string())
                        .await
                        .unwrap();
                (routes, names)
            },
        )
        .await;
        let t = env.tenant("bench").await;
        let watcher = env.device(&t).await;
        let mut targets = Vec::new();
        for _ in 0..TARGETS {
            let d = env.device(&t).await;
            env.identity()
                .update_settings(req(
                    ipb::UpdateSettingsRequest {
                        account_id: String::new(),
                        settings: Some(ipb::PrivacySettings {
                            presence_visibility: ipb::PresenceVisibility::Everyone as i32,
                            ..Default::default()
                        }),
                        update_mask: Some(prost_types::FieldMask { paths: vec!["presence_visibility".into()] }),
                    },
                    &d.token,
                ))
                .await
                .unwrap();
            targets.push(d);
        }
        let accounts: Vec<String> = targets.iter().map(|d| d.account.clone()).collect();
        let tokens: Arc<Vec<String>> = Arc::new(targets.iter().map(|d| d.token.clone()).collect());
        let chans = channels(&env.server.endpoint()).await;
        let delivered = Arc::new(AtomicU64::new(0));
        let spine_mem = open(
            &chans,
            streams,
            &watcher.token,
            |i| pb::Target { target: Some(pb::target::Target::AccountId(accounts[i].clone())) },
            delivered.clone(),
        )
        .await;
        // Wait for every initial state, then measure changes only.
        tokio::time::sleep(Duration::from_secs(1)).await;
        delivered.store(0, Ordering::Relaxed);
        let spine_rate = rounds(n, streams, &delivered, |r, i| {
            let mut c = PresenceClient::new(chans[i % chans.len()].clone());
            let token = tokens[i].clone();
            Box::pin(async move {
                c.announce(req(
                    pb::AnnounceRequest {
                        status: if r % 2 == 0 { Status::Online as i32 } else { Status::Away as i32 },
                        ttl_seconds: 300,
                    },
                    &token,
                ))
                .await
                .unwrap();
            })
        })
        .await;

        println!("{streams} watch streams, {TARGETS} targets, {n} rounds (median)");
        println!(
            "raw tonic   {raw_rate:>10.0} deliveries/s   {:>7.1} KiB per idle stream",
            raw_mem as f64 / streams as f64 / 1024.0
        );
        println!(
            "spine       {spine_rate:>10.0} deliveries/s   {:>7.1} KiB per idle stream",
            spine_mem as f64 / streams as f64 / 1024.0
        );
        println!(
            "spine / raw: rate {:.2} (aim >= 0.5), memory {:.2} (aim <= 1.5)",
            spine_rate / raw_rate,
            spine_mem as f64 / raw_mem.max(1) as f64
        );
    });
}
