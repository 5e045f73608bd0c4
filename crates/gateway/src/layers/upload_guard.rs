//! Upload guard: body limits for every route, and for image routes a look at the image header
//! before a single byte is forwarded.
//!
//! - `Content-Length` above the limit (the route's, or the key's): 413 at once, body unread.
//! - Image routes: the body is read until its format and size are known (the header bytes only,
//!   at most `probe_bytes`, within the route's timeout). A format not allowed → 415; a size
//!   above `max_pixels` or `max_side` → 413 `image_too_large`; a broken header → 422. Only then
//!   is the request forwarded, with the held bytes first. The upstream sees nothing of a refused
//!   upload. `multipart/form-data` is looked into: the `file` part is what is sized.
//! - Bodies without a length (chunked) are counted as they stream and cut at limit + 1 byte;
//!   the client gets a proper 413, the upstream an aborted request.
//!
//! A refused body is drained and thrown away for a short while before the connection closes,
//! so the client reads the refusal instead of a connection reset.

use super::{Pinned, ResponseFuture, ready};
use crate::keys::Client;
use crate::snapshot::ImageLimits;
use crate::sniff::{Part, Sniff, multipart_boundary, multipart_file, sniff};
use axum::body::Body;
use axum::response::IntoResponse;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, header};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use pixmesh_chassis::{ApiError, ErrorCode};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tower::Service;

/// How long and how much of a refused body is read and discarded before closing: enough for
/// the refusal to reach the client before the close resets the connection, little enough that
/// a flood of refused uploads costs the gateway almost nothing.
const LINGER: Duration = Duration::from_millis(100);
const LINGER_BYTES: u64 = 64 * 1024;

super::interceptor!(UploadGuardLayer, UploadGuard);

/// The limits for this request: the route's, with the key's overrides.
struct Limits {
    route: String,
    max_bytes: u64,
    image: Option<ImageLimits>,
    timeout: Duration,
}

fn limits<B>(request: &Request<B>) -> Option<Limits> {
    let route = Pinned::of(request)?.route.as_ref()?;
    let key = request.extensions().get::<Arc<Client>>().map(|c| &c.limits);
    let image = route.image.clone().map(|mut i| {
        if let Some(k) = key {
            i.max_pixels = k.max_pixels.unwrap_or(i.max_pixels);
            i.max_side = k.max_side.unwrap_or(i.max_side);
        }
        i
    });
    Some(Limits {
        route: route.prefix.clone(),
        max_bytes: key.and_then(|k| k.max_body_bytes).unwrap_or(route.max_body_bytes),
        image,
        timeout: route.timeout,
    })
}

fn too_long(limits: &Limits) -> ApiError {
    ApiError::new(
        ErrorCode::PayloadTooLarge,
        format!("the request body is larger than the limit of {} bytes for {}; send a smaller file", limits.max_bytes, limits.route),
    )
}

