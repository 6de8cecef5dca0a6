//! One conformance suite, two backends: every body runs against the embedded
//! store and against a real etcd server started for the test.

#[allow(clippy::disallowed_methods)] // the store's own tests name raw keys
fn raw_key(s: impl Into<String>) -> spine_runtime::store::Key {
    spine_runtime::store::Key::unchecked(s)
}

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use spine_runtime::store::{Compare, EmbeddedStore, EventKind, MAX_TXN_OPS, Op, Store, StoreError, Txn};
use spine_testing::{EtcdServer, eventually};

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test]
                async fn $name() {
                    let store: std::sync::Arc<dyn spine_runtime::store::Store> =
                        std::sync::Arc::new(spine_runtime::store::EmbeddedStore::in_memory());
                    super::$name(store).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test]
                async fn $name() {
                    let server = spine_testing::EtcdServer::start().await;
                    super::$name(server.store().await).await;
                }
            )*
        }
    };
}

conformance!(
    get_many_answers_each_key_in_order,
    get_put_delete_and_revisions,
    range_pages_in_key_order_within_prefix,
    txn_compares_choose_the_branch,
    txn_limits_are_the_same_everywhere,
    compare_and_swap_has_exactly_one_winner,
    leases_expire_and_take_their_keys,
    keep_alive_and_revoke,
    watch_sees_changes_in_order_and_from_the_past,
    delete_prefix_removes_only_the_prefix,
);

async fn get_put_delete_and_revisions(s: Arc<dyn Store>) {
    assert_eq!(s.get("/t/a").await.unwrap(), None);
    let r1 = s.put(&raw_key("/t/a"), b"1".to_vec()).await.unwrap();
    let kv = s.get("/t/a").await.unwrap().unwrap();
    assert_eq!((kv.value.as_slice(), kv.mod_revision, kv.create_revision, kv.version), (&b"1"[..], r1, r1, 1));
    let r2 = s.put(&raw_key("/t/a"), b"2".to_vec()).await.unwrap();
    assert!(r2 > r1);
    let kv = s.get("/t/a").await.unwrap().unwrap();
    assert_eq!((kv.value.as_slice(), kv.mod_revision, kv.create_revision, kv.version), (&b"2"[..], r2, r1, 2));
    assert_eq!(s.revision().await.unwrap(), r2);
    s.delete(&raw_key("/t/a")).await.unwrap();
    assert_eq!(s.get("/t/a").await.unwrap(), None);
    // Deleting an absent key changes nothing.
    let before = s.revision().await.unwrap();
    s.delete(&raw_key("/t/absent")).await.unwrap();
    assert_eq!(s.revision().await.unwrap(), before);
}

