//! Device tokens: `sdt1.<key id>.<claims>.<signature>`.
//!
//! `claims` is base64url (no padding) JSON [`Claims`]; `signature` is the
//! base64url Ed25519 signature over the ASCII bytes `sdt1.<key id>.<claims>`.
//! One algorithm, fixed by the version prefix: there is no `alg` field to
//! confuse. Tokens are opaque to clients; only Spine reads them.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Version prefix of every device token.
pub const PREFIX: &str = "sdt1.";
/// Longest token accepted at all (bounds parsing work on garbage).
pub const MAX_TOKEN_BYTES: usize = 2048;
/// Clock skew tolerated between nodes when checking `iat`.
pub const CLOCK_SKEW_SECS: i64 = 30;

/// What a device token asserts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// Tenant id.
    pub t: String,
    /// Account id.
    pub a: String,
    /// Device id.
    pub d: String,
    /// Scopes.
    pub s: Vec<String>,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Expires at, Unix seconds.
    pub exp: i64,
}

/// Why a token was refused. All of these reach the client as UNAUTHENTICATED
/// with one generic message; the reason is only for our metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("unknown signing key")]
    UnknownKey,
    #[error("bad signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
}

/// Signs claims with a key.
pub fn sign(key_id: &str, key: &SigningKey, claims: &Claims) -> String {
    let payload = B64.encode(serde_json::to_vec(claims).expect("claims serialize"));
    let signed = format!("{PREFIX}{key_id}.{payload}");
    let sig = key.sign(signed.as_bytes());
    format!("{signed}.{}", B64.encode(sig.to_bytes()))
}

/// The key id a token names, without verifying anything.
pub fn key_id(token: &str) -> Result<&str, TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::Malformed);
    }
    let rest = token.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
    rest.split('.').next().filter(|k| !k.is_empty()).ok_or(TokenError::Malformed)
}

