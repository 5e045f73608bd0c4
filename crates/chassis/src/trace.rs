//! Traces: the `tracing` spans of every role, exported as OpenTelemetry spans over OTLP/gRPC
//! when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, and the
//! W3C `traceparent` that carries one trace across the hops: HTTP headers (gateway → upload),
//! the job's row (upload → distributor), NATS message headers (the relay's wake-ups), gRPC
//! metadata (distributor → worker).
//!
//! With no endpoint nothing is exported, and a trace's id still travels: each hop passes on
//! the `traceparent` it was given, so every log line of a job names the trace the client
//! started (the spans' `trace_id` field).
//!
//! The standard variables are read by the SDK itself: `OTEL_SERVICE_NAME` (else
//! `pixmesh-<role>`), `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` (+`_ARG`), `OTEL_BSP_*`,
//! `OTEL_EXPORTER_OTLP_TIMEOUT` and `_HEADERS`. Only the `grpc` protocol is built in: another
//! `OTEL_EXPORTER_OTLP_PROTOCOL` is refused at start, not silently sent to the wrong port.

use opentelemetry::KeyValue;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header (and gRPC metadata key, and NATS header) that carries a trace.
pub const TRACEPARENT: &str = "traceparent";

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (an OTLP endpoint was set and the exporter started).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Why traces cannot be exported as configured.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{name}={value:?}: only `grpc` is built in (OTLP over gRPC, usually port 4317)")]
    Protocol { name: &'static str, value: String },
    #[error("the OTLP exporter: {0}")]
    Exporter(String),
}

/// The exporter, kept to flush what is buffered when the process ends.
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Sends what is still buffered (blocking, up to the export timeout) and stops.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("pixmesh: the last spans were not exported: {e}");
        }
    }
}

/// Whether `env` asks for spans to be exported.
pub fn wanted(env: &HashMap<String, String>) -> bool {
    let set = |k: &str| env.get(k).is_some_and(|v| !v.trim().is_empty());
    let disabled = env.get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env.get("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Starts the OTLP exporter (inside a tokio runtime: the gRPC channel lives on it) and returns
/// the tracer for the `tracing` layer; `None` when `env` asks for no export.
pub(crate) fn start(role: &str, env: &HashMap<String, String>) -> Result<Option<(opentelemetry_sdk::trace::Tracer, Exporter)>, TraceError> {
    if !wanted(env) {
        return Ok(None);
    }
    for name in ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"] {
        if let Some(value) = env.get(name).filter(|v| !v.trim().is_empty()) {
            if value.trim() != "grpc" {
                return Err(TraceError::Protocol { name, value: value.clone() });
            }
            break;
        }
    }
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_protocol(opentelemetry_otlp::Protocol::Grpc)
        .build()
        .map_err(|e| TraceError::Exporter(e.to_string()))?;
    let mut resource = opentelemetry_sdk::Resource::builder()
        .with_attributes([KeyValue::new("service.namespace", "pixmesh"), KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))]);
    if !env.contains_key("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name(format!("pixmesh-{role}"));
    }
    let provider = SdkTracerProvider::builder().with_resource(resource.build()).with_batch_exporter(exporter).build();
    let tracer = provider.tracer("pixmesh");
    EXPORTING.store(true, Ordering::Relaxed);
    Ok(Some((tracer, Exporter { provider })))
}

/// Reads one `traceparent`, nothing else.
struct Incoming<'a>(Option<&'a str>);

impl Extractor for Incoming<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        if key == TRACEPARENT { self.0 } else { None }
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

/// Keeps the `traceparent` a propagator writes.
#[derive(Default)]
struct Outgoing(Option<String>);

impl Injector for Outgoing {
    fn set(&mut self, key: &str, value: String) {
        if key == TRACEPARENT {
            self.0 = Some(value);
        }
    }
}

