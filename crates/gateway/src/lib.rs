//! The gateway: the only public port. It wraps services it does not own behind one address.
//!
//! Routes come from configuration (path prefix → upstream pool), not from code, so the
//! services behind it stay unchanged. Requests pass the interceptors assembled in
//! [`stack::app`]; the configuration is reloaded while serving (see [`reload`]).

pub mod cluster;
pub mod config;
pub mod console;
pub mod instruments;
pub mod keys;
pub mod layers;
pub mod mirror;
pub mod openapi;
pub mod proxy;
pub mod reload;
pub mod snapshot;
pub mod sniff;
pub mod split;
pub mod stack;
pub mod upstream;

pub use config::{ApiKeyConfig, GatewayConfig, ImageLimitsConfig, RouteConfig, UpstreamConfig};
pub use reload::Source;

use arc_swap::ArcSwap;
use pixmesh_chassis::Shutdown;
use pixmesh_chassis::tls::Tls;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// A configuration generation loaded and checked, keys file and TLS files included, before any
/// port is bound.
pub struct Prepared {
    source: Source,
    config: GatewayConfig,
    snapshot: snapshot::Snapshot,
    stamps: reload::Stamps,
    tls: Option<Arc<Tls>>,
    /// `[gateway.client_tls]`, built once (its files re-read when they change): the upstream
    /// pools' and the cluster view's TLS.
    client_tls: rustls::ClientConfig,
}

/// What the gateway's stack fronts: pixmesh's own public API, or one application it does not
/// own, as the inbound side of `pixmesh sidecar` (see [`stack::inbound`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    Api,
    Sidecar,
}

/// Loads and validates the configuration and reads the API keys and TLS files, without
/// binding anything.
pub fn prepare(source: Source) -> Result<Prepared, String> {
    let (config, snapshot) = source.build(None)?;
    let stamps = reload::stamps(&source, &config);
    let tls = Tls::load(&config.tls).map_err(|e| e.to_string())?;
    let client_tls = config.client_tls.client_config().map_err(|e| format!("gateway.client_tls: {e}"))?;
    Ok(Prepared { source, config, snapshot, stamps, tls, client_tls })
}

/// Serves the gateway on `http` until `shutdown`, with the configuration `source` gives now
/// and on every reload.
pub async fn run(source: Source, http: TcpListener, admin: TcpListener, shutdown: Shutdown) -> std::io::Result<()> {
    let prepared = prepare(source).map_err(std::io::Error::other)?;
    serve(prepared, http, admin, shutdown).await
}

/// Serves a [`prepare`]d gateway on `http` until `shutdown`.
pub async fn serve(prepared: Prepared, http: TcpListener, admin: TcpListener, shutdown: Shutdown) -> std::io::Result<()> {
    serve_as(Surface::Api, "gateway", prepared, http, admin, shutdown).await
}

/// Serves a [`prepare`]d configuration as `role`, in front of `surface`, until `shutdown`.
pub async fn serve_as(
    surface: Surface,
    role: &'static str,
    prepared: Prepared,
    http: TcpListener,
    admin: TcpListener,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let Prepared { source, config, snapshot, stamps, tls, client_tls } = prepared;
    if config.require_api_key && snapshot.keys.is_empty() {
        tracing::warn!("no API keys are configured: every request will be refused with 401");
    }
    tracing::info!(config = %snapshot.summary, tls = tls.is_some(), "{role} configuration loaded");
    let grace = Duration::from_millis(config.drain_grace_ms);
    // Connection limits belong to the listener: read at start, not reloaded.
    let limits = config.connections;
    let shared = Arc::new(ArcSwap::from_pointee(snapshot));
    // The cluster view asks the status service for recent errors: the `status` upstream.
    let status = config.upstreams.get("status").and_then(|u| u.pool().urls.first().cloned());
    let cluster_tls = config.client_tls.enabled().then(|| client_tls.clone());
    let cluster = cluster::Cluster::new(config.cluster.clone(), status, cluster_tls).map_err(std::io::Error::other)?;
    let clients = upstream::Clients::new(client_tls);
    tokio::spawn(reload::watch(source, config, stamps, Arc::clone(&shared), shutdown.clone()));
    let streams_stop = shutdown.clone();
    pixmesh_chassis::serve::http_role_tls(role, http, admin, shutdown, grace, limits, tls, |_| async move {
        Ok(match surface {
            Surface::Api => stack::app(shared, clients, cluster, streams_stop),
            Surface::Sidecar => stack::inbound(shared, clients, streams_stop),
        })
    })
    .await
}
