//! SFrame (RFC 9605) media keys from an MLS group, per section 5.2.
//!
//! The key schedule is the `sframe` crate's: this module only implements its
//! [`MlsExporter`] over an openmls group, and fixes how Spine splits the
//! SFrame key id: 8 bits of epoch, 16 bits of sender (leaf) index, the rest
//! a context id chosen by the sender (0 here). Every member derives the same
//! key for a given sender and epoch; a new epoch (any commit, a removal in
//! particular) gives every sender a new key, which a removed member cannot
//! derive.

use openmls::prelude::MlsGroup;
use openmls_rust_crypto::OpenMlsRustCrypto;
use openmls_traits::OpenMlsProvider;
use sframe::CipherSuite;
use sframe::frame::{EncryptedFrame, MediaFrame, MonotonicCounter};
use sframe::key::{DecryptionKey, EncryptionKey};
use sframe::mls::{MlsExporter, MlsKeyId, MlsKeyIdBitRange};

use crate::{MlsError, Refusal, Result};

/// The SFrame cipher suite Spine's media uses.
pub const SFRAME_SUITE: CipherSuite = CipherSuite::AesGcm128Sha256;

/// Epoch bits and sender-index bits of every SFrame key id.
pub fn bit_range() -> MlsKeyIdBitRange {
    MlsKeyIdBitRange::new(8, 16)
}

/// The exporter of one group's current epoch.
pub struct SframeContext<'a> {
    group: &'a MlsGroup,
    provider: &'a OpenMlsRustCrypto,
}

/// openmls's exporter error, as the `sframe` crate wants an error type.
#[derive(Debug, thiserror::Error)]
#[error("MLS exporter: {0}")]
pub struct ExportError(String);

impl MlsExporter for SframeContext<'_> {
    type BaseKey = Vec<u8>;
    type Error = ExportError;

    fn export_secret(
        &self,
        label: &str,
        context: &[u8],
        key_length: usize,
    ) -> std::result::Result<Vec<u8>, ExportError> {
        self.group
            .export_secret(self.provider.crypto(), label, context, key_length)
            .map_err(|e| ExportError(format!("{e:?}")))
    }
}

impl<'a> SframeContext<'a> {
    pub(crate) fn new(group: &'a MlsGroup, provider: &'a OpenMlsRustCrypto) -> Self {
        Self { group, provider }
    }

    fn epoch(&self) -> u64 {
        self.group.epoch().as_u64()
    }

    /// The key id a sender uses in the current epoch.
    pub fn key_id(&self, sender_index: u32) -> Result<MlsKeyId> {
        MlsKeyId::try_new(0u64, self.epoch(), u64::from(sender_index), bit_range())
            .map_err(|e| MlsError::State(format!("sframe key id: {e}")))
    }

    /// The encryption key of this device for the current epoch.
    pub fn encryption_key(&self) -> Result<EncryptionKey> {
        let kid = self.key_id(self.group.own_leaf_index().u32())?;
        EncryptionKey::derive_from_mls(SFRAME_SUITE, self, kid).map_err(|e| MlsError::Library(format!("sframe: {e}")))
    }

    /// The decryption key of a sender for the current epoch.
    pub fn decryption_key(&self, sender_index: u32) -> Result<DecryptionKey> {
        let kid = self.key_id(sender_index)?;
        DecryptionKey::derive_from_mls(SFRAME_SUITE, self, kid).map_err(|e| MlsError::Library(format!("sframe: {e}")))
    }

    /// Encrypts a media frame with this device's key; `counter` must be used
    /// for one key only (start a new one each epoch).
    pub fn encrypt(&self, counter: &mut MonotonicCounter, payload: &[u8]) -> Result<Vec<u8>> {
        let key = self.encryption_key()?;
        let frame = MediaFrame::try_new(counter, payload).map_err(|e| MlsError::State(format!("sframe: {e}")))?;
        let encrypted = frame.encrypt(&key).map_err(|e| MlsError::Library(format!("sframe: {e}")))?;
        Ok(encrypted.as_ref().to_vec())
    }

    /// Decrypts a frame from any member of the current epoch. A frame of
    /// another epoch, or from a sender whose key this device cannot derive,
    /// fails.
    pub fn decrypt(&self, frame: &[u8]) -> Result<Vec<u8>> {
        let encrypted = EncryptedFrame::try_from(frame)
            .map_err(|e| MlsError::refused(Refusal::Malformed, format!("sframe: {e}")))?;
        let kid = MlsKeyId::from_key_id(encrypted.header().key_id(), bit_range());
        let current = self.epoch() & 0xff;
        if kid.epoch_lsb() != current {
            return Err(MlsError::WrongEpoch { message: kid.epoch_lsb(), current });
        }
        let sender = u32::try_from(kid.member_index())
            .map_err(|_| MlsError::refused(Refusal::Malformed, "sframe sender index"))?;
        let key = self.decryption_key(sender)?;
        let media = encrypted.decrypt(&key).map_err(|e| MlsError::refused(Refusal::Invalid, format!("sframe: {e}")))?;
        Ok(media.payload().to_vec())
    }
}
