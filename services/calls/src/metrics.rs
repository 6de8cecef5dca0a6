//! The calls service's metrics. Labels are kinds, states, outcomes and
//! reasons only: never a call, account or device id.

use std::sync::OnceLock;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, UpDownCounter};

use crate::model::{CallRec, Kind, Ring, State};

struct CallsMetrics {
    /// Live calls by kind and state, counted by the node that runs them.
    live: UpDownCounter<i64>,
    started: Counter<u64>,
    /// Ended calls by kind and reason.
    ended: Counter<u64>,
    /// How ringing ended for a rung account: answered, declined, cancelled,
    /// timed_out.
    ring_outcomes: Counter<u64>,
    /// Seconds from start to answer (direct) or to the second participant
    /// (group).
    setup: Histogram<f64>,
    /// Open signalling sessions on this node.
    sessions: UpDownCounter<i64>,
}

fn m() -> &'static CallsMetrics {
    static M: OnceLock<CallsMetrics> = OnceLock::new();
    M.get_or_init(|| {
        let m = opentelemetry::global::meter("spine.calls");
        CallsMetrics {
            live: m.i64_up_down_counter("spine.calls.live").with_description("Live calls by kind and state").build(),
            started: m.u64_counter("spine.calls.started").with_description("Calls started, by kind").build(),
            ended: m.u64_counter("spine.calls.ended").with_description("Calls ended, by kind and reason").build(),
            ring_outcomes: m
                .u64_counter("spine.calls.ring_outcomes")
                .with_description("How ringing ended for rung accounts")
                .build(),
            setup: m
                .f64_histogram("spine.calls.setup")
                .with_unit("s")
                .with_description("Start to answer (direct) or to a second participant (group)")
                .build(),
            sessions: m
                .i64_up_down_counter("spine.calls.sessions")
                .with_description("Open signalling sessions")
                .build(),
        }
    })
}

fn kind(r: &CallRec) -> &'static str {
    match r.kind {
        Kind::Direct => "direct",
        Kind::Group => "group",
    }
}

fn state(r: &CallRec) -> &'static str {
    match r.state {
        State::Ringing => "ringing",
        State::Active => "active",
        State::Ended => "ended",
    }
}

fn ring(r: &Ring) -> Option<&'static str> {
    match r {
        Ring::Answered(_) => Some("answered"),
        Ring::Declined(_) => Some("declined"),
        Ring::Cancelled => Some("cancelled"),
        Ring::TimedOut => Some("timed_out"),
        Ring::None | Ring::Ringing => None,
    }
}

/// A mirrored change of a call, counted by the node that runs it.
pub(crate) fn observe(me: &str, old: Option<&CallRec>, new: Option<&CallRec>) {
    for (r, delta) in [(old, -1), (new, 1)] {
        if let Some(r) = r
            && r.home == me
            && r.state != State::Ended
        {
            m().live.add(delta, &[KeyValue::new("kind", kind(r)), KeyValue::new("state", state(r))]);
        }
    }
}

pub(crate) fn started(r: &CallRec) {
    m().started.add(1, &[KeyValue::new("kind", kind(r))]);
}

/// A transition this node made.
pub(crate) fn transition(before: &CallRec, after: &CallRec) {
    for (b, a) in before.parties.iter().zip(&after.parties) {
        if b.ring == Ring::Ringing
            && let Some(o) = ring(&a.ring)
        {
            m().ring_outcomes.add(1, &[KeyValue::new("kind", kind(after)), KeyValue::new("outcome", o)]);
        }
    }
    if before.answered_ms.is_none()
        && let Some(at) = after.answered_ms
    {
        m().setup.record((at - after.started_ms).max(0) as f64 / 1000.0, &[KeyValue::new("kind", kind(after))]);
    }
    if before.state != State::Ended
        && let Some(e) = after.end
    {
        m().ended.add(1, &[KeyValue::new("kind", kind(after)), KeyValue::new("reason", e.as_str())]);
    }
}

pub(crate) fn busy() {
    m().ended.add(1, &[KeyValue::new("kind", "direct"), KeyValue::new("reason", "busy")]);
}

pub(crate) fn sessions(delta: i64) {
    m().sessions.add(delta, &[]);
}
