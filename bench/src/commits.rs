//! Accepted MLS commits per second on etcd, beside etcd's own
//! compare-and-swap rate on the same etcd with the same concurrency:
//!
//! - etcd CAS: each worker loops get + compare-and-swap on its own key (the
//!   store round trips a commit needs at the least);
//! - SendCommit: each worker owns a group (one member device) and sends a
//!   chain of self-update commits it built, merged and signed before the
//!   clock started, so the load generator's own MLS work is outside the
//!   measured path: what is timed is the server (auth, verification,
//!   compare-and-swap, log, fan-out) and the round trip. The node keeps
//!   each group's state between its commits, so a commit on top of its own
//!   last one makes one transaction and no read;
//! - SendCommit with no state kept (`groups.verifier_cache_mib = 0`, on a
//!   second node): each commit reads the group and restores its state, as
//!   on a node that did not make the epoch before.
//!
//! At each worker count the two alternate in short rounds (CAS, then a
//! part of every chain, then CAS again...), and each rate is pooled over
//! its rounds: on a shared machine whose speed drifts over seconds, both
//! sides then see the same drift.

use std::sync::Arc;
use std::time::{Duration, Instant};

use spine_mls::client::CommitBundle;
use spine_runtime::store::{Compare, Op, Store, Txn};
use spine_testing::Env;

use crate::{Aim, Latency, Options, Plot, Row, Section};

#[path = "../../services/groups/tests/support/mod.rs"]
mod support;

/// One node (identity and groups) on `store`; `verifier_cache_mib` if
/// given, else the default.
async fn node_on(
    store: Arc<dyn Store>,
    etcd: Option<spine_testing::EtcdServer>,
    verifier_cache_mib: Option<u64>,
) -> Env {
    let mut config = spine_testing::test_config();
    if let (Some(mib), Some(groups)) =
        (verifier_cache_mib, config.sections.get_mut("groups").and_then(|g| g.as_object_mut()))
    {
        groups.insert("verifier_cache_mib".into(), mib.into());
    }
    support::start_on(store, etcd, config).await
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

/// A worker's group member and the chain of commits it built ahead.
type Chain = (support::Member, Vec<CommitBundle>);

/// `workers` groups on `env`, each with a chain of `per_worker` commits
/// built ahead (outside any timing).
async fn build_chains(env: &Env, workers: usize, per_worker: usize, tag: &str) -> anyhow::Result<Vec<Chain>> {
    let t = env.tenant(&format!("bench-{tag}")).await;
    let bar = crate::bar((workers * per_worker) as u64, &format!("commits: building x{workers}"));
    let mut chains = Vec::new();
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
        chains.push((m, chain));
    }
    bar.finish_and_clear();
    Ok(chains)
}

/// Sends commits `from..to` of every chain at once: (latencies, time taken,
/// the chains back).
async fn send_commits(
    chains: Vec<Chain>,
    from: usize,
    to: usize,
) -> anyhow::Result<(Vec<Duration>, Duration, Vec<Chain>)> {
    let start = Instant::now();
    let tasks: Vec<_> = chains
        .into_iter()
        .map(|(m, chain)| {
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(to - from);
                for b in &chain[from..to] {
                    let t = Instant::now();
                    m.send_commit_raw(b).await.map_err(|s| anyhow::anyhow!("SendCommit: {s}"))?;
                    lat.push(t.elapsed());
                }
                anyhow::Ok((lat, (m, chain)))
            })
        })
        .collect();
    let (mut lat, mut back) = (Vec::new(), Vec::new());
    for t in tasks {
        let (l, c) = t.await??;
        lat.extend(l);
        back.push(c);
    }
    Ok((lat, start.elapsed(), back))
}

/// One worker count, measured in `rounds` alternating rounds: etcd CAS for
/// `cas_for / rounds`, then the next part of every chain.
struct Level {
    cas_lat: Vec<Duration>,
    cas_rate: f64,
    cas_cpu: CpuUse,
    lat: Vec<Duration>,
    rate: f64,
    cpu: CpuUse,
    made: spine_testing::counts::Snapshot,
    /// Each round's commit rate over its CAS rate.
    round_ratios: Vec<f64>,
}

