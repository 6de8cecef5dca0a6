//! Media nodes (SFUs): registration under a lease, and the choice of one
//! for a group call: in the region most of its participants are in, least
//! loaded, never full, never one whose registration lapsed.

use std::collections::HashMap;
use std::time::Duration;

use spine_proto::calls::v1 as pb;
use spine_runtime::auth::records::{self, MediaNodeCredential};
use spine_runtime::idempotency::{IdemError, fingerprint, record, replay};
use spine_runtime::ids::{self, Kind};
use spine_runtime::store::{Compare, Op, SharedLease, StoreError, SystemStore, Txn};

use crate::error::{CallError, invalid};
use crate::model::{MEDIA, MediaRec, MediaRef, json, media_key};

fn cred_key(id: &str) -> String {
    format!("{}{id}", records::MEDIA_CREDS)
}

fn ts(secs: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds: secs, nanos: 0 })
}

fn idem_err(e: IdemError) -> CallError {
    match e {
        IdemError::Reused => {
            crate::error::precondition("IDEMPOTENCY_KEY_REUSED", "request_id was already used for a different request")
        }
        IdemError::Corrupt(d) => CallError::Store(StoreError::Backend(d)),
    }
}

/// Checks a media node id: 1 to 64 characters of `[A-Za-z0-9._-]`.
pub fn node_id(v: &str) -> Result<&str, CallError> {
    if !ids::token_chars(v) {
        return Err(invalid("node_id", "1 to 64 characters of A-Z, a-z, 0-9, '.', '_' and '-'"));
    }
    Ok(v)
}

/// Issues a credential for one media node (the secret is in this answer
/// only; a retry answers without it). `observe` makes it work on this node
/// at once.
pub async fn issue_credential(
    sys: &SystemStore,
    lease: &SharedLease,
    observe: impl Fn(&str, Option<&[u8]>),
    req: &pb::IssueMediaNodeCredentialRequest,
) -> Result<pb::MediaNodeCredential, CallError> {
    ids::request_id(&req.request_id).map_err(|m| invalid("request_id", m))?;
    node_id(&req.node_id)?;
    if req.label.chars().count() > 64 || req.label.chars().any(|c| c.is_control() || ids::is_bidi_control(c)) {
        return Err(invalid("label", "at most 64 characters, no control characters"));
    }
    let fp = fingerprint(req);
    let idem = format!("idem/media/{}", req.request_id);
    if let Some(r) = replay(sys.get(&idem).await?, &fp).map_err(idem_err)? {
        return Ok(r);
    }
    let id = ids::new(Kind::MediaCredential);
    let secret = ids::secret();
    let now = spine_runtime::now_secs();
    let rec = MediaNodeCredential {
        node_id: req.node_id.clone(),
        secret_sha256: records::hash_secret(&secret),
        label: req.label.clone(),
        created_at: now,
    };
    let answer = pb::MediaNodeCredential {
        credential_id: id.clone(),
        node_id: req.node_id.clone(),
        label: req.label.clone(),
        secret: String::new(),
        created_at: ts(now),
    };
    let out = lease
        .txn(|l| {
            Txn::new()
                .when(Compare::Absent(sys.key(&idem)))
                .then(Op::put(sys.key(&cred_key(&id)), json(&rec)))
                .then(record(sys.key(&idem), &fp, &answer, l))
        })
        .await?;
    if !out.succeeded {
        return replay(sys.get(&idem).await?, &fp).map_err(idem_err)?.ok_or(CallError::Contended);
    }
    observe(&cred_key(&id), Some(&json(&rec)));
    tracing::info!("media node credential issued");
    Ok(pb::MediaNodeCredential { secret: format!("{id}.{secret}"), ..answer })
}

/// Every media-node credential, without secrets.
pub async fn credentials(sys: &SystemStore) -> Result<Vec<pb::MediaNodeCredential>, StoreError> {
    let mut out = Vec::new();
    for kv in sys.range_all(records::MEDIA_CREDS).await? {
        if let Ok(r) = serde_json::from_slice::<MediaNodeCredential>(&kv.value) {
            out.push(pb::MediaNodeCredential {
                credential_id: sys.relative(&kv.key).trim_start_matches(records::MEDIA_CREDS).to_string(),
                node_id: r.node_id,
                label: r.label,
                secret: String::new(),
                created_at: ts(r.created_at),
            });
        }
    }
    Ok(out)
}

/// Revokes a media-node credential and removes its node's registration.
pub async fn revoke_credential(
    sys: &SystemStore,
    observe: impl Fn(&str, Option<&[u8]>),
    id: &str,
) -> Result<(), CallError> {
    ids::parse(Kind::MediaCredential, id).ok_or_else(|| invalid("credential_id", "not a media-node credential id"))?;
    let kv = sys.get(&cred_key(id)).await?.ok_or(CallError::Missing("credential"))?;
    let rec: MediaNodeCredential =
        serde_json::from_slice(&kv.value).map_err(|e| CallError::Store(StoreError::Backend(e.to_string())))?;
    sys.txn(
        Txn::new()
            .when(Compare::ModRevision(kv.stored_key(), kv.mod_revision))
            .then(Op::delete(kv.stored_key()))
            .then(Op::delete(sys.key(&media_key(&rec.node_id)))),
    )
    .await?;
    observe(&cred_key(id), None);
    tracing::info!("media node credential revoked");
    Ok(())
}

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
