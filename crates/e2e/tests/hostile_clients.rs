//! What a hostile or careless client can do to the whole system, end to end: read another key's
//! jobs, demand a huge output from a tiny upload, send ambiguous keys or options, odd ids and
//! oversized requests, and hold connections open. Real processes on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use pixmesh_test_support::{System, jpeg, png};
use serde_json::Value;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The gateway stores keys as SHA-256 hex, as `sha256sum` prints it.
fn sha256(key: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}

async fn get(system: &System, path: &str, key: &str) -> (u16, Value) {
    let res = system.client().get(format!("{}{path}", system.gateway)).header("x-api-key", key).send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn raw(addr: &str, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_clients_are_refused_clearly_and_jobs_stay_private() {
    let dir = tempfile::tempdir().unwrap();
    let system = System::start(dir.path(), 1, &["gateway.connections.header_read_timeout_ms=1500"]).await.unwrap();
    // Two more clients and an admin, added to the keys file `up` wrote; the gateway reloads it.
    let keys = dir.path().join("api-keys.toml");
    let mut text = std::fs::read_to_string(&keys).unwrap();
    text.push_str(&format!("\n[[keys]]\nname = \"bob\"\nsha256 = \"{}\"\nrate = \"off\"\n", sha256("bob-key")));
    text.push_str(&format!("\n[[keys]]\nname = \"ops\"\nsha256 = \"{}\"\nrate = \"off\"\nadmin = true\n", sha256("ops-key")));
    text.push_str(&format!(
        "\n[[keys]]\nname = \"small\"\nsha256 = \"{}\"\nrate = \"off\"\nmax_output_pixels = 250000\n",
        sha256("small-key")
    ));
    std::fs::write(&keys, text).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, body) = get(&system, "/api/status/none", "ops-key").await;
        if code != 401 {
            break;
        }
        assert!(Instant::now() < deadline, "the gateway did not reload its keys file: {code} {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Jobs belong to the key that made them.
    let (code, body) = system.upload(png(64, 48), "image/png", "width=32").await.unwrap();
    assert_eq!(code, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let done = system.wait_terminal(&id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(done["state"], "succeeded", "{done}");
    for path in [format!("/api/status/{id}"), format!("/api/result/{id}")] {
        let (code, body) = get(&system, &path, "bob-key").await;
        assert_eq!(code, 404, "another key must not see {path}: {body}");
        assert_eq!(body["error"]["code"], "not_found");
    }
    let (code, body) = get(&system, &format!("/api/status/{id}"), "ops-key").await;
    assert_eq!((code, body["state"].as_str()), (200, Some("succeeded")), "the admin key reads every job");
    let res = system.client().get(format!("{}/api/result/{id}", system.gateway)).header("x-api-key", "ops-key").send().await.unwrap();
    assert_eq!(res.status(), 200);
    // Forged identity headers are stripped at the gateway.
    let res = system
        .client()
        .get(format!("{}/api/status/{id}", system.gateway))
        .header("x-api-key", "bob-key")
        .header("x-pixmesh-client", "dev")
        .header("x-pixmesh-admin", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404, "a client cannot claim another identity");

    // A photo whose Photoshop segment had its length zeroed (libjpeg, libvips and Pillow decode
    // it): accepted by the gateway's header walk and processed.
    let good = jpeg(64, 48);
    let mut damaged = good[..2].to_vec();
    damaged.extend_from_slice(&[0xFF, 0xED, 0x00, 0x00, b'8', b'B', b'I', b'M', 0x04, 0x04, 0x00, 0x00]);
    damaged.extend_from_slice(&good[2..]);
    let (code, body) = system.upload(damaged, "image/jpeg", "width=32").await.unwrap();
    assert_eq!(code, 202, "{body}");
    let done = system.wait_terminal(body["id"].as_str().unwrap(), Duration::from_secs(60)).await.unwrap();
    assert_eq!(done["state"], "succeeded", "{done}");

    // A tiny upload cannot demand a huge output: 413 before a job exists.
    let (code, body) = system.upload(png(16, 16), "image/png", "width=16384&height=16384&enlarge=true&fit=fill").await.unwrap();
    assert_eq!((code, body["error"]["code"].as_str()), (413, Some("image_too_large")), "{body}");
    // A key's own, lower output limit: 0.25 MP.
    let upload_as = |key: &'static str, query: &'static str| {
        system
            .client()
            .post(format!("{}/api/upload?{query}", system.gateway))
            .header("x-api-key", key)
            .header("content-type", "image/png")
            .body(png(16, 16))
            .send()
    };
    assert_eq!(upload_as("small-key", "width=1000&enlarge=true").await.unwrap().status(), 413);
    assert_eq!(upload_as("small-key", "width=400&enlarge=true").await.unwrap().status(), 202);
    assert_eq!(upload_as("bob-key", "width=1000&enlarge=true").await.unwrap().status(), 202, "other keys keep the route's limit");

    // Ambiguity is refused: two keys, one option twice.
    let res = system
        .client()
        .post(format!("{}/api/upload", system.gateway))
        .header("x-api-key", system.api_key.as_str())
        .header("x-api-key", "bob-key")
        .header("content-type", "image/png")
        .body(png(8, 8))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let (code, body) = system.upload(png(8, 8), "image/png", "width=400&width=500").await.unwrap();
    assert_eq!((code, body["error"]["code"].as_str()), (400, Some("bad_request")), "{body}");

    // Odd ids: a short JSON 404, never the id echoed whole, never plain text.
    let key = system.api_key.clone();
    let (code, body) = get(&system, &format!("/api/status/{}", "x".repeat(5_000)), &key).await;
    assert_eq!(code, 404);
    assert!(body["error"]["message"].as_str().unwrap().len() < 200, "{body}");
    let (code, body) = get(&system, "/api/status/%ff%fe", &key).await;
    assert_eq!((code, body["error"]["code"].as_str()), (404, Some("not_found")), "{body}");
    // Oversized request target and headers: JSON 414 / 431 from the gateway.
    let addr = system.gateway.trim_start_matches("http://").to_string();
    let answer = raw(&addr, &format!("GET /api/status/{} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n", "a".repeat(20_000))).await;
    assert!(answer.starts_with("HTTP/1.1 414") && answer.contains("\"uri_too_long\""), "{answer}");
    let answer =
        raw(&addr, &format!("GET /api/status/x HTTP/1.1\r\nhost: x\r\nx-big: {}\r\nconnection: close\r\n\r\n", "b".repeat(100_000))).await;
    assert!(answer.starts_with("HTTP/1.1 431") && answer.contains("\"headers_too_large\""), "{answer}");

    // A connection that sends nothing is closed after the header timeout (1.5 s here).
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "a silent connection must be closed, got {read:?}");
    assert!(started.elapsed() >= Duration::from_millis(1000), "{:?}", started.elapsed());

    system.stop().await.unwrap();
}
