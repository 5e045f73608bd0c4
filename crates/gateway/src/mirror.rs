//! A route's mirror: a copy of some of its requests goes to a shadow upstream (a new version
//! under real traffic), and whatever the shadow does never reaches the client.
//!
//! - The client's request goes to its upstream as it would without a mirror; its body is
//!   copied as it streams past (a copy, not a wait), up to `max_body_bytes`. A larger body
//!   is not mirrored.
//! - The copy is sent from a task of its own once the body is whole: the client's response
//!   never waits for it. The shadow's answer is read and dropped.
//! - At most `max_in_flight` copies are outstanding and each takes a free connection of the
//!   shadow or none: past either, the copy is skipped, never queued. Each lasts at most
//!   `timeout_ms`. A shadow that answers slowly or never costs its own slots, nothing else.

use crate::config::MirrorConfig;
use crate::upstream::{Clients, Outcome, Pool};
use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use http_body::{Body as _, Frame, SizeHint};
use metrics::Counter;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

/// Tells the shadow that its answer goes nowhere.
const SHADOW_HEADER: HeaderName = HeaderName::from_static("x-pixmesh-shadow");

#[derive(Debug)]
pub struct Mirror {
    pub pool: Arc<Pool>,
    ppm: u32,
    max_body: u64,
    timeout: Duration,
    slots: Arc<Semaphore>,
    answered: Counter,
    failed: Counter,
    skipped: Counter,
}

/// What the copy is sent with: the forwarded request's method, target and headers.
pub struct RequestCopy {
    pub method: Method,
    pub path_and_query: PathAndQuery,
    pub headers: HeaderMap,
}

impl Mirror {
    pub fn new(route: &str, pool: Arc<Pool>, config: &MirrorConfig) -> Mirror {
        let outcome = |o: &'static str| metrics::counter!(crate::instruments::MIRROR, "http_route" => route.to_string(), "outcome" => o);
        Mirror {
            pool,
            ppm: config.ppm,
            max_body: config.max_body_bytes,
            timeout: Duration::from_millis(config.timeout_ms),
            slots: Arc::new(Semaphore::new(config.max_in_flight as usize)),
            answered: outcome("answered"),
            failed: outcome("failed"),
            skipped: outcome("skipped"),
        }
    }

    /// Whether this request is one to copy, at the configured share.
    pub fn sampled(&self) -> bool {
        self.ppm >= 1_000_000 || (self.ppm > 0 && rand::random_range(0..1_000_000) < self.ppm)
    }

    /// Starts a copy of a request whose body is `body`; returns the body to forward instead
    /// (the same bytes, copied on their way when they are to be mirrored).
    pub fn start(self: &Arc<Self>, clients: &Clients, copy: RequestCopy, body: Body) -> Body {
        let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() else {
            self.skipped.increment(1);
            return body;
        };
        if body.is_end_stream() {
            tokio::spawn(Arc::clone(self).send(clients.clone(), copy, Bytes::new(), permit));
            return body;
        }
        if body.size_hint().lower() > self.max_body {
            self.skipped.increment(1);
            return body;
        }
        let (tx, rx) = oneshot::channel();
        let mirror = Arc::clone(self);
        let clients = clients.clone();
        tokio::spawn(async move {
            // The body is whole when the client has sent it to the primary; a body over the
            // limit, cut, or never finished is not mirrored.
            match tokio::time::timeout(mirror.timeout, rx).await {
                Ok(Ok(bytes)) => mirror.send(clients, copy, bytes, permit).await,
                _ => mirror.skipped.increment(1),
            }
        });
        Body::new(Tee { inner: body, copy: Some(BytesMut::new()), limit: self.max_body, done: Some(tx) })
    }

    async fn send(self: Arc<Self>, clients: Clients, copy: RequestCopy, body: Bytes, _permit: OwnedSemaphorePermit) {
        let Some(i) = self.pool.pick(&[]) else {
            self.skipped.increment(1);
            return;
        };
        let instance = &self.pool.instances[i];
        let (Some(_slot), Ok(uri)) = (instance.try_slot(), instance.uri(&copy.path_and_query)) else {
            self.skipped.increment(1);
            return;
        };
        let mut request = http::Request::new(Body::from(body));
        *request.method_mut() = copy.method;
        *request.uri_mut() = uri;
        *request.headers_mut() = copy.headers;
        request.headers_mut().insert(SHADOW_HEADER, HeaderValue::from_static("true"));
        *request.version_mut() = if self.pool.config.h2c { http::Version::HTTP_2 } else { http::Version::HTTP_11 };
        let exchange = async {
            let response = clients.for_pool(&self.pool).request(request).await.map_err(|e| e.to_string())?;
            // Read to the end (the connection goes back to the pool) and drop.
            let mut body = response.into_body();
            while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
                frame.map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(())) => {
                self.pool.record(i, Outcome::Ok);
                self.answered.increment(1);
            }
            outcome => {
                self.pool.record(i, Outcome::Failed);
                self.failed.increment(1);
                tracing::debug!(upstream = %self.pool.name, ?outcome, "a mirrored request failed (the client never sees it)");
            }
        }
    }
}

/// The client's body on its way to the primary, copied for the mirror as it passes.
struct Tee {
    inner: Body,
    copy: Option<BytesMut>,
    limit: u64,
    done: Option<oneshot::Sender<Bytes>>,
}

impl Tee {
    fn finish(&mut self) {
        if let (Some(copy), Some(done)) = (self.copy.take(), self.done.take()) {
            let _ = done.send(copy.freeze());
        }
    }
}

impl http_body::Body for Tee {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(copy)) = (frame.data_ref(), this.copy.as_mut()) {
                    if copy.len() as u64 + data.len() as u64 > this.limit {
                        // Too big to mirror: the copy is dropped, the primary goes on.
                        this.copy = None;
                        this.done = None;
                    } else {
                        copy.extend_from_slice(data);
                    }
                }
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Err(_))) => {
                this.copy = None;
                this.done = None;
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
