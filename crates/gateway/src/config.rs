//! Gateway configuration: upstream pools by name, routes by path prefix, API keys and the
//! default limits every route and key starts from. All of it can be reloaded while serving
//! (SIGHUP or a change of the config or keys file), except the listen addresses.

use crate::sniff::Format;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Upstream pools by name: a URL, a list of URLs, or a table (see [`UpstreamConfig`]).
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// Routes, matched by longest path prefix.
    pub routes: Vec<RouteConfig>,
    /// Refuse requests without a known `X-API-KEY` (401).
    pub require_api_key: bool,
    /// API keys, stored as SHA-256 hashes.
    pub api_keys: Vec<ApiKeyConfig>,
    /// A TOML file with more keys (`[[keys]] name = "…" sha256 = "…"`, plus optional limits).
    pub api_keys_file: Option<PathBuf>,
    /// Rate limit of a key that sets none: `"N/s"`, `"N/m"` or `"N/h"`; `"off"` for none.
    pub rate: String,
    /// Requests a key may send at once above its rate (GCRA burst).
    pub burst: u32,
    /// Default per-route body limit.
    pub max_body_bytes: u64,
    /// Default per-route upstream timeout (until the response headers arrive).
    pub timeout_ms: u64,
    /// Default per-route admission limit: requests in flight to the upstream at once. More
    /// wait in the route's queue (see `max_queue`), and past it get a fast 503.
    pub max_in_flight: u32,
    /// Default per-route queue length: requests that wait for one of the `max_in_flight` slots.
    /// Past it a request gets 503 `unavailable` with `Retry-After` at once. 0: no queue.
    pub max_queue: u32,
    /// Default per-route queue time: a request that waited this long for a slot gets the 503.
    pub max_queue_ms: u64,
    /// Default per-route limit on event streams (`Accept: text/event-stream`) open at once.
    /// They do not take `max_in_flight` slots (a stream is held for minutes), nor connection
    /// slots of the upstream instance: this is their bound. Past it a new stream gets a 503.
    pub max_streams: u32,
    /// One log line per request (target `pixmesh_gateway::access`).
    pub access_log: bool,
    /// Reload when the config file or the keys file changes (checked every second).
    pub watch_files: bool,
    pub drain_grace_ms: u64,
    /// Header-read and idle timeouts, the connection cap and request size limits of the public
    /// listener (`[gateway.connections]`). Read at start; a reload does not change them.
    pub connections: pixmesh_chassis::serve::ConnectionLimits,
    /// Signing keys for result URLs that work without an API key (`[gateway.signed_urls]`).
    /// The upload and status services sign with them; the gateway checks.
    pub signed_urls: pixmesh_chassis::signed_url::SignedUrlConfig,
    /// What `GET /api/cluster` composes (`[gateway.cluster]`). Read at start.
    pub cluster: crate::cluster::ClusterConfig,
    /// TLS on the public listener (`[gateway.tls]`): certificate files (reloaded when they
    /// change) and client certificates. Without a certificate the listener speaks plain HTTP.
    pub tls: pixmesh_chassis::tls::TlsConfig,
    /// TLS to `https://` upstreams and admin ports (`[gateway.client_tls]`): the CA their
    /// certificates chain to (the system's roots when unset) and the gateway's own certificate
    /// for mTLS. Read at start.
    pub client_tls: pixmesh_chassis::tls::ClientTlsConfig,
}

/// An upstream pool: `"http://a:1"`, `["http://a:1", "http://b:1"]`, or
/// `{ urls = [...], h2c = true, eject_after = 5, eject_ms = 5000, max_connections = 1024,
/// max_ejection_percent = 50 }`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum UpstreamConfig {
    Url(String),
    Urls(Vec<String>),
    Pool(PoolConfig),
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub urls: Vec<String>,
    /// Speak HTTP/2 with prior knowledge (h2c) to these instances instead of HTTP/1.1.
    #[serde(default)]
    pub h2c: bool,
    /// Consecutive failures (5xx from the gateway's view: refused, reset, timed out, 502/503/504)
    /// that eject an instance. A refused connection ejects at once.
    #[serde(default = "default_eject_after")]
    pub eject_after: u32,
    /// First ejection time; doubled on each ejection in a row, up to 16×.
    #[serde(default = "default_eject_ms")]
    pub eject_ms: u64,
    /// Requests in flight to one instance at once. Over HTTP/1.1 each holds one connection, so
    /// this caps the connections (and the connects) the gateway opens to an instance; over h2c
    /// it caps the streams on the instance's one connection. A request that finds every slot
    /// taken waits for one within its route's `timeout_ms`, then gets 503.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// At most this share of the pool's instances is ejected at once (as Envoy's
    /// `max_ejection_percent`), rounded down, and never the last instance in service: an
    /// overloaded pool that refuses connections keeps its instances rather than losing them all.
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: u32,
}

