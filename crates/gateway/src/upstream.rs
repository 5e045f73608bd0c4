//! Upstream pools: instances picked round-robin, failing ones ejected passively (from the
//! answers real requests get, no probes) and let back after a backoff; keep-alive connection
//! pools to HTTP/1.1 and h2c upstreams, shared by every configuration generation.
//!
//! Two limits keep an overloaded pool from being made worse by the gateway:
//! - **Connection slots per instance** (`max_connections`): a request holds one of its
//!   instance's slots from before it is sent until its response body is done, so at most that
//!   many connections are busy at once and the instance is not flooded with connects when
//!   answers slow down. hyper's pool has no such cap (`pool_max_idle_per_host` bounds only idle
//!   connections), hence the semaphore. A connection that hyper opens while racing a checkout
//!   it then loses goes idle and is reused, so the open connections stay near the cap.
//! - **The ejection cap** (`max_ejection_percent`): at most that share of the instances is out
//!   at once, and never the last one in service. An overloaded upstream refuses connections or
//!   answers 503; ejecting for that moves its load onto fewer instances (or, for a pool of one,
//!   onto none) and turns an overload into an outage.

use crate::config::PoolConfig;
use axum::body::Body;
use http::Uri;
use http::uri::{Authority, PathAndQuery, Scheme};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use pixmesh_chassis::{ApiError, ErrorCode};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What the pools connect with: TCP, and TLS for `https://` instances.
pub type Connector = HttpsConnector<HttpConnector>;

/// The connection pools. Built once per process: a reload keeps every open upstream connection.
/// `https://` instances are reached over TLS with `[gateway.client_tls]` (its settings read at
/// start, its files re-read when they change).
#[derive(Clone)]
pub struct Clients {
    http1: Client<Connector, Body>,
    h2c: Client<Connector, Body>,
}

impl Clients {
    /// `config`: the TLS for `https://` instances (`[gateway.client_tls]`).
    pub fn new(config: rustls::ClientConfig) -> Clients {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        connector.enforce_http(false);
        let http1_connector =
            HttpsConnectorBuilder::new().with_tls_config(config.clone()).https_or_http().enable_http1().wrap_connector(connector.clone());
        // HTTP/2 only: h2c with prior knowledge to http:// instances, h2 by ALPN to https:// ones.
        let h2_connector = HttpsConnectorBuilder::new().with_tls_config(config).https_or_http().enable_http2().wrap_connector(connector);
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .build(http1_connector);
        let h2c = Client::builder(TokioExecutor::new()).http2_only(true).pool_idle_timeout(Duration::from_secs(60)).build(h2_connector);
        Clients { http1, h2c }
    }

    pub fn for_pool(&self, pool: &Pool) -> &Client<Connector, Body> {
        if pool.config.h2c { &self.h2c } else { &self.http1 }
    }
}

/// Milliseconds since the first call, for lock-free ejection deadlines.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

#[derive(Debug)]
pub struct Instance {
    /// `http://host:port` or `https://…` (with any base path), no trailing slash.
    pub base: String,
    scheme: Scheme,
    authority: Option<Authority>,
    /// A path in the URL, put before every forwarded path.
    base_path: String,
    consecutive_failures: AtomicU32,
    /// Ejections in a row without a success in between (for the backoff).
    ejections: AtomicU32,
    /// 0 when in service.
    ejected_until_ms: AtomicU64,
    /// Requests in flight to this instance (`max_connections`).
    slots: Arc<Semaphore>,
}

impl Instance {
    fn new(url: &str, max_connections: u32) -> Instance {
        let base = url.trim_end_matches('/').to_string();
        let parsed = base.parse::<Uri>().ok();
        let authority = parsed.as_ref().and_then(|u| u.authority().cloned());
        let scheme = if parsed.as_ref().and_then(|u| u.scheme()) == Some(&Scheme::HTTPS) { Scheme::HTTPS } else { Scheme::HTTP };
        let base_path = parsed.as_ref().map(|u| u.path().trim_end_matches('/').to_string()).unwrap_or_default();
        Instance {
            base,
            scheme,
            authority,
            base_path,
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            slots: Arc::new(Semaphore::new(max_connections as usize)),
        }
    }

