//! Accepted commits per second across many groups, on a real etcd, beside
//! etcd's own compare-and-swap rate measured in the same run on the same
//! etcd, with the same concurrency.
//!
//! - `etcd CAS`: each worker loops get + compare-and-swap on its own key
//!   (the store round trips a commit needs at the least);
//! - `SendCommit`: each worker owns a group (one member device) and loops
//!   self-update -> SendCommit over gRPC -> merge, through the whole stack
//!   (auth, verification, CAS, log, fan-out).
//!
//! Run: `cargo bench -p spine-groups --bench commit_rate` (optional
//! arguments: workers, seconds). Client, server and etcd share this
//! machine's cores, for both measurements alike.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use spine_runtime::config::Backend;
use spine_runtime::store::{Compare, Op, Store, Txn};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(name: &str, mut lat: Vec<Duration>, elapsed: Duration) -> f64 {
    lat.sort();
    let rate = lat.len() as f64 / elapsed.as_secs_f64();
    println!(
        "{name:<12} {:>8.0} ops/s   p50 {:>7.2} ms   p99 {:>7.2} ms   ({} ops in {:.1} s)",
        rate,
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.len(),
        elapsed.as_secs_f64()
    );
    rate
}

async fn etcd_cas(store: Arc<dyn Store>, workers: usize, secs: u64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let s = store.clone();
            tokio::spawn(async move {
                // The raw baseline: etcd's own compare-and-swap, outside any silo.
                #[allow(clippy::disallowed_methods)]
                let key = spine_runtime::store::Key::unchecked(format!("/bench/cas/{w}"));
                s.put(&key, b"0".to_vec()).await.unwrap();
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let kv = s.get(&key).await.unwrap().unwrap();
                    let ok = s
                        .txn(
                            Txn::new()
                                .when(Compare::ModRevision(key.clone(), kv.mod_revision))
                                .then(Op::put(key.clone(), vec![1u8; 256])),
                        )
                        .await
                        .unwrap();
                    assert!(ok.succeeded);
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    report("etcd CAS", lat, start.elapsed())
}

async fn send_commit(workers: usize, secs: u64, backend: Backend) -> f64 {
    let env = support::start(backend).await;
    let t = env.tenant("bench").await;
    let mut members = Vec::new();
    for w in 0..workers {
        let a = env.account(&t).await;
        let mut m = support::member(&env, &t, &a).await;
        support::create_group(&env, &mut m, format!("bench-{w}").as_bytes(), vec![t.id.clone()]).await;
        members.push(m);
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let tasks: Vec<_> = members
        .into_iter()
        .map(|mut m| {
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let b = m.act(|c, g| c.self_update(g)).unwrap();
                    m.send_commit_raw(&b).await.unwrap();
                    m.act(|c, g| c.merge_pending(g)).unwrap();
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    report(if backend == Backend::Etcd { "SendCommit" } else { "SendCommit*" }, lat, start.elapsed())
}

fn main() {
    let args: Vec<String> = std::env::args().filter(|a| !a.starts_with("--")).collect();
    let workers: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(16);
    let secs: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(5);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        println!("{workers} workers, {secs} s each, one etcd on this machine");
        let etcd = spine_testing::EtcdServer::start().await;
        let cas = etcd_cas(etcd.store().await, workers, secs).await;
        drop(etcd);
        let commits = send_commit(workers, secs, Backend::Etcd).await;
        println!("accepted commits / etcd CAS rate = {:.2} (aim: at least 0.5)", commits / cas);
        let embedded = send_commit(workers, secs, Backend::Embedded).await;
        println!("(* on the embedded store, for comparison: {:.0} commits/s)", embedded);
    });
}
