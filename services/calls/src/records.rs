//! Call records: by default none. A tenant that sets a record policy gets,
//! for each call its accounts took part in, a record holding only the
//! fields the policy names, kept for as long as it says. Participants are
//! keyed hashes of account ids (the key never leaves the store), never ids,
//! devices or addresses.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use spine_proto::calls::v1::{self as pb, RecordField};
use spine_runtime::Runtime;
use spine_runtime::ids::TenantId;
use spine_runtime::store::{Op, StoreError, TenantStore, Txn};

use crate::model::{
    CallRec, End, Kind, POLICY, RECORD_INDEX, RECORDS, SALT, json, new_id, record_index_key, record_key,
};

pub const MIN_RETENTION: i64 = 60;
pub const MAX_RETENTION: i64 = 400 * 86_400;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub fields: Vec<i32>,
    pub retention_seconds: i64,
}

impl Policy {
    fn has(&self, f: RecordField) -> bool {
        self.fields.contains(&(f as i32))
    }
}

/// A kept record: each field only if the policy named it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<(Kind, bool)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<(End, bool)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub participants: Vec<String>,
    pub expires_at: i64,
}

pub async fn policy(t: &TenantStore) -> Result<Policy, StoreError> {
    Ok(t.get(POLICY).await?.and_then(|kv| serde_json::from_slice(&kv.value).ok()).unwrap_or_default())
}

/// Sets the policy, creating the tenant's hashing key on first use (one
/// transaction: a policy is never without its key).
pub async fn set_policy(t: &TenantStore, p: &Policy) -> Result<(), StoreError> {
    use spine_runtime::store::Compare;
    let salt: [u8; 32] = rand::random();
    let txn = Txn::new()
        .when(Compare::Absent(t.key(SALT)))
        .then(Op::put(t.key(SALT), hex::encode(salt)))
        .then(Op::put(t.key(POLICY), json(p)))
        .otherwise(Op::put(t.key(POLICY), json(p)));
    t.txn(txn).await?;
    Ok(())
}

/// The keyed hash naming `account` in the tenant's records, if the tenant
/// has a hashing key.
pub async fn participant_hash(t: &TenantStore, account: &str) -> Result<Option<String>, StoreError> {
    let Some(kv) = t.get(SALT).await? else { return Ok(None) };
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&kv.value).expect("any key length");
    mac.update(account.as_bytes());
    Ok(Some(hex::encode(&mac.finalize().into_bytes()[..16])))
}

/// Keeps a record of an ended call in each tenant whose policy asks.
/// Failures are logged: a record not kept errs on the side of privacy.
pub async fn keep(rt: &Runtime, rec: &CallRec) {
    let sys = rt.system_store();
    let mut tenants: Vec<&str> = rec.parties.iter().map(|p| p.who.tenant.as_str()).collect();
    tenants.sort();
    tenants.dedup();
    for tenant in tenants {
        let Some(tid) = TenantId::parse(tenant) else { continue };
        let t = sys.tenant(&tid);
        if let Err(e) = keep_in(&t, rec).await {
            tracing::warn!(error = %e, "call record not kept");
        }
    }
}

/// When a record of a call that ended at `ended` (Unix seconds) expires.
/// The expiry sits in the record's key and value, so when the policy keeps
/// no time field it must not date the call precisely: it is rounded up to a
/// multiple of the retention (at most a day), and says only to within that
/// when the call ended. Such records are kept up to that much longer.
pub fn expiry(p: &Policy, ended: i64) -> i64 {
    let exact = ended + p.retention_seconds;
    if p.has(RecordField::StartTime) || p.has(RecordField::Duration) {
        return exact;
    }
    let grain = p.retention_seconds.clamp(1, 86_400);
    exact.div_euclid(grain) * grain + grain
}

async fn keep_in(t: &TenantStore, rec: &CallRec) -> Result<(), StoreError> {
    let p = policy(t).await?;
    if p.fields.is_empty() {
        return Ok(());
    }
    let ended = rec.ended_ms.unwrap_or(rec.started_ms);
    let expires_at = expiry(&p, ended / 1000);
    let answered = rec.answered_ms.is_some();
    let mut s = Stored { id: new_id("cr_"), expires_at, ..Default::default() };
    if p.has(RecordField::StartTime) {
        s.started_at = Some(rec.started_ms / 1000);
    }
    if p.has(RecordField::Duration) {
        s.duration_s = Some(rec.answered_ms.map_or(0, |a| ((ended - a).max(0) / 1000) as u64));
    }
    if p.has(RecordField::Kind) {
        s.kind = Some((rec.kind, rec.video));
    }
    if p.has(RecordField::Outcome) {
        s.outcome = rec.end.map(|e| (e, answered));
    }
    let mut ops = Vec::new();
    if p.has(RecordField::Participants) {
        let mut accounts: Vec<&str> = rec
            .parties
            .iter()
            .filter(|x| x.who.tenant == t.tenant().as_str())
            .map(|x| x.who.account.as_str())
            .collect();
        accounts.sort();
        accounts.dedup();
        for a in accounts.into_iter().take(spine_runtime::store::MAX_TXN_OPS - 1) {
            if let Some(h) = participant_hash(t, a).await? {
                ops.push(Op::put(t.key(&record_index_key(&h, &s.id)), record_key(expires_at, &s.id)));
                s.participants.push(h);
            }
        }
    }
    ops.push(Op::put(t.key(&record_key(expires_at, &s.id)), json(&s)));
    t.txn(Txn::new().then_all(ops)).await?;
    Ok(())
}

