//! The interceptors against real upstream servers on 127.0.0.1: what the upload guard stops
//! (and that the upstream sees nothing of it), per-key rate limits, route admission, upstream
//! pools with passive ejection and retries, h2c upstreams, and reloads while serving.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::IntoResponse;
use axum::routing::{any, get};
use pixmesh_chassis::Shutdown;
use pixmesh_gateway::config::{ApiKeyConfig, PoolConfig};
use pixmesh_gateway::keys::hash_key;
use pixmesh_gateway::{GatewayConfig, ImageLimitsConfig, RouteConfig, Source, UpstreamConfig};
use pixmesh_test_support::{disposition, form};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What an upstream received, whole.
#[derive(Default)]
struct Seen {
    requests: AtomicU64,
    bytes: AtomicU64,
}

async fn record(State(seen): State<Arc<Seen>>, request: Request) -> axum::response::Response {
    let (parts, body) = request.into_parts();
    // Counted only when the whole body arrived.
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else { return http::StatusCode::BAD_REQUEST.into_response() };
    seen.requests.fetch_add(1, Ordering::SeqCst);
    seen.bytes.fetch_add(body.len() as u64, Ordering::SeqCst);
    let headers: serde_json::Map<String, Value> =
        parts.headers.iter().map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or("?")))).collect();
    axum::Json(
        json!({ "uri": parts.uri.to_string(), "version": format!("{:?}", parts.version), "body_len": body.len(), "headers": headers }),
    )
    .into_response()
}

async fn upstream() -> (String, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let app = Router::new()
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(400)).await;
                "slow"
            })
            .post(|body: bytes::Bytes| async move {
                // Takes the whole body, then is slow to answer.
                tokio::time::sleep(Duration::from_millis(1500)).await;
                body.len().to_string()
            }),
        )
        .route(
            "/stream",
            get(|| async {
                let chunks = futures_util::stream::unfold(0, |i| async move {
                    (i < 10).then_some(())?;
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    Some((Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 1000])), i + 1))
                });
                Body::from_stream(chunks)
            }),
        )
        .route(
            "/events/live",
            get(|| async {
                // An event stream that never ends: a tick every 50 ms.
                let ticks = futures_util::stream::unfold(0u64, |i| async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Some((Ok::<_, std::io::Error>(bytes::Bytes::from(format!("id: {i}\ndata: tick\n\n"))), i + 1))
                });
                ([(http::header::CONTENT_TYPE, "text/event-stream")], Body::from_stream(ticks))
            }),
        )
        .fallback(any(record))
        .with_state(Arc::clone(&seen));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

fn route(prefix: &str, upstream: &str) -> RouteConfig {
    RouteConfig { timeout_ms: Some(5_000), ..RouteConfig::new(prefix, upstream) }
}

fn key(name: &str, secret: &str) -> ApiKeyConfig {
    ApiKeyConfig { name: name.into(), sha256: hash_key(secret), ..ApiKeyConfig::default() }
}

fn config(upload: &str) -> GatewayConfig {
    let mut c = GatewayConfig { rate: "off".into(), access_log: false, ..GatewayConfig::default() };
    c.upstreams.insert("upload".into(), UpstreamConfig::Url(upload.into()));
    c.upstreams.insert("status".into(), UpstreamConfig::Url(upload.into()));
    c.api_keys.push(key("trusted", "k-trusted"));
    c.api_keys.push(ApiKeyConfig { max_pixels: Some(1920 * 1080), max_side: Some(1920), ..key("untrusted", "k-untrusted") });
    c
}

async fn start(source: Source) -> (String, Shutdown) {
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = http.local_addr().unwrap().to_string();
    let shutdown = Shutdown::new();
    tokio::spawn(pixmesh_gateway::run(source, http, admin, shutdown.clone()));
    (addr, shutdown)
}

