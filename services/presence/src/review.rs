//! Watchers' views kept true to what decides them, on change: a target's
//! existence, settings, contacts and blocks (and, for reciprocal last-seen,
//! the watcher's own settings). Every presence node follows those records
//! in every tenant's silo and re-checks only the watch pairs a change can
//! touch; nothing is re-read while nothing changes.
//!
//! When the follow starts (the node's start, or again after a lost watch),
//! every pair is re-checked once, which covers whatever changed while
//! nothing was watching. A watch that subscribes while a batch is being
//! reviewed checks its view again (see `Owner::consent_epoch`).

use std::collections::HashSet;
use std::sync::Arc;

use futures::stream::{BoxStream, SelectAll};
use futures::{FutureExt, StreamExt};
use spine_read_models::directory::{self, CONSENT_PREFIXES};
use spine_runtime::ids::TenantId;
use spine_runtime::store::{EventKind, StoreError, WatchEvent};

use crate::Node;
use crate::state::Pairs;
use crate::visibility::{self, AccountKey};

/// Views re-checked at once.
const PARALLEL: usize = 16;
/// Most changes taken into one batch.
const BATCH: usize = 512;

/// A watch's events, with the tenant whose silo it watches (`None`: the
/// control plane's tenant list).
type Tagged = BoxStream<'static, (Option<TenantId>, Result<WatchEvent, StoreError>)>;

/// Follows consent changes until a watch fails (the runtime's follower
/// starts it again).
pub(crate) async fn follow(node: Arc<Node>) -> Result<(), StoreError> {
    let sys = node.rt.system_store();
    let rev = node.rt.store.revision().await?;
    let tenants_prefix = directory::tenant_key("");
    // The tenant a control-plane key of the tenant list names.
    let tenant_of = |key: &str| sys.relative(key).strip_prefix(tenants_prefix.as_str()).and_then(TenantId::parse);
    let mut watches: SelectAll<Tagged> = SelectAll::new();
    let list = node.rt.store.watch(sys.key(&tenants_prefix).as_str(), rev + 1).await?;
    watches.push(tagged(list, None));
    let mut watched = HashSet::new();
    for kv in sys.range_all(&tenants_prefix).await? {
        if let Some(t) = tenant_of(&kv.key) {
            watch_tenant(&node, &t, rev + 1, &mut watches).await?;
            watched.insert(t);
        }
    }
    review(&node, node.owner.watchers()).await?;
    while let Some(first) = watches.next().await {
        let mut changed = HashSet::new();
        let mut next = Some(first);
        while let Some((tenant, event)) = next.take() {
            let event = event?;
            match tenant {
                // A new tenant: its silo is watched from the revision that
                // created it, so nothing written in it is missed.
                None => {
                    if event.kind == EventKind::Put
                        && let Some(t) = tenant_of(&event.key)
                        && !watched.contains(&t)
                    {
                        watch_tenant(&node, &t, event.revision, &mut watches).await?;
                        watched.insert(t);
                    }
                }
                Some(t) => {
                    let rel = sys.tenant(&t).relative(&event.key).to_string();
                    if let Some(c) = directory::consent_change(&rel) {
                        changed.insert(((t.as_str().to_string(), c.account), c.settings));
                    }
                }
            }
            // Whatever else is already there joins this batch.
            if changed.len() < BATCH {
                next = watches.next().now_or_never().flatten();
            }
        }
        if changed.is_empty() {
            continue;
        }
        node.owner.consent_changed();
        let mut pairs = Pairs::new();
        for (account, settings) in &changed {
            pairs.extend(node.owner.pairs_of(account, *settings));
        }
        review(&node, pairs).await?;
    }
    Err(StoreError::Unavailable("consent watch ended".into()))
}

/// A watch's events tagged with what it watches. A watch that ends, even
/// without an error, ends the follow (which then starts again): a merged
/// stream would otherwise just drop it and miss that tenant's changes.
fn tagged(events: spine_runtime::store::WatchStream, tag: Option<TenantId>) -> Tagged {
    let end = tag.clone();
    events
        .map(move |e| (tag.clone(), e))
        .chain(futures::stream::once(
            async move { (end, Err(StoreError::Unavailable("a consent watch ended".into()))) },
        ))
        .boxed()
}

/// Watches the records that decide consent in one tenant's silo.
async fn watch_tenant(
    node: &Node,
    tenant: &TenantId,
    from: i64,
    watches: &mut SelectAll<Tagged>,
) -> Result<(), StoreError> {
    let t = node.rt.system_store().tenant(tenant);
    for prefix in CONSENT_PREFIXES {
        let events = node.rt.store.watch(t.key(prefix).as_str(), from).await?;
        watches.push(tagged(events, Some(tenant.clone())));
    }
    Ok(())
}

/// Re-checks the views of `pairs` and tells the watchers whose view changed.
async fn review(node: &Arc<Node>, pairs: Pairs) -> Result<(), StoreError> {
    let mut checks = futures::stream::iter(pairs)
        .map(|((watcher, target), ids)| async move {
            let view = visibility::view(&node.rt, &node.secrets, &watcher, &target).await?;
            Ok::<_, StoreError>((target, ids, view))
        })
        .buffer_unordered(PARALLEL);
    while let Some(checked) = checks.next().await {
        let (target, ids, view): (AccountKey, Vec<u64>, _) = checked?;
        for id in ids {
            node.owner.set_view(&target, id, view);
        }
    }
    Ok(())
}
