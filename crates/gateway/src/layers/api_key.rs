//! `X-API-KEY`: no upstream work happens before the key is checked. An unknown or missing key
//! gets a 401 JSON error; several `X-API-KEY` headers get 400 (which one counts would be a
//! guess, and a proxy in front may have added one). A known key's [`Client`] goes into the
//! request's extensions for the layers after this one and into the response's for the access
//! log; its name is passed upstream in `x-pixmesh-client`, and `x-pixmesh-admin: true` for an
//! admin key (client-sent values of every `x-pixmesh-*` header the services trust are removed
//! first, so they cannot be forged); the key itself is not passed on.
//!
//! A request without a key may instead carry a signed URL (`?expires=…&key=…&sig=…`, see
//! `pixmesh_chassis::signed_url`), for `GET` and `HEAD`: when its signature holds it goes on
//! with `x-pixmesh-signed: true` and no client (the status service lets it read the one job of
//! the signed path); when it does not, or it expired, 401 with the reason.
//!
//! On a TLS listener that verifies client certificates, a request without a key is the client
//! whose `tls_name` is the certificate's name (mTLS); a certificate naming no client is refused
//! like an unknown key. A key, when sent, decides (a proxy's one connection may carry several
//! clients).

use super::{Pinned, ResponseFuture, ready};
use crate::keys::Client;
use axum::body::Body;
use axum::response::IntoResponse;
use http::{HeaderName, HeaderValue, Request, Response};
use pixmesh_chassis::tls::PeerIdentity;
use pixmesh_chassis::{ApiError, ErrorCode};
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::Service;

pub const HEADER: HeaderName = HeaderName::from_static("x-api-key");
pub const CLIENT_HEADER: HeaderName = HeaderName::from_static(pixmesh_chassis::headers::CLIENT);
pub const ADMIN_HEADER: HeaderName = HeaderName::from_static(pixmesh_chassis::headers::ADMIN);

pub const SIGNED_HEADER: HeaderName = HeaderName::from_static(pixmesh_chassis::headers::SIGNED);

super::interceptor!(ApiKeyLayer, ApiKey);

/// A request without a key that carries a URL signature (`sig=`): whether it holds, or why not.
/// `None` for any other request.
fn signed_url(pinned: &Pinned, request: &Request<Body>) -> Option<Result<(), String>> {
    let signer = pinned.snapshot.signer.as_ref()?;
    let uri = request.uri();
    let verdict = signer.verify(uri.path(), uri.query(), pixmesh_chassis::signed_url::now_s())?;
    if request.method() != http::Method::GET && request.method() != http::Method::HEAD {
        return Some(Err(format!("a signed URL is for GET and HEAD only, not {}; send an X-API-KEY", request.method())));
    }
    Some(verdict.map_err(|refusal| refusal.to_string()))
}

