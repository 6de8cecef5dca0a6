//! Logs, traces and metrics.
//!
//! Logs go to stderr (`RUST_LOG` filters them). When
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, traces and metrics are also exported
//! over OTLP/gRPC, configured by the standard `OTEL_*` variables.
//!
//! Privacy rules, enforced here and by tests: account, device and call ids
//! appear only as keyed hashes ([`Redactor`], `Runtime::redact`); tokens, secrets, IP addresses,
//! phone numbers and payloads never appear at all. The hash key comes from
//! config (`telemetry.id_hash_key`, shared by all nodes so hashes correlate
//! across them) or is random per process.

use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, UpDownCounter};
use opentelemetry::trace::TracerProvider as _;
use sha2::Sha256;
use tower::{Layer, Service};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Keyed hashing of identifiers for logs, traces and metrics, with the
/// node's `telemetry.id_hash_key` (shared by all nodes so hashes correlate
/// across them; a random key per node when unset).
#[derive(Clone)]
pub struct Redactor([u8; 32]);

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Redactor")
    }
}

impl Redactor {
    /// A redactor keyed by `key` (any length), or by a random key.
    pub fn new(key: Option<&[u8]>) -> Self {
        let mut k = [0u8; 32];
        match key {
            Some(key) => k.copy_from_slice(&<Sha256 as sha2::Digest>::digest(key)),
            None => rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k),
        }
        Self(k)
    }

    /// The keyed hash of an identifier: 16 hex characters of HMAC-SHA256.
    /// Stable for a given key, useless without it.
    pub fn redact(&self, id: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("hmac takes any key length");
        mac.update(id.as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..8])
    }
}

/// Spine's metric instruments.
pub struct Metrics {
    /// RPC latency in seconds, by method and gRPC code.
    pub rpc_duration: Histogram<f64>,
    /// Requests refused by the auth layer, by reason.
    pub auth_failures: Counter<u64>,
    /// Open server streams, by method.
    pub open_streams: UpDownCounter<i64>,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The instruments, created from the global meter provider on first use
/// (after [`init`], which installs the OTLP provider if configured).
pub fn metrics() -> &'static Metrics {
    METRICS.get_or_init(|| {
        let m = opentelemetry::global::meter("spine");
        Metrics {
            rpc_duration: m.f64_histogram("spine.rpc.duration").with_unit("s").with_description("RPC latency").build(),
            auth_failures: m
                .u64_counter("spine.auth.failures")
                .with_description("Requests refused by authentication")
                .build(),
            open_streams: m
                .i64_up_down_counter("spine.rpc.open_streams")
                .with_description("Open server streams")
                .build(),
        }
    })
}

/// Shuts exporters down (flushing them) when dropped.
#[derive(Default)]
pub struct TelemetryGuard {
    tracer: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    meter: Option<opentelemetry_sdk::metrics::SdkMeterProvider>,
}

impl std::fmt::Debug for TelemetryGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryGuard").field("otlp", &self.tracer.is_some()).finish()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(t) = self.tracer.take() {
            let _ = t.shutdown();
        }
        if let Some(m) = self.meter.take() {
            let _ = m.shutdown();
        }
    }
}

/// Installs logging, and OTLP export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
pub fn init(service_name: &str, json_logs: bool) -> Result<TelemetryGuard, String> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json_logs { fmt.json().boxed() } else { fmt.compact().boxed() };
    let mut guard = TelemetryGuard::default();
    let otel_layer = if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() {
        let resource = opentelemetry_sdk::Resource::builder().with_service_name(service_name.to_string()).build();
        let spans = opentelemetry_otlp::SpanExporter::builder().with_tonic().build().map_err(|e| e.to_string())?;
        let tracer = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(spans)
            .with_resource(resource.clone())
            .build();
        let metrics = opentelemetry_otlp::MetricExporter::builder().with_tonic().build().map_err(|e| e.to_string())?;
        let meter = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
            .with_periodic_exporter(metrics)
            .with_resource(resource)
            .build();
        opentelemetry::global::set_meter_provider(meter.clone());
        opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
        let layer = tracing_opentelemetry::layer().with_tracer(tracer.tracer("spine"));
        guard.tracer = Some(tracer);
        guard.meter = Some(meter);
        Some(layer)
    } else {
        None
    };
    tracing_subscriber::registry().with(filter).with(fmt).with(otel_layer).try_init().map_err(|e| e.to_string())?;
    Ok(guard)
}

use tracing_subscriber::Layer as _;

/// Reads W3C trace context from request headers.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Label of every request whose path names no method Spine serves.
pub const UNKNOWN_METHOD: &str = "unknown";

