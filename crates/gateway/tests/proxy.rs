//! The gateway in front of a real HTTP upstream it knows nothing about: what passes through
//! unchanged, what is added, and what is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{any, get};
use pixmesh_chassis::Shutdown;
use pixmesh_chassis::tls::{DevCa, TlsConfig};
use pixmesh_gateway::{GatewayConfig, RouteConfig, Source, UpstreamConfig};
use serde_json::{Value, json};
use std::time::Duration;
use tokio::net::TcpListener;

async fn echo(request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let headers: serde_json::Map<String, Value> =
        parts.headers.iter().map(|(k, v)| (k.to_string(), Value::String(v.to_str().unwrap_or("?").to_string()))).collect();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let reply = json!({ "method": parts.method.as_str(), "uri": parts.uri.to_string(), "headers": headers, "body_len": body.len() });
    ([("x-upstream", "yes"), ("cache-control", "max-age=5")], axum::Json(reply)).into_response()
}

async fn upstream() -> String {
    let app = Router::new()
        .route("/redirect", get(|| async { Redirect::temporary("/elsewhere") }))
        .route("/teapot", get(|| async { (http::StatusCode::IM_A_TEAPOT, "short and stout") }))
        .route("/big", get(|| async { Body::from(Bytes::from(vec![7u8; 8 * 1024 * 1024])) }))
        .fallback(any(echo));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

async fn gateway(upstream_url: &str) -> (String, Shutdown) {
    gateway_with(upstream_url, TlsConfig::default()).await
}

async fn gateway_with(upstream_url: &str, tls: TlsConfig) -> (String, Shutdown) {
    let scheme = if tls.cert.is_some() { "https" } else { "http" };
    let mut config = GatewayConfig { max_body_bytes: 16 * 1024 * 1024, tls, ..GatewayConfig::default() };
    config.upstreams.insert("legacy".into(), UpstreamConfig::Url(upstream_url.into()));
    config.upstreams.insert("upload".into(), UpstreamConfig::Url("http://127.0.0.1:9".into())); // nothing listens there
    config.upstreams.insert("status".into(), UpstreamConfig::Url(upstream_url.into()));
    config.routes.push(RouteConfig {
        strip_prefix: true,
        timeout_ms: Some(5_000),
        max_body_bytes: Some(12 * 1024 * 1024),
        ..RouteConfig::new("/legacy", "legacy")
    });
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("{scheme}://{}", http.local_addr().unwrap());
    let shutdown = Shutdown::new();
    let source = Source::fixed(config, vec![("tester".into(), "k1".into())]);
    tokio::spawn(pixmesh_gateway::run(source, http, admin, shutdown.clone()));
    (addr, shutdown)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).timeout(Duration::from_secs(30)).build().unwrap()
}

