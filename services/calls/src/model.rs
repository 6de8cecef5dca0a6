//! What the calls service stores, and where. `docs/privacy.md` lists each
//! item with its retention and readers; change both together.
//!
//! Control plane (`/spine/sys/calls/`), live state only, every key under a
//! lease so nothing outlives the node that holds it:
//! - `nodes/<node id>`: a calls node: address, region, state lease;
//! - `sess/<tenant>/<account>/<device>`: the node holding a device's
//!   signalling stream (under the node's registration lease);
//! - `c/<call id>`: a live call: parties, legs, ring state, deadlines
//!   (under its home node's state lease);
//! - `pair/<hash>`: the live direct call between two accounts (glare and
//!   duplicate detection); `group/<group id hex>`: a group's live call;
//! - `media/<node id>`: a media node's registration (under its own lease).
//!
//! Each tenant (`/spine/t/<tenant>/calls/`), only if its policy keeps records:
//! - `policy`: the record policy; `salt`: the key of participant hashes;
//! - `rec/<expiry>/<record id>`: a call record with only the policy's fields;
//! - `rech/<participant hash>/<record id>`: the index for reports and
//!   deletion.

use serde::{Deserialize, Serialize};

pub const NODES: &str = "calls/nodes/";
pub const SESSIONS: &str = "calls/sess/";
pub const CALLS: &str = "calls/c/";
pub const PAIRS: &str = "calls/pair/";
pub const GROUP_CALLS: &str = "calls/group/";
pub const MEDIA: &str = "calls/media/";

pub const POLICY: &str = "calls/policy";
pub const SALT: &str = "calls/salt";
pub const RECORDS: &str = "calls/rec/";
pub const RECORD_INDEX: &str = "calls/rech/";

pub fn node_key(id: &str) -> String {
    format!("{NODES}{id}")
}
pub fn session_key(d: &DevKey) -> String {
    format!("{SESSIONS}{}/{}/{}", d.tenant, d.account, d.device)
}
pub fn call_key(id: &str) -> String {
    format!("{CALLS}{id}")
}
pub fn group_call_key(gid_hex: &str) -> String {
    format!("{GROUP_CALLS}{gid_hex}")
}
pub fn media_key(id: &str) -> String {
    format!("{MEDIA}{id}")
}
pub fn record_key(expires_at: i64, id: &str) -> String {
    format!("{RECORDS}{expires_at:020}/{id}")
}
pub fn record_index_key(hash: &str, id: &str) -> String {
    format!("{RECORD_INDEX}{hash}/{id}")
}

/// The pair key of two accounts, the same whichever calls whom: a keyed
/// hash under the deployment's pseudonym secret (`spine_runtime::secrets`),
/// so the key names nobody to anyone without that secret.
pub fn pair_key(secrets: &spine_runtime::secrets::Secrets, a: &AccountKey, b: &AccountKey) -> String {
    let (x, y) = if a <= b { (a, b) } else { (b, a) };
    format!("{PAIRS}{}", secrets.pseudonym("call-pair", &[&x.tenant, &x.account, &y.tenant, &y.account]))
}

/// An account, across tenants.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AccountKey {
    pub tenant: String,
    pub account: String,
}

/// A device, across tenants.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DevKey {
    pub tenant: String,
    pub account: String,
    pub device: String,
}

impl DevKey {
    pub fn account_key(&self) -> AccountKey {
        AccountKey { tenant: self.tenant.clone(), account: self.account.clone() }
    }
    /// Parses the tail of a session key: `<tenant>/<account>/<device>`.
    pub fn parse(rel: &str) -> Option<Self> {
        let mut it = rel.splitn(3, '/');
        Some(Self { tenant: it.next()?.into(), account: it.next()?.into(), device: it.next()?.into() })
    }
}

/// A calls node's registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRec {
    pub addr: String,
    pub region: String,
    /// The lease its calls are stored under.
    pub state_lease: i64,
}