async fn get_many_answers_each_key_in_order(s: Arc<dyn Store>) {
    s.put(&raw_key("/m/a"), b"1".to_vec()).await.unwrap();
    let rev = s.put(&raw_key("/m/b"), b"2".to_vec()).await.unwrap();
    let got = s.get_many(&["/m/b", "/m/absent", "/m/a", "/m/b"]).await.unwrap();
    let values: Vec<Option<&[u8]>> = got.iter().map(|kv| kv.as_ref().map(|kv| kv.value.as_slice())).collect();
    assert_eq!(values, [Some(&b"2"[..]), None, Some(&b"1"[..]), Some(&b"2"[..])]);
    assert_eq!(got[0].as_ref().unwrap().mod_revision, rev);
    assert_eq!(got[2].as_ref().unwrap().key, "/m/a");
    assert!(s.get_many(&[]).await.unwrap().is_empty());
    let many: Vec<String> = (0..=MAX_TXN_OPS).map(|i| format!("/m/{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert!(matches!(s.get_many(&many).await, Err(StoreError::InvalidTxn(_))));
    assert_eq!(s.get_many(&many[..MAX_TXN_OPS]).await.unwrap().len(), MAX_TXN_OPS);
}

async fn range_pages_in_key_order_within_prefix(s: Arc<dyn Store>) {
    for k in ["/p/c", "/p/a", "/p/b", "/pz", "/o"] {
        s.put(&raw_key(k), k.as_bytes().to_vec()).await.unwrap();
    }
    let page = s.range("/p/", None, 2).await.unwrap();
    let keys: Vec<_> = page.kvs.iter().map(|k| k.key.as_str()).collect();
    assert_eq!(keys, ["/p/a", "/p/b"]);
    assert!(page.more);
    let page = s.range("/p/", Some("/p/b"), 2).await.unwrap();
    let keys: Vec<_> = page.kvs.iter().map(|k| k.key.as_str()).collect();
    assert_eq!(keys, ["/p/c"]);
    assert!(!page.more);
    let all: Vec<_> = s.range_all("/p").await.unwrap().into_iter().map(|k| k.key).collect();
    assert_eq!(all, ["/p/a", "/p/b", "/p/c", "/pz"]);
    assert_eq!(s.count("/p/").await.unwrap(), 3);
    assert_eq!(s.count("/nothing/").await.unwrap(), 0);
    assert!(s.range("/nothing/", None, 0).await.unwrap().kvs.is_empty());
}

async fn txn_compares_choose_the_branch(s: Arc<dyn Store>) {
    let ok = s
        .txn(
            Txn::new()
                .when(Compare::Absent(raw_key("/x")))
                .then(Op::put(raw_key("/x"), "1"))
                .otherwise(Op::put(raw_key("/lost"), "1")),
        )
        .await
        .unwrap();
    assert!(ok.succeeded);
    let again = s
        .txn(
            Txn::new()
                .when(Compare::Absent(raw_key("/x")))
                .then(Op::put(raw_key("/x"), "2"))
                .otherwise(Op::put(raw_key("/lost"), "1")),
        )
        .await
        .unwrap();
    assert!(!again.succeeded);
    assert_eq!(s.get("/x").await.unwrap().unwrap().value, b"1");
    assert!(s.get("/lost").await.unwrap().is_some());
    let rev = s.get("/x").await.unwrap().unwrap().mod_revision;
    assert!(
        s.txn(Txn::new().when(Compare::ModRevision(raw_key("/x"), rev)).then(Op::put(raw_key("/x"), "3")))
            .await
            .unwrap()
            .succeeded
    );
    assert!(
        !s.txn(Txn::new().when(Compare::ModRevision(raw_key("/x"), rev)).then(Op::put(raw_key("/x"), "4")))
            .await
            .unwrap()
            .succeeded
    );
    assert!(
        s.txn(Txn::new().when(Compare::Present(raw_key("/x"))).then(Op::delete(raw_key("/x"))))
            .await
            .unwrap()
            .succeeded
    );
    assert!(
        s.txn(Txn::new().when(Compare::ModRevision(raw_key("/x"), 0)).then(Op::put(raw_key("/x"), "5")))
            .await
            .unwrap()
            .succeeded
    );
}

async fn txn_limits_are_the_same_everywhere(s: Arc<dyn Store>) {
    let too_many = Txn::new().then_all((0..=MAX_TXN_OPS).map(|i| Op::put(raw_key(format!("/m/{i}")), "v")));
    assert!(matches!(s.txn(too_many).await, Err(StoreError::InvalidTxn(_))));
    let twice = Txn::new().then(Op::put(raw_key("/d"), "1")).then(Op::put(raw_key("/d"), "2"));
    assert!(matches!(s.txn(twice).await, Err(StoreError::InvalidTxn(_))));
    let big = Txn::new().then(Op::put(raw_key("/big"), vec![0u8; spine_runtime::store::MAX_VALUE_BYTES + 1]));
    assert!(matches!(s.txn(big).await, Err(StoreError::TooLarge)));
    // Nothing of the refused transactions was written.
    assert!(s.range_all("/m/").await.unwrap().is_empty());
    assert!(s.get("/d").await.unwrap().is_none());
    assert!(s.get("/big").await.unwrap().is_none());
    let exact = Txn::new().then_all((0..MAX_TXN_OPS).map(|i| Op::put(raw_key(format!("/m/{i:03}")), "v")));
    assert!(s.txn(exact).await.unwrap().succeeded);
    assert_eq!(s.range_all("/m/").await.unwrap().len(), MAX_TXN_OPS);
}

async fn compare_and_swap_has_exactly_one_winner(s: Arc<dyn Store>) {
    s.put(&raw_key("/cas"), b"0".to_vec()).await.unwrap();
    for round in 0..10 {
        let rev = s.get("/cas").await.unwrap().unwrap().mod_revision;
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    s.txn(
                        Txn::new()
                            .when(Compare::ModRevision(raw_key("/cas"), rev))
                            .then(Op::put(raw_key("/cas"), format!("{round}:{i}"))),
                    )
                    .await
                    .unwrap()
                    .succeeded
                })
            })
            .collect();
        let mut winners = 0;
        for t in tasks {
            winners += t.await.unwrap() as usize;
        }
        assert_eq!(winners, 1, "round {round}");
    }
}

