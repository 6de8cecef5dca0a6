//! In-call markers: which accounts take part in an answered call. Calls
//! writes them under the call's lease; presence reads them to show IN_CALL.

/// Control plane: `calls/incall/<tenant>/<account>/<call>`, present while
/// the account takes part in an answered call (under the call's lease).
/// Calls writes these; presence reads them to show IN_CALL.
pub const IN_CALL_PREFIX: &str = "calls/incall/";

pub fn in_call_key(tenant: &str, account: &str, call: &str) -> String {
    format!("{IN_CALL_PREFIX}{tenant}/{account}/{call}")
}

/// The (tenant, account, call) of an in-call marker key relative to the
/// control plane.
pub fn parse_in_call_key(rel: &str) -> Option<(String, String, String)> {
    let mut it = rel.strip_prefix(IN_CALL_PREFIX)?.splitn(3, '/');
    Some((it.next()?.to_string(), it.next()?.to_string(), it.next()?.to_string()))
}
