//! Every node's in-memory mirror of `/spine/sys/auth/`: published
//! verification keys, revoked devices, tenant and operator credential hashes.
//! It verifies every credential locally, with no store round trip.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::VerifyingKey;
use futures::StreamExt;
use sha2::Digest;
use tokio::sync::watch;

use super::records::{self, MediaNodeCredential, OperatorCredential, PublishedKey, TenantCredential};
use super::token::{self, TokenError};
use super::{Principal, Scope};
use crate::ids::{self, Kind, TenantId};
use crate::store::{EventKind, Store, SystemStore};

/// Why a credential was refused. Clients see only UNAUTHENTICATED.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing credentials")]
    Missing,
    #[error("malformed credentials")]
    Malformed,
    #[error("unknown credential")]
    Unknown,
    #[error("wrong secret")]
    WrongSecret,
    #[error("device revoked")]
    Revoked,
    #[error(transparent)]
    Token(#[from] TokenError),
}

impl AuthError {
    /// Stable label for metrics.
    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed | AuthError::Token(TokenError::Malformed) => "malformed",
            AuthError::Unknown | AuthError::Token(TokenError::UnknownKey) => "unknown",
            AuthError::WrongSecret | AuthError::Token(TokenError::BadSignature) => "bad_secret",
            AuthError::Revoked => "revoked",
            AuthError::Token(TokenError::Expired) => "expired",
            AuthError::Token(TokenError::NotYetValid) => "not_yet_valid",
        }
    }
}

#[derive(Default)]
struct Mirror {
    keys: HashMap<String, VerifyingKey>,
    /// Revoked devices: device id -> the tenants it is revoked in (looked
    /// up without building a key: every open stream is checked each second).
    revoked: HashMap<String, HashSet<String>>,
    tenant_creds: HashMap<String, TenantCredential>,
    operators: HashMap<String, OperatorCredential>,
    media_creds: HashMap<String, MediaNodeCredential>,
}

impl Mirror {
    fn is_revoked(&self, tenant: &str, device: &str) -> bool {
        self.revoked.get(device).is_some_and(|tenants| tenants.contains(tenant))
    }

    fn apply(&mut self, rel: &str, value: Option<&[u8]>) {
        if let Some(kid) = rel.strip_prefix(records::KEYS) {
            let key = value
                .and_then(|v| serde_json::from_slice::<PublishedKey>(v).ok())
                .and_then(|k| B64.decode(k.public_key).ok())
                .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
                .and_then(|b| VerifyingKey::from_bytes(&b).ok());
            match key {
                Some(k) => self.keys.insert(kid.to_string(), k),
                None => self.keys.remove(kid),
            };
        } else if let Some(rest) = rel.strip_prefix(records::REVOKED) {
            if let Some((t, d)) = rest.split_once('/') {
                if value.is_some() {
                    self.revoked.entry(d.to_string()).or_default().insert(t.to_string());
                } else if let Some(tenants) = self.revoked.get_mut(d) {
                    tenants.remove(t);
                    if tenants.is_empty() {
                        self.revoked.remove(d);
                    }
                }
            }
        } else if let Some(id) = rel.strip_prefix(records::TENANT_CREDS) {
            match value.and_then(|v| serde_json::from_slice(v).ok()) {
                Some(c) => self.tenant_creds.insert(id.to_string(), c),
                None => self.tenant_creds.remove(id),
            };
        } else if let Some(id) = rel.strip_prefix(records::OPERATORS) {
            match value.and_then(|v| serde_json::from_slice(v).ok()) {
                Some(c) => self.operators.insert(id.to_string(), c),
                None => self.operators.remove(id),
            };
        } else if let Some(id) = rel.strip_prefix(records::MEDIA_CREDS) {
            match value.and_then(|v| serde_json::from_slice(v).ok()) {
                Some(c) => self.media_creds.insert(id.to_string(), c),
                None => self.media_creds.remove(id),
            };
        }
    }
}