    /// A connection slot now, if one is free.
    pub fn try_slot(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.slots).try_acquire_owned().ok()
    }

    /// A connection slot, waiting (first come first served) until one is free.
    pub async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.slots).acquire_owned().await.ok()
    }

    /// Connection slots free now.
    pub fn free_slots(&self) -> usize {
        self.slots.available_permits()
    }

    /// The URI of `path_and_query` on this instance.
    pub fn uri(&self, path_and_query: &PathAndQuery) -> Result<Uri, ApiError> {
        let bad = |e: http::Error| ApiError::new(ErrorCode::BadRequest, format!("cannot forward this path: {e}"));
        let authority =
            self.authority.clone().ok_or_else(|| ApiError::new(ErrorCode::Internal, format!("upstream {} has no host", self.base)))?;
        let builder = Uri::builder().scheme(self.scheme.clone()).authority(authority);
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
    /// Requests that found every connection slot of their instance taken and had to wait.
    pub slot_waits: metrics::Counter,
    /// Requests refused because no slot freed up within the route's timeout.
    pub saturated: metrics::Counter,
    ejections: metrics::Counter,
    /// Ejections not done because of `max_ejection_percent` or the last instance in service.
    ejections_capped: metrics::Counter,
}

#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub config: PoolConfig,
    pub instances: Vec<Instance>,
    pub metrics: PoolMetrics,
    next: AtomicUsize,
    /// Taken only to decide an ejection (rare), so two cannot both pass the cap at once.
    ejecting: Mutex<()>,
}

impl Pool {
    pub fn new(name: &str, config: &PoolConfig) -> Pool {
        let instances = config.urls.iter().map(|u| Instance::new(u, config.max_connections)).collect();
        let label = || name.to_string();
        let metrics = PoolMetrics {
            upstream_seconds: metrics::histogram!(crate::instruments::HTTP_CLIENT_REQUEST_DURATION, "upstream" => label()),
            errors: metrics::counter!(crate::instruments::UPSTREAM_ERRORS, "upstream" => label()),
            retries: metrics::counter!(crate::instruments::RETRIES, "upstream" => label()),
            slot_waits: metrics::counter!(crate::instruments::UPSTREAM_SLOT_WAITS, "upstream" => label()),
            saturated: metrics::counter!(crate::instruments::UPSTREAM_SATURATED, "upstream" => label()),
            ejections: metrics::counter!(crate::instruments::UPSTREAM_EJECTIONS, "upstream" => label()),
            ejections_capped: metrics::counter!(crate::instruments::UPSTREAM_EJECTIONS_CAPPED, "upstream" => label()),
        };
        Pool { name: name.to_string(), config: config.clone(), instances, metrics, next: AtomicUsize::new(0), ejecting: Mutex::new(()) }
    }

