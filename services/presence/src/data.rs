//! Presence's account data: nothing durable. The report says what the
//! owning node holds in memory right now; deletion drops it.

use std::sync::Arc;

use async_trait::async_trait;
use spine_proto::common::v1::{DataItem, DataReportSection, Retention, retention};
use spine_runtime::data::AccountData;
use spine_runtime::store::TenantStore;
use tonic::Status;

use crate::state::Owner;

pub(crate) struct PresenceData(pub(crate) Arc<Owner>);

#[async_trait]
impl AccountData for PresenceData {
    fn service(&self) -> &'static str {
        "presence"
    }

    async fn report(&self, t: &TenantStore, account: &str) -> Result<DataReportSection, Status> {
        let held = self.0.describe(&(t.tenant().to_string(), account.to_string()));
        Ok(DataReportSection {
            service: "presence".into(),
            items: vec![DataItem {
                kind: "presence_state".into(),
                description: "The status each device announced, until its TTL (at most 5 minutes), and when the account was last online. Held in the memory of the one node that owns the account; never written to disk or to the store, gone when that node restarts.".into(),
                location: "memory of the owning presence node".into(),
                retention: Some(Retention { kind: Some(retention::Kind::InMemoryOnly(true)) }),
                count: u64::from(held.is_some()),
                values: held.into_iter().collect(),
                readers: "watchers the account's presence settings allow, at the last-seen precision it chose".into(),
                oldest: None,
            }],
        })
    }

    async fn delete(&self, t: &TenantStore, account: &str) -> Result<(), Status> {
        self.0.forget(&(t.tenant().to_string(), account.to_string()));
        Ok(())
    }

    async fn delete_device(&self, _t: &TenantStore, _account: &str, _device: &str) -> Result<(), Status> {
        // A revoked device cannot re-announce (its token is dead); its last
        // announcement expires with its TTL.
        Ok(())
    }
}