/// Where a device's signalling stream is held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRec {
    pub node: String,
    pub sid: String,
    pub region: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Direct,
    Group,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Ringing,
    Active,
    Ended,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    HungUp,
    Cancelled,
    Declined,
    NoAnswer,
    Busy,
    EveryoneLeft,
    Idle,
    ServiceLost,
    AccountDeleted,
    ConnectionLost,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::HungUp => "hung_up",
            End::Cancelled => "cancelled",
            End::Declined => "declined",
            End::NoAnswer => "no_answer",
            End::Busy => "busy",
            End::EveryoneLeft => "everyone_left",
            End::Idle => "idle",
            End::ServiceLost => "service_lost",
            End::AccountDeleted => "account_deleted",
            End::ConnectionLost => "connection_lost",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Caller,
    Callee,
    Member,
}

/// How ringing went for one account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "device")]
pub enum Ring {
    /// Not rung (the caller; members without group rings).
    None,
    Ringing,
    Answered(String),
    Declined(String),
    Cancelled,
    TimedOut,
}

/// An account taking part in a call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Party {
    #[serde(flatten)]
    pub who: AccountKey,
    pub role: Role,
    pub ring: Ring,
    /// Group calls: the account's devices in the group's roster (only they
    /// ring and may join).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// How parties of other tenants see this one: an interop handle it
    /// consented to, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handle: Option<String>,
}

/// A device in a call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leg {
    pub id: String,
    #[serde(flatten)]
    pub dev: DevKey,
    #[serde(default)]
    pub leaf: u32,
    pub joined_ms: i64,
}

/// A group call's binding to its MLS group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRef {
    pub gid: String,
    pub epoch: u64,
    pub media: Option<MediaRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaRef {
    pub id: String,
    pub address: String,
    pub region: String,
}

/// A live call (`/spine/sys/calls/c/<id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRec {
    pub id: String,
    pub kind: Kind,
    pub video: bool,
    pub state: State,
    pub end: Option<End>,
    /// The node that runs the call's timers and whose lease holds it.
    pub home: String,
    /// The starter's idempotency key (`<device>/<request id>`).
    pub request: String,
    pub started_ms: i64,
    pub answered_ms: Option<i64>,
    pub ended_ms: Option<i64>,
    /// When ringing stops unanswered (0: not ringing).
    pub ring_deadline_ms: i64,
    /// Group calls: when the call ends for having had fewer than two
    /// participants (0: it has two or more).
    pub idle_deadline_ms: i64,
    pub waiting: bool,
    pub parties: Vec<Party>,
    pub legs: Vec<Leg>,
    pub group: Option<GroupRef>,
}

impl CallRec {
    pub fn party(&self, a: &AccountKey) -> Option<&Party> {
        self.parties.iter().find(|p| &p.who == a)
    }
    pub fn party_mut(&mut self, a: &AccountKey) -> Option<&mut Party> {
        self.parties.iter_mut().find(|p| &p.who == a)
    }
    pub fn leg_of(&self, d: &DevKey) -> Option<&Leg> {
        self.legs.iter().find(|l| &l.dev == d)
    }
    pub fn caller(&self) -> Option<&Party> {
        self.parties.iter().find(|p| p.role == Role::Caller)
    }
    pub fn callee(&self) -> Option<&Party> {
        self.parties.iter().find(|p| p.role == Role::Callee)
    }
    /// Every account that hears about the call.
    pub fn audience(&self) -> impl Iterator<Item = AccountKey> + '_ {
        self.parties.iter().map(|p| p.who.clone()).chain(self.legs.iter().map(|l| l.dev.account_key()))
    }
    /// Whether `a` is busy with this call: in it on a device, or being rung
    /// by it (direct calls).
    pub fn occupies(&self, a: &AccountKey) -> bool {
        self.state != State::Ended
            && (self.legs.iter().any(|l| &l.dev.account_key() == a)
                || (self.kind == Kind::Direct && self.callee().is_some_and(|p| &p.who == a && p.ring == Ring::Ringing)))
    }
}

/// A media node's registration (`/spine/sys/calls/media/<id>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaRec {
    pub address: String,
    pub region: String,
    pub capacity: u32,
    pub load: u32,
    pub updated_at: i64,
}

pub fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

/// A new opaque id with a prefix (`cl_` calls, `lg_` legs, `cr_` records).
pub use spine_runtime::ids::new_prefixed as new_id;
/// Checks an id made by [`new_id`].
pub use spine_runtime::ids::parse_prefixed as parse_id;
