//! IN_CALL from the calls service: it keeps a marker in the store
//! (`spine_read_models::in_call::in_call_key`) for each account in an
//! answered call, under the call's lease. Every presence node follows them
//! and tells its owner state; the owner shows IN_CALL to the watchers the
//! account's settings allow, like any status.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::StreamExt;
use spine_read_models::in_call::{IN_CALL_PREFIX, parse_in_call_key};
use spine_runtime::Runtime;
use spine_runtime::store::{EventKind, StoreError};

use crate::state::Owner;

/// Reads the markers into `owner`, then follows them until the watch
/// fails (the runtime's follower starts it again).
pub async fn follow(rt: Arc<Runtime>, owner: Arc<Owner>) -> Result<(), StoreError> {
    let sys = rt.system_store();
    let rev = rt.store.revision().await?;
    // (tenant, account) -> the calls it is in.
    let mut calls: HashMap<(String, String), HashSet<String>> = HashMap::new();
    for kv in sys.range_all(IN_CALL_PREFIX).await? {
        if let Some((t, a, c)) = parse_in_call_key(sys.relative(&kv.key)) {
            calls.entry((t, a)).or_default().insert(c);
        }
    }
    let mut events = rt.store.watch(&sys.key(IN_CALL_PREFIX), rev + 1).await?;
    owner.replace_in_call(&calls.keys().cloned().collect());
    while let Some(ev) = events.next().await {
        let ev = ev?;
        let Some((t, a, c)) = parse_in_call_key(sys.relative(&ev.key)) else { continue };
        let key = (t, a);
        let set = calls.entry(key.clone()).or_default();
        match ev.kind {
            EventKind::Put => set.insert(c),
            EventKind::Delete => set.remove(&c),
        };
        let in_call = !set.is_empty();
        if !in_call {
            calls.remove(&key);
        }
        owner.set_in_call(&key, in_call);
    }
    Err(StoreError::Unavailable("in-call watch ended".into()))
}
