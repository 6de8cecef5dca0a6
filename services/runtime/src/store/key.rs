//! [`Key`]: an absolute store key that only a scoped handle can make.
//!
//! Every write (a transaction's puts, deletes and compares) takes a `Key`,
//! never a string, and a `Key` comes only from a handle's `key(rel)`: a
//! [`super::TenantStore`] (under `/spine/t/<tenant>/`), the
//! [`super::SystemStore`] (`/spine/sys/`) or a [`super::SharedSpace`]. So
//! code that holds only its caller's tenant handle cannot even name another
//! tenant's key to write it, and a tenant handle's transaction refuses keys
//! made by any other handle ([`super::TenantStore::txn`]).

use std::fmt;
use std::ops::Deref;

/// See the module docs.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(String);

impl Key {
    /// Only the store's handles make keys.
    pub(crate) fn new(key: String) -> Self {
        Self(key)
    }

    /// A key from a raw string, for the store's own conformance tests and
    /// for tools that inspect a store. Services must not use it: clippy
    /// refuses it outside tests (`disallowed-methods` in `clippy.toml`).
    #[doc(hidden)]
    pub fn unchecked(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for Key {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl From<Key> for String {
    fn from(k: Key) -> Self {
        k.0
    }
}
