//! spine-read-models: the records one service writes and others read,
//! defined once so their layout lives in one place. It stands above
//! spine-runtime (which knows no service) and below the services.
//!
//! - [`directory`]: identity's accounts, devices, settings, contacts,
//!   blocks and interop-handle index, and the consent checks built on them
//!   (identity writes; groups, presence and calls read).
//! - [`roster`]: a group's epoch and member devices (groups writes; calls
//!   reads).
//! - [`in_call`]: in-call markers (calls writes; presence reads).

pub mod directory;
pub mod in_call;
pub mod roster;
