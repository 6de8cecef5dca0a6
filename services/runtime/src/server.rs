//! The gRPC server every Spine node runs: the services of the node behind
//! metrics and auth layers, plus grpc.health.v1 and server reflection, with
//! graceful drain. The same listener serves gRPC-Web to browsers of the
//! allowed origins ([`crate::web`]).
//!
//! Health: the service name `liveness` is SERVING while the process runs;
//! `readiness` (and the empty name, which Kubernetes' gRPC probe uses by
//! default) is SERVING once the auth mirror is loaded and until draining
//! starts; each Spine service's own name follows readiness. With
//! `health_listen` set, the same health answers also come from a plaintext
//! listener of their own that serves nothing else: Kubernetes' gRPC probes
//! speak plaintext, and the main port may serve only TLS.
//!
//! Drain, on the future passed to [`serve`] (SIGTERM in the binary): report
//! not-ready, cancel [`crate::Runtime::drain`] so streams tell clients to
//! reconnect elsewhere, keep serving for `drain.ready_delay_ms`, stop
//! accepting, give in-flight work `drain.grace_secs`, then close what is
//! left (tonic alone would wait forever on open streams).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::transport::{Identity, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::Runtime;
use crate::auth::AuthLayer;
use crate::telemetry::TelemetryLayer;

/// Health service name that reports liveness.
pub const LIVENESS: &str = "liveness";
/// Health service name that reports readiness.
pub const READINESS: &str = "readiness";

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot bind {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("reflection: {0}")]
    Reflection(String),
    #[error("server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Binds the configured address.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr).await.map_err(|e| ServeError::Bind(addr, e))
}

async fn set_all(health: &HealthReporter, names: &[&'static str], status: ServingStatus) {
    for n in ["", READINESS].iter().chain(names) {
        health.set_service_status(*n, status).await;
    }
}

/// Channels to other nodes of a service, one per address, made lazily
/// (presence forwarding to owners, calls relaying to stream holders).
#[derive(Debug, Default)]
pub struct PeerChannels(std::sync::Mutex<std::collections::HashMap<String, tonic::transport::Channel>>);

impl PeerChannels {
    /// The channel to the node at `addr`, over the transport this node
    /// serves ([`peer_endpoint`]).
    pub fn get(&self, config: &crate::Config, addr: &str) -> Result<tonic::transport::Channel, tonic::Status> {
        let mut peers = self.0.lock().expect("peer channels lock");
        if let Some(c) = peers.get(addr) {
            return Ok(c.clone());
        }
        let c = peer_endpoint(config, addr)
            .map_err(|e| crate::error::internal(&e))?
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy();
        peers.insert(addr.to_string(), c.clone());
        Ok(c)
    }
}

/// An endpoint to another Spine node at `addr` (`host:port`): over TLS,
/// verified against `tls.peer_ca` for the name `tls.peer_name`, when this
/// node serves TLS; plaintext otherwise.
pub fn peer_endpoint(config: &crate::Config, addr: &str) -> Result<tonic::transport::Endpoint, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let Some(tls) = &config.tls else {
        return Endpoint::from_shared(format!("http://{addr}")).map_err(|e| e.to_string());
    };
    let (Some(ca), Some(name)) = (&tls.peer_ca, &tls.peer_name) else {
        return Err("with TLS on, tls.peer_ca and tls.peer_name are needed to reach other nodes".into());
    };
    let pem = std::fs::read(ca).map_err(|e| format!("tls.peer_ca {}: {e}", ca.display()))?;
    Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| e.to_string())?
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)).domain_name(name.clone()))
        .map_err(|e| e.to_string())
}

