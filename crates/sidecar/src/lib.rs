//! `pixmesh sidecar`: beside an application pixmesh does not own, in its pod.
//!
//! - [`inbound`]: in front of it, TLS (mTLS too), callers' keys, rate limits, body limits,
//!   access log and metrics, then plain HTTP to the application on localhost.
//! - [`outbound`]: its calls to remote services, one local port each: discovery, balancing,
//!   breakers, TLS or mTLS, deadlines and budgeted retries of what is safe to retry.
//!
//! The adapters turn what the application has into what the platform expects:
//!
//! - [`metrics`]: its own metrics (Redis `INFO`, nginx `stub_status`) as Prometheus text;
//! - [`logs`]: its log file, followed through rotations, as JSON lines on stdout;
//! - [`health`]: rich checks (TCP, HTTP, Redis `PING`, SQL, a command) as `/readyz`/`/healthz`.

pub mod health;
pub mod inbound;
pub mod instruments;
pub mod logs;
pub mod metrics;
pub mod outbound;

use pixmesh_chassis::Shutdown;
use pixmesh_chassis::announce::Announcement;
use serde::Deserialize;
use std::time::Duration;
use tokio::net::TcpListener;

/// `[sidecar]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SidecarConfig {
    pub inbound: inbound::InboundConfig,
    pub outbound: outbound::OutboundConfig,
    pub metrics: metrics::MetricsAdapterConfig,
    pub logs: logs::LogsAdapterConfig,
    pub health: health::HealthAdapterConfig,
}

impl SidecarConfig {
    pub fn validate(&self) -> Result<(), String> {
        self.inbound.validate()?;
        self.outbound.validate()?;
        self.metrics.validate()?;
        self.logs.validate()?;
        self.health.validate()
    }
}

/// How long an adapter's HTTP answers get to finish at shutdown.
const GRACE: Duration = Duration::from_secs(2);

/// Serves an application's metrics on `listener` (`/metrics`, `/healthz`) until `shutdown`.
pub async fn run_metrics(config: metrics::MetricsAdapterConfig, listener: TcpListener, shutdown: Shutdown) -> Result<(), String> {
    let source = metrics::Source::parse(&config.source)?;
    let latest = metrics::Latest::default();
    let scraping = tokio::spawn(metrics::scrape_loop(source, config.clone(), latest.clone()));
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let routes = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(|axum::extract::State(latest): axum::extract::State<metrics::Latest>| async move {
                ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], latest.get())
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .with_state(latest);
    Announcement::new("sidecar-metrics").with("http", addr).print();
    tracing::info!(%addr, source = %config.source, "metrics adapter serving");
    let served = pixmesh_chassis::serve::http("sidecar metrics", listener, routes, shutdown, GRACE).await;
    scraping.abort();
    served.map_err(|e| e.to_string())
}

/// Serves the checks' outcomes on `listener` (`/readyz`, `/healthz`) until `shutdown`.
pub async fn run_health(config: health::HealthAdapterConfig, listener: TcpListener, shutdown: Shutdown) -> Result<(), String> {
    if config.checks.is_empty() && config.live_checks.is_empty() {
        return Err("sidecar.health.checks is empty: give at least one check (--check tcp://HOST:PORT …)".into());
    }
    let (routes, checking) = health::start(&config)?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    Announcement::new("sidecar-health").with("http", addr).print();
    tracing::info!(%addr, checks = config.checks.len(), live_checks = config.live_checks.len(), "health adapter serving");
    let served = pixmesh_chassis::serve::http("sidecar health", listener, routes, shutdown, GRACE).await;
    checking.abort();
    served.map_err(|e| e.to_string())
}

/// Follows the log file, writing JSON lines to stdout, until `shutdown`.
pub async fn run_logs(config: logs::LogsAdapterConfig, shutdown: Shutdown) -> Result<(), String> {
    if config.path.as_os_str().is_empty() {
        return Err("sidecar.logs.path is empty: give the log file to follow (--path FILE)".into());
    }
    let mut stdout = tokio::io::stdout();
    logs::follow(config, &mut stdout, shutdown).await.map_err(|e| format!("writing the log lines: {e}"))
}