/// A refusal sent before the body was read: the rest of the body is drained in the background
/// (bounded) and the connection closed after the response.
fn refuse(body: Body, error: ApiError, since: Instant) -> Response<Body> {
    metrics::histogram!("pixmesh_gateway_upload_refusal_seconds").record(since.elapsed().as_secs_f64());
    linger(body);
    let mut response = error.into_response();
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Reads and throws away the rest of a refused body for a short while (bounded), in the
/// background, so the refusal reaches the client before the connection is reset. Admission
/// refusals use it too.
pub(super) fn linger(mut body: Body) {
    tokio::spawn(async move {
        let mut drained = 0u64;
        let _ = tokio::time::timeout(LINGER, async {
            while drained < LINGER_BYTES {
                match body.frame().await {
                    Some(Ok(frame)) => drained += frame.data_ref().map_or(0, |d| d.len() as u64),
                    _ => break,
                }
            }
        })
        .await;
    });
}

/// What the held bytes say.
enum Verdict {
    Undecided,
    Forward,
    Refuse(ApiError),
}

fn judge(held: &[u8], content_type: &str, limits: &ImageLimits, ended: bool) -> Verdict {
    let image = match multipart_boundary(content_type) {
        Some(boundary) => match multipart_file(held, &boundary) {
            Part::At(offset) => &held[offset..],
            // No `file` part: the upload service explains what it expects.
            Part::Missing => return Verdict::Forward,
            Part::NeedMore => &[][..],
            Part::Corrupt(why) => return Verdict::Refuse(ApiError::new(ErrorCode::BadRequest, format!("bad multipart body: {why}"))),
        },
        None => held,
    };
    let allowed = || limits.formats.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ");
    match sniff(image) {
        Sniff::Image { format, width, height } => {
            if !limits.formats.contains(&format) {
                return Verdict::Refuse(ApiError::new(
                    ErrorCode::UnsupportedFormat,
                    format!("{} images are not accepted here; send {}", format.name(), allowed()),
                ));
            }
            let pixels = u64::from(width) * u64::from(height);
            if pixels > limits.max_pixels || width.max(height) > limits.max_side {
                return Verdict::Refuse(ApiError::new(
                    ErrorCode::ImageTooLarge,
                    format!(
                        "the image is {width}×{height} ({:.1} MP); the limit is {:.1} MP and {} px per side; scale it down before uploading",
                        pixels as f64 / 1e6,
                        limits.max_pixels as f64 / 1e6,
                        limits.max_side
                    ),
                ));
            }
            Verdict::Forward
        }
        Sniff::Other(name) => {
            Verdict::Refuse(ApiError::new(ErrorCode::UnsupportedFormat, format!("{name} files are not accepted here; send {}", allowed())))
        }
        Sniff::Unknown => Verdict::Refuse(ApiError::new(
            ErrorCode::UnsupportedFormat,
            format!("the body is not an image pixmesh reads; send {} (as the raw body or a multipart `file` field)", allowed()),
        )),
        Sniff::Corrupt(format, why) => {
            Verdict::Refuse(ApiError::new(ErrorCode::CorruptImage, format!("the {} header is broken: {why}", format.name())))
        }
        Sniff::NeedMore if ended && held.is_empty() => {
            Verdict::Refuse(ApiError::new(ErrorCode::BadRequest, "the request body is empty; send the image in it"))
        }
        Sniff::NeedMore if ended => Verdict::Refuse(ApiError::new(ErrorCode::CorruptImage, "the body ends inside the image header")),
        Sniff::NeedMore if held.len() >= limits.probe_bytes => Verdict::Refuse(ApiError::new(
            ErrorCode::LimitExceeded,
            format!("no image size was found in the first {} bytes (metadata too large?)", limits.probe_bytes),
        )),
        Sniff::NeedMore => Verdict::Undecided,
    }
}

/// The request body as forwarded: the bytes held while judging, then the rest, counted.
struct Guarded {
    held: VecDeque<Frame<Bytes>>,
    rest: Option<Body>,
    seen: u64,
    max: u64,
    exceeded: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body is over its limit of {0} bytes")]
struct OverLimit(u64);

/// Set when the guard cut the body at its limit: the router then knows a failed upstream
/// request was the client's doing, not the upstream's.
#[derive(Debug, Clone)]
pub struct BodyOverLimit(pub Arc<AtomicBool>);

impl BodyOverLimit {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(frame) = self.held.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        let Some(rest) = self.rest.as_mut() else { return Poll::Ready(None) };
        match Pin::new(rest).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                self.seen += frame.data_ref().map_or(0, |d| d.len() as u64);
                if self.seen > self.max {
                    self.exceeded.store(true, Ordering::Relaxed);
                    if let Some(rest) = self.rest.take() {
                        linger(rest);
                    }
                    return Poll::Ready(Some(Err(axum::Error::new(OverLimit(self.max)))));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                self.rest = None;
                Poll::Ready(None)
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let held: u64 = self.held.iter().map(|f| f.data_ref().map_or(0, |d| d.len() as u64)).sum();
        let rest = self.rest.as_ref().map(|r| r.size_hint()).unwrap_or_else(|| SizeHint::with_exact(0));
        let mut hint = SizeHint::new();
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + held);
        }
        hint.set_lower(rest.lower() + held);
        hint
    }
}

