//! The gateway: the only public port. It wraps services it does not own behind one address.
//!
//! Routes come from configuration (path prefix → upstream), not from code, so the services
//! behind it stay unchanged. Requests pass the interceptors assembled in [`stack::app`].

pub mod config;
pub mod keys;
pub mod layers;
pub mod proxy;
pub mod stack;

pub use config::{GatewayConfig, RouteConfig};
pub use keys::ApiKeys;

use pixmesh_chassis::Shutdown;
use std::time::Duration;
use tokio::net::TcpListener;

/// Serves the gateway on `http` until `shutdown`.
pub async fn run(config: GatewayConfig, keys: ApiKeys, http: TcpListener, admin: TcpListener, shutdown: Shutdown) -> std::io::Result<()> {
    let grace = Duration::from_millis(config.drain_grace_ms);
    pixmesh_chassis::serve::http_role("gateway", http, admin, shutdown, grace, || async move {
        let routes = proxy::Routes::new(&config).map_err(std::io::Error::other)?;
        if config.require_api_key && keys.is_empty() {
            tracing::warn!("no API keys are configured: every request will be refused with 401");
        }
        Ok(stack::app(routes, keys, config.require_api_key))
    })
    .await
}
