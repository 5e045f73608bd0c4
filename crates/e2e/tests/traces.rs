//! Tracing across every hop, with real processes exporting over OTLP/gRPC to a receiver the
//! test starts: one job is one trace, from the client's `traceparent` through the gateway, the
//! upload, (on NATS) the wake-up, the distributor's claim, each worker call and the worker's
//! stages, to the blob writes and the final commit.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use pixmesh_test_support::otlp::{OtlpReceiver, ReceivedSpan};
use pixmesh_test_support::{Engines, System, jpeg};
use serde_json::Value;
use std::time::Duration;

const JOB_TIMEOUT: Duration = Duration::from_secs(60);
const SPANS_TIMEOUT: Duration = Duration::from_secs(30);
const MARKER: &str = "pixmesh-e2e-fault: panic on this image";

/// OTLP kinds.
const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const PRODUCER: i32 = 4;
const CONSUMER: i32 = 5;

async fn traced_system(dir: &std::path::Path, receiver: &OtlpReceiver, workers: usize, sets: &[&str]) -> System {
    let engines = Engines::for_profile(dir).await;
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")];
    System::start_with_env(dir, workers, sets, &engines, &env).await.unwrap()
}

fn random_hex(bytes: usize) -> String {
    (0..bytes).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}

async fn upload(system: &System, image: Vec<u8>, traceparent: &str) -> String {
    let res = system
        .client()
        .post(format!("{}/api/upload?width=64&format=png", system.gateway))
        .header("x-api-key", &system.api_key)
        .header("content-type", "image/jpeg")
        .header("traceparent", traceparent)
        .body(image)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let body: Value = res.json().await.unwrap();
    body["id"].as_str().unwrap().to_string()
}

fn one<'a>(spans: &'a [ReceivedSpan], what: &str, pick: impl Fn(&ReceivedSpan) -> bool) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> = spans.iter().filter(|s| pick(s)).collect();
    assert_eq!(found.len(), 1, "exactly one {what} span; the trace: {spans:#?}");
    found[0]
}

fn children<'a>(spans: &'a [ReceivedSpan], parent: &ReceivedSpan, name: &str) -> Vec<&'a ReceivedSpan> {
    spans.iter().filter(|s| s.parent == parent.span_id && s.name == name).collect()
}

/// Whether `span` is `ancestor` or below it.
fn under(spans: &[ReceivedSpan], span: &ReceivedSpan, ancestor: &ReceivedSpan) -> bool {
    let mut at = span;
    for _ in 0..32 {
        if at.span_id == ancestor.span_id {
            return true;
        }
        match spans.iter().find(|s| s.span_id == at.parent) {
            Some(parent) => at = parent,
            None => return false,
        }
    }
    false
}

/// The gateway and upload spans of the trace, checked: the gateway continues the client's
/// span, the upload continues the gateway's.
fn front<'a>(spans: &'a [ReceivedSpan], client_span: &str) -> &'a ReceivedSpan {
    let gateway = one(spans, "gateway", |s| s.service == "pixmesh-gateway" && s.kind == SERVER);
    assert_eq!(gateway.parent, client_span, "the gateway's span continues the client's traceparent");
    assert_eq!(gateway.name, "POST /api/upload");
    assert_eq!(gateway.attribute("http.response.status_code"), Some("202"));
    let upload = one(spans, "upload", |s| s.service == "pixmesh-upload" && s.kind == SERVER);
    assert_eq!(upload.parent, gateway.span_id, "the upload's span is the gateway's child");
    assert_eq!(children(spans, upload, "store create").len(), 1, "the job's creation is a span of the upload");
    upload
}

