//! The delivery service's view of a group: openmls's `PublicGroup`.
//!
//! It holds the group's public state only (ratchet tree, group context,
//! proposals) and checks every handshake message as a member would, except
//! what needs a group secret: a commit's membership tag and the path secrets
//! it encrypts to members (see DESIGN.md). Its state serializes to bytes so
//! the store can hold it and any node can load it.

use std::collections::BTreeMap;
use std::sync::RwLock;

use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_rust_crypto::{MemoryStorage, RustCrypto};

use crate::{DeviceName, MlsError, Refusal, Result, client::decode, invalid, lib, malformed};

/// A member as the verifier sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub index: u32,
    pub name: DeviceName,
    pub signature_key: Vec<u8>,
}

/// Who sent a handshake message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sender {
    /// A member, by leaf index, with the signature key its leaf holds now.
    Member { index: u32, name: DeviceName, signature_key: Vec<u8> },
    /// A new member joining by external commit, with its credential.
    NewMember { name: DeviceName, signature_key: Vec<u8> },
    /// An external sender (the delivery service itself).
    External,
}

/// What a verified handshake message does.
#[derive(Debug, Clone)]
pub enum Verified {
    /// A commit from `from_epoch` to `from_epoch + 1`.
    Commit { sender: Sender, from_epoch: u64, added: Vec<Member>, removed: Vec<Member> },
    /// A proposal (queued until the next commit).
    Proposal { sender: Sender, epoch: u64 },
}

/// What an application message's clear framing says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplicationFraming {
    pub epoch: u64,
}

/// Checks an application message's clear framing for the group
/// `group_id`: a PrivateMessage, for that group, carrying application data.
/// Its content is end-to-end encrypted, so nothing else can be checked, and
/// no group state is needed: the delivery service spares restoring it for
/// every message.
pub fn check_application(group_id: &[u8], bytes: &[u8]) -> Result<ApplicationFraming> {
    match decode(bytes)?.extract() {
        MlsMessageBodyIn::PrivateMessage(pm) => {
            if pm.group_id().as_slice() != group_id {
                return Err(MlsError::refused(Refusal::WrongGroup, "message is for another group"));
            }
            if pm.content_type() != ContentType::Application {
                return Err(MlsError::refused(
                    Refusal::NotAllowed,
                    "a PrivateMessage must carry application data only",
                ));
            }
            Ok(ApplicationFraming { epoch: pm.epoch().as_u64() })
        }
        _ => Err(MlsError::refused(Refusal::NotAllowed, "application messages must be PrivateMessage")),
    }
}

/// A group's public state.
pub struct Verifier {
    group: PublicGroup,
    storage: MemoryStorage,
    crypto: RustCrypto,
    /// A staged commit waiting for [`Verifier::apply`].
    staged: Option<Box<StagedCommit>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("epoch", &self.epoch()).finish()
    }
}

/// Whether a leaf carries a GREASE value (RFC 9420 section 13.5) in its
/// capabilities or extensions. openmls 0.9 refuses such leaves in key
/// packages and new groups but not in commits; Spine refuses them
/// everywhere, so a leaf is accepted or refused the same on every path.
fn has_grease(leaf: &LeafNode) -> bool {
    let c = leaf.capabilities();
    c.ciphersuites().iter().any(|x| x.is_grease())
        || c.extensions().iter().any(|x| x.is_grease())
        || c.proposals().iter().any(|x| x.is_grease())
        || c.credentials().iter().any(|x| x.is_grease())
        || leaf.extensions().iter().any(|e| e.extension_type().is_grease())
}

fn refuse_grease(leaf: &LeafNode) -> Result<()> {
    if has_grease(leaf) {
        return Err(MlsError::refused(
            Refusal::Unsupported,
            "a leaf node carries GREASE values (RFC 9420 section 13.5), which Spine does not accept: turn GREASE off \
             in the client",
        ));
    }
    Ok(())
}

fn name_of(credential: &Credential) -> Result<DeviceName> {
    DeviceName::from_identity(credential.serialized_content())
        .ok_or_else(|| MlsError::refused(Refusal::BadCredential, "credential does not name a Spine device"))
}

