//! One-to-one call setup, beside a raw tonic round trip and, on etcd,
//! beside its floor.
//!
//! A setup is what a frontend waits for: `StartCall` (unary) -> the ring
//! reaches the callee's stream -> `Answer` (unary) -> the answer reaches
//! the caller's stream. Each call is then hung up (not timed).
//!
//! The floor on etcd is what a setup cannot avoid, each part measured in
//! the same run: two raw tonic round trips (the two unary calls; the two
//! pushes ride on streams already open), plus the etcd round trips the
//! setup makes in sequence (counted through the store, one per *round*:
//! reads sent together wait once), each at the latency of that kind of
//! round trip on this etcd.

use std::sync::Arc;
use std::time::{Duration, Instant};

use spine_proto::calls::v1 as pb;
use spine_proto::calls::v1::calls_client::CallsClient;
use spine_runtime::store::{Compare, EmbeddedStore, Op, Store, Txn};
use spine_testing::EtcdServer;

use crate::{Aim, Latency, Options, Plot, Row, Section, Timed};
use spine_testing::StoreTap;
use spine_testing::counts::{Counts, Snapshot};

#[path = "../../services/calls/tests/support/mod.rs"]
mod support;

use support::{Phone, account_ref, everyone_can_call, state};

/// Sequential raw round trips; then `workers` at once for `d`: (latencies, per second).
async fn raw(calls: usize, workers: usize, d: Duration) -> anyhow::Result<(Vec<Duration>, f64)> {
    let addr = crate::raw::spawn(1).await;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
    let mut client = CallsClient::new(ch.clone());
    let mut lat = Vec::with_capacity(calls);
    for i in 0..calls + 50 {
        let t = Instant::now();
        client.get_call(pb::GetCallRequest { call_id: format!("cl_{i}") }).await?;
        if i >= 50 {
            lat.push(t.elapsed());
        }
    }
    let (_, rate) = crate::closed_loop(workers, d, &format!("calls: raw x{workers}"), move |_, _| {
        let mut c = CallsClient::new(ch.clone());
        async move {
            c.get_call(pb::GetCallRequest { call_id: "cl_x".into() }).await.unwrap();
        }
    })
    .await;
    Ok((lat, rate))
}

/// One full setup; the call is then hung up and its end awaited. Returns
/// the setup's time and the store round trips made during it (not during
/// the hang-up), if the store counts them.
async fn setup(
    caller: &mut Phone,
    callee: &mut Phone,
    callee_acct: &str,
    counts: Option<&Counts>,
) -> (Duration, Snapshot, [Duration; 4]) {
    let before = counts.map(|c| c.snapshot()).unwrap_or_default();
    let t = Instant::now();
    let call = caller.start(account_ref(callee_acct), false).await.unwrap();
    let t1 = t.elapsed();
    callee.call_where(&call.call_id, |c| state(c) == pb::CallState::Ringing).await;
    let t2 = t.elapsed();
    callee.answer(&call.call_id).await.unwrap();
    let t3 = t.elapsed();
    caller.call_where(&call.call_id, |c| state(c) == pb::CallState::Active).await;
    let took = t.elapsed();
    let steps = [t1, t2 - t1, t3 - t2, took - t3];
    let made = counts.map(|c| c.snapshot()).unwrap_or_default() - before;
    callee.hang_up(&call.call_id).await.unwrap();
    caller.call_where(&call.call_id, |c| state(c) == pb::CallState::Ended).await;
    callee.call_where(&call.call_id, |c| state(c) == pb::CallState::Ended).await;
    (took, made, steps)
}

struct SetupRun {
    lat: Vec<Duration>,
    rate: f64,
    /// Store round trips made by the sequential setups, in all.
    made: Snapshot,
    /// Each setup's steps, in order: StartCall's reply, the ring reaching
    /// the callee, Answer's reply, the answer reaching the caller.
    steps: [Vec<Duration>; 4],
}

