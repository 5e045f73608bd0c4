//! The status service: `GET /api/status/{id}`, `GET /api/status/{id}/history`,
//! `GET /api/status/{id}/events` and `GET /api/events` (SSE), `GET /api/result/{id}` and
//! `GET /api/result/{id}/{output}`.
//!
//! The status view is a projection of the job's events ([`projection`]: kept in `job_views`
//! by a projector that follows the outbox, rebuildable from the events), not read from the job
//! row: the event log is the history. `GET /api/jobs` lists a key's jobs from it. The SSE
//! streams follow the same events as they are written ([`live`]).

mod handler;
pub mod instruments;
pub mod live;
pub mod openapi;
pub mod projection;
mod stream;
pub mod view;

pub use handler::{Live, router};

use pixmesh_chassis::Shutdown;
use pixmesh_chassis::serve::ConnectionLimits;
use pixmesh_chassis::tls::{Tls, TlsConfig};
use pixmesh_store::{Access, Stores};
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct StatusConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub drain_grace_ms: u64,
    /// SSE streams open at once; past it a new one gets 503 with `Retry-After`.
    pub max_streams: usize,
    /// A stream with nothing to send for this long sends a keep-alive comment.
    pub keep_alive_ms: u64,
    /// How often the read model's projector looks for new events (each round that finds some
    /// is one write transaction): the most a listing lags behind the events.
    pub projection_poll_ms: u64,
    /// TLS on the HTTP listener (`[status.tls]`): the gateway, or whoever calls this role,
    /// over TLS, and with `client_auth = "required"` only with a certificate from `client_ca`.
    pub tls: TlsConfig,
    /// The deployment's URL signing keys, from `[gateway.signed_urls]` (not a `[status]` key):
    /// a succeeded job's `result_url` is signed with them.
    #[serde(skip)]
    pub signed_urls: pixmesh_chassis::signed_url::SignedUrlConfig,
    /// The public API's OpenAPI document (JSON), served at `GET /api/openapi.json`: assembled
    /// by the binary from every role's part (not a `[status]` key).
    #[serde(skip)]
    pub openapi: Option<Arc<String>>,
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            drain_grace_ms: 10_000,
            max_streams: 10_000,
            keep_alive_ms: 15_000,
            projection_poll_ms: 100,
            tls: TlsConfig::default(),
            signed_urls: Default::default(),
            openapi: None,
        }
    }
}

impl StatusConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_streams == 0 || self.keep_alive_ms == 0 || self.projection_poll_ms == 0 {
            return Err("status.max_streams, status.keep_alive_ms and status.projection_poll_ms must be above 0".into());
        }
        self.tls.validate("status.tls")
    }
}

/// Serves the status API on `http` until `shutdown`. Status only reads, so its readiness
/// follows whether both stores can be read, not written: on a full disk it still answers.
pub async fn run(config: StatusConfig, stores: Stores, http: TcpListener, admin: TcpListener, shutdown: Shutdown) -> std::io::Result<()> {
    let grace = Duration::from_millis(config.drain_grace_ms);
    let probe_stop = shutdown.clone();
    let signer = pixmesh_chassis::signed_url::Signer::new(&config.signed_urls).map(std::sync::Arc::new);
    let hub = Arc::new(live::Hub::default());
    let tail_stop = shutdown.clone();
    let tail = Arc::clone(&hub).tail(Arc::clone(&stores.outbox), Arc::clone(&stores.jobs));
    let projector = projection::run(stores.clone(), Duration::from_millis(config.projection_poll_ms));
    tokio::spawn(async move {
        tokio::select! {
            _ = async { tokio::join!(tail, projector) } => {}
            _ = tail_stop.wait() => {}
        }
    });
    let keep_alive = Duration::from_millis(config.keep_alive_ms);
    let live = Live { hub, max_streams: config.max_streams, keep_alive, shutdown: shutdown.clone() };
    let tls = Tls::load(&config.tls).map_err(std::io::Error::other)?;
    let limits = ConnectionLimits::default();
    pixmesh_chassis::serve::http_role_tls("status", http, admin, shutdown, grace, limits, tls, |readiness| async move {
        stores.watch_health("status", Access::ReadOnly, readiness, probe_stop).await;
        let app = router(stores, signer, live);
        Ok(match config.openapi {
            Some(doc) => openapi::serve(app, doc),
            None => app,
        })
    })
    .await
}
