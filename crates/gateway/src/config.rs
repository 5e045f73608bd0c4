//! Gateway configuration: upstreams by name, routes by path prefix, API keys.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Upstream base URLs by name, e.g. `upload = "http://127.0.0.1:7001"`.
    pub upstreams: BTreeMap<String, String>,
    /// Routes, matched by longest path prefix.
    pub routes: Vec<RouteConfig>,
    /// Refuse requests without a known `X-API-KEY` (401).
    pub require_api_key: bool,
    /// API keys, stored as SHA-256 hashes.
    pub api_keys: Vec<ApiKeyConfig>,
    /// A TOML file with more keys (`[[keys]] name = "…" sha256 = "…"`).
    pub api_keys_file: Option<PathBuf>,
    /// Default per-route body limit.
    pub max_body_bytes: u64,
    /// Default per-route upstream timeout (until the response headers arrive).
    pub timeout_ms: u64,
    pub drain_grace_ms: u64,
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
    /// Allowed methods; empty allows all.
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    pub name: String,
    /// Hex SHA-256 of the key.
    pub sha256: String,
}

fn route(prefix: &str, upstream: &str, methods: &[&str]) -> RouteConfig {
    RouteConfig {
        prefix: prefix.into(),
        upstream: upstream.into(),
        strip_prefix: false,
        methods: methods.iter().map(|m| m.to_string()).collect(),
        timeout_ms: None,
        max_body_bytes: None,
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            upstreams: BTreeMap::new(),
            routes: vec![
                route("/api/upload", "upload", &["POST"]),
                route("/api/status", "status", &["GET", "HEAD"]),
                route("/api/result", "status", &["GET", "HEAD"]),
            ],
            require_api_key: true,
            api_keys: Vec::new(),
            api_keys_file: None,
            max_body_bytes: 32 * 1024 * 1024,
            timeout_ms: 30_000,
            drain_grace_ms: 10_000,
        }
    }
}

impl GatewayConfig {
    /// Checks routes against upstreams. Upstream URLs may be left empty in the file and filled
    /// in at start (as `pixmesh up` does), so only their syntax is checked when present.
    pub fn validate(&self) -> Result<(), String> {
        for r in &self.routes {
            if !r.prefix.starts_with('/') {
                return Err(format!("gateway route prefix {:?} must start with /", r.prefix));
            }
            if !self.upstreams.contains_key(&r.upstream) && !matches!(r.upstream.as_str(), "upload" | "status") {
                return Err(format!("gateway route {} names unknown upstream {:?}", r.prefix, r.upstream));
            }
            for m in &r.methods {
                if http::Method::from_bytes(m.as_bytes()).is_err() {
                    return Err(format!("gateway route {} has invalid method {m:?}", r.prefix));
                }
            }
        }
        for (name, url) in &self.upstreams {
            if !url.starts_with("http://") {
                return Err(format!("gateway upstream {name} = {url:?} must be an http:// URL"));
            }
            url.parse::<http::Uri>().map_err(|e| format!("gateway upstream {name} = {url:?}: {e}"))?;
        }
        for k in &self.api_keys {
            crate::keys::parse_hash(&k.sha256).map_err(|e| format!("gateway api key {}: {e}", k.name))?;
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
        c.upstreams.insert("upload".into(), "http://127.0.0.1:1".into());
        assert!(c.validate().is_ok());
        let mut bad = c.clone();
        bad.routes.push(route("nope", "upload", &[]));
        assert!(bad.validate().unwrap_err().contains("must start with /"));
        let mut bad = c.clone();
        bad.routes.push(route("/x", "missing", &[]));
        assert!(bad.validate().unwrap_err().contains("unknown upstream"));
        let mut bad = c.clone();
        bad.upstreams.insert("x".into(), "ftp://h".into());
        assert!(bad.validate().unwrap_err().contains("http://"));
        let mut bad = c;
        bad.api_keys.push(ApiKeyConfig { name: "k".into(), sha256: "abc".into() });
        assert!(bad.validate().is_err());
    }
}