/// A real JPEG whose frame header claims `w`×`h` (the guard reads only the header).
fn jpeg_claiming(w: u16, h: u16) -> Vec<u8> {
    let mut j = pixmesh_test_support::jpeg(16, 16);
    let sof = j.windows(2).position(|m| m[0] == 0xFF && matches!(m[1], 0xC0 | 0xC2)).unwrap();
    j[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    j[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    j
}

/// Sends request headers and the first bytes of a body over a raw connection, then reads the
/// response without sending the rest. Returns the status line, the body, and how long the
/// answer took after the first body bytes were written.
async fn send_head(addr: &str, head: &str, first: &[u8]) -> (String, String, Duration) {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut s, mut w) = s.into_split();
    let mut out = head.as_bytes().to_vec();
    out.extend_from_slice(first);
    // The gateway may answer and close before all of it is written: a refused client sees
    // its write fail, as with any server that refuses early.
    tokio::spawn(async move { w.write_all(&out).await });
    let sent = Instant::now();
    let mut reply = vec![0u8; 64 * 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut reply)).await.unwrap().unwrap();
    let took = sent.elapsed();
    reply.truncate(n);
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut reply)).await;
    let text = String::from_utf8_lossy(&reply).to_string();
    let status = text.lines().next().unwrap_or("").to_string();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body, took)
}

fn chunk(data: &[u8]) -> Vec<u8> {
    let mut v = format!("{:x}\r\n", data.len()).into_bytes();
    v.extend_from_slice(data);
    v.extend_from_slice(b"\r\n");
    v
}

#[tokio::test]
async fn image_uploads_are_judged_from_their_header_bytes() {
    let (up, seen) = upstream().await;
    let (gw, shutdown) = start(Source::fixed(config(&up), vec![])).await;
    let c = reqwest::Client::new();
    let post = |key: &'static str, body: Vec<u8>, ct: &'static str| {
        c.post(format!("http://{gw}/api/upload")).header("x-api-key", key).header("content-type", ct).body(body).send()
    };

    // Within limits: forwarded whole.
    let small = pixmesh_test_support::jpeg(640, 480);
    let res = post("k-trusted", small.clone(), "image/jpeg").await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["body_len"], small.len());
    let png = pixmesh_test_support::png(300, 200);
    assert_eq!(post("k-untrusted", png, "image/png").await.unwrap().status(), 200);
    let forwarded = seen.requests.load(Ordering::SeqCst);

    let expect = |res: reqwest::Response, status: u16, code: &'static str| async move {
        assert_eq!(res.status(), status);
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "{v}");
        v["error"]["message"].as_str().unwrap().to_string()
    };
    // Too many pixels for the route (16 MP), and a side too long.
    let msg = expect(post("k-trusted", jpeg_claiming(6000, 4000), "image/jpeg").await.unwrap(), 413, "image_too_large").await;
    assert!(msg.contains("6000×4000"), "{msg}");
    expect(post("k-trusted", jpeg_claiming(9000, 100), "image/jpeg").await.unwrap(), 413, "image_too_large").await;
    // The untrusted key's own limit is lower: 1920×1080.
    expect(post("k-untrusted", jpeg_claiming(2000, 1200), "image/jpeg").await.unwrap(), 413, "image_too_large").await;
    // Formats: not an image, and an image format not accepted here.
    expect(post("k-trusted", b"{\"not\": \"an image\"}".to_vec(), "application/json").await.unwrap(), 415, "unsupported_format").await;
    let msg = expect(post("k-trusted", b"II*\0\x08\0\0\0abcdefgh".to_vec(), "image/tiff").await.unwrap(), 415, "unsupported_format").await;
    assert!(msg.contains("TIFF"), "{msg}");
    // A broken header, and an empty body.
    expect(post("k-trusted", vec![0xFF, 0xD8, 0xFF, 0xDA, 0, 4, 0, 0, 1, 2, 3, 4, 5], "image/jpeg").await.unwrap(), 422, "corrupt_image")
        .await;
    let whole = jpeg_claiming(100, 100);
    let sof = whole.windows(2).position(|m| m[0] == 0xFF && matches!(m[1], 0xC0 | 0xC2)).unwrap();
    expect(post("k-trusted", whole[..sof + 4].to_vec(), "image/jpeg").await.unwrap(), 422, "corrupt_image").await;
    // multipart: the `file` part is what is judged.
    let form = |bytes: Vec<u8>| {
        reqwest::multipart::Form::new().text("note", "hi").part("file", reqwest::multipart::Part::bytes(bytes).file_name("a.jpg"))
    };
    let res =
        c.post(format!("http://{gw}/api/upload")).header("x-api-key", "k-trusted").multipart(form(jpeg_claiming(8000, 8000))).send().await;
    expect(res.unwrap(), 413, "image_too_large").await;
    let res = c.post(format!("http://{gw}/api/upload")).header("x-api-key", "k-trusted").multipart(form(small.clone())).send().await;
    assert_eq!(res.unwrap().status(), 200);
    assert_eq!(seen.requests.load(Ordering::SeqCst), forwarded + 1, "the upstream saw none of the refused uploads");

    // A 30 MB 4K+ upload with an honest Content-Length: refused from its header bytes while
    // the rest is still unsent.
    let big = jpeg_claiming(7680, 4320);
    let head = format!(
        "POST /api/upload HTTP/1.1\r\nhost: x\r\nx-api-key: k-trusted\r\ncontent-type: image/jpeg\r\ncontent-length: {}\r\n\r\n",
        30_000_000
    );
    let (status, body, took) = send_head(&gw, &head, &big).await;
    assert!(status.contains(" 413 "), "{status}");
    assert!(body.contains("image_too_large"), "{body}");
    assert!(took < Duration::from_secs(1), "answered in {took:?}");
    // The same, chunked.
    let head =
        "POST /api/upload HTTP/1.1\r\nhost: x\r\nx-api-key: k-trusted\r\ncontent-type: image/jpeg\r\ntransfer-encoding: chunked\r\n\r\n";
    let (status, body, _) = send_head(&gw, head, &chunk(&big)).await;
    assert!(status.contains(" 413 ") && body.contains("image_too_large"), "{status} {body}");
    // Over the byte limit by Content-Length: refused before any body byte.
    let head =
        "POST /api/upload HTTP/1.1\r\nhost: x\r\nx-api-key: k-trusted\r\ncontent-type: image/jpeg\r\ncontent-length: 40000000\r\n\r\n";
    let (status, body, _) = send_head(&gw, head, b"").await;
    assert!(status.contains(" 413 ") && body.contains("payload_too_large"), "{status} {body}");
    // Chunked and within the size limits by its header, but longer than the byte limit: cut.
    let mut chunked = chunk(&small);
    let filler = vec![0u8; 1024 * 1024];
    for _ in 0..33 {
        chunked.extend(chunk(&filler));
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let head =
        "POST /api/upload HTTP/1.1\r\nhost: x\r\nx-api-key: k-trusted\r\ncontent-type: image/jpeg\r\ntransfer-encoding: chunked\r\n\r\n";
    let (status, body, _) = send_head(&gw, head, &chunked).await;
    assert!(status.contains(" 413 ") && body.contains("payload_too_large"), "{status} {body}");
    assert_eq!(seen.requests.load(Ordering::SeqCst), forwarded + 1, "cut bodies never completed upstream");
    shutdown.trigger();
}

