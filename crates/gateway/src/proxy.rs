//! The router: longest-prefix routes to upstream pools, forwarding that streams both ways.

use crate::config::GatewayConfig;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use http::header::{self, HeaderMap, HeaderName};
use http::{HeaderValue, Method, Uri};
use http_body_util::{BodyExt, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use pixmesh_chassis::{ApiError, ErrorCode};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Route {
    pub prefix: String,
    pub upstream_name: String,
    pub upstream: String,
    pub strip_prefix: bool,
    pub methods: Vec<Method>,
    pub timeout: Duration,
    pub max_body_bytes: u64,
}

impl Route {
    fn matches(&self, path: &str) -> bool {
        let p = self.prefix.trim_end_matches('/');
        path == p || path.strip_prefix(p).is_some_and(|rest| rest.starts_with('/')) || p.is_empty()
    }
}

pub struct Routes {
    routes: Vec<Route>,
    client: Client<HttpConnector, Body>,
}

impl Routes {
    pub fn new(config: &GatewayConfig) -> Result<Routes, String> {
        let mut routes = Vec::new();
        for r in &config.routes {
            let upstream = config
                .upstreams
                .get(&r.upstream)
                .ok_or_else(|| format!("route {} names upstream {:?}, which has no URL", r.prefix, r.upstream))?
                .trim_end_matches('/')
                .to_string();
            routes.push(Route {
                prefix: r.prefix.clone(),
                upstream_name: r.upstream.clone(),
                upstream,
                strip_prefix: r.strip_prefix,
                methods: r.methods.iter().filter_map(|m| Method::from_bytes(m.as_bytes()).ok()).collect(),
                timeout: Duration::from_millis(r.timeout_ms.unwrap_or(config.timeout_ms)),
                max_body_bytes: r.max_body_bytes.unwrap_or(config.max_body_bytes),
            });
        }
        // Longest prefix first.
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let client =
            Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(60)).pool_max_idle_per_host(256).build(connector);
        Ok(Routes { routes, client })
    }

    pub fn find(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(path))
    }
}

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] =
    ["connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te", "trailer", "upgrade"];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    // The body is re-framed on each hop.
    headers.remove(header::TRANSFER_ENCODING);
}

/// Forwards a request to its route's upstream.
pub async fn forward(State(routes): State<Arc<Routes>>, ConnectInfo(peer): ConnectInfo<SocketAddr>, request: Request) -> Response {
    match forward_inner(&routes, peer, request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn forward_inner(routes: &Routes, peer: SocketAddr, request: Request) -> Result<Response, ApiError> {
    let path = request.uri().path().to_string();
    let route =
        routes.find(&path).ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no route for {path}; the API lives under /api/")))?;
    if !route.methods.is_empty() && !route.methods.contains(request.method()) {
        let allowed: Vec<&str> = route.methods.iter().map(Method::as_str).collect();
        return Err(ApiError::new(
            ErrorCode::MethodNotAllowed,
            format!("{} is not allowed on {}; use {}", request.method(), route.prefix, allowed.join(" or ")),
        ));
    }
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > route.max_body_bytes) {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the request body is larger than the limit of {} bytes for {}", route.max_body_bytes, route.prefix),
        ));
    }

    let (mut parts, body) = request.into_parts();
    let upstream_path = if route.strip_prefix {
        let rest = &path[route.prefix.trim_end_matches('/').len().min(path.len())..];
        if rest.is_empty() { "/".to_string() } else { rest.to_string() }
    } else {
        path.clone()
    };
    let query = parts.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let uri: Uri = format!("{}{}{}", route.upstream, upstream_path, query)
        .parse()
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("cannot forward this path: {e}")))?;

    let original_host = parts.headers.get(header::HOST).cloned();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    let forwarded_for = match parts.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
        parts.headers.insert("x-forwarded-for", v);
    }
    parts.headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Some(host) = original_host {
        parts.headers.insert("x-forwarded-host", host);
    }
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    // Streams the body through, cutting it off past the route's limit.
    let limit = usize::try_from(route.max_body_bytes).unwrap_or(usize::MAX);
    let body = Body::new(Limited::new(body, limit));
    let upstream_request = http::Request::from_parts(parts, body);

    let started = std::time::Instant::now();
    let response = match tokio::time::timeout(route.timeout, routes.client.request(upstream_request)).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            tracing::warn!(upstream = %route.upstream_name, error = %e, "upstream request failed");
            metrics::counter!("pixmesh_gateway_upstream_errors_total", "upstream" => route.upstream_name.clone()).increment(1);
            return Err(ApiError::new(ErrorCode::Unavailable, format!("the {} service is unavailable; retry later", route.upstream_name))
                .with_retry_after(1));
        }
        Err(_) => {
            return Err(ApiError::new(
                ErrorCode::Timeout,
                format!("the {} service did not answer within {} ms", route.upstream_name, route.timeout.as_millis()),
            ));
        }
    };
    metrics::histogram!("pixmesh_gateway_upstream_seconds", "upstream" => route.upstream_name.clone())
        .record(started.elapsed().as_secs_f64());
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, Body::new(body.map_err(axum::Error::new))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteConfig;

    fn routes() -> Routes {
        let mut c = GatewayConfig::default();
        c.upstreams.insert("upload".into(), "http://127.0.0.1:1".into());
        c.upstreams.insert("status".into(), "http://127.0.0.1:2/".into());
        c.upstreams.insert("legacy".into(), "http://127.0.0.1:3".into());
        c.routes.push(RouteConfig {
            prefix: "/legacy/".into(),
            upstream: "legacy".into(),
            strip_prefix: true,
            methods: vec![],
            timeout_ms: None,
            max_body_bytes: None,
        });
        Routes::new(&c).unwrap()
    }

    #[test]
    fn matches_on_segment_boundaries_longest_first() {
        let r = routes();
        let check = |path: &str, expected: Option<&str>| assert_eq!(r.find(path).map(|x| x.upstream_name.as_str()), expected, "{path}");
        check("/api/upload", Some("upload"));
        check("/api/status/123", Some("status"));
        check("/api/result/123", Some("status"));
        check("/api/statuses", None);
        check("/legacy", Some("legacy"));
        check("/legacy/a/b", Some("legacy"));
        check("/", None);
        assert_eq!(r.find("/api/status/1").unwrap().upstream, "http://127.0.0.1:2");
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}
