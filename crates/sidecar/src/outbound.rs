//! `pixmesh sidecar outbound`: the ambassador for an application's calls to remote services.
//! The application calls `http://127.0.0.1:PORT/…`, one port per remote service; the sidecar
//! finds the service's instances (a static list, DNS, or pixmesh's registry), balances over
//! them with the distributor's smart client (power of two choices over peak-EWMA load, a slot
//! limit and a circuit breaker per instance: [`pixmesh_balance`]), speaks TLS or mTLS to them,
//! holds each request to a deadline, and retries what is safe to retry on another instance
//! within a retry budget.
//!
//! What is retried: a request whose method is idempotent (GET, HEAD, OPTIONS, PUT, DELETE,
//! TRACE) and whose body was small enough to keep (`max_retry_body_bytes`), when the instance
//! broke the connection or answered 502, 503 or 504; any request with a kept body whose
//! connection could not be made (nothing was sent). When every instance's breaker is open
//! the answer is at once, not at the deadline. At most `retries` times, each taken from the
//! budget (`retry_budget_percent` of first tries plus `retry_budget_per_second`), and never past
//! the deadline. The application gets the last answer, or a JSON error naming the service.

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{Method, Request, Uri};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use pixmesh_balance::breaker::{BreakerConfig, State as BreakerState};
use pixmesh_balance::budget::RetryBudget;
use pixmesh_balance::discovery::{self, Discovery};
use pixmesh_balance::set::{EndpointSet, MetricNames, ProbeFuture, Transport};
use pixmesh_chassis::grpc::Dialer;
use pixmesh_chassis::tls::ClientTlsConfig;
use pixmesh_chassis::{ApiError, ErrorCode, Shutdown};
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::time::Instant;

/// `[sidecar.outbound]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundConfig {
    /// `/healthz`, `/readyz` (ready when every service has an instance), `/metrics`, and
    /// `/services` (each service's instances, loads and breakers).
    pub admin_listen: SocketAddr,
    /// TLS to the remote services (`[sidecar.outbound.tls]`).
    pub tls: ClientTlsConfig,
    /// `[[sidecar.outbound.services]]`.
    pub services: Vec<ServiceConfig>,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig { admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)), tls: ClientTlsConfig::default(), services: Vec::new() }
    }
}

/// One remote service.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// Its name (in logs, metrics, errors, and the registry's service name by default).
    pub name: String,
    /// Where the application calls it, `127.0.0.1:PORT`.
    pub listen: SocketAddr,
    /// Its instances, `HOST:PORT` each (static).
    pub instances: Vec<String>,
    /// Or: a DNS name, `HOST:PORT`, whose A/AAAA records are the instances (re-read every
    /// `discovery_interval_ms`; a Kubernetes headless Service).
    pub dns: String,
    /// Or: pixmesh's registry (`HOST:PORT`), watched for instances of `registry_service`
    /// (this service's `name` when empty).
    pub registry: String,
    pub registry_service: String,
    pub discovery_interval_ms: u64,
    /// Speak TLS to the instances (with `[sidecar.outbound.tls]`).
    pub tls: bool,
    /// Dial `registry` over TLS too (with `[sidecar.outbound.tls]`: a registry run with
    /// `[registry.tls]`).
    pub registry_tls: bool,
    /// The name the instances' certificates must carry; empty: the instance's host (an IP
    /// address from DNS or the registry rarely is one, so set it for those).
    pub server_name: String,
    /// The whole request's deadline, retries included (until the response headers).
    pub timeout_ms: u64,
    /// Tries after the first, at most.
    pub retries: u32,
    pub retry_budget_percent: u32,
    pub retry_budget_per_second: u32,
    /// Largest body kept for a retry; a larger one is sent once.
    pub max_retry_body_bytes: u64,
    /// Requests in flight to one instance at once (its bulkhead); more wait for a slot within
    /// the deadline.
    pub max_in_flight_per_instance: u32,
    /// Each instance's circuit breaker.
    pub breaker: BreakerConfig,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            name: String::new(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            instances: Vec::new(),
            dns: String::new(),
            registry: String::new(),
            registry_service: String::new(),
            discovery_interval_ms: 5_000,
            tls: false,
            registry_tls: false,
            server_name: String::new(),
            timeout_ms: 10_000,
            retries: 2,
            retry_budget_percent: 20,
            retry_budget_per_second: 10,
            max_retry_body_bytes: 64 * 1024,
            max_in_flight_per_instance: 100,
            breaker: BreakerConfig::default(),
        }
    }
}

