//! Upstream pools: instances picked round-robin, failing ones ejected passively (from the
//! answers real requests get, no probes) and let back after a backoff; keep-alive connection
//! pools to HTTP/1.1 and h2c upstreams, shared by every configuration generation.

use crate::config::PoolConfig;
use axum::body::Body;
use http::Uri;
use http::uri::{Authority, PathAndQuery, Scheme};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use pixmesh_chassis::{ApiError, ErrorCode};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The connection pools. Built once per process: a reload keeps every open upstream connection.
#[derive(Clone)]
pub struct Clients {
    http1: Client<HttpConnector, Body>,
    h2c: Client<HttpConnector, Body>,
}

impl Clients {
    pub fn new() -> Clients {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .build(connector.clone());
        let h2c = Client::builder(TokioExecutor::new()).http2_only(true).pool_idle_timeout(Duration::from_secs(60)).build(connector);
        Clients { http1, h2c }
    }

    pub fn for_pool(&self, pool: &Pool) -> &Client<HttpConnector, Body> {
        if pool.config.h2c { &self.h2c } else { &self.http1 }
    }
}

impl Default for Clients {
    fn default() -> Self {
        Clients::new()
    }
}

/// Milliseconds since the first call, for lock-free ejection deadlines.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

#[derive(Debug)]
pub struct Instance {
    /// `http://host:port` (with any base path), no trailing slash.
    pub base: String,
    authority: Option<Authority>,
    /// A path in the URL, put before every forwarded path.
    base_path: String,
    consecutive_failures: AtomicU32,
    /// Ejections in a row without a success in between (for the backoff).
    ejections: AtomicU32,
    /// 0 when in service.
    ejected_until_ms: AtomicU64,
}

impl Instance {
    fn new(url: &str) -> Instance {
        let base = url.trim_end_matches('/').to_string();
        let parsed = base.parse::<Uri>().ok();
        let authority = parsed.as_ref().and_then(|u| u.authority().cloned());
        let base_path = parsed.as_ref().map(|u| u.path().trim_end_matches('/').to_string()).unwrap_or_default();
        Instance {
            base,
            authority,
            base_path,
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
        }
    }

    /// The URI of `path_and_query` on this instance.
    pub fn uri(&self, path_and_query: &PathAndQuery) -> Result<Uri, ApiError> {
        let bad = |e: http::Error| ApiError::new(ErrorCode::BadRequest, format!("cannot forward this path: {e}"));
        let authority =
            self.authority.clone().ok_or_else(|| ApiError::new(ErrorCode::Internal, format!("upstream {} has no host", self.base)))?;
        let builder = Uri::builder().scheme(Scheme::HTTP).authority(authority);
        if self.base_path.is_empty() {
            builder.path_and_query(path_and_query.clone()).build().map_err(bad)
        } else {
            builder.path_and_query(format!("{}{}", self.base_path, path_and_query)).build().map_err(bad)
        }
    }

    fn ejected(&self, now: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now
    }
}

/// How an attempt on an instance ended, from the pool's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The connection was refused or could not be made: the instance is down. Ejected at once.
    Refused,
    /// Reset, timed out, or answered 502/503/504.
    Failed,
}

/// Per-pool metrics, registered once so the hot path does no label lookups.
#[derive(Debug)]
pub struct PoolMetrics {
    pub upstream_seconds: metrics::Histogram,
    pub errors: metrics::Counter,
    pub retries: metrics::Counter,
    ejections: metrics::Counter,
}

#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub config: PoolConfig,
    pub instances: Vec<Instance>,
    pub metrics: PoolMetrics,
    next: AtomicUsize,
}

impl Pool {
    pub fn new(name: &str, config: &PoolConfig) -> Pool {
        let instances = config.urls.iter().map(|u| Instance::new(u)).collect();
        let label = || name.to_string();
        let metrics = PoolMetrics {
            upstream_seconds: metrics::histogram!("pixmesh_gateway_upstream_seconds", "upstream" => label()),
            errors: metrics::counter!("pixmesh_gateway_upstream_errors_total", "upstream" => label()),
            retries: metrics::counter!("pixmesh_gateway_retries_total", "upstream" => label()),
            ejections: metrics::counter!("pixmesh_gateway_upstream_ejections_total", "upstream" => label()),
        };
        Pool { name: name.to_string(), config: config.clone(), instances, metrics, next: AtomicUsize::new(0) }
    }