impl<S> Service<Request<Body>> for UploadGuard<S>
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

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let arrived = Instant::now();
        let Some(limits) = limits(&request) else { return Box::pin(self.inner.call(request)) };
        let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limits.max_bytes) {
            metrics::counter!("pixmesh_gateway_uploads_refused_total", "reason" => "content_length").increment(1);
            let (_, body) = request.into_parts();
            return ready(refuse(body, too_long(&limits), arrived));
        }
        let has_body = !request.body().is_end_stream();
        let Some(image) = limits.image.clone().filter(|_| has_body) else {
            if declared.is_some() || !has_body {
                // Framed by Content-Length, already checked: nothing to count.
                return Box::pin(self.inner.call(request));
            }
            let (parts, body) = request.into_parts();
            return forward(&mut self.inner, parts, VecDeque::new(), Some(body), 0, limits);
        };
        // The service is called after an await: take the instance that was made ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let content_type = request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let (parts, mut body) = request.into_parts();
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + limits.timeout;
            let mut held_frames = VecDeque::new();
            let mut held: Vec<u8> = Vec::new();
            let mut seen = 0u64;
            let mut ended = false;
            loop {
                match judge(&held, &content_type, &image, ended) {
                    Verdict::Undecided => {}
                    Verdict::Forward => break,
                    Verdict::Refuse(error) => {
                        metrics::counter!("pixmesh_gateway_uploads_refused_total", "reason" => error.code.as_str()).increment(1);
                        return Ok(refuse(body, error, arrived));
                    }
                }
                match tokio::time::timeout_at(deadline, body.frame()).await {
                    Ok(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            seen += data.len() as u64;
                            if seen > limits.max_bytes {
                                return Ok(refuse(body, too_long(&limits), arrived));
                            }
                            let room = image.probe_bytes.saturating_sub(held.len());
                            held.extend_from_slice(&data[..data.len().min(room)]);
                        }
                        held_frames.push_back(frame);
                    }
                    Ok(None) => ended = true,
                    Ok(Some(Err(_))) => {
                        return Ok(ApiError::new(ErrorCode::BadRequest, "the upload was cut off before its image header").into_response());
                    }
                    Err(_) => {
                        let message = format!("the image header did not arrive within {} ms", limits.timeout.as_millis());
                        return Ok(refuse(body, ApiError::new(ErrorCode::Timeout, message), arrived));
                    }
                }
            }
            forward(&mut inner, parts, held_frames, (!ended).then_some(body), seen, limits).await
        })
    }
}

/// Forwards with the counted body; a body cut at its limit turns the answer into a 413.
fn forward<S>(
    inner: &mut S,
    mut parts: http::request::Parts,
    held: VecDeque<Frame<Bytes>>,
    rest: Option<Body>,
    seen: u64,
    limits: Limits,
) -> ResponseFuture<S::Error>
where
    S: Service<Request<Body>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    let exceeded = Arc::new(AtomicBool::new(false));
    parts.extensions.insert(BodyOverLimit(Arc::clone(&exceeded)));
    let body = Guarded { held, rest, seen, max: limits.max_bytes, exceeded: Arc::clone(&exceeded) };
    let future = inner.call(Request::from_parts(parts, Body::new(body)));
    Box::pin(async move {
        let response = future.await?;
        if exceeded.load(Ordering::Relaxed) {
            metrics::counter!("pixmesh_gateway_uploads_refused_total", "reason" => "streamed_length").increment(1);
            let mut refusal = too_long(&limits).into_response();
            refusal.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Ok(refusal);
        }
        Ok(response)
    })
}
