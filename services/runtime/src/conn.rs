//! Accepted connections that close when idle.
//!
//! Every accepted TCP connection is wrapped in a [`Tracked`] stream whose
//! [`Activity`] travels into each request's extensions (tonic's
//! `Connected::connect_info`). The [`ActivityLayer`] counts the requests and
//! streams open on the connection (a response body counts until it ends);
//! when none has been open for `idle`, the connection reads end-of-stream
//! and closes. HTTP/2 keepalive pings do not count as activity: a
//! connection holding nothing is closed however alive its peer is.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tower::{Layer, Service};

/// What a connection has open, shared by its stream and its requests.
#[derive(Debug)]
struct State {
    open: AtomicUsize,
    /// When `open` last dropped to zero (or the connection was accepted).
    idle_since: std::sync::Mutex<Instant>,
}

/// A handle on a connection's activity, in every request's extensions.
#[derive(Debug, Clone)]
pub struct Activity(Arc<State>);

impl Activity {
    fn start(&self) -> OpenGuard {
        self.0.open.fetch_add(1, Ordering::SeqCst);
        OpenGuard(self.0.clone())
    }
}

/// Counts one open request or stream until dropped.
#[derive(Debug)]
pub struct OpenGuard(Arc<State>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            *self.0.idle_since.lock().expect("idle lock") = Instant::now();
        }
    }
}

/// An accepted TCP connection that reads end-of-stream once it has held no
/// request for `idle` (never, if `idle` is zero).
#[derive(Debug)]
pub struct Tracked {
    inner: tokio::net::TcpStream,
    state: Arc<State>,
    idle: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Tracked {
    pub fn new(inner: tokio::net::TcpStream, idle: Duration) -> Self {
        let state = Arc::new(State { open: AtomicUsize::new(0), idle_since: std::sync::Mutex::new(Instant::now()) });
        let timer = (!idle.is_zero()).then(|| Box::pin(tokio::time::sleep(idle)));
        Self { inner, state, idle, timer }
    }

    /// Whether the connection has been idle long enough to close; if not,
    /// re-arms the timer for when it could be.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(timer) = self.timer.as_mut() else { return false };
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            let since = *self.state.idle_since.lock().expect("idle lock");
            if self.state.open.load(Ordering::SeqCst) == 0 && since.elapsed() >= self.idle {
                return true;
            }
            let next = if self.state.open.load(Ordering::SeqCst) == 0 {
                since + self.idle
            } else {
                Instant::now() + self.idle
            };
            timer.as_mut().reset(tokio::time::Instant::from_std(next));
        }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.expired(cx) {
            // End of stream: the server closes the connection.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Tracked {
    type ConnectInfo = Activity;
    fn connect_info(&self) -> Activity {
        Activity(self.state.clone())
    }
}

/// Counts each request (and its response body, which for a stream lives as
/// long as the stream) as activity on its connection.
#[derive(Debug, Clone, Default)]
pub struct ActivityLayer;

impl<S> Layer<S> for ActivityLayer {
    type Service = ActivityService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ActivityService { inner }
    }
}

/// See [`ActivityLayer`].
#[derive(Debug, Clone)]
pub struct ActivityService<S> {
    inner: S,
}

fn activity_of<B>(req: &http::Request<B>) -> Option<Activity> {
    let ext = req.extensions();
    ext.get::<Activity>()
        .cloned()
        .or_else(|| ext.get::<tonic::transport::server::TlsConnectInfo<Activity>>().map(|t| t.get_ref().clone()))
}

impl<S, B> Service<http::Request<B>> for ActivityService<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let guard = activity_of(&req).map(|a| a.start());
        Box::pin(async move {
            let resp = inner.call(req).await?;
            Ok(match guard {
                Some(g) => resp.map(|body| tonic::body::Body::new(Guarded { body, _guard: g })),
                None => resp,
            })
        })
    }
}

/// A response body that keeps its connection busy until it ends.
struct Guarded {
    body: tonic::body::Body,
    _guard: OpenGuard,
}

impl http_body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
