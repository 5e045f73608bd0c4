//! Refuses request targets and header blocks above the listener's limits with the JSON error
//! (414 `uri_too_long`, 431 `headers_too_large`) before any handler runs. hyper's own limits
//! sit well above these (see [`crate::serve`]), so within them a client reads a clear refusal
//! instead of a bare status line or, over HTTP/2, a reset stream.

use crate::error::{ApiError, ErrorCode};
use crate::serve::ConnectionLimits;
use axum::response::{IntoResponse, Response};
use futures_util::future::{BoxFuture, FutureExt};
use http::Request;
use std::task::{Context, Poll};
use tower::{Layer, Service};

#[derive(Debug, Clone, Copy)]
pub struct RequestLimitsLayer {
    max_uri_bytes: usize,
    max_header_bytes: usize,
    max_headers: usize,
}

impl RequestLimitsLayer {
    pub fn new(limits: &ConnectionLimits) -> Self {
        RequestLimitsLayer {
            max_uri_bytes: limits.max_uri_bytes,
            max_header_bytes: limits.max_header_bytes,
            max_headers: limits.max_headers,
        }
    }

    /// The refusal for a request, if it breaks a limit.
    fn check<B>(&self, request: &Request<B>) -> Option<ApiError> {
        let uri = request.uri();
        let target = uri.path_and_query().map_or(0, |pq| pq.as_str().len());
        if target > self.max_uri_bytes {
            return Some(ApiError::new(
                ErrorCode::UriTooLong,
                format!("the request target is {target} bytes; the limit is {} bytes", self.max_uri_bytes),
            ));
        }
        let headers = request.headers();
        if headers.len() > self.max_headers {
            return Some(ApiError::new(
                ErrorCode::HeadersTooLarge,
                format!("the request has {} header fields; the limit is {}", headers.len(), self.max_headers),
            ));
        }
        // Counted as HTTP/2 does (RFC 9113 §6.5.2): name + value + 32 per field.
        let bytes: usize = headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 32).sum();
        if bytes > self.max_header_bytes {
            return Some(ApiError::new(
                ErrorCode::HeadersTooLarge,
                format!("the request headers are {bytes} bytes; the limit is {} bytes", self.max_header_bytes),
            ));
        }
        None
    }
}

impl<S> Layer<S> for RequestLimitsLayer {
    type Service = RequestLimits<S>;
    fn layer(&self, inner: S) -> RequestLimits<S> {
        RequestLimits { limits: *self, inner }
    }
}

#[derive(Debug, Clone)]
pub struct RequestLimits<S> {
    limits: RequestLimitsLayer,
    inner: S,
}

impl<S, B> Service<Request<B>> for RequestLimits<S>
where
    S: Service<Request<B>, Response = Response>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if let Some(error) = self.limits.check(&request) {
            metrics::counter!(crate::instruments::HTTP_REQUESTS_REFUSED, "code" => error.code.as_str()).increment(1);
            let mut response = error.into_response();
            // The rest of this connection's bytes are not worth reading.
            response.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
            return std::future::ready(Ok(response)).boxed();
        }
        self.inner.call(request).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::Body;
    use axum::routing::get;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn send(request: Request<Body>) -> (u16, serde_json::Value) {
        let app = Router::new().route("/x", get(|| async { "ok" })).layer(RequestLimitsLayer::new(&ConnectionLimits::default()));
        let response = app.oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    #[tokio::test]
    async fn long_targets_and_big_headers_get_json_refusals() {
        assert_eq!(send(Request::get("/x").body(Body::empty()).unwrap()).await.0, 200);
        let long = format!("/x?q={}", "a".repeat(9000));
        let (status, body) = send(Request::get(long).body(Body::empty()).unwrap()).await;
        assert_eq!((status, body["error"]["code"].as_str()), (414, Some("uri_too_long")));
        let (status, body) = send(Request::get("/x").header("x-big", "b".repeat(70_000)).body(Body::empty()).unwrap()).await;
        assert_eq!((status, body["error"]["code"].as_str()), (431, Some("headers_too_large")));
        let mut many = Request::get("/x");
        for i in 0..101 {
            many = many.header(format!("x-{i}"), "v");
        }
        let (status, body) = send(many.body(Body::empty()).unwrap()).await;
        assert_eq!((status, body["error"]["code"].as_str()), (431, Some("headers_too_large")));
    }
}
