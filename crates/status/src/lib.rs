//! The status service: `GET /api/status/{id}`, `GET /api/status/{id}/history` and
//! `GET /api/result/{id}`.
//!
//! The status view is folded from the job's events ([`view::fold`]), not read from the job row:
//! the event log is the history, the view is a projection of it.

mod handler;
pub mod view;

pub use handler::router;

use pixmesh_chassis::Shutdown;
use pixmesh_chassis::serve::ConnectionLimits;
use pixmesh_store::{Access, Stores};
use serde::Deserialize;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct StatusConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub drain_grace_ms: u64,
    /// The deployment's URL signing keys, from `[gateway.signed_urls]` (not a `[status]` key):
    /// a succeeded job's `result_url` is signed with them.
    #[serde(skip)]
    pub signed_urls: pixmesh_chassis::signed_url::SignedUrlConfig,
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            drain_grace_ms: 10_000,
            signed_urls: Default::default(),
        }
    }
}

impl StatusConfig {
    pub fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Serves the status API on `http` until `shutdown`. Status only reads, so its readiness
/// follows whether both stores can be read, not written: on a full disk it still answers.
pub async fn run(config: StatusConfig, stores: Stores, http: TcpListener, admin: TcpListener, shutdown: Shutdown) -> std::io::Result<()> {
    let grace = Duration::from_millis(config.drain_grace_ms);
    let probe_stop = shutdown.clone();
    let signer = pixmesh_chassis::signed_url::Signer::new(&config.signed_urls).map(std::sync::Arc::new);
    pixmesh_chassis::serve::http_role("status", http, admin, shutdown, grace, ConnectionLimits::default(), |readiness| async move {
        stores.watch_health("status", Access::ReadOnly, readiness, probe_stop).await;
        Ok(router(stores, signer))
    })
    .await
}