/// POSTs over h2c (HTTP/2 with prior knowledge, as `curl --http2-prior-knowledge`).
async fn h2c_post(addr: &str, key: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    use http_body_util::BodyExt;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let request = http::Request::post(format!("http://{addr}/api/upload"))
        .header("x-api-key", key)
        .header("content-type", content_type)
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let response = send.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// POSTs over HTTP/1.1; `chunked` sends the body without a length.
async fn h1_post(addr: &str, key: &str, content_type: &str, body: Vec<u8>, chunked: bool) -> (u16, Value) {
    let c = reqwest::Client::new();
    let request = c.post(format!("http://{addr}/api/upload")).header("x-api-key", key).header("content-type", content_type);
    let request = if chunked {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
        request.body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
    } else {
        request.body(body)
    };
    let res = request.send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// Sends request headers and the first bytes of a body, then nothing more, keeping the
/// connection open; returns the status line and body of the response.
async fn send_and_stall(addr: &str, head: &str, first: &[u8]) -> (String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(first).await.unwrap();
    let mut reply = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let complete = |r: &[u8]| {
        let text = String::from_utf8_lossy(r);
        let Some((head, body)) = text.split_once("\r\n\r\n") else { return false };
        let len = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0)));
        len.is_some_and(|n| body.len() >= n)
    };
    while !complete(&reply) {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => reply.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&reply).to_string();
    let status = text.lines().next().unwrap_or("").to_string();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// The body without the last bytes of its closing boundary.
fn without_end(mut body: Vec<u8>) -> Vec<u8> {
    body.truncate(body.len() - 4);
    body
}

/// A PNG header claiming `w`×`h` (the guard reads only the header; the upstream here does not decode).
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut p = pixmesh_test_support::png(8, 8);
    p[16..20].copy_from_slice(&w.to_be_bytes());
    p[20..24].copy_from_slice(&h.to_be_bytes());
    p
}

