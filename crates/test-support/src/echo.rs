//! A small HTTP application of the tests' own, to stand behind a proxy: it answers every
//! request with JSON naming itself, the path and the headers it got (or fails, or takes its
//! time, as asked), and records each request as `"METHOD PATH"`.

use bytes::Bytes;
use http_body_util::Full;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the application does with every request.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    /// 200 with the JSON at once.
    Answer,
    /// 503 with the JSON.
    Unavailable,
    /// 200 with the JSON after this long.
    Sleep(Duration),
}

/// The requests an [`echo`] application has seen, as `"METHOD PATH"`.
pub type Seen = Arc<Mutex<Vec<String>>>;

/// Starts the application on a port of 127.0.0.1; it runs until the test's runtime ends.
pub async fn echo(name: &'static str, behaviour: Behaviour) -> std::io::Result<(SocketAddr, Seen)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let seen: Seen = Arc::default();
    let recorded = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let recorded = Arc::clone(&recorded);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let recorded = Arc::clone(&recorded);
                    async move {
                        if let Ok(mut seen) = recorded.lock() {
                            seen.push(format!("{} {}", req.method(), req.uri().path()));
                        }
                        let headers: serde_json::Map<String, Value> =
                            req.headers().iter().map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or("")))).collect();
                        let body = json!({ "who": name, "path": req.uri().path(), "headers": headers }).to_string();
                        let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
                        match behaviour {
                            Behaviour::Answer => {}
                            Behaviour::Unavailable => *response.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE,
                            Behaviour::Sleep(d) => tokio::time::sleep(d).await,
                        }
                        Ok::<_, hyper::Error>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tcp), service).await;
            });
        }
    });
    Ok((addr, seen))
}
