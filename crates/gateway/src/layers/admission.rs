//! Route admission: at most `max_in_flight` requests per route go on to the upstream at once,
//! each counted until its response body has been sent. Up to `max_queue` more wait for a slot,
//! first come first served, for at most `max_queue_ms`. Past that, a fast 503 `unavailable`
//! with `Retry-After`: no upstream work, no body read.
//!
//! Why a bounded queue and not only the limit: a burst a little above the limit waits a few
//! milliseconds instead of failing, while a sustained overload cannot build a queue that grows
//! until every request waits seconds (which is how a proxy collapses: all requests late instead
//! of some refused). A refusal costs the gateway a fraction of a forwarded request, so shedding
//! the excess keeps the admitted ones fast.
//!
//! tower's `ConcurrencyLimit` waits without bound and `LoadShed` refuses without waiting; this
//! is the two together, per route, with state that outlives a reload (the slots and the waiters
//! of a route whose `max_in_flight` did not change carry over, see `snapshot.rs`).
//!
//! Event streams (`GET` with `Accept: text/event-stream`) are admitted apart: a stream holds
//! its place for as long as the client listens, so streams take places of their own
//! (`max_streams` per route, no queue) and never one of the `max_in_flight` slots: a thousand
//! clients following their jobs cannot starve uploads or status reads. They are marked
//! ([`EventStream`]) so the router does not hold an upstream connection slot for them either.
//!
//! A refused request's body is not read: for a request that has one, the rest is drained for a
//! short while in the background and the connection closed (as the upload guard does), so the
//! client reads the 503 rather than a reset. A refused request without a body keeps its
//! connection: under overload, reconnecting would cost more than the refusal.

use super::{Pinned, ResponseFuture, ready};
use crate::snapshot::Route;
use axum::body::Body;
use axum::response::IntoResponse;
use futures_util::StreamExt;
use http::{HeaderValue, Request, Response, header};
use http_body::Body as _;
use http_body_util::BodyExt;
use metrics::{Counter, Gauge};
use pixmesh_chassis::{ApiError, ErrorCode, Shutdown};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::Service;

/// One route's slots and waiters, and its places for event streams. Shared by the
/// generations that keep its `max_in_flight` and `max_streams`.
#[derive(Debug)]
pub struct Admission {
    slots: Arc<Semaphore>,
    waiting: AtomicU32,
    max_in_flight: u32,
    streams: Arc<Semaphore>,
    max_streams: u32,
}

/// Marks a request admitted as an event stream (see the module doc).
#[derive(Debug, Clone, Copy)]
pub struct EventStream;

/// Whether `request` asks for an event stream: a `GET` that accepts `text/event-stream`.
pub fn is_event_stream<B>(request: &Request<B>) -> bool {
    request.method() == http::Method::GET
        && request
            .headers()
            .get_all(header::ACCEPT)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().to_ascii_lowercase().starts_with("text/event-stream"))))
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot taken and the queue full (or no queue): refused at once.
    QueueFull,
    /// Waited `max_queue_ms` without getting a slot.
    QueueTimeout,
    /// An event stream, with every place for streams taken.
    StreamsFull,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::QueueFull => "queue_full",
            Refusal::QueueTimeout => "queue_timeout",
            Refusal::StreamsFull => "streams_full",
        }
    }
}

/// Per-route admission metrics, registered with the route so the hot path does no label lookups.
#[derive(Debug, Clone)]
pub struct AdmissionMetrics {
    pub queue_full: Counter,
    pub queue_timeout: Counter,
    pub streams_full: Counter,
    pub queued: Gauge,
}

impl AdmissionMetrics {
    pub fn new(route: &str) -> AdmissionMetrics {
        let refused = |reason: &'static str| metrics::counter!(crate::instruments::ADMISSION_REFUSED, "http_route" => route.to_string(), "reason" => reason);
        AdmissionMetrics {
            queue_full: refused("queue_full"),
            queue_timeout: refused("queue_timeout"),
            streams_full: refused("streams_full"),
            queued: metrics::gauge!(crate::instruments::ADMISSION_QUEUED, "http_route" => route.to_string()),
        }
    }

    fn refused(&self, why: Refusal) {
        match why {
            Refusal::QueueFull => self.queue_full.increment(1),
            Refusal::QueueTimeout => self.queue_timeout.increment(1),
            Refusal::StreamsFull => self.streams_full.increment(1),
        }
    }
}

