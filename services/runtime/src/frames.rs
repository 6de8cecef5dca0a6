//! The node's request size limit (`limits.max_message_bytes`), enforced on
//! the wire: the layer reads each gRPC frame's length prefix as the request
//! body streams in, and a message over the limit ends the request with
//! INVALID_ARGUMENT naming the limit, before any of it is buffered or
//! decoded. It is per node (from its config), and the same for every
//! service and for every message of a stream. A body that ends inside a
//! frame, and a gRPC-Web body that does not decode, are INVALID_ARGUMENT
//! too (not the INTERNAL the codec would say).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tonic::Status;
use tower::{Layer, Service};

/// See the module docs.
#[derive(Debug, Clone, Copy)]
pub struct MessageLimitLayer {
    max: usize,
}

impl MessageLimitLayer {
    pub fn new(max: usize) -> Self {
        Self { max }
    }
}

impl<S> Layer<S> for MessageLimitLayer {
    type Service = MessageLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MessageLimit { inner, max: self.max }
    }
}

/// See [`MessageLimitLayer`].
#[derive(Debug, Clone)]
pub struct MessageLimit<S> {
    inner: S,
    max: usize,
}

impl<S> Service<http::Request<tonic::body::Body>> for MessageLimit<S>
where
    S: Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let max = self.max;
        self.inner.call(req.map(|body| tonic::body::Body::new(LimitedBody::new(body, max))))
    }
}

/// A request body that fails as soon as a frame's declared length passes
/// the limit.
#[derive(Debug)]
pub struct LimitedBody<B> {
    inner: B,
    frames: FrameScan,
}

impl<B> LimitedBody<B> {
    pub fn new(inner: B, max: usize) -> Self {
        Self { inner, frames: FrameScan::new(max) }
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Status>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Err(len) = this.frames.scan(data)
                {
                    let max = this.frames.max;
                    return Poll::Ready(Some(Err(Status::invalid_argument(format!(
                        "message of {len} bytes exceeds the limit of {max} bytes"
                    )))));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(malformed_web(e.into())))),
            Poll::Ready(None) if this.frames.partial() => {
                this.frames.failed = true;
                Poll::Ready(Some(Err(Status::invalid_argument("the request ends inside a message frame"))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// gRPC-Web's translation ([`crate::web`]) reports a request it cannot
/// decode (bad base64, trailers where none belong) as INTERNAL; it is the
/// client's fault, so it is INVALID_ARGUMENT, like any malformed request.
fn malformed_web(s: Status) -> Status {
    match s.message().strip_prefix("tonic-web: ") {
        Some(m) if s.code() == tonic::Code::Internal => {
            Status::invalid_argument(format!("malformed gRPC-Web request: {m}"))
        }
        _ => s,
    }
}

/// Follows the gRPC framing (1 flag byte, 4 bytes of big-endian length,
/// the message) across body chunks of any size.
#[derive(Debug, Clone)]
pub struct FrameScan {
    max: usize,
    header: [u8; 5],
    have: usize,
    remaining: usize,
    failed: bool,
}

impl FrameScan {
    pub fn new(max: usize) -> Self {
        Self { max, header: [0; 5], have: 0, remaining: 0, failed: false }
    }

    /// Whether the data so far stops inside a frame (its header or its
    /// message).
    pub fn partial(&self) -> bool {
        !self.failed && (self.have > 0 || self.remaining > 0)
    }

    /// Consumes one chunk; the declared length of the first message over
    /// the limit, if any (and for every chunk after it).
    pub fn scan(&mut self, mut data: &[u8]) -> Result<(), usize> {
        if self.failed {
            return Err(self.max.saturating_add(1));
        }
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len());
                self.remaining -= n;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 5 {
                self.have = 0;
                let len = u32::from_be_bytes([self.header[1], self.header[2], self.header[3], self.header[4]]) as usize;
                if len > self.max {
                    self.failed = true;
                    return Err(len);
                }
                self.remaining = len;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(len: usize) -> Vec<u8> {
        let mut f = vec![0u8];
        f.extend_from_slice(&(len as u32).to_be_bytes());
        f.extend(std::iter::repeat_n(7u8, len));
        f
    }

    #[test]
    fn messages_up_to_the_limit_pass_and_the_first_over_it_fails() {
        let mut s = FrameScan::new(10);
        assert_eq!(s.scan(&[frame(10), frame(0), frame(3)].concat()), Ok(()));
        assert_eq!(s.scan(&frame(11)), Err(11));
        assert!(s.scan(&frame(1)).is_err(), "a failed stream stays failed");
    }

    #[test]
    fn a_body_cut_inside_a_frame_is_partial() {
        let mut s = FrameScan::new(100);
        let f = frame(10);
        assert_eq!(s.scan(&f), Ok(()));
        assert!(!s.partial(), "whole frames");
        assert_eq!(s.scan(&f[..3]), Ok(()));
        assert!(s.partial(), "inside a header");
        assert_eq!(s.scan(&f[3..8]), Ok(()));
        assert!(s.partial(), "inside a message");
        assert_eq!(s.scan(&f[8..]), Ok(()));
        assert!(!s.partial());
    }

    proptest! {
        /// However the body is cut into chunks, the verdict is the same.
        #[test]
        fn chunking_does_not_change_the_verdict(
            lens in prop::collection::vec(0usize..40, 1..6),
            cuts in prop::collection::vec(1usize..9, 1..50),
        ) {
            let body: Vec<u8> = lens.iter().flat_map(|l| frame(*l)).collect();
            let want = lens.iter().copied().find(|l| *l > 20);
            let mut s = FrameScan::new(20);
            let (mut at, mut got, mut i) = (0, None, 0);
            while at < body.len() {
                let n = cuts[i % cuts.len()].min(body.len() - at);
                if let Err(len) = s.scan(&body[at..at + n]) {
                    got = Some(len);
                    break;
                }
                at += n;
                i += 1;
            }
            prop_assert_eq!(got, want);
        }
    }
}