/// The claim's span: a child of the upload's (or, woken over NATS, of a wake-up's publish
/// that is the upload's child).
fn claim<'a>(spans: &'a [ReceivedSpan], upload: &ReceivedSpan, system: &System) -> &'a ReceivedSpan {
    let claim = one(spans, "claim", |s| s.service == "pixmesh-distributor" && s.kind == CONSUMER);
    if system.queue.is_some() {
        let publish =
            spans.iter().find(|s| s.span_id == claim.parent).unwrap_or_else(|| panic!("the claim's parent is in the trace: {spans:#?}"));
        assert_eq!(publish.kind, PRODUCER, "woken over NATS, the claim continues the wake-up's publish");
        assert_eq!(publish.attribute("messaging.system"), Some("nats"));
        assert_eq!(publish.parent, upload.span_id, "the wake-up was published in the upload's span");
    } else {
        assert_eq!(claim.parent, upload.span_id, "the claim continues the trace the job was uploaded in");
    }
    claim
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_job_is_one_trace_from_the_clients_traceparent_to_the_final_commit() {
    let receiver = OtlpReceiver::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let system = traced_system(dir.path(), &receiver, 2, &[]).await;
    let (trace, client_span) = (random_hex(16), random_hex(8));
    let id = upload(&system, jpeg(320, 240), &format!("00-{trace}-{client_span}-01")).await;
    assert_eq!(system.wait_terminal(&id, JOB_TIMEOUT).await.unwrap()["state"], "succeeded");

    let complete = |spans: &[ReceivedSpan]| {
        ["store commit", "encode", "store create"].iter().all(|n| spans.iter().any(|s| &s.name == n))
            && spans.iter().any(|s| s.service == "pixmesh-gateway")
    };
    let spans = receiver.trace(&trace, SPANS_TIMEOUT, complete).await;
    let upload = front(&spans, &client_span);
    let claim = claim(&spans, upload, &system);
    assert_eq!(claim.attribute("job.id"), Some(id.as_str()));
    assert_eq!(claim.attribute("job.outcome"), Some("succeeded"));

    let calls = children(&spans, claim, "pixmesh.v1.ImageWorker/Process");
    assert_eq!(calls.len(), 1, "one worker call: {spans:#?}");
    let call = calls[0];
    assert_eq!(call.kind, CLIENT);
    assert_eq!(call.attribute("rpc.grpc.status_code"), Some("0"));
    let served = one(&spans, "worker", |s| s.service == "pixmesh-worker" && s.kind == SERVER);
    assert_eq!(served.parent, call.span_id, "the worker's span continues the call's gRPC metadata");
    assert_eq!(served.attribute("job.id"), Some(id.as_str()));
    for stage in ["decode", "resize", "encode"] {
        assert_eq!(children(&spans, served, stage).len(), 1, "the worker's {stage} is a span of its call: {spans:#?}");
    }
    let decode = children(&spans, served, "decode")[0];
    assert_eq!(decode.attribute("image.format"), Some("jpeg"));

    let puts: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.name == "blob put").collect();
    assert!(puts.iter().any(|p| under(&spans, p, upload)), "the input's write is a span of the upload");
    assert!(puts.iter().any(|p| under(&spans, p, claim)), "the output's write is a span of the claim");
    let commit = one(&spans, "commit", |s| s.name == "store commit");
    assert_eq!(commit.parent, claim.span_id);
    assert_eq!(commit.attribute("pixmesh.outcome"), Some("succeeded"));
    // Every span ended inside the trace's time, and a child never starts before its parent.
    for span in &spans {
        assert!(span.end_ns >= span.start_ns, "{span:?}");
        if let Some(parent) = spans.iter().find(|p| p.span_id == span.parent) {
            assert!(span.start_ns + 1_000_000 >= parent.start_ns, "{} starts before its parent {}", span.name, parent.name);
        }
    }
    system.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_on_another_worker_stays_in_the_jobs_trace() {
    let receiver = OtlpReceiver::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("worker.fault_panic_marker=\"{MARKER}\"");
    let system = traced_system(dir.path(), &receiver, 2, &[&marker]).await;
    // An image that makes each worker's decoder panic: `internal`, one more try elsewhere.
    let image = jpeg(320, 240);
    let mut poison = image[..2].to_vec();
    poison.extend_from_slice(&[0xFF, 0xFE]);
    poison.extend_from_slice(&((MARKER.len() + 2) as u16).to_be_bytes());
    poison.extend_from_slice(MARKER.as_bytes());
    poison.extend_from_slice(&image[2..]);
    let trace = random_hex(16);
    let id = upload(&system, poison, &format!("00-{trace}-{}-01", random_hex(8))).await;
    let status = system.wait_terminal(&id, JOB_TIMEOUT).await.unwrap();
    assert_eq!((status["state"].as_str(), status["error"]["code"].as_str()), (Some("failed"), Some("internal")), "{status}");

    let complete = |spans: &[ReceivedSpan]| {
        spans.iter().filter(|s| s.service == "pixmesh-worker" && s.kind == SERVER).count() == 2
            && spans.iter().any(|s| s.name == "store commit")
    };
    let spans = receiver.trace(&trace, SPANS_TIMEOUT, complete).await;
    let upload = front(&spans, &spans.iter().find(|s| s.service == "pixmesh-gateway").unwrap().parent);
    let claim = claim(&spans, upload, &system);
    assert_eq!(claim.attribute("job.outcome"), Some("failed"));
    let calls = children(&spans, claim, "pixmesh.v1.ImageWorker/Process");
    assert_eq!(calls.len(), 2, "two calls in one claim: {spans:#?}");
    assert_ne!(calls[0].attribute("server.address"), calls[1].attribute("server.address"), "the retry went to the other worker");
    for call in &calls {
        assert_eq!(call.attribute("error.type"), Some("internal"));
        let served: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.parent == call.span_id && s.kind == SERVER).collect();
        assert_eq!(served.len(), 1, "each call is continued by the worker that took it");
        assert_eq!(served[0].attribute("rpc.grpc.status_code"), Some("13"), "INTERNAL");
    }
    let commit = one(&spans, "commit", |s| s.name == "store commit");
    assert_eq!((commit.parent.as_str(), commit.attribute("pixmesh.outcome")), (claim.span_id.as_str(), Some("failed")));
    system.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_an_endpoint_nothing_is_exported_and_a_bad_protocol_stops_the_role() {
    // A role asked to export over another protocol than gRPC says so and does not start.
    let out = tokio::process::Command::new(pixmesh_test_support::pixmesh_bin())
        .arg("worker")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("OTEL_EXPORTER_OTLP_PROTOCOL") && stderr.contains("grpc"), "{stderr}");

    // OTEL_SDK_DISABLED wins over an endpoint: a whole job exports nothing.
    let receiver = OtlpReceiver::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let engines = Engines::for_profile(dir.path()).await;
    let env =
        [("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100"), ("OTEL_SDK_DISABLED", "true")];
    let system = System::start_with_env(dir.path(), 1, &[], &engines, &env).await.unwrap();
    let id = upload(&system, jpeg(64, 64), &format!("00-{}-{}-01", random_hex(16), random_hex(8))).await;
    assert_eq!(system.wait_terminal(&id, JOB_TIMEOUT).await.unwrap()["state"], "succeeded");
    tokio::time::sleep(Duration::from_millis(500)).await;
    system.stop().await.unwrap();
    assert_eq!(receiver.exports(), 0, "nothing was exported");
}