impl Verifier {
    /// Starts tracking a group from its GroupInfo (which must carry the
    /// ratchet tree): verifies the tree, the GroupInfo's signature and the
    /// members' leaves.
    pub fn from_group_info(group_info: &[u8]) -> Result<Self> {
        let gi = match decode(group_info)?.extract() {
            MlsMessageBodyIn::GroupInfo(gi) => gi,
            _ => return Err(MlsError::refused(Refusal::Malformed, "not a GroupInfo")),
        };
        let tree = gi
            .extensions()
            .ratchet_tree()
            .ok_or_else(|| MlsError::refused(Refusal::GroupInfoMismatch, "GroupInfo lacks the ratchet tree extension"))?
            .ratchet_tree()
            .clone();
        let storage = MemoryStorage::default();
        let crypto = RustCrypto::default();
        let (group, _) =
            PublicGroup::from_external(&crypto, &storage, tree, gi, ProposalStore::new()).map_err(invalid)?;
        for m in group.members() {
            if let Some(leaf) = group.leaf(m.index) {
                refuse_grease(leaf)?;
            }
        }
        Ok(Self { group, storage, crypto, staged: None })
    }

    pub fn group_id(&self) -> Vec<u8> {
        self.group.group_id().as_slice().to_vec()
    }

    pub fn epoch(&self) -> u64 {
        self.group.group_context().epoch().as_u64()
    }

    pub fn ciphersuite_ok(&self) -> bool {
        self.group.group_context().ciphersuite() == crate::CIPHERSUITE
    }

    /// The index of the delivery service with this signature key among the
    /// group's external senders, if the group names it.
    pub fn external_sender_index(&self, ds_signature_key: &[u8]) -> Option<u32> {
        let ours = ExternalSender::new(
            ds_signature_key.to_vec().into(),
            BasicCredential::new(crate::DELIVERY_SERVICE_IDENTITY.to_vec()).into(),
        )
        .tls_serialize_detached()
        .ok()?;
        let senders = self.group.group_context().extensions().external_senders()?;
        senders
            .iter()
            .position(|e| e.tls_serialize_detached().ok().as_deref() == Some(ours.as_slice()))
            .map(|i| i as u32)
    }

    /// The roster, refusing a group any of whose leaves has a credential
    /// that is not a Spine device identity (such a member would be hidden
    /// from Spine's roster, and so from every rule that reads it).
    pub fn roster(&self) -> Result<Vec<Member>> {
        self.group
            .members()
            .map(|m| {
                let name = DeviceName::from_identity(m.credential.serialized_content()).ok_or_else(|| {
                    MlsError::refused(Refusal::BadCredential, "a member's credential is not a Spine device identity")
                })?;
                Ok(Member { index: m.index.u32(), name, signature_key: m.signature_key })
            })
            .collect()
    }

    /// The members whose credential names a Spine device (see
    /// [`Verifier::roster`] for the check that no other kind is present).
    pub fn members(&self) -> Vec<Member> {
        self.group
            .members()
            .filter_map(|m| {
                let name = DeviceName::from_identity(m.credential.serialized_content())?;
                Some(Member { index: m.index.u32(), name, signature_key: m.signature_key })
            })
            .collect()
    }

    fn sender(&self, s: &openmls::prelude::Sender, credential: &Credential) -> Result<Sender> {
        Ok(match s {
            openmls::prelude::Sender::Member(i) => {
                let leaf =
                    self.group.leaf(*i).ok_or_else(|| MlsError::refused(Refusal::Invalid, "sender is not a member"))?;
                Sender::Member {
                    index: i.u32(),
                    name: name_of(leaf.credential())?,
                    signature_key: leaf.signature_key().as_slice().to_vec(),
                }
            }
            openmls::prelude::Sender::NewMemberCommit => {
                Sender::NewMember { name: name_of(credential)?, signature_key: Vec::new() }
            }
            openmls::prelude::Sender::External(_) => Sender::External,
            openmls::prelude::Sender::NewMemberProposal => {
                return Err(MlsError::refused(Refusal::NotAllowed, "external join proposals are not accepted"));
            }
        })
    }

