//! Fan-out from a group's log to its members' mailboxes, and the mailbox
//! itself: a streaming receive that resumes from a sequence number, and
//! acknowledgement.
//!
//! Each log entry reaches each recipient exactly once and in log order: a
//! delivery is a transaction on the recipient's mailbox head and its
//! per-group cursor, so concurrent fan-outs of the same group (the node that
//! accepted the commit, another node's upkeep) can only both succeed for
//! different entries.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use spine_proto::groups::v1 as pb;
use spine_read_models::directory;
use spine_runtime::Runtime;
use spine_runtime::ids::TenantId;
use spine_runtime::store::{Compare, EventKind, Op, SharedLease, SharedSpace, TenantStore, Txn};
use tokio::sync::mpsc;
use tonic::Status;

use crate::error::{GroupsError, Result};
use crate::model::{self, Counter, Device, LogEntry, MailboxHead, MailboxRec, json, parse, unb64};

/// Most entries one Ack deletes per transaction.
const ACK_BATCH: usize = 100;

fn counter(kv: Option<&spine_runtime::store::KeyValue>) -> (u64, i64) {
    kv.map_or((0, 0), |kv| (serde_json::from_slice::<Counter>(&kv.value).map_or(0, |c| c.n), kv.mod_revision))
}

/// A device's mailbox quota.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Quota {
    pub entries: u64,
    pub bytes: u64,
}

fn head_of(kv: Option<&spine_runtime::store::KeyValue>) -> (MailboxHead, i64) {
    kv.map_or((MailboxHead::default(), 0), |kv| {
        (serde_json::from_slice::<MailboxHead>(&kv.value).unwrap_or_default(), kv.mod_revision)
    })
}

/// What a device's mailbox really holds: entries and stored bytes (entries
/// that expired with their lease are gone from it, not from the head's
/// counts, which this corrects).
async fn measure(t: &TenantStore, d: &Device) -> Result<(u64, u64)> {
    let kvs = t.range_all(&model::mbox_prefix(&d.account, &d.device)).await?;
    Ok((kvs.len() as u64, kvs.iter().map(|kv| kv.value.len() as u64).sum()))
}

/// Delivers one log entry to one device, unless it already has it. An
/// application message that would take the mailbox over its quota is
/// dropped for this device instead, and counted in a dropped-messages
/// marker (the last entry, if it is one for this group, else a new one);
/// handshakes are always delivered.
async fn deliver(
    t: &TenantStore,
    lease: &SharedLease,
    quota: Quota,
    g: &str,
    gseq: u64,
    e: &LogEntry,
    d: &Device,
) -> Result<()> {
    let head_key = model::mbox_head_key(&d.account, &d.device);
    let grp_key = model::mbox_grp_key(&d.account, &d.device, g);
    for _ in 0..16 {
        let head_kv = t.get(&head_key).await?;
        let grp = t.get(&grp_key).await?;
        let (mut head, head_rev) = head_of(head_kv.as_ref());
        let (delivered, grp_rev) = counter(grp.as_ref());
        if delivered >= gseq {
            return Ok(());
        }
        let rec =
            MailboxRec { group: g.to_string(), kind: e.kind, message: e.message.clone(), epoch: e.epoch, dropped: 0 };
        let value = json(&rec);
        let over = |h: &MailboxHead| h.entries >= quota.entries || h.bytes + value.len() as u64 > quota.bytes;
        let application = e.kind == pb::EntryKind::Application as i32;
        if application && over(&head) {
            // Counts drift up as entries expire: measure before refusing.
            (head.entries, head.bytes) = measure(t, d).await?;
        }
        let drop = application && over(&head);
        let next = head.n.max(1);
        let mut txn = Txn::new()
            .when(Compare::ModRevision(t.key(&head_key), head_rev))
            .when(Compare::ModRevision(t.key(&grp_key), grp_rev))
            .then(Op::put(t.key(&grp_key), json(&Counter { n: gseq })));
        let mut put: Option<(u64, Vec<u8>)> = None;
        if drop {
            // Add to the last entry if it is this group's marker.
            let last = t.get(&model::mbox_key(&d.account, &d.device, next - 1)).await?;
            let marker = last.as_ref().and_then(|kv| {
                serde_json::from_slice::<MailboxRec>(&kv.value)
                    .ok()
                    .filter(|r| r.kind == pb::EntryKind::Dropped as i32 && r.group == g)
                    .map(|r| (kv.clone(), r))
            });
            match marker {
                Some((kv, mut r)) => {
                    r.dropped += 1;
                    txn = txn.when(Compare::ModRevision(kv.stored_key(), kv.mod_revision));
                    put = Some((next - 1, json(&r)));
                }
                None => {
                    let r = MailboxRec {
                        group: g.to_string(),
                        kind: pb::EntryKind::Dropped as i32,
                        message: String::new(),
                        epoch: e.epoch,
                        dropped: 1,
                    };
                    let v = json(&r);
                    head.entries += 1;
                    head.bytes += v.len() as u64;
                    head.n = next + 1;
                    put = Some((next, v));
                }
            }
            crate::metrics::dropped();
        } else {
            head.entries += 1;
            head.bytes += value.len() as u64;
            head.n = next + 1;
            put = put.or(Some((next, value)));
        }
        txn = txn.then(Op::put(t.key(&head_key), json(&head)));
        let (seq, v) = put.expect("an entry to write");
        let out = lease
            .txn(|l| {
                txn.clone().then(Op::put_leased(t.key(&model::mbox_key(&d.account, &d.device, seq)), v.clone(), l))
            })
            .await?;
        if out.succeeded {
            return Ok(());
        }
    }
    Err(GroupsError::Conflict)
}

