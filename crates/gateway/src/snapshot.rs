//! One generation of the gateway's configuration, ready to serve: routes with their pools,
//! admission limits and metrics, and the API keys with their rate limiters.
//!
//! A reload builds a new [`Snapshot`] and swaps it in atomically. Each request pins the
//! snapshot current when it arrived (see `layers::pin`), so a reload never changes the rules
//! under a request in flight, and no connection is dropped. State that must outlive a reload
//! (rate limiter cells, admission slots and waiters, upstream connection slots, ejections) is
//! carried over where its settings did not change.

use crate::config::GatewayConfig;
use crate::keys::{ApiKeys, quota};
use crate::layers::admission::{Admission, AdmissionMetrics};
use crate::mirror::Mirror;
use crate::sniff::Format;
use crate::split::Split;
use crate::upstream::Pool;
use arc_swap::ArcSwap;
use governor::clock::DefaultClock;
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};
use http::Method;
use metrics::{Counter, Histogram};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// Limits on an image body, after per-key overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLimits {
    pub max_pixels: u64,
    pub max_side: u32,
    pub formats: Vec<Format>,
    pub probe_bytes: usize,
    /// The largest output an upload on this route may ask for.
    pub max_output_pixels: u64,
    pub max_output_side: u32,
}

/// Per-route request metrics, registered once so the hot path does no label lookups.
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    /// Indexed by status class: 1xx … 5xx.
    pub by_class: [Counter; 5],
    pub seconds: Histogram,
}

impl RouteMetrics {
    pub fn new(route: &str) -> RouteMetrics {
        let class =
            |c: &'static str| metrics::counter!(crate::instruments::RESPONSES, "http_route" => route.to_string(), "status_class" => c);
        RouteMetrics {
            by_class: [class("1xx"), class("2xx"), class("3xx"), class("4xx"), class("5xx")],
            seconds: metrics::histogram!(crate::instruments::HTTP_SERVER_REQUEST_DURATION, "http_route" => route.to_string()),
        }
    }
}

/// Gateway-wide counters, registered once.
#[derive(Debug, Clone)]
pub struct GatewayMetrics {
    pub auth_ok: Counter,
    pub auth_refused: Counter,
}

impl GatewayMetrics {
    fn new() -> GatewayMetrics {
        GatewayMetrics {
            auth_ok: metrics::counter!(crate::instruments::AUTH, "outcome" => "ok"),
            auth_refused: metrics::counter!(crate::instruments::AUTH, "outcome" => "refused"),
        }
    }
}

#[derive(Debug)]
pub struct Route {
    pub prefix: String,
    pub strip_prefix: bool,
    pub rewrite_prefix: Option<String>,
    pub methods: Vec<Method>,
    pub timeout: Duration,
    pub max_body_bytes: u64,
    pub image: Option<ImageLimits>,
    /// The upstream (with a split: its heaviest target, for what is per route).
    pub pool: Arc<Pool>,
    /// A weighted split across upstreams, when the route has one.
    pub split: Option<Split>,
    /// A shadow upstream that gets a copy of some requests.
    pub mirror: Option<Arc<Mirror>>,
    /// Slots (`max_in_flight`) and waiters; kept over reloads that keep `max_in_flight`.
    pub admission: Arc<Admission>,
    /// Requests that may wait for a slot, and for how long (this generation's settings).
    pub max_queue: u32,
    pub max_queue_wait: Duration,
    pub admission_metrics: AdmissionMetrics,
    pub metrics: RouteMetrics,
}

impl Route {
    /// Every pool this route sends to.
    pub fn pools(&self) -> impl Iterator<Item = &Arc<Pool>> {
        std::iter::once(&self.pool).chain(self.split.iter().flat_map(Split::pools)).chain(self.mirror.iter().map(|m| &m.pool))
    }

    /// The pool for this request: the split's pick, or the one upstream.
    pub fn pick_pool(&self, client: Option<&str>, peer: IpAddr) -> &Arc<Pool> {
        match &self.split {
            Some(split) => split.pick(client, peer),
            None => &self.pool,
        }
    }

    fn matches(&self, path: &str) -> bool {
        let p = self.prefix.trim_end_matches('/');
        p.is_empty() || path == p || path.strip_prefix(p).is_some_and(|rest| rest.starts_with('/'))
    }

    /// The path to send upstream.
    pub fn upstream_path(&self, path: &str) -> String {
        let rest = if self.strip_prefix { path.get(self.prefix.trim_end_matches('/').len()..).unwrap_or("") } else { path };
        let mut out = self.rewrite_prefix.as_deref().map(|p| p.trim_end_matches('/').to_string()).unwrap_or_default();
        if !rest.starts_with('/') {
            out.push('/');
        }
        out.push_str(rest);
        out
    }
}

