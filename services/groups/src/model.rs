//! What the groups service stores, and where. `docs/privacy.md` lists each
//! item with its retention and readers; change both together.
//!
//! Group space (`/spine/g/<group id hex>/`), shared by the tenants a group's
//! policy admits:
//! - `s/meta`: epoch, roster (tenant, account, device, leaf), policy, sequence;
//! - `s/slot/<epoch parity>` ([`Slot`]): an epoch's public group state (the
//!   verifier's, no secret), and `info/<epoch parity>` its GroupInfo
//!   (public, for external joins). The current epoch's, and the one before
//!   it while its commit can still be voided: a commit writes the new epoch
//!   into the other parity and leaves the epoch it ends where it is, so
//!   nothing is copied. (Two keys, not one: each stays under the store's
//!   value limit for as large a group as before.)
//! - `s/fanout`: the last log entry delivered to every recipient;
//! - `log/<gseq>`: handshake and application messages awaiting fan-out;
//! - `disputes/<epoch>/<device>` ([`DisputeRecord`]): dispute records, each
//!   with the leaf that committed the disputed epoch;
//! - `voided/<epoch>`: commits voided (who committed, when).
//!
//! Groups written before the slots keep `s/state`, `info` and `prev`
//! ([`LegacyPrev`]) until their first read moves them into slots. Groups
//! committed to before dispute records named the committer have
//! `committers/<epoch>` (the committing leaf of every epoch) until upkeep
//! deletes them.
//!
//! Each member's tenant (`/spine/t/<tenant>/`):
//! - `kp/<account>/<device>/<ref>`, `kpl/<account>/<device>`: key packages;
//! - `mbox/<account>/<device>/<seq>`, `mbox-head/...`, `mbox-grp/...`: the
//!   mailbox, its next sequence number and per-group delivery cursor;
//! - `gm/<account>/<device>/<group>`: which groups a device is in.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

pub fn gid_hex(group_id: &[u8]) -> String {
    hex::encode(group_id)
}

/// The group's core records (`meta`, the epoch slots, `fanout`), read in one
/// range.
pub fn core_prefix(g: &str) -> String {
    format!("{g}/s/")
}
/// Shared with calls (which reads the roster): see `spine_read_models::directory`.
pub fn meta_key(g: &str) -> String {
    spine_read_models::roster::group_meta_key(g)
}
/// The slot of `epoch`: its parity, so the next epoch goes to the other.
pub fn slot_key(g: &str, epoch: u64) -> String {
    format!("{g}/s/slot/{}", epoch % 2)
}
/// The GroupInfo of `epoch`, beside its slot.
pub fn info_key(g: &str, epoch: u64) -> String {
    format!("{g}/info/{}", epoch % 2)
}
/// Before slots: the current state (in the core range, so a read finds it).
pub fn legacy_state_key(g: &str) -> String {
    format!("{g}/s/state")
}
/// Before slots: the current GroupInfo.
pub fn legacy_info_key(g: &str) -> String {
    format!("{g}/info")
}
pub fn log_prefix(g: &str) -> String {
    format!("{g}/log/")
}
pub fn log_key(g: &str, gseq: u64) -> String {
    format!("{g}/log/{gseq:020}")
}
pub fn fanout_key(g: &str) -> String {
    format!("{g}/s/fanout")
}
/// Before dispute records named the committer: every epoch's committing
/// leaf (read for disputes and account data until upkeep deletes it).
pub fn legacy_committer_key(g: &str, epoch: u64) -> String {
    format!("{g}/committers/{epoch:020}")
}
pub fn legacy_committers_prefix(g: &str) -> String {
    format!("{g}/committers/")
}
/// Before slots: the previous epoch, copied.
pub fn legacy_prev_key(g: &str) -> String {
    format!("{g}/prev")
}
pub fn voided_prefix(g: &str) -> String {
    format!("{g}/voided/")
}
pub fn voided_key(g: &str, epoch: u64) -> String {
    format!("{g}/voided/{epoch:020}")
}
pub fn disputes_prefix(g: &str) -> String {
    format!("{g}/disputes/")
}
pub fn dispute_key(g: &str, epoch: u64, tenant: &str, device: &str) -> String {
    format!("{g}/disputes/{epoch:020}/{tenant}.{device}")
}
pub fn epoch_disputes_prefix(g: &str, epoch: u64) -> String {
    format!("{g}/disputes/{epoch:020}/")
}

/// `<g>/gone/<tenant>.<device>`: when Spine first saw that a member device
/// no longer exists (its removal is proposed, not yet committed).
pub fn gone_prefix(g: &str) -> String {
    format!("{g}/gone/")
}
pub fn gone_id(d: &Device) -> String {
    format!("{}.{}", d.tenant, d.device)
}
pub fn gone_key(g: &str, d: &Device) -> String {
    format!("{g}/gone/{}", gone_id(d))
}