/// Delivers every log entry of a group past its fan-out cursor.
pub(crate) async fn fanout(
    rt: &Arc<Runtime>,
    groups: &SharedSpace,
    lease: &SharedLease,
    quota: Quota,
    g: &str,
) -> Result<()> {
    let sys = rt.system_store();
    let cursor_kv = groups.get(&model::fanout_key(g)).await?;
    let (done, mut cursor_rev) = counter(cursor_kv.as_ref());
    let after = (done > 0).then(|| model::log_key(g, done));
    let entries = groups.range(&model::log_prefix(g), after.as_deref(), 0).await?.kvs;
    for kv in entries {
        let gseq: u64 = kv.key.rsplit('/').next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let e: LogEntry = parse(&kv)?;
        let started = Instant::now();
        for d in &e.recipients {
            let Some(tenant) = TenantId::parse(&d.tenant) else { continue };
            let t = sys.tenant(&tenant);
            // A device deleted meanwhile gets nothing: delivering would
            // recreate data its account's deletion just removed.
            if directory::device(&t, &d.account, &d.device).await?.is_none() {
                continue;
            }
            deliver(&t, lease, quota, g, gseq, &e, d).await?;
            if e.at_ms > 0 {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                crate::metrics::metrics().fanout_lag.record((now - e.at_ms).max(0) as f64 / 1000.0, &[]);
            }
            if e.joins {
                t.txn(Txn::new().then(Op::put(t.key(&model::gm_key(&d.account, &d.device, g)), b"{}".to_vec())))
                    .await?;
            }
        }
        for d in &e.removed {
            if e.kind != pb::EntryKind::Commit as i32 && e.kind != pb::EntryKind::EpochVoided as i32 {
                continue;
            }
            let Some(tenant) = TenantId::parse(&d.tenant) else { continue };
            let t = sys.tenant(&tenant);
            t.txn(Txn::new().then(Op::delete(t.key(&model::gm_key(&d.account, &d.device, g))))).await?;
        }
        tracing::debug!(
            recipients = e.recipients.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "fanned out"
        );
        // Advance the cursor and drop the delivered entry (the log holds
        // only what is still to be delivered); if another node advanced the
        // cursor meanwhile, its value is at least ours (both deliver in
        // order).
        let out = groups
            .txn(
                Txn::new()
                    .when(Compare::ModRevision(groups.key(&model::fanout_key(g)), cursor_rev))
                    .then(Op::put(groups.key(&model::fanout_key(g)), json(&Counter { n: gseq })))
                    .then(Op::delete(kv.stored_key())),
            )
            .await?;
        if !out.succeeded {
            return Ok(());
        }
        cursor_rev = out.revision;
    }
    Ok(())
}

fn entry_of(seq: u64, rec: &MailboxRec) -> Result<pb::MailboxEntry> {
    Ok(pb::MailboxEntry {
        seq,
        group_id: hex::decode(&rec.group).map_err(|e| GroupsError::Internal(e.to_string()))?,
        kind: rec.kind,
        message: unb64(&rec.message)?,
        epoch: rec.epoch,
        dropped: rec.dropped,
    })
}