fn bmp() -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::RgbImage::new(128, 128).write_to(&mut out, image::ImageFormat::Bmp).unwrap();
    out.into_inner()
}

/// One upload and what the gateway answers: forwarded whole (`code` None, the upstream's 200),
/// or refused with `status` and `code` while the upstream never gets the body whole.
struct Case {
    what: &'static str,
    key: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
    status: u16,
    code: Option<&'static str>,
}

fn case(what: &'static str, content_type: &'static str, body: Vec<u8>, status: u16, code: Option<&'static str>) -> Case {
    Case { what, key: "k-trusted", content_type, body, status, code }
}

/// Sends every case over HTTP/1.1 with a length, chunked, and h2c.
async fn check(gw: &str, seen: &Seen, cases: &[Case]) {
    for Case { what, key, content_type, body, status, code } in cases {
        for transport in ["h1", "h1 chunked", "h2c"] {
            let before = seen.requests.load(Ordering::SeqCst);
            let (got, v) = match transport {
                "h2c" => h2c_post(gw, key, content_type, body.clone()).await,
                t => h1_post(gw, key, content_type, body.clone(), t.ends_with("chunked")).await,
            };
            assert_eq!(got, *status, "{what} over {transport}: {v}");
            let reached = seen.requests.load(Ordering::SeqCst) - before;
            match code {
                Some(code) => {
                    assert_eq!(v["error"]["code"], *code, "{what} over {transport}: {v}");
                    assert_eq!(reached, 0, "{what} over {transport}: the upstream never got a refused upload whole");
                }
                None => {
                    assert_eq!(v["body_len"], body.len(), "{what} over {transport}: forwarded whole");
                    assert_eq!(reached, 1, "{what} over {transport}");
                }
            }
        }
    }
}

/// The part of a multipart body the guard judges is the part the upload service takes (one
/// rule, `pixmesh_chassis::multipart`): over HTTP/1.1 with a length, chunked, and h2c.
#[tokio::test]
async fn multipart_uploads_are_judged_on_the_one_image_part() {
    let (up, seen) = upstream().await;
    let (gw, shutdown) = start(Source::fixed(config(&up), vec![])).await;
    let small = pixmesh_test_support::jpeg(64, 48);
    let huge_png = png_claiming(7000, 7000);
    let huge_jpeg = jpeg_claiming(8000, 8000);
    let note = vec![b'n'; 300 * 1024]; // larger than the 256 KiB probe
    let ct = "multipart/form-data; boundary=XyZ";
    let (file, image, x) = (disposition("file", Some("small.jpg")), disposition("image", Some("a")), disposition("x", Some("huge.png")));
    let mut preamble = b"preamble text\r\n".to_vec();
    preamble.extend(form("XyZ", &[(&file, &small)]));
    let lf_only = [format!("--XyZ\n{}\n\n", disposition("file", None)).as_bytes(), &small, b"\n--XyZ--\n"].concat();
    let cases = vec![
        case("file part after a field", ct, form("XyZ", &[(&disposition("note", None), b"hi"), (&file, &small)]), 200, None),
        case("-F image=@7000x7000.png", ct, form("XyZ", &[(&image, &huge_png)]), 413, Some("image_too_large")),
        case("-F image=@hopper.bmp", ct, form("XyZ", &[(&image, &bmp())]), 415, Some("unsupported_format")),
        // The first image part is sized; a second one is refused whatever the first was.
        case("-F x=@huge.png -F file=@small.jpg", ct, form("XyZ", &[(&x, &huge_png), (&file, &small)]), 413, Some("image_too_large")),
        case("-F x=@small.jpg -F file=@huge.png", ct, form("XyZ", &[(&x, &small), (&file, &huge_png)]), 400, Some("bad_request")),
        case("-F file=@small.jpg -F image=@small.jpg", ct, form("XyZ", &[(&file, &small), (&image, &small)]), 400, Some("bad_request")),
        case("a filename on a field named x, alone", ct, form("XyZ", &[(&x, &huge_png)]), 413, Some("image_too_large")),
        case("no image part", ct, form("XyZ", &[(&disposition("note", None), &small)]), 400, Some("bad_request")),
        case("LF-only part headers", ct, lf_only, 400, Some("bad_request")),
        case(
            "header names in any case",
            ct,
            form("XyZ", &[("CONTENT-DISPOSITION: FORM-DATA; NAME=FILE", &huge_jpeg)]),
            413,
            Some("image_too_large"),
        ),
        case(
            "a Content-Type without a filename is a field",
            ct,
            form("XyZ", &[(&format!("{}\r\nContent-Type: image/png", disposition("x", None)), &huge_png), (&file, &small)]),
            200,
            None,
        ),
        case(
            "a boundary in quotes",
            "multipart/form-data; boundary=\"a:b c\"",
            form("a:b c", &[(&file, &huge_jpeg)]),
            413,
            Some("image_too_large"),
        ),
        case("a preamble", ct, preamble, 200, None),
        case(
            "a text field larger than the probe, then a small image",
            ct,
            form("XyZ", &[(&disposition("note", None), &note), (&file, &small)]),
            200,
            None,
        ),
        case(
            "a text field larger than the probe, then a huge image",
            ct,
            form("XyZ", &[(&disposition("note", None), &note), (&file, &huge_jpeg)]),
            413,
            Some("image_too_large"),
        ),
        case(
            "a second image part after the probe",
            ct,
            form("XyZ", &[(&file, &small), (&disposition("note", None), &note), (&image, &small)]),
            400,
            Some("bad_request"),
        ),
        case("no boundary", "multipart/form-data", form("XyZ", &[(&file, &small)]), 400, Some("bad_request")),
        case("no closing boundary", ct, without_end(form("XyZ", &[(&file, &small)])), 400, Some("bad_request")),
    ];
    check(&gw, &seen, &cases).await;
    shutdown.trigger();
}

