//! The open-loop client: requests sent at a fixed rate whatever the answers, each timed from
//! the moment it was due (so a stall counts against every request it delays: no coordinated
//! omission), and sorted by how they ended:
//!
//! - **served**: a 2xx or 3xx answer whose body arrived whole; timed to the end of the body.
//! - **refused**: any other HTTP answer (the proxy's 503 when it sheds load, a 429, a 502 …);
//!   timed to its response head, the time to first byte a shedding client waits for.
//! - **errors**: no HTTP answer at all (connection refused or reset, a body cut off, no answer
//!   within the timeout), by kind.
//!
//! A run never fails because requests did: the report says what happened, and the caller
//! (bench/gateway.sh) prints it.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A client for `http://` URLs, and `https://` ones trusting the CA certificates (PEM) in
/// `ca` only (none: no HTTPS server is trusted).
pub fn client(ca: Option<&Path>) -> anyhow::Result<HttpClient> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = ca {
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca)? {
            roots.add(cert?)?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c.enforce_http(false);
    let https = HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().wrap_connector(c);
    Ok(Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1024).build(https))
}

/// Latency percentiles of `micros`, in milliseconds.
pub fn percentiles(mut micros: Vec<u64>) -> serde_json::Value {
    micros.sort_unstable();
    let at =
        |q: f64| micros.get(((micros.len() as f64 * q) as usize).min(micros.len().saturating_sub(1))).copied().unwrap_or(0) as f64 / 1e3;
    json!({ "count": micros.len(), "p50_ms": at(0.50), "p90_ms": at(0.90), "p99_ms": at(0.99), "p999_ms": at(0.999), "max_ms": at(1.0) })
}

/// How one request ended.
enum Ended {
    Served {
        status: u16,
        micros: u64,
    },
    Refused {
        status: u16,
        head_micros: u64,
    },
    /// Answered 2xx/3xx but the body broke off.
    BodyError(u16),
    Connect,
    Timeout,
    Other,
}

/// Everything a fixed-rate run saw.
#[derive(Default)]
pub struct Outcomes {
    rps: u64,
    seconds: u64,
    pub sent: u64,
    /// µs from due to the end of the body.
    pub served: Vec<u64>,
    /// µs from due to the response head.
    pub refused: Vec<u64>,
    pub statuses: BTreeMap<u16, u64>,
    pub errors: BTreeMap<&'static str, u64>,
    /// The latest a request left after it was due (the generator's own lag), µs.
    pub send_lag_max: u64,
}

impl Outcomes {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    fn add(&mut self, ended: Ended) {
        match ended {
            Ended::Served { status, micros } => {
                self.served.push(micros);
                *self.statuses.entry(status).or_default() += 1;
            }
            Ended::Refused { status, head_micros } => {
                self.refused.push(head_micros);
                *self.statuses.entry(status).or_default() += 1;
            }
            Ended::BodyError(status) => {
                *self.statuses.entry(status).or_default() += 1;
                *self.errors.entry("body").or_default() += 1;
            }
            Ended::Connect => *self.errors.entry("connect").or_default() += 1,
            Ended::Timeout => *self.errors.entry("timeout").or_default() += 1,
            Ended::Other => *self.errors.entry("other").or_default() += 1,
        }
    }

    /// The report: `latency` is that of the served requests, `errors` the number of requests
    /// without an answer, `statuses` every HTTP status seen, and the shares are of the requests
    /// sent.
    pub fn report(&self) -> serde_json::Value {
        let sent = self.sent.max(1) as f64;
        let statuses: serde_json::Map<String, serde_json::Value> = self.statuses.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
        let errors = self.error_count();
        json!({
            "rps": self.rps,
            "seconds": self.seconds,
            "sent": self.sent,
            "send_lag_max_ms": self.send_lag_max as f64 / 1e3,
            "latency": percentiles(self.served.clone()),
            "served": self.served.len(),
            "refused": {
                "count": self.refused.len(),
                "share": self.refused.len() as f64 / sent,
                "ttfb": percentiles(self.refused.clone()),
            },
            "errors": errors,
            "error_kinds": self.errors,
            "failed_share": (self.refused.len() as u64 + errors) as f64 / sent,
            "statuses": statuses,
        })
    }
}

