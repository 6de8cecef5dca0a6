//! Device-token signing keys: creation, rotation without downtime, retirement.
//!
//! A key's public half is published under `/spine/sys/auth/keys/<kid>` (every
//! node verifies with it); its private half lives under
//! `/spine/sys/signing/<kid>` (read only by identity). Rotation publishes a
//! new key that starts signing only after `key_activation_delay_secs`, so
//! every node has it before any token it signed arrives; older keys are
//! withdrawn once every token they signed has expired.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::SigningKey;
use spine_runtime::auth::AuthRing;
use spine_runtime::auth::records::{self, PublishedKey, SigningSecret};
use spine_runtime::auth::token::CLOCK_SKEW_SECS;
use spine_runtime::config::AuthConfig;
use spine_runtime::ids::{self, Kind};
use spine_runtime::now_secs;
use spine_runtime::store::{Compare, Op, SystemStore, Txn};

use crate::error::{IdentityError, Result};

/// How long a node trusts its cached view of the keys.
const CACHE_FOR: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct Key {
    id: String,
    published: PublishedKey,
    secret: Option<SigningKey>,
}

/// The token signer of one identity node.
pub struct Signer {
    sys: SystemStore,
    ring: Arc<AuthRing>,
    sealer: spine_runtime::sealing::Sealer,
    cfg: AuthConfig,
    cache: Mutex<Option<(Instant, Vec<Key>)>>,
}

impl Signer {
    pub fn new(sys: SystemStore, ring: Arc<AuthRing>, sealer: spine_runtime::sealing::Sealer, cfg: AuthConfig) -> Self {
        Self { sys, ring, sealer, cfg, cache: Mutex::new(None) }
    }

    async fn load(&self, fresh: bool) -> Result<Vec<Key>> {
        if !fresh
            && let Some((at, keys)) = &*self.cache.lock().expect("signer cache")
            && at.elapsed() < CACHE_FOR
        {
            return Ok(keys.clone());
        }
        let published = self.sys.range_all(records::KEYS).await?;
        let secrets = self.sys.range_all(records::SIGNING).await?;
        let mut keys = Vec::new();
        let mut stale = Vec::new();
        for kv in published {
            let id = self.sys.relative(&kv.key).trim_start_matches(records::KEYS).to_string();
            let published: PublishedKey =
                serde_json::from_slice(&kv.value).map_err(|e| IdentityError::Internal(format!("key {id}: {e}")))?;
            // A secret that does not open (another key-encryption key, or
            // plain where sealing is on) is unusable: the key only verifies,
            // and a usable key is created when none is left.
            let secret = secrets
                .iter()
                .find(|s| self.sys.relative(&s.key).trim_start_matches(records::SIGNING) == id)
                .and_then(|s| {
                    let sealed = serde_json::from_slice::<SigningSecret>(&s.value).ok()?;
                    match self.sealer.open_current(&s.key, &sealed.seed) {
                        Ok((seed, is_stale)) => {
                            if is_stale {
                                stale.push((s.clone(), seed.clone()));
                            }
                            Some(seed)
                        }
                        Err(e) => {
                            tracing::warn!(key_id = %id, error = %e, "signing key unusable");
                            None
                        }
                    }
                })
                .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
                .map(|seed| SigningKey::from_bytes(&seed));
            keys.push(Key { id, published, secret });
        }
        keys.sort_by(|a, b| (a.published.activates_at, &a.id).cmp(&(b.published.activates_at, &b.id)));
        // Sealed under a key-encryption key being rotated out: seal again
        // under the current one (compare-and-swap: another node may do it
        // at the same time).
        for (kv, seed) in stale {
            let resealed = SigningSecret { seed: self.sealer.seal(&kv.key, &seed) };
            self.sys
                .txn(
                    Txn::new()
                        .when(Compare::ModRevision(kv.stored_key(), kv.mod_revision))
                        .then(Op::put(kv.stored_key(), json(&resealed))),
                )
                .await?;
            tracing::info!("a signing key was sealed again under the current key-encryption key");
        }
        *self.cache.lock().expect("signer cache") = Some((Instant::now(), keys.clone()));
        Ok(keys)
    }

    /// Longest a token can outlive the key that signed it.
    fn retirement_after_secs(&self) -> i64 {
        i64::from(self.cfg.max_token_ttl_secs) + CLOCK_SKEW_SECS
    }