/// Camera files with megabytes of metadata before the frame header, and large ICC profiles,
/// are sized on the way (memory per request stays small) and accepted; a frame header beyond
/// the probe that is too large is still refused, with the upstream never getting it whole.
#[tokio::test]
async fn a_frame_header_beyond_the_probe_is_still_judged() {
    let (up, seen) = upstream().await;
    let (gw, shutdown) = start(Source::fixed(config(&up), vec![])).await;
    let camera = pixmesh_test_support::with_metadata(&jpeg_claiming(3648, 2432), 7_300_000);
    let too_big = pixmesh_test_support::with_metadata(&jpeg_claiming(8000, 8000), 7_300_000);
    let too_wide_for_the_key = pixmesh_test_support::with_metadata(&jpeg_claiming(2000, 1200), 1_000_000);
    let broken = {
        let mut b = pixmesh_test_support::with_metadata(&jpeg_claiming(100, 100), 1_000_000);
        b[2 + 10 * 65_537] = 0; // the 11th segment's marker
        b
    };
    let icc = pixmesh_test_support::icc_profile_big_jpeg();
    let ct = "multipart/form-data; boundary=XyZ";
    let file = disposition("file", Some("photo.jpg"));
    let cases = vec![
        case("9 MP camera JPEG, SOF at 7.3 MB", "image/jpeg", camera.clone(), 200, None),
        case("the same in a form", ct, form("XyZ", &[(&file, &camera)]), 200, None),
        case("large ICC profile", "image/jpeg", icc.clone(), 200, None),
        case("large ICC profile in a form", ct, form("XyZ", &[(&file, &icc)]), 200, None),
        case("64 MP, SOF at 7.3 MB", "image/jpeg", too_big.clone(), 413, Some("image_too_large")),
        case("64 MP in a form", ct, form("XyZ", &[(&file, &too_big)]), 413, Some("image_too_large")),
        Case { key: "k-untrusted", ..case("over the key's own limit", "image/jpeg", too_wide_for_the_key, 413, Some("image_too_large")) },
        case("a broken segment at 650 KB", "image/jpeg", broken, 422, Some("corrupt_image")),
        case("the body ends inside the metadata", "image/jpeg", camera[..5_000_000].to_vec(), 422, Some("corrupt_image")),
    ];
    check(&gw, &seen, &cases).await;
    shutdown.trigger();
}

