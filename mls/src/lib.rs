//! spine-mls: everything in Spine that touches openmls (RFC 9420).
//!
//! - [`client`]: the reference client for Rust frontends and for Spine's own
//!   tests: a device's signature key and credential, key packages, groups,
//!   commits, Welcomes, external joins, application messages.
//! - [`sframe`]: SFrame (RFC 9605) media keys from a group's MLS exporter,
//!   per sender and epoch, through the `sframe` crate's `MlsExporter`.
//! - [`verifier`]: the delivery service's view of a group: an openmls
//!   `PublicGroup` that checks every handshake message before the server
//!   accepts it, and serializes to bytes for the store.
//!
//! This crate is the only one that imports openmls. It must never give the
//! server anything that can decrypt: the verifier holds public state only.

pub mod client;
pub mod sframe;
pub mod verifier;

use openmls::prelude::Ciphersuite;

/// The one ciphersuite Spine's groups use: X25519, AES-128-GCM, SHA-256,
/// Ed25519 (MLS ciphersuite 0x0001, mandatory to implement).
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// Prefix of the basic-credential identity of every Spine device.
const IDENTITY_PREFIX: &str = "spine/v1/";

/// Who a device is, as its MLS basic credential names it:
/// `spine/v1/<tenant>/<account>/<device>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceName {
    pub tenant: String,
    pub account: String,
    pub device: String,
}

impl DeviceName {
    pub fn new(tenant: impl Into<String>, account: impl Into<String>, device: impl Into<String>) -> Self {
        Self { tenant: tenant.into(), account: account.into(), device: device.into() }
    }

    /// The credential identity bytes.
    pub fn to_identity(&self) -> Vec<u8> {
        format!("{IDENTITY_PREFIX}{}/{}/{}", self.tenant, self.account, self.device).into_bytes()
    }

    /// Parses credential identity bytes; `None` for anything else.
    pub fn from_identity(bytes: &[u8]) -> Option<Self> {
        let s = std::str::from_utf8(bytes).ok()?.strip_prefix(IDENTITY_PREFIX)?;
        let mut parts = s.split('/');
        let (t, a, d) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || [t, a, d].iter().any(|p| p.is_empty()) {
            return None;
        }
        Some(Self::new(t, a, d))
    }
}

/// Identity of the delivery service as an MLS external sender.
pub const DELIVERY_SERVICE_IDENTITY: &[u8] = b"spine/v1/delivery-service";

/// Errors of this crate: what the bytes or the state did not allow.
#[derive(Debug, thiserror::Error)]
pub enum MlsError {
    /// The bytes are not the MLS structure expected.
    #[error("malformed MLS message: {0}")]
    Malformed(String),
    /// Well-formed, but refused by MLS validation (signature, epoch, ...).
    #[error("invalid MLS message: {0}")]
    Invalid(String),
    /// A message for another epoch than the group's current one.
    #[error("message is for epoch {message}, group is at epoch {current}")]
    WrongEpoch { message: u64, current: u64 },
    /// The operation is not allowed in the group's current state.
    #[error("{0}")]
    State(String),
    /// A failure inside openmls or its crypto provider: our bug, not input.
    #[error("MLS library error: {0}")]
    Library(String),
}

pub type Result<T> = std::result::Result<T, MlsError>;

pub(crate) fn lib<E: std::fmt::Debug>(e: E) -> MlsError {
    MlsError::Library(format!("{e:?}"))
}

pub(crate) fn invalid<E: std::fmt::Debug>(e: E) -> MlsError {
    MlsError::Invalid(format!("{e:?}"))
}

pub(crate) fn malformed<E: std::fmt::Debug>(e: E) -> MlsError {
    MlsError::Malformed(format!("{e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_and_refuse_others() {
        let n = DeviceName::new("tn_a", "ac_b", "dv_c");
        assert_eq!(DeviceName::from_identity(&n.to_identity()), Some(n));
        for bad in [&b"alice"[..], b"spine/v1/a/b", b"spine/v1/a/b/c/d", b"spine/v1//b/c", b"\xff\xfe"] {
            assert_eq!(DeviceName::from_identity(bad), None);
        }
    }
}