async fn leases_expire_and_take_their_keys(s: Arc<dyn Store>) {
    let lease = s.grant_lease(Duration::from_secs(1)).await.unwrap();
    s.txn(Txn::new().then(Op::put_leased(raw_key("/l/a"), "1", lease)).then(Op::put(raw_key("/l/b"), "1")))
        .await
        .unwrap();
    assert!(s.get("/l/a").await.unwrap().unwrap().lease == lease);
    let gone = eventually(Duration::from_secs(10), || {
        let s = s.clone();
        async move { s.get("/l/a").await.unwrap().is_none() }
    })
    .await;
    assert!(gone, "leased key outlived its lease");
    assert!(s.get("/l/b").await.unwrap().is_some(), "unleased key must stay");
    assert!(!s.keep_alive(lease).await.unwrap());
    // A put on an unknown lease fails and writes nothing.
    assert!(s.txn(Txn::new().then(Op::put_leased(raw_key("/l/c"), "1", lease))).await.is_err());
    assert!(s.get("/l/c").await.unwrap().is_none());
}

async fn keep_alive_and_revoke(s: Arc<dyn Store>) {
    let lease = s.grant_lease(Duration::from_secs(2)).await.unwrap();
    s.txn(Txn::new().then(Op::put_leased(raw_key("/k/a"), "1", lease))).await.unwrap();
    assert!(s.keep_alive(lease).await.unwrap());
    s.revoke_lease(lease).await.unwrap();
    assert!(s.get("/k/a").await.unwrap().is_none());
    assert!(!s.keep_alive(lease).await.unwrap());
    s.revoke_lease(lease).await.unwrap();
}

async fn watch_sees_changes_in_order_and_from_the_past(s: Arc<dyn Store>) {
    let r1 = s.put(&raw_key("/w/a"), b"1".to_vec()).await.unwrap();
    s.put(&raw_key("/other"), b"x".to_vec()).await.unwrap();
    let mut live = s.watch("/w/", 0).await.unwrap();
    let mut past = s.watch("/w/", r1).await.unwrap();
    s.put(&raw_key("/w/b"), b"2".to_vec()).await.unwrap();
    s.delete(&raw_key("/w/a")).await.unwrap();
    let e = next(&mut past).await;
    assert_eq!((e.kind, e.key.as_str(), e.value.as_slice(), e.revision), (EventKind::Put, "/w/a", &b"1"[..], r1));
    for w in [&mut past, &mut live] {
        let e = next(w).await;
        assert_eq!((e.kind, e.key.as_str(), e.value.as_slice()), (EventKind::Put, "/w/b", &b"2"[..]));
        let e = next(w).await;
        assert_eq!((e.kind, e.key.as_str()), (EventKind::Delete, "/w/a"));
    }
}

async fn next(w: &mut spine_runtime::store::WatchStream) -> spine_runtime::store::WatchEvent {
    tokio::time::timeout(Duration::from_secs(10), w.next()).await.expect("watch event").unwrap().unwrap()
}

async fn delete_prefix_removes_only_the_prefix(s: Arc<dyn Store>) {
    for k in ["/dp/a/1", "/dp/a/2", "/dp/ab", "/dp/b/1"] {
        s.put(&raw_key(k), b"v".to_vec()).await.unwrap();
    }
    s.txn(Txn::new().then(Op::delete_prefix(raw_key("/dp/a/")))).await.unwrap();
    let left: Vec<_> = s.range_all("/dp/").await.unwrap().into_iter().map(|k| k.key).collect();
    assert_eq!(left, ["/dp/ab", "/dp/b/1"]);
}

