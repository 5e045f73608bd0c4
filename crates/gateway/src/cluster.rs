//! `GET /api/cluster`: one answer composed from every role the gateway is told of (API
//! composition). The gateway asks, all at once and each within `cluster.timeout_ms`:
//! - every admin endpoint in `cluster.sources` for `/readyz` (its role, state and checks), and
//!   by role: a distributor's `/workers` (the workers it balances over: capacity, calls in
//!   flight, latency estimate, breaker) and `/metrics` (the queue's depth and oldest job, read
//!   from the job store), a registry's `/instances`;
//! - the status service (the route's upstream) for the newest failed jobs, with the caller's
//!   identity.
//!
//! A source that fails or is late is named in `sources` with why, and the rest is answered: a
//! dead role shows as dead instead of breaking the page. Answers are kept `cluster.cache_ms`
//! (one second), so a room full of open consoles costs the roles one round per second.
//! Only an admin key may read it (it names internal addresses).

use crate::keys::Client;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use futures_util::future::join_all;
use pixmesh_chassis::{ApiError, ErrorCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// `[gateway.cluster]`. Read at start.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Admin endpoints by name: `{ distributor = "http://10.0.0.5:9090", "worker-1" = "…" }`
    /// (`pixmesh up` fills it with its roles). What each is, is read from its `/readyz`.
    pub sources: BTreeMap<String, String>,
    /// The most each source may take before it counts as failed.
    pub timeout_ms: u64,
    /// An answer is reused this long.
    pub cache_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig { sources: BTreeMap::new(), timeout_ms: 1000, cache_ms: 1000 }
    }
}

impl ClusterConfig {
    pub fn validate(&self) -> Result<(), String> {
        for (name, url) in &self.sources {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!("gateway.cluster.sources.{name} = {url:?}: an http:// or https:// URL of an admin port"));
            }
        }
        if self.timeout_ms == 0 {
            return Err("gateway.cluster.timeout_ms must be above 0".into());
        }
        Ok(())
    }
}

/// What the handler needs: the sources, where the status service is, a client, the last answer.
#[derive(Clone)]
pub struct Cluster {
    config: Arc<ClusterConfig>,
    /// The status service's base URL (the `status` upstream's first URL), for recent errors.
    status: Option<String>,
    http: reqwest::Client,
    cached: Arc<Mutex<Option<(Instant, Value)>>>,
}

impl Cluster {
    /// `tls` (the gateway's `client_tls`) for `https://` sources and status service.
    pub fn new(config: ClusterConfig, status: Option<String>, tls: Option<rustls::ClientConfig>) -> Result<Cluster, String> {
        let builder = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_millis(config.timeout_ms));
        let builder = match tls {
            Some(tls) => builder.use_preconfigured_tls(tls),
            None => builder,
        };
        let http = builder.build().map_err(|e| format!("gateway.cluster: cannot make its HTTP client: {e}"))?;
        Ok(Cluster { config: Arc::new(config), status, http, cached: Arc::default() })
    }
}

/// One source as the answer reports it.
#[derive(Debug, Serialize)]
struct Source {
    name: String,
    url: String,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    ms: u64,
}

#[derive(Debug, Serialize)]
struct RoleState {
    name: String,
    role: Option<String>,
    /// `ready`, `starting`, `failing`, `shutting_down` (what its `/readyz` says), or `dead`.
    state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    checks: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The answer of `GET /api/cluster`, for the OpenAPI document (the handler writes the same
/// fields as JSON).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // documentation only
pub struct ClusterView {
    /// When it was composed (RFC 3339); an answer may be up to `cluster.cache_ms` old.
    generated_at: String,
    /// Every source asked: `{name, url, ok, error?, ms}`.
    #[schema(value_type = Vec<Object>)]
    sources: Vec<Value>,
    /// Each role's readiness: `{name, role, state, checks?, error?}`; `state` is `dead` for a
    /// source that did not answer.
    #[schema(value_type = Vec<Object>)]
    roles: Vec<Value>,
    /// Each worker: `{address, capacity, limit, in_flight, latency_estimate_seconds, breaker,
    /// registered?, seen_by}`.
    #[schema(value_type = Vec<Object>)]
    workers: Vec<Value>,
    /// Each distributor: `{name, queue_depth, jobs}`.
    #[schema(value_type = Vec<Object>)]
    distributors: Vec<Value>,
    /// `{depth, oldest_job_age_seconds}` (null when no distributor answered).
    #[schema(value_type = Object)]
    queue: Value,
    /// The newest failed jobs the caller may read, each as `GET /api/status/{id}` shows it.
    #[schema(value_type = Vec<Object>)]
    recent_errors: Vec<Value>,
}

/// The cluster as its roles say it is now: one call over every role's admin port and the
/// status service, answered in part when some do not answer.
#[utoipa::path(
    get,
    path = "/api/cluster",
    tag = "cluster",
    responses(
        (status = 200, description = "The composed view; sources that failed are named in it", body = ClusterView),
        (status = 403, description = "Not an admin key", body = pixmesh_chassis::ErrorBody),
    ),
)]
pub async fn answer(State(cluster): State<Cluster>, request: Request) -> Response {
    // Behind the API key layer: no client means the gateway requires no key.
    if let Some(client) = request.extensions().get::<Arc<Client>>()
        && !client.admin
    {
        return ApiError::new(ErrorCode::Forbidden, "the cluster view names internal addresses: it needs an admin key (admin = true)")
            .into_response();
    }
    let mut cached = cluster.cached.lock().await;
    if let Some((at, value)) = cached.as_ref()
        && at.elapsed() < Duration::from_millis(cluster.config.cache_ms)
    {
        return axum::Json(value.clone()).into_response();
    }
    let value = compose(&cluster, request.headers()).await;
    *cached = Some((Instant::now(), value.clone()));
    axum::Json(value).into_response()
}

