//! The server span of an HTTP role (upload, status): one per request, a child of the request's
//! `traceparent` (the gateway's span), with the request's method, path and answer; and the
//! request's time in `http_server_request_duration_seconds`.

use http::{Request, Response};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tower::{Layer, Service};
use tracing::Instrument as _;

/// Wraps each request of a role's router in its server span.
#[derive(Debug, Clone, Copy)]
pub struct ServerSpanLayer {
    role: &'static str,
}

impl ServerSpanLayer {
    pub fn new(role: &'static str) -> ServerSpanLayer {
        ServerSpanLayer { role }
    }
}

impl<S> Layer<S> for ServerSpanLayer {
    type Service = ServerSpan<S>;

    fn layer(&self, inner: S) -> ServerSpan<S> {
        ServerSpan { inner, role: self.role }
    }
}

#[derive(Debug, Clone)]
pub struct ServerSpan<S> {
    inner: S,
    role: &'static str,
}

impl<S, B, R> Service<Request<B>> for ServerSpan<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<R>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // WARN, as every hop's root span: a log filter at `warn` still sees it (see the gateway's).
        let span = tracing::warn_span!(
            "request",
            otel.name = %format!("{} {}", self.role, request.method()),
            otel.kind = "server",
            http.request.method = %request.method(),
            url.path = request.uri().path(),
            http.response.status_code = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        let given = request.headers().get(crate::trace::TRACEPARENT).and_then(|v| v.to_str().ok());
        crate::trace::continue_from(&span, given);
        // The route as the router matched it (`/api/status/{id}`), never the path itself: a
        // label must not take a value per job.
        let route =
            request.extensions().get::<axum::extract::MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "other".into());
        // Known methods by name, any other as `_OTHER` (as OpenTelemetry does): a client must not
        // be able to make label values up.
        let method: &'static str = match *request.method() {
            http::Method::GET => "GET",
            http::Method::HEAD => "HEAD",
            http::Method::POST => "POST",
            http::Method::PUT => "PUT",
            http::Method::DELETE => "DELETE",
            http::Method::OPTIONS => "OPTIONS",
            http::Method::PATCH => "PATCH",
            _ => "_OTHER",
        };
        let started = std::time::Instant::now();
        let future = self.inner.call(request);
        let recorded = span.clone();
        Box::pin(
            async move {
                let response = future.await?;
                let status = response.status().as_u16();
                recorded.record("http.response.status_code", status);
                metrics::histogram!(
                    crate::instruments::HTTP_SERVER_REQUEST_DURATION,
                    "http_route" => route,
                    "http_request_method" => method,
                    "http_response_status_code" => status.to_string()
                )
                .record(started.elapsed().as_secs_f64());
                Ok(response)
            }
            .instrument(span),
        )
    }
}