    /// An application message's clear framing, for this group: see
    /// [`check_application`].
    pub fn check_application(&self, bytes: &[u8]) -> Result<ApplicationFraming> {
        check_application(self.group.group_id().as_slice(), bytes)
    }

    /// Verifies a handshake message (a PublicMessage commit or proposal) for
    /// the current epoch. A commit is staged: call [`Verifier::apply`] once
    /// the server has accepted it, or drop it.
    pub fn verify(&mut self, bytes: &[u8]) -> Result<Verified> {
        self.staged = None;
        let msg = decode(bytes)?;
        let protocol = match msg.extract() {
            MlsMessageBodyIn::PublicMessage(pm) => ProtocolMessage::from(pm),
            MlsMessageBodyIn::PrivateMessage(_) => {
                return Err(MlsError::refused(Refusal::NotAllowed, "handshake messages must be PublicMessage"));
            }
            _ => return Err(MlsError::refused(Refusal::Malformed, "not a protocol message")),
        };
        if protocol.group_id() != self.group.group_id() {
            return Err(MlsError::refused(Refusal::WrongGroup, "message is for another group"));
        }
        let epoch = protocol.epoch().as_u64();
        if epoch != self.epoch() {
            return Err(MlsError::WrongEpoch { message: epoch, current: self.epoch() });
        }
        let processed = self.group.process_message(&self.crypto, protocol).map_err(invalid)?;
        let sender = self.sender(processed.sender(), processed.credential())?;
        match processed.into_content() {
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                for p in staged.add_proposals() {
                    refuse_grease(p.add_proposal().key_package().leaf_node())?;
                }
                if let Some(leaf) = staged.update_path_leaf_node() {
                    refuse_grease(leaf)?;
                }
                for u in staged.update_proposals() {
                    refuse_grease(u.update_proposal().leaf_node())?;
                }
                let added = staged
                    .add_proposals()
                    .map(|p| {
                        let leaf = p.add_proposal().key_package().leaf_node();
                        Ok(Member {
                            index: u32::MAX,
                            name: name_of(leaf.credential())?,
                            signature_key: leaf.signature_key().as_slice().to_vec(),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let roster = self.members();
                let removed = staged
                    .remove_proposals()
                    .filter_map(|p| roster.iter().find(|m| m.index == p.remove_proposal().removed().u32()).cloned())
                    .collect();
                let sender = match sender {
                    Sender::NewMember { name, .. } => {
                        let key = staged
                            .update_path_leaf_node()
                            .map(|l| l.signature_key().as_slice().to_vec())
                            .ok_or_else(|| MlsError::refused(Refusal::Invalid, "external commit without a path"))?;
                        Sender::NewMember { name, signature_key: key }
                    }
                    other => other,
                };
                self.staged = Some(staged);
                Ok(Verified::Commit { sender, from_epoch: epoch, added, removed })
            }
            ProcessedMessageContent::ProposalMessage(p) => {
                match p.proposal() {
                    Proposal::Update(u) => refuse_grease(u.leaf_node())?,
                    Proposal::Add(a) => refuse_grease(a.key_package().leaf_node())?,
                    _ => {}
                }
                self.group.add_proposal(&self.storage, *p).map_err(lib)?;
                Ok(Verified::Proposal { sender, epoch })
            }
            ProcessedMessageContent::ExternalJoinProposalMessage(_) => {
                Err(MlsError::refused(Refusal::NotAllowed, "external join proposals are not accepted"))
            }
            ProcessedMessageContent::ApplicationMessage(_) => {
                Err(MlsError::refused(Refusal::NotAllowed, "application data in a PublicMessage"))
            }
            ProcessedMessageContent::OwnPendingCommit | ProcessedMessageContent::OwnPrivateMessage => {
                Err(MlsError::Library("unexpected own message in a public group".into()))
            }
        }
    }

    /// Applies the commit [`Verifier::verify`] staged: the group moves to the
    /// next epoch.
    pub fn apply(&mut self) -> Result<()> {
        let staged = self.staged.take().ok_or_else(|| MlsError::State("no staged commit".into()))?;
        self.group.merge_commit(&self.storage, *staged).map_err(lib)
    }

    /// Checks that a GroupInfo is the current epoch's, as computed here
    /// (same group context: epoch, tree hash, transcript hash), carries the
    /// ratchet tree, and is signed by the member at `signer_index`.
    pub fn check_group_info(&self, group_info: &[u8], signer_index: u32) -> Result<()> {
        let gi = match decode(group_info)?.extract() {
            MlsMessageBodyIn::GroupInfo(gi) => gi,
            _ => return Err(MlsError::refused(Refusal::Malformed, "not a GroupInfo")),
        };
        if gi.extensions().ratchet_tree().is_none() {
            return Err(MlsError::refused(Refusal::GroupInfoMismatch, "GroupInfo lacks the ratchet tree extension"));
        }
        let leaf = self
            .group
            .leaf(LeafNodeIndex::new(signer_index))
            .ok_or_else(|| MlsError::refused(Refusal::GroupInfoMismatch, "GroupInfo signer is not a member"))?;
        let pk = OpenMlsSignaturePublicKey::from_signature_key(
            leaf.signature_key().clone(),
            crate::CIPHERSUITE.signature_algorithm(),
        );
        let verified: group_info::GroupInfo = gi
            .verify(&self.crypto, &pk)
            .map_err(|_| MlsError::refused(Refusal::BadSignature, "GroupInfo signature does not verify"))?;
        let ours = self.group.group_context().tls_serialize_detached().map_err(lib)?;
        let theirs = verified.group_context().tls_serialize_detached().map_err(lib)?;
        if ours != theirs {
            return Err(MlsError::refused(
                Refusal::GroupInfoMismatch,
                "GroupInfo does not match the group state after the commit",
            ));
        }
        Ok(())
    }

    /// Leaves whose removal is proposed (queued for the next commit).
    pub fn queued_removals(&self) -> Vec<u32> {
        self.group
            .queued_proposals(&self.storage)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(_, q)| match q.proposal() {
                Proposal::Remove(r) => Some(r.removed().u32()),
                _ => None,
            })
            .collect()
    }

    /// The leaf index of a member by name.
    pub fn index_of(&self, name: &DeviceName) -> Option<u32> {
        self.members().into_iter().find(|m| &m.name == name).map(|m| m.index)
    }

    /// Serializes the state (deterministically).
    pub fn to_bytes(&self) -> Vec<u8> {
        let values = self.storage.values.read().expect("verifier storage lock");
        let sorted: BTreeMap<&Vec<u8>, &Vec<u8>> = values.iter().collect();
        let mut out = Vec::new();
        let gid = self.group.group_id().as_slice();
        out.extend_from_slice(&(gid.len() as u32).to_be_bytes());
        out.extend_from_slice(gid);
        for (k, v) in sorted {
            out.extend_from_slice(&(k.len() as u32).to_be_bytes());
            out.extend_from_slice(k);
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v);
        }
        out
    }

    /// Restores a state written by [`Verifier::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut rest = bytes;
        let take = |rest: &mut &[u8]| -> Result<Vec<u8>> {
            if rest.len() < 4 {
                return Err(MlsError::refused(Refusal::Malformed, "truncated verifier state"));
            }
            let n = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
            if rest.len() < 4 + n {
                return Err(MlsError::refused(Refusal::Malformed, "truncated verifier state"));
            }
            let v = rest[4..4 + n].to_vec();
            *rest = &rest[4 + n..];
            Ok(v)
        };
        let gid = take(&mut rest)?;
        let mut map = std::collections::HashMap::new();
        while !rest.is_empty() {
            let k = take(&mut rest)?;
            let v = take(&mut rest)?;
            map.insert(k, v);
        }
        let storage = MemoryStorage { values: RwLock::new(map) };
        let group = PublicGroup::load(&storage, &GroupId::from_slice(&gid))
            .map_err(lib)?
            .ok_or_else(|| MlsError::refused(Refusal::Malformed, "verifier state has no group"))?;
        Ok(Self { group, storage, crypto: RustCrypto::default(), staged: None })
    }
}

