//! Control-plane records that authentication reads, as stored under
//! `/spine/sys/auth/`. Written by the identity service, mirrored by every
//! node's [`super::AuthRing`].

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Prefix the ring mirrors.
pub const AUTH_PREFIX: &str = "auth/";
/// `auth/keys/<key id>`: a published token-verification key.
pub const KEYS: &str = "auth/keys/";
/// `auth/revoked/<tenant>/<device>`: a revoked device, kept (under a lease)
/// until every token it could hold has expired.
pub const REVOKED: &str = "auth/revoked/";
/// `auth/tenant-creds/<credential id>`: a tenant credential's hash.
pub const TENANT_CREDS: &str = "auth/tenant-creds/";
/// `auth/operators/<operator id>`: an operator credential's hash.
pub const OPERATORS: &str = "auth/operators/";
/// `auth/media-creds/<credential id>`: a media node's credential hash.
pub const MEDIA_CREDS: &str = "auth/media-creds/";
/// `signing/<key id>`: a signing key's private half, read by identity only
/// (outside `auth/`, so verifying nodes never load it).
pub const SIGNING: &str = "signing/";

/// A published Ed25519 verification key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublishedKey {
    /// Base64 of the raw 32-byte public key.
    pub public_key: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds from which the key signs new tokens.
    pub activates_at: i64,
    /// Unix seconds after which the key is withdrawn (set when a newer key
    /// activates, to that time plus the longest token lifetime).
    #[serde(default)]
    pub retires_at: Option<i64>,
}

/// A signing key's private half.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SigningSecret {
    /// The 32-byte Ed25519 seed, sealed (see `crate::sealing`).
    pub seed: String,
}

/// A tenant credential as stored: never the secret, only its hash.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TenantCredential {
    pub tenant_id: String,
    /// Hex SHA-256 of the secret.
    pub secret_sha256: String,
    pub label: String,
    pub created_at: i64,
}

/// An operator credential as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OperatorCredential {
    pub secret_sha256: String,
    pub label: String,
    pub created_at: i64,
}

/// A media node's credential as stored: the one node it may register.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MediaNodeCredential {
    pub node_id: String,
    pub secret_sha256: String,
    pub label: String,
    pub created_at: i64,
}

/// Hex SHA-256 of a bearer secret. Secrets are 256-bit random, so a plain
/// hash is enough (no password stretching needed).
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Compares two hashes in constant time.
pub fn hashes_equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
