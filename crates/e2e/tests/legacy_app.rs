//! Wrapping what we don't own: httpbin, a Python web application from PyPI that nobody here
//! wrote, served by gunicorn, behind the real `pixmesh gateway` process under `/legacy/`.
//! Status codes, headers, redirects, cookies, streaming and large bodies must pass unchanged.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use pixmesh_test_support::{PythonApp, Role};
use reqwest::header::HeaderMap;
use serde_json::Value;
use std::time::{Duration, Instant};

const REQUIREMENTS: [&str; 2] = ["httpbin==0.10.4", "gunicorn==27.0.1"];

/// Headers that legitimately differ between two responses or hops.
fn comparable(h: &HeaderMap) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = h
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "date" | "connection" | "keep-alive" | "transfer-encoding" | "x-request-id"))
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_string()))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_third_party_app_passes_through_unchanged() {
    let app = PythonApp::start("httpbin", &REQUIREMENTS, "httpbin:app").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pixmesh.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nrate = \"off\"\n[gateway.upstreams]\nlegacy = {:?}\n\
             [[gateway.routes]]\nprefix = \"/legacy\"\nupstream = \"legacy\"\nstrip_prefix = true\nmax_body_bytes = 67108864\n",
            app.url
        ),
    )
    .unwrap();
    let gateway = Role::start("gateway", Some(&config), &[], &[("PIXMESH_API_KEY", "legacy-key")]).await.unwrap();
    let gw = format!("http://{}/legacy", gateway.addresses["http"]);
    let direct = app.url.clone();
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let via = |path: &str| client.get(format!("{gw}{path}")).header("x-api-key", "legacy-key");

    // Without the key, nothing reaches the app.
    assert_eq!(client.get(format!("{gw}/get")).send().await.unwrap().status(), 401);

    // Same status, headers and body as asking the app directly.
    for path in [
        "/status/418",
        "/status/204",
        "/status/500",
        "/response-headers?X-Thing=a&X-Thing=b",
        "/redirect-to?url=/get&status_code=307",
        "/cookies/set?flavour=oat",
        "/html",
        "/robots.txt",
    ] {
        let a = client.get(format!("{direct}{path}")).send().await.unwrap();
        let b = via(path).send().await.unwrap();
        assert_eq!(a.status(), b.status(), "{path}");
        assert_eq!(comparable(a.headers()), comparable(b.headers()), "{path}");
        assert!(b.headers().contains_key("x-request-id"), "{path}");
        assert_eq!(a.bytes().await.unwrap(), b.bytes().await.unwrap(), "{path}");
    }

    // Compressed bodies pass as they are (the app's answer echoes the request, so only the encoding is compared).
    let res = via("/gzip").header("accept-encoding", "gzip").send().await.unwrap();
    assert_eq!(res.headers()["content-encoding"], "gzip");
    assert_eq!(&res.bytes().await.unwrap()[..2], &[0x1f, 0x8b]);

    // What the app sees of the request: the client's headers, the forwarding headers, not the key.
    let v: Value = via("/headers?show_env=1").header("x-custom", "kept").send().await.unwrap().json().await.unwrap();
    let h = &v["headers"];
    assert_eq!(h["X-Custom"], "kept");
    assert_eq!(h["X-Forwarded-For"], "127.0.0.1");
    assert_eq!(h["X-Pixmesh-Client"], "env");
    assert!(h.get("X-Api-Key").is_none(), "the API key is not passed on: {h}");
    assert_eq!(h["Traceparent"].as_str().unwrap().len(), 55);

    // Methods and a large body both ways (8 MB up, the echo of it down).
    let big = "p".repeat(8 * 1024 * 1024);
    let res = client.put(format!("{gw}/anything/x?y=1")).header("x-api-key", "legacy-key").body(big.clone()).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["method"], "PUT");
    assert_eq!(v["args"]["y"], "1");
    assert_eq!(v["data"].as_str().unwrap().len(), big.len());

    // Streaming: the first bytes of a slow response arrive long before its end.
    let started = Instant::now();
    let mut res = via("/drip?duration=2&numbytes=4&code=200&delay=0").send().await.unwrap();
    let mut first = None;
    let mut total = 0;
    while let Some(chunk) = res.chunk().await.unwrap() {
        first.get_or_insert(started.elapsed());
        total += chunk.len();
    }
    let (first, all) = (first.unwrap(), started.elapsed());
    assert_eq!(total, 4);
    assert!(all >= Duration::from_millis(1400), "the app drips over ~2 s, took {all:?}");
    assert!(first < all / 2, "streamed, not buffered: first byte at {first:?} of {all:?}");
    let lines = via("/stream/25").send().await.unwrap().text().await.unwrap();
    assert_eq!(lines.lines().count(), 25);
    drop(gateway);
    drop(app);
}
