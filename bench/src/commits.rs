//! Accepted MLS commits per second on etcd, beside etcd's own
//! compare-and-swap rate on the same etcd with the same concurrency:
//!
//! - etcd CAS: each worker loops get + compare-and-swap on its own key (the
//!   store round trips a commit needs at the least);
//! - SendCommit: each worker owns a group (one member device) and sends a
//!   chain of self-update commits it built, merged and signed before the
//!   clock started, so the load generator's own MLS work is outside the
//!   measured path: what is timed is the server (auth, verification,
//!   compare-and-swap, log, fan-out) and the round trip.

use std::sync::Arc;
use std::time::{Duration, Instant};

use spine_mls::client::CommitBundle;
use spine_runtime::store::{Compare, Op, Store, Txn};
use spine_testing::Env;

use crate::{Aim, Latency, Options, Plot, Row, Section};

#[path = "../../services/groups/tests/support/mod.rs"]
mod support;

/// One node (identity and groups) on `store`.
async fn node_on(store: Arc<dyn Store>, etcd: Option<spine_testing::EtcdServer>) -> Env {
    support::start_on(store, etcd, spine_testing::test_config()).await
}

/// Each of `workers` loops get + CAS on its own key for `d`: (latencies, rate).
async fn etcd_cas(
    store: Arc<dyn Store>,
    workers: usize,
    d: Duration,
    etcd_pid: Option<u32>,
) -> (Vec<Duration>, f64, CpuUse) {
    // The raw baseline: etcd's own compare-and-swap, outside any silo.
    #[allow(clippy::disallowed_methods)]
    let key = |w: usize| spine_runtime::store::Key::unchecked(format!("/bench/cas/{w}"));
    for w in 0..workers {
        store.put(&key(w), b"0".to_vec()).await.unwrap();
    }
    let cpu = CpuUse::start(etcd_pid);
    let (lat, rate) = crate::closed_loop(workers, d, &format!("commits: etcd CAS x{workers}"), move |w, _| {
        let (s, key) = (store.clone(), key(w));
        async move {
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
        }
    })
    .await;
    (lat, rate, cpu.stop(etcd_pid))
}