async fn spine(
    store: Arc<dyn Store>,
    etcd: Option<EtcdServer>,
    counts: Option<Arc<Counts>>,
    (calls, workers, d): (usize, usize, Duration),
    what: &str,
) -> anyhow::Result<SetupRun> {
    let (n, _) = support::nodes_on(store, etcd, 1, None, |_, _| {}).await;
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
    let mut made = Snapshot::default();
    let mut steps: [Vec<Duration>; 4] = Default::default();
    {
        let bar = crate::bar((calls + 20) as u64, &format!("calls: {what}"));
        let (caller, callee, b) = &mut pairs[0];
        for i in 0..calls + 20 {
            let (d, m, st) = setup(caller, callee, b, counts.as_deref()).await;
            if i >= 20 {
                lat.push(d);
                made = made + m;
                for (k, x) in st.iter().enumerate() {
                    steps[k].push(*x);
                }
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
    }
    let _bar = Timed::start(d, &format!("calls: {what} x{workers}"));
    let deadline = Instant::now() + d;
    let start = Instant::now();
    let tasks: Vec<_> = pairs
        .into_iter()
        .map(|(mut caller, mut callee, b)| {
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    setup(&mut caller, &mut callee, &b, None).await;
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await?;
    }
    Ok(SetupRun { lat, rate: total as f64 / start.elapsed().as_secs_f64(), made, steps })
}

/// etcd's own round trips on `store`, sequential: (get, txn) latencies.
/// With `watched`, a watch follows the key meanwhile, as every calls
/// node's mirror follows the calls records: not part of the floor, it
/// tells what a watch adds to a write.
async fn etcd_round_trips(
    store: &Arc<dyn Store>,
    n: usize,
    watched: bool,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    use futures::StreamExt;
    // The raw baseline: etcd's own operations, outside any silo.
    let prefix = if watched { "/bench/rtw/" } else { "/bench/rt/" };
    #[allow(clippy::disallowed_methods)]
    let key = spine_runtime::store::Key::unchecked(format!("{prefix}key"));
    store.put(&key, vec![1u8; 512]).await?;
    let drain = if watched {
        let mut events = store.watch(prefix, 0).await?;
        Some(tokio::spawn(async move { while events.next().await.is_some() {} }))
    } else {
        None
    };
    let (mut gets, mut txns) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n + 20 {
        let t = Instant::now();
        let kv = store.get(&key).await?.ok_or_else(|| anyhow::anyhow!("key gone"))?;
        gets.push(t.elapsed());
        let t = Instant::now();
        let out = store
            .txn(
                Txn::new()
                    .when(Compare::ModRevision(key.clone(), kv.mod_revision))
                    .then(Op::put(key.clone(), vec![2u8; 512])),
            )
            .await?;
        anyhow::ensure!(out.succeeded, "nobody else writes this key");
        txns.push(t.elapsed());
    }
    if let Some(d) = drain {
        d.abort();
    }
    Ok((gets.split_off(20), txns.split_off(20)))
}

pub async fn run(opts: &Options) -> anyhow::Result<Section> {
    let shape = if opts.quick { (100, 8, Duration::from_secs(2)) } else { (300, 16, Duration::from_secs(5)) };
    let (calls, workers, d) = shape;
    let mut s = Section::new(
        "calls",
        "One-to-one call setup, beside a raw tonic round trip and its floor on etcd",
        format!(
            "StartCall -> ring on the callee's stream -> Answer -> answer on the caller's stream. Latency: one pair, \
             {calls} sequential setups; rate: {workers} pairs at once for {} s. One node; etcd on this machine.",
            d.as_secs()
        ),
    );
    let (mut raw_lat, raw_rate) = raw(calls, workers, d).await?;
    let raw_row =
        Row::baseline("raw tonic round trip").latency(Latency::of(&mut raw_lat)).rate(raw_rate, "round trips/s");
    let raw_p50 = raw_row.latency.map_or(0.0, |l| l.p50_us);

    let mut embedded = spine(Arc::new(EmbeddedStore::in_memory()), None, None, shape, "embedded").await?;
    let emb_row = Row::new("setup, embedded store")
        .latency(Latency::of(&mut embedded.lat))
        .rate(embedded.rate, "setups/s")
        .against(&raw_row, "p50");
    s.aims.push(Aim::at_most("setup p50 / raw round trip, embedded store", emb_row.ratio.unwrap_or(f64::NAN), 4.0));

    let etcd = EtcdServer::start().await;
    let etcd_store = etcd.store().await;
    let (mut gets, mut txns) = etcd_round_trips(&etcd_store, calls, false).await?;
    let (_, mut watched) = etcd_round_trips(&etcd_store, calls, true).await?;
    let tap = StoreTap::new(etcd_store.clone());
    let counts = tap.counts();
    let mut on_etcd = spine(tap, Some(etcd), Some(counts), shape, "etcd").await?;
    let get_row = Row::baseline("etcd get (linearizable)").latency(Latency::of(&mut gets));
    let txn_row = Row::baseline("etcd compare-and-swap txn").latency(Latency::of(&mut txns));
    let watched_row = Row::new("etcd compare-and-swap txn, key watched (not in the floor)")
        .latency(Latency::of(&mut watched))
        .against(&txn_row, "p50");
    let (get_p50, txn_p50) = (get_row.latency.map_or(0.0, |l| l.p50_us), txn_row.latency.map_or(0.0, |l| l.p50_us));
    let (get_p99, txn_p99) = (get_row.latency.map_or(0.0, |l| l.p99_us), txn_row.latency.map_or(0.0, |l| l.p99_us));
    let raw_p99 = raw_row.latency.map_or(0.0, |l| l.p99_us);
    let per = |v: u64| v as f64 / calls as f64;
    let m = on_etcd.made;
    // What a setup must make, and why (docs/performance.md):
    // one round of reads (the callee's settings, contacts and blocks, read
    // together: consent is checked on the stored truth), the create
    // transaction (claims the pair's key and writes the call atomically),
    // the answer's compare-and-swap.
    let (must_reads, must_txns) = (1.0, 2.0);
    let floor_us = 2.0 * raw_p50 + must_reads * get_p50 + must_txns * txn_p50;
    // The same sum of each part's p99: a bound, not a measured tail.
    let floor_p99 = 2.0 * raw_p99 + must_reads * get_p99 + must_txns * txn_p99;
    let etcd_row = Row::new("setup, etcd").latency(Latency::of(&mut on_etcd.lat)).rate(on_etcd.rate, "setups/s");
    let floor_row = Row::baseline("floor on etcd: 2 raw round trips + 1 read round + 2 txns").latency(Some(Latency {
        p50_us: floor_us,
        p99_us: floor_p99,
        samples: 0,
    }));
    let vs_raw = etcd_row.clone().against(&raw_row, "p50");
    let vs_floor = Row { name: "setup, etcd (against its floor)".into(), ..etcd_row.against(&floor_row, "p50") };
    s.aims.push(Aim::at_most("setup p50 on etcd / its floor", vs_floor.ratio.unwrap_or(f64::NAN), 1.5));
    s.notes.push(format!(
        "store round trips per setup on etcd, counted: {:.2} reads in {:.2} rounds, {:.2} transactions in {:.2} rounds \
         (a setup must make 1 read round and 2 transactions), writing {:.0} bytes of keys and values",
        per(m.reads),
        per(m.read_rounds),
        per(m.txns),
        per(m.txn_rounds),
        per(m.written)
    ));
    let mean = |d: &[Duration]| d.iter().map(Duration::as_secs_f64).sum::<f64>() * 1e3 / d.len().max(1) as f64;
    let p50 = |d: &[Duration]| Latency::of(&mut d.to_vec()).map_or(0.0, |l| l.p50_us / 1e3);
    for (run, what) in [(&embedded, "embedded store"), (&on_etcd, "etcd")] {
        let [a, b, c, d] = &run.steps;
        s.notes.push(format!(
            "where a setup's time goes, {what} (p50 of each step): StartCall replied {:.3} ms, ring on the callee's \
             stream {:.3} ms later, Answer replied {:.3} ms later, answer on the caller's stream {:.3} ms later",
            p50(a),
            p50(b),
            p50(c),
            p50(d)
        ));
    }
    s.notes.push(format!(
        "a setup on etcd waits on average {:.3} ms for its read round and {:.3} ms for its transactions (the \
         floor's means: {:.3} and {:.3} ms)",
        m.reading.as_secs_f64() * 1e3 / calls as f64,
        m.writing.as_secs_f64() * 1e3 / calls as f64,
        must_reads * mean(&gets),
        must_txns * mean(&txns),
    ));
    let us = |d: &[Duration]| d.iter().map(|d| d.as_secs_f64() * 1e6).collect::<Vec<_>>();
    s.plots.push(Plot::Latency {
        file: "calls-setup-latency.svg".into(),
        title: "One-to-one call setup".into(),
        series: vec![
            ("raw tonic round trip".into(), us(&raw_lat)),
            ("setup, embedded store".into(), us(&embedded.lat)),
            ("setup, etcd".into(), us(&on_etcd.lat)),
            ("etcd txn".into(), us(&txns)),
        ],
    });
    s.rows.extend([raw_row, emb_row, vs_raw, get_row, txn_row, watched_row, floor_row, vs_floor]);
    Ok(s)
}
