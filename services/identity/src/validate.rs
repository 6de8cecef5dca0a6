//! Bounds on every client-supplied field. Each bound is listed in
//! docs/api.md; a value outside it is INVALID_ARGUMENT naming the field.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use spine_proto::common::v1::{InteropRef, PeerRef, peer_ref};
use spine_runtime::ids::{self, Kind, TenantId};

use crate::error::{Result, invalid};

pub const MAX_NAME: usize = 64;
pub const DEFAULT_PAGE: u32 = 100;
pub const MAX_PAGE: u32 = 1000;
/// Live devices per account.
pub const MAX_DEVICES: u32 = 32;
/// Contacts, and blocks, per account.
pub const MAX_PEERS: u64 = 5000;
/// Live interop handles per account.
pub const MAX_HANDLES: u64 = 32;
/// Live credentials per tenant.
pub const MAX_TENANT_CREDENTIALS: u32 = 16;
/// Tenants one handle may name.
pub const MAX_HANDLE_TENANTS: usize = 16;

pub fn request_id(v: &str) -> Result<&str> {
    ids::request_id(v).map_err(|m| invalid("request_id", m))
}

pub fn name(field: &'static str, v: &str, required: bool) -> Result<String> {
    let n = v.chars().count();
    if (required && n == 0) || n > MAX_NAME {
        return Err(invalid(field, format!("{} to {MAX_NAME} characters", u8::from(required))));
    }
    if v.chars().any(char::is_control) {
        return Err(invalid(field, "control characters are not allowed"));
    }
    if v.chars().any(ids::is_bidi_control) {
        return Err(invalid(field, "bidirectional formatting characters are not allowed"));
    }
    Ok(v.to_string())
}

/// Latest time any timestamp field may name (the end of year 9999, as
/// google.protobuf.Timestamp allows).
pub const MAX_TIMESTAMP_SECS: i64 = 253_402_300_799;

/// A timestamp within google.protobuf.Timestamp's range, after 1970.
pub fn timestamp(field: &'static str, t: &prost_types::Timestamp) -> Result<()> {
    if !(0..=MAX_TIMESTAMP_SECS).contains(&t.seconds) || !(0..1_000_000_000).contains(&t.nanos) {
        return Err(invalid(field, "must be a time between 1970 and the end of year 9999"));
    }
    Ok(())
}

pub fn id<'a>(field: &'static str, kind: Kind, v: &'a str) -> Result<&'a str> {
    if v.is_empty() {
        return Err(invalid(field, "required"));
    }
    ids::parse(kind, v).ok_or_else(|| invalid(field, format!("not a valid id (expected {}...)", kind.prefix())))
}

pub fn tenant_id(field: &'static str, v: &str) -> Result<TenantId> {
    id(field, Kind::Tenant, v)?;
    Ok(TenantId::parse(v).expect("validated above"))
}

pub fn page_size(v: u32) -> Result<usize> {
    match v {
        0 => Ok(DEFAULT_PAGE as usize),
        n if n <= MAX_PAGE => Ok(n as usize),
        _ => Err(invalid("page_size", format!("at most {MAX_PAGE}"))),
    }
}

/// Page tokens are the last key of the previous page, relative to the list's
/// prefix, base64url-encoded. They are opaque to clients.
pub fn page_token(v: &str) -> Result<Option<String>> {
    if v.is_empty() {
        return Ok(None);
    }
    let raw = B64URL.decode(v).ok().and_then(|b| String::from_utf8(b).ok());
    match raw {
        Some(k) if !k.is_empty() && k.len() <= 256 && !k.contains('/') => Ok(Some(k)),
        _ => Err(invalid("page_token", "not a token this server issued")),
    }
}

pub fn next_page_token(last_rel: Option<&str>, more: bool) -> String {
    match (last_rel, more) {
        (Some(k), true) => B64URL.encode(k.rsplit('/').next().unwrap_or(k)),
        _ => String::new(),
    }
}

