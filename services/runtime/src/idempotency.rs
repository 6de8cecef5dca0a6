//! Idempotent creates: the answer to a write that carried a `request_id`
//! is kept (about a day, under a shared lease) with a fingerprint of the
//! request, so a retry gets the same answer and a reuse of the key for a
//! different request is refused.
//!
//! Answers must never hold a secret: a create that returns one (a
//! credential) records its answer with the secret blanked, and a retry
//! answers without it.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use prost::Message;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{KeyValue, LeaseId, Op};

/// How long answers are kept (the shared lease adds up to an hour).
pub const TTL_SECS: u64 = 24 * 3600;

/// A stored answer to an idempotent write.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdemRec {
    /// Hex SHA-256 of the encoded request.
    pub fingerprint: String,
    /// Base64 of the encoded response.
    pub response: String,
    pub created_at: i64,
}

/// Why a stored answer could not be replayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdemError {
    /// The key answered a different request.
    #[error("request_id was already used for a different request")]
    Reused,
    /// The stored answer does not parse: our bug.
    #[error("stored idempotency answer: {0}")]
    Corrupt(String),
}

/// Fingerprint of a request, to tell a retry from a reuse of its key.
pub fn fingerprint<M: Message>(m: &M) -> String {
    hex::encode(Sha256::digest(m.encode_to_vec()))
}

/// The stored answer for an idempotency key: `None` if the key is new, the
/// answer if this is a retry of the same request, an error if the key was
/// used for a different request.
pub fn replay<R: Message + Default>(kv: Option<KeyValue>, fp: &str) -> Result<Option<R>, IdemError> {
    let Some(kv) = kv else { return Ok(None) };
    let rec: IdemRec = serde_json::from_slice(&kv.value).map_err(|e| IdemError::Corrupt(e.to_string()))?;
    if rec.fingerprint != fp {
        return Err(IdemError::Reused);
    }
    let bytes = B64.decode(rec.response).map_err(|e| IdemError::Corrupt(e.to_string()))?;
    R::decode(bytes.as_slice()).map(Some).map_err(|e| IdemError::Corrupt(e.to_string()))
}

/// The write that records `resp` (which must hold no secret) under an
/// idempotency key (`abs_key`), attached to `lease`.
pub fn record<R: Message>(abs_key: crate::store::Key, fp: &str, resp: &R, lease: LeaseId) -> Op {
    let rec = IdemRec {
        fingerprint: fp.to_string(),
        response: B64.encode(resp.encode_to_vec()),
        created_at: crate::now_secs(),
    };
    Op::put_leased(abs_key, serde_json::to_vec(&rec).expect("records serialize"), lease)
}

/// The shared lease idempotency answers live under: one lease per node per
/// hour, each lasting [`TTL_SECS`] plus an hour.
pub fn lease(store: std::sync::Arc<dyn crate::store::Store>) -> crate::store::SharedLease {
    crate::store::SharedLease::new(
        store,
        std::time::Duration::from_secs(TTL_SECS + 3600),
        std::time::Duration::from_secs(3600),
    )
}
