//! Structured logs (to stderr), exported traces, and the process-wide Prometheus metrics recorder.

pub use crate::trace::{Exporter, TraceError};
use serde::Deserialize;
use std::collections::HashMap;
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

/// Installs the global subscriber: log lines to stderr, filtered by `config.level` (or
/// `RUST_LOG` in `env`, which wins), and, when `env` names an OTLP endpoint, the spans of
/// pixmesh's crates exported as OpenTelemetry traces ([`crate::trace`]). Call it inside the
/// tokio runtime the role runs on; keep the returned exporter and shut it down at the end.
pub fn init(role: &str, config: &LogConfig, env: &HashMap<String, String>) -> Result<Option<Exporter>, TraceError> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = env
        .get("RUST_LOG")
        .and_then(|d| EnvFilter::try_new(d).ok())
        .or_else(|| EnvFilter::try_new(&config.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false);
    let fmt = match config.format {
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    let (otel, exporter) = match crate::trace::start(role, env)? {
        // The log level does not decide what is traced: pixmesh's spans at `info` and above
        // are, whatever the log lines show (see [`Traced`]).
        Some((tracer, exporter)) => {
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                // No code location, thread or busy/idle time attributes on every span: a span
                // says which hop and stage it is by its name.
                .with_location(false)
                .with_threads(false)
                .with_target(false)
                .with_tracked_inactivity(false);
            (Some(layer.with_filter(Traced)), Some(exporter))
        }
        None => (None, None),
    };
    let installed = tracing_subscriber::registry().with(fmt.with_filter(filter)).with(otel).try_init();
    if installed.is_ok() {
        tracing::debug!(role, tracing = exporter.is_some(), "logging initialised");
    }
    Ok(exporter)
}

/// Bucket bounds of every `*_seconds` histogram: 1 ms to 1 min.
const SECONDS_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Bucket bounds of the histograms that count things (results per commit).
const COUNT_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// What the trace exporter sees: pixmesh's spans at `info` and above, and of the events inside
/// them only warnings and errors (a job's every `info` line would cost more than its spans).
///
/// The decision depends on a callsite's metadata alone, so it is given once per callsite
/// (`Interest::always` or `never`). A per-call filter (`filter_fn`, whose interest is
/// "sometimes") made spans go missing from the export now and then under load: a claim's span
/// was not recorded, and its children were exported as roots of traces of their own.
struct Traced;

impl Traced {
    fn wanted(meta: &tracing::Metadata<'_>) -> bool {
        let most = if meta.is_span() { tracing::Level::INFO } else { tracing::Level::WARN };
        meta.target().starts_with("pixmesh") && *meta.level() <= most
    }
}

impl<S> tracing_subscriber::layer::Filter<S> for Traced {
    fn enabled(&self, meta: &tracing::Metadata<'_>, _: &tracing_subscriber::layer::Context<'_, S>) -> bool {
        Traced::wanted(meta)
    }

    fn callsite_enabled(&self, meta: &'static tracing::Metadata<'static>) -> tracing::subscriber::Interest {
        if Traced::wanted(meta) { tracing::subscriber::Interest::always() } else { tracing::subscriber::Interest::never() }
    }

    fn max_level_hint(&self) -> Option<tracing_subscriber::filter::LevelFilter> {
        Some(tracing_subscriber::filter::LevelFilter::INFO)
    }
}

static PROMETHEUS: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder once per process. Later calls are no-ops.
pub fn init_metrics(role: &str) {
    if PROMETHEUS.get().is_some() {
        return;
    }
    use metrics_exporter_prometheus::Matcher;
    // Histograms with buckets (not the exporter's default summaries): buckets add up across
    // instances, so a dashboard can take a quantile over every gateway or worker at once.
    let builder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .add_global_label("role", role)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full("pixmesh_store_commit_batch".into()), COUNT_BUCKETS));
    let recorder = match builder {
        Ok(builder) => builder.build_recorder(),
        // (Only an empty bucket list is refused.)
        Err(_) => metrics_exporter_prometheus::PrometheusBuilder::new().add_global_label("role", role).build_recorder(),
    };
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_ok() {
        let _ = PROMETHEUS.set(handle);
    }
}

/// Samples written at each scrape, after the recorder's: see [`add_metrics_source`].
type Source = Box<dyn Fn(&mut String) + Send + Sync>;
static SOURCES: std::sync::Mutex<Vec<Source>> = std::sync::Mutex::new(Vec::new());

/// Adds metrics rendered at each scrape from state the role holds, for things that come and go
/// (a distributor's workers): only what exists at the scrape is written, so their label values
/// never pile up as pods come and go, as they would in the recorder (which never forgets a
/// series). `source` writes whole families in the text exposition format (`# HELP`, `# TYPE`,
/// samples).
pub fn add_metrics_source(source: impl Fn(&mut String) + Send + Sync + 'static) {
    SOURCES.lock().unwrap_or_else(|p| p.into_inner()).push(Box::new(source));
}

/// The Prometheus text exposition of every metric recorded so far (empty without a recorder),
/// then those of the [`add_metrics_source`] sources.
pub fn render_metrics() -> String {
    let mut out = PROMETHEUS.get().map(|h| h.render()).unwrap_or_default();
    for source in SOURCES.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        source(&mut out);
    }
    out
}

/// Escapes a label value for the text exposition format.
pub fn label_value(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
