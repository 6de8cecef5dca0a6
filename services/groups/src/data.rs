//! The groups service's account data: its section of the data report, and
//! deletion (key packages, mailboxes, memberships, with a Remove proposal to
//! every group a deleted device was in).

use std::sync::Weak;

use async_trait::async_trait;
use spine_proto::common::v1::{DataItem, DataReportSection, Retention, retention};
use spine_runtime::data::AccountData;
use spine_runtime::store::{Op, TenantStore, Txn};
use tonic::Status;

use crate::Node;
use crate::model::{self, Device};

pub(crate) struct GroupsData(pub(crate) Weak<Node>);

fn item(
    kind: &str,
    description: &str,
    location: &str,
    retention: Retention,
    values: Vec<String>,
    readers: &str,
) -> DataItem {
    DataItem {
        kind: kind.into(),
        description: description.into(),
        location: location.into(),
        retention: Some(retention),
        count: values.len() as u64,
        values,
        readers: readers.into(),
        oldest: None,
    }
}

fn until_deleted() -> Retention {
    Retention { kind: Some(retention::Kind::UntilAccountDeleted(true)) }
}

fn max_age(secs: u64) -> Retention {
    Retention { kind: Some(retention::Kind::MaxAgeSeconds(secs as i64)) }
}

/// `<kind>/<account>/<device>/<rest>` -> (device, rest).
fn split(t: &TenantStore, key: &str) -> (String, String) {
    let rel = t.relative(key);
    let mut parts = rel.splitn(4, '/');
    let _ = (parts.next(), parts.next());
    (parts.next().unwrap_or_default().to_string(), parts.next().unwrap_or_default().to_string())
}

impl GroupsData {
    fn node(&self) -> Result<std::sync::Arc<Node>, Status> {
        self.0.upgrade().ok_or_else(|| Status::unavailable("groups service stopping"))
    }
}

#[async_trait]
impl AccountData for GroupsData {
    fn service(&self) -> &'static str {
        "groups"
    }

    async fn report(&self, t: &TenantStore, account: &str) -> Result<DataReportSection, Status> {
        let store_err = |e: spine_runtime::store::StoreError| Status::from(crate::error::GroupsError::from(e));
        let kps = t.range_all(&model::kp_account_prefix(account)).await.map_err(store_err)?;
        let kpl = t.range_all(&model::kpl_account_prefix(account)).await.map_err(store_err)?;
        let mbox = t.range_all(&format!("mbox/{account}/")).await.map_err(store_err)?;
        let gm = t.range_all(&model::gm_account_prefix(account)).await.map_err(store_err)?;
        let root = format!("etcd:/spine/t/{}/", t.tenant());
        let items = vec![
            item(
                "key_package",
                "MLS key packages the account's devices uploaded for others to add them to groups (public keys only); single-use ones are deleted when claimed.",
                &format!("{root}kp/<account>/<device>/<ref> and kpl/<account>/<device> (last resort)"),
                max_age(crate::MAX_KEY_PACKAGE_LIFETIME_SECS),
                kps.iter()
                    .map(|kv| format!("device {} package {}", split(t, &kv.key).0, split(t, &kv.key).1))
                    .chain(kpl.iter().map(|kv| {
                        format!(
                            "device {} last-resort package",
                            t.relative(&kv.key).rsplit('/').next().unwrap_or_default()
                        )
                    }))
                    .collect(),
                "the service; anyone allowed to add the account to a group claims one",
            ),
            item(
                "mailbox_entry",
                "MLS messages (encrypted application messages, commits, proposals, Welcomes) waiting for the account's devices to fetch and acknowledge them. Spine cannot read application messages.",
                &format!("{root}mbox/<account>/<device>/<seq>"),
                max_age(crate::MAILBOX_RETENTION_SECS),
                mbox.iter()
                    .map(|kv| {
                        format!("device {} entry {}", split(t, &kv.key).0, split(t, &kv.key).1.trim_start_matches('0'))
                    })
                    .collect(),
                "the device it is for",
            ),
            item(
                "group_membership",
                "Which MLS groups the account's devices are members of (the group's roster also names them, for the other members).",
                &format!("{root}gm/<account>/<device>/<group> and etcd:/spine/g/<group>/meta"),
                until_deleted(),
                gm.iter()
                    .map(|kv| format!("device {} in group {}", split(t, &kv.key).0, split(t, &kv.key).1))
                    .collect(),
                "the account's devices; the group's members see the roster",
            ),
        ];
        Ok(DataReportSection { service: "groups".into(), items })
    }

    async fn delete(&self, t: &TenantStore, account: &str) -> Result<(), Status> {
        let node = self.node()?;
        let gm = t.range_all(&model::gm_account_prefix(account)).await.map_err(crate::error::GroupsError::from)?;
        for kv in &gm {
            let (device, g) = split(t, &kv.key);
            let d = Device { tenant: t.tenant().to_string(), account: account.to_string(), device };
            crate::delivery::propose_removal(&node, &g, &d).await?;
        }
        let mut txn = Txn::new();
        for p in model::account_prefixes(account) {
            txn = txn.then(Op::delete_prefix(t.key(&p)));
        }
        t.txn(txn).await.map_err(crate::error::GroupsError::from)?;
        Ok(())
    }

    async fn delete_device(&self, t: &TenantStore, account: &str, device: &str) -> Result<(), Status> {
        let node = self.node()?;
        let prefix = format!("gm/{account}/{device}/");
        let gm = t.range_all(&prefix).await.map_err(crate::error::GroupsError::from)?;
        for kv in &gm {
            let (_, g) = split(t, &kv.key);
            let d = Device { tenant: t.tenant().to_string(), account: account.to_string(), device: device.to_string() };
            crate::delivery::propose_removal(&node, &g, &d).await?;
        }
        let txn = Txn::new()
            .then(Op::delete_prefix(t.key(&model::kp_prefix(account, device))))
            .then(Op::delete(t.key(&model::kpl_key(account, device))))
            .then(Op::delete_prefix(t.key(&model::mbox_prefix(account, device))))
            .then(Op::delete(t.key(&model::mbox_head_key(account, device))))
            .then(Op::delete_prefix(t.key(&format!("mbox-grp/{account}/{device}/"))))
            .then(Op::delete_prefix(t.key(&prefix)));
        t.txn(txn).await.map_err(crate::error::GroupsError::from)?;
        Ok(())
    }
}