async fn level(
    cas_store: Option<Arc<dyn Store>>,
    chains: Vec<Chain>,
    rounds: usize,
    cas_for: Duration,
    counts: Option<&spine_testing::counts::Counts>,
    etcd_pid: Option<u32>,
) -> anyhow::Result<Level> {
    let (workers, per_worker) = (chains.len(), chains.first().map_or(0, |c| c.1.len()));
    let mut out = Level {
        cas_lat: vec![],
        cas_rate: 0.0,
        cas_cpu: CpuUse::zero(),
        lat: vec![],
        rate: 0.0,
        cpu: CpuUse::zero(),
        made: Default::default(),
        round_ratios: vec![],
    };
    let (mut cas_time, mut commit_time) = (Duration::ZERO, Duration::ZERO);
    let mut chains = chains;
    for r in 0..rounds {
        let mut cas_rate = None;
        if let Some(store) = &cas_store {
            let (lat, rate, cpu) = etcd_cas(store.clone(), workers, cas_for / rounds as u32, etcd_pid).await;
            cas_time += Duration::from_secs_f64(lat.len() as f64 / rate);
            out.cas_lat.extend(lat);
            out.cas_cpu = out.cas_cpu.plus(cpu);
            cas_rate = Some(rate);
        }
        let (from, to) = (per_worker * r / rounds, per_worker * (r + 1) / rounds);
        let before = counts.map(|c| c.snapshot()).unwrap_or_default();
        let cpu = CpuUse::start(etcd_pid);
        let (lat, took, back) = send_commits(chains, from, to).await?;
        out.cpu = out.cpu.plus(cpu.stop(etcd_pid));
        out.made = out.made + (counts.map(|c| c.snapshot()).unwrap_or_default() - before);
        chains = back;
        commit_time += took;
        if let Some(cas) = cas_rate {
            out.round_ratios.push(lat.len() as f64 / took.as_secs_f64() / cas);
        }
        out.lat.extend(lat);
    }
    out.rate = out.lat.len() as f64 / commit_time.as_secs_f64();
    out.cas_rate = out.cas_lat.len() as f64 / cas_time.as_secs_f64().max(f64::MIN_POSITIVE);
    Ok(out)
}

/// CPU time used during a phase by this process (node and load generator)
/// and by etcd.
#[derive(Debug, Clone, Copy)]
struct CpuUse {
    here: Duration,
    etcd: Duration,
}

