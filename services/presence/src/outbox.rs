//! Where one watch stream's states go: a bounded queue the owner pushes
//! into without ever waiting, and the response stream drains. A stream that
//! cannot keep up is marked overflowed instead (its watch then ends).
//!
//! It is one small allocation per watch that grows only while states wait
//! to be sent: an idle watch holds no buffer (a channel would hold a block
//! of slots from the start), and the watch's end (with its error) travels
//! in the same place.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use spine_proto::presence::v1::PresenceState;
use tokio::sync::Notify;
use tonic::Status;

#[derive(Clone)]
pub struct Outbox(Arc<Shared>);

struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the watch's manager: an overflow, or the stream dropped.
    alarm: Notify,
    capacity: usize,
}

#[derive(Default)]
struct Queue {
    states: VecDeque<PresenceState>,
    /// The response stream's waker while it waits for a state.
    reader: Option<Waker>,
    overflowed: bool,
    /// The response stream was dropped: the client left.
    gone: bool,
    /// The watch ended: the stream ends once it has read `failure`, or
    /// what is queued if there is none.
    ended: bool,
    failure: Option<Box<Status>>,
}

impl Outbox {
    pub fn new(capacity: usize) -> Self {
        Self(Arc::new(Shared { queue: Mutex::new(Queue::default()), alarm: Notify::new(), capacity }))
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.0.queue.lock().expect("outbox lock")
    }

    /// Queues a state without waiting; a full queue marks the stream
    /// overflowed (and drops the state). False once the stream is gone.
    pub fn push(&self, s: PresenceState) -> bool {
        let mut q = self.queue();
        if q.gone || q.ended {
            return false;
        }
        if q.states.len() >= self.0.capacity {
            if !q.overflowed {
                q.overflowed = true;
                self.0.alarm.notify_one();
            }
            return true;
        }
        q.states.push_back(s);
        if let Some(w) = q.reader.take() {
            w.wake();
        }
        true
    }

    /// Whether the stream fell behind by a full queue.
    pub fn overflowed(&self) -> bool {
        self.queue().overflowed
    }

    /// Whether the response stream is gone (the client left).
    pub fn gone(&self) -> bool {
        self.queue().gone
    }

    /// Waits for an overflow or the stream's drop (it may already have
    /// happened: check [`overflowed`](Self::overflowed) and
    /// [`gone`](Self::gone) after).
    pub async fn alarm(&self) {
        self.0.alarm.notified().await;
    }

    /// Ends the watch: the stream ends with `failure`, which takes
    /// precedence over anything still queued, or, without one, after what
    /// is queued.
    pub fn finish(&self, failure: Option<Status>) {
        let mut q = self.queue();
        q.ended = true;
        q.failure = failure.map(Box::new);
        if let Some(w) = q.reader.take() {
            w.wake();
        }
    }

    /// The stream's side: the next state, the failure that ended the watch,
    /// or the end.
    pub fn poll_next(&self, cx: &Context<'_>) -> Poll<Option<Result<PresenceState, Status>>> {
        let mut q = self.queue();
        if let Some(f) = q.failure.take() {
            q.states = VecDeque::new();
            return Poll::Ready(Some(Err(*f)));
        }
        if let Some(s) = q.states.pop_front() {
            if q.states.is_empty() && q.states.capacity() > 8 {
                // A burst is over: an idle watch keeps no large buffer.
                q.states = VecDeque::new();
            }
            return Poll::Ready(Some(Ok(s)));
        }
        if q.ended {
            return Poll::Ready(None);
        }
        if !q.reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            q.reader = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// The stream's side: it is dropped.
    pub fn close(&self) {
        let mut q = self.queue();
        q.gone = true;
        q.states = VecDeque::new();
        self.0.alarm.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker_ref;

    fn state(target: u32) -> PresenceState {
        PresenceState { target, ..Default::default() }
    }

    #[test]
    fn states_in_order_then_overflow_then_the_failure_first() {
        let out = Outbox::new(2);
        let cx = Context::from_waker(noop_waker_ref());
        assert!(out.poll_next(&cx).is_pending());
        assert!(out.push(state(1)) && out.push(state(2)));
        assert!(!out.overflowed());
        assert!(out.push(state(3)), "a full queue is not a gone stream");
        assert!(out.overflowed(), "the third state overflowed a queue of two");
        assert!(matches!(out.poll_next(&cx), Poll::Ready(Some(Ok(s))) if s.target == 1));
        // The watch ends with an error: it comes before what is queued.
        out.finish(Some(Status::resource_exhausted("too slow")));
        assert!(matches!(out.poll_next(&cx), Poll::Ready(Some(Err(e))) if e.code() == tonic::Code::ResourceExhausted));
        assert!(matches!(out.poll_next(&cx), Poll::Ready(None)));
        assert!(!out.push(state(4)), "nothing after the end");
    }

    #[test]
    fn an_end_without_failure_comes_after_what_is_queued_and_a_drop_is_seen() {
        let out = Outbox::new(4);
        let cx = Context::from_waker(noop_waker_ref());
        out.push(state(7));
        out.finish(None);
        assert!(matches!(out.poll_next(&cx), Poll::Ready(Some(Ok(s))) if s.target == 7));
        assert!(matches!(out.poll_next(&cx), Poll::Ready(None)));
        let other = Outbox::new(4);
        assert!(!other.gone());
        other.close();
        assert!(other.gone() && !other.push(state(1)));
    }

    #[tokio::test]
    async fn the_manager_hears_an_overflow_or_a_drop_even_if_it_was_not_waiting_yet() {
        let out = Outbox::new(1);
        out.push(state(1));
        out.push(state(2)); // overflow before anyone waits
        tokio::time::timeout(std::time::Duration::from_secs(1), out.alarm()).await.expect("alarm kept");
        assert!(out.overflowed());
        let other = Outbox::new(1);
        other.close();
        tokio::time::timeout(std::time::Duration::from_secs(1), other.alarm()).await.expect("alarm kept");
        assert!(other.gone());
    }
}