impl OutboundConfig {
    pub fn validate(&self) -> Result<(), String> {
        self.tls.validate("sidecar.outbound.tls")?;
        let mut names: Vec<&str> = Vec::new();
        for s in &self.services {
            let what = format!("sidecar.outbound service {:?}", s.name);
            if s.name.is_empty() {
                return Err("every sidecar.outbound service needs a name".into());
            }
            if names.contains(&s.name.as_str()) {
                return Err(format!("{what} is defined twice"));
            }
            names.push(&s.name);
            let sources = [!s.instances.is_empty(), !s.dns.is_empty(), !s.registry.is_empty()].iter().filter(|x| **x).count();
            if sources != 1 {
                return Err(format!("{what} needs exactly one of instances, dns or registry"));
            }
            if (s.tls || s.registry_tls) && self.tls.ca.is_none() {
                return Err(format!("{what} has tls or registry_tls = true: set sidecar.outbound.tls.ca"));
            }
            if s.timeout_ms == 0 || s.max_in_flight_per_instance == 0 || s.discovery_interval_ms == 0 {
                return Err(format!("{what}: timeout_ms, max_in_flight_per_instance and discovery_interval_ms must be at least 1"));
            }
            if s.retry_budget_percent > pixmesh_balance::budget::MAX_PERCENT {
                return Err(format!("{what}: retry_budget_percent must be at most {}", pixmesh_balance::budget::MAX_PERCENT));
            }
            s.breaker.validate().map_err(|e| format!("{what}: {e}"))?;
        }
        Ok(())
    }
}

/// The metric names the outbound side records under.
const METRICS: MetricNames = MetricNames {
    breaker_transitions: crate::instruments::OUTBOUND_BREAKER_TRANSITIONS,
    retries_refused: crate::instruments::OUTBOUND_RETRIES_REFUSED,
    instances: crate::instruments::OUTBOUND_INSTANCES,
};

type HttpsClient = Client<HttpsConnector<HttpConnector>, Body>;

/// How the sidecar reaches an instance: one shared connection pool (keyed by instance), the
/// scheme, and a TCP probe for an instance discovery dropped.
pub struct Http {
    client: HttpsClient,
    scheme: http::uri::Scheme,
}

/// One instance's client: the pool, and where the instance is.
#[derive(Clone)]
pub struct Instance {
    client: HttpsClient,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
}

impl Transport for Http {
    type Client = Instance;
    const METRICS: MetricNames = METRICS;

    fn client(&self, address: &str) -> Result<Instance, String> {
        let authority = address.parse().map_err(|e| format!("instance {address:?}: {e}"))?;
        Ok(Instance { client: self.client.clone(), scheme: self.scheme.clone(), authority })
    }

    fn probe(&self, client: &Instance) -> ProbeFuture {
        let target = client.authority.to_string();
        Box::pin(async move { tokio::net::TcpStream::connect(target).await.is_ok() })
    }
}

/// `tls`: `[sidecar.outbound.tls]`, built once for every service. Without a CA it is never used
/// (`tls = true` needs one), but the connector wants one.
fn https_client(tls: &rustls::ClientConfig, service: &ServiceConfig) -> Result<HttpsClient, String> {
    let config = tls.clone();
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.enforce_http(false);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    let https = HttpsConnectorBuilder::new().with_tls_config(config).https_or_http();
    let https = if service.server_name.is_empty() {
        https.enable_http1().wrap_connector(connector)
    } else {
        let name = rustls_pki_types::ServerName::try_from(service.server_name.clone())
            .map_err(|e| format!("sidecar.outbound service {:?} server_name: {e}", service.name))?;
        https.with_server_name_resolver(FixedServerNameResolver::new(name)).enable_http1().wrap_connector(connector)
    };
    Ok(Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(https))
}

/// One service, ready to forward to.
pub struct Service {
    config: ServiceConfig,
    metrics: ServiceMetrics,
    set: EndpointSet<Http>,
    budget: RetryBudget,
    /// How the registry is dialed (`registry_tls`).
    registry: Dialer,
}

impl Service {
    /// `tls`: the services' TLS, and `registry_tls` the dialer for a registry over TLS; both
    /// built once, so a rotated file is read once.
    fn new(config: ServiceConfig, tls: &rustls::ClientConfig, registry_tls: &Dialer) -> Result<Service, String> {
        let client = https_client(tls, &config)?;
        let scheme = if config.tls { http::uri::Scheme::HTTPS } else { http::uri::Scheme::HTTP };
        let timeout = Duration::from_millis(config.timeout_ms);
        let set = EndpointSet::with_transport(Http { client, scheme }, timeout, &config.breaker).with_label("service", &config.name);
        let budget = RetryBudget::with_metric(config.retry_budget_percent, config.retry_budget_per_second, METRICS.retries_refused);
        let registry = if config.registry_tls { registry_tls.clone() } else { Dialer::default() };
        Ok(Service { metrics: ServiceMetrics::new(&config.name), config, set, budget, registry })
    }

