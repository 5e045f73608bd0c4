//! The worker over real gRPC on 127.0.0.1:0: processing, typed errors, health, shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use pixmesh_chassis::{ApiError, ErrorCode, Shutdown};
use pixmesh_proto::MAX_MESSAGE_BYTES;
use pixmesh_proto::v1::image_worker_client::ImageWorkerClient;
use pixmesh_proto::v1::{Operations, ProcessRequest};
use pixmesh_worker::WorkerConfig;
use tokio::net::TcpListener;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn start() -> (String, Shutdown, tokio::task::JoinHandle<std::io::Result<()>>) {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", grpc.local_addr().unwrap());
    let shutdown = Shutdown::new();
    let config = WorkerConfig { threads: 2, drain_grace_ms: 2_000, ..WorkerConfig::default() };
    let task = tokio::spawn(pixmesh_worker::run(config, grpc, admin, shutdown.clone()));
    (addr, shutdown, task)
}

fn request(image: Vec<u8>, ops: Operations) -> ProcessRequest {
    ProcessRequest { job_id: "t".into(), attempt: 1, image: image.into(), ops: Some(ops) }
}

#[tokio::test]
async fn processes_images_and_types_its_errors() {
    let (addr, shutdown, task) = start().await;
    let mut client = ImageWorkerClient::connect(addr.clone()).await.unwrap().max_decoding_message_size(MAX_MESSAGE_BYTES);

    let ops = Operations { width: 100, format: "jpeg".into(), quality: 70, ..Operations::default() };
    let out = client.process(request(pixmesh_test_support::png(400, 300), ops)).await.unwrap().into_inner();
    assert_eq!((out.width, out.height, out.format.as_str(), out.content_type.as_str()), (100, 75, "jpeg", "image/jpeg"));
    let decoded = image::load_from_memory(&out.image).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (100, 75));

    let mut corrupt = pixmesh_test_support::jpeg(64, 64);
    corrupt.truncate(200);
    let check = |status: tonic::Status, code: ErrorCode| {
        let err = ApiError::from_grpc_status(&status);
        assert_eq!(err.code, code, "{status:?}");
        assert!(!err.code.is_retryable());
        assert!(!err.message.is_empty());
    };
    check(client.process(request(corrupt, Operations::default())).await.unwrap_err(), ErrorCode::CorruptImage);
    check(client.process(request(b"%PDF-1.7".to_vec(), Operations::default())).await.unwrap_err(), ErrorCode::UnsupportedFormat);
    let bad_ops = Operations { fit: "sideways".into(), ..Operations::default() };
    check(client.process(request(pixmesh_test_support::png(8, 8), bad_ops)).await.unwrap_err(), ErrorCode::BadRequest);

    let mut health = HealthClient::new(tonic::transport::Channel::from_shared(addr).unwrap().connect().await.unwrap());
    let serving = health.check(HealthCheckRequest { service: "pixmesh.v1.ImageWorker".into() }).await.unwrap().into_inner();
    assert_eq!(serving.status, ServingStatus::Serving as i32);

    shutdown.trigger();
    task.await.unwrap().unwrap();
}
