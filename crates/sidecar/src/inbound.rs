//! `pixmesh sidecar inbound`: in front of an application that speaks plain HTTP on localhost
//! and cannot be changed. Callers reach the sidecar's port; it terminates TLS (certificate
//! files reloaded when they change), authenticates each caller by `X-API-KEY` or by its client
//! certificate (mTLS), rate-limits per caller, bounds bodies, logs and counts every request,
//! and forwards to the application with `x-pixmesh-client` (who called), `x-request-id` and
//! `traceparent`.
//!
//! It is the gateway's stack ([`pixmesh_gateway::stack::inbound`]) with one upstream, `app`:
//! the same layers, reloads and metrics (`pixmesh_gateway_*`), so a route may also split the
//! application's traffic with another upstream or mirror it to a shadow.

use pixmesh_chassis::serve::ConnectionLimits;
use pixmesh_chassis::tls::TlsConfig;
use pixmesh_gateway::{ApiKeyConfig, GatewayConfig, RouteConfig, UpstreamConfig};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

/// The upstream name of the application.
pub const APP: &str = "app";

/// `[sidecar.inbound]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct InboundConfig {
    /// Where callers connect.
    pub listen: SocketAddr,
    /// `/healthz`, `/readyz`, `/metrics`.
    pub admin_listen: SocketAddr,
    /// The application, `http://127.0.0.1:PORT` (a list, or a pool table, also works).
    pub app: UpstreamConfig,
    /// `[sidecar.inbound.tls]`: the certificate, and client certificates (mTLS).
    pub tls: TlsConfig,
    /// Refuse callers without a known key or client certificate (401).
    pub require_api_key: bool,
    /// Callers: `{ name, sha256 }` for a key, `{ name, tls_name }` for a client certificate.
    pub api_keys: Vec<ApiKeyConfig>,
    /// A TOML file with more callers (`[[keys]]`), reloaded when it changes.
    pub api_keys_file: Option<PathBuf>,
    /// Each caller's rate (`"N/s"`, `"N/m"`, `"N/h"`, `"off"`), unless its entry sets one.
    pub rate: String,
    pub burst: u32,
    /// The largest request body; larger gets 413 before anything reaches the application.
    pub max_body_bytes: u64,
    /// The application's time to answer (until its response headers).
    pub timeout_ms: u64,
    /// Requests in flight to the application at once; more wait in a queue of `max_queue`
    /// for up to `max_queue_ms`, past it a fast 503.
    pub max_in_flight: u32,
    pub max_queue: u32,
    pub max_queue_ms: u64,
    pub access_log: bool,
    /// Reload when the config, keys or certificate files change.
    pub watch_files: bool,
    pub drain_grace_ms: u64,
    /// Timeouts and caps of the listener (`[sidecar.inbound.connections]`).
    pub connections: ConnectionLimits,
    /// More upstreams, for routes that split or mirror (`app` is one already).
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// Routes by path prefix, as the gateway's; none: every path to `app`.
    pub routes: Vec<RouteConfig>,
}

impl Default for InboundConfig {
    fn default() -> Self {
        let gateway = GatewayConfig::default();
        InboundConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            app: UpstreamConfig::Url("http://127.0.0.1:8080".into()),
            tls: TlsConfig::default(),
            require_api_key: true,
            api_keys: Vec::new(),
            api_keys_file: None,
            rate: gateway.rate,
            burst: gateway.burst,
            max_body_bytes: 10 * 1024 * 1024,
            timeout_ms: gateway.timeout_ms,
            max_in_flight: gateway.max_in_flight,
            max_queue: gateway.max_queue,
            max_queue_ms: gateway.max_queue_ms,
            access_log: true,
            watch_files: true,
            drain_grace_ms: gateway.drain_grace_ms,
            connections: ConnectionLimits::default(),
            upstreams: BTreeMap::new(),
            routes: Vec::new(),
        }
    }
}

impl InboundConfig {
    /// The gateway configuration this sidecar runs: `app` among the upstreams, and one route
    /// of every path to it unless routes are given.
    pub fn gateway(&self) -> GatewayConfig {
        let mut upstreams = self.upstreams.clone();
        upstreams.insert(APP.into(), self.app.clone());
        let routes = if self.routes.is_empty() { vec![RouteConfig::new("/", APP)] } else { self.routes.clone() };
        GatewayConfig {
            listen: self.listen,
            admin_listen: self.admin_listen,
            upstreams,
            routes,
            require_api_key: self.require_api_key,
            api_keys: self.api_keys.clone(),
            api_keys_file: self.api_keys_file.clone(),
            rate: self.rate.clone(),
            burst: self.burst,
            max_body_bytes: self.max_body_bytes,
            timeout_ms: self.timeout_ms,
            max_in_flight: self.max_in_flight,
            max_queue: self.max_queue,
            max_queue_ms: self.max_queue_ms,
            access_log: self.access_log,
            watch_files: self.watch_files,
            drain_grace_ms: self.drain_grace_ms,
            connections: self.connections,
            tls: self.tls.clone(),
            ..GatewayConfig::default()
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.upstreams.contains_key(APP) {
            return Err("sidecar.inbound.upstreams may not name an upstream \"app\": that is sidecar.inbound.app".into());
        }
        self.gateway().validate().map_err(|e| format!("sidecar.inbound: {e}"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
    use super::*;

    #[test]
    fn every_path_goes_to_the_app_unless_routes_say_otherwise() {
        let config = InboundConfig::default();
        assert!(config.validate().is_ok());
        let gateway = config.gateway();
        assert_eq!(gateway.routes, vec![RouteConfig::new("/", APP)]);
        assert_eq!(gateway.upstreams[APP], UpstreamConfig::Url("http://127.0.0.1:8080".into()));
        assert!(gateway.require_api_key);

        let mut split = InboundConfig::default();
        split.upstreams.insert("v2".into(), UpstreamConfig::Url("http://127.0.0.1:8081".into()));
        split.routes.push(RouteConfig { split: [(APP.to_string(), 90), ("v2".to_string(), 10)].into(), ..RouteConfig::new("/", "") });
        assert!(split.validate().is_ok());

        let mut clash = InboundConfig::default();
        clash.upstreams.insert(APP.into(), UpstreamConfig::Url("http://127.0.0.1:1".into()));
        assert!(clash.validate().unwrap_err().contains("sidecar.inbound.app"));
        let bad = InboundConfig { app: UpstreamConfig::Url("ftp://x".into()), ..InboundConfig::default() };
        assert!(bad.validate().unwrap_err().contains("http:// or https://"));
        let bad_tls = InboundConfig { tls: TlsConfig { cert: Some("c.pem".into()), ..TlsConfig::default() }, ..InboundConfig::default() };
        assert!(bad_tls.validate().unwrap_err().contains("go together"));
    }
}