    fn discovery(&self) -> Result<Box<dyn Discovery>, String> {
        let c = &self.config;
        let capacity = c.max_in_flight_per_instance as usize;
        let interval = Duration::from_millis(c.discovery_interval_ms);
        if !c.registry.is_empty() {
            let service = if c.registry_service.is_empty() { &c.name } else { &c.registry_service };
            return discovery::RegistryWatch::new(&c.registry, service, &self.registry)
                .map(|w| Box::new(w) as Box<dyn Discovery>)
                .map_err(|e| e.to_string());
        }
        if !c.dns.is_empty() {
            return Ok(Box::new(discovery::Dns::new(&c.dns, capacity, capacity, interval)));
        }
        Ok(Box::new(discovery::Static::new(&c.instances, capacity, capacity)))
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1): they belong to one connection, not to the request.
const HOP_BY_HOP: [&str; 8] =
    ["connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te", "trailer", "upgrade"];

fn idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE)
}

fn error(code: ErrorCode, message: String) -> Response {
    ApiError::new(code, message).into_response()
}

/// How one try ended.
enum Tried {
    Answered(Response),
    /// The instance answered 502/503/504: retryable, and the answer to give if no retry.
    Unavailable(Response),
    /// No connection (nothing was sent).
    Refused(String),
    /// Connected, then failed (reset, cut off): the request may have been seen.
    Broken(String),
    TimedOut,
}

async fn forward(State(service): State<Arc<Service>>, request: Request<Body>) -> Response {
    let started = Instant::now();
    let deadline = started + Duration::from_millis(service.config.timeout_ms);
    let (mut parts, body) = request.into_parts();
    for name in HOP_BY_HOP {
        parts.headers.remove(name);
    }
    parts.headers.remove(http::header::HOST);
    // Keep the body for another try when it is known to be small; otherwise it goes once.
    let small = body.size_hint().upper().is_some_and(|n| n <= service.config.max_retry_body_bytes);
    let safe = idempotent(&parts.method);
    let mut kept: Option<Bytes> = None;
    let mut once = Some(body);
    if small {
        match once.take().map(|b| b.collect()) {
            Some(collecting) => match collecting.await {
                Ok(collected) => kept = Some(collected.to_bytes()),
                Err(e) => return error(ErrorCode::BadRequest, format!("reading the request body: {e}")),
            },
            None => kept = Some(Bytes::new()),
        }
    }
    service.budget.deposit();
    let name = &service.config.name;
    let mut tried: Vec<String> = Vec::new();
    let mut last: Option<Response> = None;
    let mut why = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            service.metrics.done(&service.metrics.timeout, started);
            return last
                .unwrap_or_else(|| error(ErrorCode::Timeout, format!("{name} did not answer within {} ms", service.config.timeout_ms)));
        }
        // Every instance's breaker open: no use waiting for the deadline.
        let all_open = !tried.is_empty() && service.set.snapshot().iter().all(|i| i.breaker == BreakerState::Open);
        let slot = if all_open { None } else { service.set.acquire_within(&tried, left).await };
        let Some(slot) = slot else {
            if let Some(answer) = last {
                service.metrics.done(&service.metrics.unavailable, started);
                return answer;
            }
            service.metrics.done(&service.metrics.no_instance, started);
            let known = service.set.len();
            let detail = if why.is_empty() { String::new() } else { format!(" (last: {why})") };
            return error(
                ErrorCode::Unavailable,
                format!("no instance of {name} could take the request within the deadline ({known} known){detail}"),
            );
        };
        let instance = slot.endpoint().client();
        let address = slot.endpoint().address.clone();
        let body = match (&kept, once.take()) {
            (Some(bytes), _) => Body::from(bytes.clone()),
            (None, Some(body)) => body,
            (None, None) => Body::empty(),
        };
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(instance.scheme.clone());
        uri.authority = Some(instance.authority.clone());
        uri.path_and_query = parts.uri.path_and_query().cloned().or_else(|| Some(http::uri::PathAndQuery::from_static("/")));
        let Ok(uri) = Uri::from_parts(uri) else {
            return error(ErrorCode::BadRequest, "the request target cannot be forwarded".into());
        };
        let mut outgoing = Request::from_parts(parts.clone(), body);
        *outgoing.uri_mut() = uri;
        *outgoing.version_mut() = http::Version::HTTP_11;
        let tried_once = tokio::time::timeout(left, instance.client.request(outgoing)).await;
        let outcome = match tried_once {
            Ok(Ok(response)) if matches!(response.status().as_u16(), 502..=504) => Tried::Unavailable(response.map(Body::new)),
            Ok(Ok(response)) => Tried::Answered(response.map(Body::new)),
            Ok(Err(e)) if e.is_connect() => Tried::Refused(e.to_string()),
            Ok(Err(e)) => Tried::Broken(e.to_string()),
            Err(_) => Tried::TimedOut,
        };
        let kept_body = kept.is_some();
        let retry = match outcome {
            Tried::Answered(response) => {
                slot.finish(false);
                service.metrics.done(&service.metrics.ok, started);
                return response;
            }
            Tried::Unavailable(response) => {
                slot.finish(true);
                why = format!("{address} answered {}", response.status());
                last = Some(response);
                kept_body && safe
            }
            Tried::Refused(e) => {
                slot.refused();
                why = format!("{address}: {e}");
                // Nothing was sent: any request may go elsewhere, if its body is still here.
                kept_body
            }
            Tried::Broken(e) => {
                slot.finish(true);
                why = format!("{address}: {e}");
                last = Some(error(ErrorCode::Unavailable, format!("{name} ({address}) failed: {e}")));
                kept_body && safe
            }
            Tried::TimedOut => {
                slot.finish(true);
                service.metrics.done(&service.metrics.timeout, started);
                return error(ErrorCode::Timeout, format!("{name} ({address}) did not answer within {} ms", service.config.timeout_ms));
            }
        };
        tried.push(address);
        let may = retry && tried.len() <= service.config.retries as usize && service.budget.withdraw();
        if !may {
            service.metrics.done(&service.metrics.failed, started);
            return last.unwrap_or_else(|| error(ErrorCode::Unavailable, format!("{name} could not be reached: {why}")));
        }
        service.metrics.retries.increment(1);
        tracing::debug!(service = %name, %why, "retrying on another instance");
        // An instance excluded for this request may be the only one: after every instance was
        // tried once, any may be tried again.
        if tried.len() >= service.set.len() {
            tried.clear();
        }
    }
}