/// Sends `make()` at `rps` for `seconds`; a request without its whole answer after `timeout`
/// counts as an error.
pub async fn fixed_rate<F>(client: &HttpClient, rps: u64, seconds: u64, timeout: Duration, make: F) -> Outcomes
where
    F: Fn() -> http::Request<Full<Bytes>>,
{
    let outcomes =
        Arc::new(Mutex::new(Outcomes { rps, seconds, served: Vec::with_capacity((rps * seconds) as usize), ..Outcomes::default() }));
    let start = tokio::time::Instant::now();
    let total = rps * seconds;
    let mut tasks = tokio::task::JoinSet::new();
    let mut lag = 0u64;
    for i in 0..total {
        let due = start + Duration::from_nanos(i * 1_000_000_000 / rps.max(1));
        tokio::time::sleep_until(due).await;
        lag = lag.max(due.elapsed().as_micros() as u64);
        let (client, outcomes) = (client.clone(), Arc::clone(&outcomes));
        let request = make();
        tasks.spawn(async move {
            let ended = tokio::time::timeout(timeout, async {
                match client.request(request).await {
                    Ok(res) => {
                        let status = res.status();
                        let head_micros = due.elapsed().as_micros() as u64;
                        let whole = res.into_body().collect().await.is_ok();
                        if !(status.is_success() || status.is_redirection()) {
                            Ended::Refused { status: status.as_u16(), head_micros }
                        } else if whole {
                            Ended::Served { status: status.as_u16(), micros: due.elapsed().as_micros() as u64 }
                        } else {
                            Ended::BodyError(status.as_u16())
                        }
                    }
                    Err(e) if e.is_connect() => Ended::Connect,
                    Err(_) => Ended::Other,
                }
            })
            .await
            .unwrap_or(Ended::Timeout);
            if let Ok(mut o) = outcomes.lock() {
                o.add(ended);
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let mut outcomes = match Arc::try_unwrap(outcomes) {
        Ok(m) => m.into_inner().unwrap_or_else(|e| e.into_inner()),
        Err(shared) => std::mem::take(&mut *shared.lock().unwrap_or_else(|e| e.into_inner())),
    };
    outcomes.sent = total;
    outcomes.send_lag_max = lag;
    outcomes
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::net::TcpListener;

    /// A server that answers every other request 503 (a shedding proxy), and hangs up on every
    /// tenth without an answer.
    async fn shedding_server() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let n = Arc::new(AtomicU64::new(0));
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let n = Arc::clone(&n);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                        let k = n.fetch_add(1, Ordering::SeqCst);
                        async move {
                            if k % 10 == 9 {
                                return Err("hang up");
                            }
                            let status = if k % 2 == 1 { 503 } else { 200 };
                            Ok(http::Response::builder().status(status).body(Full::new(Bytes::from_static(b"x"))).unwrap())
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        format!("http://{addr}/")
    }

    fn get(url: &str) -> impl Fn() -> http::Request<Full<Bytes>> + use<> {
        let uri: http::Uri = url.parse().unwrap();
        move || http::Request::get(uri.clone()).body(Full::new(Bytes::new())).unwrap()
    }

    #[tokio::test]
    async fn served_refused_and_failed_requests_are_counted_apart() {
        let url = shedding_server().await;
        let o = fixed_rate(&client(None).unwrap(), 100, 1, Duration::from_secs(10), get(&url)).await;
        assert_eq!(o.sent, 100);
        // Of each ten: five 200s, four 503s, one without an answer.
        assert_eq!((o.served.len(), o.refused.len(), o.error_count()), (50, 40, 10), "{}", o.report());
        assert_eq!(o.statuses.get(&503), Some(&40));
        assert_eq!(o.statuses.get(&200), Some(&50));
        let r = o.report();
        assert_eq!(r["latency"]["count"], 50, "latency is that of the served requests only");
        assert_eq!(r["refused"]["share"], 0.4);
        assert_eq!(r["failed_share"], 0.5);
        assert_eq!(r["refused"]["ttfb"]["count"], 40);
    }

    #[tokio::test]
    async fn no_server_means_connect_errors_not_a_failed_run() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let o = fixed_rate(&client(None).unwrap(), 50, 1, Duration::from_secs(10), get(&format!("http://{dead}/"))).await;
        assert_eq!(o.errors.get("connect"), Some(&50));
        assert!(o.served.is_empty() && o.refused.is_empty());
        assert_eq!(o.report()["failed_share"], 1.0);
    }

    #[tokio::test]
    async fn an_answer_that_never_comes_is_a_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts and reads, never answers.
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (s, _) = listener.accept().await.unwrap();
                held.push(s);
            }
        });
        let o = fixed_rate(&client(None).unwrap(), 20, 1, Duration::from_millis(200), get(&format!("http://{addr}/"))).await;
        assert_eq!(o.errors.get("timeout"), Some(&20));
    }
}
