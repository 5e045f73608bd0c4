//! W3C Trace Context: the gateway's hop is a server span that continues a valid `traceparent`
//! (a missing or malformed one starts a new trace), and the request goes upstream with that
//! span as its parent. `tracestate` passes unchanged. Every log line of the request, the access
//! log's included, is inside the span and names the trace.

use super::pin::Pinned;
use axum::body::Body;
use http::{HeaderName, HeaderValue, Request, Response};
use pixmesh_chassis::trace;
use std::task::{Context, Poll};
use tower::Service;
use tracing::Instrument as _;

pub const HEADER: HeaderName = HeaderName::from_static("traceparent");

super::interceptor!(TraceparentLayer, Traceparent);

/// The traceparent to send upstream when spans are not exported: same trace, a new span id
/// for this hop (so the upstream's parent is this hop, not the client).
pub fn next(incoming: Option<&HeaderValue>) -> String {
    let span: u64 = rand::random::<u64>().max(1);
    let given = incoming.and_then(|v| v.to_str().ok()).filter(|v| trace::trace_id(v).is_some());
    match given {
        Some(v) => format!("00-{}-{span:016x}-{}", &v[3..35], &v[53..55]),
        None => format!("00-{:032x}-{span:016x}-01", rand::random::<u128>().max(1)),
    }
}

impl<S> Service<Request<Body>> for Traceparent<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = super::ResponseFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let exporting = trace::exporting();
        // WARN, the level of the hop's root span: a log filter at `warn` still sees it, so
        // warnings name their trace too. (A span's level only decides which filters see it.)
        let span = if exporting {
            let route = Pinned::of(&request).and_then(|p| p.route.as_ref()).map(|r| r.prefix.as_str()).unwrap_or_default();
            tracing::warn_span!(
                "gateway",
                otel.name = %format_args!("{} {route}", request.method()),
                otel.kind = "server",
                http.request.method = %request.method(),
                url.path = request.uri().path(),
                http.route = route,
                http.response.status_code = tracing::field::Empty,
                trace_id = tracing::field::Empty,
            )
        } else {
            // Nothing is exported: the span only gives the request's log lines their trace
            // (the access log has the rest), and costs no formatting of fields nobody reads.
            tracing::warn_span!("gateway", trace_id = tracing::field::Empty)
        };
        let incoming = request.headers().get(HEADER);
        trace::continue_from(&span, incoming.and_then(|v| v.to_str().ok()));
        let upstream = if exporting { trace::outgoing(&span, None) } else { None };
        let value = upstream.unwrap_or_else(|| {
            let value = next(incoming);
            // (A new trace started here: its id is known only now.)
            span.record("trace_id", value.get(3..35).unwrap_or_default());
            value
        });
        if let Ok(v) = HeaderValue::from_str(&value) {
            request.headers_mut().insert(HEADER, v);
        }
        let future = self.inner.call(request);
        let recorded = span.clone();
        Box::pin(
            async move {
                let response = future.await?;
                recorded.record("http.response.status_code", response.status().as_u16());
                Ok(response)
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_valid_and_restarts_invalid() {
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let out = next(Some(&HeaderValue::from_static(incoming)));
        assert!(out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(out.ends_with("-01"));
        assert_ne!(&out[36..52], "00f067aa0ba902b7", "our hop is the new parent");
        assert!(trace::trace_id(&out).is_some());
        // (What makes a traceparent invalid is tested with `chassis::trace::trace_id`.)
        for bad in
            ["", "00-00000000000000000000000000000000-00f067aa0ba902b7-01", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"]
        {
            assert!(trace::trace_id(bad).is_none(), "{bad}");
            let fresh = next(HeaderValue::from_str(bad).ok().as_ref());
            assert!(trace::trace_id(&fresh).is_some(), "{fresh}");
            assert!(!fresh.contains("4bf92f3577b34da6"), "a new trace for {bad:?}");
        }
    }
}