impl CpuUse {
    fn zero() -> Self {
        Self { here: Duration::ZERO, etcd: Duration::ZERO }
    }
    fn plus(self, other: Self) -> Self {
        Self { here: self.here + other.here, etcd: self.etcd + other.etcd }
    }
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
    let (levels, per_worker, cas_for, rounds): (&[usize], usize, Duration, usize) = if opts.quick {
        (&[1, 16], 40, Duration::from_secs(2), 2)
    } else {
        (&[1, 4, 16, 32], 200, Duration::from_secs(4), 4)
    };
    let mut s = Section::new(
        "commits",
        "Accepted MLS commits per second on etcd, beside etcd's compare-and-swap",
        format!(
            "One node and one etcd on this machine. Each worker owns a one-member group and sends {per_worker} \
             self-update commits built beforehand; etcd CAS loops get + compare-and-swap for {} s per worker count. \
             The two alternate in {rounds} rounds per worker count; each rate is pooled over its rounds. \
             The node keeps each group's state between its commits, so a commit on top of its own last one \
             makes one etcd transaction and no read; the 'no state kept' row is a second node with \
             groups.verifier_cache_mib = 0, where every commit reads the group and restores its state.",
            cas_for.as_secs()
        ),
    );
    let etcd = spine_testing::EtcdServer::start().await;
    let etcd_store = etcd.store().await;
    let etcd_pid = etcd.pid();
    let tap = spine_testing::StoreTap::new(etcd_store.clone());
    let counts = tap.counts();
    let env = node_on(tap, Some(etcd), None).await;
    let (mut cas_curve, mut commit_curve) = (vec![], vec![]);
    let mut plot = vec![];
    for (i, &w) in levels.iter().enumerate() {
        let chains = build_chains(&env, w, per_worker, &format!("etcd-{i}")).await?;
        let mut l = level(Some(etcd_store.clone()), chains, rounds, cas_for, Some(&counts), etcd_pid).await?;
        let base = Row::baseline(format!("etcd CAS, {w} workers"))
            .latency(Latency::of(&mut l.cas_lat))
            .rate(l.cas_rate, "CAS/s");
        let row = Row::new(format!("SendCommit on etcd, {w} workers"))
            .latency(Latency::of(&mut l.lat))
            .rate(l.rate, "commits/s")
            .against(&base, "rate");
        cas_curve.push((w as f64, l.cas_rate));
        commit_curve.push((w as f64, l.rate));
        if i == 0 {
            // Rounds are counted by overlap, so only where one commit's
            // requests overlap nothing else's: the first (fewest) workers.
            let n = (w * per_worker) as f64;
            let made = l.made;
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
            let ((cas_here, cas_etcd), (here, etcd)) =
                (l.cas_cpu.per(l.cas_lat.len() as f64), l.cpu.per(l.lat.len() as f64));
            s.notes.push(format!(
                "CPU per operation, 16 workers: a CAS {cas_etcd:.0} µs in etcd + {cas_here:.0} µs in its client; \
                 an accepted commit {etcd:.0} µs in etcd + {here:.0} µs in the node and load generator"
            ));
            let each: Vec<String> = l.round_ratios.iter().map(|r| format!("{r:.2}")).collect();
            s.notes.push(format!("16 workers, each round's commit rate / CAS rate: {}", each.join(", ")));
            s.aims.push(Aim::at_least("accepted commits / etcd CAS rate, 16 workers", row.ratio.unwrap_or(0.0), 0.5));
            let us = |d: &[Duration]| d.iter().map(|d| d.as_secs_f64() * 1e6).collect::<Vec<_>>();
            plot = vec![("etcd CAS (get + txn)".to_string(), us(&l.cas_lat)), ("SendCommit".to_string(), us(&l.lat))];
        }
        s.rows.extend([base, row]);
    }
    // The same at 16 workers on a node that keeps no state: every commit
    // reads the group from etcd and restores it, as a node does for a
    // group whose last epoch another node made.
    let cold = node_on(etcd_store.clone(), None, Some(0)).await;
    let chains = build_chains(&cold, 16, per_worker, "cold").await?;
    let mut l = level(Some(etcd_store.clone()), chains, rounds, cas_for, None, etcd_pid).await?;
    let base = Row::baseline("etcd CAS, 16 workers (beside the next row)")
        .latency(Latency::of(&mut l.cas_lat))
        .rate(l.cas_rate, "CAS/s");
    let row = Row::new("SendCommit on etcd, 16 workers, no state kept")
        .latency(Latency::of(&mut l.lat))
        .rate(l.rate, "commits/s")
        .against(&base, "rate");
    let ((cas_here, cas_etcd), (here, etcd)) = (l.cas_cpu.per(l.cas_lat.len() as f64), l.cpu.per(l.lat.len() as f64));
    s.notes.push(format!(
        "no state kept, 16 workers: a CAS {cas_etcd:.0} µs in etcd + {cas_here:.0} µs in its client; an accepted \
         commit {etcd:.0} µs in etcd + {here:.0} µs in the node and load generator"
    ));
    s.rows.extend([base, row]);
    drop(cold);
    drop(env);
    let embedded = node_on(Arc::new(spine_runtime::store::EmbeddedStore::in_memory()), None, None).await;
    let chains = build_chains(&embedded, 16, per_worker, "embedded").await?;
    let mut e = level(None, chains, 1, Duration::ZERO, None, None).await?;
    let (mut lat, rate) = (std::mem::take(&mut e.lat), e.rate);
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
