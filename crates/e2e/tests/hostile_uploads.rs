//! Hostile and unusual uploads through the whole system, over HTTP/1.1 and h2c: the multipart
//! rule the gateway and the upload service share, genuine photos whose frame header lies deep in
//! the file, and one error vocabulary (`image_too_large` wherever a header is too large,
//! `request_timeout` for a client too slow to send its body).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use http_body_util::BodyExt;
use pixmesh_test_support::{System, disposition, form, icc_profile_big_jpeg, jpeg, png, with_metadata};
use serde_json::Value;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const JOB_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug)]
enum Wire {
    H1,
    H2c,
}

/// POSTs `body` to `http://{addr}{path}`; a 429 is retried after its `Retry-After`.
/// Jobs belong to the key that made them: uploads sent straight to the upload service name the
/// development key's owner themselves, as the gateway would (it replaces this header with the
/// key's own name), so that the test can follow them through the gateway.
const OWNER: &str = "dev";

async fn post(wire: Wire, addr: &str, path: &str, key: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, retry, v) = match wire {
            Wire::H1 => {
                let res = reqwest::Client::new()
                    .post(format!("http://{addr}{path}"))
                    .header("x-api-key", key)
                    .header("x-pixmesh-client", OWNER)
                    .header("content-type", content_type)
                    .body(body.to_vec())
                    .send()
                    .await
                    .unwrap();
                let retry = res.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                (res.status().as_u16(), retry, res.json::<Value>().await.unwrap_or(Value::Null))
            }
            Wire::H2c => {
                let tcp = TcpStream::connect(addr).await.unwrap();
                let io = hyper_util::rt::TokioIo::new(tcp);
                let (mut send, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
                tokio::spawn(conn);
                let request = http::Request::post(format!("http://{addr}{path}"))
                    .header("x-api-key", key)
                    .header("x-pixmesh-client", OWNER)
                    .header("content-type", content_type)
                    .body(http_body_util::Full::new(bytes::Bytes::from(body.to_vec())))
                    .unwrap();
                let res = send.send_request(request).await.unwrap();
                let status = res.status().as_u16();
                let retry = res.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                let bytes = res.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                (status, retry, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
            }
        };
        if status != 429 || Instant::now() > deadline {
            return (status, v);
        }
        tokio::time::sleep(Duration::from_secs(retry.unwrap_or(1).clamp(1, 10))).await;
    }
}

/// A real JPEG whose frame header claims `w`×`h`.
fn jpeg_claiming(w: u16, h: u16) -> Vec<u8> {
    let mut j = jpeg(16, 16);
    let sof = j.windows(2).position(|m| m[0] == 0xFF && matches!(m[1], 0xC0 | 0xC2)).unwrap();
    j[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    j[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    j
}

/// A real PNG whose header claims `w`×`h`, its checksum fixed (what `-F image=@7000x7000.png`
/// sends as far as any header reader can tell, without making the test encode 49 MP).
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut p = png(8, 8);
    p[16..20].copy_from_slice(&w.to_be_bytes());
    p[20..24].copy_from_slice(&h.to_be_bytes());
    let mut crc = 0xFFFF_FFFFu32;
    for &b in &p[12..29] {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { 0xEDB8_8320 ^ (crc >> 1) } else { crc >> 1 };
        }
    }
    p[29..33].copy_from_slice(&(!crc).to_be_bytes());
    p
}

fn bmp() -> Vec<u8> {
    if let Some(bytes) = pixmesh_test_support::corpus("edge").and_then(|d| std::fs::read(d.join("hopper.bmp")).ok()) {
        return bytes;
    }
    let mut out = std::io::Cursor::new(Vec::new());
    image::RgbImage::new(128, 128).write_to(&mut out, image::ImageFormat::Bmp).unwrap();
    out.into_inner()
}

async fn jobs(system: &System) -> u64 {
    let store = pixmesh_e2e::job_store(system).await;
    store.counts().await.unwrap().iter().map(|(_, n)| n).sum()
}

async fn succeeded(system: &System, v: &Value) -> Value {
    let id = v["id"].as_str().unwrap_or_else(|| panic!("no id in {v}"));
    let s = system.wait_terminal(id, JOB_TIMEOUT).await.unwrap();
    assert_eq!(s["state"], "succeeded", "{s}");
    s
}