/// `workers` groups on `env`, each with a chain of `per_worker` commits
/// built ahead; then every chain sent at once: (latencies, commits/s).
async fn send_commits(
    env: &Env,
    workers: usize,
    per_worker: usize,
    tag: &str,
    counts: Option<&crate::counting::Counts>,
    etcd_pid: Option<u32>,
) -> anyhow::Result<(Vec<Duration>, f64, crate::counting::Snapshot, CpuUse)> {
    let t = env.tenant(&format!("bench-{tag}")).await;
    let bar = crate::bar((workers * per_worker) as u64, &format!("commits: building x{workers}"));
    let mut senders = Vec::new();
    for w in 0..workers {
        let a = env.account(&t).await;
        let mut m = support::member(env, &t, &a).await;
        support::create_group(env, &mut m, format!("bench-{tag}-{w}").as_bytes(), vec![t.id.clone()]).await;
        // The chain: each commit self-updates from the epoch the last made.
        let chain: Vec<CommitBundle> = tokio::task::block_in_place(|| {
            (0..per_worker)
                .map(|_| {
                    let b = m.act(|c, g| c.self_update(g))?;
                    m.act(|c, g| c.merge_pending(g))?;
                    bar.inc(1);
                    Ok(b)
                })
                .collect::<anyhow::Result<_>>()
        })?;
        senders.push((m, chain));
    }
    bar.finish_and_clear();
    let sending = crate::bar((workers * per_worker) as u64, &format!("commits: SendCommit x{workers}"));
    let before = counts.map(|c| c.snapshot()).unwrap_or_default();
    let cpu = CpuUse::start(etcd_pid);
    let start = Instant::now();
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|(m, chain)| {
            let sending = sending.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(chain.len());
                for b in &chain {
                    let t = Instant::now();
                    m.send_commit_raw(b).await.map_err(|s| anyhow::anyhow!("SendCommit: {s}"))?;
                    lat.push(t.elapsed());
                    sending.inc(1);
                }
                anyhow::Ok(lat)
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let elapsed = start.elapsed();
    let cpu = cpu.stop(etcd_pid);
    let made = counts.map(|c| c.snapshot()).unwrap_or_default() - before;
    sending.finish_and_clear();
    let rate = lat.len() as f64 / elapsed.as_secs_f64();
    Ok((lat, rate, made, cpu))
}

/// CPU time used during a phase by this process (node and load generator)
/// and by etcd.
#[derive(Debug, Clone, Copy)]
struct CpuUse {
    here: Duration,
    etcd: Duration,
}

impl CpuUse {
    fn start(etcd_pid: Option<u32>) -> Self {
        Self { here: crate::cpu_time(None), etcd: etcd_pid.map_or(Duration::ZERO, |p| crate::cpu_time(Some(p))) }
    }
    fn stop(self, etcd_pid: Option<u32>) -> Self {
        let now = Self::start(etcd_pid);
        Self { here: now.here.saturating_sub(self.here), etcd: now.etcd.saturating_sub(self.etcd) }
    }
    /// Microseconds per operation: (here, etcd).
    fn per(self, ops: f64) -> (f64, f64) {
        (self.here.as_secs_f64() * 1e6 / ops, self.etcd.as_secs_f64() * 1e6 / ops)
    }
}

pub async fn run(opts: &Options) -> anyhow::Result<Section> {
    let (levels, per_worker, cas_for): (&[usize], usize, Duration) = if opts.quick {
        (&[1, 16], 40, Duration::from_secs(2))
    } else {
        (&[1, 4, 16, 32], 200, Duration::from_secs(4))
    };
    let mut s = Section::new(
        "commits",
        "Accepted MLS commits per second on etcd, beside etcd's compare-and-swap",
        format!(
            "One node and one etcd on this machine. Each worker owns a one-member group and sends {per_worker} \
             self-update commits built beforehand; etcd CAS loops get + compare-and-swap for {} s per worker count.",
            cas_for.as_secs()
        ),
    );
    let etcd = spine_testing::EtcdServer::start().await;
    let etcd_store = etcd.store().await;
    let etcd_pid = etcd.pid();
    let counting = crate::counting::Counting::new(etcd_store.clone());
    let counts = counting.counts.clone();
    let env = node_on(Arc::new(counting), Some(etcd)).await;
    let (mut cas_curve, mut commit_curve) = (vec![], vec![]);
    let mut plot = vec![];
    for (i, &w) in levels.iter().enumerate() {
        let (mut cas_lat, cas_rate, cas_cpu) = etcd_cas(etcd_store.clone(), w, cas_for, etcd_pid).await;
        let (mut lat, rate, made, cpu) =
            send_commits(&env, w, per_worker, &format!("etcd-{i}"), Some(&counts), etcd_pid).await?;
        let base =
            Row::baseline(format!("etcd CAS, {w} workers")).latency(Latency::of(&mut cas_lat)).rate(cas_rate, "CAS/s");
        let row = Row::new(format!("SendCommit on etcd, {w} workers"))
            .latency(Latency::of(&mut lat))
            .rate(rate, "commits/s")
            .against(&base, "rate");
        cas_curve.push((w as f64, cas_rate));
        commit_curve.push((w as f64, rate));
        if i == 0 {
            // Rounds are counted by overlap, so only where one commit's
            // requests overlap nothing else's: the first (fewest) workers.
            let n = (w * per_worker) as f64;
            s.notes.push(format!(
                "etcd requests per accepted commit ({w} worker{}): {:.2} reads in {:.2} rounds, {:.2} transactions \
                 writing {:.0} bytes of keys and values",
                if w == 1 { "" } else { "s" },
                made.reads as f64 / n,
                made.read_rounds as f64 / n,
                made.txns as f64 / n,
                made.written as f64 / n
            ));
        }
        if w == 16 {
            let ((cas_here, cas_etcd), (here, etcd)) = (cas_cpu.per(cas_lat.len() as f64), cpu.per(lat.len() as f64));
            s.notes.push(format!(
                "CPU per operation, 16 workers: a CAS {cas_etcd:.0} µs in etcd + {cas_here:.0} µs in its client; \
                 an accepted commit {etcd:.0} µs in etcd + {here:.0} µs in the node and load generator"
            ));
            s.aims.push(Aim::at_least("accepted commits / etcd CAS rate, 16 workers", row.ratio.unwrap_or(0.0), 0.5));
            let us = |d: &[Duration]| d.iter().map(|d| d.as_secs_f64() * 1e6).collect::<Vec<_>>();
            plot = vec![("etcd CAS (get + txn)".to_string(), us(&cas_lat)), ("SendCommit".to_string(), us(&lat))];
        }
        s.rows.extend([base, row]);
    }
    drop(env);
    let embedded = node_on(Arc::new(spine_runtime::store::EmbeddedStore::in_memory()), None).await;
    let (mut lat, rate, _, _) = send_commits(&embedded, 16, per_worker, "embedded", None, None).await?;
    s.rows.push(
        Row::new("SendCommit on the embedded store, 16 workers").latency(Latency::of(&mut lat)).rate(rate, "commits/s"),
    );
    s.notes.push("the embedded-store row has no baseline: it shows the node's own ceiling without etcd".into());
    s.plots.push(Plot::Latency {
        file: "commits-latency.svg".into(),
        title: "Commit latency, 16 workers".into(),
        series: plot,
    });
    if levels.len() > 1 {
        s.plots.push(Plot::Lines {
            file: "commits-rate.svg".into(),
            title: "Rate against concurrency".into(),
            x_label: "workers".into(),
            y_label: "per second".into(),
            series: vec![("etcd CAS".into(), cas_curve), ("accepted commits".into(), commit_curve)],
        });
    }
    Ok(s)
}
