//! `X-Request-Id`: propagated when the client sent a sane one, generated otherwise; set on the
//! request (so upstreams and logs see it) and echoed on the response.

use axum::body::Body;
use http::{HeaderName, HeaderValue, Request, Response};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tower::Service;

pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");
const MAX_LEN: usize = 128;

super::interceptor!(RequestIdLayer, RequestId);

fn acceptable(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= MAX_LEN && b.iter().all(|c| c.is_ascii_graphic())
}

/// A UUIDv7 (time-ordered, so ids sort by arrival). Its random bits come from the thread-local
/// generator: `Uuid::now_v7` would make a `getrandom` system call per request.
fn new_id() -> HeaderValue {
    let millis = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let id = uuid::Builder::from_unix_timestamp_millis(millis, &rand::random::<[u8; 10]>()).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    HeaderValue::from_bytes(id.hyphenated().encode_lower(&mut buf).as_bytes()).unwrap_or(HeaderValue::from_static("invalid"))
}

impl<S> Service<Request<Body>> for RequestId<S>
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
        let id = match request.headers().get(HEADER) {
            Some(v) if acceptable(v) => v.clone(),
            _ => new_id(),
        };
        request.headers_mut().insert(HEADER, id.clone());
        let future = self.inner.call(request);
        Box::pin(async move {
            let mut response = future.await?;
            response.headers_mut().insert(HEADER, id);
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::{Layer, ServiceExt, service_fn};

    async fn echo(req: Request<Body>) -> Result<Response<Body>, Infallible> {
        let seen = req.headers().get(HEADER).cloned().unwrap();
        Ok(Response::builder().header("seen", seen).body(Body::empty()).unwrap())
    }

    #[tokio::test]
    async fn propagates_or_generates() {
        let svc = RequestIdLayer::layer().layer(service_fn(echo));
        let res = svc.clone().oneshot(Request::get("/").header(HEADER, "abc-123").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(res.headers()[HEADER], "abc-123");
        assert_eq!(res.headers()["seen"], "abc-123");
        for bad in ["", "has space", &"x".repeat(200)] {
            let res = svc.clone().oneshot(Request::get("/").header(HEADER, bad).body(Body::empty()).unwrap()).await.unwrap();
            let id = res.headers()[HEADER].to_str().unwrap();
            assert_eq!(id.len(), 36, "generated a UUID instead of {bad:?}");
            assert_eq!(res.headers()["seen"], res.headers()[HEADER]);
        }
    }
}
