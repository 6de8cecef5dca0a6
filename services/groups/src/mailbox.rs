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
use spine_runtime::ids::TenantId;
use spine_runtime::store::{Compare, EventKind, GroupSpace, Op, SharedLease, TenantStore, Txn};
use spine_runtime::{Runtime, directory};
use tokio::sync::mpsc;
use tonic::Status;

use crate::error::{GroupsError, Result};
use crate::model::{self, Counter, Device, LogEntry, MailboxRec, json, parse, unb64};

/// Most entries one Ack deletes per transaction.
const ACK_BATCH: usize = 100;

fn counter(kv: Option<&spine_runtime::store::KeyValue>) -> (u64, i64) {
    kv.map_or((0, 0), |kv| (serde_json::from_slice::<Counter>(&kv.value).map_or(0, |c| c.n), kv.mod_revision))
}

/// Delivers one log entry to one device, unless it already has it.
async fn deliver(t: &TenantStore, lease: &SharedLease, g: &str, gseq: u64, e: &LogEntry, d: &Device) -> Result<()> {
    let head_key = model::mbox_head_key(&d.account, &d.device);
    let grp_key = model::mbox_grp_key(&d.account, &d.device, g);
    for _ in 0..16 {
        let head = t.get(&head_key).await?;
        let grp = t.get(&grp_key).await?;
        let (next, head_rev) = counter(head.as_ref());
        let (delivered, grp_rev) = counter(grp.as_ref());
        if delivered >= gseq {
            return Ok(());
        }
        let seq = next.max(1);
        let rec = MailboxRec { group: g.to_string(), kind: e.kind, message: e.message.clone(), epoch: e.epoch };
        let out = lease
            .txn(|l| {
                Txn::new()
                    .when(Compare::ModRevision(t.key(&head_key), head_rev))
                    .when(Compare::ModRevision(t.key(&grp_key), grp_rev))
                    .then(Op::put_leased(t.key(&model::mbox_key(&d.account, &d.device, seq)), json(&rec), l))
                    .then(Op::put(t.key(&head_key), json(&Counter { n: seq + 1 })))
                    .then(Op::put(t.key(&grp_key), json(&Counter { n: gseq })))
            })
            .await?;
        if out.succeeded {
            return Ok(());
        }
    }
    Err(GroupsError::Conflict)
}

/// Delivers every log entry of a group past its fan-out cursor.
pub(crate) async fn fanout(rt: &Arc<Runtime>, groups: &GroupSpace, lease: &SharedLease, g: &str) -> Result<()> {
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
            let t = sys.tenant_for_delivery(&tenant);
            // A device deleted meanwhile gets nothing: delivering would
            // recreate data its account's deletion just removed.
            if directory::device(&t, &d.account, &d.device).await?.is_none() {
                continue;
            }
            deliver(&t, lease, g, gseq, &e, d).await?;
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
            if e.kind != pb::EntryKind::Commit as i32 {
                continue;
            }
            let Some(tenant) = TenantId::parse(&d.tenant) else { continue };
            let t = sys.tenant_for_delivery(&tenant);
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
                    .then(Op::delete(kv.key.clone())),
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
    from_seq: u64,
) -> tokio_stream::wrappers::ReceiverStream<std::result::Result<pb::MailboxEntry, Status>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let open = spine_runtime::telemetry::metrics();
        let attrs = [opentelemetry_kv()];
        open.open_streams.add(1, &attrs);
        let result = pump(&rt, &t, &me, from_seq, &tx).await;
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
    from_seq: u64,
    tx: &mpsc::Sender<std::result::Result<pb::MailboxEntry, Status>>,
) -> std::result::Result<(), Status> {
    let prefix = model::mbox_prefix(&me.account, &me.device);
    let mut next = from_seq.max(1);
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
    loop {
        tokio::select! {
            _ = rt.drain.cancelled() => {
                return Err(Status::unavailable("server draining: reconnect and resume from the next sequence number"));
            }
            _ = tx.closed() => return Ok(()),
            ev = watch.next() => {
                let ev = match ev {
                    Some(Ok(ev)) => ev,
                    Some(Err(e)) => return Err(GroupsError::from(e).into()),
                    None => return Err(Status::unavailable("mailbox watch ended: reconnect")),
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

/// Deletes a device's entries up to `up_to`.
pub(crate) async fn ack(t: &TenantStore, me: &Device, up_to: u64) -> Result<()> {
    let prefix = model::mbox_prefix(&me.account, &me.device);
    loop {
        let page = t.range(&prefix, None, ACK_BATCH).await?;
        let doomed: Vec<String> =
            page.kvs.iter().filter(|kv| seq_of(&kv.key) <= up_to).map(|kv| kv.key.clone()).collect();
        if doomed.is_empty() {
            return Ok(());
        }
        let full = doomed.len() == page.kvs.len() && page.more;
        t.txn(Txn::new().then_all(doomed.into_iter().map(Op::delete))).await?;
        if !full {
            return Ok(());
        }
    }
}
