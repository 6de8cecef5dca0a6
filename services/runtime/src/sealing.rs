//! Secrets at rest: private keys Spine keeps in the store (token signing
//! keys, the delivery service's key) are sealed with a key-encryption key
//! (`auth.key_encryption_key`, 32 bytes base64, from a secret store such as a
//! Kubernetes Secret) using ChaCha20-Poly1305, bound to the store key they
//! live under. Without a key-encryption key (`spine dev`), they are stored
//! marked `plain:` and a warning is logged at start.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;

/// Why a sealed value could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("the key-encryption key is not 32 bytes of base64")]
    BadKey,
    #[error("sealed value is malformed")]
    Malformed,
    #[error("sealed value does not open with this key-encryption key (wrong key, or moved to another store key)")]
    WrongKey,
    #[error("a plain value where a key-encryption key is configured: rotate the key")]
    PlainRefused,
    #[error("a sealed value but no key-encryption key is configured")]
    NoKey,
}

/// Seals and opens secrets at rest.
#[derive(Clone)]
pub struct Sealer {
    cipher: Option<ChaCha20Poly1305>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").field("sealing", &self.cipher.is_some()).finish()
    }
}

impl Sealer {
    /// From the configured key-encryption key (base64), if any.
    pub fn new(kek_b64: Option<&str>) -> Result<Self, SealError> {
        let cipher = match kek_b64 {
            None => None,
            Some(k) => {
                let bytes = B64.decode(k.trim()).map_err(|_| SealError::BadKey)?;
                let key: [u8; 32] = bytes.try_into().map_err(|_| SealError::BadKey)?;
                Some(ChaCha20Poly1305::new(Key::from_slice(&key)))
            }
        };
        Ok(Self { cipher })
    }

    pub fn is_sealing(&self) -> bool {
        self.cipher.is_some()
    }

    /// Seals `secret` for storage under `store_key`.
    pub fn seal(&self, store_key: &str, secret: &[u8]) -> String {
        match &self.cipher {
            None => format!("plain:{}", B64.encode(secret)),
            Some(c) => {
                let mut nonce = [0u8; 12];
                rand::rngs::OsRng.fill_bytes(&mut nonce);
                let ct = c
                    .encrypt(Nonce::from_slice(&nonce), Payload { msg: secret, aad: store_key.as_bytes() })
                    .expect("ChaCha20-Poly1305 encryption does not fail for in-memory input");
                let mut out = nonce.to_vec();
                out.extend(ct);
                format!("v1:{}", B64.encode(out))
            }
        }
    }

    /// Opens a value [`Sealer::seal`] wrote under `store_key`.
    pub fn open(&self, store_key: &str, sealed: &str) -> Result<Vec<u8>, SealError> {
        if let Some(p) = sealed.strip_prefix("plain:") {
            if self.cipher.is_some() {
                return Err(SealError::PlainRefused);
            }
            return B64.decode(p).map_err(|_| SealError::Malformed);
        }
        let body = sealed.strip_prefix("v1:").ok_or(SealError::Malformed)?;
        let c = self.cipher.as_ref().ok_or(SealError::NoKey)?;
        let raw = B64.decode(body).map_err(|_| SealError::Malformed)?;
        if raw.len() < 12 + 16 {
            return Err(SealError::Malformed);
        }
        let (nonce, ct) = raw.split_at(12);
        c.decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: store_key.as_bytes() })
            .map_err(|_| SealError::WrongKey)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek() -> String {
        B64.encode([7u8; 32])
    }

    #[test]
    fn sealed_values_open_only_with_the_key_under_their_store_key() {
        let s = Sealer::new(Some(&kek())).unwrap();
        let v = s.seal("/spine/sys/signing/a", b"seed");
        assert!(v.starts_with("v1:") && !v.contains(&B64.encode(b"seed")));
        assert_eq!(s.open("/spine/sys/signing/a", &v).unwrap(), b"seed");
        assert_eq!(s.open("/spine/sys/signing/b", &v), Err(SealError::WrongKey));
        let other = Sealer::new(Some(&B64.encode([8u8; 32]))).unwrap();
        assert_eq!(other.open("/spine/sys/signing/a", &v), Err(SealError::WrongKey));
        assert_eq!(Sealer::new(None).unwrap().open("/spine/sys/signing/a", &v), Err(SealError::NoKey));
        assert_eq!(s.open("k", "v1:AAAA"), Err(SealError::Malformed));
    }

    #[test]
    fn plain_values_only_without_a_key() {
        let plain = Sealer::new(None).unwrap();
        let v = plain.seal("k", b"seed");
        assert_eq!(plain.open("k", &v).unwrap(), b"seed");
        assert_eq!(Sealer::new(Some(&kek())).unwrap().open("k", &v), Err(SealError::PlainRefused));
        assert_eq!(Sealer::new(Some("short")).err(), Some(SealError::BadKey));
    }
}
