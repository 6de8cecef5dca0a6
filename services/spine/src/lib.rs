//! The `spine` binary's library: assembling a node from the service crates,
//! the `dev` command, and the operator's admin commands. `main.rs` only
//! parses flags and calls in here.

pub mod admin;
pub mod dev;
pub mod node;
