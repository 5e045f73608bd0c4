//! The router: the pinned route's upstream pool, forwarding that streams both ways, passive
//! ejection of failing instances, and retries on another instance where that is safe.
//!
//! Safe to retry: a request with no body (the body is streamed, never kept, so it cannot be
//! sent twice) whose connection was refused (nothing reached the upstream), or an idempotent
//! one (GET, HEAD, OPTIONS, PUT, DELETE, TRACE) that failed or got 502/503/504.
//!
//! Each attempt first takes a connection slot on its instance (`max_connections`), held until
//! the response body is done. Waiting for one counts against the route's `timeout_ms`, which
//! covers the whole request until the response headers, retries included. A request that gets
//! no slot in time is refused with 503 and `Retry-After`, and the instance is not blamed: it is
//! busy, not failing.

use crate::keys::Client;
use crate::layers::Pinned;
use crate::layers::upload_guard::ClientBody;
use crate::mirror::RequestCopy;
use crate::upstream::{Clients, Outcome, Pool};
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use http::header::{self, HeaderMap, HeaderName};
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, StatusCode};
use http_body::Body as _;
use http_body_util::BodyExt;
use pixmesh_chassis::tls::OverTls;
use pixmesh_chassis::{ApiError, ErrorCode};
use std::net::SocketAddr;
use std::sync::Arc;

/// At most this many instances are tried for one request.
const MAX_ATTEMPTS: usize = 3;

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1). Names are
/// constants so the hot path does not parse them per request.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
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
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    // The body is re-framed on each hop.
    headers.remove(header::TRANSFER_ENCODING);
}

fn idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE)
}

/// Forwards a request to its route's upstream.
pub async fn forward(State(clients): State<Clients>, ConnectInfo(peer): ConnectInfo<SocketAddr>, request: Request) -> Response {
    match forward_inner(&clients, peer, request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn forward_inner(clients: &Clients, peer: SocketAddr, request: Request) -> Result<Response, ApiError> {
    let route = Pinned::of(&request).and_then(|p| p.route.clone());
    let Some(route) = route else {
        return Err(ApiError::new(ErrorCode::NotFound, format!("no route for {}; the API lives under /api/", request.uri().path())));
    };
    if !route.methods.is_empty() && !route.methods.contains(request.method()) {
        let allowed: Vec<&str> = route.methods.iter().map(Method::as_str).collect();
        return Err(ApiError::new(
            ErrorCode::MethodNotAllowed,
            format!("{} is not allowed on {}; use {}", request.method(), route.prefix, allowed.join(" or ")),
        ));
    }
    let client_body = request.extensions().get::<ClientBody>().cloned();
    let caller = request.extensions().get::<Arc<Client>>().cloned();
    let pool = Arc::clone(route.pick_pool(caller.as_ref().map(|c| c.name.as_str()), peer.ip()));
    let (mut parts, body) = request.into_parts();
    let path_and_query = {
        let path = route.upstream_path(parts.uri.path());
        match parts.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        }
    };
    let over_tls = parts.extensions.get::<OverTls>().is_some();
    prepare_headers(&mut parts.headers, peer, over_tls, pool.config.h2c);
    let bodiless = body.is_end_stream();
    let retry_idempotent = bodiless && idempotent(&parts.method);
    let path_and_query = PathAndQuery::try_from(path_and_query)
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("cannot forward this path: {e}")))?;
    let body = match route.mirror.as_ref().filter(|m| m.sampled()) {
        Some(mirror) => {
            let copy = RequestCopy { method: parts.method.clone(), path_and_query: path_and_query.clone(), headers: parts.headers.clone() };
            mirror.start(clients, copy, body)
        }
        None => body,
    };
    let mut body = Some(body);
    let mut tried: Vec<usize> = Vec::with_capacity(MAX_ATTEMPTS);
    let mut last_error = None;
    let attempts = MAX_ATTEMPTS.min(pool.instances.len());
    let deadline = tokio::time::Instant::now() + route.timeout;
    let stream = parts.extensions.get::<crate::layers::admission::EventStream>().is_some();
    while tried.len() < attempts {
        let Some(i) = pool.pick(&tried) else { break };
        tried.push(i);
        let uri = pool.instances[i].uri(&path_and_query)?;
        // An event stream holds no connection slot: it would hold it for as long as its client
        // listens; the route's `max_streams` bounds streams instead.
        let slot = if stream {
            None
        } else {
            match pool.instances[i].try_slot() {
                Some(slot) => Some(slot),
                None => {
                    pool.metrics.slot_waits.increment(1);
                    match tokio::time::timeout_at(deadline, pool.instances[i].slot()).await {
                        Ok(Some(slot)) => Some(slot),
                        _ => return Err(saturated(&pool, route.timeout.as_millis())),
                    }
                }
            }
        };
        let mut request = http::Request::new(body.take().unwrap_or_default());
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = uri;
        // Only a request that may be retried needs its headers kept.
        *request.headers_mut() =
            if tried.len() < attempts && bodiless { parts.headers.clone() } else { std::mem::take(&mut parts.headers) };
        *request.version_mut() = if pool.config.h2c { http::Version::HTTP_2 } else { http::Version::HTTP_11 };
        let started = std::time::Instant::now();
        match tokio::time::timeout_at(deadline, clients.for_pool(&pool).request(request)).await {
            Ok(Ok(response)) => {
                let status = response.status();
                let failed = matches!(status, StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT);
                pool.record(i, if failed { Outcome::Failed } else { Outcome::Ok });
                if failed && retry_idempotent && tried.len() < pool.instances.len() {
                    pool.metrics.retries.increment(1);
                    continue;
                }
                pool.metrics.upstream_seconds.record(started.elapsed().as_secs_f64());
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                // The connection is busy until the body is done: so is its slot.
                let body = body.map_err(move |e| {
                    let _held = &slot;
                    axum::Error::new(e)
                });
                return Ok(Response::from_parts(parts, Body::new(body)));
            }
            Ok(Err(e)) => {
                if client_body.as_ref().is_some_and(ClientBody::is_cut) {
                    // The guard cut the body: the client's doing; it gets its refusal from the guard.
                    return Err(ApiError::new(ErrorCode::PayloadTooLarge, "the request body is over its limit"));
                }
                let refused = e.is_connect();
                pool.record(i, if refused { Outcome::Refused } else { Outcome::Failed });
                tracing::warn!(upstream = %pool.name, instance = %pool.instances[i].base, error = %e, "upstream request failed");
                pool.metrics.errors.increment(1);
                last_error = Some(unavailable(&pool));
                if bodiless && (refused || retry_idempotent) {
                    pool.metrics.retries.increment(1);
                    continue;
                }
                break;
            }
            Err(_) if client_body.as_ref().is_some_and(ClientBody::is_waiting) => {
                // Still waiting for the client's body: its slowness, not the instance's.
                return Err(ApiError::new(
                    ErrorCode::RequestTimeout,
                    format!("the request body did not arrive within {} ms; send it faster or send less", route.timeout.as_millis()),
                ));
            }
            Err(_) => {
                pool.record(i, Outcome::Failed);
                return Err(ApiError::new(
                    ErrorCode::Timeout,
                    format!("the {} service did not answer within {} ms", pool.name, route.timeout.as_millis()),
                ));
            }
        }
    }
    Err(last_error.unwrap_or_else(|| unavailable(&pool)))
}