/// The embedded store's log survives a restart; leased keys do not.
#[tokio::test]
async fn embedded_store_persists_unleased_keys() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = EmbeddedStore::open(dir.path()).unwrap();
        s.put(&raw_key("/keep"), b"1".to_vec()).await.unwrap();
        s.put(&raw_key("/gone"), b"1".to_vec()).await.unwrap();
        s.delete(&raw_key("/gone")).await.unwrap();
        let lease = s.grant_lease(Duration::from_secs(60)).await.unwrap();
        s.txn(Txn::new().then(Op::put_leased(raw_key("/soft"), "1", lease))).await.unwrap();
        s.put(&raw_key("/keep"), b"2".to_vec()).await.unwrap();
    }
    let s = EmbeddedStore::open(dir.path()).unwrap();
    let kv = s.get("/keep").await.unwrap().unwrap();
    assert_eq!(kv.value, b"2");
    assert!(s.get("/gone").await.unwrap().is_none());
    assert!(s.get("/soft").await.unwrap().is_none());
    let rev = s.revision().await.unwrap();
    assert!(rev >= kv.mod_revision);
    // Revisions keep increasing across restarts.
    assert!(s.put(&raw_key("/new"), b"1".to_vec()).await.unwrap() > rev);
}

/// A watcher that starts before the oldest kept revision is told so.
#[tokio::test]
async fn etcd_watch_from_compacted_revision_is_an_error() {
    let server = EtcdServer::start().await;
    let s = server.store().await;
    let r1 = s.put(&raw_key("/c/a"), b"1".to_vec()).await.unwrap();
    s.put(&raw_key("/c/a"), b"2".to_vec()).await.unwrap();
    let mut c = etcd_client::Client::connect([server.endpoint()], None).await.unwrap();
    c.compact(r1 + 1, None).await.unwrap();
    // Either at once or as the stream's first item, as the trait documents.
    let err = match s.watch("/c/", r1).await {
        Ok(mut w) => w.next().await.expect("an item").expect_err("compacted start must fail"),
        Err(e) => e,
    };
    assert!(matches!(err, StoreError::Compacted { .. }), "{err:?}");
}

/// The silo in the types, from an attacker's side: a tenant handle's
/// transaction refuses every key another handle made (another tenant's,
/// the control plane's, a shared space's), in writes and in compares, and
/// nothing is written.
#[tokio::test]
async fn a_tenant_transaction_refuses_keys_of_other_silos() {
    use spine_runtime::ids::{self, Kind, TenantId};
    use spine_runtime::store::{EmbeddedStore, SharedSpace, SystemStore};
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory());
    let sys = SystemStore::new(store.clone());
    let a = sys.tenant(&TenantId::parse(&ids::new(Kind::Tenant)).unwrap());
    let b = sys.tenant(&TenantId::parse(&ids::new(Kind::Tenant)).unwrap());
    let shared = SharedSpace::new(store.clone(), "g");
    for foreign in [b.key("accounts/x"), sys.key("tenants/x"), shared.key("x/s/meta")] {
        let write = Txn::new().then(Op::put(a.key("mine"), "1")).then(Op::put(foreign.clone(), "stolen"));
        assert!(matches!(a.txn(write).await, Err(StoreError::InvalidTxn(_))), "write to {foreign}");
        let delete = Txn::new().then(Op::delete_prefix(foreign.clone()));
        assert!(matches!(a.txn(delete).await, Err(StoreError::InvalidTxn(_))), "delete of {foreign}");
        let peek = Txn::new().when(Compare::Present(foreign.clone())).then(Op::put(a.key("mine"), "1"));
        assert!(matches!(a.txn(peek).await, Err(StoreError::InvalidTxn(_))), "compare on {foreign}");
        let guarded = Txn::new().then(Op::put(a.key("mine"), "1")).otherwise(Op::delete(foreign.clone()));
        assert!(matches!(a.txn(guarded).await, Err(StoreError::InvalidTxn(_))), "failure branch on {foreign}");
    }
    assert!(store.range_all("/spine/").await.unwrap().is_empty(), "nothing was written");
    // Its own keys go through; a record read back keeps its key.
    assert!(a.txn(Txn::new().then(Op::put(a.key("mine"), "1"))).await.unwrap().succeeded);
    let kv = a.get("mine").await.unwrap().unwrap();
    assert_eq!(a.key_of(&kv).unwrap(), a.key("mine"));
    assert!(b.key_of(&kv).is_err(), "another tenant's handle does not take it");
    // Shared spaces cannot be named after a silo.
    for silo in ["t", "sys"] {
        let s = store.clone();
        assert!(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| SharedSpace::new(s, silo))).is_err());
    }
}
