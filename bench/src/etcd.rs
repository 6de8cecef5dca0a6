//! One etcd's limits for Spine's kind of load, measured on this machine
//! (etcd's data on this machine's disk, client on the same cores):
//!
//! - writes per second of record-sized values (400 bytes, a call record's
//!   size) at rising concurrency: the ceiling every write-heavy path
//!   (calls, sessions, commits) shares;
//! - watch fan-out: every node holds one watch on the calls records (its
//!   mirror), so each write is delivered once per node: deliveries per
//!   second with 1 to 50 watchers;
//! - keys and database size: bytes of database and of etcd's memory per
//!   stored record, and a read's latency with them all present.
//!
//! These figures feed the cell model (`cells`), docs/scaling.md.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use spine_runtime::store::{Key, Op, Store, Txn};

use crate::{Latency, Options, Plot, Row, Section, rss_bytes};

/// What the cell model needs from this run.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Limits {
    /// Highest write rate measured (writes/s) and the concurrency it took.
    pub writes_per_s: f64,
    pub at_concurrency: usize,
    /// Watch deliveries per second with the most watchers measured.
    pub deliveries_per_s: f64,
    /// Database bytes per stored 300-byte record.
    pub db_bytes_per_key: f64,
    /// etcd resident memory per stored record.
    pub mem_bytes_per_key: f64,
}

#[allow(clippy::disallowed_methods)]
fn key(s: String) -> Key {
    // The benchmark's own keys on its own etcd, outside any silo.
    Key::unchecked(s)
}

async fn writes(store: &Arc<dyn Store>, workers: usize, d: Duration) -> (Vec<Duration>, f64) {
    let store = store.clone();
    crate::closed_loop(workers, d, &format!("etcd: writes x{workers}"), move |w, i| {
        let s = store.clone();
        async move {
            s.put(&key(format!("/bench/w/{w}/{}", i % 64)), vec![7u8; 400]).await.unwrap();
        }
    })
    .await
}