/// A client too slow to send its body gets 408 `request_timeout`, whether the guard is still
/// waiting for the image header or the upstream is waiting for the rest of the body; an
/// upstream too slow to answer still gets 504 `timeout`.
#[tokio::test]
async fn a_slow_client_is_408_and_a_slow_upstream_504() {
    let (up, seen) = upstream().await;
    let mut c = config(&up);
    c.timeout_ms = 1_000;
    c.upstreams.insert("slow".into(), UpstreamConfig::Url(up.clone()));
    c.routes.push(RouteConfig { timeout_ms: Some(1_000), ..route("/slow", "slow") });
    let (gw, shutdown) = start(Source::fixed(c, vec![])).await;
    let small = pixmesh_test_support::jpeg(64, 48);
    let head = |len: usize| {
        format!("POST /api/upload HTTP/1.1\r\nhost: x\r\nx-api-key: k-trusted\r\ncontent-type: image/jpeg\r\ncontent-length: {len}\r\n\r\n")
    };
    // The image header never completes.
    let (status, body) = send_and_stall(&gw, &head(100_000), &small[..10]).await;
    assert!(status.contains(" 408 ") && body.contains("request_timeout"), "{status} {body}");
    // The header passed and was forwarded; the rest of the body never comes.
    let (status, body) = send_and_stall(&gw, &head(small.len() + 100_000), &small).await;
    assert!(status.contains(" 408 ") && body.contains("request_timeout"), "{status} {body}");
    // The same on a route without image checks.
    let slow_body = "POST /slow HTTP/1.1\r\nhost: x\r\nx-api-key: k-trusted\r\ncontent-length: 100000\r\n\r\n";
    let (status, body) = send_and_stall(&gw, slow_body, b"some bytes").await;
    assert!(status.contains(" 408 ") && body.contains("request_timeout"), "{status} {body}");
    assert_eq!(seen.requests.load(Ordering::SeqCst), 0);
    // The upstream has the whole body but answers late: its timeout, not the client's.
    let c = reqwest::Client::new();
    let res = c.post(format!("http://{gw}/slow")).header("x-api-key", "k-trusted").body(vec![1u8; 100_000]).send().await.unwrap();
    assert_eq!(res.status(), 504);
    assert_eq!(res.json::<Value>().await.unwrap()["error"]["code"], "timeout");
    let res = c.get(format!("http://{gw}/slow")).header("x-api-key", "k-trusted").send().await.unwrap();
    assert_eq!(res.status(), 200, "400 ms is within the route's second");
    shutdown.trigger();
}

#[tokio::test]
async fn keys_are_rate_limited_with_retry_after() {
    let (up, _) = upstream().await;
    let mut c = config(&up);
    c.api_keys.push(ApiKeyConfig { rate: Some("1/m".into()), burst: Some(2), ..key("metered", "k-metered") });
    let (gw, shutdown) = start(Source::fixed(c, vec![])).await;
    let client = reqwest::Client::new();
    let get = |k: &'static str| client.get(format!("http://{gw}/api/status/1")).header("x-api-key", k).send();
    assert_eq!(get("k-metered").await.unwrap().status(), 200);
    assert_eq!(get("k-metered").await.unwrap().status(), 200);
    let res = get("k-metered").await.unwrap();
    assert_eq!(res.status(), 429);
    let retry: u64 = res.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((20..=60).contains(&retry), "one request a minute, burst of two: retry in ~30 s, got {retry}");
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limited");
    assert!(v["error"]["message"].as_str().unwrap().contains("metered"));
    // Other keys are not affected.
    for _ in 0..5 {
        assert_eq!(get("k-trusted").await.unwrap().status(), 200);
    }
    shutdown.trigger();
}

#[tokio::test]
async fn without_a_queue_admission_sheds_load_past_its_limit() {
    let (up, _) = upstream().await;
    let mut c = config(&up);
    c.upstreams.insert("slow".into(), UpstreamConfig::Url(up.clone()));
    c.routes.push(RouteConfig { max_in_flight: Some(1), max_queue: Some(0), ..route("/slow", "slow") });
    let (gw, shutdown) = start(Source::fixed(c, vec![])).await;
    let client = reqwest::Client::new();
    let get = || client.get(format!("http://{gw}/slow")).header("x-api-key", "k-trusted").send();
    let (a, b) = tokio::join!(get(), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        get().await
    });
    assert_eq!(a.unwrap().status(), 200);
    let b = b.unwrap();
    assert_eq!(b.status(), 503);
    assert_eq!(b.headers()["retry-after"], "1");
    assert_eq!(b.json::<Value>().await.unwrap()["error"]["code"], "unavailable");
    // The slot is free again once the first answer is done.
    assert_eq!(get().await.unwrap().status(), 200);
    shutdown.trigger();
}