pub type AnonymousLimiter = RateLimiter<IpAddr, HashMapStateStore<IpAddr>, DefaultClock>;

pub struct Snapshot {
    /// Longest prefix first.
    pub routes: Vec<Arc<Route>>,
    pub keys: ApiKeys,
    pub require_api_key: bool,
    pub access_log: bool,
    /// Per client address, for requests without a key (keys not required, or a signed URL).
    pub anonymous: Option<(Quota, Arc<AnonymousLimiter>)>,
    /// Checks signed URLs (`None`: no signing keys, no signed URLs).
    pub signer: Option<Arc<pixmesh_chassis::signed_url::Signer>>,
    /// Metrics for requests that match no route.
    pub unrouted: RouteMetrics,
    pub metrics: GatewayMetrics,
    /// For the reload log.
    pub summary: String,
}

impl Snapshot {
    /// Builds a generation from `config` and `keys`, carrying over pools (with their ejections
    /// and connection slots) and admission state from `previous` where their settings are
    /// unchanged.
    pub fn build(config: &GatewayConfig, keys: ApiKeys, previous: Option<&Snapshot>) -> Result<Snapshot, String> {
        let mut pools: BTreeMap<&str, Arc<Pool>> = BTreeMap::new();
        for (name, upstream) in &config.upstreams {
            let pc = upstream.pool();
            let old = previous.and_then(|p| p.routes.iter().flat_map(|r| r.pools()).find(|pool| pool.name == *name && pool.config == pc));
            pools.insert(name, old.cloned().unwrap_or_else(|| Arc::new(Pool::new(name, &pc))));
        }
        let mut routes = Vec::new();
        for r in &config.routes {
            let named = |name: &str| {
                pools.get(name).cloned().ok_or_else(|| format!("route {} names upstream {name:?}, which has no URL", r.prefix))
            };
            let split = if r.split.is_empty() {
                None
            } else {
                let targets = r.split.iter().map(|(name, w)| Ok((named(name)?, *w))).collect::<Result<Vec<_>, String>>()?;
                Some(Split::new(&r.prefix, targets, r.split_by))
            };
            let pool = match split.as_ref().and_then(Split::heaviest) {
                Some(heaviest) => Arc::clone(heaviest),
                None => named(&r.upstream)?,
            };
            let mirror = match &r.mirror {
                Some(m) => Some(Arc::new(Mirror::new(&r.prefix, named(&m.upstream)?, m))),
                None => None,
            };
            let max_in_flight = r.max_in_flight.unwrap_or(config.max_in_flight);
            let max_streams = r.max_streams.unwrap_or(config.max_streams);
            // Requests admitted or waiting under the previous generation still count; a new
            // `max_in_flight` or `max_streams` starts afresh (the old requests finish under
            // their old limit).
            let admission = previous
                .and_then(|p| {
                    p.routes.iter().find(|o| {
                        o.prefix == r.prefix && o.admission.max_in_flight() == max_in_flight && o.admission.max_streams() == max_streams
                    })
                })
                .map(|o| Arc::clone(&o.admission))
                .unwrap_or_else(|| Arc::new(Admission::new(max_in_flight, max_streams)));
            let image = r.image.as_ref().map(|i| ImageLimits {
                max_pixels: i.max_pixels,
                max_side: i.max_side,
                formats: i.formats.iter().filter_map(|f| Format::from_name(f)).collect(),
                probe_bytes: i.probe_bytes as usize,
                max_output_pixels: if i.max_output_pixels == 0 { i.max_pixels } else { i.max_output_pixels },
                max_output_side: if i.max_output_side == 0 { i.max_side } else { i.max_output_side },
            });
            routes.push(Arc::new(Route {
                prefix: r.prefix.clone(),
                strip_prefix: r.strip_prefix,
                rewrite_prefix: r.rewrite_prefix.clone(),
                methods: r.methods.iter().filter_map(|m| Method::from_bytes(m.as_bytes()).ok()).collect(),
                timeout: Duration::from_millis(r.timeout_ms.unwrap_or(config.timeout_ms)),
                max_body_bytes: r.max_body_bytes.unwrap_or(config.max_body_bytes),
                image,
                pool,
                split,
                mirror,
                admission,
                max_queue: r.max_queue.unwrap_or(config.max_queue),
                max_queue_wait: Duration::from_millis(r.max_queue_ms.unwrap_or(config.max_queue_ms)),
                admission_metrics: AdmissionMetrics::new(&r.prefix),
                metrics: RouteMetrics::new(&r.prefix),
            }));
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        // Requests without a key: when keys are optional, and those with a signed URL.
        let keyless = !config.require_api_key || !config.signed_urls.keys.is_empty();
        let anonymous = match (!keyless, quota(&config.rate, config.burst)?) {
            (false, Some(q)) => Some(
                previous
                    .and_then(|p| p.anonymous.clone())
                    .filter(|(old, _)| *old == q)
                    .unwrap_or_else(|| (q, Arc::new(RateLimiter::hashmap(q)))),
            ),
            _ => None,
        };
        let summary = format!(
            "{} routes, {} upstreams, {} keys, keys {}, rate {} burst {}",
            routes.len(),
            pools.len(),
            keys.len(),
            if config.require_api_key { "required" } else { "optional" },
            config.rate,
            config.burst
        );
        Ok(Snapshot {
            routes,
            keys,
            require_api_key: config.require_api_key,
            access_log: config.access_log,
            anonymous,
            signer: pixmesh_chassis::signed_url::Signer::new(&config.signed_urls).map(Arc::new),
            unrouted: RouteMetrics::new("none"),
            metrics: GatewayMetrics::new(),
            summary,
        })
    }

    pub fn find(&self, path: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.matches(path))
    }
}

