//! Rate limits: token buckets per account and per tenant, for each kind of
//! work a device can make a node do (group messages and their bytes,
//! commits, key-package uploads and claims, call starts, signalling).
//!
//! Limits are per node (a node keeps its buckets in memory): behind a load
//! balancer spreading a device's requests over `n` nodes, a device gets at
//! most `n` times its limit. A refused request gets RESOURCE_EXHAUSTED with
//! reason `RATE_LIMITED`, the limit's name and a retry delay (ErrorInfo
//! metadata `limit` and `retry_after_ms`, and a `google.rpc.RetryInfo`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tonic_types::{ErrorDetails, StatusExt};

/// One token bucket's shape: `per_second` refills, at most `burst` saved.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

impl Rate {
    pub const fn new(per_second: f64, burst: f64) -> Self {
        Self { per_second, burst }
    }
}

/// The limits of one kind of work: per account, and per tenant (all its
/// accounts together).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    pub account: Rate,
    pub tenant: Rate,
}

impl Limit {
    const fn new(account: Rate, tenant: Rate) -> Self {
        Self { account, tenant }
    }
}

/// Every rate limit (config section `limits.rates`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RatesConfig {
    /// Group application messages (`SendApplication`).
    pub group_messages: Limit,
    /// Bytes of group application messages.
    pub group_message_bytes: Limit,
    /// Commits (`SendCommit`, `CreateGroup`).
    pub commits: Limit,
    /// Key-package uploads (`UploadKeyPackages` calls).
    pub key_package_uploads: Limit,
    /// Key-package claims: one per target of a `ClaimKeyPackages`.
    pub key_package_claims: Limit,
    /// Call starts (`StartCall`, `StartGroupCall`).
    pub call_starts: Limit,
    /// Signalling payloads (`Signal`, on the stream or unary).
    pub signals: Limit,
    /// Disputes reported (`ReportDispute`).
    pub disputes: Limit,
}

impl Default for RatesConfig {
    fn default() -> Self {
        Self {
            group_messages: Limit::new(Rate::new(20.0, 100.0), Rate::new(2000.0, 10_000.0)),
            group_message_bytes: Limit::new(
                Rate::new(1024.0 * 1024.0, 4.0 * 1024.0 * 1024.0),
                Rate::new(64.0 * 1024.0 * 1024.0, 256.0 * 1024.0 * 1024.0),
            ),
            commits: Limit::new(Rate::new(5.0, 30.0), Rate::new(500.0, 2000.0)),
            key_package_uploads: Limit::new(Rate::new(1.0, 10.0), Rate::new(200.0, 1000.0)),
            key_package_claims: Limit::new(Rate::new(2.0, 40.0), Rate::new(500.0, 2000.0)),
            call_starts: Limit::new(Rate::new(1.0, 10.0), Rate::new(500.0, 2000.0)),
            signals: Limit::new(Rate::new(50.0, 300.0), Rate::new(10_000.0, 50_000.0)),
            disputes: Limit::new(Rate::new(0.2, 5.0), Rate::new(50.0, 200.0)),
        }
    }
}

