//! Media nodes (SFUs): registration under a lease, and the choice of one
//! for a group call: in the region most of its participants are in, least
//! loaded, never full, never one whose registration lapsed.

use std::collections::HashMap;
use std::time::Duration;

use spine_runtime::store::{Op, StoreError, SystemStore, Txn};

use crate::model::{MEDIA, MediaRec, MediaRef, json, media_key};

/// Registers (or refreshes) a node for `ttl`. Each refresh takes a new
/// lease; the previous one expires with nothing attached.
pub async fn register(sys: &SystemStore, id: &str, rec: &MediaRec, ttl: Duration) -> Result<(), StoreError> {
    let lease = sys.store().grant_lease(ttl).await?;
    sys.txn(Txn::new().then(Op::put_leased(sys.key(&media_key(id)), json(rec), lease))).await?;
    Ok(())
}

pub async fn deregister(sys: &SystemStore, id: &str) -> Result<(), StoreError> {
    sys.txn(Txn::new().then(Op::delete(sys.key(&media_key(id))))).await?;
    Ok(())
}

/// The live registrations (expired ones are gone with their lease).
pub async fn list(sys: &SystemStore) -> Result<Vec<(String, MediaRec)>, StoreError> {
    let mut out = Vec::new();
    for kv in sys.range_all(MEDIA).await? {
        if let Ok(r) = serde_json::from_slice::<MediaRec>(&kv.value) {
            out.push((sys.relative(&kv.key).trim_start_matches(MEDIA).to_string(), r));
        }
    }
    Ok(out)
}

/// The region named most often (ties: the first in name order).
pub fn majority_region<'a>(regions: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for r in regions {
        *counts.entry(r).or_default() += 1;
    }
    let mut v: Vec<_> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    v.first().map(|(r, _)| r.to_string())
}

/// The node for a call whose participants are mostly in `region`: the
/// least loaded (by load over capacity) with room there, else the least
/// loaded with room anywhere.
pub fn choose(nodes: &[(String, MediaRec)], region: Option<&str>) -> Option<MediaRef> {
    let room = |r: &MediaRec| r.capacity > 0 && r.load < r.capacity;
    let ratio = |r: &MediaRec| f64::from(r.load) / f64::from(r.capacity.max(1));
    let best = |in_region: bool| {
        nodes
            .iter()
            .filter(|(_, r)| room(r) && (!in_region || Some(r.region.as_str()) == region))
            .min_by(|a, b| ratio(&a.1).total_cmp(&ratio(&b.1)).then(a.0.cmp(&b.0)))
    };
    best(true).or_else(|| best(false)).map(|(id, r)| MediaRef {
        id: id.clone(),
        address: r.address.clone(),
        region: r.region.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(region: &str, capacity: u32, load: u32) -> MediaRec {
        MediaRec { address: format!("{region}:{load}"), region: region.into(), capacity, load, updated_at: 0 }
    }

    #[test]
    fn region_first_then_least_loaded_never_full() {
        let nodes = vec![
            ("eu-1".to_string(), node("eu", 100, 90)),
            ("eu-2".to_string(), node("eu", 100, 30)),
            ("eu-3".to_string(), node("eu", 10, 10)), // full
            ("us-1".to_string(), node("us", 100, 0)),
        ];
        assert_eq!(choose(&nodes, Some("eu")).unwrap().id, "eu-2");
        assert_eq!(choose(&nodes, Some("us")).unwrap().id, "us-1");
        // No node in the region: the least loaded elsewhere.
        assert_eq!(choose(&nodes, Some("ap")).unwrap().id, "us-1");
        let full = vec![("eu-3".to_string(), node("eu", 10, 10))];
        assert!(choose(&full, Some("eu")).is_none());
        assert_eq!(majority_region(["eu", "us", "eu"]).as_deref(), Some("eu"));
    }
}