/// The delivery service's signing identity, as an MLS external sender.
pub struct DeliveryService {
    signer: openmls_basic_credential::SignatureKeyPair,
}

impl std::fmt::Debug for DeliveryService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeliveryService")
    }
}

impl DeliveryService {
    /// A new delivery-service key.
    pub fn generate() -> Result<Self> {
        Ok(Self {
            signer: openmls_basic_credential::SignatureKeyPair::new(crate::CIPHERSUITE.signature_algorithm())
                .map_err(lib)?,
        })
    }

    /// Serialized key pair, for the store.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.signer.tls_serialize_detached().map_err(lib)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut s = bytes;
        Ok(Self { signer: openmls_basic_credential::SignatureKeyPair::tls_deserialize(&mut s).map_err(malformed)? })
    }

    /// The public key groups put in their external senders extension.
    pub fn public_key(&self) -> Vec<u8> {
        self.signer.public().to_vec()
    }

    /// A Remove proposal, as the group's external sender `sender_index`,
    /// for the member at `leaf`, in the verifier's current epoch. It is
    /// queued in the verifier too, so a commit that includes it verifies.
    pub fn propose_remove(&self, verifier: &mut Verifier, leaf: u32, sender_index: u32) -> Result<Vec<u8>> {
        let msg = ExternalProposal::new_remove::<openmls_rust_crypto::OpenMlsRustCrypto>(
            LeafNodeIndex::new(leaf),
            verifier.group.group_id().clone(),
            verifier.group.group_context().epoch(),
            &self.signer,
            SenderExtensionIndex::new(sender_index),
        )
        .map_err(lib)?;
        let bytes = msg.tls_serialize_detached().map_err(lib)?;
        match verifier.verify(&bytes)? {
            Verified::Proposal { .. } => Ok(bytes),
            Verified::Commit { .. } => Err(MlsError::Library("a proposal verified as a commit".into())),
        }
    }
}

