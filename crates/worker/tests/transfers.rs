//! Calls whose bytes come and go through presigned URLs, against a real S3-compatible server
//! (s3s-fs, signatures checked) that answers every request late, as a remote S3 does: such a
//! call holds a transfer place for its whole life and a CPU slot only for its pixels.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use pixmesh_chassis::{ApiError, ErrorCode, Shutdown};
use pixmesh_proto::v1::image_worker_client::ImageWorkerClient;
use pixmesh_proto::v1::{Operations, ProcessRequest};
use pixmesh_store::{BlobRef, BlobStore, BlobsUrl, S3BlobStore, S3Credentials, S3Limits};
use pixmesh_test_support::s3::S3Server;
use pixmesh_worker::WorkerConfig;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

const LATENCY: Duration = Duration::from_millis(300);

async fn store(server: &S3Server) -> S3BlobStore {
    let BlobsUrl::S3(url) = BlobsUrl::parse(&server.url("worker-transfers"), Path::new("/")).unwrap() else { panic!("an S3 URL") };
    let limits =
        S3Limits { timeout: Duration::from_secs(5), connect_timeout: Duration::from_secs(1), retry_for: Duration::from_millis(500) };
    let keys = S3Credentials::Keys { access_key_id: server.access_key().into(), secret_access_key: server.secret_key().into() };
    S3BlobStore::open(&url, limits, keys).await.unwrap()
}

fn ops() -> Operations {
    Operations { width: 8, format: "png".into(), ..Operations::default() }
}

#[tokio::test]
async fn calls_with_urls_wait_on_s3_without_holding_the_cpu_slots() {
    let server = S3Server::start_with_latency(LATENCY);
    let store = store(&server).await;
    let presign = store.presign().unwrap();
    let input = store.put(pixmesh_test_support::png(32, 32).into()).await.unwrap();

    // One CPU slot, three calls with URLs.
    let config = WorkerConfig { threads: 1, capacity: 1, transfers: 3, drain_grace_ms: 2_000, ..WorkerConfig::default() };
    config.validate().unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", grpc.local_addr().unwrap());
    let shutdown = Shutdown::new();
    let task = tokio::spawn(pixmesh_worker::run(config, grpc, admin, shutdown.clone()));
    let client = ImageWorkerClient::connect(addr).await.unwrap();

    let by_url = |call: String| {
        let mut client = client.clone();
        let input = input.clone();
        let store = store.clone();
        async move {
            let presign = store.presign().unwrap();
            let request = ProcessRequest {
                job_id: "t".into(),
                attempt: 1,
                ops: Some(ops()),
                input_url: presign.get_url(&input.digest, Duration::from_secs(30)).await.unwrap(),
                output_url: presign.staging_url(&call, Duration::from_secs(30)).await.unwrap(),
                ..Default::default()
            };
            client.process(request).await
        }
    };
    let started = Instant::now();
    let calls: Vec<_> = (1..=3).map(|n| tokio::spawn(by_url(format!("call-{n}")))).collect();
    tokio::time::sleep(LATENCY / 3).await;

    // All three wait on S3 for their inputs: a fourth is refused at once, by name...
    let refused = by_url("call-4".into()).await.unwrap_err();
    assert_eq!(ApiError::from_grpc_status(&refused).code, ErrorCode::Unavailable, "{refused:?}");
    assert!(refused.message().contains("presigned URLs"), "{refused:?}");
    // ... while the CPU slot is free for a call with its bytes inline.
    let inline = ProcessRequest {
        job_id: "u".into(),
        attempt: 1,
        image: pixmesh_test_support::png(32, 32).into(),
        ops: Some(ops()),
        ..Default::default()
    };
    let answered = client.clone().process(inline).await.unwrap().into_inner();
    assert_eq!(answered.width, 8);
    assert!(started.elapsed() < LATENCY * 2, "the inline call did not wait for the transfers: {:?}", started.elapsed());

    // The three each took their one CPU slot in turn and stored their outputs.
    for (n, call) in calls.into_iter().enumerate() {
        let out = call.await.unwrap().unwrap().into_inner();
        assert!(out.image.is_empty(), "the output went to S3, not into the answer");
        let staged = BlobRef::at_digest(out.digest.clone(), out.size);
        presign.adopt(&format!("call-{}", n + 1), &staged).await.unwrap();
        let bytes = store.get(&out.digest).await.unwrap().unwrap();
        assert_eq!(BlobRef::of(&bytes), staged);
    }
    assert!(started.elapsed() >= LATENCY * 2, "each call waited on S3 for its input and its output");

    shutdown.trigger();
    task.await.unwrap().unwrap();
}