pub fn kp_prefix(account: &str, device: &str) -> String {
    format!("kp/{account}/{device}/")
}
pub fn kp_account_prefix(account: &str) -> String {
    format!("kp/{account}/")
}
pub fn kpl_key(account: &str, device: &str) -> String {
    format!("kpl/{account}/{device}")
}
pub fn kpl_account_prefix(account: &str) -> String {
    format!("kpl/{account}/")
}
pub fn mbox_prefix(account: &str, device: &str) -> String {
    format!("mbox/{account}/{device}/")
}
pub fn mbox_key(account: &str, device: &str, seq: u64) -> String {
    format!("mbox/{account}/{device}/{seq:020}")
}
pub fn mbox_head_key(account: &str, device: &str) -> String {
    format!("mbox-head/{account}/{device}")
}
pub fn mbox_grp_key(account: &str, device: &str, g: &str) -> String {
    format!("mbox-grp/{account}/{device}/{g}")
}
pub fn gm_key(account: &str, device: &str, g: &str) -> String {
    format!("gm/{account}/{device}/{g}")
}
pub fn gm_account_prefix(account: &str) -> String {
    format!("gm/{account}/")
}
/// Prefixes of everything about an account in its tenant.
pub fn account_prefixes(account: &str) -> [String; 6] {
    [
        format!("kp/{account}/"),
        format!("kpl/{account}/"),
        format!("mbox/{account}/"),
        format!("mbox-head/{account}/"),
        format!("mbox-grp/{account}/"),
        format!("gm/{account}/"),
    ]
}

/// A member device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub tenant: String,
    pub account: String,
    pub device: String,
}

impl Device {
    pub fn of(name: &spine_mls::DeviceName) -> Self {
        Self { tenant: name.tenant.clone(), account: name.account.clone(), device: name.device.clone() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RosterEntry {
    pub leaf: u32,
    #[serde(flatten)]
    pub device: Device,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupMeta {
    pub epoch: u64,
    /// Next log sequence number.
    pub next_seq: u64,
    pub roster: Vec<RosterEntry>,
    pub allowed: Vec<String>,
    pub created_at: i64,
    /// Index of the delivery service among the group's external senders.
    pub ds_index: u32,
    /// The device whose commit created the current epoch (none for the
    /// creation epoch, or after a voiding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committer: Option<Device>,
    /// A member other than the committer has sent a message in the current
    /// epoch: the commit that created it works, and cannot be voided.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub confirmed: bool,
    /// When the current epoch's commit was first disputed (Unix seconds):
    /// new commits on top of it wait (see `delivery::FREEZE_SECS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disputed_at: Option<i64>,
}

/// One epoch's public group state, as stored in its slot: a version byte,
/// epoch (u64), committer leaf (u32; `u32::MAX` for none), big-endian, then
/// the state: as is (version 1), or, from [`Slot::COMPRESS_FROM`] bytes,
/// its length (u32) and a zstd frame of it (version 2). Bytes, not base64,
/// and compressed: a group's state is most of what its commits write and
/// read (openmls keeps it as JSON, a fifth of that size compressed at a
/// hundred members), and a large group's must fit one store value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub epoch: u64,
    /// Leaf index, in this epoch, of the member whose commit created it.
    pub committer_leaf: u32,
    /// The verifier's state (`Verifier::to_bytes`).
    pub state: Vec<u8>,
}

impl Slot {
    const RAW: u8 = 1;
    const ZSTD: u8 = 2;
    const HEAD: usize = 1 + 8 + 4;
    /// States from this size are compressed.
    pub const COMPRESS_FROM: usize = 1024;
    /// Largest state a slot may unpack to (well past the store's value
    /// limit, which binds first).
    const MAX_STATE: usize = 64 << 20;

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::HEAD + 4 + self.state.len() / 3);
        let packed = (self.state.len() >= Self::COMPRESS_FROM && self.state.len() <= Self::MAX_STATE)
            .then(|| zstd_pack(&self.state))
            .flatten();
        out.push(if packed.is_some() { Self::ZSTD } else { Self::RAW });
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&self.committer_leaf.to_be_bytes());
        match packed {
            Some(z) => {
                out.extend_from_slice(&(self.state.len() as u32).to_be_bytes());
                out.extend_from_slice(&z);
            }
            None => out.extend_from_slice(&self.state),
        }
        out
    }