/// The cases, through the gateway: the part the guard judges is the part the upload
/// service stores, and a genuine photo whose frame header lies beyond the guard's probe is
/// processed while one too large is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_forms_are_refused_and_genuine_photos_processed() {
    let dir = tempfile::tempdir().unwrap();
    let system = System::start(dir.path(), 2, &[]).await.unwrap();
    let gw = system.gateway.trim_start_matches("http://").to_string();
    let key = system.api_key.clone();
    let path = "/api/upload?width=800&format=jpeg";
    let ct = "multipart/form-data; boundary=----pixmesh-e2e";
    let b = "----pixmesh-e2e";
    let small = jpeg(64, 48);
    let huge_png = png_claiming(7000, 7000);
    let (image, file, x) =
        (disposition("image", Some("a.png")), disposition("file", Some("small.jpg")), disposition("x", Some("huge.png")));
    let before = jobs(&system).await;
    for wire in [Wire::H1, Wire::H2c] {
        let refusals: Vec<(&str, Vec<u8>, u16, &str)> = vec![
            ("-F image=@7000x7000.png", form(b, &[(&image, &huge_png)]), 413, "image_too_large"),
            ("-F x=@huge.png -F file=@small.jpg", form(b, &[(&x, &huge_png), (&file, &small)]), 413, "image_too_large"),
            ("-F x=@small.jpg -F file=@huge.png", form(b, &[(&x, &small), (&file, &huge_png)]), 400, "bad_request"),
            ("-F image=@hopper.bmp", form(b, &[(&image, &bmp())]), 415, "unsupported_format"),
        ];
        for (what, body, status, code) in refusals {
            let (got, v) = post(wire, &gw, path, &key, ct, &body).await;
            assert_eq!((got, v["error"]["code"].as_str()), (status, Some(code)), "{what} over {wire:?}: {v}");
        }
        // A SOF beyond the probe (after 7.3 MB of metadata) that declares 64 MP.
        let too_big = with_metadata(&jpeg_claiming(8000, 8000), 7_300_000);
        let (got, v) = post(wire, &gw, path, &key, "image/jpeg", &too_big).await;
        assert_eq!((got, v["error"]["code"].as_str()), (413, Some("image_too_large")), "{wire:?}: {v}");
        let (got, v) = post(wire, &gw, path, &key, ct, &form(b, &[(&file, &too_big)])).await;
        assert_eq!((got, v["error"]["code"].as_str()), (413, Some("image_too_large")), "{wire:?}: {v}");
    }
    assert_eq!(jobs(&system).await, before, "no refused upload became a job");

    // A 9 MP camera-style JPEG, its frame header at 7.3 MB after ~110 APPn segments, and a
    // JPEG with a large ICC profile: accepted and processed, raw and in a form, h1 and h2c.
    let camera = with_metadata(&jpeg(3648, 2432), 7_300_000);
    let icc = icc_profile_big_jpeg();
    let mut ids = Vec::new();
    for (what, bytes, width) in [("camera", &camera, 800), ("icc", &icc, 800.min(image::load_from_memory(&icc).unwrap().width()))] {
        for wire in [Wire::H1, Wire::H2c] {
            let (got, v) = post(wire, &gw, path, &key, "image/jpeg", bytes).await;
            assert_eq!(got, 202, "{what} raw over {wire:?}: {v}");
            ids.push((what, width, v));
            let (got, v) = post(wire, &gw, path, &key, ct, &form(b, &[(&disposition("file", Some("photo.jpg")), bytes)])).await;
            assert_eq!(got, 202, "{what} in a form over {wire:?}: {v}");
            ids.push((what, width, v));
        }
    }
    for (what, width, v) in &ids {
        let s = succeeded(&system, v).await;
        assert_eq!(s["result"]["width"], *width, "{what}: {s}");
    }
    system.stop().await.unwrap();
}