fn delete_ops(t: &TenantStore, key: &str, s: &Stored) -> Vec<Op> {
    let mut ops = vec![Op::delete(t.key(t.relative(key)))];
    ops.extend(s.participants.iter().map(|h| Op::delete(t.key(&record_index_key(h, &s.id)))));
    ops
}

/// Deletes the tenant's records past their expiry.
pub async fn expire(t: &TenantStore, now: i64) -> Result<usize, StoreError> {
    let mut n = 0;
    for kv in t.range_all(RECORDS).await? {
        let Ok(s) = serde_json::from_slice::<Stored>(&kv.value) else { continue };
        if s.expires_at > now {
            break; // keys are in expiry order
        }
        t.txn(Txn::new().then_all(delete_ops(t, &kv.key, &s))).await?;
        n += 1;
    }
    Ok(n)
}

/// The records an account took part in: (store key, record).
pub async fn of_account(t: &TenantStore, account: &str) -> Result<Vec<(String, Stored)>, StoreError> {
    let Some(h) = participant_hash(t, account).await? else { return Ok(vec![]) };
    let mut out = Vec::new();
    for kv in t.range_all(&format!("{RECORD_INDEX}{h}/")).await? {
        let rel = String::from_utf8_lossy(&kv.value).into_owned();
        if let Some(r) = t.get(&rel).await?
            && let Ok(s) = serde_json::from_slice::<Stored>(&r.value)
        {
            out.push((r.key, s));
        }
    }
    Ok(out)
}

/// Deletes every record an account took part in.
pub async fn delete_account(t: &TenantStore, account: &str) -> Result<(), StoreError> {
    for (key, s) in of_account(t, account).await? {
        t.txn(Txn::new().then_all(delete_ops(t, &key, &s))).await?;
    }
    Ok(())
}

pub fn to_pb(s: &Stored) -> pb::CallRecord {
    let ts = |secs: i64| prost_types::Timestamp { seconds: secs, nanos: 0 };
    pb::CallRecord {
        record_id: s.id.clone(),
        started_at: s.started_at.map(ts),
        duration_seconds: s.duration_s.unwrap_or(0),
        kind: match s.kind.map(|k| k.0) {
            Some(Kind::Direct) => pb::CallKind::Direct,
            Some(Kind::Group) => pb::CallKind::Group,
            None => pb::CallKind::Unspecified,
        } as i32,
        video: s.kind.is_some_and(|k| k.1),
        outcome: s.outcome.map_or(pb::EndReason::Unspecified, |o| crate::view::end_reason(o.0)) as i32,
        answered: s.outcome.is_some_and(|o| o.1),
        participants: s.participants.clone(),
        expires_at: Some(ts(s.expires_at)),
    }
}

/// One line per record for the data report.
pub fn describe(s: &Stored) -> String {
    format!(
        "record started_at={:?} duration_s={:?} kind={:?} outcome={:?} participants={} expires_at={}",
        s.started_at,
        s.duration_s,
        s.kind,
        s.outcome,
        s.participants.len(),
        s.expires_at
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expiry_without_time_fields_does_not_date_the_call() {
        let outcome = Policy { fields: vec![RecordField::Outcome as i32], retention_seconds: 7 * 86_400 };
        // Two calls ending the same (UTC) day.
        let a = expiry(&outcome, 1_700_006_401);
        let b = expiry(&outcome, 1_700_050_000);
        assert_eq!(a, b, "calls of the same day expire at the same time");
        assert!(a > 1_700_050_000 + 7 * 86_400 && a <= 1_700_006_401 + 8 * 86_400);
        let short = Policy { fields: vec![RecordField::Kind as i32], retention_seconds: 60 };
        let e = expiry(&short, 1_700_000_001);
        assert!(e % 60 == 0 && e > 1_700_000_061 && e <= 1_700_000_121);
        let timed = Policy { fields: vec![RecordField::StartTime as i32], retention_seconds: 60 };
        assert_eq!(expiry(&timed, 1_700_000_001), 1_700_000_061);
    }
}
