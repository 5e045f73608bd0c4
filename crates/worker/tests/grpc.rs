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
    start_with(WorkerConfig { threads: 2, drain_grace_ms: 2_000, ..WorkerConfig::default() }).await
}

async fn start_with(config: WorkerConfig) -> (String, Shutdown, tokio::task::JoinHandle<std::io::Result<()>>) {
    config.validate().unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", grpc.local_addr().unwrap());
    let shutdown = Shutdown::new();
    let task = tokio::spawn(pixmesh_worker::run(config, grpc, admin, shutdown.clone()));
    (addr, shutdown, task)
}

async fn client(addr: &str) -> ImageWorkerClient<tonic::transport::Channel> {
    ImageWorkerClient::connect(addr.to_string()).await.unwrap().max_decoding_message_size(MAX_MESSAGE_BYTES)
}

/// A JPEG with `text` in a comment (COM) segment: still a valid image.
fn jpeg_with_comment(text: &[u8]) -> Vec<u8> {
    let jpeg = pixmesh_test_support::jpeg(96, 64);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xFE]);
    out.extend_from_slice(&((text.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(text);
    out.extend_from_slice(&jpeg[2..]);
    out
}

fn request(image: Vec<u8>, ops: Operations) -> ProcessRequest {
    ProcessRequest { job_id: "t".into(), attempt: 1, image: image.into(), ops: Some(ops), ..Default::default() }
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

    // Clock times both ways: a caller's time far ahead comes back below it (not adopted, beyond
    // the maximum offset); a close one comes back above it; answers and errors carry one.
    let hlc_of = |metadata: &tonic::metadata::MetadataMap| {
        let value = metadata.get(pixmesh_chassis::clock::METADATA_KEY).expect("the answer carries the worker's clock time");
        pixmesh_store::Hlc::parse(value.to_str().unwrap()).unwrap()
    };
    let now = pixmesh_store::Hlc(pixmesh_chassis::clock::system_time_clock().0);
    for (ahead_ms, adopted) in [(200, true), (60_000, false)] {
        let sent = now.plus_ms(ahead_ms);
        let mut call = tonic::Request::new(request(pixmesh_test_support::png(8, 8), Operations::default()));
        call.metadata_mut().insert(pixmesh_chassis::clock::METADATA_KEY, sent.to_string().parse().unwrap());
        let answered = hlc_of(client.process(call).await.unwrap().metadata());
        assert_eq!(answered > sent, adopted, "{ahead_ms} ms ahead: sent {sent}, answered {answered}");
    }
    let status = client.process(request(b"%PDF-1.7".to_vec(), Operations::default())).await.unwrap_err();
    assert!(hlc_of(status.metadata()) > now);

    let mut health = HealthClient::new(tonic::transport::Channel::from_shared(addr).unwrap().connect().await.unwrap());
    let serving = health.check(HealthCheckRequest { service: "pixmesh.v1.ImageWorker".into() }).await.unwrap().into_inner();
    assert_eq!(serving.status, ServingStatus::Serving as i32);

    shutdown.trigger();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn options_are_validated_at_the_grpc_entry() {
    let (addr, shutdown, task) = start().await;
    let mut client = client(&addr).await;
    let image = pixmesh_test_support::png(32, 32);
    // Values the upload's query parser refuses must be refused here too: the same rules.
    for ops in [
        Operations { blur: f32::NAN, ..Operations::default() },
        Operations { blur: -3.0, ..Operations::default() },
        Operations { blur: f32::INFINITY, ..Operations::default() },
        Operations { blur: 1e12, ..Operations::default() },
        Operations { sharpen: f32::NAN, ..Operations::default() },
        Operations { sharpen: -1.0, ..Operations::default() },
        Operations { sharpen: f32::NEG_INFINITY, ..Operations::default() },
        Operations { width: 100_000, ..Operations::default() },
        Operations { crop: Some(pixmesh_proto::v1::Crop { x: 0, y: 0, width: 0, height: 8 }), ..Operations::default() },
    ] {
        let status = client.process(request(image.clone(), ops.clone())).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{ops:?}: {status:?}");
        let err = ApiError::from_grpc_status(&status);
        assert_eq!(err.code, ErrorCode::BadRequest, "{ops:?}");
        assert!(err.message.contains("must be"), "{ops:?}: the message says what is allowed: {}", err.message);
    }
    // 0 is "not set" on the wire; valid values pass.
    let ops = Operations { blur: 1.5, sharpen: 0.0, ..Operations::default() };
    client.process(request(image, ops)).await.unwrap();
    shutdown.trigger();
    task.await.unwrap().unwrap();
}

/// A PNG chunk: length, type, data, CRC.
fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[4..]);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// CRC-32 (ISO 3309), as PNG uses.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[tokio::test]
async fn decoder_internals_do_not_reach_the_client() {
    let (addr, shutdown, task) = start().await;
    let mut client = client(&addr).await;
    let png = pixmesh_test_support::png(64, 48);
    // A chunk before IHDR: the png crate names it by its `Debug` form (`ChunkType { type: … }`).
    let mut chunk_first = png[..8].to_vec();
    chunk_first.extend_from_slice(&png_chunk(b"qxYz", b"junk"));
    chunk_first.extend_from_slice(&png[8..]);
    // IDAT damaged, its CRC fixed: the deflate stream is corrupt.
    let mut idat_damaged = png.clone();
    let at = idat_damaged.windows(4).position(|w| w == b"IDAT").unwrap();
    let len = u32::from_be_bytes(idat_damaged[at - 4..at].try_into().unwrap()) as usize;
    for b in idat_damaged[at + 8..at + 4 + len - 4].iter_mut().step_by(3) {
        *b ^= 0x5a;
    }
    let crc = crc32(&idat_damaged[at..at + 4 + len]);
    idat_damaged[at + 4 + len..at + 8 + len].copy_from_slice(&crc.to_be_bytes());
    let mut cases = vec![("chunk before IHDR", chunk_first), ("damaged IDAT", idat_damaged)];
    if let Some(edge) = pixmesh_test_support::corpus("edge") {
        cases.push(("broken.png", std::fs::read(edge.join("broken.png")).unwrap()));
    }
    for (name, bytes) in cases {
        let status = client.process(request(bytes, Operations::default())).await.unwrap_err();
        let err = ApiError::from_grpc_status(&status);
        assert_eq!(err.code, ErrorCode::CorruptImage, "{name}: {status:?}");
        assert_eq!(err.message, "the PNG data is corrupt or truncated", "{name}");
        for internal in ["{", "ChunkType", "Format error", "deflate"] {
            assert!(!status.message().contains(internal), "{name}: {:?}", status.message());
        }
    }
    shutdown.trigger();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_job_fails_alone_and_the_worker_keeps_its_threads() {
    const MARKER: &str = "pixmesh-test: panic on this image";
    let config =
        WorkerConfig { threads: 2, capacity: 4, drain_grace_ms: 2_000, fault_panic_marker: MARKER.into(), ..WorkerConfig::default() };
    let (addr, shutdown, task) = start_with(config).await;
    let mut client = client(&addr).await;
    let poison = jpeg_with_comment(MARKER.as_bytes());
    let good = jpeg_with_comment(b"an ordinary comment");
    let ops = Operations { width: 48, format: "png".into(), ..Operations::default() };
    // Three times as many panics as threads: without containment none would be left.
    for _ in 0..6 {
        let status = client.process(request(poison.clone(), ops.clone())).await.unwrap_err();
        let err = ApiError::from_grpc_status(&status);
        assert_eq!(err.code, ErrorCode::Internal, "{status:?}");
        assert_eq!(status.code(), tonic::Code::Internal);
        // The panic's own words stay in the log.
        assert_eq!(err.message, "the image could not be processed: an internal error occurred");
    }
    // All of the capacity still works at once, while more panics happen beside it.
    let calls = (0..4).map(|i| {
        let mut client = client.clone();
        let image = if i % 2 == 0 { good.clone() } else { poison.clone() };
        let ops = ops.clone();
        tokio::spawn(async move { (i % 2 == 0, client.process(request(image, ops)).await) })
    });
    for call in calls {
        let (is_good, answer) = call.await.unwrap();
        if is_good {
            assert_eq!(answer.unwrap().into_inner().width, 48);
        } else {
            assert_eq!(ApiError::from_grpc_status(&answer.unwrap_err()).code, ErrorCode::Internal);
        }
    }
    let all_good = (0..4).map(|_| {
        let mut client = client.clone();
        let (image, ops) = (good.clone(), ops.clone());
        tokio::spawn(async move { client.process(request(image, ops)).await })
    });
    for call in all_good {
        assert_eq!(call.await.unwrap().unwrap().into_inner().width, 48);
    }
    shutdown.trigger();
    task.await.unwrap().unwrap();
}

#[test]
fn fault_injection_is_off_by_default_and_needs_a_long_marker() {
    assert_eq!(WorkerConfig::default().fault_panic_marker, "");
    let short = WorkerConfig { fault_panic_marker: "x".into(), ..WorkerConfig::default() };
    assert!(short.validate().unwrap_err().contains("fault_panic_marker"));
}
