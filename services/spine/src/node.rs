//! A Spine node: the chosen services over one runtime.

use std::future::Future;
use std::sync::Arc;

use anyhow::{Context, bail};
use spine_runtime::{Config, Runtime};

/// Every service this build can run, in start order.
pub const SERVICES: &[&str] = &["identity", "groups", "presence", "calls"];

/// Routes and health names of the services `config.services` names (all if
/// empty).
/// `addr` is where this node listens (presence tells peers where to reach it
/// unless `presence.advertise` says otherwise).
pub async fn assemble(
    rt: &Arc<Runtime>,
    addr: std::net::SocketAddr,
) -> anyhow::Result<(tonic::service::Routes, Vec<&'static str>)> {
    let wanted: Vec<&str> = if rt.config.services.is_empty() {
        SERVICES.to_vec()
    } else {
        rt.config.services.iter().map(String::as_str).collect()
    };
    let mut routes = tonic::service::RoutesBuilder::default();
    let mut names = Vec::new();
    for s in &wanted {
        match *s {
            "identity" => names.extend(spine_identity::install(rt, &mut routes)),
            "groups" => names.extend(spine_groups::install(rt, &mut routes).await.context("starting groups")?),
            "presence" => {
                let advertise = rt.config.presence.advertise.clone().unwrap_or_else(|| addr.to_string());
                let (n, _) = spine_presence::install(rt, &mut routes, advertise).await.context("starting presence")?;
                names.extend(n);
            }
            "calls" => {
                let c = &rt.config;
                let advertise = c
                    .calls
                    .advertise
                    .clone()
                    .or_else(|| c.presence.advertise.clone())
                    .unwrap_or_else(|| addr.to_string());
                let (n, _) = spine_calls::install(rt, &mut routes, advertise).await.context("starting calls")?;
                names.extend(n);
            }
            other => bail!("unknown service {other:?}; this build runs: {}", SERVICES.join(", ")),
        }
    }
    Ok((routes.routes(), names))
}

/// Starts the runtime, binds, and serves until `shutdown`, then drains.
/// `on_ready` runs once the node is listening, with its runtime and address.
pub async fn run<F, Fut>(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: F,
) -> anyhow::Result<()>
where
    F: FnOnce(Arc<Runtime>, std::net::SocketAddr) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let listen = config.listen;
    let rt = Runtime::start(config).await.context("opening the store")?;
    let listener = spine_runtime::server::bind(listen).await?;
    let addr = listener.local_addr()?;
    let (routes, names) = assemble(&rt, addr).await?;
    on_ready(rt.clone(), addr).await?;
    spine_runtime::server::serve(rt, routes, names, listener, shutdown).await?;
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = term => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
    }
}