/// Counts a waiter from the moment it queues until it leaves the queue, however it leaves it
/// (admitted, timed out, or its client went away and the request future was dropped).
struct Waiter<'a> {
    admission: &'a Admission,
    queued: &'a Gauge,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.admission.waiting.fetch_sub(1, Ordering::AcqRel);
        self.queued.decrement(1.0);
    }
}

impl Admission {
    pub fn new(max_in_flight: u32, max_streams: u32) -> Admission {
        Admission {
            slots: Arc::new(Semaphore::new(max_in_flight as usize)),
            waiting: AtomicU32::new(0),
            max_in_flight,
            streams: Arc::new(Semaphore::new(max_streams as usize)),
            max_streams,
        }
    }

    pub fn max_in_flight(&self) -> u32 {
        self.max_in_flight
    }

    pub fn max_streams(&self) -> u32 {
        self.max_streams
    }

    /// A place for an event stream now, if one is free (streams do not queue).
    pub fn try_stream(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.streams).try_acquire_owned().ok()
    }

    /// Slots free now.
    pub fn available(&self) -> usize {
        self.slots.available_permits()
    }

    /// Requests waiting for a slot now.
    pub fn waiting(&self) -> u32 {
        self.waiting.load(Ordering::Acquire)
    }

    /// A slot now, if one is free. The semaphore is fair: while requests wait, a freed slot
    /// goes to the first of them, never to a newcomer.
    pub fn try_admit(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.slots).try_acquire_owned().ok()
    }

    /// A slot, waiting in line for at most `max_wait` behind at most `max_queue - 1` others.
    pub async fn admit(&self, max_queue: u32, max_wait: Duration, queued: &Gauge) -> Result<OwnedSemaphorePermit, Refusal> {
        if let Some(permit) = self.try_admit() {
            return Ok(permit);
        }
        // Take a place in the queue only if there is one (no check-then-add race).
        let placed = self.waiting.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max_queue).then_some(n + 1)).is_ok();
        if !placed {
            return Err(Refusal::QueueFull);
        }
        queued.increment(1.0);
        let _waiter = Waiter { admission: self, queued };
        match tokio::time::timeout(max_wait, Arc::clone(&self.slots).acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; treat it as a full queue if it ever were.
            Ok(Err(_)) => Err(Refusal::QueueFull),
            Err(_) => Err(Refusal::QueueTimeout),
        }
    }
}

/// Admission; `shutdown` ends the event streams it admitted (see [`AdmissionLayer::layer`]).
#[derive(Debug, Clone)]
pub struct AdmissionLayer {
    shutdown: Shutdown,
}

impl AdmissionLayer {
    /// When `shutdown` triggers, every event stream admitted here ends (cleanly, as if the
    /// upstream had ended it): its client reconnects to a gateway that is not going away, and
    /// the drain does not wait the whole grace period for bodies that never end.
    pub fn layer(shutdown: Shutdown) -> Self {
        AdmissionLayer { shutdown }
    }
}

