//! Deployment-wide secrets every node shares, kept in the control plane
//! sealed with the key-encryption key (`/spine/sys/secrets/<name>`), made by
//! the first node that needs them:
//! - `peer`: authenticates requests one node forwards to another (presence
//!   to an account's owner, calls to the node holding a stream). A marker
//!   that makes a node serve a request locally is honoured only when it
//!   carries an HMAC under this secret, so no client can forge it.
//! - `pseudonym`: keys the hashes that stand for a person where the person
//!   must not be named (the pair key of a direct call, the person behind a
//!   blocked interop handle): a hash names no one to anyone without it.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::OnceCell;

use crate::store::{Compare, Op, StoreError, SystemStore, Txn};

/// Header carrying a forwarded request's proof (see [`Secrets::peer_mark`]).
pub const FORWARDED: &str = "x-spine-forwarded";
/// How old a forwarding proof may be, in seconds.
const MARK_WINDOW_SECS: i64 = 30;

/// The loaded secrets.
#[derive(Clone)]
pub struct Secrets {
    peer: [u8; 32],
    pseudonym: [u8; 32],
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets")
    }
}

fn mac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    for p in parts {
        m.update(&(p.len() as u64).to_be_bytes());
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

impl Secrets {
    /// A keyed hash standing for `parts` (hex, 32 characters), under the
    /// pseudonym secret; `purpose` keeps different uses apart.
    pub fn pseudonym(&self, purpose: &str, parts: &[&str]) -> String {
        let mut all: Vec<&[u8]> = vec![purpose.as_bytes()];
        all.extend(parts.iter().map(|p| p.as_bytes()));
        hex::encode(&mac(&self.pseudonym, &all)[..16])
    }

    /// The proof a node attaches to a request it forwards to a peer: when
    /// (Unix seconds) and an HMAC of that, the method path and the
    /// caller's credential, under the peer secret.
    pub fn peer_mark(&self, path: &str, authorization: &[u8]) -> String {
        let now = crate::now_secs();
        let tag = mac(&self.peer, &[path.as_bytes(), authorization, now.to_string().as_bytes()]);
        format!("{now}.{}", hex::encode(tag))
    }

    /// Whether `mark` is a fresh proof for this path and credential.
    pub fn verify_peer_mark(&self, mark: &str, path: &str, authorization: &[u8]) -> bool {
        let Some((at, tag)) = mark.split_once('.') else { return false };
        let (Ok(at_secs), Ok(tag)) = (at.parse::<i64>(), hex::decode(tag)) else { return false };
        if (crate::now_secs() - at_secs).abs() > MARK_WINDOW_SECS {
            return false;
        }
        let mut m = Hmac::<Sha256>::new_from_slice(&self.peer).expect("any key length");
        for p in [path.as_bytes(), authorization, at.as_bytes()] {
            m.update(&(p.len() as u64).to_be_bytes());
            m.update(p);
        }
        m.verify_slice(&tag).is_ok()
    }
}

/// Whether a request carries a valid forwarding proof from a peer node.
pub fn forwarded_by_peer(secrets: &Secrets, meta: &tonic::metadata::MetadataMap, path: &str) -> bool {
    let (Some(mark), Some(auth)) = (meta.get(FORWARDED), meta.get("authorization")) else { return false };
    mark.to_str().is_ok_and(|m| secrets.verify_peer_mark(m, path, auth.as_bytes()))
}

/// Loads (or, the first time, creates) one sealed secret; a value sealed
/// under a key-encryption key being rotated out is sealed again.
async fn load_one(sys: &SystemStore, sealer: &crate::sealing::Sealer, name: &str) -> Result<[u8; 32], StoreError> {
    let rel = format!("secrets/{name}");
    let key = sys.key(&rel);
    let bad = |e: &dyn std::fmt::Display| StoreError::Backend(format!("deployment secret {name}: {e}"));
    for _ in 0..3 {
        if let Some(kv) = sys.get(&rel).await? {
            let sealed = String::from_utf8_lossy(&kv.value).into_owned();
            let (value, stale) = sealer.open_current(&key, &sealed).map_err(|e| bad(&e))?;
            let secret: [u8; 32] = value.try_into().map_err(|_| bad(&"not 32 bytes"))?;
            if stale {
                let txn = Txn::new()
                    .when(Compare::ModRevision(key.clone(), kv.mod_revision))
                    .then(Op::put(key.clone(), sealer.seal(&key, &secret)));
                sys.txn(txn).await?;
            }
            return Ok(secret);
        }
        let fresh: [u8; 32] = rand::random();
        // Nodes starting together agree on one secret: the first write wins.
        sys.txn(Txn::new().when(Compare::Absent(key.clone())).then(Op::put(key.clone(), sealer.seal(&key, &fresh))))
            .await?;
    }
    Err(StoreError::Backend(format!("deployment secret {name} did not settle")))
}

/// The node's secrets, loaded once.
#[derive(Debug, Default)]
pub struct SecretsCell(OnceCell<Secrets>);

impl SecretsCell {
    pub async fn get(&self, sys: &SystemStore, sealer: &crate::sealing::Sealer) -> Result<&Secrets, StoreError> {
        self.0
            .get_or_try_init(|| async {
                Ok(Secrets {
                    peer: load_one(sys, sealer, "peer").await?,
                    pseudonym: load_one(sys, sealer, "pseudonym").await?,
                })
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_marks_bind_path_credential_and_time() {
        let s = Secrets { peer: [1; 32], pseudonym: [2; 32] };
        let mark = s.peer_mark("/spine.calls.v1.Calls/Signal", b"Bearer x");
        assert!(s.verify_peer_mark(&mark, "/spine.calls.v1.Calls/Signal", b"Bearer x"));
        assert!(!s.verify_peer_mark(&mark, "/spine.calls.v1.Calls/Answer", b"Bearer x"));
        assert!(!s.verify_peer_mark(&mark, "/spine.calls.v1.Calls/Signal", b"Bearer y"));
        let other = Secrets { peer: [3; 32], pseudonym: [2; 32] };
        assert!(!other.verify_peer_mark(&mark, "/spine.calls.v1.Calls/Signal", b"Bearer x"));
        for forged in ["1", "", "x.y", &format!("{}.00", crate::now_secs())] {
            assert!(!s.verify_peer_mark(forged, "/spine.calls.v1.Calls/Signal", b"Bearer x"));
        }
        let (at, tag) = mark.split_once('.').unwrap();
        let stale = format!("{}.{tag}", at.parse::<i64>().unwrap() - 60);
        assert!(!s.verify_peer_mark(&stale, "/spine.calls.v1.Calls/Signal", b"Bearer x"));
        assert_eq!(s.pseudonym("block", &["a", "b"]), s.pseudonym("block", &["a", "b"]));
        assert_ne!(s.pseudonym("block", &["a", "b"]), s.pseudonym("pair", &["a", "b"]));
        assert_ne!(s.pseudonym("block", &["ab", ""]), s.pseudonym("block", &["a", "b"]));
    }
}
