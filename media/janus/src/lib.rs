//! Janus, the SFU Spine's group calls use as their media node: a client of
//! its HTTP API ([`client`]) and the media-node agent ([`agent`]) that
//! registers one Janus with Spine and keeps its rooms as Spine says.
//! See docs/operations.md ("Media nodes") and docs/architecture.md.

pub mod agent;
pub mod client;
pub mod config;

pub use agent::{AgentConfig, AgentError, run};
pub use client::{Handle, Janus, JanusError, Session};
