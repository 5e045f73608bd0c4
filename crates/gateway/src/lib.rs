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
use pixmesh_chassis::admin::Readiness;
use pixmesh_chassis::announce::Announcement;
use std::time::Duration;
use tokio::net::TcpListener;

/// Serves the gateway on `http` until `shutdown`.
pub async fn run(config: GatewayConfig, keys: ApiKeys, http: TcpListener, admin: TcpListener, shutdown: Shutdown) -> std::io::Result<()> {
    let readiness = Readiness::new();
    let http_addr = http.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let admin_server = pixmesh_chassis::serve::admin("gateway", admin, readiness.clone(), shutdown.clone());
    let grace = Duration::from_millis(config.drain_grace_ms);
    let routes = proxy::Routes::new(&config).map_err(std::io::Error::other)?;
    if config.require_api_key && keys.is_empty() {
        tracing::warn!("no API keys are configured: every request will be refused with 401");
    }
    let app = stack::app(routes, keys, config.require_api_key);
    Announcement::new("gateway").with("http", http_addr).with("admin", admin_addr).print();
    readiness.set_ready(true);
    let result = pixmesh_chassis::serve::http("gateway", http, app, shutdown, grace).await;
    admin_server.stop().await;
    result
}