/// GETs `url` as JSON (or text), within the configured timeout; the time it took.
async fn get(http: &reqwest::Client, url: &str, headers: &http::HeaderMap) -> (Result<Value, String>, u64) {
    let started = Instant::now();
    let result = async {
        let response = http.get(url).headers(headers.clone()).send().await.map_err(|e| short(&e))?;
        let status = response.status();
        let text = response.text().await.map_err(|e| short(&e))?;
        // `/readyz` answers 503 with its body when not ready: that is an answer, not a failure.
        match serde_json::from_str::<Value>(&text) {
            Ok(v) => Ok(v),
            Err(_) if status.is_success() => Ok(Value::String(text)),
            Err(_) => Err(format!("HTTP {status}")),
        }
    }
    .await;
    (result, started.elapsed().as_millis() as u64)
}

/// An error's chain, said briefly (`connection refused`, `operation timed out`).
fn short(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() { "timed out".to_string() } else { e.to_string() };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = s.to_string();
        source = s.source();
    }
    text
}

/// A gauge's value from a Prometheus text exposition (the sum over its samples).
fn gauge(text: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    if values.is_empty() { None } else { Some(values.iter().sum()) }
}

async fn compose(cluster: &Cluster, caller: &http::HeaderMap) -> Value {
    let none = http::HeaderMap::new();
    let readiness = join_all(cluster.config.sources.iter().map(|(name, base)| {
        let url = format!("{}/readyz", base.trim_end_matches('/'));
        let none = &none;
        async move { (name.clone(), url.clone(), get(&cluster.http, &url, none).await) }
    }));
    // The newest failed jobs, as the caller may see them (the gateway's identity headers).
    let mut identity = http::HeaderMap::new();
    for name in pixmesh_chassis::headers::ALL {
        if let Some(v) = caller.get(name) {
            identity.insert(name, v.clone());
        }
    }
    let errors = async {
        match &cluster.status {
            Some(base) => {
                Some(get(&cluster.http, &format!("{}/api/jobs?state=failed&limit=10", base.trim_end_matches('/')), &identity).await)
            }
            None => None,
        }
    };
    let (readiness, errors) = tokio::join!(readiness, errors);

    let mut sources = Vec::new();
    let mut roles = Vec::new();
    let mut details = Vec::new();
    for (name, url, (result, ms)) in readiness {
        match result {
            Ok(v) => {
                let role = v["role"].as_str().map(str::to_string);
                let state = v["status"].as_str().unwrap_or("unknown").to_string();
                sources.push(Source { name: name.clone(), url, ok: true, error: None, ms });
                if let Some(role) = &role {
                    details.push((name.clone(), role.clone()));
                }
                roles.push(RoleState { name, role, state, checks: Some(v["checks"].clone()).filter(|c| !c.is_null()), error: None });
            }
            Err(error) => {
                sources.push(Source { name: name.clone(), url, ok: false, error: Some(error.clone()), ms });
                roles.push(RoleState { name, role: None, state: "dead".into(), checks: None, error: Some(error) });
            }
        }
    }

    // What the live roles know, asked of each by its role.
    let asked = join_all(details.iter().map(|(name, role)| {
        let base = cluster.config.sources.get(name).map(|b| b.trim_end_matches('/').to_string()).unwrap_or_default();
        let none = &none;
        async move {
            let paths: &[&str] = match role.as_str() {
                "distributor" => &["/workers", "/metrics"],
                "registry" => &["/instances"],
                _ => &[],
            };
            let mut out = Vec::new();
            for path in paths {
                let url = format!("{base}{path}");
                out.push((path.to_string(), url.clone(), get(&cluster.http, &url, none).await));
            }
            (name.clone(), role.clone(), out)
        }
    }))
    .await;

    let mut workers: BTreeMap<String, Value> = BTreeMap::new();
    let mut distributors = Vec::new();
    let mut queue = serde_json::json!({ "depth": null, "oldest_job_age_seconds": null });
    for (name, role, answers) in asked {
        let mut distributor = serde_json::json!({ "name": name });
        for (path, url, (result, ms)) in answers {
            let source = format!("{name}{path}");
            match result {
                Err(error) => sources.push(Source { name: source, url, ok: false, error: Some(error), ms }),
                Ok(v) => {
                    sources.push(Source { name: source, url, ok: true, error: None, ms });
                    match (role.as_str(), path.as_str()) {
                        ("distributor", "/workers") => {
                            for w in v["workers"].as_array().into_iter().flatten() {
                                let Some(address) = w["address"].as_str() else { continue };
                                let entry = workers
                                    .entry(address.to_string())
                                    .or_insert_with(|| serde_json::json!({ "address": address, "seen_by": [] }));
                                for key in ["capacity", "limit", "in_flight", "latency_estimate_seconds", "breaker"] {
                                    // Several distributors: the calls in flight add up; the
                                    // rest is each one's own view, the last one shown.
                                    if key == "in_flight" {
                                        let sum = entry["in_flight"].as_u64().unwrap_or(0) + w[key].as_u64().unwrap_or(0);
                                        entry["in_flight"] = sum.into();
                                    } else {
                                        entry[key] = w[key].clone();
                                    }
                                }
                                if let Some(seen) = entry["seen_by"].as_array_mut() {
                                    seen.push(Value::String(name.clone()));
                                }
                            }
                        }
                        ("distributor", "/metrics") => {
                            let text = v.as_str().unwrap_or_default();
                            let depth = gauge(text, crate::cluster::QUEUE_DEPTH);
                            let age = gauge(text, crate::cluster::QUEUE_OLDEST_AGE);
                            distributor["queue_depth"] = depth.into();
                            distributor["jobs"] = serde_json::json!({
                                "succeeded": sample(text, "pixmesh_jobs_total", "outcome=\"succeeded\""),
                                "failed": sample(text, "pixmesh_jobs_total", "outcome=\"failed\""),
                            });
                            // Every distributor reads the same store: any one's reading will do.
                            if depth.is_some() {
                                queue = serde_json::json!({ "depth": depth, "oldest_job_age_seconds": age });
                            }
                        }
                        ("registry", "/instances") => {
                            for i in v["instances"].as_array().into_iter().flatten() {
                                let Some(address) = i["address"].as_str() else { continue };
                                let entry = workers
                                    .entry(address.to_string())
                                    .or_insert_with(|| serde_json::json!({ "address": address, "seen_by": [] }));
                                entry["registered"] = true.into();
                                if entry.get("capacity").is_none() {
                                    entry["capacity"] = i["capacity"].clone();
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        if role == "distributor" {
            distributors.push(distributor);
        }
    }
    let recent_errors = match errors {
        Some((Ok(v), ms)) => {
            sources.push(Source { name: "status /api/jobs".into(), url: "status".into(), ok: true, error: None, ms });
            v["jobs"].clone()
        }
        Some((Err(error), ms)) => {
            sources.push(Source { name: "status /api/jobs".into(), url: "status".into(), ok: false, error: Some(error), ms });
            Value::Array(Vec::new())
        }
        None => Value::Array(Vec::new()),
    };
    serde_json::json!({
        "generated_at": pixmesh_chassis::time::rfc3339_ms(pixmesh_chassis::time::now_ms()),
        "sources": sources,
        "roles": roles,
        "workers": workers.into_values().collect::<Vec<_>>(),
        "distributors": distributors,
        "queue": queue,
        "recent_errors": recent_errors,
    })
}

/// The distributor's queue gauges (named here, not imported: the gateway does not depend on
/// the distributor).
const QUEUE_DEPTH: &str = "pixmesh_queue_depth";
const QUEUE_OLDEST_AGE: &str = "pixmesh_queue_oldest_job_age_seconds";

/// The value of the sample of `name` whose labels contain `label`.
fn sample(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines().filter(|l| l.split(['{', ' ']).next() == Some(name) && l.contains(label)).find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_and_samples_are_read_from_the_exposition() {
        let text = "# HELP pixmesh_queue_depth x\n# TYPE pixmesh_queue_depth gauge\npixmesh_queue_depth{role=\"distributor\"} 7\n\
                    pixmesh_queue_depth_other 3\npixmesh_jobs_total{role=\"distributor\",outcome=\"succeeded\"} 12\n\
                    pixmesh_jobs_total{role=\"distributor\",outcome=\"failed\"} 2\n";
        assert_eq!(gauge(text, "pixmesh_queue_depth"), Some(7.0));
        assert_eq!(gauge(text, "pixmesh_queue_oldest_job_age_seconds"), None);
        assert_eq!(sample(text, "pixmesh_jobs_total", "outcome=\"failed\""), Some(2.0));
    }

    #[test]
    fn sources_must_be_http_urls() {
        let mut config = ClusterConfig::default();
        assert!(config.validate().is_ok());
        config.sources.insert("worker-1".into(), "127.0.0.1:9090".into());
        assert!(config.validate().unwrap_err().contains("worker-1"));
        config.sources.insert("worker-1".into(), "http://127.0.0.1:9090".into());
        assert!(config.validate().is_ok());
    }
}