/// Verifies a token's signature with `key` and its validity at `now`.
pub fn verify(token: &str, key: &VerifyingKey, now: i64) -> Result<Claims, TokenError> {
    key_id(token)?;
    let (signed, sig) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
    let payload =
        signed.strip_prefix(PREFIX).and_then(|r| r.split_once('.')).map(|(_, p)| p).ok_or(TokenError::Malformed)?;
    let sig = B64.decode(sig).map_err(|_| TokenError::Malformed)?;
    let sig = Signature::from_slice(&sig).map_err(|_| TokenError::Malformed)?;
    key.verify_strict(signed.as_bytes(), &sig).map_err(|_| TokenError::BadSignature)?;
    let claims: Claims =
        B64.decode(payload).ok().and_then(|b| serde_json::from_slice(&b).ok()).ok_or(TokenError::Malformed)?;
    if claims.exp <= now {
        return Err(TokenError::Expired);
    }
    if claims.iat > now + CLOCK_SKEW_SECS {
        return Err(TokenError::NotYetValid);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::generate(&mut rand::rngs::OsRng)
    }

    fn claims(now: i64) -> Claims {
        Claims {
            t: "tn_x".into(),
            a: "ac_y".into(),
            d: "dv_z".into(),
            s: vec!["calls".into()],
            iat: now,
            exp: now + 60,
        }
    }

    #[test]
    fn round_trip() {
        let k = key();
        let t = sign("sk_1", &k, &claims(1000));
        assert_eq!(key_id(&t), Ok("sk_1"));
        assert_eq!(verify(&t, &k.verifying_key(), 1001), Ok(claims(1000)));
    }

    #[test]
    fn refuses_expired_future_forged_and_other_key() {
        let k = key();
        let t = sign("sk_1", &k, &claims(1000));
        assert_eq!(verify(&t, &k.verifying_key(), 1060), Err(TokenError::Expired));
        assert_eq!(verify(&t, &k.verifying_key(), 1000 - CLOCK_SKEW_SECS - 1), Err(TokenError::NotYetValid));
        assert_eq!(verify(&t, &key().verifying_key(), 1001), Err(TokenError::BadSignature));
        // Claims changed after signing: the signature no longer matches.
        let mut forged = claims(1000);
        forged.a = "ac_other".into();
        let forged_payload = B64.encode(serde_json::to_vec(&forged).unwrap());
        let parts: Vec<&str> = t.split('.').collect();
        let tampered = format!("{}.{}.{}.{}", parts[0], parts[1], forged_payload, parts[3]);
        assert_eq!(verify(&tampered, &k.verifying_key(), 1001), Err(TokenError::BadSignature));
        // Key id changed: it is signed too.
        let swapped = t.replacen("sk_1", "sk_2", 1);
        assert_eq!(verify(&swapped, &k.verifying_key(), 1001), Err(TokenError::BadSignature));
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::*;

        /// 256 cases in CI; `PROPTEST_CASES` for the long run.
        fn cases() -> ProptestConfig {
            let n = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
            ProptestConfig { cases: n, failure_persistence: None, ..ProptestConfig::default() }
        }

        /// A signed token and the key that verifies it.
        fn signed() -> (String, VerifyingKey) {
            let k = SigningKey::from_bytes(&[7; 32]);
            (sign("sk_fuzz", &k, &claims(1000)), k.verifying_key())
        }

        proptest! {
            #![proptest_config(cases())]

            /// Any string: never a panic, never a success without the key's
            /// signature.
            #[test]
            fn any_string_is_refused(t in ".{0,3000}") {
                let (_, key) = signed();
                let _ = key_id(&t);
                prop_assert!(verify(&t, &key, 1001).is_err());
            }

            /// Token-shaped strings: the prefix and four dot-separated parts
            /// of base64url-ish text, some of it decoding to JSON.
            #[test]
            fn token_shaped_strings_are_refused(
                kid in "[a-z_0-9]{0,12}",
                payload in prop_oneof!["[A-Za-z0-9_-]{0,200}", any::<Vec<u8>>().prop_map(|b| B64.encode(b)),
                    ("[a-z]{0,8}", any::<i64>(), any::<i64>()).prop_map(|(a, iat, exp)| B64.encode(
                        format!(r#"{{"t":"tn_x","a":"{a}","d":"dv","s":[],"iat":{iat},"exp":{exp}}}"#)))],
                sig in prop_oneof!["[A-Za-z0-9_-]{0,100}", proptest::collection::vec(any::<u8>(), 64).prop_map(|b| B64.encode(b))],
                extra in proptest::option::of("[.A-Za-z0-9_-]{0,20}"),
            ) {
                let (_, key) = signed();
                let t = format!("{PREFIX}{kid}.{payload}.{sig}{}", extra.unwrap_or_default());
                prop_assert!(verify(&t, &key, 1001).is_err());
            }

            /// A real token with one character changed, removed or added
            /// never verifies as anything but itself.
            #[test]
            fn damaged_tokens_are_refused(i in any::<usize>(), c in any::<char>(), how in 0..3u8) {
                let (t, key) = signed();
                let mut chars: Vec<char> = t.chars().collect();
                let i = i % chars.len();
                match how {
                    0 => chars[i] = c,
                    1 => { chars.remove(i); }
                    _ => chars.insert(i, c),
                }
                let damaged: String = chars.into_iter().collect();
                let verdict = verify(&damaged, &key, 1001);
                // base64url without padding can carry the same bytes in two
                // spellings of its last character: the only way a change
                // verifies is by decoding to the very same signed bytes.
                if let Ok(claims) = verdict {
                    prop_assert_eq!(claims, super::claims(1000));
                }
            }
        }
    }

    #[test]
    fn garbage_is_malformed() {
        let k = key().verifying_key();
        for g in ["", "sdt1.", "sdt1..", "sdt1.k.p", "sdt1.k.!!!.???", "Bearer x", &"a".repeat(5000)] {
            assert!(matches!(verify(g, &k, 0), Err(TokenError::Malformed)), "{g}");
        }
    }
}
