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
        .fallback(any(record))
        .with_state(Arc::clone(&seen));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

fn route(prefix: &str, upstream: &str) -> RouteConfig {
    RouteConfig {
        prefix: prefix.into(),
        upstream: upstream.into(),
        strip_prefix: false,
        rewrite_prefix: None,
        methods: vec![],
        timeout_ms: Some(5_000),
        max_body_bytes: None,
        max_in_flight: None,
        max_queue: None,
        max_queue_ms: None,
        image: None,
    }
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