impl<S> tower::Layer<S> for AdmissionLayer {
    type Service = AdmissionControl<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AdmissionControl { inner, shutdown: self.shutdown.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct AdmissionControl<S> {
    inner: S,
    shutdown: Shutdown,
}

/// The response of an event stream: its body until the gateway shuts down, its place held
/// until then.
async fn streaming<F, E>(
    place: OwnedSemaphorePermit,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
    future: F,
) -> Result<Response<Body>, E>
where
    F: std::future::Future<Output = Result<Response<Body>, E>>,
{
    let (parts, body) = future.await?.into_parts();
    let chunks = body.into_data_stream().take_until(stop).map(move |chunk| {
        let _held = &place;
        chunk
    });
    Ok(Response::from_parts(parts, Body::from_stream(chunks)))
}

/// The 503 for a request that was not admitted. Its body is left unread: lingered over and the
/// connection closed when there is one.
fn refuse(route: &Route, why: Refusal, body: Body) -> Response<Body> {
    route.admission_metrics.refused(why);
    let message = match why {
        Refusal::QueueFull => format!(
            "{} has {} requests in flight and {} waiting, its limits; retry in a second",
            route.prefix,
            route.admission.max_in_flight(),
            route.max_queue
        ),
        Refusal::QueueTimeout | Refusal::StreamsFull => format!(
            "{} had no free slot within {} ms ({} requests in flight, its limit); retry in a second",
            route.prefix,
            route.max_queue_wait.as_millis(),
            route.admission.max_in_flight()
        ),
    };
    let mut response = ApiError::new(ErrorCode::Unavailable, message).with_retry_after(1).into_response();
    if !body.is_end_stream() {
        super::upload_guard::linger(body);
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// The inner response, with the slot held until its body is done (or dropped), not only until
/// the headers.
async fn holding<F, E>(permit: OwnedSemaphorePermit, future: F) -> Result<Response<Body>, E>
where
    F: std::future::Future<Output = Result<Response<Body>, E>>,
{
    let (parts, body) = future.await?.into_parts();
    let body = body.map_err(move |e| {
        let _held = &permit;
        e
    });
    Ok(Response::from_parts(parts, Body::new(body)))
}

impl<S> Service<Request<Body>> for AdmissionControl<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let Some(route) = Pinned::of(&request).and_then(|p| p.route.clone()) else { return Box::pin(self.inner.call(request)) };
        if is_event_stream(&request) {
            let Some(place) = route.admission.try_stream() else {
                route.admission_metrics.refused(Refusal::StreamsFull);
                let message = format!(
                    "{} has {} event streams open, its limit; retry later, or poll the status",
                    route.prefix,
                    route.admission.max_streams()
                );
                return ready(ApiError::new(ErrorCode::Unavailable, message).with_retry_after(5).into_response());
            };
            request.extensions_mut().insert(EventStream);
            return Box::pin(streaming(place, self.shutdown.wait_owned(), self.inner.call(request)));
        }
        // The fast path: a free slot, no queue.
        if let Some(permit) = route.admission.try_admit() {
            return Box::pin(holding(permit, self.inner.call(request)));
        }
        if route.admission.waiting() >= route.max_queue {
            let (_, body) = request.into_parts();
            return ready(refuse(&route, Refusal::QueueFull, body));
        }
        // The service is called after an await: take the instance that was made ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            match route.admission.admit(route.max_queue, route.max_queue_wait, &route.admission_metrics.queued).await {
                Ok(permit) => holding(permit, inner.call(request)).await,
                Err(why) => {
                    let (_, body) = request.into_parts();
                    Ok(refuse(&route, why, body))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge() -> Gauge {
        Gauge::noop()
    }

    #[tokio::test(start_paused = true)]
    async fn admits_up_to_the_limit_then_queues_then_refuses() {
        let a = Arc::new(Admission::new(2, 1));
        let first = a.try_admit().unwrap();
        let _second = a.try_admit().unwrap();
        assert!(a.try_admit().is_none());
        // Two may wait; the third is refused at once.
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let a = Arc::clone(&a);
                tokio::spawn(async move { a.admit(2, Duration::from_secs(10), &gauge()).await.map(drop) })
            })
            .collect();
        tokio::task::yield_now().await;
        assert_eq!(a.waiting(), 2);
        assert_eq!(a.admit(2, Duration::from_secs(10), &gauge()).await.err(), Some(Refusal::QueueFull));
        // A freed slot goes to the first waiter, not to a newcomer.
        drop(first);
        assert!(a.try_admit().is_none(), "the freed slot is handed to a waiter");
        tokio::task::yield_now().await;
        let results: Vec<_> = futures_util::future::join_all(waiters).await.into_iter().map(|r| r.unwrap()).collect();
        assert!(results[0].is_ok(), "the first waiter got the freed slot");
        assert!(results[1].is_ok(), "the second got it after the first let go");
        assert_eq!(a.waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_times_out_and_a_dropped_one_leaves_the_queue() {
        let a = Admission::new(1, 1);
        let _held = a.try_admit().unwrap();
        let started = tokio::time::Instant::now();
        assert_eq!(a.admit(4, Duration::from_millis(300), &gauge()).await.err(), Some(Refusal::QueueTimeout));
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        assert_eq!(a.waiting(), 0);
        // A client that goes away while queued frees its place.
        let gone = tokio::time::timeout(Duration::from_millis(10), a.admit(1, Duration::from_secs(60), &gauge())).await;
        assert!(gone.is_err());
        assert_eq!(a.waiting(), 0, "the dropped waiter left the queue");
        // No queue: refused at once.
        assert_eq!(a.admit(0, Duration::from_secs(60), &gauge()).await.err(), Some(Refusal::QueueFull));
    }
}
