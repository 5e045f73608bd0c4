//! The gateway: the only public port. It wraps services it does not own behind one address.
//!
//! Routes come from configuration (path prefix → upstream pool), not from code, so the
//! services behind it stay unchanged. Requests pass the interceptors assembled in
//! [`stack::app`]; the configuration is reloaded while serving (see [`reload`]).

pub mod config;
pub mod keys;
pub mod layers;
pub mod proxy;
pub mod reload;
pub mod snapshot;
pub mod sniff;
pub mod stack;
pub mod upstream;

pub use config::{GatewayConfig, ImageLimitsConfig, RouteConfig, UpstreamConfig};
pub use reload::Source;

use arc_swap::ArcSwap;
use pixmesh_chassis::Shutdown;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Serves the gateway on `http` until `shutdown`, with the configuration `source` gives now
/// and on every reload.
pub async fn run(source: Source, http: TcpListener, admin: TcpListener, shutdown: Shutdown) -> std::io::Result<()> {
    let (config, snapshot) = source.build(None).map_err(std::io::Error::other)?;
    if config.require_api_key && snapshot.keys.is_empty() {
        tracing::warn!("no API keys are configured: every request will be refused with 401");
    }
    tracing::info!(config = %snapshot.summary, "gateway configuration loaded");
    let grace = Duration::from_millis(config.drain_grace_ms);
    let shared = Arc::new(ArcSwap::from_pointee(snapshot));
    tokio::spawn(reload::watch(source, config, Arc::clone(&shared), shutdown.clone()));
    pixmesh_chassis::serve::http_role("gateway", http, admin, shutdown, grace, || async move {
        Ok(stack::app(shared, upstream::Clients::new()))
    })
    .await
}