/// A peer, as stored under a contacts/blocks key: `a.<account>` or
/// `i.<tenant>.<handle>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Account(String),
    Interop { tenant: TenantId, handle: String },
}

impl Peer {
    pub fn parse(p: Option<&PeerRef>) -> Result<Peer> {
        match p.and_then(|p| p.peer.as_ref()) {
            Some(peer_ref::Peer::AccountId(a)) => {
                Ok(Peer::Account(id("peer.account_id", Kind::Account, a)?.to_string()))
            }
            Some(peer_ref::Peer::Interop(r)) => Ok(Peer::Interop {
                tenant: tenant_id("peer.interop.tenant_id", &r.tenant_id)?,
                handle: id("peer.interop.handle", Kind::InteropHandle, &r.handle)?.to_string(),
            }),
            None => Err(invalid("peer", "required")),
        }
    }

    pub fn key(&self) -> String {
        match self {
            Peer::Account(a) => spine_read_models::directory::peer_account(a),
            Peer::Interop { tenant, handle } => spine_read_models::directory::peer_interop(tenant.as_str(), handle),
        }
    }

    pub fn from_key(k: &str) -> Option<Peer> {
        if let Some(a) = k.strip_prefix("a.") {
            return Some(Peer::Account(a.to_string()));
        }
        let (t, h) = k.strip_prefix("i.")?.split_once('.')?;
        Some(Peer::Interop { tenant: TenantId::parse(t)?, handle: h.to_string() })
    }

    pub fn to_proto(&self) -> PeerRef {
        let peer = match self {
            Peer::Account(a) => peer_ref::Peer::AccountId(a.clone()),
            Peer::Interop { tenant, handle } => {
                peer_ref::Peer::Interop(InteropRef { tenant_id: tenant.to_string(), handle: handle.clone() })
            }
        };
        PeerRef { peer: Some(peer) }
    }

    pub fn describe(&self) -> String {
        match self {
            Peer::Account(a) => format!("account {a}"),
            Peer::Interop { tenant, handle } => format!("interop {tenant}/{handle}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_refuse_control_and_bidi_characters() {
        assert!(name("n", "Zoë's phone", true).is_ok());
        for bad in ["a\u{202e}txt.exe", "x\u{2066}y", "\u{200f}", "tab\there"] {
            assert!(name("n", bad, true).is_err(), "{bad:?}");
        }
        let ok = prost_types::Timestamp { seconds: 1_700_000_000, nanos: 0 };
        assert!(timestamp("t", &ok).is_ok());
        for bad in [(-1, 0), (MAX_TIMESTAMP_SECS + 1, 0), (0, -1), (0, 1_000_000_000)] {
            assert!(timestamp("t", &prost_types::Timestamp { seconds: bad.0, nanos: bad.1 }).is_err());
        }
    }

    #[test]
    fn request_ids() {
        assert!(request_id("retry-1.a_b").is_ok());
        for bad in ["", "a/b", "a b", &"x".repeat(65), "é"] {
            assert!(request_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn page_tokens_round_trip_and_refuse_paths() {
        let t = next_page_token(Some("contacts/ac_x/a.ac_y"), true);
        assert_eq!(page_token(&t).unwrap().as_deref(), Some("a.ac_y"));
        assert_eq!(next_page_token(Some("k"), false), "");
        assert!(page_token(&B64URL.encode("../x/y")).is_err());
        assert!(page_token("!!!").is_err());
    }

    #[test]
    fn peer_keys_round_trip() {
        let t = TenantId::generate();
        for p in
            [Peer::Account(ids::new(Kind::Account)), Peer::Interop { tenant: t, handle: ids::new(Kind::InteropHandle) }]
        {
            assert_eq!(Peer::from_key(&p.key()), Some(p.clone()));
            assert_eq!(Peer::parse(Some(&p.to_proto())).unwrap(), p);
        }
    }
}
