//! The accept loop against clients that hold connections without using them: silent ones,
//! slow-header ones (one byte at a time), idle keep-alive ones, and enough of them to hit the
//! connection cap while a legitimate client still gets served. Real sockets on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use axum::Router;
use axum::routing::get;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use pixmesh_chassis::Shutdown;
use pixmesh_chassis::serve::{ConnectionLimits, serve};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn start(limits: ConnectionLimits) -> (SocketAddr, Shutdown) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route("/", get(|| async { "ok" })).route(
        "/slow",
        get(|| async {
            tokio::time::sleep(Duration::from_millis(4000)).await;
            "slow"
        }),
    );
    let shutdown = Shutdown::new();
    tokio::spawn(serve("test", listener, app, shutdown.clone(), Duration::from_secs(1), limits));
    (addr, shutdown)
}

fn limits() -> ConnectionLimits {
    ConnectionLimits { header_read_timeout_ms: 600, idle_timeout_ms: 1500, max_connections: 16, ..ConnectionLimits::default() }
}

/// Reads until the server closes the connection; how long that took (None: still open after `max`).
async fn closed_within(stream: &mut TcpStream, max: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(max.saturating_sub(started.elapsed()), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

async fn get_ok(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_header_timeout() {
    let (addr, _shutdown) = start(limits()).await;
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let took = closed_within(&mut silent, Duration::from_secs(5)).await.expect("a silent connection must be closed");
    assert!(took >= Duration::from_millis(500), "not before the timeout: {took:?}");
}

#[tokio::test]
async fn one_header_byte_at_a_time_does_not_keep_a_connection_open() {
    let (addr, _shutdown) = start(limits()).await;
    let mut slow = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let head = b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut closed = false;
    for byte in head {
        if slow.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if started.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    if !closed {
        closed = closed_within(&mut slow, Duration::from_millis(500)).await.is_some();
    }
    assert!(closed, "a head trickling in for {:?} must be cut", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(4), "cut near the header timeout, took {:?}", started.elapsed());
}

#[tokio::test]
async fn an_idle_keep_alive_connection_outlives_the_header_timeout_then_closes() {
    let (addr, _shutdown) = start(limits()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Longer than the header timeout: still open, and serves a second request.
    tokio::time::sleep(Duration::from_millis(900)).await;
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "kept alive past the header timeout");
    let took = closed_within(&mut s, Duration::from_secs(6)).await.expect("closed after the idle timeout");
    assert!(took >= Duration::from_millis(1200), "not before the idle timeout: {took:?}");
}

#[tokio::test]
async fn at_the_cap_idle_connections_make_room_and_busy_ones_are_never_cut() {
    let (addr, _shutdown) = start(ConnectionLimits { header_read_timeout_ms: 30_000, idle_timeout_ms: 60_000, ..limits() }).await;
    // Four slow requests in flight, then silent connections up to the cap.
    let busy: Vec<_> = (0..4).map(|_| tokio::spawn(get_ok(addr, "/slow"))).collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut silent = Vec::new();
    for _ in 0..12 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Over the cap, with timeouts far away: a legitimate client is still served at once. Each
    // keeps its connection, so each needs a place of its own.
    let mut kept = Vec::new();
    for _ in 0..8 {
        let started = Instant::now();
        let mut s = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr)).await.unwrap().unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await.expect("served while at the cap").unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(2));
        kept.push(s);
        // Eviction spares connections that have only just connected.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for b in busy {
        let answer = b.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("slow"), "a busy connection was cut: {answer:?}");
    }
    // The silent ones were the ones closed.
    let mut closed = 0;
    for mut s in silent {
        if closed_within(&mut s, Duration::from_millis(50)).await.is_some() {
            closed += 1;
        }
    }
    assert!(closed >= 8, "idle connections evicted to make room: {closed}");
}

#[tokio::test]
async fn oversized_targets_and_headers_get_json_over_http1_and_http2() {
    let (addr, _shutdown) = start(limits()).await;
    let long = format!("/?q={}", "a".repeat(10_000));
    let answer = get_ok(addr, &long).await;
    assert!(answer.starts_with("HTTP/1.1 414"), "{answer}");
    assert!(answer.contains("\"uri_too_long\""), "{answer}");
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!("GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\nconnection: close\r\n\r\n", "b".repeat(100_000));
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(answer.contains("\"headers_too_large\""), "{answer}");

    // HTTP/2 (h2c prior knowledge): a 100 KB header gets the JSON 431, not a reset stream.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let request =
        http::Request::get(format!("http://{addr}/")).header("x-big", "b".repeat(100_000)).body(Empty::<bytes::Bytes>::new()).unwrap();
    let response = sender.send_request(request).await.expect("an answer, not a reset stream");
    assert_eq!(response.status(), 431);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["error"]["code"], "headers_too_large");
    // The same connection still serves normal requests.
    let ok = sender.send_request(http::Request::get(format!("http://{addr}/")).body(Empty::new()).unwrap()).await.unwrap();
    assert_eq!(ok.status(), 200);
}