#[tokio::test]
async fn wraps_an_upstream_it_does_not_own() {
    let up = upstream().await;
    let (gw, shutdown) = gateway(&up).await;
    let c = client();

    // Headers, query and method pass; the prefix is stripped; forwarding headers are added;
    // hop-by-hop headers are not forwarded; a forged client header is replaced.
    let res = c
        .post(format!("{gw}/legacy/things/1?a=b&c=d"))
        .header("x-api-key", "k1")
        .header("x-custom", "kept")
        .header("x-pixmesh-client", "forged")
        .header("connection", "keep-alive, x-drop-me")
        .header("x-drop-me", "1")
        .body(vec![1u8; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-upstream"], "yes");
    assert_eq!(res.headers()["cache-control"], "max-age=5");
    assert!(res.headers().contains_key("x-request-id"));
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["method"], "POST");
    assert_eq!(v["uri"], "/things/1?a=b&c=d");
    assert_eq!(v["body_len"], 1000);
    let h = &v["headers"];
    assert_eq!(h["x-custom"], "kept");
    assert_eq!(h["x-pixmesh-client"], "tester");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert!(h["x-forwarded-host"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(h.get("x-drop-me").is_none(), "headers named in Connection are hop-by-hop");
    assert!(h["x-request-id"].as_str().is_some());

    // Status codes and redirects pass through unchanged.
    let res = c.get(format!("{gw}/legacy/redirect")).header("x-api-key", "k1").send().await.unwrap();
    assert_eq!(res.status(), 307);
    assert_eq!(res.headers()["location"], "/elsewhere");
    let res = c.get(format!("{gw}/legacy/teapot")).header("x-api-key", "k1").send().await.unwrap();
    assert_eq!(res.status(), 418);
    assert_eq!(res.text().await.unwrap(), "short and stout");

    // Large bodies both ways.
    let res = c.get(format!("{gw}/legacy/big")).header("x-api-key", "k1").send().await.unwrap();
    let body = res.bytes().await.unwrap();
    assert_eq!(body.len(), 8 * 1024 * 1024);
    assert!(body.iter().all(|&b| b == 7));
    let res = c.put(format!("{gw}/legacy/up")).header("x-api-key", "k1").body(vec![3u8; 10 * 1024 * 1024]).send().await.unwrap();
    assert_eq!(res.json::<Value>().await.unwrap()["body_len"], 10 * 1024 * 1024);

    shutdown.trigger();
}

/// Behind a gateway that serves HTTPS the upstream hears `X-Forwarded-Proto: https`, whatever
/// the client claims; a plain-HTTP gateway says `http` even when the client claims `https`.
#[tokio::test]
async fn the_forwarded_scheme_is_the_one_the_client_used() {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::new("test CA").unwrap();
    let issued = ca.issue(&["localhost", "127.0.0.1"], true, false).unwrap();
    std::fs::write(dir.path().join("gw.pem"), &issued.cert_pem).unwrap();
    std::fs::write(dir.path().join("gw-key.pem"), &issued.key_pem).unwrap();
    let tls = TlsConfig { cert: Some(dir.path().join("gw.pem")), key: Some(dir.path().join("gw-key.pem")), ..TlsConfig::default() };
    let (secure, secure_shutdown) = gateway_with(&up, tls).await;
    let (plain, plain_shutdown) = gateway(&up).await;
    let https = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.cert_pem().as_bytes()).unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    for (c, gw, expected) in [(&https, &secure, "https"), (&client(), &plain, "http")] {
        for claimed in [None, Some("https"), Some("http")] {
            let mut request = c.get(format!("{gw}/legacy/who")).header("x-api-key", "k1");
            if let Some(claimed) = claimed {
                request = request.header("x-forwarded-proto", claimed);
            }
            let res = request.send().await.unwrap();
            assert_eq!(res.status(), 200, "{gw}");
            let v: Value = res.json().await.unwrap();
            assert_eq!(v["headers"]["x-forwarded-proto"], expected, "{gw} with a client claiming {claimed:?}");
        }
    }
    secure_shutdown.trigger();
    plain_shutdown.trigger();
}

#[tokio::test]
async fn refusals_are_json_errors() {
    let up = upstream().await;
    let (gw, shutdown) = gateway(&up).await;
    let c = client();
    let check = |res: reqwest::Response, status: u16, code: &'static str| async move {
        assert_eq!(res.status(), status);
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    };
    check(c.get(format!("{gw}/legacy/x")).send().await.unwrap(), 401, "unauthorized").await;
    check(c.get(format!("{gw}/legacy/x")).header("x-api-key", "nope").send().await.unwrap(), 401, "unauthorized").await;
    check(c.get(format!("{gw}/nowhere")).header("x-api-key", "k1").send().await.unwrap(), 404, "not_found").await;
    check(c.get(format!("{gw}/api/upload")).header("x-api-key", "k1").send().await.unwrap(), 405, "method_not_allowed").await;
    // The upload upstream is down.
    let png = pixmesh_test_support::png(20, 20);
    let res = c.post(format!("{gw}/api/upload")).header("x-api-key", "k1").body(png).send().await.unwrap();
    assert_eq!(res.headers()["retry-after"], "1");
    check(res, 503, "unavailable").await;
    // Over the route's body limit, from Content-Length.
    let res = c.put(format!("{gw}/legacy/up")).header("x-api-key", "k1").body(vec![0u8; 13 * 1024 * 1024]).send().await.unwrap();
    check(res, 413, "payload_too_large").await;
    shutdown.trigger();
}
