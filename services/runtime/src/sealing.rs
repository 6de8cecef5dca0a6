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
    /// Keys being rotated out: they open, never seal.
    previous: Vec<ChaCha20Poly1305>,
}

fn cipher_of(kek_b64: &str) -> Result<ChaCha20Poly1305, SealError> {
    let bytes = B64.decode(kek_b64.trim()).map_err(|_| SealError::BadKey)?;
    let key: [u8; 32] = bytes.try_into().map_err(|_| SealError::BadKey)?;
    Ok(ChaCha20Poly1305::new(Key::from_slice(&key)))
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").field("sealing", &self.cipher.is_some()).finish()
    }
}

impl Sealer {
    /// From the configured key-encryption key (base64), if any.
    pub fn new(kek_b64: Option<&str>) -> Result<Self, SealError> {
        Self::rotating(kek_b64, &[])
    }

    /// From the current key-encryption key and the ones being rotated out
    /// (which only open).
    pub fn rotating(kek_b64: Option<&str>, previous: &[String]) -> Result<Self, SealError> {
        let cipher = kek_b64.map(cipher_of).transpose()?;
        if cipher.is_none() && !previous.is_empty() {
            return Err(SealError::NoKey);
        }
        let previous = previous.iter().map(|k| cipher_of(k)).collect::<Result<_, _>>()?;
        Ok(Self { cipher, previous })
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
        self.open_current(store_key, sealed).map(|(v, _)| v)
    }

    /// Opens a value, and says whether it is stale: sealed with a key being
    /// rotated out, so the caller should store it sealed again
    /// ([`Sealer::seal`]) under the current key.
    pub fn open_current(&self, store_key: &str, sealed: &str) -> Result<(Vec<u8>, bool), SealError> {
        if let Some(p) = sealed.strip_prefix("plain:") {
            if self.cipher.is_some() {
                return Err(SealError::PlainRefused);
            }
            return B64.decode(p).map(|v| (v, false)).map_err(|_| SealError::Malformed);
        }
        let body = sealed.strip_prefix("v1:").ok_or(SealError::Malformed)?;
        let c = self.cipher.as_ref().ok_or(SealError::NoKey)?;
        let raw = B64.decode(body).map_err(|_| SealError::Malformed)?;
        if raw.len() < 12 + 16 {
            return Err(SealError::Malformed);
        }
        let (nonce, ct) = raw.split_at(12);
        let open = |c: &ChaCha20Poly1305| {
            c.decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: store_key.as_bytes() }).ok()
        };
        if let Some(v) = open(c) {
            return Ok((v, false));
        }
        self.previous.iter().find_map(open).map(|v| (v, true)).ok_or(SealError::WrongKey)
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
    fn a_rotated_out_key_still_opens_and_says_so() {
        let old = Sealer::new(Some(&kek())).unwrap();
        let v = old.seal("k", b"seed");
        let new_key = B64.encode([9u8; 32]);
        let rotating = Sealer::rotating(Some(&new_key), &[kek()]).unwrap();
        assert_eq!(rotating.open_current("k", &v).unwrap(), (b"seed".to_vec(), true));
        let resealed = rotating.seal("k", b"seed");
        assert_eq!(rotating.open_current("k", &resealed).unwrap(), (b"seed".to_vec(), false));
        // Once the old key is gone, only the resealed value opens.
        let after = Sealer::new(Some(&new_key)).unwrap();
        assert_eq!(after.open("k", &v), Err(SealError::WrongKey));
        assert_eq!(after.open("k", &resealed).unwrap(), b"seed");
        assert_eq!(Sealer::rotating(None, &[kek()]).err(), Some(SealError::NoKey));
        assert_eq!(Sealer::rotating(Some(&new_key), &["nope".into()]).err(), Some(SealError::BadKey));
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
