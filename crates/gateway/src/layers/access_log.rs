//! Access log and request metrics: one line per request (when `access_log` is on) and, always,
//! `pixmesh_gateway_responses_total{http_route,status_class}` and
//! `http_server_request_duration_seconds{http_route}`.
//! Times are to the response headers; a streamed body may take longer.

use super::{Pinned, ResponseFuture};
use crate::keys::Client;
use axum::body::Body;
use http::{Request, Response};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tower::Service;

super::interceptor!(AccessLogLayer, AccessLog);

impl<S> Service<Request<Body>> for AccessLog<S>
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
        let started = Instant::now();
        let pinned = Pinned::of(&request).cloned();
        let logged = pinned.as_ref().is_some_and(|p| p.snapshot.access_log).then(|| {
            let header = |name: http::HeaderName| request.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            let trace = header(super::traceparent::HEADER);
            (request.method().clone(), request.uri().path().to_string(), header(super::request_id::HEADER), trace)
        });
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            let status = response.status().as_u16();
            let elapsed = started.elapsed();
            if let Some(pinned) = &pinned {
                let metrics = pinned.route.as_ref().map(|r| &r.metrics).unwrap_or(&pinned.snapshot.unrouted);
                metrics.by_class[usize::from(status / 100).clamp(1, 5) - 1].increment(1);
                metrics.seconds.record(elapsed.as_secs_f64());
            }
            if let Some((method, path, request_id, trace)) = logged {
                let client = response.extensions().get::<Arc<Client>>().map(|c| c.name.as_str()).unwrap_or("-");
                tracing::info!(
                    target: "pixmesh_gateway::access",
                    %method,
                    path,
                    status,
                    ms = elapsed.as_secs_f64() * 1e3,
                    route = pinned.as_ref().and_then(|p| p.route.as_ref()).map(|r| r.prefix.as_str()).unwrap_or("-"),
                    client,
                    request_id,
                    trace_id = trace.get(3..35).unwrap_or(""),
                    "request"
                );
            }
            Ok(response)
        })
    }
}