fn default_eject_after() -> u32 {
    5
}
fn default_eject_ms() -> u64 {
    5_000
}
// As Envoy's per-cluster default, and four times a route's default `max_in_flight`: a safety cap
// against connection floods that the routes' own limits reach first, so overload is shed at
// the route's queue (fast) rather than by waiting for a connection (within the route timeout).
fn default_max_connections() -> u32 {
    1024
}
fn default_max_ejection_percent() -> u32 {
    50
}

impl UpstreamConfig {
    pub fn pool(&self) -> PoolConfig {
        match self {
            UpstreamConfig::Url(url) => PoolConfig::of(vec![url.clone()]),
            UpstreamConfig::Urls(urls) => PoolConfig::of(urls.clone()),
            UpstreamConfig::Pool(p) => p.clone(),
        }
    }
}

impl PoolConfig {
    pub fn of(urls: Vec<String>) -> PoolConfig {
        PoolConfig {
            urls,
            h2c: false,
            eject_after: default_eject_after(),
            eject_ms: default_eject_ms(),
            max_connections: default_max_connections(),
            max_ejection_percent: default_max_ejection_percent(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Path prefix, matched on segment boundaries: `/api/status` matches `/api/status/1`
    /// but not `/api/statuses`.
    pub prefix: String,
    /// Name of an entry in `upstreams` (or give `split`).
    #[serde(default)]
    pub upstream: String,
    /// A weighted split across upstreams instead of one: `{ legacy = 90, new = 10 }` sends
    /// about a tenth of the route's requests to `new` (a canary, or a strangler migration one
    /// route at a time; a reload changes the weights).
    #[serde(default)]
    pub split: BTreeMap<String, u32>,
    /// How the split picks: `random` per request, or `client`: the same API key (or, without
    /// one, the same client address) always goes to the same upstream while the weights stay.
    #[serde(default)]
    pub split_by: SplitBy,
    /// A copy of some requests to a shadow upstream, whose answers are ignored.
    #[serde(default)]
    pub mirror: Option<MirrorConfig>,
    /// Remove the prefix before forwarding (`/legacy/a` → `/a`).
    #[serde(default)]
    pub strip_prefix: bool,
    /// Put this in front of the forwarded path (after stripping), e.g. `/v2`.
    #[serde(default)]
    pub rewrite_prefix: Option<String>,
    /// Allowed methods; empty allows all.
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// Admission: requests in flight to the upstream at once (the gateway's `max_in_flight`).
    #[serde(default)]
    pub max_in_flight: Option<u32>,
    /// Requests waiting for a slot (the gateway's `max_queue`).
    #[serde(default)]
    pub max_queue: Option<u32>,
    /// The longest wait for a slot (the gateway's `max_queue_ms`).
    #[serde(default)]
    pub max_queue_ms: Option<u64>,
    /// Event streams open at once (the gateway's `max_streams`).
    #[serde(default)]
    pub max_streams: Option<u32>,
    /// Image uploads: the body must be an image of an allowed format within these limits,
    /// checked from its header bytes before anything is forwarded.
    #[serde(default)]
    pub image: Option<ImageLimitsConfig>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SplitBy {
    #[default]
    Random,
    Client,
}

/// `mirror = { upstream = "shadow", percent = 10 }`: the shadow gets a copy of that share of
/// the route's requests. The client's response never waits for it, and nothing the shadow does
/// (slow, failing, gone) reaches the client. A request's body is copied while it streams to the
/// primary, up to `max_body_bytes`; a larger one is not mirrored. At most `max_in_flight`
/// copies are outstanding (more are skipped, never queued), each for at most `timeout_ms`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    pub upstream: String,
    /// The share mirrored, 0–100 (fractions allowed: `0.5`), kept as parts per million.
    #[serde(rename = "percent", deserialize_with = "percent_as_ppm")]
    pub ppm: u32,
    #[serde(default = "MirrorConfig::default_max_body_bytes")]
    pub max_body_bytes: u64,
    #[serde(default = "MirrorConfig::default_max_in_flight")]
    pub max_in_flight: u32,
    #[serde(default = "MirrorConfig::default_timeout_ms")]
    pub timeout_ms: u64,
}

impl MirrorConfig {
    fn default_max_body_bytes() -> u64 {
        1024 * 1024
    }
    fn default_max_in_flight() -> u32 {
        64
    }
    fn default_timeout_ms() -> u64 {
        10_000
    }
}

fn percent_as_ppm<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let percent = f64::deserialize(d)?;
    if !(0.0..=100.0).contains(&percent) {
        return Err(serde::de::Error::custom(format!("percent {percent} must be between 0 and 100")));
    }
    Ok((percent * 10_000.0).round() as u32)
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ImageLimitsConfig {
    pub max_pixels: u64,
    pub max_side: u32,
    /// Allowed formats: any of jpeg, png, webp, gif, bmp.
    pub formats: Vec<String>,
    /// The most bytes held back while looking for the image header (a JPEG's EXIF and ICC
    /// segments come before its size). An upload not decided within them is forwarded as it
    /// streams while the guard reads on to its header; if that is then refused, the forwarded
    /// body is cut before its end.
    pub probe_bytes: u32,
    /// The largest output an upload may ask for (pixels, longest side); 0 means the same as
    /// `max_pixels` / `max_side`. The upload service refuses bigger requests with 413.
    pub max_output_pixels: u64,
    pub max_output_side: u32,
}

impl Default for ImageLimitsConfig {
    fn default() -> Self {
        ImageLimitsConfig {
            max_pixels: 16_000_000,
            max_side: 8192,
            formats: ["jpeg", "png", "webp", "gif"].map(String::from).to_vec(),
            probe_bytes: 256 * 1024,
            max_output_pixels: 0,
            max_output_side: 0,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    pub name: String,
    /// Hex SHA-256 of the key. May be left out when `tls_name` is given (a client that only
    /// ever authenticates with its certificate).
    #[serde(default)]
    pub sha256: String,
    /// A verified client certificate (mTLS, `[gateway.tls] client_auth`) whose name is this one
    /// (its first DNS or URI subject alternative name, such as a SPIFFE ID, or else its common
    /// name) authenticates as this client, without a key: same rate, limits and jobs.
    #[serde(default)]
    pub tls_name: Option<String>,
    /// This key's rate (`"N/s"`, `"N/m"`, `"N/h"`, `"off"`); the gateway's `rate` if absent.
    #[serde(default)]
    pub rate: Option<String>,
    #[serde(default)]
    pub burst: Option<u32>,
    /// Image limits for this key on every image route, lower or higher than the route's.
    #[serde(default)]
    pub max_pixels: Option<u64>,
    #[serde(default)]
    pub max_side: Option<u32>,
    /// Body limit for this key on every route.
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// Output limits for this key's uploads, replacing the route's (`image.max_output_*`).
    #[serde(default)]
    pub max_output_pixels: Option<u64>,
    #[serde(default)]
    pub max_output_side: Option<u32>,
    /// An admin key reads every client's jobs (status and results), not only its own.
    #[serde(default)]
    pub admin: bool,
    /// The only presets (`upload.presets`, by name) this key may upload with: each output is
    /// then `preset=NAME` and nothing else. Absent: any options.
    #[serde(default)]
    pub presets: Option<Vec<String>>,
}

fn route(prefix: &str, upstream: &str, methods: &[&str]) -> RouteConfig {
    RouteConfig { methods: methods.iter().map(|m| m.to_string()).collect(), ..RouteConfig::new(prefix, upstream) }
}

impl RouteConfig {
    /// A route of `prefix` to `upstream` with every other setting at its default.
    pub fn new(prefix: &str, upstream: &str) -> RouteConfig {
        RouteConfig {
            prefix: prefix.into(),
            upstream: upstream.into(),
            split: BTreeMap::new(),
            split_by: SplitBy::Random,
            mirror: None,
            strip_prefix: false,
            rewrite_prefix: None,
            methods: vec![],
            timeout_ms: None,
            max_body_bytes: None,
            max_in_flight: None,
            max_queue: None,
            max_queue_ms: None,
            max_streams: None,
            image: None,
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            upstreams: BTreeMap::new(),
            routes: vec![
                RouteConfig { image: Some(ImageLimitsConfig::default()), ..route("/api/upload", "upload", &["POST"]) },
                route("/api/status", "status", &["GET", "HEAD"]),
                route("/api/result", "status", &["GET", "HEAD"]),
                route("/api/events", "status", &["GET", "HEAD"]),
                route("/api/jobs", "status", &["GET", "HEAD"]),
                route("/api/openapi.json", "status", &["GET", "HEAD"]),
            ],
            require_api_key: true,
            api_keys: Vec::new(),
            api_keys_file: None,
            rate: "50/s".into(),
            burst: 100,
            max_body_bytes: 32 * 1024 * 1024,
            timeout_ms: 30_000,
            // Under overload the admitted requests' latency is about max_in_flight over the
            // throughput (Little's law): 256 keeps it near 50 ms at 5,000 req/s, and is still
            // 256 req/s of a route whose upstream takes a second. The queue absorbs bursts;
            // waiting longer than 100 ms is an overload, not a burst, and is better refused.
            max_in_flight: 256,
            max_queue: 128,
            max_queue_ms: 100,
            max_streams: 10_000,
            access_log: true,
            watch_files: true,
            drain_grace_ms: 10_000,
            connections: pixmesh_chassis::serve::ConnectionLimits::default(),
            signed_urls: Default::default(),
            cluster: Default::default(),
            tls: Default::default(),
            client_tls: Default::default(),
        }
    }
}

/// A rate: `None` for "off", else the time between two requests.
pub fn parse_rate(text: &str) -> Result<Option<Duration>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let bad = || format!("rate {text:?} must look like \"100/s\", \"30/m\", \"500/h\" or \"off\"");
    let (n, unit) = text.split_once('/').ok_or_else(bad)?;
    let n: u32 = n.trim().parse().map_err(|_| bad())?;
    let per = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        _ => return Err(bad()),
    };
    if n == 0 {
        return Err(format!("rate {text:?} must allow at least one request; use \"off\" for no limit"));
    }
    Ok(Some((per / n).max(Duration::from_nanos(1))))
}

fn check_url(name: &str, url: &str) -> Result<(), String> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!("gateway upstream {name} = {url:?} must be an http:// or https:// URL"));
    }
    let uri = url.parse::<http::Uri>().map_err(|e| format!("gateway upstream {name} = {url:?}: {e}"))?;
    if uri.authority().is_none() {
        return Err(format!("gateway upstream {name} = {url:?} has no host"));
    }
    Ok(())
}