    /// The next instance in round-robin order that is in service and not in `tried`. When every
    /// instance is ejected, the one whose ejection ends first is tried anyway (an ejected pool
    /// still answers something rather than refusing all traffic).
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let n = self.instances.len();
        let now = now_ms();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let fresh = |i: &usize| !tried.contains(i);
        (0..n)
            .map(|k| (start + k) % n)
            .filter(fresh)
            .find(|&i| !self.instances[i].ejected(now))
            .or_else(|| (0..n).filter(fresh).min_by_key(|&i| self.instances[i].ejected_until_ms.load(Ordering::Relaxed)))
    }

    pub fn record(&self, i: usize, outcome: Outcome) {
        let Some(instance) = self.instances.get(i) else { return };
        if outcome == Outcome::Ok {
            if instance.consecutive_failures.load(Ordering::Relaxed) != 0 || instance.ejections.load(Ordering::Relaxed) != 0 {
                instance.consecutive_failures.store(0, Ordering::Relaxed);
                instance.ejections.store(0, Ordering::Relaxed);
                instance.ejected_until_ms.store(0, Ordering::Relaxed);
            }
            return;
        }
        let failures = instance.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let now = now_ms();
        if (outcome == Outcome::Refused || failures >= self.config.eject_after.max(1)) && !instance.ejected(now) {
            let ejections = instance.ejections.fetch_add(1, Ordering::Relaxed).min(4);
            let backoff = self.config.eject_ms.saturating_mul(1 << ejections);
            instance.ejected_until_ms.store(now + backoff, Ordering::Relaxed);
            instance.consecutive_failures.store(0, Ordering::Relaxed);
            self.metrics.ejections.increment(1);
            tracing::warn!(upstream = %self.name, instance = %instance.base, ?outcome, backoff_ms = backoff, "upstream instance ejected");
        }
    }

    /// Instances in service now.
    pub fn healthy(&self) -> usize {
        let now = now_ms();
        self.instances.iter().filter(|i| !i.ejected(now)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize, eject_after: u32) -> Pool {
        let urls = (0..n).map(|i| format!("http://127.0.0.1:{}", 1000 + i)).collect();
        Pool::new("t", &PoolConfig { eject_after, eject_ms: 60_000, ..PoolConfig::of(urls) })
    }

    #[test]
    fn round_robin_skips_tried_and_ejected() {
        let p = pool(3, 2);
        let picks: Vec<usize> = (0..6).map(|_| p.pick(&[]).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        assert_eq!(p.pick(&[0, 1, 2]), None);
        p.record(1, Outcome::Refused);
        assert_eq!(p.healthy(), 2);
        assert!((0..10).all(|_| p.pick(&[]) != Some(1)));
        // Two ordinary failures in a row eject; a success in between resets the count.
        p.record(2, Outcome::Failed);
        p.record(2, Outcome::Ok);
        p.record(2, Outcome::Failed);
        assert_eq!(p.healthy(), 2);
        std::thread::sleep(Duration::from_millis(3)); // so the ejections end in a known order
        p.record(2, Outcome::Failed);
        assert_eq!(p.healthy(), 1);
        assert!((0..10).all(|_| p.pick(&[]) == Some(0)));
        // Everything ejected: still answer with the one back soonest.
        std::thread::sleep(Duration::from_millis(3));
        p.record(0, Outcome::Refused);
        assert_eq!(p.healthy(), 0);
        assert_eq!(p.pick(&[]), Some(1), "ejected first, back first");
        assert_eq!(p.pick(&[1]), Some(2));
        // A success brings an instance back at once.
        p.record(0, Outcome::Ok);
        assert_eq!(p.healthy(), 1);
    }

    #[test]
    fn ejection_backs_off() {
        let p = pool(1, 1);
        p.record(0, Outcome::Failed);
        let first = p.instances[0].ejected_until_ms.load(Ordering::Relaxed) - now_ms();
        p.instances[0].ejected_until_ms.store(0, Ordering::Relaxed); // as if the time had passed
        p.record(0, Outcome::Failed);
        let second = p.instances[0].ejected_until_ms.load(Ordering::Relaxed) - now_ms();
        assert!(second > first + 50_000, "{first} then {second}");
    }
}