    pub fn from_bytes(b: &[u8]) -> crate::error::Result<Self> {
        let bad = |why: &str| crate::error::GroupsError::Internal(format!("stored group slot: {why}"));
        if b.len() < Self::HEAD {
            return Err(bad("truncated"));
        }
        let epoch = u64::from_be_bytes(b[1..9].try_into().expect("8 bytes"));
        let committer_leaf = u32::from_be_bytes(b[9..13].try_into().expect("4 bytes"));
        let rest = &b[Self::HEAD..];
        let state = match b[0] {
            Self::RAW => rest.to_vec(),
            Self::ZSTD => {
                let (n, z) = rest.split_at_checked(4).ok_or_else(|| bad("truncated"))?;
                let n = u32::from_be_bytes(n.try_into().expect("4 bytes")) as usize;
                if n > Self::MAX_STATE {
                    return Err(bad("state too large"));
                }
                let state = zstd_unpack(z, n).map_err(|e| bad(&format!("zstd: {e}")))?;
                if state.len() != n {
                    return Err(bad("state shorter than recorded"));
                }
                state
            }
            _ => return Err(bad("unknown version")),
        };
        Ok(Self { epoch, committer_leaf, state })
    }
}

/// A slot as read from the store: its head, and its bytes as stored (the
/// state is unpacked only when it is needed, see `delivery::verifiers`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSlot {
    pub epoch: u64,
    pub committer_leaf: u32,
    pub bytes: Vec<u8>,
}

impl StoredSlot {
    pub fn read(bytes: Vec<u8>) -> crate::error::Result<Self> {
        if bytes.len() < Slot::HEAD {
            return Err(crate::error::GroupsError::Internal("stored group slot: truncated".into()));
        }
        let epoch = u64::from_be_bytes(bytes[1..9].try_into().expect("8 bytes"));
        let committer_leaf = u32::from_be_bytes(bytes[9..13].try_into().expect("4 bytes"));
        Ok(Self { epoch, committer_leaf, bytes })
    }

    pub fn unpack(&self) -> crate::error::Result<Slot> {
        Slot::from_bytes(&self.bytes)
    }
}

thread_local! {
    // zstd contexts, kept per thread: making one costs more than packing
    // a small group's state.
    static PACK: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> = const { std::cell::RefCell::new(None) };
    static UNPACK: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn zstd_pack(data: &[u8]) -> Option<Vec<u8>> {
    PACK.with_borrow_mut(|c| {
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(1).ok();
        }
        c.as_mut()?.compress(data).ok()
    })
}

fn zstd_unpack(data: &[u8], len: usize) -> std::io::Result<Vec<u8>> {
    UNPACK.with_borrow_mut(|d| {
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        d.as_mut().expect("made above").decompress(data, len)
    })
}

/// Before slots: the epoch before the current one, copied into `prev`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LegacyPrev {
    pub epoch: u64,
    /// Base64 verifier state (public group state).
    pub state: String,
    /// Base64 GroupInfo.
    pub info: String,
    pub roster: Vec<RosterEntry>,
    /// Leaf index of the commit's sender in the new epoch.
    pub committer_leaf: u32,
}

/// A member's report that it cannot process an epoch's commit. Records
/// written before it named the committer are `{}` (`committer_leaf`
/// `u32::MAX`: see the legacy `committers/<epoch>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DisputeRecord {
    /// Leaf index of the member whose commit made the disputed epoch
    /// (`u32::MAX`: not known).
    #[serde(default = "no_leaf")]
    pub committer_leaf: u32,
}

fn no_leaf() -> u32 {
    u32::MAX
}

impl DisputeRecord {
    /// The committing leaf a stored dispute record names (`u32::MAX`: none).
    pub fn committer_of(value: &[u8]) -> u32 {
        serde_json::from_slice::<Self>(value).map_or(u32::MAX, |r| r.committer_leaf)
    }
}

/// The committing leaf a legacy `committers/<epoch>` record names
/// (`u32::MAX`: none readable).
pub fn legacy_committer_of(value: &[u8]) -> u32 {
    String::from_utf8_lossy(value).parse().unwrap_or(u32::MAX)
}

/// A voided commit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Voided {
    pub committer_leaf: u32,
    pub at: i64,
}

impl GroupMeta {
    pub fn member(&self, tenant: &str, account: &str, device: &str) -> Option<&RosterEntry> {
        self.roster
            .iter()
            .find(|r| r.device.tenant == tenant && r.device.account == account && r.device.device == device)
    }
}