/// The trace id of a valid `traceparent` (version 00, or a later version's first fields).
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let b = traceparent.as_bytes();
    let hex = |s: &[u8]| !s.is_empty() && s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let ok = b.len() >= 55
        && b[2] == b'-'
        && b[35] == b'-'
        && b[52] == b'-'
        && hex(&b[0..2])
        && &b[0..2] != b"ff"
        && hex(&b[3..35])
        && hex(&b[36..52])
        && hex(&b[53..55])
        && (b.len() == 55 || (&b[0..2] != b"00" && b[55] == b'-'))
        && b[3..35].iter().any(|&c| c != b'0')
        && b[36..52].iter().any(|&c| c != b'0');
    if ok { traceparent.get(3..35) } else { None }
}

/// Makes `span` a child of `traceparent` (when valid) and records the trace's id in the span's
/// `trace_id` field, so that every log line inside the span names it. Call it before the span
/// is first entered.
pub fn continue_from(span: &Span, traceparent: Option<&str>) {
    let traceparent = traceparent.filter(|t| trace_id(t).is_some());
    if exporting() {
        if traceparent.is_some() {
            let parent = TraceContextPropagator::new().extract(&Incoming(traceparent));
            let _ = span.set_parent(parent);
        }
        let context = span.context();
        let id = context.span().span_context().trace_id();
        if id != opentelemetry::trace::TraceId::INVALID {
            span.record("trace_id", tracing::field::display(id));
        }
    } else if let Some(id) = traceparent.and_then(trace_id) {
        span.record("trace_id", id);
    }
}

/// The `traceparent` that makes the next hop a child of `span`; without export, `given` (what
/// this hop was given) passes on unchanged, so the trace id still travels.
pub fn outgoing(span: &Span, given: Option<&str>) -> Option<String> {
    if exporting() {
        let mut out = Outgoing::default();
        TraceContextPropagator::new().inject_context(&span.context(), &mut out);
        if out.0.is_some() {
            return out.0;
        }
    }
    given.filter(|t| trace_id(t).is_some()).map(str::to_string)
}

/// Puts [`outgoing`] of the current span in a gRPC call's metadata.
pub fn to_metadata(metadata: &mut tonic::metadata::MetadataMap, given: Option<&str>) {
    if let Some(value) = outgoing(&Span::current(), given).and_then(|v| v.parse().ok()) {
        metadata.insert(TRACEPARENT, value);
    }
}

/// The `traceparent` of a gRPC call's metadata.
pub fn from_metadata(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    metadata.get(TRACEPARENT).and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_trace_id_of_valid_traceparents_only() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id(good), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(trace_id("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more"), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
        ] {
            assert_eq!(trace_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn without_export_the_given_traceparent_travels_unchanged() {
        let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let span = tracing::info_span!("hop", trace_id = tracing::field::Empty);
        continue_from(&span, Some(given));
        assert_eq!(outgoing(&span, Some(given)).as_deref(), Some(given));
        assert_eq!(outgoing(&span, Some("garbage")), None);
        let mut md = tonic::metadata::MetadataMap::new();
        span.in_scope(|| to_metadata(&mut md, Some(given)));
        assert_eq!(from_metadata(&md), Some(given));
    }

    #[test]
    fn export_is_wanted_only_with_an_endpoint_and_not_disabled() {
        let env = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>();
        assert!(!wanted(&env(&[])));
        assert!(!wanted(&env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])));
        assert!(wanted(&env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")])));
        assert!(wanted(&env(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:4317")])));
        assert!(!wanted(&env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x:4317"), ("OTEL_SDK_DISABLED", "true")])));
        assert!(!wanted(&env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x:4317"), ("OTEL_TRACES_EXPORTER", "none")])));
    }

    #[test]
    fn another_protocol_than_grpc_is_refused() {
        let env: HashMap<String, String> =
            [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        assert!(matches!(start("test", &env), Err(TraceError::Protocol { .. })));
    }
}