#[tokio::test]
async fn event_streams_pass_unbuffered_with_places_of_their_own_that_do_not_starve_requests() {
    let (up, _) = upstream().await;
    let mut c = config(&up);
    c.upstreams.insert("events".into(), UpstreamConfig::Url(up.clone()));
    c.routes.push(RouteConfig { max_in_flight: Some(1), max_queue: Some(0), max_streams: Some(2), ..route("/events", "events") });
    let (gw, shutdown) = start(Source::fixed(c, vec![])).await;
    let client = reqwest::Client::new();
    let open =
        || client.get(format!("http://{gw}/events/live")).header("x-api-key", "k-trusted").header("accept", "text/event-stream").send();
    // Two streams open; each gets its first tick while the stream goes on (nothing waits for
    // a body that never ends).
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut response = open().await.unwrap();
        assert_eq!(response.status(), 200);
        let first = tokio::time::timeout(Duration::from_secs(2), response.chunk()).await.expect("a tick within 2 s").unwrap().unwrap();
        assert!(String::from_utf8_lossy(&first).contains("data: tick"), "{first:?}");
        streams.push(response);
    }
    // The route's one request slot is not taken by them: a plain request still goes through.
    let plain = client.get(format!("http://{gw}/events/x")).header("x-api-key", "k-trusted").send().await.unwrap();
    assert_eq!(plain.status(), 200);
    // A third stream is past the route's max_streams: refused at once.
    let third = open().await.unwrap();
    assert_eq!(third.status(), 503);
    assert_eq!(third.headers()["retry-after"], "5");
    assert!(third.json::<Value>().await.unwrap()["error"]["message"].as_str().unwrap().contains("event streams open"));
    // A client that goes away frees its place.
    streams.pop();
    let started = Instant::now();
    loop {
        let again = open().await.unwrap();
        if again.status() == 200 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "the place of a closed stream never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.trigger();
}

#[tokio::test]
async fn a_key_held_to_presets_says_so_to_the_upload_service_and_a_client_cannot_say_it() {
    let (up, _) = upstream().await;
    let mut c = config(&up);
    c.api_keys.push(ApiKeyConfig { presets: Some(vec!["thumb".into(), "large".into()]), ..key("held", "k-held") });
    let (gw, shutdown) = start(Source::fixed(c, vec![])).await;
    let image = pixmesh_test_support::png(16, 16);
    let client = reqwest::Client::new();
    let send = |key: &'static str, forged: bool| {
        let mut request = client.post(format!("http://{gw}/api/upload")).header("x-api-key", key).header("content-type", "image/png");
        if forged {
            request = request.header("x-pixmesh-presets", "anything");
        }
        request.body(image.clone()).send()
    };
    let held: Value = send("k-held", true).await.unwrap().json().await.unwrap();
    assert_eq!(held["headers"]["x-pixmesh-presets"], "thumb,large");
    let free: Value = send("k-trusted", true).await.unwrap().json().await.unwrap();
    assert!(free["headers"].get("x-pixmesh-presets").is_none(), "a client-sent value is removed: {free}");
    shutdown.trigger();
    // A preset name that cannot be one is refused with the configuration.
    let bad = ApiKeyConfig { presets: Some(vec!["Thumb".into()]), ..key("bad", "k-bad") };
    assert!(bad.validate().unwrap_err().contains("preset name"));
}

#[tokio::test]
async fn a_dead_instance_is_ejected_and_idempotent_requests_retried() {
    let (up, seen) = upstream().await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    }; // closed again: connections are refused
    let mut c = config(&up);
    c.upstreams.insert("pool".into(), UpstreamConfig::Urls(vec![dead, up.clone()]));
    c.routes.push(route("/pool", "pool"));
    let (gw, shutdown) = start(Source::fixed(c, vec![])).await;
    let client = reqwest::Client::new();
    for i in 0..10 {
        let res = client.get(format!("http://{gw}/pool/{i}")).header("x-api-key", "k-trusted").send().await.unwrap();
        assert_eq!(res.status(), 200, "GET {i} is retried on the live instance");
    }
    // Ejected after its first refusal: POSTs with bodies (never retried) all reach the live one.
    for i in 0..10 {
        let res = client.post(format!("http://{gw}/pool/{i}")).header("x-api-key", "k-trusted").body("payload").send().await.unwrap();
        assert_eq!(res.status(), 200, "POST {i}");
    }
    assert_eq!(seen.requests.load(Ordering::SeqCst), 20);
    shutdown.trigger();
}