/// `watchers` watches on one prefix; `events` writes (16 writers): watch
/// deliveries per second until every watcher had every event.
async fn fan_out(store: &Arc<dyn Store>, watchers: usize, events: usize, round: usize) -> anyhow::Result<f64> {
    let prefix = format!("/bench/fan/{round}/");
    let got = Arc::new(AtomicU64::new(0));
    let mut tasks = vec![];
    for _ in 0..watchers {
        let mut w = store.watch(&prefix, 0).await?;
        let got = got.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while n < events {
                match w.next().await {
                    Some(Ok(_)) => {
                        n += 1;
                        got.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => break,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let s = store.clone();
            let prefix = prefix.clone();
            tokio::spawn(async move {
                for i in (w..events).step_by(16) {
                    s.put(&key(format!("{prefix}{i}")), vec![7u8; 400]).await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await?;
    }
    let want = (watchers * events) as u64;
    while got.load(Ordering::Relaxed) < want {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(120),
            "watch fan-out: {} of {want}",
            got.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rate = want as f64 / start.elapsed().as_secs_f64();
    for t in tasks {
        t.abort();
    }
    Ok(rate)
}

async fn db_size(endpoint: &str) -> anyhow::Result<i64> {
    let mut c = etcd_client::Client::connect([endpoint], None).await?;
    Ok(c.status().await?.db_size())
}

pub async fn run(opts: &Options) -> anyhow::Result<(Section, Limits)> {
    let (levels, d, watcher_levels, events, keys): (&[usize], _, &[usize], usize, usize) = if opts.quick {
        (&[16, 64], Duration::from_secs(2), &[1, 10], 2_000, 20_000)
    } else {
        (&[1, 4, 16, 64, 128], Duration::from_secs(4), &[1, 10, 25, 50], 5_000, 200_000)
    };
    let mut s = Section::new(
        "etcd",
        "One etcd's limits for Spine's records (the inputs of docs/scaling.md)",
        "A single etcd member on this machine's disk, client on the same cores. Writes: 400-byte puts; watch \
         fan-out: 16 writers, every watcher sees every write; keys: 300-byte records written in batches of 64.",
    );
    let etcd = spine_testing::EtcdServer::start().await;
    let store = etcd.store().await;

    let mut best = (0.0, 0);
    let mut curve = vec![];
    for &w in levels {
        let (mut lat, rate) = writes(&store, w, d).await;
        curve.push((w as f64, rate));
        if rate > best.0 {
            best = (rate, w);
        }
        s.rows.push(Row::baseline(format!("put, {w} at once")).latency(Latency::of(&mut lat)).rate(rate, "writes/s"));
    }

    let mut fan = vec![];
    let bar = crate::bar(watcher_levels.len() as u64, "etcd: watch fan-out");
    for (i, &w) in watcher_levels.iter().enumerate() {
        let rate = fan_out(&store, w, events, i).await?;
        fan.push((w as f64, rate));
        s.rows.push(Row::baseline(format!("watch deliveries, {w} watchers")).rate(rate, "deliveries/s"));
        bar.inc(1);
    }
    bar.finish_and_clear();

    let size0 = db_size(etcd.endpoint()).await?;
    let mem0 = etcd.pid().map_or(0, |p| rss_bytes(Some(p)));
    let bar = crate::bar(keys as u64, "etcd: storing records");
    let batches: Vec<usize> = (0..keys).step_by(64).collect();
    futures::stream::iter(batches)
        .map(|b| {
            let (s, bar) = (store.clone(), bar.clone());
            async move {
                let mut t = Txn::new();
                for i in b..(b + 64).min(keys) {
                    t = t.then(Op::put(key(format!("/bench/keys/{i:08}")), vec![3u8; 300]));
                }
                s.txn(t).await.unwrap();
                bar.inc(64);
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    bar.finish_and_clear();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let size1 = db_size(etcd.endpoint()).await?;
    let mem1 = etcd.pid().map_or(0, |p| rss_bytes(Some(p)));
    let mut reads = vec![];
    for i in 0..500 {
        let t = Instant::now();
        store.get(&format!("/bench/keys/{:08}", (i * 7919) % keys)).await?;
        reads.push(t.elapsed());
    }
    let limits = Limits {
        writes_per_s: best.0,
        at_concurrency: best.1,
        deliveries_per_s: fan.last().map_or(0.0, |f| f.1),
        db_bytes_per_key: (size1 - size0).max(0) as f64 / keys as f64,
        mem_bytes_per_key: mem1.saturating_sub(mem0) as f64 / keys as f64,
    };
    s.rows.push(
        Row::baseline(format!("get, {keys} records stored"))
            .latency(Latency::of(&mut reads))
            .value(limits.db_bytes_per_key, "DB bytes/record"),
    );
    s.rows.push(Row::baseline("etcd memory per record").value(limits.mem_bytes_per_key, "bytes/record"));
    s.notes.push(format!(
        "database {:.1} MiB -> {:.1} MiB for {keys} records; etcd's default quota is 2 GiB, its largest advised 8 GiB",
        size0 as f64 / 1048576.0,
        size1 as f64 / 1048576.0
    ));
    s.plots.push(Plot::Lines {
        file: "etcd-writes.svg".into(),
        title: "etcd writes against concurrency".into(),
        x_label: "writers at once".into(),
        y_label: "writes/s".into(),
        series: vec![("400-byte puts".into(), curve)],
    });
    s.plots.push(Plot::Lines {
        file: "etcd-fanout.svg".into(),
        title: "etcd watch deliveries against watchers".into(),
        x_label: "watchers (nodes)".into(),
        y_label: "deliveries/s".into(),
        series: vec![("every watcher sees every write".into(), fan)],
    });
    Ok((s, limits))
}