fn saturated(pool: &Pool, waited_ms: u128) -> ApiError {
    pool.metrics.saturated.increment(1);
    let message = format!(
        "the {} service has all {} connections of its instance busy and none freed within {waited_ms} ms; retry later",
        pool.name, pool.config.max_connections
    );
    ApiError::new(ErrorCode::Unavailable, message).with_retry_after(1)
}

fn unavailable(pool: &Pool) -> ApiError {
    ApiError::new(ErrorCode::Unavailable, format!("the {} service is unavailable; retry later", pool.name)).with_retry_after(1)
}

/// Hop-by-hop headers out, `X-Forwarded-*` in. `Host` goes: the upstream URI names it.
/// `X-Forwarded-Proto` is the scheme the client reached the gateway with; a client's own value
/// is replaced, never trusted.
fn prepare_headers(headers: &mut HeaderMap, peer: SocketAddr, over_tls: bool, h2c: bool) {
    let original_host = headers.remove(header::HOST);
    // gRPC over h2c needs `te: trailers` end to end; it is the one TE value an h2 hop allows.
    let te_trailers = h2c && headers.get(header::TE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    strip_hop_by_hop(headers);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let forwarded_for = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(if over_tls { "https" } else { "http" }));
    if let Some(host) = original_host {
        headers.insert(X_FORWARDED_HOST, host);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed_and_forwarding_headers_added() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("host", HeaderValue::from_static("example.com"));
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        prepare_headers(&mut h, "127.0.0.2:5000".parse().unwrap(), false, false);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-kept"]);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.2");
        assert_eq!(h["x-forwarded-host"], "example.com");
        assert_eq!(h["x-forwarded-proto"], "http", "a client's claim is replaced");
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("trailers"));
        prepare_headers(&mut h, "127.0.0.2:5000".parse().unwrap(), true, true);
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["te"], "trailers", "kept for h2c (gRPC)");
    }

    #[test]
    fn only_safe_methods_are_idempotent() {
        assert!(idempotent(&Method::GET) && idempotent(&Method::PUT) && idempotent(&Method::DELETE));
        assert!(!idempotent(&Method::POST) && !idempotent(&Method::PATCH));
    }
}