/// What the key-package directory learns from a validated key package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPackageInfo {
    /// Who it is for, from its credential.
    pub name: DeviceName,
    /// The leaf's signature key (must be the device's registered key).
    pub signature_key: Vec<u8>,
    /// Hex of its hash reference: a stable id for the package.
    pub reference: String,
    /// Validity, Unix seconds.
    pub not_before: u64,
    pub not_after: u64,
    /// Marked last-resort (reusable).
    pub last_resort: bool,
}

/// Validates a key package (an MLS message holding one): signatures,
/// protocol version, Spine's ciphersuite, a basic credential naming a Spine
/// device, a lifetime that holds now.
pub fn validate_key_package(bytes: &[u8]) -> Result<KeyPackageInfo> {
    let kp = match decode(bytes)?.extract() {
        MlsMessageBodyIn::KeyPackage(kp) => kp,
        _ => return Err(MlsError::refused(Refusal::Malformed, "not a KeyPackage")),
    };
    let crypto = RustCrypto::default();
    let kp = kp.validate(&crypto, ProtocolVersion::Mls10).map_err(invalid)?;
    if kp.ciphersuite() != crate::CIPHERSUITE {
        return Err(MlsError::refused(
            Refusal::Unsupported,
            format!("ciphersuite {:?} is not Spine's", kp.ciphersuite()),
        ));
    }
    let leaf = kp.leaf_node();
    refuse_grease(leaf)?;
    if kp.last_resort() && !leaf.capabilities().extensions().contains(&ExtensionType::LastResort) {
        return Err(MlsError::refused(
            Refusal::Unsupported,
            "a last-resort key package must list the last_resort extension (0x000A) in its leaf's capabilities",
        ));
    }
    let name = name_of(leaf.credential())?;
    let reference = kp.hash_ref(&crypto).map_err(lib)?;
    Ok(KeyPackageInfo {
        name,
        signature_key: leaf.signature_key().as_slice().to_vec(),
        reference: reference.as_slice().iter().map(|b| format!("{b:02x}")).collect(),
        not_before: kp.life_time().not_before(),
        not_after: kp.life_time().not_after(),
        last_resort: kp.last_resort(),
    })
}
