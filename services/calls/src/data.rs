//! What calls reports and deletes about an account.

use std::sync::Arc;

use async_trait::async_trait;
use spine_proto::common::v1::{DataItem, DataReportSection, Retention, retention};
use spine_runtime::data::AccountData;
use spine_runtime::store::TenantStore;
use tonic::Status;

use crate::Node;
use crate::model::{AccountKey, End, State};
use crate::records;

pub(crate) struct CallsData(pub Arc<Node>);

fn live() -> Option<Retention> {
    Some(Retention { kind: Some(retention::Kind::WhileLive(true)) })
}

/// One live call as the account's report shows it.
fn describe_call(r: &crate::model::CallRec, me: &AccountKey) -> String {
    let reader = crate::model::DevKey { tenant: me.tenant.clone(), account: me.account.clone(), device: String::new() };
    let view = crate::view::render(r, 0, &reader);
    let others: Vec<String> = r
        .parties
        .iter()
        .filter(|p| &p.who != me)
        .map(|p| {
            let name = if p.who.tenant == me.tenant {
                format!("account {}", p.who.account)
            } else {
                p.handle.as_ref().map_or("another product's account".into(), |h| format!("{}/{h}", p.who.tenant))
            };
            format!("{name} ({:?}, ring {:?})", p.role, p.ring)
        })
        .collect();
    let mine: Vec<&str> = r.legs.iter().filter(|l| &l.dev.account_key() == me).map(|l| l.dev.device.as_str()).collect();
    let (request_device, _) = r.request.split_once('/').unwrap_or((r.request.as_str(), ""));
    format!(
        "call {} kind={:?} video={} state={:?} started_ms={} answered_ms={:?} ended_ms={:?} ring_deadline_ms={} idle_deadline_ms={} waiting={} node={} started_by_device={} other_parties=[{}] my_devices=[{}] other_devices={}{}",
        r.id,
        r.kind,
        r.video,
        r.state,
        r.started_ms,
        r.answered_ms,
        r.ended_ms,
        r.ring_deadline_ms,
        r.idle_deadline_ms,
        r.waiting,
        r.home,
        if mine.contains(&request_device) { request_device } else { "another party's device" },
        others.join(", "),
        mine.join(", "),
        r.legs.len() - mine.len(),
        r.group.as_ref().map_or(String::new(), |g| format!(
            " group={} epoch={} media_node={}",
            g.gid,
            g.epoch,
            view.media.map_or("-".into(), |m| m.node_id)
        )),
    )
}

