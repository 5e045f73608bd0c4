//! An OTLP/gRPC trace receiver for tests: the collector's `TraceService`, keeping every span
//! exported to it, so that a test can point `OTEL_EXPORTER_OTLP_ENDPOINT` at it and read the
//! span tree of a job.

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One span as received, ids in lowercase hex (`parent` empty for a root).
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// `service.name` of the process that exported it.
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent: String,
    /// OTLP's `SpanKind` (1 internal, 2 server, 3 client, 4 producer, 5 consumer).
    pub kind: i32,
    pub attributes: HashMap<String, String>,
    pub start_ns: u64,
    pub end_ns: u64,
}

impl ReceivedSpan {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    requests: Arc<Mutex<u64>>,
    /// Keep only counts (a benchmark's receiver: it decodes every export, keeps no span).
    count_only: bool,
    counted: Arc<std::sync::atomic::AtomicU64>,
}

fn text(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn map(attributes: &[KeyValue]) -> HashMap<String, String> {
    attributes.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if self.count_only {
            let spans: usize = request.get_ref().resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum();
            self.counted.fetch_add(spans as u64, std::sync::atomic::Ordering::Relaxed);
            if let Ok(mut n) = self.requests.lock() {
                *n += 1;
            }
            return Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }));
        }
        let mut received = Vec::new();
        for resource in request.into_inner().resource_spans {
            let service =
                resource.resource.as_ref().map(|r| map(&r.attributes)).and_then(|a| a.get("service.name").cloned()).unwrap_or_default();
            for scope in resource.scope_spans {
                self.counted.fetch_add(scope.spans.len() as u64, std::sync::atomic::Ordering::Relaxed);
                for span in scope.spans {
                    received.push(ReceivedSpan {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent: hex(&span.parent_span_id),
                        kind: span.kind,
                        attributes: map(&span.attributes),
                        start_ns: span.start_time_unix_nano,
                        end_ns: span.end_time_unix_nano,
                    });
                }
            }
        }
        if let Ok(mut spans) = self.spans.lock() {
            spans.extend(received);
        }
        if let Ok(mut n) = self.requests.lock() {
            *n += 1;
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// A running receiver on 127.0.0.1 (an ephemeral port), stopped when dropped.
pub struct OtlpReceiver {
    /// For `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: String,
    collector: Collector,
    task: tokio::task::JoinHandle<()>,
}

impl OtlpReceiver {
    pub async fn start() -> anyhow::Result<OtlpReceiver> {
        OtlpReceiver::start_with(false).await
    }

    /// A receiver that decodes every export and counts its spans, keeping none (for a
    /// benchmark: what a collector on this host costs at least).
    pub async fn start_counting() -> anyhow::Result<OtlpReceiver> {
        OtlpReceiver::start_with(true).await
    }

    async fn start_with(count_only: bool) -> anyhow::Result<OtlpReceiver> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let collector = Collector { count_only, ..Collector::default() };
        let service = TraceServiceServer::new(collector.clone());
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await;
        });
        Ok(OtlpReceiver { endpoint, collector, task })
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.collector.spans.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// How many spans came (kept or not).
    pub fn counted(&self) -> u64 {
        self.collector.counted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many export calls came.
    pub fn exports(&self) -> u64 {
        self.collector.requests.lock().map(|n| *n).unwrap_or_default()
    }

    /// The spans of `trace_id` once `done` says they are all there (polled), or what came
    /// within `timeout`.
    pub async fn trace(&self, trace_id: &str, timeout: Duration, done: impl Fn(&[ReceivedSpan]) -> bool) -> Vec<ReceivedSpan> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let spans: Vec<ReceivedSpan> = self.spans().into_iter().filter(|s| s.trace_id == trace_id).collect();
            if done(&spans) || tokio::time::Instant::now() >= deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
