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

/// Why MLS input was refused: stable values a client can branch on (the
/// groups service sends [`Refusal::reason`] as a `google.rpc.ErrorInfo`
/// reason). Library diagnostics never reach clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The bytes are not the MLS structure expected (or not the message
    /// type the field takes, or have trailing bytes).
    Malformed,
    /// A message for another group.
    WrongGroup,
    /// A ciphersuite, protocol version, extension, proposal or credential
    /// type Spine does not accept, a capability missing, or a GREASE value
    /// (RFC 9420 section 13.5) in a leaf.
    Unsupported,
    /// A signature does not verify.
    BadSignature,
    /// A credential that is not a basic credential naming a Spine device.
    BadCredential,
    /// A key package outside its lifetime, or one longer than allowed.
    Lifetime,
    /// A GroupInfo that does not match the group's state after the commit,
    /// or that lacks the ratchet tree.
    GroupInfoMismatch,
    /// Valid MLS that Spine does not take here (a PrivateMessage handshake,
    /// application data in a PublicMessage, external join proposals).
    NotAllowed,
    /// Anything else MLS validation refuses (tree, path, proposals).
    Invalid,
}

impl Refusal {
    /// The stable reason string.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Malformed => "MLS_MALFORMED",
            Refusal::WrongGroup => "MLS_WRONG_GROUP",
            Refusal::Unsupported => "MLS_UNSUPPORTED",
            Refusal::BadSignature => "MLS_BAD_SIGNATURE",
            Refusal::BadCredential => "MLS_BAD_CREDENTIAL",
            Refusal::Lifetime => "MLS_LIFETIME",
            Refusal::GroupInfoMismatch => "MLS_GROUP_INFO_MISMATCH",
            Refusal::NotAllowed => "MLS_NOT_ALLOWED",
            Refusal::Invalid => "MLS_INVALID",
        }
    }

    /// Every refusal (for documentation tests).
    pub const ALL: [Refusal; 9] = [
        Refusal::Malformed,
        Refusal::WrongGroup,
        Refusal::Unsupported,
        Refusal::BadSignature,
        Refusal::BadCredential,
        Refusal::Lifetime,
        Refusal::GroupInfoMismatch,
        Refusal::NotAllowed,
        Refusal::Invalid,
    ];

    /// The refusal a library error stands for, read from its diagnostic
    /// (openmls names its error variants after what failed).
    fn of_library(debug: &str) -> Refusal {
        let has = |words: &[&str]| words.iter().any(|w| debug.contains(w));
        if has(&["Signature", "signature"]) {
            Refusal::BadSignature
        } else if has(&["Lifetime", "lifetime"]) {
            Refusal::Lifetime
        } else if has(&["Credential", "credential"]) {
            Refusal::BadCredential
        } else if has(&["Ciphersuite", "ciphersuite", "Version", "Capabilit", "Unsupported", "Extension", "Grease"]) {
            Refusal::Unsupported
        } else if has(&["WrongGroupId", "GroupId"]) {
            Refusal::WrongGroup
        } else if has(&["Decod", "Codec", "Malformed", "Tls", "Length"]) {
            Refusal::Malformed
        } else {
            Refusal::Invalid
        }
    }
}

/// Errors of this crate: what the bytes or the state did not allow.
#[derive(Debug, thiserror::Error)]
pub enum MlsError {
    /// Input refused. `message` is ours and fit for clients; `detail` is
    /// the library's diagnostic, for logs only.
    #[error("{message}")]
    Refused { refusal: Refusal, message: String, detail: String },
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

impl MlsError {
    /// Input refused for `refusal`, with a message of ours.
    pub fn refused(refusal: Refusal, message: impl Into<String>) -> Self {
        MlsError::Refused { refusal, message: message.into(), detail: String::new() }
    }

    /// The refusal, for refused input.
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            MlsError::Refused { refusal, .. } => Some(*refusal),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, MlsError>;

pub(crate) fn lib<E: std::fmt::Debug>(e: E) -> MlsError {
    MlsError::Library(format!("{e:?}"))
}

/// A library's refusal of input: classified, its text kept for logs.
pub(crate) fn invalid<E: std::fmt::Debug>(e: E) -> MlsError {
    let detail = format!("{e:?}");
    let refusal = Refusal::of_library(&detail);
    let message = match refusal {
        Refusal::BadSignature => "a signature does not verify",
        Refusal::Lifetime => "a key package lifetime is not acceptable",
        Refusal::BadCredential => "a credential is not acceptable",
        Refusal::Unsupported => "a capability, extension, version or ciphersuite is not supported",
        Refusal::WrongGroup => "the message is for another group",
        Refusal::Malformed => "the bytes are not a well-formed MLS message",
        _ => "MLS validation refused the message",
    };
    MlsError::Refused { refusal, message: message.into(), detail }
}

pub(crate) fn malformed<E: std::fmt::Debug>(e: E) -> MlsError {
    MlsError::Refused {
        refusal: Refusal::Malformed,
        message: "the bytes are not a well-formed MLS message".into(),
        detail: format!("{e:?}"),
    }
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