/// The current generation, swapped atomically on reload.
pub type Shared = Arc<ArcSwap<Snapshot>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RouteConfig, UpstreamConfig};

    fn config() -> GatewayConfig {
        let mut c = GatewayConfig::default();
        c.upstreams.insert("upload".into(), UpstreamConfig::Url("http://127.0.0.1:1".into()));
        c.upstreams.insert("status".into(), UpstreamConfig::Url("http://127.0.0.1:2/".into()));
        c.upstreams.insert("legacy".into(), UpstreamConfig::Url("http://127.0.0.1:3".into()));
        c.routes.push(RouteConfig {
            strip_prefix: true,
            rewrite_prefix: Some("/v2".into()),
            max_in_flight: Some(3),
            max_queue: Some(1),
            ..RouteConfig::new("/legacy/", "legacy")
        });
        c
    }

    #[test]
    fn matches_on_segment_boundaries_longest_first_and_rewrites() {
        let s = Snapshot::build(&config(), ApiKeys::default(), None).unwrap();
        let check = |path: &str, expected: Option<&str>| assert_eq!(s.find(path).map(|x| x.pool.name.as_str()), expected, "{path}");
        check("/api/upload", Some("upload"));
        check("/api/status/123", Some("status"));
        check("/api/result/123", Some("status"));
        check("/api/statuses", None);
        check("/legacy", Some("legacy"));
        check("/legacy/a/b", Some("legacy"));
        check("/", None);
        assert_eq!(s.find("/api/status/1").unwrap().pool.instances[0].base, "http://127.0.0.1:2");
        let legacy = s.find("/legacy/a").unwrap();
        assert_eq!(legacy.upstream_path("/legacy/a/b"), "/v2/a/b");
        assert_eq!(legacy.upstream_path("/legacy"), "/v2/");
        assert_eq!(s.find("/api/status/1").unwrap().upstream_path("/api/status/1"), "/api/status/1");
        assert!(s.find("/api/upload").unwrap().image.is_some());
    }

    #[test]
    fn a_reload_keeps_unchanged_pools_and_admission() {
        let first = Snapshot::build(&config(), ApiKeys::default(), None).unwrap();
        let held = first.find("/legacy/x").unwrap().admission.try_admit().unwrap();
        let mut queue_changed = config();
        queue_changed.routes.last_mut().unwrap().max_queue = Some(7);
        queue_changed.routes.last_mut().unwrap().max_queue_ms = Some(20);
        let second = Snapshot::build(&queue_changed, ApiKeys::default(), Some(&first)).unwrap();
        let legacy = second.find("/legacy/x").unwrap();
        assert_eq!(legacy.admission.available(), 2, "the slot taken before the reload still counts");
        assert_eq!((legacy.max_queue, legacy.max_queue_wait), (7, Duration::from_millis(20)), "the new queue settings apply");
        assert!(Arc::ptr_eq(&legacy.pool, &first.find("/legacy/x").unwrap().pool));
        assert_eq!(first.find("/api/status/1").unwrap().max_queue, 128, "the gateway's default");
        drop(held);
        let mut changed = config();
        changed.upstreams.insert("legacy".into(), UpstreamConfig::Url("http://127.0.0.1:4".into()));
        changed.routes.last_mut().unwrap().max_in_flight = Some(5);
        let third = Snapshot::build(&changed, ApiKeys::default(), Some(&second)).unwrap();
        let legacy = third.find("/legacy/x").unwrap();
        assert_eq!(legacy.pool.instances[0].base, "http://127.0.0.1:4");
        assert_eq!(legacy.admission.available(), 5);
    }
}
