//! Reloading the configuration while serving: on SIGHUP, and when the config file or the API
//! keys file changes. A bad new configuration is logged and counted; the old one stays.
//!
//! Files are watched by polling their modification time and size once a second: two `stat`
//! calls a second cost nothing, and unlike inotify this also sees a file replaced through a
//! renamed directory or a Kubernetes ConfigMap symlink swap.

use crate::config::GatewayConfig;
use crate::keys::ApiKeys;
use crate::snapshot::{Shared, Snapshot};
use pixmesh_chassis::Shutdown;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Produces the current configuration (from the file, the environment and overrides).
pub type LoadConfig = Arc<dyn Fn() -> Result<GatewayConfig, String> + Send + Sync>;

/// Where a reload gets its configuration from.
#[derive(Clone)]
pub struct Source {
    pub load: LoadConfig,
    /// The config file, if there is one (the keys file is found in the configuration).
    pub config_file: Option<PathBuf>,
    /// Keys that are not in any file (e.g. `PIXMESH_API_KEY`).
    pub plain_keys: Vec<(String, String)>,
}

impl Source {
    /// A source that always gives `config` (for embedding and tests).
    pub fn fixed(config: GatewayConfig, plain_keys: Vec<(String, String)>) -> Source {
        Source { load: Arc::new(move || Ok(config.clone())), config_file: None, plain_keys }
    }

    /// Loads and builds a generation, carrying state over from `previous`.
    pub fn build(&self, previous: Option<&Snapshot>) -> Result<(GatewayConfig, Snapshot), String> {
        let config = (self.load)()?;
        config.validate()?;
        let keys = ApiKeys::load(&config, &self.plain_keys, previous.map(|p| &p.keys))?;
        let snapshot = Snapshot::build(&config, keys, previous)?;
        Ok((config, snapshot))
    }
}

fn stamp(path: &PathBuf) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Reloads `shared` until `shutdown`.
pub async fn watch(source: Source, mut watched: GatewayConfig, shared: Shared, shutdown: Shutdown) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reload by file change only");
            None
        }
    };
    let files = |c: &GatewayConfig| -> Vec<PathBuf> { source.config_file.iter().chain(c.api_keys_file.iter()).cloned().collect() };
    let mut stamps: Vec<_> = files(&watched).iter().map(stamp).collect();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let why = tokio::select! {
            _ = shutdown.wait() => return,
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => "SIGHUP",
            _ = tick.tick() => {
                let now: Vec<_> = files(&watched).iter().map(stamp).collect();
                if !watched.watch_files || now == stamps {
                    continue;
                }
                "file change"
            }
        };
        let previous = shared.load_full();
        match source.build(Some(&previous)) {
            Ok((config, snapshot)) => {
                if config.listen != watched.listen || config.admin_listen != watched.admin_listen {
                    tracing::warn!("listen addresses cannot change on reload; restart the gateway to move it");
                }
                tracing::info!(trigger = why, config = %snapshot.summary, "configuration reloaded");
                metrics::counter!("pixmesh_gateway_reloads_total", "outcome" => "ok").increment(1);
                shared.store(Arc::new(snapshot));
                watched = config;
            }
            Err(e) => {
                tracing::error!(trigger = why, error = %e, "configuration reload failed; keeping the current one");
                metrics::counter!("pixmesh_gateway_reloads_total", "outcome" => "failed").increment(1);
            }
        }
        stamps = files(&watched).iter().map(stamp).collect();
    }
}