/// The auth mirror. Share it as `Arc<AuthRing>`.
pub struct AuthRing {
    sys: SystemStore,
    mirror: RwLock<Mirror>,
    synced: watch::Sender<bool>,
    /// Device tokens whose signature this node has verified, by SHA-256 of
    /// the token (the token itself is not kept): (key id, key, claims).
    /// Expiry, the key still being published and revocation are checked on
    /// every request; only the Ed25519 verification is saved.
    verified: std::sync::Mutex<HashMap<[u8; 32], (String, VerifyingKey, token::Claims)>>,
    /// Longest lifetime a device token may have (`auth.max_token_ttl_secs`):
    /// a token claiming more lives only this long from its `iat`.
    max_token_ttl: i64,
    /// Bumped whenever a device is revoked or a signing key withdrawn, so
    /// long-lived streams re-check their credential at once.
    revocations: watch::Sender<u64>,
    /// Signing key ids recently looked up in the store and not found: an
    /// unauthenticated request naming a made-up key id costs one store read
    /// per id and minute at most.
    missing_keys: std::sync::Mutex<HashMap<String, std::time::Instant>>,
    /// Store look-ups of key ids the mirror lacks, node-wide: a token
    /// bucket, so unauthenticated requests naming ever new made-up ids cost
    /// at most this many reads a second.
    lookups: std::sync::Mutex<(f64, std::time::Instant)>,
}

/// Key look-ups a node makes at most per second (and in a burst).
const KEY_LOOKUPS_PER_SEC: f64 = 20.0;
const KEY_LOOKUPS_BURST: f64 = 50.0;

/// How long a key id found missing in the store is not looked up again.
const MISSING_KEY_TTL: Duration = Duration::from_secs(60);
/// Most missing key ids remembered; past it the memory starts afresh.
const MISSING_KEYS: usize = 16_384;

/// The status a long-lived stream ends with when its credential no longer
/// holds: UNAUTHENTICATED, reason `TOKEN_EXPIRED` (reconnect with a fresh
/// token) or `CREDENTIAL_REVOKED`, the same for every stream of every
/// service.
pub fn stream_ended(expired: bool) -> tonic::Status {
    if expired {
        crate::error::with_reason(
            tonic::Code::Unauthenticated,
            "token expired: reconnect with a fresh token",
            "TOKEN_EXPIRED",
        )
    } else {
        crate::error::with_reason(tonic::Code::Unauthenticated, "invalid credentials", "CREDENTIAL_REVOKED")
    }
}

/// Most verified tokens remembered; past it the memory starts afresh.
const VERIFIED_CACHE: usize = 65_536;

impl std::fmt::Debug for AuthRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthRing")
    }
}

impl AuthRing {
    /// A ring over `store`, accepting device tokens for at most
    /// `max_token_ttl` seconds from their issue; call [`AuthRing::start`] to
    /// fill and follow it.
    pub fn new(store: Arc<dyn Store>, max_token_ttl: i64) -> Arc<Self> {
        Arc::new(Self {
            sys: SystemStore::new(store),
            mirror: RwLock::new(Mirror::default()),
            synced: watch::channel(false).0,
            verified: std::sync::Mutex::new(HashMap::new()),
            max_token_ttl,
            revocations: watch::channel(0).0,
            missing_keys: std::sync::Mutex::new(HashMap::new()),
            lookups: std::sync::Mutex::new((KEY_LOOKUPS_BURST, std::time::Instant::now())),
        })
    }

    /// Starts mirroring: a full read, then a watch; on any watch failure it
    /// reads again. Runs until the ring is dropped.
    pub fn start(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(ring) = weak.upgrade() else { return };
                if let Err(e) = ring.sync_once().await {
                    tracing::warn!(error = %e, "auth mirror lost its watch; resyncing");
                }
                drop(ring);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    }

    async fn sync_once(self: &Arc<Self>) -> Result<(), crate::store::StoreError> {
        let store = self.sys.store().clone();
        let rev = store.revision().await?;
        let kvs = self.sys.range_all(records::AUTH_PREFIX).await?;
        let mut fresh = Mirror::default();
        for kv in &kvs {
            fresh.apply(self.sys.relative(&kv.key), Some(&kv.value));
        }
        let mut events = store.watch(&self.sys.key(records::AUTH_PREFIX), rev + 1).await?;
        *self.mirror.write().expect("auth mirror lock") = fresh;
        self.synced.send_replace(true);
        let weak = Arc::downgrade(self);
        drop(kvs);
        while let Some(ev) = events.next().await {
            let ev = ev?;
            let Some(ring) = weak.upgrade() else { return Ok(()) };
            let value = (ev.kind == EventKind::Put).then_some(ev.value.as_slice());
            ring.observe(ring.sys.relative(&ev.key), value);
        }
        Err(crate::store::StoreError::Unavailable("watch ended".into()))
    }

