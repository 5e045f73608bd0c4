//! The gateway under overload, against a real upstream that holds its answers until the test
//! lets them go: admission (a bounded queue per route, then fast 503s with `Retry-After`) and
//! passive ejection that never takes a pool's last instances out.
//!
//! No timing thresholds decide these tests: a refusal is shown to be fast by arriving while
//! every admitted request is still held by the upstream.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::{any, get};
use pixmesh_chassis::Shutdown;
use pixmesh_gateway::config::PoolConfig;
use pixmesh_gateway::{GatewayConfig, RouteConfig, Source, UpstreamConfig};
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// An upstream that counts what it gets and holds `/held` requests until the gate opens.
struct Upstream {
    url: String,
    /// Connections accepted.
    connections: AtomicU64,
    arrived: AtomicU64,
    in_flight: AtomicU64,
    most_in_flight: AtomicU64,
    served: AtomicU64,
    /// The next request to `/shed` gets 503, as an overloaded server answers.
    shed_next: AtomicBool,
    gate: watch::Sender<bool>,
}

async fn held(State(up): State<Arc<Upstream>>) -> &'static str {
    up.arrived.fetch_add(1, Ordering::SeqCst);
    let now = up.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    up.most_in_flight.fetch_max(now, Ordering::SeqCst);
    let mut gate = up.gate.subscribe();
    let _ = gate.wait_for(|open| *open).await;
    up.in_flight.fetch_sub(1, Ordering::SeqCst);
    up.served.fetch_add(1, Ordering::SeqCst);
    "held"
}

async fn other(State(up): State<Arc<Upstream>>) -> axum::response::Response {
    up.arrived.fetch_add(1, Ordering::SeqCst);
    if up.shed_next.swap(false, Ordering::SeqCst) {
        return (http::StatusCode::SERVICE_UNAVAILABLE, "busy").into_response();
    }
    up.served.fetch_add(1, Ordering::SeqCst);
    "ok".into_response()
}

async fn upstream() -> Arc<Upstream> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let up = Arc::new(Upstream {
        url,
        connections: AtomicU64::new(0),
        arrived: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
        most_in_flight: AtomicU64::new(0),
        served: AtomicU64::new(0),
        shed_next: AtomicBool::new(false),
        gate: watch::channel(false).0,
    });
    let app = Router::new().route("/{route}/held", get(held)).fallback(any(other)).with_state(Arc::clone(&up));
    let counted = Arc::clone(&up);
    let listener = axum::serve::ListenerExt::tap_io(listener, move |_| {
        counted.connections.fetch_add(1, Ordering::SeqCst);
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    up
}

/// A closed port: connections to it are refused.
fn dead() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", l.local_addr().unwrap())
}

fn route(prefix: &str, upstream: &str) -> RouteConfig {
    let mut r: RouteConfig = toml::from_str(&format!("prefix = {prefix:?}\nupstream = {upstream:?}")).unwrap();
    r.timeout_ms = Some(60_000);
    r
}

fn config() -> GatewayConfig {
    let mut c = GatewayConfig { rate: "off".into(), access_log: false, require_api_key: false, ..GatewayConfig::default() };
    c.upstreams.insert("upload".into(), UpstreamConfig::Url(dead()));
    c.upstreams.insert("status".into(), UpstreamConfig::Url(dead()));
    c
}

async fn start(config: GatewayConfig) -> (String, Shutdown) {
    // Metric handles are registered when the configuration is built: the recorder comes first.
    pixmesh_chassis::telemetry::init_metrics("gateway");
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", http.local_addr().unwrap());
    let shutdown = Shutdown::new();
    tokio::spawn(pixmesh_gateway::run(Source::fixed(config, vec![]), http, admin, shutdown.clone()));
    (addr, shutdown)
}

