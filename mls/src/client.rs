//! The reference MLS client: one device's key material and groups.
//!
//! Handshake messages (commits, proposals) go out as PublicMessage
//! (`PURE_PLAINTEXT_WIRE_FORMAT_POLICY`) so the delivery service can verify
//! them; application messages are always PrivateMessage (openmls encrypts
//! every application message whatever the policy). The ratchet tree travels
//! in the GroupInfo (ratchet-tree extension), so Welcomes and external joins
//! need nothing else.

use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider;

use crate::{CIPHERSUITE, DeviceName, MlsError, Refusal, Result, invalid, lib, malformed};

/// Serializes an outgoing MLS message.
pub(crate) fn encode(m: &MlsMessageOut) -> Result<Vec<u8>> {
    m.tls_serialize_detached().map_err(lib)
}

/// Parses an incoming MLS message.
pub fn decode(bytes: &[u8]) -> Result<MlsMessageIn> {
    let mut slice = bytes;
    let m = MlsMessageIn::tls_deserialize(&mut slice).map_err(malformed)?;
    if !slice.is_empty() {
        return Err(MlsError::refused(Refusal::Malformed, "trailing bytes after the MLS message"));
    }
    Ok(m)
}

/// Whether the bytes are a Welcome message.
pub fn is_welcome(bytes: &[u8]) -> bool {
    decode(bytes).is_ok_and(|m| matches!(m.extract(), MlsMessageBodyIn::Welcome(_)))
}

/// A device: its provider (key store), signature key and credential.
pub struct Client {
    provider: OpenMlsRustCrypto,
    signer: SignatureKeyPair,
    credential: CredentialWithKey,
    name: DeviceName,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("name", &self.name).finish()
    }
}

/// What a commit produces: the commit for the group, a Welcome for added
/// members, and the GroupInfo of the new epoch (with the ratchet tree).
/// The delivery service takes all three together or none.
#[derive(Debug, Clone)]
pub struct CommitBundle {
    pub commit: Vec<u8>,
    pub welcome: Option<Vec<u8>>,
    pub group_info: Vec<u8>,
}

/// What processing an incoming message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// An application message's plaintext, and its sender.
    Application { sender: Option<DeviceName>, plaintext: Vec<u8> },
    /// A proposal, now queued for the next commit.
    Proposal,
    /// A commit, merged: the group is at `epoch` now.
    Commit { epoch: u64 },
    /// A commit that removed this device: the group is no longer usable.
    Removed,
}

/// A device's signature key before the device has an id: generate it,
/// register its public half with identity, then make the [`Client`] with the
/// id identity assigned.
pub struct DeviceKey(SignatureKeyPair);

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceKey")
    }
}

impl DeviceKey {
    pub fn generate() -> Result<Self> {
        Ok(Self(SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).map_err(lib)?))
    }

    /// The raw Ed25519 public key to register.
    pub fn public_key(&self) -> Vec<u8> {
        self.0.public().to_vec()
    }
}

impl Client {
    /// A new device with a fresh Ed25519 signature key.
    pub fn new(name: DeviceName) -> Result<Self> {
        Self::from_key(DeviceKey::generate()?, name)
    }

    /// The device whose key was generated (and registered) first.
    pub fn from_key(key: DeviceKey, name: DeviceName) -> Result<Self> {
        let provider = OpenMlsRustCrypto::default();
        let signer = key.0;
        signer.store(provider.storage()).map_err(lib)?;
        let credential = CredentialWithKey {
            credential: BasicCredential::new(name.to_identity()).into(),
            signature_key: signer.public().into(),
        };
        Ok(Self { provider, signer, credential, name })
    }

    /// A device whose credential names `identity` verbatim instead of a
    /// Spine device: what a third-party or hostile client may send. The
    /// service refuses such members; this exists so tests can show it.
    pub fn with_raw_identity(key: DeviceKey, identity: Vec<u8>, name: DeviceName) -> Result<Self> {
        let provider = OpenMlsRustCrypto::default();
        let signer = key.0;
        signer.store(provider.storage()).map_err(lib)?;
        let credential = CredentialWithKey {
            credential: BasicCredential::new(identity).into(),
            signature_key: signer.public().into(),
        };
        Ok(Self { provider, signer, credential, name })
    }