#[tokio::test]
async fn h2c_upstreams_and_trace_context() {
    let (up, _) = upstream().await;
    let mut c = config(&up);
    c.upstreams.insert("h2".into(), UpstreamConfig::Pool(PoolConfig { h2c: true, ..PoolConfig::of(vec![up.clone()]) }));
    c.routes.push(route("/h2", "h2"));
    let (gw, shutdown) = start(Source::fixed(c, vec![])).await;
    let client = reqwest::Client::new();
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let res = client.get(format!("http://{gw}/h2/x")).header("x-api-key", "k-trusted").header("traceparent", parent).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["version"], "HTTP/2.0");
    let forwarded = v["headers"]["traceparent"].as_str().unwrap();
    assert!(forwarded.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && !forwarded.contains("00f067aa0ba902b7"), "{forwarded}");
    assert!(v["headers"]["x-request-id"].as_str().is_some());
    let res = client.get(format!("http://{gw}/api/status/1")).header("x-api-key", "k-trusted").send().await.unwrap();
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["version"], "HTTP/1.1");
    assert_eq!(v["headers"]["traceparent"].as_str().unwrap().len(), 55, "a new trace is started");
    shutdown.trigger();
}

#[tokio::test]
async fn reloads_on_file_change_and_sighup_without_dropping_requests() {
    let (up, _) = upstream().await;
    let dir = std::env::temp_dir().join(format!("pixmesh-gw-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gateway.toml");
    let keys = dir.join("keys.toml");
    std::fs::write(&keys, format!("[[keys]]\nname = \"a\"\nsha256 = \"{}\"\n", hash_key("k-a"))).unwrap();
    let write = |extra: &str, watch: bool| {
        let text = format!(
            "rate = \"off\"\nwatch_files = {watch}\napi_keys_file = {:?}\n[upstreams]\nupload = {up:?}\nstatus = {up:?}\nold = {up:?}\n{extra}",
            keys.display().to_string()
        );
        std::fs::write(&file, text).unwrap();
    };
    write("[[routes]]\nprefix = \"/old\"\nupstream = \"old\"\nstrip_prefix = true\n", true);
    let path = file.clone();
    let load: pixmesh_gateway::reload::LoadConfig =
        Arc::new(move || toml::from_str::<GatewayConfig>(&std::fs::read_to_string(&path).unwrap()).map_err(|e| e.to_string()));
    let (gw, shutdown) = start(Source { load, config_file: Some(file.clone()), plain_keys: vec![], admin_keys: vec![] }).await;
    let client = reqwest::Client::new();
    let status = |path: &'static str, k: &'static str| {
        let c = client.clone();
        let url = format!("http://{gw}{path}");
        async move { c.get(url).header("x-api-key", k).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status("/old/stream", "k-a").await, 200);
    assert_eq!(status("/new/x", "k-a").await, 404);

    // A slow streamed response is in flight while the routes change under it.
    let streaming = {
        let c = client.clone();
        let url = format!("http://{gw}/old/stream");
        tokio::spawn(async move { c.get(url).header("x-api-key", "k-a").send().await.unwrap().bytes().await.unwrap().len() })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    write("[[routes]]\nprefix = \"/new\"\nupstream = \"old\"\n", true);
    let deadline = Instant::now() + Duration::from_secs(5);
    while status("/new/x", "k-a").await != 200 {
        assert!(Instant::now() < deadline, "the file change was not picked up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status("/old/x", "k-a").await, 404);
    assert_eq!(streaming.await.unwrap(), 10_000, "the request in flight finished under its old route");

    // A broken file keeps the current configuration.
    std::fs::write(&file, "routes = 7").unwrap();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(status("/new/x", "k-a").await, 200);

    // With file watching off, only SIGHUP reloads; a new key in the keys file comes with it.
    write("[[routes]]\nprefix = \"/new\"\nupstream = \"old\"\n", false);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    std::fs::write(&keys, format!("[[keys]]\nname = \"b\"\nsha256 = \"{}\"\n", hash_key("k-b"))).unwrap();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(status("/new/x", "k-b").await, 401, "not watching files");
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGHUP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while status("/new/x", "k-b").await != 200 {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status("/new/x", "k-a").await, 401, "the old key is gone");
    shutdown.trigger();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn image_limit_defaults_match_the_documented_ones() {
    let d = ImageLimitsConfig::default();
    assert_eq!((d.max_pixels, d.max_side), (16_000_000, 8192));
    assert_eq!(GatewayConfig::default().max_body_bytes, 32 * 1024 * 1024);
}