/// The same bodies sent to the gateway and straight to the upload service get the same
/// verdict on their structure (one parser, one rule), and an accepted one is processed from the
/// part the guard judged. The upload service alone applies its own, looser limits, so sizes
/// are kept within both here.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gateway_and_the_upload_service_agree_on_every_form() {
    let dir = tempfile::tempdir().unwrap();
    let system = System::start(dir.path(), 1, &[]).await.unwrap();
    let gw = system.gateway.trim_start_matches("http://").to_string();
    let upload = system.child("upload").unwrap().addresses["http"].clone();
    let key = system.api_key.clone();
    let path = "/api/upload?width=32&format=png";
    let ct = "multipart/form-data; boundary=XyZ";
    // Processed at width 32: 32×24 from `small`, 30×90 from `other` (never enlarged).
    let (small, other) = (jpeg(64, 48), png(30, 90));
    let file = disposition("file", Some("small.jpg"));
    let note = disposition("note", None);
    let big_note = vec![b'n'; 300 * 1024];
    let mut preamble = b"a preamble\r\n".to_vec();
    preamble.extend(form("XyZ", &[(&file, &small)]));
    let lf_only = [format!("--XyZ\n{}\n\n", disposition("file", None)).as_bytes(), &small, b"\n--XyZ--\n"].concat();
    let mut unclosed = form("XyZ", &[(&file, &small)]);
    unclosed.truncate(unclosed.len() - 4);
    // (what, content type, body, expected: Ok(result height) or Err(400 code))
    type Case<'a> = (&'a str, &'a str, Vec<u8>, Result<u64, &'a str>);
    let cases: Vec<Case<'_>> = vec![
        ("a file part after a field", ct, form("XyZ", &[(&note, b"hi"), (&file, &small)]), Ok(24)),
        ("a part named image", ct, form("XyZ", &[(&disposition("image", None), &small)]), Ok(24)),
        ("a filename on a field named x", ct, form("XyZ", &[(&disposition("x", Some("o.png")), &other)]), Ok(90)),
        ("header names in any case", ct, form("XyZ", &[("content-DISPOSITION: form-data; NAME=\"file\"", &small)]), Ok(24)),
        (
            "a Content-Type without a filename is a field",
            ct,
            form("XyZ", &[(&format!("{}\r\nContent-Type: image/png", disposition("x", None)), &other), (&file, &small)]),
            Ok(24),
        ),
        ("a boundary in quotes", "multipart/form-data; boundary=\"a:b c\"", form("a:b c", &[(&file, &small)]), Ok(24)),
        ("a preamble", ct, preamble, Ok(24)),
        ("a text field larger than the probe", ct, form("XyZ", &[(&note, &big_note), (&file, &small)]), Ok(24)),
        ("two image parts", ct, form("XyZ", &[(&disposition("x", Some("o.png")), &other), (&file, &small)]), Err("bad_request")),
        ("file and image", ct, form("XyZ", &[(&file, &small), (&disposition("image", None), &other)]), Err("bad_request")),
        ("no image part", ct, form("XyZ", &[(&note, &small)]), Err("bad_request")),
        ("LF-only part headers", ct, lf_only, Err("bad_request")),
        (
            "a name given twice",
            ct,
            form("XyZ", &[("Content-Disposition: form-data; name=\"note\"; name=\"file\"", &small)]),
            Err("bad_request"),
        ),
        ("no closing boundary", ct, unclosed, Err("bad_request")),
        ("no boundary", "multipart/form-data", form("XyZ", &[(&file, &small)]), Err("bad_request")),
    ];
    let mut accepted = Vec::new();
    for (what, content_type, body, expected) in &cases {
        for wire in [Wire::H1, Wire::H2c] {
            let via_gateway = post(wire, &gw, path, &key, content_type, body).await;
            let direct = post(wire, &upload, path, "", content_type, body).await;
            match expected {
                Ok(height) => {
                    for (side, (status, v)) in [("gateway", &via_gateway), ("upload", &direct)] {
                        assert_eq!(*status, 202, "{what} at the {side} over {wire:?}: {v}");
                        accepted.push((what.to_string(), *height, v.clone()));
                    }
                }
                Err(code) => {
                    assert_eq!(
                        (via_gateway.0, via_gateway.1["error"]["code"].as_str()),
                        (400, Some(*code)),
                        "{what} at the gateway over {wire:?}"
                    );
                    assert_eq!(via_gateway, direct, "{what} over {wire:?}: the same refusal, word for word");
                }
            }
        }
    }
    for (what, height, v) in &accepted {
        let s = succeeded(&system, v).await;
        assert_eq!(s["result"]["height"], *height, "{what}: the image part was processed: {s}");
    }
    // A header too large is `image_too_large` at the upload service too (not `limit_exceeded`):
    // 20,000 px is over its 16,384 px side limit.
    for wire in [Wire::H1, Wire::H2c] {
        let (status, v) = post(wire, &upload, "/api/upload", "", "image/png", &png(20_000, 2)).await;
        assert_eq!((status, v["error"]["code"].as_str()), (413, Some("image_too_large")), "{wire:?}: {v}");
    }
    system.stop().await.unwrap();
}

/// Sends request headers and the first body bytes, then nothing, keeping the connection open.
async fn stall(addr: &str, head: &str, first: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(first).await.unwrap();
    let mut reply = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    while !String::from_utf8_lossy(&reply).contains("\"}}") {
        match tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => reply.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&reply).to_string()
}

/// A client that stops sending its body is answered 408 `request_timeout`, not 504, whether the
/// gateway still waits for the image header or the upload service waits for the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_client_gets_408() {
    let dir = tempfile::tempdir().unwrap();
    let system = System::start(dir.path(), 0, &["gateway.timeout_ms=3000"]).await.unwrap();
    let gw = system.gateway.trim_start_matches("http://").to_string();
    let small = jpeg(64, 48);
    let head = |len: usize| {
        format!(
            "POST /api/upload HTTP/1.1\r\nhost: x\r\nx-api-key: {}\r\ncontent-type: image/jpeg\r\ncontent-length: {len}\r\n\r\n",
            system.api_key
        )
    };
    for (what, first) in [("inside the image header", &small[..10]), ("after the image header", &small[..])] {
        let reply = stall(&gw, &head(small.len() + 100_000), first).await;
        assert!(reply.starts_with("HTTP/1.1 408") && reply.contains("request_timeout"), "{what}: {reply}");
    }
    system.stop().await.unwrap();
}