/// The sum of a metric over the series whose labels contain `label`.
fn metric(name: &str, label: &str) -> f64 {
    pixmesh_chassis::telemetry::render_metrics()
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Answer {
    status: u16,
    retry_after: Option<String>,
    connection: Option<String>,
    code: Option<String>,
    message: String,
}

async fn answer(res: reqwest::Response) -> Answer {
    let header = |name: &str| res.headers().get(name).map(|v| v.to_str().unwrap().to_string());
    let (status, retry_after, connection) = (res.status().as_u16(), header("retry-after"), header("connection"));
    let text = res.text().await.unwrap();
    let json: Option<Value> = serde_json::from_str(&text).ok();
    let code = json.as_ref().and_then(|v| v["error"]["code"].as_str().map(String::from));
    let message = json.as_ref().and_then(|v| v["error"]["message"].as_str().map(String::from)).unwrap_or(text);
    Answer { status, retry_after, connection, code, message }
}

fn assert_refused(a: &Answer) {
    assert_eq!(a.status, 503, "{}", a.message);
    assert_eq!(a.code.as_deref(), Some("unavailable"));
    assert_eq!(a.retry_after.as_deref(), Some("1"));
}

#[tokio::test]
async fn past_the_queue_requests_get_a_fast_503_while_admitted_ones_are_served() {
    let up = upstream().await;
    let mut c = config();
    // eject_after = 1: were anything here counted as the instance failing, it would be ejected.
    c.upstreams.insert("gated".into(), UpstreamConfig::Pool(PoolConfig { eject_after: 1, ..PoolConfig::of(vec![up.url.clone()]) }));
    c.routes.push(RouteConfig { max_in_flight: Some(2), max_queue: Some(2), max_queue_ms: Some(60_000), ..route("/gated", "gated") });
    let (gw, shutdown) = start(c).await;
    let client = reqwest::Client::new();

    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let (client, url) = (client.clone(), format!("{gw}/gated/held"));
        requests.spawn(async move {
            let sent = Instant::now();
            let res = client.get(url).send().await.unwrap();
            (sent.elapsed(), answer(res).await)
        });
    }
    // Two go on to the upstream, two wait, six are refused while those four are still held.
    let mut refused = Vec::new();
    while refused.len() < 6 {
        let (took, a) = tokio::time::timeout(Duration::from_secs(30), requests.join_next()).await.expect("six refusals").unwrap().unwrap();
        assert_refused(&a);
        assert!(a.message.contains("2 requests in flight and 2 waiting"), "{}", a.message);
        assert!(a.connection.is_none(), "a refused GET keeps its connection");
        refused.push(took);
    }
    wait_for("two requests at the upstream", || up.in_flight.load(Ordering::SeqCst) == 2).await;
    assert_eq!(up.served.load(Ordering::SeqCst), 0, "every refusal came back before any admitted request was answered");
    assert_eq!(metric("pixmesh_gateway_admission_queued", "http_route=\"/gated\""), 2.0);

    // A refused request with a body: not read, not forwarded; the connection is closed after
    // the 503 so the unread body cannot be taken for the next request.
    let a = answer(client.post(format!("{gw}/gated/upload")).body(vec![7u8; 32 * 1024]).send().await.unwrap()).await;
    assert_refused(&a);
    assert_eq!(a.connection.as_deref(), Some("close"));

    up.gate.send_replace(true);
    let mut served = 0;
    while let Some(done) = requests.join_next().await {
        let (_, a) = done.unwrap();
        assert_eq!((a.status, a.message.as_str()), (200, "held"));
        served += 1;
    }
    assert_eq!(served, 4, "the two admitted and the two queued were served");
    assert_eq!(up.most_in_flight.load(Ordering::SeqCst), 2, "never more than max_in_flight at the upstream");
    assert_eq!(up.arrived.load(Ordering::SeqCst), 4, "the refused requests never reached it");
    assert_eq!(metric("pixmesh_gateway_admission_refused_total", "http_route=\"/gated\",reason=\"queue_full\""), 7.0);
    assert_eq!(metric("pixmesh_gateway_admission_queued", "http_route=\"/gated\""), 0.0);
    assert_eq!(metric("pixmesh_gateway_upstream_ejections_total", "upstream=\"gated\""), 0.0);
    // Slots free again: served at once.
    let a = answer(client.get(format!("{gw}/gated/held")).send().await.unwrap()).await;
    assert_eq!(a.status, 200);
    shutdown.trigger();
}

#[tokio::test]
async fn a_request_that_waits_too_long_for_a_slot_is_refused() {
    let up = upstream().await;
    let mut c = config();
    c.upstreams.insert("brief".into(), UpstreamConfig::Url(up.url.clone()));
    c.routes.push(RouteConfig { max_in_flight: Some(1), max_queue: Some(1), max_queue_ms: Some(300), ..route("/brief", "brief") });
    let (gw, shutdown) = start(c).await;
    let client = reqwest::Client::new();
    let first = tokio::spawn({
        let (client, url) = (client.clone(), format!("{gw}/brief/held"));
        async move { answer(client.get(url).send().await.unwrap()).await }
    });
    wait_for("the first request at the upstream", || up.in_flight.load(Ordering::SeqCst) == 1).await;
    let queued = tokio::spawn({
        let (client, url) = (client.clone(), format!("{gw}/brief/held"));
        async move {
            let sent = Instant::now();
            let a = answer(client.get(url).send().await.unwrap()).await;
            (sent.elapsed(), a)
        }
    });
    wait_for("one request in the queue", || metric("pixmesh_gateway_admission_queued", "http_route=\"/brief\"") == 1.0).await;
    // The queue holds one: the next is refused at once.
    let a = answer(client.get(format!("{gw}/brief/held")).send().await.unwrap()).await;
    assert_refused(&a);
    let (waited, a) = queued.await.unwrap();
    assert_refused(&a);
    assert!(a.message.contains("no free slot within 300 ms"), "{}", a.message);
    assert!(waited >= Duration::from_millis(300), "it waited its queue time first ({waited:?})");
    assert_eq!(up.in_flight.load(Ordering::SeqCst), 1, "the first is still held");
    assert_eq!(metric("pixmesh_gateway_admission_refused_total", "http_route=\"/brief\",reason=\"queue_timeout\""), 1.0);
    assert_eq!(metric("pixmesh_gateway_admission_refused_total", "http_route=\"/brief\",reason=\"queue_full\""), 1.0);
    up.gate.send_replace(true);
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(up.arrived.load(Ordering::SeqCst), 1);
    shutdown.trigger();
}