/// A queue that admits waiters must let them wait a little.
fn check_queue(what: &str, max_queue: u32, max_queue_ms: u64) -> Result<(), String> {
    if max_queue > 0 && max_queue_ms == 0 {
        return Err(format!("{what} max_queue_ms must be at least 1 when max_queue is above 0 (max_queue = 0: no queue)"));
    }
    Ok(())
}

impl GatewayConfig {
    /// Checks routes against upstreams. Upstream URLs may be left out of the file and filled
    /// in at start (as `pixmesh up` does for upload and status), so only those two may be absent.
    pub fn validate(&self) -> Result<(), String> {
        check_queue("gateway", self.max_queue, self.max_queue_ms)?;
        self.signed_urls.validate()?;
        self.cluster.validate()?;
        for r in &self.routes {
            if !r.prefix.starts_with('/') {
                return Err(format!("gateway route prefix {:?} must start with /", r.prefix));
            }
            if let Some(p) = &r.rewrite_prefix
                && !p.starts_with('/')
            {
                return Err(format!("gateway route {} rewrite_prefix {p:?} must start with /", r.prefix));
            }
            let known = |name: &str| self.upstreams.contains_key(name) || matches!(name, "upload" | "status");
            match (r.upstream.is_empty(), r.split.is_empty()) {
                (true, true) => return Err(format!("gateway route {} needs an upstream (or a split)", r.prefix)),
                (false, false) => return Err(format!("gateway route {} has both upstream and split; give one", r.prefix)),
                _ => {}
            }
            for name in std::iter::once(&r.upstream).filter(|u| !u.is_empty()).chain(r.split.keys()) {
                if !known(name) {
                    return Err(format!("gateway route {} names unknown upstream {name:?}", r.prefix));
                }
            }
            if !r.split.is_empty() && r.split.values().map(|w| u64::from(*w)).sum::<u64>() == 0 {
                return Err(format!("gateway route {} split has no weight above 0", r.prefix));
            }
            if let Some(m) = &r.mirror {
                if !known(&m.upstream) {
                    return Err(format!("gateway route {} mirrors to unknown upstream {:?}", r.prefix, m.upstream));
                }
                if m.max_in_flight == 0 || m.timeout_ms == 0 {
                    return Err(format!("gateway route {} mirror max_in_flight and timeout_ms must be at least 1", r.prefix));
                }
            }
            for m in &r.methods {
                if http::Method::from_bytes(m.as_bytes()).is_err() {
                    return Err(format!("gateway route {} has invalid method {m:?}", r.prefix));
                }
            }
            if r.max_in_flight == Some(0) {
                return Err(format!("gateway route {} max_in_flight must be at least 1", r.prefix));
            }
            check_queue(
                &format!("gateway route {}", r.prefix),
                r.max_queue.unwrap_or(self.max_queue),
                r.max_queue_ms.unwrap_or(self.max_queue_ms),
            )?;
            if let Some(image) = &r.image {
                for f in &image.formats {
                    Format::from_name(f)
                        .ok_or_else(|| format!("gateway route {} image format {f:?} is not one of jpeg, png, webp, gif, bmp", r.prefix))?;
                }
                if image.formats.is_empty() {
                    return Err(format!("gateway route {} allows no image format", r.prefix));
                }
                if image.probe_bytes < 64 {
                    return Err(format!("gateway route {} image.probe_bytes must be at least 64", r.prefix));
                }
            }
        }
        for (name, upstream) in &self.upstreams {
            let pool = upstream.pool();
            if pool.urls.is_empty() {
                return Err(format!("gateway upstream {name} has no URL"));
            }
            for url in &pool.urls {
                check_url(name, url)?;
            }
            if pool.max_connections == 0 {
                return Err(format!("gateway upstream {name} max_connections must be at least 1"));
            }
            if pool.max_ejection_percent > 100 {
                return Err(format!("gateway upstream {name} max_ejection_percent must be at most 100"));
            }
        }
        if self.max_in_flight == 0 {
            return Err("gateway.max_in_flight must be at least 1".into());
        }

        parse_rate(&self.rate).map_err(|e| format!("gateway.rate: {e}"))?;
        self.connections.validate("gateway.connections")?;
        self.tls.validate("gateway.tls")?;
        self.client_tls.validate("gateway.client_tls")?;
        for k in &self.api_keys {
            k.validate()?;
        }
        Ok(())
    }
}

