//! W3C Trace Context: a valid `traceparent` is continued with the gateway's own hop as the new
//! parent; a missing or malformed one starts a new trace. `tracestate` passes unchanged.

use axum::body::Body;
use http::{HeaderName, HeaderValue, Request, Response};
use std::task::{Context, Poll};
use tower::Service;

pub const HEADER: HeaderName = HeaderName::from_static("traceparent");

super::interceptor!(TraceparentLayer, Traceparent);

fn is_hex(s: &[u8]) -> bool {
    s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// The trace id and flags of a valid `traceparent` (version 00, or a later version's first
/// four fields, as the spec asks).
pub fn parse(v: &[u8]) -> Option<(&str, &str)> {
    let head = v.get(..55)?;
    let (version, trace, parent, flags) = (&head[0..2], &head[3..35], &head[36..52], &head[53..55]);
    let dashes = head[2] == b'-' && head[35] == b'-' && head[52] == b'-';
    let ok = dashes
        && [version, trace, parent, flags].iter().all(|f| is_hex(f))
        && version != b"ff"
        && (version != b"00" || v.len() == 55)
        && (v.len() == 55 || v[55] == b'-')
        && trace.iter().any(|&c| c != b'0')
        && parent.iter().any(|&c| c != b'0');
    if !ok {
        return None;
    }
    Some((std::str::from_utf8(trace).ok()?, std::str::from_utf8(flags).ok()?))
}

/// The traceparent to send upstream: same trace, our span as the parent.
pub fn next(incoming: Option<&HeaderValue>) -> String {
    let span: u64 = rand::random::<u64>().max(1);
    match incoming.and_then(|v| parse(v.as_bytes())) {
        Some((trace, flags)) => format!("00-{trace}-{span:016x}-{flags}"),
        None => format!("00-{:032x}-{span:016x}-01", rand::random::<u128>().max(1)),
    }
}

impl<S> Service<Request<Body>> for Traceparent<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let value = next(request.headers().get(HEADER));
        if let Ok(v) = HeaderValue::from_str(&value) {
            request.headers_mut().insert(HEADER, v);
        }
        self.inner.call(request)
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
        assert!(parse(out.as_bytes()).is_some());
        // A later version with extra fields is read by its first four.
        assert!(parse(b"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds").is_some());
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse(bad.as_bytes()).is_none(), "{bad}");
            let fresh = next(HeaderValue::from_str(bad).ok().as_ref());
            assert!(parse(fresh.as_bytes()).is_some(), "{fresh}");
            assert!(!fresh.contains("4bf92f3577b34da6"), "a new trace for {bad:?}");
        }
    }
}
