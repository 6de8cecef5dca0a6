//! What calls reports and deletes about an account.

use std::sync::Arc;

use async_trait::async_trait;
use spine_proto::common::v1::{DataItem, DataReportSection, Retention, retention};
use spine_runtime::data::AccountData;
use spine_runtime::store::TenantStore;
use tonic::Status;

use crate::Node;
use crate::model::{AccountKey, End, State, now_ms};
use crate::records;

pub(crate) struct CallsData(pub Arc<Node>);

fn live() -> Option<Retention> {
    Some(Retention { kind: Some(retention::Kind::WhileLive(true)) })
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
                crate::machine::end(r, End::AccountDeleted, now_ms());
                Ok(())
            })
            .await
        {
            Ok(_) | Err(crate::error::CallError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
    }
    records::delete_account(t, account).await.map_err(spine_runtime::error::store)
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
        let kept = records::of_account(t, account).await.map_err(spine_runtime::error::store)?;
        let policy = records::policy(t).await.map_err(spine_runtime::error::store)?;
        let items = vec![
            DataItem {
                kind: "live_call".into(),
                description: "A call the account takes part in now: its kind, state, the accounts and devices in it, ring state and deadlines. Never signalling payloads or addresses.".into(),
                location: "etcd:/spine/sys/calls/c/<call> (and pair/ or group/ keys)".into(),
                retention: live(),
                count: calls.len() as u64,
                values: calls
                    .iter()
                    .map(|(r, _)| format!("call kind={:?} video={} state={:?} started_ms={}", r.kind, r.video, r.state, r.started_ms))
                    .collect(),
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

    async fn delete_device(&self, t: &TenantStore, account: &str, device: &str) -> Result<(), Status> {
        let me = crate::model::DevKey {
            tenant: t.tenant().to_string(),
            account: account.to_string(),
            device: device.to_string(),
        };
        for (rec, _) in self.0.cluster.calls_of(&me.account_key()) {
            if rec.leg_of(&me).is_some() {
                let idle = self.0.idle_ms();
                match self.0.cluster.update(&rec.id, |r| crate::machine::hang_up(r, &me, now_ms(), idle)).await {
                    Ok(_)
                    | Err(crate::error::CallError::NotFound)
                    | Err(crate::error::CallError::Precondition { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }
}
