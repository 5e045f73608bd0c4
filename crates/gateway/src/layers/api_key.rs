//! `X-API-KEY`: no upstream work happens before the key is checked. An unknown or missing key
//! gets a 401 JSON error. A known key's name is passed upstream in `x-pixmesh-client` (any
//! client-sent value of that header is removed first, so it cannot be forged).

use crate::keys::ApiKeys;
use axum::body::Body;
use axum::response::IntoResponse;
use http::{HeaderValue, Request, Response};
use pixmesh_chassis::{ApiError, ErrorCode};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::{Layer, Service};

pub const HEADER: &str = "x-api-key";
pub const CLIENT_HEADER: &str = "x-pixmesh-client";

#[derive(Debug, Clone)]
pub struct ApiKeyLayer {
    keys: Arc<ApiKeys>,
    required: bool,
}

impl ApiKeyLayer {
    pub fn layer(keys: ApiKeys, required: bool) -> Self {
        ApiKeyLayer { keys: Arc::new(keys), required }
    }
}

impl<S> Layer<S> for ApiKeyLayer {
    type Service = ApiKey<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ApiKey { inner, keys: Arc::clone(&self.keys), required: self.required }
    }
}

#[derive(Debug, Clone)]
pub struct ApiKey<S> {
    inner: S,
    keys: Arc<ApiKeys>,
    required: bool,
}

impl<S> Service<Request<Body>> for ApiKey<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        request.headers_mut().remove(CLIENT_HEADER);
        let name = request.headers().get(HEADER).map(|v| self.keys.check(v.as_bytes()));
        let refusal = match name {
            Some(Some(name)) => {
                metrics::counter!("pixmesh_gateway_auth_total", "outcome" => "ok").increment(1);
                if let Ok(v) = HeaderValue::from_str(name) {
                    request.headers_mut().insert(CLIENT_HEADER, v);
                }
                None
            }
            _ if !self.required => None,
            Some(None) => {
                Some(ApiError::new(ErrorCode::Unauthorized, "unknown API key; check the X-API-KEY header or ask the operator for a key"))
            }
            None => Some(ApiError::new(ErrorCode::Unauthorized, "missing X-API-KEY header; send your API key in it")),
        };
        if let Some(error) = refusal {
            metrics::counter!("pixmesh_gateway_auth_total", "outcome" => "refused").increment(1);
            return Box::pin(async move { Ok(error.into_response()) });
        }
        let future = self.inner.call(request);
        Box::pin(future)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::{ServiceExt, service_fn};

    #[tokio::test]
    async fn refuses_before_any_upstream_work() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&calls);
        let inner = service_fn(move |req: Request<Body>| {
            counter.fetch_add(1, Ordering::SeqCst);
            let client = req.headers().get(CLIENT_HEADER).cloned();
            async move {
                Ok::<_, Infallible>(
                    Response::builder().header("client", client.unwrap_or(HeaderValue::from_static("-"))).body(Body::empty()).unwrap(),
                )
            }
        });
        let mut keys = ApiKeys::default();
        keys.add_plain("alice", "k-alice");
        let svc = ApiKeyLayer::layer(keys, true).layer(inner);
        let send = |key: Option<&str>| {
            let mut req = Request::post("/api/upload").header(CLIENT_HEADER, "forged");
            if let Some(k) = key {
                req = req.header(HEADER, k);
            }
            svc.clone().oneshot(req.body(Body::empty()).unwrap())
        };
        for key in [None, Some("wrong")] {
            let res = send(key).await.unwrap();
            assert_eq!(res.status(), 401);
            let body: serde_json::Value = serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
            assert_eq!(body["error"]["code"], "unauthorized");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0, "no upstream work before auth");
        let res = send(Some("k-alice")).await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["client"], "alice", "the forged client header was replaced");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
