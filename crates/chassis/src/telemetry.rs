//! Structured logs (to stderr) and the process-wide Prometheus metrics recorder.

use serde::Deserialize;
use std::sync::OnceLock;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// An `EnvFilter` directive, e.g. `info` or `info,pixmesh_gateway=debug`.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".into(), format: LogFormat::Text }
    }
}

impl LogConfig {
    pub fn validate(&self) -> Result<(), String> {
        EnvFilter::try_new(&self.level).map(|_| ()).map_err(|e| format!("log.level `{}`: {e}", self.level))
    }
}

/// Installs the global log subscriber; `role` is attached to every line.
/// `RUST_LOG` in `env`, when set, wins over the configured level.
pub fn init_logging(role: &str, config: &LogConfig, rust_log: Option<&str>) {
    let filter = rust_log
        .and_then(|d| EnvFilter::try_new(d).ok())
        .or_else(|| EnvFilter::try_new(&config.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    let result = match config.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    if result.is_ok() {
        tracing::debug!(role, "logging initialised");
    }
}

static PROMETHEUS: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder once per process. Later calls are no-ops.
pub fn init_metrics(role: &str) {
    if PROMETHEUS.get().is_some() {
        return;
    }
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().add_global_label("role", role).build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_ok() {
        let _ = PROMETHEUS.set(handle);
    }
}

/// The Prometheus text exposition of every metric recorded so far (empty without a recorder).
pub fn render_metrics() -> String {
    PROMETHEUS.get().map(|h| h.render()).unwrap_or_default()
}
