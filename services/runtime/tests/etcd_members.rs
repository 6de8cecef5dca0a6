//! What a node sees of etcd when one member of three is lost: nothing.
//! Real three-member clusters on loopback; members killed (SIGKILL), frozen
//! (SIGSTOP) or down before the node starts. And etcd behind TLS with
//! client-certificate auth.

#[allow(clippy::disallowed_methods)] // the store's own tests name raw keys
fn raw_key(s: impl Into<String>) -> spine_runtime::store::Key {
    spine_runtime::store::Key::unchecked(s)
}

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use spine_runtime::store::{Compare, EtcdStore, Op, Store, StoreError, Txn, TxnOutcome};
use spine_testing::EtcdCluster;

/// A mix of what services do: reads, ranges, compare-and-swap writes, a
/// lease with a leased key. Returns each operation's latency and every
/// error.
async fn workload(s: &Arc<dyn Store>, tag: &str, rounds: usize) -> (Vec<Duration>, Vec<String>) {
    let mut took = Vec::new();
    let mut errors = Vec::new();
    let mut record = |t: Instant, r: Result<(), StoreError>, what: &str| {
        took.push(t.elapsed());
        if let Err(e) = r {
            errors.push(format!("{what}: {e}"));
        }
    };
    for i in 0..rounds {
        let key = format!("/spine/test/{tag}/{}", i % 7);
        let t = Instant::now();
        let r = async {
            let cur = s.get(&key).await?;
            let rev = cur.map_or(0, |kv| kv.mod_revision);
            let out = s
                .txn(
                    Txn::new()
                        .when(Compare::ModRevision(raw_key(key.clone()), rev))
                        .then(Op::put(raw_key(key.clone()), format!("v{i}"))),
                )
                .await?;
            assert!(out.succeeded, "no one else writes these keys");
            Ok(())
        }
        .await;
        record(t, r, "cas");
        let t = Instant::now();
        let r = s.range(&format!("/spine/test/{tag}/"), None, 0).await.map(|_| ());
        record(t, r, "range");
        if i % 10 == 0 {
            let t = Instant::now();
            let r = async {
                let lease = s.grant_lease(Duration::from_secs(5)).await?;
                s.txn(Txn::new().then(Op::put_leased(raw_key(format!("/spine/test/{tag}/lease/{i}")), "x", lease)))
                    .await?;
                assert!(s.keep_alive(lease).await?);
                s.revoke_lease(lease).await
            }
            .await;
            record(t, r, "lease");
        }
    }
    (took, errors)
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member_killed_fails_no_request() {
    let mut cluster = EtcdCluster::start(3).await;
    let s = cluster.store().await;
    let (base, errors) = workload(&s, "base", 60).await;
    assert!(errors.is_empty(), "{errors:?}");

    // A follower, then the leader: each killed, the workload run during the
    // outage, the member restarted.
    for role in ["follower", "leader"] {
        let leader = cluster.leader().await.expect("a leader");
        let victim = if role == "leader" { leader } else { (leader + 1) % 3 };
        // A watch made before the loss keeps delivering or ends with an
        // error a follower re-creates from; one made during it works.
        cluster.kill(victim);
        eprintln!("killed {victim} (leader was {leader}); leader now {:?}", cluster.leader().await);
        let (took, errors) = workload(&s, role, 60).await;
        assert!(errors.is_empty(), "{role} down: {errors:?}");
        let mut w = s.watch(&format!("/spine/test/{role}-w/"), 0).await.expect("watch with a member down");
        s.put(&raw_key(format!("/spine/test/{role}-w/k")), b"v".to_vec()).await.unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(5), w.next()).await.expect("watch event").unwrap().unwrap();
        assert_eq!(ev.value, b"v");
        eprintln!(
            "{role} down: {} requests, 0 failed, p99 {:?}, slowest {:?} (normal: p99 {:?}, slowest {:?})",
            took.len(),
            p99(took.clone()),
            took.iter().max().unwrap(),
            p99(base.clone()),
            base.iter().max().unwrap()
        );
        cluster.restart(victim).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_with_a_member_down() {
    let mut cluster = EtcdCluster::start(3).await;
    cluster.kill(0);
    // Each store starts on a random member: enough tries to start on the
    // dead one many times.
    for _ in 0..8 {
        let store = EtcdStore::open(cluster.options()).await.expect("a quorum is enough to start");
        store.put(&raw_key("/spine/test/start"), b"ok".to_vec()).await.unwrap();
        assert_eq!(store.get("/spine/test/start").await.unwrap().unwrap().value, b"ok");
    }
    // No member at all: start-up fails with UNAVAILABLE's kind of error
    // once its connect timeout passes.
    cluster.kill(1);
    cluster.kill(2);
    let mut o = cluster.options();
    o.connect_timeout = Duration::from_millis(800);
    match EtcdStore::open(o).await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("no member up: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_member_is_passed_over_until_it_answers() {
    let cluster = EtcdCluster::start(3).await;
    let mut o = cluster.options();
    o.attempt_timeout = Duration::from_millis(700);
    let store = EtcdStore::open(o).await.unwrap();
    let s: Arc<dyn Store> = Arc::new(store.clone());
    let leader = cluster.leader().await.unwrap();
    // Freeze each follower in turn: whichever the store prefers, one of the
    // two freezes hits it.
    for victim in [(leader + 1) % 3, (leader + 2) % 3] {
        cluster.pause(victim);
        let (took, errors) = workload(&s, &format!("frozen{victim}"), 40).await;
        assert!(errors.is_empty(), "member {victim} frozen: {errors:?}");
        // A frozen member costs at most the one request that found it out
        // (one attempt timeout); the rest go elsewhere without waiting.
        let slow = took.iter().filter(|d| **d >= Duration::from_millis(600)).count();
        assert!(slow <= 1, "{slow} requests waited for the frozen member");
        cluster.resume(victim);
        assert!(
            spine_testing::eventually(Duration::from_secs(10), || async { store.healthy_members() == 3 }).await,
            "the probe finds the member answering again"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_with_client_certificates() {
    let cluster = EtcdCluster::start_tls(1).await;
    let s = cluster.store().await;
    let mut w = s.watch("/spine/test/tls/", 0).await.unwrap();
    s.put(&raw_key("/spine/test/tls/k"), b"v".to_vec()).await.unwrap();
    assert_eq!(s.get("/spine/test/tls/k").await.unwrap().unwrap().value, b"v");
    assert_eq!(w.next().await.unwrap().unwrap().value, b"v");

    // Without a client certificate, etcd turns the node away.
    let mut o = cluster.options();
    o.connect_timeout = Duration::from_millis(800);
    o.tls.as_mut().unwrap().client_cert_pem = None;
    o.tls.as_mut().unwrap().client_key_pem = None;
    assert!(EtcdStore::open(o).await.is_err(), "no client certificate");
    // A CA that did not sign the members' certificates: refused too.
    let other = tempfile::tempdir().unwrap();
    let other = spine_testing::EtcdTlsFiles::generate(other.path());
    let mut o = cluster.options();
    o.connect_timeout = Duration::from_millis(800);
    o.tls.as_mut().unwrap().ca_pem = std::fs::read(&other.ca).unwrap();
    assert!(EtcdStore::open(o).await.is_err(), "unknown CA");
}

// The check a transaction whose answer was lost goes through (EtcdStore::applied).
async fn open(cluster: &EtcdCluster) -> EtcdStore {
    EtcdStore::open(cluster.options()).await.unwrap()
}

/// The check a transaction whose answer was lost goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_is_judged_by_the_store() {
    let cluster = EtcdCluster::start(1).await;
    let s = open(&cluster).await;
    let put = |v: &str| Txn::new().when(Compare::Absent(raw_key("/t/a"))).then(Op::put(raw_key("/t/a"), v.to_string()));

    // Sent, applied, answer lost: judged applied.
    let seen = s.revision().await.unwrap();
    let applied_txn = put("mine");
    let out = s.txn(applied_txn.clone()).await.unwrap();
    assert!(out.succeeded);
    assert_eq!(
        s.applied(&applied_txn, seen).await.unwrap(),
        Some(TxnOutcome { succeeded: true, revision: out.revision })
    );

    // Another writer's value: not ours.
    assert_eq!(s.applied(&put("theirs"), seen).await.unwrap(), None);
    // Our value, but written before we sent: not this attempt's doing.
    let now = s.revision().await.unwrap();
    assert_eq!(s.applied(&applied_txn, now).await.unwrap(), None);
    // Never sent: the key is absent.
    let other = Txn::new().then(Op::put(raw_key("/t/b"), "x"));
    assert_eq!(s.applied(&other, now).await.unwrap(), None);

    // A delete-only transaction is judged by whether its keys are gone.
    let del = Txn::new().then(Op::delete(raw_key("/t/a"))).then(Op::delete_prefix(raw_key("/t/p/")));
    assert_eq!(s.applied(&del, now).await.unwrap(), None, "/t/a is still there");
    s.delete(&raw_key("/t/a")).await.unwrap();
    assert!(s.applied(&del, now).await.unwrap().is_some_and(|o| o.succeeded));
    s.put(&raw_key("/t/p/1"), b"x".to_vec()).await.unwrap();
    assert_eq!(s.applied(&del, now).await.unwrap(), None, "a key under the prefix is left");
    // Nothing to judge by: not taken as applied.
    assert_eq!(s.applied(&Txn::new(), now).await.unwrap(), None);
}
