//! A Spine node: the chosen services over one runtime.

use std::future::Future;
use std::sync::Arc;

use anyhow::{Context, bail};
use spine_runtime::config::Section;
use spine_runtime::service::{SpineService, install};
use spine_runtime::{Config, Runtime};

/// Every service this build can run, in start order.
pub const SERVICES: &[&str] = &[
    <spine_identity::Identity as SpineService>::NAME,
    <spine_groups::Groups as SpineService>::NAME,
    <spine_presence::Presence as SpineService>::NAME,
    <spine_calls::Calls as SpineService>::NAME,
];

/// The configuration sections services of this build own.
const SECTIONS: &[&str] = &[
    <spine_groups::GroupsConfig as Section>::NAME,
    <spine_presence::PresenceConfig as Section>::NAME,
    <spine_calls::CallsConfig as Section>::NAME,
];

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
    rt.config.check_sections(SECTIONS).map_err(anyhow::Error::msg).context("config")?;
    rt.config.web.check().map_err(anyhow::Error::msg).context("config")?;
    let presence: spine_presence::PresenceConfig = rt.config.section().map_err(anyhow::Error::msg)?;
    let calls: spine_calls::CallsConfig = rt.config.section().map_err(anyhow::Error::msg)?;
    let mut routes = tonic::service::RoutesBuilder::default();
    let mut names = Vec::new();
    for s in &wanted {
        // Presence and calls nodes talk to each other: at their advertised
        // address (calls falls back to presence's), else where this node
        // listens.
        let advertise = match *s {
            "calls" => calls.advertise.clone().or_else(|| presence.advertise.clone()),
            _ => presence.advertise.clone(),
        }
        .unwrap_or_else(|| addr.to_string());
        let installed = match *s {
            "identity" => install::<spine_identity::Identity>(rt, &mut routes, advertise).await.map(|(n, ())| n),
            "groups" => install::<spine_groups::Groups>(rt, &mut routes, advertise).await.map(|(n, ())| n),
            "presence" => install::<spine_presence::Presence>(rt, &mut routes, advertise).await.map(|(n, _)| n),
            "calls" => install::<spine_calls::Calls>(rt, &mut routes, advertise).await.map(|(n, _)| n),
            other => bail!("unknown service {other:?}; this build runs: {}", SERVICES.join(", ")),
        };
        names.extend(installed.with_context(|| format!("starting {s}"))?);
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
    let files = spine_runtime::raise_open_files_limit();
    tracing::info!(open_files = files, "open-file limit");
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
