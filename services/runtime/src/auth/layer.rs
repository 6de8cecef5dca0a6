//! The tower layer that authenticates every request before routing.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http::{Request, Response};
use tower::{Layer, Service};

use super::{AuthRing, Caller, Principal, Scope};
use crate::store::Store;

/// Methods anyone may call: health checks and reflection carry no data.
fn is_public(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

/// The device scope a Spine method needs: `/spine.<scope>.v1.<Service>/<Method>`.
fn required_scope(path: &str) -> Option<Scope> {
    let pkg = path.strip_prefix("/spine.")?;
    Scope::parse(pkg.split('.').next()?)
}

/// Authenticates requests and attaches a [`Caller`] to them.
#[derive(Clone)]
pub struct AuthLayer {
    ring: Arc<AuthRing>,
    store: Arc<dyn Store>,
}

impl AuthLayer {
    pub fn new(ring: Arc<AuthRing>, store: Arc<dyn Store>) -> Self {
        Self { ring, store }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService { inner, layer: self.clone() }
    }
}

/// See [`AuthLayer`].
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    layer: AuthLayer,
}

impl<S, B> Service<Request<B>> for AuthService<S>
where
    S: Service<Request<B>, Response = Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // The clone is ready only if polled; swap so `inner` keeps readiness.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = req.uri().path().to_string();
        if is_public(&path) {
            return Box::pin(inner.call(req));
        }
        let bearer = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let bearer = bearer.map(str::to_string);
        let ring = self.layer.ring.clone();
        let store = self.layer.store.clone();
        Box::pin(async move {
            let result = match &bearer {
                None => Err(super::ring::AuthError::Missing),
                Some(b) => match ring.authenticate(b, crate::now_secs()) {
                    // A key published a moment ago on another node may not
                    // have reached this node's mirror yet: read it once.
                    Err(super::ring::AuthError::Token(super::token::TokenError::UnknownKey))
                        if ring.fetch_key(b).await =>
                    {
                        ring.authenticate(b, crate::now_secs())
                    }
                    other => other,
                },
            };
            let principal = match result {
                Ok(p) => p,
                Err(e) => {
                    crate::telemetry::metrics()
                        .auth_failures
                        .add(1, &[opentelemetry::KeyValue::new("reason", e.reason())]);
                    tracing::debug!(reason = e.reason(), "unauthenticated request");
                    let msg = if e == super::ring::AuthError::Missing {
                        "missing credentials"
                    } else {
                        "invalid credentials"
                    };
                    return Ok(tonic::Status::unauthenticated(msg).into_http());
                }
            };
            if let (Principal::Device { scopes, .. }, Some(scope)) = (&principal, required_scope(&path))
                && !scopes.contains(&scope)
            {
                let status =
                    tonic::Status::permission_denied(format!("device token lacks the {} scope", scope.as_str()));
                return Ok(status.into_http());
            }
            req.extensions_mut().insert(Caller::new(principal, store));
            inner.call(req).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_follow_the_package() {
        assert_eq!(required_scope("/spine.identity.v1.Identity/GetAccount"), Some(Scope::Identity));
        assert_eq!(required_scope("/spine.calls.v1.Calls/Signal"), Some(Scope::Calls));
        assert_eq!(required_scope("/other.v1.X/Y"), None);
        assert!(is_public("/grpc.health.v1.Health/Check"));
        assert!(is_public("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"));
        assert!(!is_public("/spine.identity.v1.TenantAdmin/ListTenants"));
    }
}