#[tokio::test]
async fn an_instance_gets_at_most_max_connections_requests_at_once() {
    let up = upstream().await;
    let mut c = config();
    let pool = PoolConfig { max_connections: 2, eject_after: 1, ..PoolConfig::of(vec![up.url.clone()]) };
    c.upstreams.insert("capped".into(), UpstreamConfig::Pool(pool));
    c.routes.push(RouteConfig { max_in_flight: Some(100), ..route("/capped", "capped") });
    // Same pool, so the same two slots; a short timeout, which the wait for a slot counts against.
    c.routes.push(RouteConfig { timeout_ms: Some(300), ..route("/hurried", "capped") });
    let (gw, shutdown) = start(c).await;
    let client = reqwest::Client::new();
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (client, url) = (client.clone(), format!("{gw}/capped/held"));
        requests.spawn(async move { answer(client.get(url).send().await.unwrap()).await });
    }
    wait_for("two at the upstream and six waiting for a slot", || {
        up.in_flight.load(Ordering::SeqCst) == 2 && metric("pixmesh_gateway_upstream_slot_waits_total", "upstream=\"capped\"") == 6.0
    })
    .await;
    // No slot frees within the route's timeout: 503, and the busy instance is not blamed.
    let sent = Instant::now();
    let a = answer(client.get(format!("{gw}/hurried/held")).send().await.unwrap()).await;
    assert_refused(&a);
    assert!(a.message.contains("all 2 connections of its instance busy"), "{}", a.message);
    assert!(sent.elapsed() >= Duration::from_millis(300), "it waited for a slot first");
    assert_eq!(metric("pixmesh_gateway_upstream_saturated_total", "upstream=\"capped\""), 1.0);
    assert_eq!(up.in_flight.load(Ordering::SeqCst), 2);
    up.gate.send_replace(true);
    while let Some(done) = requests.join_next().await {
        assert_eq!(done.unwrap().status, 200);
    }
    assert_eq!(up.most_in_flight.load(Ordering::SeqCst), 2);
    assert_eq!(up.served.load(Ordering::SeqCst), 8);
    // Eight requests over (about) two connections, not eight. A connection hyper opens while
    // racing the return of an idle one is kept and reused, hence the slack.
    let connections = up.connections.load(Ordering::SeqCst);
    assert!(connections <= 4, "{connections} connections to an instance capped at 2");
    assert_eq!(metric("pixmesh_gateway_upstream_ejections_total", "upstream=\"capped\""), 0.0);
    shutdown.trigger();
}

#[tokio::test]
async fn a_lone_instance_that_sheds_load_is_not_ejected() {
    let up = upstream().await;
    let mut c = config();
    c.upstreams.insert("solo".into(), UpstreamConfig::Pool(PoolConfig { eject_after: 1, ..PoolConfig::of(vec![up.url.clone()]) }));
    c.routes.push(route("/solo", "solo"));
    let (gw, shutdown) = start(c).await;
    let client = reqwest::Client::new();
    // The upstream answers 503 (it is overloaded): passed on, and the instance stays in.
    up.shed_next.store(true, Ordering::SeqCst);
    assert_eq!(client.get(format!("{gw}/solo/a")).send().await.unwrap().status(), 503);
    assert_eq!(client.get(format!("{gw}/solo/b")).send().await.unwrap().status(), 200);
    assert_eq!(metric("pixmesh_gateway_upstream_ejections_total", "upstream=\"solo\""), 0.0, "the only instance was not ejected");
    shutdown.trigger();
}

#[tokio::test]
async fn an_overloaded_pool_keeps_its_live_instance_in_service() {
    let up = upstream().await;
    let mut c = config();
    // One instance is down; the other is live but overloaded for a moment.
    let pool = PoolConfig { eject_after: 1, ..PoolConfig::of(vec![dead(), up.url.clone()]) };
    c.upstreams.insert("pair".into(), UpstreamConfig::Pool(pool));
    c.routes.push(route("/pair", "pair"));
    let (gw, shutdown) = start(c).await;
    let client = reqwest::Client::new();
    // The dead one refuses the first request (and is ejected); it is retried on the live one.
    assert_eq!(client.get(format!("{gw}/pair/1")).send().await.unwrap().status(), 200);
    // The live one sheds a request with a 503: with one of two out, it must stay in service.
    up.shed_next.store(true, Ordering::SeqCst);
    assert_eq!(client.get(format!("{gw}/pair/2")).send().await.unwrap().status(), 503);
    // Requests with a body are never retried: each must go to the live instance, not the dead
    // one, to succeed.
    for i in 0..5 {
        let res = client.post(format!("{gw}/pair/{i}")).body("payload").send().await.unwrap();
        assert_eq!(res.status(), 200, "POST {i} went to the instance in service");
    }
    shutdown.trigger();
}
