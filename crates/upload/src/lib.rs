//! The upload service: `POST /api/upload`.
//!
//! Takes the image as the raw body (`Content-Type: image/*`) or as a `multipart/form-data` file
//! field, checks its format and dimensions from the header, stores it as a blob, and records the
//! job and its `accepted` event in one transaction. Answers `202` with the job's URLs.

mod cache;
mod handler;
pub mod instruments;
pub mod openapi;

pub use cache::CacheScope;
pub use handler::{parse_options, router};

use pixmesh_chassis::Shutdown;
use pixmesh_chassis::serve::ConnectionLimits;
use pixmesh_chassis::tls::{Tls, TlsConfig};
use pixmesh_imaging::Limits;
use pixmesh_store::{Access, Stores};
use serde::Deserialize;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct UploadConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Uploads read at once; more wait (their bodies are held in memory while read).
    pub max_concurrent: usize,
    /// Pixel and side limits checked from the image header.
    pub limits: Limits,
    pub drain_grace_ms: u64,
    /// The most named outputs one upload may ask for (`outputs=`).
    pub max_outputs: usize,
    /// Named option sets: `thumb = "width=200&format=webp"` is what `preset=thumb` asks for
    /// (options given beside it override it). A key may be limited to some of them
    /// (`presets` in its gateway entry).
    pub presets: std::collections::BTreeMap<String, String>,
    /// Who shares the result cache: `key` (each API key its own; the default), `global`, or
    /// `off`. An identical upload (the same bytes and options) gets the existing result with
    /// no worker call.
    pub cache: CacheScope,
    /// TLS on the HTTP listener (`[upload.tls]`): the gateway, or whoever calls this role,
    /// over TLS, and with `client_auth = "required"` only with a certificate from `client_ca`.
    pub tls: TlsConfig,
    /// The deployment's URL signing keys, from `[gateway.signed_urls]` (not an `[upload]` key):
    /// `result_url` is signed with them.
    #[serde(skip)]
    pub signed_urls: pixmesh_chassis::signed_url::SignedUrlConfig,
}

impl Default for UploadConfig {
    fn default() -> Self {
        UploadConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            max_body_bytes: 50 * 1024 * 1024,
            max_concurrent: 64,
            limits: Limits::default(),
            drain_grace_ms: 10_000,
            max_outputs: pixmesh_store::DEFAULT_MAX_OUTPUTS,
            presets: Default::default(),
            cache: CacheScope::Key,
            tls: TlsConfig::default(),
            signed_urls: Default::default(),
        }
    }
}

impl UploadConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_body_bytes == 0 || self.max_concurrent == 0 {
            return Err("upload.max_body_bytes and upload.max_concurrent must be above 0".into());
        }
        if !(1..=256).contains(&self.max_outputs) {
            return Err(format!("upload.max_outputs must be 1 to 256, got {}", self.max_outputs));
        }
        for (name, options) in &self.presets {
            if !pixmesh_store::Output::valid_name(name) {
                return Err(format!("upload.presets: {name:?} is not a preset name (1 to 32 of a-z, 0-9, _ and -)"));
            }
            handler::preset_pairs(options)
                .and_then(|pairs| handler::parse_options(&pairs))
                .map_err(|e| format!("upload.presets.{name}: {}", e.message))?;
        }
        self.tls.validate("upload.tls")
    }
}

/// Serves the upload API on `http` until `shutdown`. Ready while both stores can be written
/// (see `pixmesh_store::health`).
pub async fn run(config: UploadConfig, stores: Stores, http: TcpListener, admin: TcpListener, shutdown: Shutdown) -> std::io::Result<()> {
    let grace = Duration::from_millis(config.drain_grace_ms);
    let probe_stop = shutdown.clone();
    let tls = Tls::load(&config.tls).map_err(std::io::Error::other)?;
    let limits = ConnectionLimits::default();
    pixmesh_chassis::serve::http_role_tls("upload", http, admin, shutdown, grace, limits, tls, |readiness| async move {
        stores.watch_health("upload", Access::ReadWrite, readiness, probe_stop).await;
        Ok(router(config, stores))
    })
    .await
}
