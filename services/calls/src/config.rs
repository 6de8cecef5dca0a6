//! The `[calls]` configuration section (with TURN under `[calls.turn]`).

use serde::{Deserialize, Serialize};
use spine_runtime::config::Section;
use spine_runtime::rate::{Limit, Rate, RateKind};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallsConfig {
    /// How long a call rings before it ends unanswered (seconds).
    pub ring_timeout_secs: u64,
    /// A group call with fewer than two participants for this long ends
    /// (seconds).
    pub group_idle_secs: u64,
    /// Lease of this node's registration and of its devices' signalling
    /// sessions (seconds): a node that dies silently is noticed within it,
    /// and its calls move to a live node.
    pub node_ttl_secs: u64,
    /// A device in a call whose signalling session (`Calls.Session`) is
    /// gone this long is lost (seconds): a one-to-one call ends, a group
    /// call drops it (and ends with its last device), reason
    /// CONNECTION_LOST.
    pub unattended_secs: u64,
    /// This node's region, for assigning group calls to media nodes near
    /// their participants (devices connect to a node of their region).
    pub region: String,
    /// The address other calls nodes reach this one at (`host:port`);
    /// default: `presence.advertise`, else the listen address.
    pub advertise: Option<String>,
    pub turn: TurnConfig,
    /// How long a media admission token admits (seconds): tokens roll over
    /// every this many seconds and each admits for two periods.
    pub media_admission_secs: u64,
    /// Rate limits per account and per tenant, per node (`[calls.rates]`).
    pub rates: CallsRates,
}

/// The calls service's rate limits: token buckets `{ per_second, burst }`
/// per account and per tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallsRates {
    /// Call starts (`StartCall`, `StartGroupCall`).
    pub call_starts: Limit,
    /// Signalling payloads (`Signal`, on the stream or unary).
    pub signals: Limit,
}

impl Default for CallsRates {
    fn default() -> Self {
        Self {
            call_starts: Limit::new(Rate::new(1.0, 10.0), Rate::new(500.0, 2000.0)),
            signals: Limit::new(Rate::new(50.0, 300.0), Rate::new(10_000.0, 50_000.0)),
        }
    }
}

/// Which of the calls service's limits a piece of work counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallsRate {
    CallStarts,
    Signals,
}

impl RateKind for CallsRate {
    fn name(self) -> &'static str {
        match self {
            CallsRate::CallStarts => "call_starts",
            CallsRate::Signals => "signals",
        }
    }
}

impl CallsRates {
    /// The limiter these limits configure.
    pub fn limiter(&self) -> spine_runtime::rate::RateLimits<CallsRate> {
        spine_runtime::rate::RateLimits::new([
            (CallsRate::CallStarts, self.call_starts),
            (CallsRate::Signals, self.signals),
        ])
    }
}

impl Default for CallsConfig {
    fn default() -> Self {
        Self {
            ring_timeout_secs: 45,
            group_idle_secs: 300,
            node_ttl_secs: 5,
            unattended_secs: 30,
            region: "default".into(),
            advertise: None,
            turn: TurnConfig::default(),
            media_admission_secs: 300,
            rates: CallsRates::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TurnConfig {
    /// TURN server URIs handed to devices, for example
    /// `turn:turn.example.com:3478?transport=udp`.
    pub uris: Vec<String>,
    /// Shared secrets of coturn's `use-auth-secret`: the first mints
    /// credentials; list the old one second while rotating (coturn accepts
    /// every `static-auth-secret` it is given). Empty: no TURN.
    pub secrets: Vec<String>,
    /// Lifetime of minted credentials (seconds, 60 to 600).
    pub ttl_secs: u32,
}

impl Default for TurnConfig {
    fn default() -> Self {
        Self { uris: vec![], secrets: vec![], ttl_secs: 300 }
    }
}

impl Section for CallsConfig {
    const NAME: &'static str = "calls";
}
