//! Groups test support: identity + groups on one test server, and MLS
//! members that are real registered devices with spine-mls clients.
#![allow(dead_code)]

use std::time::Duration;

use futures::StreamExt;
use spine_mls::DeviceName;
use spine_mls::client::{Client, CommitBundle, DeviceKey, Group};
use spine_proto::groups::v1 as pb;
use spine_proto::groups::v1::groups_client::GroupsClient;
use spine_runtime::config::Backend;
use spine_testing::{Env, Tenant, req};
use tonic::transport::Channel;

pub async fn start(backend: Backend) -> Env {
    start_with(backend, spine_testing::test_config()).await
}

/// [`start`] with a config of the test's own.
pub async fn start_with(backend: Backend, config: spine_runtime::Config) -> Env {
    let (store, etcd): (std::sync::Arc<dyn spine_runtime::store::Store>, _) = match backend {
        Backend::Embedded => (std::sync::Arc::new(spine_runtime::store::EmbeddedStore::in_memory()), None),
        Backend::Etcd => {
            let e = spine_testing::EtcdServer::start().await;
            (e.store().await, Some(e))
        }
    };
    start_on(store, etcd, config).await
}

/// Identity and groups on a given store (holding `etcd`, if any).
pub async fn start_on(
    store: std::sync::Arc<dyn spine_runtime::store::Store>,
    etcd: Option<spine_testing::EtcdServer>,
    config: spine_runtime::Config,
) -> Env {
    spine_testing::start_on_with(store, etcd, config, |rt, mut routes, _| async move {
        let names = spine_runtime::service::install::<spine_groups::Groups>(&rt, &mut routes, String::new())
            .await
            .map(|(n, ())| n)
            .expect("groups install");
        (routes, names)
    })
    .await
}

pub struct Member {
    /// A client on the test server, for use without the Env.
    pub channel: Channel,
    pub tenant: String,
    pub account: String,
    pub device: String,
    pub token: String,
    pub client: Client,
    pub group: Option<Group>,
    /// Next mailbox sequence number to read.
    pub next_seq: u64,
}

impl Member {
    pub fn groups(&self, env: &Env) -> GroupsClient<Channel> {
        GroupsClient::new(env.channel.clone()).max_decoding_message_size(16 << 20).max_encoding_message_size(16 << 20)
    }

    /// Runs a client operation on this member's group.
    pub fn act<R>(&mut self, f: impl FnOnce(&Client, &mut Group) -> R) -> R {
        f(&self.client, self.group.as_mut().expect("member of a group"))
    }

    pub fn g(&mut self) -> &mut Group {
        self.group.as_mut().expect("member of a group")
    }