impl ApiKeyConfig {
    pub fn validate(&self) -> Result<(), String> {
        match (&self.tls_name, self.sha256.is_empty()) {
            (Some(name), _) if name.is_empty() => return Err(format!("gateway api key {}: tls_name is empty", self.name)),
            (Some(_), true) => {}
            _ => drop(crate::keys::parse_hash(&self.sha256).map_err(|e| format!("gateway api key {}: {e}", self.name))?),
        }
        if let Some(rate) = &self.rate {
            parse_rate(rate).map_err(|e| format!("gateway api key {}: {e}", self.name))?;
        }
        if self.burst == Some(0) {
            return Err(format!("gateway api key {}: burst must be at least 1", self.name));
        }
        let named = |p: &String| {
            (1..=32).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        };
        if let Some(bad) = self.presets.iter().flatten().find(|p| !named(p)) {
            return Err(format!("gateway api key {}: preset name {bad:?} is not one (1 to 32 of a-z, 0-9, _ and -)", self.name));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_route_the_api_and_validation_catches_mistakes() {
        let mut c = GatewayConfig::default();
        c.upstreams.insert("upload".into(), UpstreamConfig::Url("http://127.0.0.1:1".into()));
        assert!(c.validate().is_ok());
        let upload = c.routes.iter().find(|r| r.prefix == "/api/upload").unwrap();
        assert_eq!(upload.image.as_ref().unwrap().max_pixels, 16_000_000);
        type Mutation = Box<dyn Fn(&mut GatewayConfig)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|c| c.routes.push(route("nope", "upload", &[]))), "must start with /"),
            (Box::new(|c| c.routes.push(route("/x", "missing", &[]))), "unknown upstream"),
            (Box::new(|c| drop(c.upstreams.insert("x".into(), UpstreamConfig::Url("ftp://h".into())))), "http://"),
            (Box::new(|c| drop(c.upstreams.insert("x".into(), UpstreamConfig::Urls(vec![])))), "no URL"),
            (Box::new(|c| c.api_keys.push(ApiKeyConfig { name: "k".into(), sha256: "abc".into(), ..Default::default() })), "64 hex"),
            (Box::new(|c| c.rate = "fast".into()), "must look like"),
            (Box::new(|c| c.routes[0].image.as_mut().unwrap().formats.push("tiff".into())), "not one of"),
            (Box::new(|c| c.max_queue_ms = 0), "gateway max_queue_ms must be at least 1"),
            (Box::new(|c| c.routes[1].max_queue_ms = Some(0)), "route /api/status max_queue_ms"),
            (Box::new(|c| c.routes[1].max_in_flight = Some(0)), "max_in_flight must be at least 1"),
            (
                Box::new(|c| {
                    drop(c.upstreams.insert(
                        "x".into(),
                        UpstreamConfig::Pool(PoolConfig { max_connections: 0, ..PoolConfig::of(vec!["http://h:1".into()]) }),
                    ))
                }),
                "max_connections must be at least 1",
            ),
            (
                Box::new(|c| {
                    drop(c.upstreams.insert(
                        "x".into(),
                        UpstreamConfig::Pool(PoolConfig { max_ejection_percent: 101, ..PoolConfig::of(vec!["http://h:1".into()]) }),
                    ))
                }),
                "max_ejection_percent must be at most 100",
            ),
        ];
        for (mutate, expected) in cases {
            let mut bad = c.clone();
            mutate(&mut bad);
            let err = bad.validate().unwrap_err();
            assert!(err.contains(expected), "{err:?} should mention {expected:?}");
        }
        // No queue at all is allowed, with any queue time.
        let mut no_queue = c.clone();
        no_queue.max_queue = 0;
        no_queue.max_queue_ms = 0;
        assert!(no_queue.validate().is_ok());
    }

    #[test]
    fn upstreams_take_three_shapes() {
        let text = r#"
            [upstreams]
            a = "http://127.0.0.1:1"
            b = ["http://127.0.0.1:1", "http://127.0.0.1:2"]
            c = { urls = ["http://127.0.0.1:3"], h2c = true, eject_after = 2 }
        "#;
        let c: GatewayConfig = toml::from_str(text).unwrap();
        assert_eq!(c.upstreams["a"].pool().urls.len(), 1);
        assert_eq!(c.upstreams["b"].pool().urls.len(), 2);
        let pc = c.upstreams["c"].pool();
        assert!(pc.h2c);
        assert_eq!((pc.eject_after, pc.eject_ms), (2, 5_000));
        assert_eq!((pc.max_connections, pc.max_ejection_percent), (1024, 50), "defaults");
        assert_eq!(c.upstreams["a"].pool().max_ejection_percent, 50);
        assert!(c.validate().is_ok());
        let d: GatewayConfig = toml::from_str(
            r#"
            max_queue = 8
            max_queue_ms = 50
            [upstreams]
            d = { urls = ["http://127.0.0.1:4"], max_connections = 16, max_ejection_percent = 25 }
            [[routes]]
            prefix = "/d"
            upstream = "d"
            max_in_flight = 4
            max_queue = 2
            max_queue_ms = 100
        "#,
        )
        .unwrap();
        let pd = d.upstreams["d"].pool();
        assert_eq!((pd.max_connections, pd.max_ejection_percent), (16, 25));
        assert_eq!((d.max_queue, d.max_queue_ms), (8, 50));
        assert_eq!((d.routes[0].max_in_flight, d.routes[0].max_queue, d.routes[0].max_queue_ms), (Some(4), Some(2), Some(100)));
        assert!(
            toml::from_str::<GatewayConfig>("[upstreams]\nz = { urls = [\"http://h:1\"], max_conections = 3 }").is_err(),
            "typos are refused"
        );
    }

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("10/s").unwrap(), Some(Duration::from_millis(100)));
        assert_eq!(parse_rate("2/m").unwrap(), Some(Duration::from_secs(30)));
        assert_eq!(parse_rate(" off ").unwrap(), None);
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("10/d").is_err());
        assert!(parse_rate("ten/s").is_err());
    }
}
