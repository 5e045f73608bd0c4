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
    /// Default per-route bulkhead: requests in flight at once; more get 503.
    pub max_in_flight: u32,
    /// One log line per request (target `pixmesh_gateway::access`).
    pub access_log: bool,
    /// Reload when the config file or the keys file changes (checked every second).
    pub watch_files: bool,
    pub drain_grace_ms: u64,
}

/// An upstream pool: `"http://a:1"`, `["http://a:1", "http://b:1"]`, or
/// `{ urls = [...], h2c = true, eject_after = 5, eject_ms = 5000 }`.
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
}

fn default_eject_after() -> u32 {
    5
}
fn default_eject_ms() -> u64 {
    5_000
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
        PoolConfig { urls, h2c: false, eject_after: default_eject_after(), eject_ms: default_eject_ms() }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Path prefix, matched on segment boundaries: `/api/status` matches `/api/status/1`
    /// but not `/api/statuses`.
    pub prefix: String,
    /// Name of an entry in `upstreams`.
    pub upstream: String,
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
    #[serde(default)]
    pub max_in_flight: Option<u32>,
    /// Image uploads: the body must be an image of an allowed format within these limits,
    /// checked from its header bytes before anything is forwarded.
    #[serde(default)]
    pub image: Option<ImageLimitsConfig>,
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
}

impl Default for ImageLimitsConfig {
    fn default() -> Self {
        ImageLimitsConfig {
            max_pixels: 16_000_000,
            max_side: 8192,
            formats: ["jpeg", "png", "webp", "gif"].map(String::from).to_vec(),
            probe_bytes: 256 * 1024,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    pub name: String,
    /// Hex SHA-256 of the key.
    pub sha256: String,
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
}

fn route(prefix: &str, upstream: &str, methods: &[&str]) -> RouteConfig {
    RouteConfig {
        prefix: prefix.into(),
        upstream: upstream.into(),
        strip_prefix: false,
        rewrite_prefix: None,
        methods: methods.iter().map(|m| m.to_string()).collect(),
        timeout_ms: None,
        max_body_bytes: None,
        max_in_flight: None,
        image: None,
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
            ],
            require_api_key: true,
            api_keys: Vec::new(),
            api_keys_file: None,
            rate: "50/s".into(),
            burst: 100,
            max_body_bytes: 32 * 1024 * 1024,
            timeout_ms: 30_000,
            max_in_flight: 1024,
            access_log: true,
            watch_files: true,
            drain_grace_ms: 10_000,
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
    if !url.starts_with("http://") {
        return Err(format!("gateway upstream {name} = {url:?} must be an http:// URL"));
    }
    let uri = url.parse::<http::Uri>().map_err(|e| format!("gateway upstream {name} = {url:?}: {e}"))?;
    if uri.authority().is_none() {
        return Err(format!("gateway upstream {name} = {url:?} has no host"));
    }
    Ok(())
}

impl GatewayConfig {
    /// Checks routes against upstreams. Upstream URLs may be left out of the file and filled
    /// in at start (as `pixmesh up` does for upload and status), so only those two may be absent.
    pub fn validate(&self) -> Result<(), String> {
        for r in &self.routes {
            if !r.prefix.starts_with('/') {
                return Err(format!("gateway route prefix {:?} must start with /", r.prefix));
            }
            if let Some(p) = &r.rewrite_prefix
                && !p.starts_with('/')
            {
                return Err(format!("gateway route {} rewrite_prefix {p:?} must start with /", r.prefix));
            }
            if !self.upstreams.contains_key(&r.upstream) && !matches!(r.upstream.as_str(), "upload" | "status") {
                return Err(format!("gateway route {} names unknown upstream {:?}", r.prefix, r.upstream));
            }
            for m in &r.methods {
                if http::Method::from_bytes(m.as_bytes()).is_err() {
                    return Err(format!("gateway route {} has invalid method {m:?}", r.prefix));
                }
            }
            if r.max_in_flight == Some(0) {
                return Err(format!("gateway route {} max_in_flight must be at least 1", r.prefix));
            }
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
        }
        if self.max_in_flight == 0 {
            return Err("gateway.max_in_flight must be at least 1".into());
        }
        parse_rate(&self.rate).map_err(|e| format!("gateway.rate: {e}"))?;
        for k in &self.api_keys {
            k.validate()?;
        }
        Ok(())
    }
}

impl ApiKeyConfig {
    pub fn validate(&self) -> Result<(), String> {
        crate::keys::parse_hash(&self.sha256).map_err(|e| format!("gateway api key {}: {e}", self.name))?;
        if let Some(rate) = &self.rate {
            parse_rate(rate).map_err(|e| format!("gateway api key {}: {e}", self.name))?;
        }
        if self.burst == Some(0) {
            return Err(format!("gateway api key {}: burst must be at least 1", self.name));
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
        ];
        for (mutate, expected) in cases {
            let mut bad = c.clone();
            mutate(&mut bad);
            let err = bad.validate().unwrap_err();
            assert!(err.contains(expected), "{err:?} should mention {expected:?}");
        }
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
        assert!(c.validate().is_ok());
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