/// A service's metrics, registered once (not looked up by label per request).
struct ServiceMetrics {
    ok: metrics::Counter,
    failed: metrics::Counter,
    timeout: metrics::Counter,
    unavailable: metrics::Counter,
    no_instance: metrics::Counter,
    retries: metrics::Counter,
    duration: metrics::Histogram,
}

impl ServiceMetrics {
    fn new(service: &str) -> ServiceMetrics {
        let outcome =
            |o: &'static str| metrics::counter!(crate::instruments::OUTBOUND_REQUESTS, "service" => service.to_string(), "outcome" => o);
        ServiceMetrics {
            ok: outcome("ok"),
            failed: outcome("failed"),
            timeout: outcome("timeout"),
            unavailable: outcome("unavailable"),
            no_instance: outcome("no_instance"),
            retries: metrics::counter!(crate::instruments::OUTBOUND_RETRIES, "service" => service.to_string()),
            duration: metrics::histogram!(crate::instruments::OUTBOUND_DURATION, "service" => service.to_string()),
        }
    }

    /// Counts a request that ended as `outcome`, and its time.
    fn done(&self, outcome: &metrics::Counter, started: Instant) {
        outcome.increment(1);
        self.duration.record(started.elapsed().as_secs_f64());
    }
}

/// The services, bound: each has its listener (already bound, so a port taken fails before
/// anything serves).
pub struct Bound {
    pub services: Vec<(ServiceConfig, TcpListener)>,
}