/// A log entry awaiting fan-out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogEntry {
    pub kind: i32,
    /// Base64 MLSMessage.
    pub message: String,
    pub epoch: u64,
    pub recipients: Vec<Device>,
    /// Devices this entry adds to the group (their Welcome).
    #[serde(default)]
    pub joins: bool,
    /// For a commit: devices it removes.
    #[serde(default)]
    pub removed: Vec<Device>,
    /// When the entry entered the log, Unix milliseconds (for fan-out lag).
    #[serde(default)]
    pub at_ms: i64,
}

impl LogEntry {
    pub fn new(kind: spine_proto::groups::v1::EntryKind, message: &[u8], epoch: u64, recipients: Vec<Device>) -> Self {
        let at_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        Self {
            kind: kind as i32,
            message: B64.encode(message),
            epoch,
            recipients,
            joins: false,
            removed: vec![],
            at_ms,
        }
    }
}

/// A mailbox entry as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MailboxRec {
    /// Hex group id.
    pub group: String,
    pub kind: i32,
    pub message: String,
    pub epoch: u64,
    /// For a dropped-messages marker: how many.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A device's mailbox head: the next sequence number, and what the mailbox
/// holds (entries and stored bytes) for its quota.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Default)]
pub struct MailboxHead {
    pub n: u64,
    #[serde(default)]
    pub entries: u64,
    #[serde(default)]
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, Default)]
pub struct Counter {
    pub n: u64,
}

pub fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

pub fn parse<T: serde::de::DeserializeOwned>(kv: &spine_runtime::store::KeyValue) -> crate::error::Result<T> {
    serde_json::from_slice(&kv.value).map_err(|e| crate::error::GroupsError::Internal(format!("{}: {e}", kv.key)))
}

pub fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

pub fn unb64(s: &str) -> crate::error::Result<Vec<u8>> {
    B64.decode(s).map_err(|e| crate::error::GroupsError::Internal(format!("stored base64: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Calls reads the roster through `spine_read_models::directory`: the
    /// record this service writes must parse there.
    #[test]
    fn meta_parses_as_the_shared_roster() {
        let d = Device { tenant: "tn_x".into(), account: "ac_y".into(), device: "dv_z".into() };
        let meta = GroupMeta {
            epoch: 7,
            next_seq: 3,
            roster: vec![RosterEntry { leaf: 2, device: d }],
            allowed: vec!["tn_x".into()],
            created_at: 1,
            ds_index: 0,
            committer: None,
            confirmed: false,
            disputed_at: None,
        };
        let r: spine_read_models::roster::GroupRoster =
            serde_json::from_slice(&serde_json::to_vec(&meta).unwrap()).unwrap();
        assert_eq!(r.epoch, 7);
        assert_eq!(r.member("tn_x", "ac_y", "dv_z").map(|m| m.leaf), Some(2));
    }

    #[test]
    fn a_slot_reads_back_and_refuses_damage() {
        let small = Slot { epoch: 9, committer_leaf: 3, state: vec![1, 2, 3] };
        // A state past the threshold, as repetitive as openmls's JSON.
        let big = Slot {
            epoch: 10,
            committer_leaf: u32::MAX,
            state: (0..5000u32).flat_map(|i| format!("{},", i % 256).into_bytes()).collect(),
        };
        let empty = Slot { epoch: 0, committer_leaf: u32::MAX, state: vec![] };
        for s in [&small, &big, &empty] {
            assert_eq!(&Slot::from_bytes(&s.to_bytes()).unwrap(), s);
        }
        let (b, packed) = (small.to_bytes(), big.to_bytes());
        assert_eq!((b[0], packed[0]), (Slot::RAW, Slot::ZSTD));
        assert!(packed.len() * 3 < big.state.len(), "{} of {}", packed.len(), big.state.len());
        for cut in 0..Slot::HEAD {
            assert!(Slot::from_bytes(&b[..cut]).is_err(), "cut at {cut}");
        }
        for cut in Slot::HEAD..packed.len() {
            assert!(Slot::from_bytes(&packed[..cut]).is_err(), "compressed, cut at {cut}");
        }
        let mut other = b;
        other[0] = 3;
        assert!(Slot::from_bytes(&other).is_err());
        // A recorded length that lies, either way, is refused.
        for n in [big.state.len() as u32 - 1, big.state.len() as u32 + 1, u32::MAX] {
            let mut lying = packed.clone();
            lying[Slot::HEAD..Slot::HEAD + 4].copy_from_slice(&n.to_be_bytes());
            assert!(Slot::from_bytes(&lying).is_err(), "length {n}");
        }
        assert_eq!(slot_key("g", 4), "g/s/slot/0");
        assert_eq!(slot_key("g", 5), "g/s/slot/1");
        assert_eq!(info_key("g", 5), "g/info/1");
        assert_ne!(info_key("g", 5), legacy_info_key("g"));
    }
}