/// Which limit a piece of work counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    GroupMessages,
    GroupMessageBytes,
    Commits,
    KeyPackageUploads,
    KeyPackageClaims,
    CallStarts,
    Signals,
    Disputes,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::GroupMessages => "group_messages",
            Kind::GroupMessageBytes => "group_message_bytes",
            Kind::Commits => "commits",
            Kind::KeyPackageUploads => "key_package_uploads",
            Kind::KeyPackageClaims => "key_package_claims",
            Kind::CallStarts => "call_starts",
            Kind::Signals => "signals",
            Kind::Disputes => "disputes",
        }
    }

    fn limit(self, c: &RatesConfig) -> Limit {
        match self {
            Kind::GroupMessages => c.group_messages,
            Kind::GroupMessageBytes => c.group_message_bytes,
            Kind::Commits => c.commits,
            Kind::KeyPackageUploads => c.key_package_uploads,
            Kind::KeyPackageClaims => c.key_package_claims,
            Kind::CallStarts => c.call_starts,
            Kind::Signals => c.signals,
            Kind::Disputes => c.disputes,
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets kept at most (a full map is pruned of full, idle buckets).
const MAX_BUCKETS: usize = 200_000;

/// A node's rate limiter.
#[derive(Debug)]
pub struct RateLimits {
    config: RatesConfig,
    buckets: Mutex<HashMap<(Kind, String), Bucket>>,
}

impl RateLimits {
    pub fn new(config: RatesConfig) -> Self {
        Self { config, buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes `cost` from the account's and the tenant's buckets of `kind`,
    /// or neither: [`RateLimited`] with when to retry.
    pub fn check(&self, kind: Kind, tenant: &str, account: &str, cost: f64) -> Result<(), RateLimited> {
        let limit = kind.limit(&self.config);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("rate buckets lock");
        if buckets.len() >= MAX_BUCKETS {
            prune(&mut buckets, &self.config, now);
        }
        let keys =
            [((kind, format!("a/{tenant}/{account}")), limit.account), ((kind, format!("t/{tenant}")), limit.tenant)];
        let mut wait = Duration::ZERO;
        for (key, rate) in &keys {
            let b = buckets.entry(key.clone()).or_insert(Bucket { tokens: rate.burst, at: now });
            refill(b, rate, now);
            if b.tokens < cost {
                let missing = cost - b.tokens;
                let secs = if rate.per_second > 0.0 { missing / rate.per_second } else { 3600.0 };
                wait = wait.max(Duration::from_secs_f64(secs.min(3600.0)));
            }
        }
        if !wait.is_zero() {
            return Err(RateLimited { kind, retry_after: wait });
        }
        for (key, _) in &keys {
            if let Some(b) = buckets.get_mut(key) {
                b.tokens -= cost;
            }
        }
        Ok(())
    }
}

fn refill(b: &mut Bucket, rate: &Rate, now: Instant) {
    let elapsed = now.duration_since(b.at).as_secs_f64();
    b.tokens = (b.tokens + elapsed * rate.per_second).min(rate.burst);
    b.at = now;
}

/// Drops buckets that have refilled completely (forgetting them changes
/// nothing); if that frees too little, forgets everything.
fn prune(buckets: &mut HashMap<(Kind, String), Bucket>, config: &RatesConfig, now: Instant) {
    buckets.retain(|(kind, key), b| {
        let limit = kind.limit(config);
        let rate = if key.starts_with("a/") { limit.account } else { limit.tenant };
        refill(b, &rate, now);
        b.tokens < rate.burst
    });
    if buckets.len() >= MAX_BUCKETS / 2 {
        buckets.clear();
    }
}

/// A rate limit refused a request: RESOURCE_EXHAUSTED on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limit `{}` reached", kind.name())]
pub struct RateLimited {
    pub kind: Kind,
    pub retry_after: Duration,
}

impl From<RateLimited> for tonic::Status {
    fn from(e: RateLimited) -> Self {
        limited(e.kind, e.retry_after)
    }
}

/// RESOURCE_EXHAUSTED for a rate limit, with when to retry.
pub fn limited(kind: Kind, retry_after: Duration) -> tonic::Status {
    let retry_ms = retry_after.as_millis().max(1) as u64;
    let mut details = ErrorDetails::with_error_info(
        "RATE_LIMITED",
        crate::error::DOMAIN,
        [("limit".to_string(), kind.name().to_string()), ("retry_after_ms".to_string(), retry_ms.to_string())]
            .into_iter()
            .collect::<HashMap<_, _>>(),
    );
    details.set_retry_info(Some(Duration::from_millis(retry_ms)));
    tonic::Status::with_error_details(
        tonic::Code::ResourceExhausted,
        format!("rate limit `{}` reached: retry in {retry_ms} ms", kind.name()),
        details,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refuse_past_the_burst_and_refill() {
        let config =
            RatesConfig { commits: Limit::new(Rate::new(10.0, 3.0), Rate::new(100.0, 100.0)), ..Default::default() };
        let limits = RateLimits::new(config);
        for _ in 0..3 {
            limits.check(Kind::Commits, "tn_a", "ac_x", 1.0).unwrap();
        }
        let refused = tonic::Status::from(limits.check(Kind::Commits, "tn_a", "ac_x", 1.0).unwrap_err());
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        let info = refused.get_details_error_info().unwrap();
        assert_eq!(info.reason, "RATE_LIMITED");
        assert_eq!(info.metadata["limit"], "commits");
        let retry: u64 = info.metadata["retry_after_ms"].parse().unwrap();
        assert!((1..=100).contains(&retry), "{retry}");
        assert!(refused.get_details_retry_info().is_some());
        // Another account of the tenant has its own bucket.
        limits.check(Kind::Commits, "tn_a", "ac_y", 1.0).unwrap();
        std::thread::sleep(Duration::from_millis(120));
        limits.check(Kind::Commits, "tn_a", "ac_x", 1.0).unwrap();
    }

    #[test]
    fn the_tenant_bucket_holds_all_its_accounts() {
        let config =
            RatesConfig { signals: Limit::new(Rate::new(1.0, 100.0), Rate::new(0.001, 5.0)), ..Default::default() };
        let limits = RateLimits::new(config);
        for i in 0..5 {
            limits.check(Kind::Signals, "tn_a", &format!("ac_{i}"), 1.0).unwrap();
        }
        assert!(limits.check(Kind::Signals, "tn_a", "ac_new", 1.0).is_err());
        limits.check(Kind::Signals, "tn_b", "ac_0", 1.0).unwrap();
    }
}