fn seq_of(key: &str) -> u64 {
    key.rsplit('/').next().and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Streams a device's mailbox from `from_seq`, then live.
pub(crate) fn receive(
    rt: Arc<Runtime>,
    t: TenantStore,
    me: Device,
    principal: spine_runtime::Principal,
    req: pb::ReceiveRequest,
) -> tokio_stream::wrappers::ReceiverStream<std::result::Result<pb::MailboxEntry, Status>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let open = spine_runtime::telemetry::metrics();
        let attrs = [opentelemetry_kv()];
        open.open_streams.add(1, &attrs);
        let result = tokio::select! {
            r = pump(&rt, &t, &me, &req, &tx) => r,
            // The stream ends with its credential (expiry, revocation,
            // deletion), like every stream.
            status = rt.auth.stream_end(&principal) => Err(status),
        };
        open.open_streams.add(-1, &attrs);
        if let Err(status) = result {
            let _ = tx.send(Err(status)).await;
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn opentelemetry_kv() -> opentelemetry::KeyValue {
    opentelemetry::KeyValue::new("rpc.method", "/spine.groups.v1.Groups/Receive")
}

async fn pump(
    rt: &Arc<Runtime>,
    t: &TenantStore,
    me: &Device,
    req: &pb::ReceiveRequest,
    tx: &mpsc::Sender<std::result::Result<pb::MailboxEntry, Status>>,
) -> std::result::Result<(), Status> {
    let prefix = model::mbox_prefix(&me.account, &me.device);
    let mut next = req.from_seq.max(1);
    let rev = rt.store.revision().await.map_err(GroupsError::from)?;
    let mut watch = rt.store.watch(&t.key(&prefix), rev + 1).await.map_err(GroupsError::from)?;
    // Backlog first (the watch buffers what arrives meanwhile).
    let after = (next > 1).then(|| model::mbox_key(&me.account, &me.device, next - 1));
    for kv in t.range_all_after(&prefix, after.as_deref()).await.map_err(GroupsError::from)? {
        let seq = seq_of(&kv.key);
        if seq < next {
            continue;
        }
        let rec: MailboxRec = parse(&kv)?;
        if tx.send(Ok(entry_of(seq, &rec)?)).await.is_err() {
            return Ok(());
        }
        next = seq + 1;
    }
    if req.mark_caught_up {
        let marker = pb::MailboxEntry { seq: next - 1, kind: pb::EntryKind::CaughtUp as i32, ..Default::default() };
        if tx.send(Ok(marker)).await.is_err() {
            return Ok(());
        }
    }
    loop {
        tokio::select! {
            _ = rt.drain.cancelled() => {
                return Err(spine_runtime::error::draining("server draining: reconnect and resume from the next sequence number"));
            }
            _ = tx.closed() => return Ok(()),
            ev = watch.next() => {
                let ev = match ev {
                    Some(Ok(ev)) => ev,
                    Some(Err(e)) => return Err(GroupsError::from(e).into()),
                    None => return Err(spine_runtime::error::unavailable("mailbox watch ended: reconnect", "STREAM_INTERRUPTED", spine_runtime::error::STORE_RETRY_AFTER)),
                };
                if ev.kind != EventKind::Put {
                    continue;
                }
                let seq = seq_of(&ev.key);
                if seq < next {
                    continue;
                }
                let rec: MailboxRec = serde_json::from_slice(&ev.value).map_err(|e| GroupsError::Internal(e.to_string()))?;
                if tx.send(Ok(entry_of(seq, &rec)?)).await.is_err() {
                    return Ok(());
                }
                next = seq + 1;
            }
        }
    }
}

/// Deletes a device's entries up to `up_to`, and takes them off its
/// mailbox head's counts.
pub(crate) async fn ack(t: &TenantStore, me: &Device, up_to: u64) -> Result<()> {
    let prefix = model::mbox_prefix(&me.account, &me.device);
    let head_key = model::mbox_head_key(&me.account, &me.device);
    // Each round deletes a page; a round that loses a race with a delivery
    // or another ack reads again.
    for _ in 0..1024 {
        let page = t.range(&prefix, None, ACK_BATCH).await?;
        let doomed: Vec<&spine_runtime::store::KeyValue> =
            page.kvs.iter().filter(|kv| seq_of(&kv.key) <= up_to).collect();
        if doomed.is_empty() {
            return Ok(());
        }
        let head_kv = t.get(&head_key).await?;
        let (mut head, rev) = head_of(head_kv.as_ref());
        head.entries = head.entries.saturating_sub(doomed.len() as u64);
        head.bytes = head.bytes.saturating_sub(doomed.iter().map(|kv| kv.value.len() as u64).sum());
        // Each entry deleted only if still there, so entries acknowledged
        // twice at once leave the counts once.
        let txn = doomed
            .iter()
            .fold(Txn::new(), |txn, kv| txn.when(Compare::ModRevision(kv.stored_key(), kv.mod_revision)))
            .when(Compare::ModRevision(t.key(&head_key), rev))
            .then_all(doomed.iter().map(|kv| Op::delete(kv.stored_key())))
            .then(Op::put(t.key(&head_key), json(&head)));
        let done = t.txn(txn).await?.succeeded && !(doomed.len() == page.kvs.len() && page.more);
        if done {
            return Ok(());
        }
    }
    Err(GroupsError::Conflict)
}
