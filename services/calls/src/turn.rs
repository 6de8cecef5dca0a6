//! TURN credentials in coturn's REST form (`use-auth-secret`): the
//! username is `<expiry>:<opaque id>`, the password the base64 HMAC-SHA1 of
//! the username under the shared secret. The id is a keyed hash of the call
//! and device, so coturn's logs name no account.

use base64::Engine;
use hmac::{Hmac, Mac};

/// Longest credential lifetime (seconds).
pub const MAX_TTL: u32 = 600;

/// The opaque TURN user id of a device in a call.
pub fn opaque_id(secret: &str, call_id: &str, device: &str) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(b"spine-turn-user\0");
    mac.update(call_id.as_bytes());
    mac.update(b"\0");
    mac.update(device.as_bytes());
    hex::encode(&mac.finalize().into_bytes()[..12])
}

/// (username, password) valid until `expires_at` (unix seconds).
pub fn mint(secret: &str, expires_at: i64, id: &str) -> (String, String) {
    let username = format!("{expires_at}:{id}");
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(username.as_bytes());
    let password = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    (username, password)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of draft-uberti-behave-turn-rest-00 as coturn computes
    /// it: secret `north`, username `1433875140:alice`.
    #[test]
    fn matches_coturn_rest_form() {
        let (u, p) = mint("north", 1_433_875_140, "alice");
        assert_eq!(u, "1433875140:alice");
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(b"north").unwrap();
        mac.update(b"1433875140:alice");
        assert_eq!(base64::engine::general_purpose::STANDARD.decode(&p).unwrap(), mac.finalize().into_bytes().to_vec());
        assert_eq!(p.len(), 28);
        let id = opaque_id("north", "cl_x", "dv_y");
        assert_eq!(id.len(), 24);
        assert_ne!(id, opaque_id("north", "cl_x", "dv_z"));
    }
}