    /// The next instance in round-robin order that is in service and not in `tried`, preferring
    /// one with a free connection slot. When every instance is ejected, the one whose ejection
    /// ends first is tried anyway (an ejected pool still answers something rather than refusing
    /// all traffic).
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let n = self.instances.len();
        let now = now_ms();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let fresh = |i: &usize| !tried.contains(i);
        let in_service = || (0..n).map(|k| (start + k) % n).filter(fresh).filter(|&i| !self.instances[i].ejected(now));
        in_service()
            .find(|&i| self.instances[i].free_slots() > 0)
            .or_else(|| in_service().next())
            .or_else(|| (0..n).filter(fresh).min_by_key(|&i| self.instances[i].ejected_until_ms.load(Ordering::Relaxed)))
    }

    /// How many instances may be out at once: `max_ejection_percent` of them, rounded down,
    /// and never all of them.
    fn max_ejected(&self) -> usize {
        let n = self.instances.len();
        (n * self.config.max_ejection_percent.min(100) as usize / 100).min(n.saturating_sub(1))
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
        if !(outcome == Outcome::Refused || failures >= self.config.eject_after.max(1)) || instance.ejected(now_ms()) {
            return;
        }
        let _deciding = self.ejecting.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = now_ms();
        if instance.ejected(now) {
            return; // another request ejected it meanwhile
        }
        // Counting again from zero either way: a capped instance is judged afresh after another
        // `eject_after` failures instead of taking this lock on every one.
        instance.consecutive_failures.store(0, Ordering::Relaxed);
        let out = self.instances.iter().filter(|x| x.ejected(now)).count();
        if out >= self.max_ejected() {
            self.metrics.ejections_capped.increment(1);
            tracing::debug!(upstream = %self.name, instance = %instance.base, ?outcome, out, "not ejected: the pool's ejection cap is reached");
            return;
        }
        let ejections = instance.ejections.fetch_add(1, Ordering::Relaxed).min(4);
        let backoff = self.config.eject_ms.saturating_mul(1 << ejections);
        instance.ejected_until_ms.store(now + backoff, Ordering::Relaxed);
        self.metrics.ejections.increment(1);
        tracing::warn!(upstream = %self.name, instance = %instance.base, ?outcome, backoff_ms = backoff, "upstream instance ejected");
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

    fn pool_with(n: usize, eject_after: u32, max_ejection_percent: u32) -> Pool {
        let urls = (0..n).map(|i| format!("http://127.0.0.1:{}", 1000 + i)).collect();
        Pool::new("t", &PoolConfig { eject_after, eject_ms: 60_000, max_ejection_percent, ..PoolConfig::of(urls) })
    }

    fn pool(n: usize, eject_after: u32) -> Pool {
        pool_with(n, eject_after, 100)
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
        p.record(2, Outcome::Failed);
        assert_eq!(p.healthy(), 1);
        assert!((0..10).all(|_| p.pick(&[]) == Some(0)));
        // The last instance in service is never ejected, even at 100 %.
        p.record(0, Outcome::Refused);
        assert_eq!(p.healthy(), 1);
        assert!((0..10).all(|_| p.pick(&[]) == Some(0)));
        // Once it has been tried, the ejected ones are tried anyway, the one back soonest first.
        assert_eq!(p.pick(&[0]), Some(1), "ejected first, back first");
        assert_eq!(p.pick(&[0, 1]), Some(2));
        // A success brings an instance back at once.
        p.record(1, Outcome::Ok);
        assert_eq!(p.healthy(), 2);
    }

    #[test]
    fn the_only_instance_is_never_ejected() {
        for percent in [0, 50, 100] {
            let p = pool_with(1, 1, percent);
            for outcome in [Outcome::Refused, Outcome::Failed, Outcome::Refused] {
                p.record(0, outcome);
                assert_eq!(p.healthy(), 1, "{outcome:?} at {percent} %");
            }
            assert_eq!(p.pick(&[]), Some(0));
        }
    }

    #[test]
    fn at_most_max_ejection_percent_of_a_pool_is_out() {
        // Four instances, all refusing (an overloaded upstream): half may go, never more.
        let p = pool_with(4, 5, 50);
        for _ in 0..3 {
            for i in 0..4 {
                p.record(i, Outcome::Refused);
            }
        }
        assert_eq!(p.healthy(), 2);
        let picked: std::collections::BTreeSet<usize> = (0..8).filter_map(|_| p.pick(&[])).collect();
        assert_eq!(picked, [2, 3].into(), "traffic goes to the two left in service");
        // One comes back (a success): another may now be ejected, so still two out.
        p.record(0, Outcome::Ok);
        assert_eq!(p.healthy(), 3);
        p.record(3, Outcome::Refused);
        assert_eq!(p.healthy(), 2);
        p.record(2, Outcome::Refused);
        assert_eq!(p.healthy(), 2, "the cap holds");
        // 25 % of four is one; 0 % ejects nothing; 10 % of four rounds down to nothing.
        for (percent, out) in [(25, 1), (0, 0), (10, 0), (75, 3), (100, 3)] {
            let p = pool_with(4, 1, percent);
            for i in 0..4 {
                p.record(i, Outcome::Failed);
            }
            assert_eq!(4 - p.healthy(), out, "{percent} %");
        }
    }

    #[test]
    fn ejections_from_many_threads_respect_the_cap() {
        let p = Arc::new(pool_with(8, 1, 50));
        std::thread::scope(|s| {
            for t in 0..8 {
                let p = Arc::clone(&p);
                s.spawn(move || {
                    for k in 0..100 {
                        p.record((t + k) % 8, Outcome::Refused);
                    }
                });
            }
        });
        assert_eq!(p.healthy(), 4);
    }

    #[tokio::test]
    async fn instances_with_a_free_connection_slot_are_picked_first() {
        let urls = (0..2).map(|i| format!("http://127.0.0.1:{}", 1000 + i)).collect();
        let p = Pool::new("t", &PoolConfig { max_connections: 2, ..PoolConfig::of(urls) });
        let held: Vec<_> = (0..2).map(|_| p.instances[0].try_slot().unwrap()).collect();
        assert!(p.instances[0].try_slot().is_none(), "two connections at most");
        assert!((0..6).all(|_| p.pick(&[]) == Some(1)), "the full instance is skipped while the other has room");
        let other: Vec<_> = (0..2).map(|_| p.instances[1].try_slot().unwrap()).collect();
        // Both full: round-robin again; the request will wait for a slot on its instance.
        let picked: std::collections::BTreeSet<usize> = (0..4).filter_map(|_| p.pick(&[])).collect();
        assert_eq!(picked.len(), 2);
        drop(held);
        assert_eq!(p.instances[0].free_slots(), 2);
        assert!(p.instances[0].slot().await.is_some());
        drop(other);
    }

    #[test]
    fn ejection_backs_off() {
        let p = pool(2, 1);
        p.record(0, Outcome::Failed);
        let first = p.instances[0].ejected_until_ms.load(Ordering::Relaxed) - now_ms();
        p.instances[0].ejected_until_ms.store(0, Ordering::Relaxed); // as if the time had passed
        p.record(0, Outcome::Failed);
        let second = p.instances[0].ejected_until_ms.load(Ordering::Relaxed) - now_ms();
        assert!(second > first + 50_000, "{first} then {second}");
    }
}
