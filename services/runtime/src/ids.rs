//! Opaque identifiers.
//!
//! Every id Spine assigns is a kind prefix (`tn_`, `ac_`, `dv_`, ...) and 26
//! characters of lowercase base32 (130 random bits). Ids become parts of store
//! keys, so anything arriving from a client is checked with [`parse`] before it
//! reaches the store: no `/`, no `..`, nothing but the expected shape.

use rand::RngCore;

const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
const BODY: usize = 26;

/// Kinds of ids, with their prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tenant,
    Account,
    Device,
    TenantCredential,
    Operator,
    SigningKey,
    InteropHandle,
}

impl Kind {
    pub const fn prefix(self) -> &'static str {
        match self {
            Kind::Tenant => "tn_",
            Kind::Account => "ac_",
            Kind::Device => "dv_",
            Kind::TenantCredential => "tc_",
            Kind::Operator => "op_",
            Kind::SigningKey => "sk_",
            Kind::InteropHandle => "ih_",
        }
    }
}

/// A new random id of a kind.
pub fn new(kind: Kind) -> String {
    let mut bytes = [0u8; BODY];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let mut s = String::with_capacity(3 + BODY);
    s.push_str(kind.prefix());
    s.extend(bytes.iter().map(|b| ALPHABET[(*b & 31) as usize] as char));
    s
}

/// Checks that `s` is an id of `kind`.
pub fn parse(kind: Kind, s: &str) -> Option<&str> {
    let body = s.strip_prefix(kind.prefix())?;
    (body.len() == BODY && body.bytes().all(|b| ALPHABET.contains(&b))).then_some(s)
}

/// A validated tenant id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

impl TenantId {
    pub fn parse(s: &str) -> Option<Self> {
        parse(Kind::Tenant, s).map(|s| Self(s.to_string()))
    }
    pub fn generate() -> Self {
        Self(new(Kind::Tenant))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TenantId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A random bearer secret: 32 bytes, base64url without padding.
pub fn secret() -> String {
    use base64::Engine;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_and_foreign_shapes_do_not() {
        let id = new(Kind::Account);
        assert_eq!(parse(Kind::Account, &id), Some(id.as_str()));
        assert_eq!(parse(Kind::Device, &id), None);
        for bad in [
            "",
            "ac_",
            "ac_../../spine/sys/x",
            "ac_ABCDEFGHIJKLMNOPQRSTUVWXYZ",
            "ac_abcdefghijklmnopqrstuvwxy/",
            "ac_abcdefghijklmnopqrstuvwxyz0",
        ] {
            assert_eq!(parse(Kind::Account, bad), None, "{bad}");
        }
    }

    #[test]
    fn ids_are_distinct() {
        let ids: std::collections::HashSet<_> = (0..1000).map(|_| new(Kind::Device)).collect();
        assert_eq!(ids.len(), 1000);
    }
}
