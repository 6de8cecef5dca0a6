//! Presence fan-out and idle watch streams, beside a raw tonic server of
//! the same proto that relays states through broadcast channels (no auth,
//! no visibility, no coalescing):
//!
//! - `streams` watch streams over 100 connections, each on one of 100
//!   target accounts; a round changes every target once, and the rate is
//!   deliveries per second from its start to its last delivery (median of
//!   the rounds);
//! - memory per idle watch stream: this process's resident-set growth
//!   while the streams open, divided by their number (client and server
//!   both in this process, for both alike).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use spine_proto::presence::v1::presence_client::PresenceClient;
use spine_proto::presence::v1::{self as pb, Status};
use spine_testing::req;
use tonic::transport::{Channel, Endpoint};

use crate::{Aim, Options, Row, Section, rss_bytes};

const TARGETS: usize = 100;
const CONNECTIONS: usize = 100;

async fn channels(endpoint: &str) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::new();
    for _ in 0..CONNECTIONS {
        out.push(Endpoint::from_shared(endpoint.to_string())?.connect().await?);
    }
    Ok(out)
}

/// Opens `streams` watches (target i % TARGETS), waits for each one's
/// first update, and counts deliveries: the resident-set growth of the
/// process `pid` (None: this one).
async fn open(
    chans: &[Channel],
    streams: usize,
    token: &str,
    target: impl Fn(usize) -> pb::Target,
    delivered: Arc<AtomicU64>,
    (what, pid): (&str, Option<u32>),
) -> anyhow::Result<u64> {
    let bar = crate::bar(streams as u64, what);
    let before = rss_bytes(pid);
    for s in 0..streams {
        let mut client = PresenceClient::new(chans[s % chans.len()].clone());
        let mut stream =
            client.watch(req(pb::WatchRequest { targets: vec![target(s % TARGETS)] }, token)).await?.into_inner();
        let d = delivered.clone();
        tokio::spawn(async move {
            while let Some(Ok(_)) = stream.next().await {
                d.fetch_add(1, Ordering::Relaxed);
            }
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    let t = Instant::now();
    while delivered.load(Ordering::Relaxed) < streams as u64 {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(60),
            "initial states: {} of {streams}",
            delivered.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(rss_bytes(pid).saturating_sub(before))
}

fn account(a: &str) -> pb::Target {
    pb::Target { target: Some(pb::target::Target::AccountId(a.to_string())) }
}

/// Memory per idle watch of each server alone, in KiB: the raw server and a
/// Spine node (identity and presence, on an etcd of its own), each in a
/// process of its own as the idle-device benchmark runs them, the watches
/// opened from this process.
async fn servers_alone(exe: &std::path::Path, streams: usize) -> anyhow::Result<(f64, f64)> {
    use crate::idle::{Files, Server, free_addr};
    let kib = |b: u64| b as f64 / streams as f64 / 1024.0;
    let files = Files::new()?;
    let addr = free_addr();
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("bench-raw-server").arg("--listen").arg(addr.to_string());
    let raw = Server::start(cmd, addr, files.path("raw-presence.log")).await?;
    let chans = channels(&format!("http://{addr}")).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let what = ("presence: raw server alone", Some(raw.pid()));
    let raw_mem = open(&chans, streams, "x", |i| account(&i.to_string()), Arc::default(), what).await?;
    drop((chans, raw));

    let etcd = spine_testing::EtcdServer::start().await;
    let sys = spine_runtime::store::SystemStore::new(etcd.store().await);
    let operator = spine_identity::bootstrap_operator_in(&sys, "bench").await?;
    let addr = free_addr();
    let config = crate::idle::node_config(&files, etcd.endpoint(), addr, false, "presence.toml", |c| {
        c.services = vec!["identity".into(), "presence".into()];
        // One device holds every stream, as in the rows above (a count
        // TOML can hold).
        c.edit_section(|p: &mut spine_presence::PresenceConfig| p.max_watches_per_device = 1_000_000);
    })?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("serve").arg("--config").arg(config);
    let node = Server::start(cmd, addr, files.path("spine-presence.log")).await?;
    let endpoint = format!("http://{addr}");
    // Device i watches device i + 1's account: device 0 watches, the next
    // TARGETS are watched.
    let devs = crate::idle::register(&endpoint, &operator, TARGETS + 1).await?;
    let chans = channels(&endpoint).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let what = ("presence: Spine node alone", Some(node.pid()));
    let spine_mem = open(&chans, streams, &devs[0].token, |i| account(&devs[i].watches), Arc::default(), what).await?;
    drop((chans, node));
    Ok((kib(raw_mem), kib(spine_mem)))
}

type Publish = Box<dyn Fn(usize, usize) -> Pin<Box<dyn Future<Output = ()> + Send>>>;

/// Runs `n` rounds; deliveries per second of the median round.
async fn rounds(n: usize, streams: usize, delivered: &AtomicU64, publish: Publish, what: &str) -> anyhow::Result<f64> {
    let bar = crate::bar(n as u64, what);
    delivered.store(0, Ordering::Relaxed);
    let mut rates = Vec::new();
    for r in 0..n {
        let start_count = delivered.load(Ordering::Relaxed);
        let t = Instant::now();
        let pubs: Vec<_> = (0..TARGETS).map(|i| tokio::spawn(publish(r, i))).collect();
        for p in pubs {
            p.await?;
        }
        let want = start_count + streams as u64;
        while delivered.load(Ordering::Relaxed) < want {
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(60),
                "round {r}: {} of {streams} delivered",
                delivered.load(Ordering::Relaxed) - start_count
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        rates.push(streams as f64 / t.elapsed().as_secs_f64());
        bar.inc(1);
        // Spine coalesces to one change per account per 500 ms.
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    bar.finish_and_clear();
    rates.sort_by(|a, b| a.total_cmp(b));
    Ok(rates[rates.len() / 2])
}

pub async fn run(opts: &Options) -> anyhow::Result<Section> {
    let (streams, n) = if opts.quick { (2_000, 3) } else { (10_000, 5) };
    let mut s = Section::new(
        "presence",
        "Presence fan-out and idle watch streams, beside raw tonic streaming",
        format!(
            "{streams} watch streams over {CONNECTIONS} connections on {TARGETS} targets, one node on the embedded \
             store; {n} rounds, each changing every target once (median). Memory: resident-set growth per \
             stream, of this process (client and server alike), then of each server alone in a process of its \
             own (the Spine node on its own etcd)."
        ),
    );

    // Raw tonic.
    let addr = crate::raw::spawn(TARGETS).await;
    let chans = channels(&format!("http://{addr}")).await?;
    let delivered = Arc::new(AtomicU64::new(0));
    let raw_mem =
        open(&chans, streams, "x", |i| account(&i.to_string()), delivered.clone(), ("presence: raw watches", None))
            .await?;
    let raw_chans = chans.clone();
    let raw_rate = rounds(
        n,
        streams,
        &delivered,
        Box::new(move |r, i| {
            let mut c = PresenceClient::new(raw_chans[i % raw_chans.len()].clone());
            Box::pin(async move {
                c.announce(pb::AnnounceRequest { status: if r % 2 == 0 { 3 } else { 4 }, ttl_seconds: i as u32 })
                    .await
                    .unwrap();
            })
        }),
        "presence: raw rounds",
    )
    .await?;
    drop(chans);

    // Spine presence on the embedded store.
    let env = spine_testing::start_with_services(
        spine_runtime::config::Backend::Embedded,
        {
            // One device holds every stream here: the per-device cap (a
            // defence, 8 by default) would stop the measurement.
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
        crate::everyone_sees_presence(env.channel.clone(), &d.token).await?;
        targets.push(d);
    }
    let accounts: Vec<String> = targets.iter().map(|d| d.account.clone()).collect();
    let tokens: Arc<Vec<String>> = Arc::new(targets.iter().map(|d| d.token.clone()).collect());
    let chans = channels(&env.server.endpoint()).await?;
    let delivered = Arc::new(AtomicU64::new(0));
    let spine_mem = open(
        &chans,
        streams,
        &watcher.token,
        |i| account(&accounts[i]),
        delivered.clone(),
        ("presence: spine watches", None),
    )
    .await?;
    let spine_chans = chans.clone();
    let spine_rate = rounds(
        n,
        streams,
        &delivered,
        Box::new(move |r, i| {
            let mut c = PresenceClient::new(spine_chans[i % spine_chans.len()].clone());
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
        }),
        "presence: spine rounds",
    )
    .await?;

    drop((chans, env));

    let kib = |b: u64| b as f64 / streams as f64 / 1024.0;
    let base = Row::baseline("raw tonic streaming").rate(raw_rate, "deliveries/s").value(kib(raw_mem), "KiB/stream");
    let rate = Row::new("Spine presence: deliveries").rate(spine_rate, "deliveries/s").against(&base, "rate");
    let mem = Row::new("Spine presence: idle watch, client and server in one process")
        .value(kib(spine_mem), "KiB/stream")
        .against(&base, "value");
    s.aims.push(Aim::at_least("presence deliveries, Spine / raw", rate.ratio.unwrap_or(0.0), 0.5));
    s.rows.extend([base, rate, mem.clone()]);
    match &opts.spine_exe {
        Some(exe) => {
            let (raw_alone, spine_alone) = servers_alone(exe, streams).await?;
            let base = Row::baseline("raw tonic server alone: idle watch").value(raw_alone, "KiB/stream");
            let alone =
                Row::new("Spine node alone: idle watch").value(spine_alone, "KiB/stream").against(&base, "value");
            s.aims.push(Aim::at_most(
                "memory per idle watch stream, Spine / raw, servers alone",
                alone.ratio.unwrap_or(f64::NAN),
                1.5,
            ));
            s.rows.extend([base, alone]);
        }
        None => {
            s.notes.push("the servers alone need the spine executable (run it as `spine bench`)".into());
            s.aims.push(Aim::at_most(
                "memory per idle watch stream, Spine / raw, client and server in one process",
                mem.ratio.unwrap_or(f64::NAN),
                1.5,
            ));
        }
    }
    Ok(s)
}