/// Ends every live call of the account and deletes its records.
pub(crate) async fn delete_account(node: &Node, t: &TenantStore, account: &str) -> Result<(), Status> {
    let who = AccountKey { tenant: t.tenant().to_string(), account: account.to_string() };
    for (rec, _) in node.cluster.calls_of(&who) {
        if rec.state == State::Ended {
            continue;
        }
        match node
            .cluster
            .update(&rec.id, |r| {
                crate::machine::end(r, End::AccountDeleted, node.clock.now_ms());
                Ok(())
            })
            .await
        {
            Ok(_) | Err(crate::error::CallError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(records::delete_account(t, account).await?)
}

#[async_trait]
impl AccountData for CallsData {
    fn service(&self) -> &'static str {
        "calls"
    }

    async fn report(&self, t: &TenantStore, account: &str) -> Result<DataReportSection, Status> {
        let root = format!("etcd:/spine/t/{}/", t.tenant().as_str());
        let who = AccountKey { tenant: t.tenant().to_string(), account: account.to_string() };
        let calls: Vec<_> =
            self.0.cluster.calls_of(&who).into_iter().filter(|(r, _)| r.state != State::Ended).collect();
        let sessions = self.0.cluster.sessions_of(&who);
        let kept = records::of_account(t, account).await?;
        let policy = records::policy(t).await?;
        let items = vec![
            DataItem {
                kind: "live_call".into(),
                description: "A call the account takes part in now: its id, kind, audio or video, state and times (start, answer, end), ring and idle deadlines, whether it waits behind another call, the node running it, the device and idempotency key that started it, the other parties (as this account's tenant may name them) with their role and how ringing went, every device in the call (the account's own by id, others counted), and for group calls the group, its epoch and media node; while answered, a marker that the account is in a call (presence shows IN_CALL). Never signalling payloads or addresses.".into(),
                location: "etcd:/spine/sys/calls/c/<call> and etcd:/spine/sys/calls/incall/<tenant>/<account>/<call> (and the pair key or group key naming the call, which names no account)".into(),
                retention: live(),
                count: calls.len() as u64,
                values: calls.iter().map(|(r, _)| describe_call(r, &who)).collect(),
                readers: "Spine's calls nodes; the devices of the accounts in the call see it as their own view".into(),
                oldest: None,
            },
            DataItem {
                kind: "signalling_session".into(),
                description: "Which calls node holds each device's signalling stream, and that node's region.".into(),
                location: "etcd:/spine/sys/calls/sess/<tenant>/<account>/<device>".into(),
                retention: live(),
                count: sessions.len() as u64,
                values: sessions.iter().map(|(d, _, _, region)| format!("device={d} region={region}")).collect(),
                readers: "Spine's calls nodes".into(),
                oldest: None,
            },
            DataItem {
                kind: "call_record".into(),
                description: "A record of an ended call, only if the tenant's record policy keeps any: only the fields it names; participants as keyed hashes.".into(),
                location: format!("{root}calls/rec/<expiry>/<record>"),
                retention: Some(Retention { kind: Some(retention::Kind::MaxAgeSeconds(policy.retention_seconds)) }),
                count: kept.len() as u64,
                values: kept.iter().map(|(_, s)| records::describe(s)).collect(),
                readers: "the tenant's servers (CallRecords.ListCallRecords); the account (this report)".into(),
                oldest: kept.iter().filter_map(|(_, s)| s.started_at).min().map(|s| prost_types::Timestamp { seconds: s, nanos: 0 }),
            },
        ];
        Ok(DataReportSection { service: "calls".into(), items })
    }

    async fn delete(&self, t: &TenantStore, account: &str) -> Result<(), Status> {
        delete_account(&self.0, t, account).await
    }

    async fn tenant_report(&self, t: &TenantStore) -> Result<Option<DataReportSection>, Status> {
        let root = format!("etcd:/spine/t/{}/", t.tenant().as_str());
        let policy = records::policy(t).await?;
        let salted = t.get(crate::model::SALT).await?.is_some();
        let kept = t.count(crate::model::RECORDS).await?;
        let fields: Vec<String> = policy
            .fields
            .iter()
            .map(|f| format!("{:?}", spine_proto::calls::v1::RecordField::try_from(*f).unwrap_or_default()))
            .collect();
        let items = vec![
            DataItem {
                kind: "call_record_policy".into(),
                description: "Which call-record fields the tenant keeps and for how long (none by default), and whether the key that hashes participants exists (the key itself is never shown).".into(),
                location: format!("{root}calls/policy and {root}calls/salt"),
                retention: None,
                count: u64::from(!policy.fields.is_empty()),
                values: vec![format!(
                    "fields=[{}] retention_seconds={} hashing_key={}",
                    fields.join(","),
                    policy.retention_seconds,
                    if salted { "present" } else { "absent" }
                )],
                readers: "the tenant's servers; calls nodes".into(),
                oldest: None,
            },
            DataItem {
                kind: "call_record".into(),
                description: "Records of ended calls kept under the policy (CallRecords.ListCallRecords lists them).".into(),
                location: format!("{root}calls/rec/<expiry>/<record>"),
                retention: Some(Retention { kind: Some(retention::Kind::MaxAgeSeconds(policy.retention_seconds)) }),
                count: kept,
                values: vec![],
                readers: "the tenant's servers".into(),
                oldest: None,
            },
        ];
        Ok(Some(DataReportSection { service: "calls".into(), items }))
    }

    async fn delete_device(&self, t: &TenantStore, account: &str, device: &str) -> Result<(), Status> {
        let me = crate::model::DevKey {
            tenant: t.tenant().to_string(),
            account: account.to_string(),
            device: device.to_string(),
        };
        for (rec, _) in self.0.cluster.calls_of(&me.account_key()) {
            if rec.leg_of(&me).is_some() {
                let idle = self.0.idle_ms();
                match self
                    .0
                    .cluster
                    .update(&rec.id, |r| crate::machine::hang_up(r, &me, self.0.clock.now_ms(), idle))
                    .await
                {
                    Ok(_) | Err(crate::error::CallError::NotFound | crate::error::CallError::Precondition { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }
}