    pub fn name(&self) -> &DeviceName {
        &self.name
    }

    /// The raw Ed25519 public key to register with identity.
    pub fn signature_public_key(&self) -> Vec<u8> {
        self.signer.public().to_vec()
    }

    /// `n` single-use key packages, serialized as MLS messages; with
    /// `last_resort`, one more marked last-resort (reusable) at the end.
    pub fn key_packages(&self, n: usize, last_resort: bool) -> Result<Vec<Vec<u8>>> {
        self.key_packages_valid(n, last_resort, None)
    }

    /// As [`Client::key_packages`], valid from `not_before` to `not_after`
    /// (Unix seconds; openmls's default, about three months from an hour
    /// ago, if `None`).
    pub fn key_packages_valid(&self, n: usize, last_resort: bool, window: Option<(u64, u64)>) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::with_capacity(n + usize::from(last_resort));
        for i in 0..n + usize::from(last_resort) {
            // Every package advertises the last-resort extension, so a
            // device's leaves look the same whichever package added it.
            let mut b = KeyPackage::builder().leaf_node_capabilities(Capabilities::new(
                None,
                None,
                Some(&[ExtensionType::LastResort]),
                None,
                None,
            ));
            if let Some((not_before, not_after)) = window {
                b = b.key_package_lifetime(Lifetime::init(not_before, not_after));
            }
            if i == n {
                b = b.mark_as_last_resort();
            }
            let bundle = b.build(CIPHERSUITE, &self.provider, &self.signer, self.credential.clone()).map_err(lib)?;
            out.push(encode(&MlsMessageOut::from(bundle.key_package().clone()))?);
        }
        Ok(out)
    }

    fn join_config() -> MlsGroupJoinConfig {
        MlsGroupJoinConfig::builder()
            .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
            .use_ratchet_tree_extension(true)
            .max_past_epochs(5)
            .build()
    }

    /// Creates a group with the delivery service as its external sender
    /// (`ds_signature_key`, from the groups service), so the service can
    /// propose removals of deleted devices.
    pub fn create_group(&self, group_id: &[u8], ds_signature_key: &[u8]) -> Result<Group> {
        let ds = ExternalSender::new(
            ds_signature_key.to_vec().into(),
            BasicCredential::new(crate::DELIVERY_SERVICE_IDENTITY.to_vec()).into(),
        );
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
            .use_ratchet_tree_extension(true)
            .max_past_epochs(5)
            .with_group_context_extensions(Extensions::single(Extension::ExternalSenders(vec![ds])).map_err(lib)?)
            .build();
        let group = MlsGroup::new_with_group_id(
            &self.provider,
            &self.signer,
            &config,
            GroupId::from_slice(group_id),
            self.credential.clone(),
        )
        .map_err(invalid)?;
        Ok(Group { inner: group })
    }

    /// The GroupInfo (with ratchet tree) of a group this device is in.
    pub fn group_info(&self, group: &Group) -> Result<Vec<u8>> {
        let gi = group.inner.export_group_info(self.provider.crypto(), &self.signer, true).map_err(lib)?;
        encode(&gi)
    }

    /// Joins from a Welcome.
    pub fn join(&self, welcome: &[u8]) -> Result<Group> {
        let welcome = match decode(welcome)?.extract() {
            MlsMessageBodyIn::Welcome(w) => w,
            _ => return Err(MlsError::refused(Refusal::Malformed, "not a Welcome")),
        };
        let staged =
            StagedWelcome::new_from_welcome(&self.provider, &Self::join_config(), welcome, None).map_err(invalid)?;
        Ok(Group { inner: staged.into_group(&self.provider).map_err(invalid)? })
    }

    /// Joins by external commit from a GroupInfo: returns the group and the
    /// bundle to send (its commit adds this device).
    pub fn join_external(&self, group_info: &[u8]) -> Result<(Group, CommitBundle)> {
        let gi = match decode(group_info)?.extract() {
            MlsMessageBodyIn::GroupInfo(gi) => gi,
            _ => return Err(MlsError::refused(Refusal::Malformed, "not a GroupInfo")),
        };
        let (mut group, bundle) = MlsGroup::external_commit_builder()
            .with_config(Self::join_config())
            .build_group(&self.provider, gi, self.credential.clone())
            .map_err(invalid)?
            .load_psks(self.provider.storage())
            .map_err(lib)?
            .build(self.provider.rand(), self.provider.crypto(), &self.signer, |_| true)
            .map_err(invalid)?
            .finalize(&self.provider)
            .map_err(invalid)?;
        let (commit, _, _) = bundle.into_contents();
        group.merge_pending_commit(&self.provider).map_err(lib)?;
        let group = Group { inner: group };
        let group_info = self.group_info(&group)?;
        Ok((group, CommitBundle { commit: encode(&commit)?, welcome: None, group_info }))
    }

    /// Adds the devices whose key packages (as claimed from the directory)
    /// are given, in one commit.
    pub fn add(&self, group: &mut Group, key_packages: &[Vec<u8>]) -> Result<CommitBundle> {
        let mut kps = Vec::with_capacity(key_packages.len());
        for kp in key_packages {
            let kp = match decode(kp)?.extract() {
                MlsMessageBodyIn::KeyPackage(kp) => kp,
                _ => return Err(MlsError::refused(Refusal::Malformed, "not a KeyPackage")),
            };
            kps.push(kp.validate(self.provider.crypto(), ProtocolVersion::Mls10).map_err(invalid)?);
        }
        self.commit(group, |b| b.propose_adds(kps))
    }

    /// Removes the members with these device names, in one commit.
    pub fn remove(&self, group: &mut Group, devices: &[DeviceName]) -> Result<CommitBundle> {
        let leaves: Vec<LeafNodeIndex> = group
            .inner
            .members()
            .filter(|m| {
                DeviceName::from_identity(m.credential.serialized_content()).is_some_and(|n| devices.contains(&n))
            })
            .map(|m| m.index)
            .collect();
        if leaves.len() != devices.len() {
            return Err(MlsError::State("a device to remove is not a member".into()));
        }
        self.commit(group, |b| b.propose_removals(leaves))
    }

    /// A commit that updates this device's leaf (new keys: post-compromise
    /// security) and includes every queued proposal (for example the
    /// delivery service's removal of a deleted device).
    pub fn self_update(&self, group: &mut Group) -> Result<CommitBundle> {
        self.commit(group, |b| b.force_self_update(true))
    }

    /// A commit that sets the group's external senders to delivery-service
    /// credentials with these signature keys (none: no external sender).
    /// The delivery service refuses one that drops or changes it.
    pub fn set_external_senders(&self, group: &mut Group, ds_keys: &[Vec<u8>]) -> Result<CommitBundle> {
        let senders = ds_keys
            .iter()
            .map(|k| {
                ExternalSender::new(
                    k.clone().into(),
                    BasicCredential::new(crate::DELIVERY_SERVICE_IDENTITY.to_vec()).into(),
                )
            })
            .collect();
        let extensions = Extensions::single(Extension::ExternalSenders(senders)).map_err(lib)?;
        self.commit_with(group, |b| b.propose_group_context_extensions(extensions).map_err(invalid))
    }

    /// Builds and stages a commit that includes every queued proposal, with
    /// `configure` adding this commit's own proposals.
    fn commit(
        &self,
        group: &mut Group,
        configure: impl FnOnce(CommitBuilder<'_, Initial>) -> CommitBuilder<'_, Initial>,
    ) -> Result<CommitBundle> {
        self.commit_with(group, |b| Ok(configure(b)))
    }

    /// [`Client::commit`], with proposals that may fail to build.
    fn commit_with(
        &self,
        group: &mut Group,
        configure: impl FnOnce(CommitBuilder<'_, Initial>) -> Result<CommitBuilder<'_, Initial>>,
    ) -> Result<CommitBundle> {
        let built = configure(group.inner.commit_builder().consume_proposal_store(true))?
            .load_psks(self.provider.storage())
            .map_err(lib)?
            .build(self.provider.rand(), self.provider.crypto(), &self.signer, |_| true)
            .map_err(invalid)?
            .stage_commit(&self.provider)
            .map_err(invalid)?;
        Self::finish(built)
    }

    fn finish(built: CommitMessageBundle) -> Result<CommitBundle> {
        let (commit, welcome, group_info) = built.into_contents();
        let group_info = group_info.ok_or_else(|| MlsError::Library("no GroupInfo for the new epoch".into()))?;
        Ok(CommitBundle {
            commit: encode(&commit)?,
            welcome: welcome
                .as_ref()
                .map(|w| encode(&MlsMessageOut::from_welcome(w.clone(), ProtocolVersion::Mls10)))
                .transpose()?,
            group_info: encode(&MlsMessageOut::from(group_info))?,
        })
    }

    /// After the delivery service accepted this device's commit: move to the
    /// new epoch.
    pub fn merge_pending(&self, group: &mut Group) -> Result<()> {
        group.inner.merge_pending_commit(&self.provider).map_err(lib)
    }

    /// After the delivery service refused this device's commit (another won
    /// the epoch): drop it, process the winner, and try again.
    pub fn discard_pending(&self, group: &mut Group) -> Result<()> {
        group.inner.clear_pending_commit(self.provider.storage()).map_err(lib)
    }

    /// Encrypts an application message (always a PrivateMessage).
    pub fn send(&self, group: &mut Group, plaintext: &[u8]) -> Result<Vec<u8>> {
        let m = group.inner.create_message(&self.provider, &self.signer, plaintext).map_err(invalid)?;
        encode(&m)
    }

    /// Processes an incoming commit, proposal or application message.
    pub fn process(&self, group: &mut Group, bytes: &[u8]) -> Result<Incoming> {
        let msg = decode(bytes)?.try_into_protocol_message().map_err(malformed)?;
        let processed = group.inner.process_message(&self.provider, msg).map_err(invalid)?;
        let sender = DeviceName::from_identity(processed.credential().serialized_content());
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(m) => {
                Ok(Incoming::Application { sender, plaintext: m.into_bytes() })
            }
            ProcessedMessageContent::ProposalMessage(p) => {
                group.inner.store_pending_proposal(self.provider.storage(), *p).map_err(lib)?;
                Ok(Incoming::Proposal)
            }
            ProcessedMessageContent::ExternalJoinProposalMessage(p) => {
                group.inner.store_pending_proposal(self.provider.storage(), *p).map_err(lib)?;
                Ok(Incoming::Proposal)
            }
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                let removed = staged.self_removed();
                group.inner.merge_staged_commit(&self.provider, *staged).map_err(invalid)?;
                if removed {
                    // Nothing more can be done in it: drop its state, so a
                    // later Welcome into the same group can be joined.
                    group.inner.delete(self.provider.storage()).map_err(lib)?;
                    Ok(Incoming::Removed)
                } else {
                    Ok(Incoming::Commit { epoch: group.epoch() })
                }
            }
            // Our own messages are never fanned back to us.
            ProcessedMessageContent::OwnPendingCommit | ProcessedMessageContent::OwnPrivateMessage => {
                Err(MlsError::State("this device's own message".into()))
            }
        }
    }

    /// The SFrame context of this device in a group.
    pub fn sframe<'a>(&'a self, group: &'a Group) -> crate::sframe::SframeContext<'a> {
        crate::sframe::SframeContext::new(&group.inner, &self.provider)
    }
}

/// A group as one device holds it.
pub struct Group {
    pub(crate) inner: MlsGroup,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group").field("epoch", &self.epoch()).finish()
    }
}

impl Group {
    pub fn group_id(&self) -> Vec<u8> {
        self.inner.group_id().as_slice().to_vec()
    }

    pub fn epoch(&self) -> u64 {
        self.inner.epoch().as_u64()
    }

    /// Same for every member in an epoch: compare it to detect forks.
    pub fn epoch_authenticator(&self) -> Vec<u8> {
        self.inner.epoch_authenticator().as_slice().to_vec()
    }

    /// This device's leaf index (its SFrame sender index).
    pub fn own_index(&self) -> u32 {
        self.inner.own_leaf_index().u32()
    }

    /// The members, by leaf index.
    pub fn members(&self) -> Vec<(u32, DeviceName)> {
        self.inner
            .members()
            .filter_map(|m| DeviceName::from_identity(m.credential.serialized_content()).map(|n| (m.index.u32(), n)))
            .collect()
    }

    pub fn is_active(&self) -> bool {
        self.inner.is_active()
    }
}
