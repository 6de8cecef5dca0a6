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
    MediaCredential,
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
            Kind::MediaCredential => "mc_",
        }
    }
}

/// A new random id of a kind.
pub fn new(kind: Kind) -> String {
    new_prefixed(kind.prefix())
}

/// Checks that `s` is an id of `kind`.
pub fn parse(kind: Kind, s: &str) -> Option<&str> {
    parse_prefixed(kind.prefix(), s)
}

/// A new random id with a service's own prefix (`cl_` for calls, ...),
/// of the same shape as the runtime's kinds.
pub fn new_prefixed(prefix: &str) -> String {
    let mut bytes = [0u8; BODY];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let mut s = String::with_capacity(prefix.len() + BODY);
    s.push_str(prefix);
    s.extend(bytes.iter().map(|b| ALPHABET[(*b & 31) as usize] as char));
    s
}

/// Checks that `s` is an id made by [`new_prefixed`] with `prefix`.
pub fn parse_prefixed<'a>(prefix: &str, s: &'a str) -> Option<&'a str> {
    let body = s.strip_prefix(prefix)?;
    (body.len() == BODY && body.bytes().all(|b| ALPHABET.contains(&b))).then_some(s)
}

/// Whether `c` is a bidirectional formatting character (embeddings,
/// overrides, isolates and marks), which can make a name display as
/// something else (`txt.exe` shown as `exe.txt`).
pub fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Longest idempotency key (`request_id`).
pub const MAX_REQUEST_ID: usize = 64;

/// Whether `v` is 1 to 64 characters of `[A-Za-z0-9._-]`: the shape of
/// request ids and of names clients choose (media node ids).
pub fn token_chars(v: &str) -> bool {
    !v.is_empty() && v.len() <= MAX_REQUEST_ID && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Checks an idempotency key; the error says what is wrong, for the
/// caller's INVALID_ARGUMENT on `request_id`.
pub fn request_id(v: &str) -> Result<&str, String> {
    if v.is_empty() || v.len() > MAX_REQUEST_ID {
        return Err(format!("required, 1 to {MAX_REQUEST_ID} characters"));
    }
    if !token_chars(v) {
        return Err("only A-Z, a-z, 0-9, '.', '_' and '-'".into());
    }
    Ok(v)
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