    /// Uploads `n` key packages and a last-resort one.
    pub async fn upload(&self, env: &Env, n: usize) -> pb::KeyPackageCount {
        let mut kps = self.client.key_packages(n, true).unwrap();
        let last = kps.pop().unwrap();
        self.groups(env)
            .upload_key_packages(req(
                pb::UploadKeyPackagesRequest { key_packages: kps, last_resort: last },
                &self.token,
            ))
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn send_commit(&self, _env: &Env, b: &CommitBundle) -> Result<u64, tonic::Status> {
        self.send_commit_raw(b).await
    }

    pub async fn send_commit_raw(&self, b: &CommitBundle) -> Result<u64, tonic::Status> {
        let gid = self.group.as_ref().unwrap().group_id();
        GroupsClient::new(self.channel.clone())
            .max_decoding_message_size(16 << 20)
            .max_encoding_message_size(16 << 20)
            .send_commit(req(
                pb::SendCommitRequest {
                    group_id: gid,
                    commit: b.commit.clone(),
                    welcome: b.welcome.clone().unwrap_or_default(),
                    group_info: b.group_info.clone(),
                },
                &self.token,
            ))
            .await
            .map(|r| r.into_inner().epoch)
    }

    /// Reads the mailbox from `next_seq` until `n` entries arrived.
    pub async fn receive(&mut self, env: &Env, n: usize) -> Vec<pb::MailboxEntry> {
        receive_entries(env, &self.token, &mut self.next_seq, n).await
    }
}

/// Reads the mailbox of the device holding `token` from `*next_seq` until
/// `n` entries arrived, moving `*next_seq` past them.
pub async fn receive_entries(env: &Env, token: &str, next_seq: &mut u64, n: usize) -> Vec<pb::MailboxEntry> {
    let mut stream = GroupsClient::new(env.channel.clone())
        .max_decoding_message_size(16 << 20)
        .receive(req(pb::ReceiveRequest { from_seq: *next_seq, ..Default::default() }, token))
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while out.len() < n {
        let e = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .unwrap_or_else(|_| panic!("got {} of {n} mailbox entries", out.len()))
            .expect("stream open")
            .expect("entry");
        *next_seq = e.seq + 1;
        out.push(e);
    }
    out
}

/// A registered device of `account` with an MLS client naming it.
pub async fn member(env: &Env, t: &Tenant, account: &str) -> Member {
    let key = DeviceKey::generate().unwrap();
    let (device, token) = env.register(t, account, &key.public_key()).await;
    let client = Client::from_key(key, DeviceName::new(&t.id, account, &device)).unwrap();
    Member {
        channel: env.channel.clone(),
        tenant: t.id.clone(),
        account: account.into(),
        device,
        token,
        client,
        group: None,
        next_seq: 1,
    }
}

/// Lets anyone (of any product holding one of its handles) add `account` to
/// groups: the opposite of the private defaults (contacts only).
pub async fn let_anyone_add(env: &Env, t: &Tenant, account: &str) {
    use spine_proto::identity::v1 as ipb;
    env.identity()
        .update_settings(req(
            ipb::UpdateSettingsRequest {
                account_id: account.into(),
                settings: Some(ipb::PrivacySettings {
                    who_can_add_to_groups: ipb::WhoCanAddToGroups::Everyone as i32,
                    cross_app: ipb::CrossAppReachability::HandleHolders as i32,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["who_can_add_to_groups".into(), "cross_app".into()],
                }),
            },
            &t.cred,
        ))
        .await
        .unwrap();
}

pub async fn ds_key(env: &Env, m: &Member) -> Vec<u8> {
    m.groups(env)
        .get_service_info(req(pb::GetServiceInfoRequest {}, &m.token))
        .await
        .unwrap()
        .into_inner()
        .external_sender_signature_key
}

/// `creator` makes a group allowing `tenants`.
pub async fn create_group(env: &Env, creator: &mut Member, gid: &[u8], tenants: Vec<String>) -> pb::Group {
    let ds = ds_key(env, creator).await;
    let group = creator.client.create_group(gid, &ds).unwrap();
    let info = creator.client.group_info(&group).unwrap();
    creator.group = Some(group);
    creator
        .groups(env)
        .create_group(req(pb::CreateGroupRequest { group_info: info, allowed_tenant_ids: tenants }, &creator.token))
        .await
        .unwrap()
        .into_inner()
}

pub fn wrong_epoch(s: &tonic::Status) -> Option<u64> {
    use tonic_types::StatusExt;
    if s.code() != tonic::Code::FailedPrecondition {
        return None;
    }
    let info = s.get_details_error_info()?;
    (info.reason == "WRONG_EPOCH").then(|| info.metadata.get("current_epoch")?.parse().ok()).flatten()
}

/// A claim target naming an account of the caller's own tenant.
pub fn by_account(account: &str) -> pb::Target {
    pb::Target { target: Some(pb::target::Target::AccountId(account.into())) }
}

/// Claims one key package per target with `token`; panics on refusal.
pub async fn claim(env: &Env, token: &str, targets: Vec<pb::Target>) -> Vec<Vec<u8>> {
    GroupsClient::new(env.channel.clone())
        .claim_key_packages(req(pb::ClaimKeyPackagesRequest { targets }, token))
        .await
        .unwrap()
        .into_inner()
        .key_packages
        .into_iter()
        .map(|k| k.key_package)
        .collect()
}

/// The group as `token`'s device sees it; panics on refusal.
pub async fn get_group(env: &Env, token: &str, gid: &[u8]) -> pb::Group {
    GroupsClient::new(env.channel.clone())
        .get_group(req(pb::GetGroupRequest { group_id: gid.to_vec() }, token))
        .await
        .unwrap()
        .into_inner()
}

/// The group's current GroupInfo; panics on refusal.
pub async fn group_info(env: &Env, token: &str, gid: &[u8]) -> pb::GroupInfoResponse {
    GroupsClient::new(env.channel.clone())
        .get_group_info(req(pb::GetGroupInfoRequest { group_id: gid.to_vec() }, token))
        .await
        .unwrap()
        .into_inner()
}

/// Members of one tenant in one group, all at the same epoch.
pub async fn group_of(env: &Env, n: usize, gid: &[u8]) -> (Tenant, Vec<Member>) {
    let t = env.tenant("t").await;
    let mut members = Vec::new();
    for _ in 0..n {
        let a = env.account(&t).await;
        let_anyone_add(env, &t, &a).await;
        let m = member(env, &t, &a).await;
        m.upload(env, 1).await;
        members.push(m);
    }
    create_group(env, &mut members[0], gid, vec![t.id.clone()]).await;
    // Claims take at most 32 targets at a time.
    let mut kps: Vec<Vec<u8>> = Vec::new();
    for chunk in members[1..].chunks(32) {
        let targets = chunk.iter().map(|m| by_account(&m.account)).collect();
        kps.extend(claim(env, &members[0].token, targets).await);
    }
    let add = members[0].act(|c, g| c.add(g, &kps)).unwrap();
    members[0].send_commit(env, &add).await.unwrap();
    members[0].act(|c, g| c.merge_pending(g)).unwrap();
    for m in members[1..].iter_mut() {
        let e = m.receive(env, 1).await.remove(0);
        assert_eq!(e.message, *add.welcome.as_ref().unwrap());
        m.group = Some(m.client.join(&e.message).unwrap());
    }
    (t, members)
}