    /// The key to sign with now, creating the first key if there is none.
    pub async fn current(&self) -> Result<(String, SigningKey)> {
        for fresh in [false, true] {
            let now = now_secs();
            let keys = self.load(fresh).await?;
            // The newest active key: a rotation's successor is the one key
            // without a retirement date (activation times can tie within a
            // second, so they alone cannot order keys).
            let usable = keys
                .iter()
                .filter(|k| {
                    k.secret.is_some()
                        && k.published.activates_at <= now
                        && k.published.retires_at.is_none_or(|r| r > now)
                })
                .max_by_key(|k| (k.published.retires_at.is_none(), k.published.activates_at, k.published.created_at));
            if let Some(k) = usable {
                return Ok((k.id.clone(), k.secret.clone().expect("filtered on secret")));
            }
        }
        // No usable key at all: the very first one starts signing at once.
        // A node that gets one of its tokens before its watch brings the key
        // reads the key from the store (see `AuthRing::fetch_key`).
        let (id, secret, _) = self.create(0).await?;
        Ok((id, secret))
    }

    async fn create(&self, delay_secs: i64) -> Result<(String, SigningKey, PublishedKey)> {
        let now = now_secs();
        let secret = SigningKey::generate(&mut rand::rngs::OsRng);
        let id = ids::new(Kind::SigningKey);
        let published = PublishedKey {
            public_key: B64.encode(secret.verifying_key().to_bytes()),
            created_at: now,
            activates_at: now + delay_secs,
            retires_at: None,
        };
        let secret_key = self.sys.key(&format!("{}{id}", records::SIGNING));
        let sealed = SigningSecret { seed: self.sealer.seal(&secret_key, &secret.to_bytes()) };
        let mut txn = Txn::new()
            .then(Op::put(self.sys.key(&format!("{}{id}", records::KEYS)), json(&published)))
            .then(Op::put(secret_key, json(&sealed)));
        let mut retiring = Vec::new();
        for k in self.load(true).await? {
            if k.published.retires_at.is_none() {
                let mut p = k.published.clone();
                p.retires_at = Some(published.activates_at + self.retirement_after_secs());
                txn = txn.then(Op::put(self.sys.key(&format!("{}{}", records::KEYS, k.id)), json(&p)));
                retiring.push((k.id, p));
            }
        }
        self.sys.txn(txn).await?;
        // Take effect on this node at once; other nodes learn by watch.
        self.ring.observe(&format!("{}{id}", records::KEYS), Some(&json(&published)));
        for (kid, p) in retiring {
            self.ring.observe(&format!("{}{kid}", records::KEYS), Some(&json(&p)));
        }
        *self.cache.lock().expect("signer cache") = None;
        Ok((id, secret, published))
    }

    /// Starts a rotation: see the module docs.
    pub async fn rotate(&self) -> Result<(String, PublishedKey)> {
        let (id, _, published) = self.create(i64::from(self.cfg.key_activation_delay_secs)).await?;
        tracing::info!(key_id = %id, activates_at = published.activates_at, "signing key rotation started");
        Ok((id, published))
    }

    /// Published keys, oldest first.
    pub async fn list(&self) -> Result<Vec<(String, PublishedKey)>> {
        Ok(self.load(true).await?.into_iter().map(|k| (k.id, k.published)).collect())
    }

    /// Withdraws a key at once (a leak): every node stops accepting its
    /// tokens at watch latency, and if it was the key signing now, a new
    /// key signs from now on. `false` if no such key is published.
    pub async fn revoke(&self, kid: &str) -> Result<bool> {
        let keys = self.load(true).await?;
        let Some(k) = keys.iter().find(|k| k.id == kid) else { return Ok(false) };
        let pkey = self.sys.key(&format!("{}{kid}", records::KEYS));
        self.sys
            .txn(
                Txn::new()
                    .when(Compare::Present(pkey.clone()))
                    .then(Op::delete(pkey))
                    .then(Op::delete(self.sys.key(&format!("{}{kid}", records::SIGNING)))),
            )
            .await?;
        self.ring.observe(&format!("{}{kid}", records::KEYS), None);
        *self.cache.lock().expect("signer cache") = None;
        tracing::warn!(key_id = %kid, "signing key revoked");
        // The revoked key was the one signing (or about to): a fresh key
        // signs at once; the others keep verifying until they retire.
        if k.published.retires_at.is_none() {
            self.create(0).await?;
        }
        Ok(true)
    }

    /// Withdraws keys whose every token has expired.
    pub async fn sweep(&self) -> Result<usize> {
        let now = now_secs();
        let mut removed = 0;
        for k in self.load(true).await? {
            if k.published.retires_at.is_some_and(|r| r <= now) {
                self.sys
                    .txn(
                        Txn::new()
                            .then(Op::delete(self.sys.key(&format!("{}{}", records::KEYS, k.id))))
                            .then(Op::delete(self.sys.key(&format!("{}{}", records::SIGNING, k.id)))),
                    )
                    .await?;
                self.ring.observe(&format!("{}{}", records::KEYS, k.id), None);
                removed += 1;
            }
        }
        if removed > 0 {
            *self.cache.lock().expect("signer cache") = None;
        }
        Ok(removed)
    }
}

pub(crate) fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}
