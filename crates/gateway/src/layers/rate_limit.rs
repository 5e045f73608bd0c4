//! Per-key rate limit (GCRA, through governor): a key over its rate gets 429 with
//! `Retry-After`. Without a key (when keys are optional, or for a signed URL) the limit applies
//! per client address.
//! The limiter state lives in the key (see `keys.rs`), so it survives reloads.

use super::{Pinned, ResponseFuture, ready};
use crate::keys::Client;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::IntoResponse;
use governor::clock::{Clock, Reference};
use http::{Request, Response};
use pixmesh_chassis::{ApiError, ErrorCode};
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tower::Service;

super::interceptor!(RateLimitLayer, RateLimit);

/// How long until the request would conform, if it does not now.
fn over_limit<B>(request: &Request<B>) -> Option<(Duration, String)> {
    if let Some(client) = request.extensions().get::<Arc<Client>>() {
        let limiter = client.limiter.as_ref()?;
        let wait = limiter.check().err()?.wait_time_from(limiter.clock().now());
        return Some((wait, format!("API key {:?} is over its rate limit", client.name)));
    }
    let (_, limiter) = Pinned::of(request)?.snapshot.anonymous.as_ref()?;
    let ConnectInfo(peer) = request.extensions().get::<ConnectInfo<SocketAddr>>()?;
    let not_until = limiter.check_key(&peer.ip()).err()?;
    let now = limiter.clock().now();
    Some((not_until.earliest_possible().duration_since(now).into(), format!("{} is over the rate limit", peer.ip())))
}

impl<S> Service<Request<Body>> for RateLimit<S>
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
        match over_limit(&request) {
            None => Box::pin(self.inner.call(request)),
            Some((wait, who)) => {
                metrics::counter!(crate::instruments::RATE_LIMITED).increment(1);
                let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
                let message = format!("{who}; retry after {seconds} s, or ask the operator for a higher rate");
                ready(ApiError::new(ErrorCode::RateLimited, message).with_retry_after(seconds).into_response())
            }
        }
    }
}