    /// Waits until the first full read has completed.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.subscribe();
        // The sender lives as long as self.
        let _ = rx.wait_for(|s| *s).await;
    }

    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Applies a write the local node just made, so it takes effect here at
    /// once rather than when the watch delivers it. `rel` is relative to
    /// `/spine/sys/`; `None` is a delete.
    pub fn observe(&self, rel: &str, value: Option<&[u8]>) {
        self.mirror.write().expect("auth mirror lock").apply(rel, value);
        let revoking = (rel.starts_with(records::REVOKED) && value.is_some())
            || (rel.starts_with(records::KEYS) && value.is_none());
        if revoking {
            self.revocations.send_modify(|g| *g += 1);
        }
    }

    /// Whether a device's credential still holds at `now`: not expired, the
    /// device not revoked, its token's signing key still published. `Err`
    /// says why not (see [`stream_ended`]).
    pub fn still_valid(&self, principal: &Principal, now: i64) -> Result<(), tonic::Status> {
        let Principal::Device { tenant, device_id, expires_at, key_id, .. } = principal else { return Ok(()) };
        if *expires_at <= now {
            return Err(stream_ended(true));
        }
        let mirror = self.mirror.read().expect("auth mirror lock");
        if mirror.is_revoked(tenant.as_str(), device_id) || !mirror.keys.contains_key(key_id) {
            return Err(stream_ended(false));
        }
        Ok(())
    }

    /// Resolves, with the status to end a stream with, when the caller's
    /// credential stops holding: its token expires, its device is revoked
    /// (or its account deleted), or the key that signed its token is
    /// withdrawn. Every long-lived stream of every service ends this way.
    /// Never resolves for credentials that are not device tokens.
    pub async fn stream_end(&self, principal: &Principal) -> tonic::Status {
        let Principal::Device { expires_at, .. } = principal else { return std::future::pending().await };
        let mut changes = self.revocations.subscribe();
        loop {
            if let Err(status) = self.still_valid(principal, crate::now_secs()) {
                return status;
            }
            let until_expiry = (*expires_at - crate::now_secs()).max(0) as u64;
            tokio::select! {
                _ = changes.changed() => {}
                // Whole seconds: wake just after the expiry second.
                _ = tokio::time::sleep(Duration::from_millis(until_expiry * 1000 + 50)) => {}
            }
        }
    }

    /// Whether a device's tokens are revoked (the device was revoked or its
    /// account deleted), for long-lived streams that authenticated earlier.
    pub fn is_revoked(&self, tenant: &str, device: &str) -> bool {
        self.mirror.read().expect("auth mirror lock").is_revoked(tenant, device)
    }

    /// Reads the signing key a device token names from the store into the
    /// mirror, for a key published so recently that the watch has not
    /// brought it yet. True if the key exists.
    pub async fn fetch_key(&self, bearer: &str) -> bool {
        let Ok(kid) = token::key_id(bearer) else { return false };
        if ids::parse(Kind::SigningKey, kid).is_none() {
            return false;
        }
        {
            let missing = self.missing_keys.lock().expect("missing keys lock");
            if missing.get(kid).is_some_and(|at| at.elapsed() < MISSING_KEY_TTL) {
                return false;
            }
        }
        {
            let mut bucket = self.lookups.lock().expect("key lookups lock");
            let (tokens, at) = &mut *bucket;
            *tokens = (*tokens + at.elapsed().as_secs_f64() * KEY_LOOKUPS_PER_SEC).min(KEY_LOOKUPS_BURST);
            *at = std::time::Instant::now();
            if *tokens < 1.0 {
                return false;
            }
            *tokens -= 1.0;
        }
        let rel = format!("{}{kid}", records::KEYS);
        match self.sys.get(&rel).await {
            Ok(Some(kv)) => {
                self.observe(&rel, Some(&kv.value));
                true
            }
            Ok(None) => {
                let mut missing = self.missing_keys.lock().expect("missing keys lock");
                if missing.len() >= MISSING_KEYS {
                    missing.clear();
                }
                missing.insert(kid.to_string(), std::time::Instant::now());
                false
            }
            Err(_) => false,
        }
    }

    /// Turns a bearer credential into a principal.
    pub fn authenticate(&self, bearer: &str, now: i64) -> Result<Principal, AuthError> {
        let mirror = self.mirror.read().expect("auth mirror lock");
        if bearer.starts_with(token::PREFIX) {
            let kid = token::key_id(bearer)?;
            let key = mirror.keys.get(kid).ok_or(TokenError::UnknownKey)?;
            let digest: [u8; 32] = sha2::Sha256::digest(bearer.as_bytes()).into();
            let cached = self
                .verified
                .lock()
                .expect("verified tokens lock")
                .get(&digest)
                .filter(|(k, vk, _)| k == kid && vk == key)
                .map(|(_, _, c)| c.clone());
            let c = match cached {
                Some(c) if c.exp > now => c,
                Some(_) => return Err(TokenError::Expired.into()),
                None => {
                    let mut c = token::verify(bearer, key, now)?;
                    // The token's own `exp` is trusted only up to the
                    // configured longest lifetime.
                    c.exp = c.exp.min(c.iat.saturating_add(self.max_token_ttl));
                    if c.exp <= now {
                        return Err(TokenError::Expired.into());
                    }
                    let mut v = self.verified.lock().expect("verified tokens lock");
                    if v.len() >= VERIFIED_CACHE {
                        v.clear();
                    }
                    v.insert(digest, (kid.to_string(), *key, c.clone()));
                    c
                }
            };
            let tenant = TenantId::parse(&c.t).ok_or(AuthError::Malformed)?;
            if ids::parse(Kind::Account, &c.a).is_none() || ids::parse(Kind::Device, &c.d).is_none() {
                return Err(AuthError::Malformed);
            }
            if mirror.is_revoked(&c.t, &c.d) {
                return Err(AuthError::Revoked);
            }
            let scopes = c.s.iter().map(|s| Scope::parse(s).ok_or(AuthError::Malformed)).collect::<Result<_, _>>()?;
            return Ok(Principal::Device {
                tenant,
                account_id: c.a,
                device_id: c.d,
                scopes,
                expires_at: c.exp,
                key_id: kid.to_string(),
            });
        }
        let (id, secret) = bearer.split_once('.').ok_or(AuthError::Malformed)?;
        if ids::parse(Kind::TenantCredential, id).is_some() {
            let cred = mirror.tenant_creds.get(id).ok_or(AuthError::Unknown)?;
            if !records::hashes_equal(&records::hash_secret(secret), &cred.secret_sha256) {
                return Err(AuthError::WrongSecret);
            }
            let tenant = TenantId::parse(&cred.tenant_id).ok_or(AuthError::Malformed)?;
            Ok(Principal::TenantServer { tenant, credential_id: id.to_string() })
        } else if ids::parse(Kind::Operator, id).is_some() {
            let cred = mirror.operators.get(id).ok_or(AuthError::Unknown)?;
            if !records::hashes_equal(&records::hash_secret(secret), &cred.secret_sha256) {
                return Err(AuthError::WrongSecret);
            }
            Ok(Principal::Operator { operator_id: id.to_string() })
        } else if ids::parse(Kind::MediaCredential, id).is_some() {
            let cred = mirror.media_creds.get(id).ok_or(AuthError::Unknown)?;
            if !records::hashes_equal(&records::hash_secret(secret), &cred.secret_sha256) {
                return Err(AuthError::WrongSecret);
            }
            Ok(Principal::MediaNode { node_id: cred.node_id.clone(), credential_id: id.to_string() })
        } else {
            Err(AuthError::Malformed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EmbeddedStore;

    /// The memory of verified tokens saves only the signature check: expiry,
    /// a withdrawn key and a revoked device still refuse a token it holds.
    #[tokio::test]
    async fn remembered_tokens_are_still_checked() {
        let ring = AuthRing::new(Arc::new(EmbeddedStore::in_memory()), 3600);
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let published = |k: &ed25519_dalek::SigningKey| {
            serde_json::to_vec(&PublishedKey {
                public_key: B64.encode(k.verifying_key().to_bytes()),
                created_at: 0,
                activates_at: 0,
                retires_at: None,
            })
            .unwrap()
        };
        ring.observe(&format!("{}sk_1", records::KEYS), Some(&published(&key)));
        let (t, a, d) = (ids::new(Kind::Tenant), ids::new(Kind::Account), ids::new(Kind::Device));
        let claims = token::Claims { t: t.clone(), a, d: d.clone(), s: vec![], iat: 1000, exp: 1100 };
        let tok = token::sign("sk_1", &key, &claims);
        assert!(ring.authenticate(&tok, 1000).is_ok());
        assert!(ring.authenticate(&tok, 1050).is_ok()); // remembered
        assert!(matches!(ring.authenticate(&tok, 1100), Err(AuthError::Token(TokenError::Expired))));
        // Another key published under the same id: the memory does not apply.
        let other = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        ring.observe(&format!("{}sk_1", records::KEYS), Some(&published(&other)));
        assert!(matches!(ring.authenticate(&tok, 1050), Err(AuthError::Token(TokenError::BadSignature))));
        ring.observe(&format!("{}sk_1", records::KEYS), Some(&published(&key)));
        assert!(ring.authenticate(&tok, 1050).is_ok());
        ring.observe(&format!("{}{t}/{d}", records::REVOKED), Some(b"{}"));
        assert!(matches!(ring.authenticate(&tok, 1050), Err(AuthError::Revoked)));
        ring.observe(&format!("{}sk_1", records::KEYS), None);
        assert!(matches!(ring.authenticate(&tok, 1050), Err(AuthError::Token(TokenError::UnknownKey))));
    }

    /// A token claiming a longer life than the configured maximum lives only
    /// the maximum from its issue.
    #[tokio::test]
    async fn token_lifetimes_are_capped_by_the_verifier() {
        let ring = AuthRing::new(Arc::new(EmbeddedStore::in_memory()), 600);
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let published = PublishedKey {
            public_key: B64.encode(key.verifying_key().to_bytes()),
            created_at: 0,
            activates_at: 0,
            retires_at: None,
        };
        ring.observe(&format!("{}sk_1", records::KEYS), Some(&serde_json::to_vec(&published).unwrap()));
        let claims = token::Claims {
            t: ids::new(Kind::Tenant),
            a: ids::new(Kind::Account),
            d: ids::new(Kind::Device),
            s: vec![],
            iat: 1000,
            exp: 1000 + 86_400 * 365,
        };
        let tok = token::sign("sk_1", &key, &claims);
        match ring.authenticate(&tok, 1100).unwrap() {
            Principal::Device { expires_at, .. } => assert_eq!(expires_at, 1600),
            other => panic!("{other:?}"),
        }
        assert!(matches!(ring.authenticate(&tok, 1600), Err(AuthError::Token(TokenError::Expired))));
        // Remembered or not, the cap holds.
        let fresh = AuthRing::new(Arc::new(EmbeddedStore::in_memory()), 600);
        fresh.observe(&format!("{}sk_1", records::KEYS), Some(&serde_json::to_vec(&published).unwrap()));
        assert!(matches!(fresh.authenticate(&tok, 5000), Err(AuthError::Token(TokenError::Expired))));
    }

    /// A key in the store that the mirror has not seen yet (published a
    /// moment ago by another node) is read on demand; an unknown one is not.
    #[tokio::test]
    async fn a_key_not_mirrored_yet_is_fetched() {
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::in_memory());
        let ring = AuthRing::new(store.clone(), 3600);
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let kid = ids::new(Kind::SigningKey);
        let published = PublishedKey {
            public_key: B64.encode(key.verifying_key().to_bytes()),
            created_at: 0,
            activates_at: 0,
            retires_at: None,
        };
        store
            .put(
                &crate::store::Key::new(format!("/spine/sys/{}{kid}", records::KEYS)),
                serde_json::to_vec(&published).unwrap(),
            )
            .await
            .unwrap();
        let claims = token::Claims {
            t: ids::new(Kind::Tenant),
            a: ids::new(Kind::Account),
            d: ids::new(Kind::Device),
            s: vec![],
            iat: 1000,
            exp: 1100,
        };
        let tok = token::sign(&kid, &key, &claims);
        assert!(matches!(ring.authenticate(&tok, 1000), Err(AuthError::Token(TokenError::UnknownKey))));
        assert!(ring.fetch_key(&tok).await);
        assert!(ring.authenticate(&tok, 1000).is_ok());
        let stranger = token::sign(&ids::new(Kind::SigningKey), &key, &claims);
        assert!(!ring.fetch_key(&stranger).await);
    }
}
