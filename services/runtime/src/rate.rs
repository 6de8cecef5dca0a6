//! Rate limits: token buckets per account and per tenant, for each kind of
//! work a device can make a node do. The kinds and their limits belong to
//! the services (each in its configuration section: `[groups.rates]`,
//! `[calls.rates]`); this is the mechanism.
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
    pub const fn new(account: Rate, tenant: Rate) -> Self {
        Self { account, tenant }
    }
}

/// A kind of work a service limits: its name in configuration and in the
/// `limit` of a refusal. Each service defines its own (groups: messages,
/// commits, key packages, disputes; calls: call starts, signalling) in its
/// configuration section; the runtime knows none of them.
pub trait RateKind: Copy + Eq + std::hash::Hash + std::fmt::Debug + Send + Sync + 'static {
    fn name(self) -> &'static str;
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets kept at most (a full map is pruned of full, idle buckets).
const MAX_BUCKETS: usize = 200_000;

/// A service's rate limiter on one node.
#[derive(Debug)]
pub struct RateLimits<K: RateKind> {
    limits: HashMap<K, Limit>,
    buckets: Mutex<HashMap<(K, String), Bucket>>,
}

impl<K: RateKind> RateLimits<K> {
    /// Limits by kind; a kind without one is not limited.
    pub fn new(limits: impl IntoIterator<Item = (K, Limit)>) -> Self {
        Self { limits: limits.into_iter().collect(), buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes `cost` from the account's and the tenant's buckets of `kind`,
    /// or neither: [`RateLimited`] with when to retry.
    pub fn check(&self, kind: K, tenant: &str, account: &str, cost: f64) -> Result<(), RateLimited> {
        let Some(limit) = self.limits.get(&kind).copied() else { return Ok(()) };
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("rate buckets lock");
        if buckets.len() >= MAX_BUCKETS {
            prune(&mut buckets, &self.limits, now);
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
            return Err(RateLimited { limit: kind.name(), retry_after: wait });
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
fn prune<K: RateKind>(buckets: &mut HashMap<(K, String), Bucket>, limits: &HashMap<K, Limit>, now: Instant) {
    buckets.retain(|(kind, key), b| {
        let Some(limit) = limits.get(kind) else { return false };
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
#[error("rate limit `{limit}` reached")]
pub struct RateLimited {
    /// The limit's name ([`RateKind::name`]).
    pub limit: &'static str,
    pub retry_after: Duration,
}

impl From<RateLimited> for tonic::Status {
    fn from(e: RateLimited) -> Self {
        limited(e.limit, e.retry_after)
    }
}

/// RESOURCE_EXHAUSTED for a rate limit, with when to retry.
pub fn limited(limit: &str, retry_after: Duration) -> tonic::Status {
    let retry_ms = retry_after.as_millis().max(1) as u64;
    let mut details = ErrorDetails::with_error_info(
        "RATE_LIMITED",
        crate::error::DOMAIN,
        [("limit".to_string(), limit.to_string()), ("retry_after_ms".to_string(), retry_ms.to_string())]
            .into_iter()
            .collect::<HashMap<_, _>>(),
    );
    details.set_retry_info(Some(Duration::from_millis(retry_ms)));
    tonic::Status::with_error_details(
        tonic::Code::ResourceExhausted,
        format!("rate limit `{limit}` reached: retry in {retry_ms} ms"),
        details,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    enum Work {
        Commits,
        Signals,
        Unlimited,
    }

    impl RateKind for Work {
        fn name(self) -> &'static str {
            match self {
                Work::Commits => "commits",
                Work::Signals => "signals",
                Work::Unlimited => "unlimited",
            }
        }
    }

    #[test]
    fn buckets_refuse_past_the_burst_and_refill() {
        let limits = RateLimits::new([(Work::Commits, Limit::new(Rate::new(10.0, 3.0), Rate::new(100.0, 100.0)))]);
        for _ in 0..3 {
            limits.check(Work::Commits, "tn_a", "ac_x", 1.0).unwrap();
        }
        let refused = tonic::Status::from(limits.check(Work::Commits, "tn_a", "ac_x", 1.0).unwrap_err());
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        let info = refused.get_details_error_info().unwrap();
        assert_eq!(info.reason, "RATE_LIMITED");
        assert_eq!(info.metadata["limit"], "commits");
        let retry: u64 = info.metadata["retry_after_ms"].parse().unwrap();
        assert!((1..=100).contains(&retry), "{retry}");
        assert!(refused.get_details_retry_info().is_some());
        // Another account of the tenant has its own bucket.
        limits.check(Work::Commits, "tn_a", "ac_y", 1.0).unwrap();
        std::thread::sleep(Duration::from_millis(120));
        limits.check(Work::Commits, "tn_a", "ac_x", 1.0).unwrap();
        // A kind the service set no limit for is not limited.
        for _ in 0..1000 {
            limits.check(Work::Unlimited, "tn_a", "ac_x", 1.0).unwrap();
        }
    }

    #[test]
    fn the_tenant_bucket_holds_all_its_accounts() {
        let limits = RateLimits::new([(Work::Signals, Limit::new(Rate::new(1.0, 100.0), Rate::new(0.001, 5.0)))]);
        for i in 0..5 {
            limits.check(Work::Signals, "tn_a", &format!("ac_{i}"), 1.0).unwrap();
        }
        assert!(limits.check(Work::Signals, "tn_a", "ac_new", 1.0).is_err());
        limits.check(Work::Signals, "tn_b", "ac_0", 1.0).unwrap();
    }
}