/// Every method path this build serves (Spine's services, health,
/// reflection): the only paths that may become a label.
fn known_methods() -> &'static std::collections::HashSet<String> {
    static KNOWN: OnceLock<std::collections::HashSet<String>> = OnceLock::new();
    KNOWN.get_or_init(|| {
        use prost::Message;
        let mut known = std::collections::HashSet::new();
        for set in [spine_proto::FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET] {
            let fds = prost_types::FileDescriptorSet::decode(set).expect("built-in descriptor set");
            for f in &fds.file {
                for svc in &f.service {
                    for m in &svc.method {
                        known.insert(format!("/{}.{}/{}", f.package(), svc.name(), m.name()));
                    }
                }
            }
        }
        for v in ["v1", "v1alpha"] {
            known.insert(format!("/grpc.reflection.{v}.ServerReflection/ServerReflectionInfo"));
        }
        known
    })
}

/// The label for a request path: the path if it names a method Spine
/// serves, else [`UNKNOWN_METHOD`]. A client chooses the path it sends, so
/// anything else (an e-mail address, a phone number, an IP) must never
/// reach a span or a metric.
pub fn method_label(path: &str) -> &str {
    if known_methods().contains(path) { path } else { UNKNOWN_METHOD }
}

/// The caller's W3C trace context, to continue its trace: trace id, parent
/// span id and flags only. The caller's `tracestate` (free text a client
/// writes) is dropped, never exported.
fn remote_parent(headers: &http::HeaderMap) -> opentelemetry::Context {
    use opentelemetry::trace::{SpanContext, TraceContextExt, TraceState};
    let extracted = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    let sc = extracted.span().span_context().clone();
    if !sc.is_valid() {
        return opentelemetry::Context::new();
    }
    let clean = SpanContext::new(sc.trace_id(), sc.span_id(), sc.trace_flags(), true, TraceState::default());
    opentelemetry::Context::new().with_remote_span_context(clean)
}

/// One server span per RPC (continuing the caller's W3C trace context) and
/// its latency and outcome as metrics, labelled by method and code only: no
/// peer address, no identifiers, no path a client made up.
#[derive(Clone, Debug, Default)]
pub struct TelemetryLayer;

impl<S> Layer<S> for TelemetryLayer {
    type Service = TelemetryService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TelemetryService { inner }
    }
}

/// See [`TelemetryLayer`].
#[derive(Clone, Debug)]
pub struct TelemetryService<S> {
    inner: S,
}

impl<S, B, RB> Service<http::Request<B>> for TelemetryService<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
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
        let method = method_label(req.uri().path()).to_string();
        let start = Instant::now();
        let span = tracing::info_span!(
            "rpc",
            otel.name = %method,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        let parent = remote_parent(req.headers());
        // Without an OTLP exporter there is no OpenTelemetry layer to parent to.
        let _ = tracing_opentelemetry::OpenTelemetrySpanExt::set_parent(&span, parent);
        let fut = async move {
            let resp = inner.call(req).await?;
            // Errors are sent trailers-only, so their code is in the headers;
            // a response without one started normally.
            let code = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).unwrap_or("0").to_string();
            tracing::Span::current().record("rpc.grpc.status_code", code.as_str());
            metrics().rpc_duration.record(
                start.elapsed().as_secs_f64(),
                &[KeyValue::new("rpc.method", method), KeyValue::new("rpc.grpc.status_code", code)],
            );
            Ok(resp)
        };
        Box::pin(tracing::Instrument::instrument(fut, span))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_methods_become_labels() {
        assert_eq!(method_label("/spine.identity.v1.Identity/GetAccount"), "/spine.identity.v1.Identity/GetAccount");
        assert_eq!(method_label("/grpc.health.v1.Health/Check"), "/grpc.health.v1.Health/Check");
        for made_up in ["/needle@example.test/+15550001111", "/203.0.113.77/x", "/spine.identity.v1.Identity/Nope", ""]
        {
            assert_eq!(method_label(made_up), UNKNOWN_METHOD);
        }
    }

    #[test]
    fn redaction_is_stable_and_hides_the_id() {
        let r = Redactor::new(Some(b"deployment key"));
        let a = r.redact("ac_abcdefghijklmnopqrstuvwxyz");
        assert_eq!(a, r.redact("ac_abcdefghijklmnopqrstuvwxyz"));
        assert_eq!(a, Redactor::new(Some(b"deployment key")).redact("ac_abcdefghijklmnopqrstuvwxyz"));
        assert_ne!(a, Redactor::new(Some(b"another key")).redact("ac_abcdefghijklmnopqrstuvwxyz"));
        assert_ne!(a, r.redact("ac_abcdefghijklmnopqrstuvwxy2"));
        assert_eq!(a.len(), 16);
        assert!(!a.contains("ac_"));
    }
}
