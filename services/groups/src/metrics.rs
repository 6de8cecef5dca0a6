//! The groups service's metrics. Labels are outcomes and reasons only:
//! never a group, account or device id.

use std::sync::OnceLock;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};

pub(crate) struct GroupsMetrics {
    /// Commits by result: accepted, wrong_epoch, invalid, refused, other.
    pub commits: Counter<u64>,
    /// Key-package operations: upload accepted/rejected; claim single_use,
    /// last_resort or none.
    pub key_packages: Counter<u64>,
    /// Single-use packages a device has left, when it counts or uploads.
    pub pool_depth: Histogram<u64>,
    /// Seconds from a message entering a group's log to reaching a mailbox.
    pub fanout_lag: Histogram<f64>,
    /// Groups the upkeep failed on (it goes on with the others).
    pub upkeep_failures: Counter<u64>,
    /// Groups the upkeep deleted, by reason.
    pub groups_deleted: Counter<u64>,
    /// Application messages dropped for a device whose mailbox was full.
    pub dropped: Counter<u64>,
    /// Disputes reported.
    pub disputes: Counter<u64>,
    /// Commits voided after disputes.
    pub voided: Counter<u64>,
    /// Group states a request needed, by where they came from: `written`
    /// (what the node's last commit to the group wrote, with no read),
    /// `kept` (the node's verifier cache, for the slot it read) or `store`
    /// (restored from the stored slot).
    pub states: Counter<u64>,
}

pub(crate) fn metrics() -> &'static GroupsMetrics {
    static M: OnceLock<GroupsMetrics> = OnceLock::new();
    M.get_or_init(|| {
        let m = opentelemetry::global::meter("spine.groups");
        GroupsMetrics {
            commits: m.u64_counter("spine.groups.commits").with_description("Commits by result").build(),
            key_packages: m
                .u64_counter("spine.groups.key_packages")
                .with_description("Key-package uploads and claims by result")
                .build(),
            pool_depth: m
                .u64_histogram("spine.groups.key_packages.remaining")
                .with_description("Single-use key packages a device has left, when it counts or uploads")
                .build(),
            fanout_lag: m
                .f64_histogram("spine.groups.fanout.lag")
                .with_unit("s")
                .with_description("Log to mailbox delay")
                .build(),
            upkeep_failures: m
                .u64_counter("spine.groups.upkeep.failures")
                .with_description("Groups the upkeep failed on")
                .build(),
            groups_deleted: m.u64_counter("spine.groups.deleted").with_description("Groups deleted, by reason").build(),
            dropped: m
                .u64_counter("spine.groups.mailbox.dropped")
                .with_description("Application messages dropped for devices whose mailbox was full")
                .build(),
            disputes: m.u64_counter("spine.groups.disputes").with_description("Disputes reported").build(),
            voided: m.u64_counter("spine.groups.voided").with_description("Commits voided after disputes").build(),
            states: m
                .u64_counter("spine.groups.states")
                .with_description(
                    "Group states a request needed: written by the node, kept by it, or restored from the store",
                )
                .build(),
        }
    })
}

pub(crate) fn commit(result: &'static str) {
    metrics().commits.add(1, &[KeyValue::new("result", result)]);
}

pub(crate) fn state(from: &'static str) {
    metrics().states.add(1, &[KeyValue::new("from", from)]);
}

pub(crate) fn dropped() {
    metrics().dropped.add(1, &[]);
}

pub(crate) fn dispute() {
    metrics().disputes.add(1, &[]);
}

pub(crate) fn voided() {
    metrics().voided.add(1, &[]);
}

pub(crate) fn upkeep_failure() {
    metrics().upkeep_failures.add(1, &[]);
}

pub(crate) fn group_deleted(reason: &str) {
    metrics().groups_deleted.add(1, &[KeyValue::new("reason", reason.to_string())]);
}

pub(crate) fn key_package(op: &'static str, result: &'static str) {
    metrics().key_packages.add(1, &[KeyValue::new("op", op), KeyValue::new("result", result)]);
}

/// The result label of a failed commit.
pub(crate) fn commit_failure(e: &crate::error::GroupsError) -> &'static str {
    use crate::error::GroupsError as E;
    match e {
        E::WrongEpoch { .. } => "wrong_epoch",
        E::Invalid { .. } | E::Mls { .. } => "invalid",
        E::Refused(_) => "refused",
        E::NotFound(_) => "not_found",
        E::Conflict => "conflict",
        E::Rate(_) => "rate_limited",
        _ => "other",
    }
}