/// Serves `routes` (whose fully-qualified service names are `names`) on
/// `listener` until `shutdown` resolves, then drains.
pub async fn serve(
    rt: Arc<Runtime>,
    routes: Routes,
    names: Vec<&'static str>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status(LIVENESS, ServingStatus::Serving).await;
    set_all(&health, &names, ServingStatus::NotServing).await;

    // The plaintext health-only listener, up until the main server stops.
    let (health_stop_tx, health_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let health_only = match rt.config.health_listen {
        Some(addr) => {
            let l = bind(addr).await?;
            tracing::info!(addr = %l.local_addr().unwrap_or(addr), "health listener (plaintext, health only)");
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
            Some(tokio::spawn(
                tonic::transport::Server::builder().add_service(health_service.clone()).serve_with_incoming_shutdown(
                    incoming,
                    async {
                        let _ = health_stop_rx.await;
                    },
                ),
            ))
        }
        None => None,
    };
    let stop_health = move || {
        let _ = health_stop_tx.send(());
        if let Some(h) = health_only {
            h.abort();
        }
    };

    // Reflection in both versions: v1, and v1alpha that many tools
    // (grpcurl, grpcio-reflection) still speak.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(spine_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(spine_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;

    let mut builder = tonic::transport::Server::builder()
        // gRPC-Web from browsers comes over HTTP/1.1 as well as HTTP/2.
        .accept_http1(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // One connection holds at most this many requests and streams.
        .max_concurrent_streams(Some(rt.config.limits.max_streams_per_connection));
    if let Some(tls) = &rt.config.tls {
        let cert = std::fs::read(&tls.cert).map_err(|e| ServeError::Tls(format!("{}: {e}", tls.cert.display())))?;
        let key = std::fs::read(&tls.key).map_err(|e| ServeError::Tls(format!("{}: {e}", tls.key.display())))?;
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
            .map_err(|e| ServeError::Tls(e.to_string()))?;
    }
    let stack = tower::ServiceBuilder::new()
        // Outermost: every request (and stream, until it ends) keeps its
        // connection from being closed as idle.
        .layer(crate::conn::ActivityLayer)
        // Web pages: only from allowed origins (refused here otherwise),
        // with CORS; then gRPC-Web becomes gRPC for everything after.
        .layer(crate::web::OriginLayer::new(&rt.config.web))
        .layer(tonic_web::GrpcWebLayer::new())
        // Requests over the node's message limit end before they are read.
        .layer(crate::frames::MessageLimitLayer::new(
            rt.config.limits.max_message_bytes.min(spine_proto::codec::TRANSPORT_MAX_MESSAGE_BYTES),
        ))
        // Every request is traced and measured, refused ones too.
        .layer(TelemetryLayer)
        // Then authentication, before any routing to a service: no handler
        // runs without a Caller.
        .layer(AuthLayer::new(rt.auth.clone(), rt.store.clone()))
        .into_inner();

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // Without TCP_NODELAY, small messages pushed on a long-lived stream
    // wait for the peer's delayed ACK (tens of milliseconds each). Each
    // connection closes once it has held nothing for the idle time.
    let idle = Duration::from_secs(rt.config.limits.idle_connection_secs);
    let incoming = futures::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), move |s| {
        s.and_then(|s| {
            s.set_nodelay(true)?;
            Ok(crate::conn::Tracked::new(s, idle))
        })
    });
    let server = builder
        .layer(stack)
        .add_routes(routes)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        });
    let mut server = tokio::spawn(server);

    // Ready once credentials can be verified.
    let ready = {
        let rt = rt.clone();
        let health = health.clone();
        let names = names.clone();
        tokio::spawn(async move {
            rt.auth.wait_synced().await;
            set_all(&health, &names, ServingStatus::Serving).await;
        })
    };

    tokio::select! {
        res = &mut server => {
            ready.abort();
            stop_health();
            return res.map_err(|e| ServeError::Reflection(format!("server task: {e}")))?.map_err(ServeError::from);
        }
        _ = shutdown => {}
    }
    ready.abort();
    tracing::info!("draining");
    set_all(&health, &names, ServingStatus::NotServing).await;
    rt.drain.cancel();
    tokio::time::sleep(Duration::from_millis(rt.config.drain.ready_delay_ms)).await;
    let _ = stop_tx.send(());
    let drained = tokio::time::timeout(Duration::from_secs(rt.config.drain.grace_secs), &mut server).await;
    stop_health();
    match drained {
        Ok(res) => {
            tracing::info!("drained");
            res.map_err(|e| ServeError::Reflection(format!("server task: {e}")))?.map_err(ServeError::from)
        }
        Err(_) => {
            tracing::warn!(grace_secs = rt.config.drain.grace_secs, "grace period over; closing remaining connections");
            server.abort();
            Ok(())
        }
    }
}
