//! The account-data hook: how every service reports and deletes what it
//! stores about an account.
//!
//! Identity owns `GetDataReport` and `DeleteAccount`. Each service that
//! stores something about accounts registers an [`AccountData`] with the
//! [`crate::Runtime`]; identity asks each for its section of the report and,
//! on deletion, tells each to delete. Deletion is also recorded durably (a
//! tombstone under `/spine/t/<tenant>/deleted/<account>`, see
//! [`TOMBSTONES`]) so that services running in other processes, and holders
//! that failed, finish the job from the store: [`pending_deletions`].

use async_trait::async_trait;
use spine_proto::common::v1::DataReportSection;

use crate::store::{StoreError, TenantStore};

/// Tenant-relative prefix of account-deletion tombstones:
/// `deleted/<account>` holds a [`Tombstone`].
pub const TOMBSTONES: &str = "deleted/";
/// How long a tombstone is kept: long enough for every service to finish
/// deleting, short enough to say nothing about the account for long.
pub const TOMBSTONE_DAYS: i64 = 7;

/// A durable record that an account was deleted.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Tombstone {
    /// Unix seconds of deletion.
    pub deleted_at: i64,
    /// Services that have finished deleting their data.
    pub done: Vec<String>,
    /// The interop handles the account had, and the tenants they were open
    /// to: where other tenants' contact and block lists may still name it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub handles: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub handle_tenants: Vec<String>,
}

/// What a service stores about accounts.
#[async_trait]
pub trait AccountData: Send + Sync + 'static {
    /// The service's name in reports (`identity`, `groups`, ...).
    fn service(&self) -> &'static str;
    /// Everything the service stores about the account.
    async fn report(&self, tenant: &TenantStore, account_id: &str) -> Result<DataReportSection, tonic::Status>;
    /// Deletes everything the service stores about the account. Must be
    /// idempotent: it may run again after a partial failure.
    async fn delete(&self, tenant: &TenantStore, account_id: &str) -> Result<(), tonic::Status>;
    /// Deletes what the service stores about one revoked device (and, for
    /// groups, proposes its removal). Idempotent, like [`AccountData::delete`].
    async fn delete_device(&self, tenant: &TenantStore, account_id: &str, device_id: &str)
    -> Result<(), tonic::Status>;
    /// What the service stores about the tenant itself rather than about
    /// one account (for `GetTenantDataReport`), if anything.
    async fn tenant_report(&self, _tenant: &TenantStore) -> Result<Option<DataReportSection>, tonic::Status> {
        Ok(None)
    }
}

/// Accounts of a tenant whose deletion `service` has not finished.
pub async fn pending_deletions(tenant: &TenantStore, service: &str) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    for kv in tenant.range_all(TOMBSTONES).await? {
        let Ok(t) = serde_json::from_slice::<Tombstone>(&kv.value) else { continue };
        if !t.done.iter().any(|s| s == service) {
            out.push(tenant.relative(&kv.key).trim_start_matches(TOMBSTONES).to_string());
        }
    }
    Ok(out)
}

/// Records that `service` finished deleting `account` (compare-and-swap on
/// the tombstone; a tombstone already gone means nothing is left to do).
pub async fn mark_done(tenant: &TenantStore, account: &str, service: &str) -> Result<(), StoreError> {
    use crate::store::{Compare, Op, Txn};
    let key = format!("{TOMBSTONES}{account}");
    for _ in 0..8 {
        let Some(kv) = tenant.get(&key).await? else { return Ok(()) };
        let Ok(mut tomb) = serde_json::from_slice::<Tombstone>(&kv.value) else { return Ok(()) };
        if tomb.done.iter().any(|s| s == service) {
            return Ok(());
        }
        tomb.done.push(service.to_string());
        let value = serde_json::to_vec(&tomb).expect("tombstone serializes");
        let k = tenant.key(&key);
        let txn = Txn::new().when(Compare::ModRevision(k.clone(), kv.mod_revision)).then(Op::put(k, value));
        if tenant.txn(txn).await?.succeeded {
            return Ok(());
        }
    }
    Err(StoreError::Unavailable("tombstone changed concurrently".into()))
}