impl<S> Service<Request<Body>> for ApiKey<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        for name in pixmesh_chassis::headers::ALL {
            request.headers_mut().remove(name);
        }
        let Some(pinned) = Pinned::of(&request).cloned() else {
            return ready(ApiError::new(ErrorCode::Internal, "the gateway has no configuration loaded").into_response());
        };
        // The key is a credential for the gateway only: upstreams (which may be third-party
        // applications) never see it.
        if request.headers().get_all(HEADER).iter().nth(1).is_some() {
            pinned.snapshot.metrics.auth_refused.increment(1);
            return ready(ApiError::new(ErrorCode::BadRequest, "several X-API-KEY headers; send exactly one").into_response());
        }
        let presented = request.headers_mut().remove(HEADER);
        if presented.is_none()
            && let Some(signed) = signed_url(&pinned, &request)
        {
            return match signed {
                Ok(()) => {
                    pinned.snapshot.metrics.auth_ok.increment(1);
                    request.headers_mut().insert(SIGNED_HEADER, HeaderValue::from_static("true"));
                    Box::pin(self.inner.call(request))
                }
                Err(message) => {
                    pinned.snapshot.metrics.auth_refused.increment(1);
                    ready(ApiError::new(ErrorCode::Unauthorized, message).into_response())
                }
            };
        }
        let presented = presented.as_ref();
        // Without a key, the connection's verified client certificate (mTLS) may name a client.
        let certificate = request.extensions().get::<PeerIdentity>().filter(|_| presented.is_none());
        let client: Option<Arc<Client>> = match (presented, certificate) {
            (Some(v), _) => pinned.snapshot.keys.check(v.as_bytes()).cloned(),
            (None, Some(PeerIdentity(name))) => pinned.snapshot.keys.by_certificate(name).cloned(),
            (None, None) => None,
        };
        let refusal = match (&client, presented, certificate) {
            (Some(_), _, _) => None,
            (None, _, _) if !pinned.snapshot.require_api_key => None,
            (None, Some(_), _) => Some("unknown API key; check the X-API-KEY header or ask the operator for a key".to_string()),
            (None, None, Some(PeerIdentity(name))) => Some(format!(
                "the client certificate names {name:?}, which is no known client (no key has tls_name = {name:?}); \
                 send an X-API-KEY or ask the operator to add it"
            )),
            (None, None, None) => Some("missing X-API-KEY header; send your API key in it".to_string()),
        };
        if let Some(message) = refusal {
            pinned.snapshot.metrics.auth_refused.increment(1);
            return ready(ApiError::new(ErrorCode::Unauthorized, message).into_response());
        }
        let Some(client) = client else { return Box::pin(self.inner.call(request)) };
        pinned.snapshot.metrics.auth_ok.increment(1);
        if let Ok(v) = HeaderValue::from_str(&client.name) {
            request.headers_mut().insert(CLIENT_HEADER, v);
        }
        if client.admin {
            request.headers_mut().insert(ADMIN_HEADER, HeaderValue::from_static("true"));
        }
        request.extensions_mut().insert(Arc::clone(&client));
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut response = future.await?;
            response.extensions_mut().insert(client);
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GatewayConfig;
    use crate::keys::ApiKeys;
    use crate::snapshot::Snapshot;
    use http_body_util::BodyExt;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::{Layer, ServiceExt, service_fn};

    #[tokio::test]
    async fn refuses_before_any_upstream_work_and_keeps_the_key_to_itself() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&calls);
        let inner = service_fn(move |req: Request<Body>| {
            counter.fetch_add(1, Ordering::SeqCst);
            let client = req.headers().get(CLIENT_HEADER).cloned().unwrap_or(HeaderValue::from_static("-"));
            let admin = req.headers().get(ADMIN_HEADER).cloned().unwrap_or(HeaderValue::from_static("-"));
            let leaked = req.headers().contains_key(HEADER);
            async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("client", client)
                        .header("admin", admin)
                        .header("leaked", leaked.to_string())
                        .body(Body::empty())
                        .unwrap(),
                )
            }
        });
        let config = GatewayConfig { routes: vec![], ..GatewayConfig::default() };
        let keys = ApiKeys::load(&config, &[("alice".into(), "k-alice".into())], None).unwrap();
        let pinned = Pinned { snapshot: Arc::new(Snapshot::build(&config, keys, None).unwrap_or_else(|e| panic!("{e}"))), route: None };
        let svc = ApiKeyLayer::layer().layer(inner);
        let send = |key: Option<&str>| {
            let mut req = Request::post("/api/upload").header(CLIENT_HEADER, "forged").header(ADMIN_HEADER, "true");
            if let Some(k) = key {
                req = req.header(HEADER, k);
            }
            let mut req = req.body(Body::empty()).unwrap();
            req.extensions_mut().insert(pinned.clone());
            svc.clone().oneshot(req)
        };
        for key in [None, Some("wrong")] {
            let res = send(key).await.unwrap();
            assert_eq!(res.status(), 401);
            let body: serde_json::Value = serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
            assert_eq!(body["error"]["code"], "unauthorized");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0, "no upstream work before auth");
        // Two keys, even a good one first: ambiguous, refused before any upstream work.
        let mut two = Request::post("/api/upload").header(HEADER, "k-alice").header(HEADER, "wrong").body(Body::empty()).unwrap();
        two.extensions_mut().insert(pinned.clone());
        let res = svc.clone().oneshot(two).await.unwrap();
        assert_eq!(res.status(), 400);
        let body: serde_json::Value = serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(body["error"]["code"], "bad_request");
        assert_eq!(calls.load(Ordering::SeqCst), 0, "no upstream work for an ambiguous key");
        let res = send(Some("k-alice")).await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["admin"], "-", "a client cannot make itself admin");
        assert_eq!(res.headers()["client"], "alice", "the forged client header was replaced");
        assert_eq!(res.headers()["leaked"], "false", "the key is not passed on");
        assert_eq!(res.extensions().get::<Arc<Client>>().map(|c| c.name.as_str()), Some("alice"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // An admin key is told apart upstream.
        let keys = ApiKeys::load_with_admins(&config, &[], &[("ops".into(), "k-ops".into())], None).unwrap();
        let admin = Pinned { snapshot: Arc::new(Snapshot::build(&config, keys, None).unwrap_or_else(|e| panic!("{e}"))), route: None };
        let mut req = Request::get("/api/status/x").header(HEADER, "k-ops").body(Body::empty()).unwrap();
        req.extensions_mut().insert(admin);
        let res = svc.clone().oneshot(req).await.unwrap();
        assert_eq!((res.headers()["client"].to_str().unwrap(), res.headers()["admin"].to_str().unwrap()), ("ops", "true"));
    }

    #[tokio::test]
    async fn a_signed_url_stands_in_for_a_key_on_get_and_head_only() {
        let inner = service_fn(|req: Request<Body>| {
            let signed = req.headers().get(SIGNED_HEADER).cloned().unwrap_or(HeaderValue::from_static("-"));
            let client = req.headers().get(CLIENT_HEADER).cloned().unwrap_or(HeaderValue::from_static("-"));
            async move {
                Ok::<_, Infallible>(Response::builder().header("signed", signed).header("client", client).body(Body::empty()).unwrap())
            }
        });
        let key = pixmesh_chassis::signed_url::SigningKey { id: "k1".into(), secret: "0123456789abcdef0123456789abcdef".into() };
        let config = GatewayConfig {
            routes: vec![],
            signed_urls: pixmesh_chassis::signed_url::SignedUrlConfig { keys: vec![key], ttl_s: 60 },
            ..GatewayConfig::default()
        };
        let keys = ApiKeys::load(&config, &[("alice".into(), "k-alice".into())], None).unwrap();
        let pinned = Pinned { snapshot: Arc::new(Snapshot::build(&config, keys, None).unwrap_or_else(|e| panic!("{e}"))), route: None };
        let url = pinned.snapshot.signer.as_ref().unwrap().sign("/api/result/j", pixmesh_chassis::signed_url::now_s());
        let svc = ApiKeyLayer::layer().layer(inner);
        let send = |method: &str, uri: &str| {
            let mut req = Request::builder().method(method).uri(uri).header(SIGNED_HEADER, "true").body(Body::empty()).unwrap();
            req.extensions_mut().insert(pinned.clone());
            svc.clone().oneshot(req)
        };
        for method in ["GET", "HEAD"] {
            let res = send(method, &url).await.unwrap();
            assert_eq!(res.status(), 200, "{method}");
            assert_eq!((res.headers()["signed"].to_str().unwrap(), res.headers()["client"].to_str().unwrap()), ("true", "-"));
        }
        for (method, uri, why) in [
            ("POST", url.clone(), "POST"),
            ("DELETE", url.clone(), "DELETE"),
            ("GET", url.replace("/j?", "/k?"), "another path"),
            ("GET", "/api/result/j".to_string(), "no signature, only the forged header"),
        ] {
            let res = send(method, &uri).await.unwrap();
            assert_eq!(res.status(), 401, "{why}");
        }
    }
}
