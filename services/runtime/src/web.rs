//! Browsers: gRPC-Web (tonic-web) on the same listener as gRPC, for every
//! service, and the web origins allowed to call (`[web] allowed_origins`).
//!
//! A request carrying an `Origin` header comes from a web page. If that
//! origin is on the list, the request goes on, and its answer carries the
//! CORS headers a browser needs (preflights are answered here); if it is
//! not, the request is refused here, before authentication and before any
//! service: a preflight with 403, anything else with PERMISSION_DENIED,
//! reason ORIGIN_NOT_ALLOWED. Requests without `Origin` (native gRPC
//! clients, servers) are not affected. Everything after this layer (message
//! limit, telemetry, auth, rate limits) is the same for gRPC and gRPC-Web.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::{Either, Ready, ready};
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tower::{Layer, Service};
use tower_http::cors::{AllowOrigin, Cors, CorsLayer};

/// `[web]`: which web origins may call this node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct WebConfig {
    /// Origins (`scheme://host[:port]`, exactly as browsers send them)
    /// whose pages may call Spine over gRPC-Web. Empty: no web page may.
    pub allowed_origins: Vec<String>,
}

impl WebConfig {
    /// Refuses entries that no browser would send as an `Origin`.
    pub fn check(&self) -> Result<(), String> {
        for o in &self.allowed_origins {
            let rest = o.strip_prefix("https://").or_else(|| o.strip_prefix("http://"));
            let ok = rest
                .is_some_and(|r| !r.is_empty() && !r.contains('/') && r.is_ascii() && !r.contains(char::is_whitespace));
            if !ok {
                return Err(format!("web.allowed_origins: {o:?} is not an origin (scheme://host[:port], no path)"));
            }
        }
        Ok(())
    }
}

/// Headers a gRPC-Web client sends besides the safelisted ones.
const REQUEST_HEADERS: [&str; 6] =
    ["authorization", "content-type", "x-grpc-web", "x-user-agent", "grpc-timeout", "traceparent"];
/// Headers a gRPC-Web client must read from an answer (a trailers-only
/// answer carries its status in headers).
const RESPONSE_HEADERS: [&str; 3] = ["grpc-status", "grpc-message", "grpc-status-details-bin"];
/// How long a browser may cache a preflight's answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// See the module docs.
#[derive(Debug, Clone)]
pub struct OriginLayer {
    allowed: Arc<[HeaderValue]>,
    cors: CorsLayer,
}

impl OriginLayer {
    /// From a checked [`WebConfig`].
    ///
    /// # Panics
    /// If an origin is not a valid header value ([`WebConfig::check`] first).
    pub fn new(config: &WebConfig) -> Self {
        let allowed: Arc<[HeaderValue]> = config
            .allowed_origins
            .iter()
            .map(|o| HeaderValue::from_str(o).expect("origins are checked when the config loads"))
            .collect();
        let cors = CorsLayer::new()
            .allow_origin(AllowOrigin::list(allowed.iter().cloned()))
            .allow_methods([Method::POST])
            .allow_headers(REQUEST_HEADERS.map(HeaderName::from_static))
            .expose_headers(RESPONSE_HEADERS.map(HeaderName::from_static))
            .max_age(PREFLIGHT_MAX_AGE);
        Self { allowed, cors }
    }
}

impl<S> Layer<S> for OriginLayer {
    type Service = OriginCheck<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OriginCheck { allowed: self.allowed.clone(), inner: self.cors.layer(inner) }
    }
}

/// See [`OriginLayer`].
#[derive(Debug, Clone)]
pub struct OriginCheck<S> {
    allowed: Arc<[HeaderValue]>,
    inner: Cors<S>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for OriginCheck<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response<ResBody>, S::Error>>, <Cors<S> as Service<Request<ReqBody>>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        match req.headers().get(http::header::ORIGIN) {
            Some(origin) if !self.allowed.contains(origin) => Either::Left(ready(Ok(refused(req.method())))),
            _ => Either::Right(self.inner.call(req)),
        }
    }
}

/// The answer to a page of an origin not on the list: no CORS headers, so
/// the browser shows the page nothing either way.
fn refused<B: Default>(method: &Method) -> Response<B> {
    if method == Method::OPTIONS {
        let mut r = Response::new(B::default());
        *r.status_mut() = StatusCode::FORBIDDEN;
        return r;
    }
    crate::error::with_reason(
        tonic::Code::PermissionDenied,
        "this origin may not call Spine (web.allowed_origins)",
        "ORIGIN_NOT_ALLOWED",
    )
    .into_http()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_must_be_bare_scheme_host_port() {
        let ok = WebConfig { allowed_origins: vec!["http://127.0.0.1:5170".into(), "https://app.example".into()] };
        assert_eq!(ok.check(), Ok(()));
        for bad in ["app.example", "https://app.example/", "https://app.example/x", "ftp://a", "https://", "*"] {
            let c = WebConfig { allowed_origins: vec![bad.into()] };
            assert!(c.check().is_err(), "{bad} accepted");
        }
    }
}
