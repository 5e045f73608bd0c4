//! Route bulkhead: at most `max_in_flight` requests per route at once, counted until the
//! response body has been sent. Past that, 503 with `Retry-After` at once, so one slow
//! upstream cannot take every connection of the gateway with it.

use super::{Pinned, ResponseFuture, ready};
use axum::body::Body;
use axum::response::IntoResponse;
use http::{Request, Response};
use http_body_util::BodyExt;
use pixmesh_chassis::{ApiError, ErrorCode};
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::Service;

super::interceptor!(BulkheadLayer, Bulkhead);

impl<S> Service<Request<Body>> for Bulkhead<S>
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

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let Some(route) = Pinned::of(&request).and_then(|p| p.route.clone()) else { return Box::pin(self.inner.call(request)) };
        let Ok(permit) = Arc::clone(&route.bulkhead).try_acquire_owned() else {
            metrics::counter!("pixmesh_gateway_bulkhead_rejected_total", "route" => route.prefix.clone()).increment(1);
            let message = format!("{} has {} requests in flight, its limit; retry in a second", route.prefix, route.max_in_flight);
            return ready(ApiError::new(ErrorCode::Unavailable, message).with_retry_after(1).into_response());
        };
        let future = self.inner.call(request);
        Box::pin(async move {
            let (parts, body) = future.await?.into_parts();
            // The permit is released when the body is done (or dropped), not at the headers.
            let body = body.map_err(move |e| {
                let _held = &permit;
                e
            });
            Ok(Response::from_parts(parts, Body::new(body)))
        })
    }
}
