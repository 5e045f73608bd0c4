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
    /// Admin keys that are not in any file (`PIXMESH_ADMIN_API_KEY`): they may read every job.
    pub admin_keys: Vec<(String, String)>,
}

impl Source {
    /// A source that always gives `config` (for embedding and tests).
    pub fn fixed(config: GatewayConfig, plain_keys: Vec<(String, String)>) -> Source {
        Source { load: Arc::new(move || Ok(config.clone())), config_file: None, plain_keys, admin_keys: Vec::new() }
    }

    /// Loads and builds a generation, carrying state over from `previous`.
    pub fn build(&self, previous: Option<&Snapshot>) -> Result<(GatewayConfig, Snapshot), String> {
        let config = (self.load)()?;
        config.validate()?;
        let keys = ApiKeys::load_with_admins(&config, &self.plain_keys, &self.admin_keys, previous.map(|p| &p.keys))?;
        let snapshot = Snapshot::build(&config, keys, previous)?;
        Ok((config, snapshot))
    }
}

fn stamp(path: &PathBuf) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// What the watched files looked like when a configuration was read from them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamps(Vec<Option<(SystemTime, u64)>>);

fn watched_files(source: &Source, config: &GatewayConfig) -> Vec<PathBuf> {
    source.config_file.iter().chain(config.api_keys_file.iter()).cloned().collect()
}

/// The stamps of `config`'s files now: taken right when they were read, so that a change
/// made before the watcher starts is still seen as a change.
pub fn stamps(source: &Source, config: &GatewayConfig) -> Stamps {
    Stamps(watched_files(source, config).iter().map(stamp).collect())
}

/// Reloads `shared` until `shutdown`; `read` are the stamps of the files `watched` came from.
pub async fn watch(source: Source, mut watched: GatewayConfig, read: Stamps, shared: Shared, shutdown: Shutdown) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reload by file change only");
            None
        }
    };
    let mut stamps = read;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let why = tokio::select! {
            _ = shutdown.wait() => return,
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                stamps = self::stamps(&source, &watched);
                "SIGHUP"
            }
            _ = tick.tick() => {
                let now = self::stamps(&source, &watched);
                if !watched.watch_files || now == stamps {
                    continue;
                }
                // Taken before the files are read again: a change while reading is seen next tick.
                stamps = now;
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
                metrics::counter!(crate::instruments::RELOADS, "outcome" => "ok").increment(1);
                shared.store(Arc::new(snapshot));
                watched = config;
            }
            Err(e) => {
                tracing::error!(trigger = why, error = %e, "configuration reload failed; keeping the current one");
                metrics::counter!(crate::instruments::RELOADS, "outcome" => "failed").increment(1);
            }
        }
    }
}