/// Serves every service on its listener until `shutdown`; `admin` answers `/readyz` (every
/// service has an instance) and `/services`.
pub async fn run(config: OutboundConfig, bound: Bound, admin: TcpListener, shutdown: Shutdown) -> Result<(), String> {
    config.validate()?;
    if bound.services.is_empty() {
        return Err("sidecar.outbound.services is empty: give at least one remote service".into());
    }
    let readiness = pixmesh_chassis::admin::Readiness::new();
    let mut services = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut announce = pixmesh_chassis::announce::Announcement::new("sidecar-outbound");
    let tls = config.tls.client_config().map_err(|e| format!("sidecar.outbound.tls: {e}"))?;
    let registry_tls = if config.tls.enabled() { Dialer::with_config(tls.clone()) } else { Dialer::default() };
    for (service_config, listener) in bound.services {
        let service = Arc::new(Service::new(service_config, &tls, &registry_tls)?);
        let discovery = service.discovery()?;
        let retry = Duration::from_millis(service.config.discovery_interval_ms.min(5_000));
        // An instance takes what it registered (when it said), at most the configured limit.
        let cap = service.config.max_in_flight_per_instance as usize;
        let slots = move |m: &pixmesh_balance::discovery::Member| if m.capacity > 0 { m.capacity.min(cap) } else { cap };
        pixmesh_balance::discovery::spawn_with(discovery, service.set.clone(), slots, retry, shutdown.clone());
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        announce = announce.with(&service.config.name, addr);
        tracing::info!(service = %service.config.name, %addr, "outbound service listening");
        let router = axum::Router::new().fallback(forward).with_state(Arc::clone(&service));
        let stop = shutdown.clone();
        tasks.spawn(async move { pixmesh_chassis::serve::http("sidecar outbound", listener, router, stop, Duration::from_secs(5)).await });
        services.push(service);
    }
    let listing = Arc::new(services);
    // Ready when every service has at least one instance (looked at every 500 ms).
    let watched = Arc::clone(&listing);
    let checks = readiness.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let empty: Vec<&str> = watched.iter().filter(|s| s.set.is_empty()).map(|s| s.config.name.as_str()).collect();
            let verdict = if empty.is_empty() { Ok(()) } else { Err(format!("no instance known for {}", empty.join(", "))) };
            checks.set_check("instances", verdict);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.wait() => return,
            }
        }
    });
    let routes = axum::Router::new().route(
        "/services",
        axum::routing::get(move || {
            let listing = Arc::clone(&listing);
            async move {
                let body: Vec<serde_json::Value> =
                    listing.iter().map(|s| serde_json::json!({ "name": s.config.name, "instances": s.set.snapshot() })).collect();
                axum::Json(serde_json::json!({ "services": body }))
            }
        }),
    );
    let admin_addr = admin.local_addr().map_err(|e| e.to_string())?;
    let admin_server = pixmesh_chassis::serve::admin_with("sidecar", admin, readiness.clone(), shutdown.clone(), routes);
    announce.with("admin", admin_addr).print();
    readiness.set_ready(true);
    while let Some(done) = tasks.join_next().await {
        if let Ok(Err(e)) = done {
            tracing::error!(error = %e, "an outbound listener stopped");
        }
    }
    admin_server.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
    use super::*;

    fn service(name: &str) -> ServiceConfig {
        ServiceConfig { name: name.into(), instances: vec!["127.0.0.1:1".into()], ..ServiceConfig::default() }
    }

    #[test]
    fn settings_that_cannot_work_are_refused_with_the_service_named() {
        let ok = OutboundConfig { services: vec![service("a"), service("b")], ..OutboundConfig::default() };
        assert!(ok.validate().is_ok());
        let cases: Vec<(OutboundConfig, &str)> = vec![
            (OutboundConfig { services: vec![service("a"), service("a")], ..OutboundConfig::default() }, "defined twice"),
            (OutboundConfig { services: vec![service("")], ..OutboundConfig::default() }, "needs a name"),
            (
                OutboundConfig { services: vec![ServiceConfig { instances: vec![], ..service("a") }], ..OutboundConfig::default() },
                "exactly one of instances, dns or registry",
            ),
            (
                OutboundConfig { services: vec![ServiceConfig { dns: "h:1".into(), ..service("a") }], ..OutboundConfig::default() },
                "exactly one of",
            ),
            (OutboundConfig { services: vec![ServiceConfig { tls: true, ..service("a") }], ..OutboundConfig::default() }, "tls.ca"),
            (OutboundConfig { services: vec![ServiceConfig { timeout_ms: 0, ..service("a") }], ..OutboundConfig::default() }, "at least 1"),
            (
                OutboundConfig {
                    tls: ClientTlsConfig { cert: Some("c.pem".into()), ..ClientTlsConfig::default() },
                    services: vec![service("a")],
                    ..OutboundConfig::default()
                },
                "go together",
            ),
        ];
        for (config, expected) in cases {
            let err = config.validate().unwrap_err();
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn only_idempotent_methods_are_retried() {
        for m in [Method::GET, Method::HEAD, Method::OPTIONS, Method::PUT, Method::DELETE, Method::TRACE] {
            assert!(idempotent(&m), "{m}");
        }
        for m in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!idempotent(&m), "{m}");
        }
    }
}
