//! Upload guard: body limits for every route, and for image routes a look at the image header
//! before the image is handed on.
//!
//! - `Content-Length` above the limit (the route's, or the key's): 413 at once, body unread.
//! - Image routes: the body is judged as it arrives (`Judge`): the format from its first bytes,
//!   the size from its header. A `multipart/form-data` body is judged by the rule it shares with
//!   the upload service (`pixmesh_chassis::multipart`: one parser, one rule for which part is the
//!   image), so the part sized here is exactly the part the upload service stores. A format not
//!   allowed → 415; a size above `max_pixels` or `max_side` → 413 `image_too_large`; a broken
//!   header → 422; a malformed form, one without an image part or with several → 400.
//! - Held, then streamed. The guard holds the first bytes of the body until the verdict, up to
//!   `probe_bytes`; nearly every upload is decided within them, and the upstream then sees
//!   nothing of a refused one. An image whose header lies further (a camera JPEG with megabytes
//!   of EXIF, previews and ICC profile before its frame header; a form whose image part follows
//!   a large text field) is forwarded as it streams while the guard goes on judging the bytes
//!   that pass, in constant memory (the JPEG segments are walked by their lengths). A refusal
//!   then cuts the forwarded body before its last byte: the upstream gets an aborted request,
//!   never a complete refused upload (so it stores nothing), and the client the same refusal.
//!   Forms are watched to their end, so a second image part is refused here too.
//!
//!   Why not hold such bodies until the header is found: the gateway would hold megabytes per
//!   request, and a shared budget to bound that under a flood would turn away genuine photos
//!   with 503 whenever hostile uploads fill it. Why not leave them to the upload service: it
//!   does not know the route's and the key's limits, only its own.
//! - Every body is counted as it streams and cut at limit + 1 byte (a chunked body has no length
//!   to check up front): the client gets a proper 413, the upstream an aborted request.
//! - A client too slow to send its body gets 408 `request_timeout`: while the guard waits for
//!   the image header, or when the route's timeout passes while the upstream waits for the
//!   body (`ClientBody::is_waiting` tells the router which side is slow).
//!
//! A refused body is drained and thrown away for a short while before the connection closes,
//! so the client reads the refusal instead of a connection reset.

use super::{Pinned, ResponseFuture, ready};
use crate::keys::Client;
use crate::snapshot::ImageLimits;
use crate::sniff::{Sniff, Sniffer};
use axum::body::Body;
use axum::response::IntoResponse;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, header};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use pixmesh_chassis::multipart::{self, ImageEvent, ImageForm, MultipartError};
use pixmesh_chassis::{ApiError, ErrorCode};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
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
    metrics::histogram!(crate::instruments::UPLOAD_REFUSAL).record(since.elapsed().as_secs_f64());
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

/// Where the judging of an image body stands.
#[derive(Debug)]
enum Verdict {
    /// Not enough bytes yet.
    Undecided,
    /// The image is within the limits. For a form, the rest is still watched and may be refused.
    Forward,
    Refuse(ApiError),
}

fn bad_form(e: MultipartError) -> ApiError {
    ApiError::new(ErrorCode::BadRequest, e.to_string())
}

/// Judges an image body as it streams past, holding no body bytes: the sniffer's prefix (64
/// bytes) and, for a form, the parser's part headers (16 KiB at most) are all it keeps.
struct Judge {
    limits: ImageLimits,
    form: Option<ImageForm>,
    sniffer: Sniffer,
    /// The image's verdict once known: within the limits, or why not.
    image: Option<Result<(), ApiError>>,
}

impl Judge {
    fn new(content_type: &str, limits: ImageLimits) -> Result<Judge, ApiError> {
        let form = multipart::boundary(content_type).map_err(bad_form)?.map(|b| ImageForm::new(&b));
        Ok(Judge { limits, form, sniffer: Sniffer::default(), image: None })
    }

    /// Nothing left to judge: the image passed and, for a form, its closing boundary was read.
    fn is_done(&self) -> bool {
        matches!(self.image, Some(Ok(()))) && self.form.as_ref().is_none_or(ImageForm::is_complete)
    }

    fn feed(&mut self, chunk: &[u8]) -> Verdict {
        let Judge { limits, form, sniffer, image } = self;
        match form {
            None => {
                if image.is_none() {
                    let sniff = sniffer.feed(chunk);
                    *image = check(sniff, sniffer, limits, false);
                }
            }
            Some(form) => {
                let result = form.feed(chunk, &mut |event| {
                    if image.is_some() {
                        return;
                    }
                    *image = match event {
                        ImageEvent::Data { bytes, .. } => {
                            let sniff = sniffer.feed(bytes);
                            check(sniff, sniffer, limits, false)
                        }
                        ImageEvent::End { .. } => check(Sniff::NeedMore, sniffer, limits, true),
                    };
                });
                if let (Err(e), None | Some(Ok(()))) = (result, &image) {
                    return Verdict::Refuse(bad_form(e));
                }
            }
        }
        self.verdict()
    }

    /// The body ended (or its last byte was fed).
    fn finish(&mut self) -> Verdict {
        if let Some(Err(e)) = &self.image {
            return Verdict::Refuse(e.clone());
        }
        if let Some(form) = &self.form
            && let Err(e) = form.finish()
        {
            return Verdict::Refuse(bad_form(e));
        }
        if self.image.is_none() {
            self.image = check(Sniff::NeedMore, &self.sniffer, &self.limits, true);
        }
        self.verdict()
    }

    fn verdict(&self) -> Verdict {
        match &self.image {
            Some(Err(e)) => Verdict::Refuse(e.clone()),
            Some(Ok(())) => Verdict::Forward,
            None => Verdict::Undecided,
        }
    }
}

/// The verdict on what the sniffer says of the image so far; `None` while it needs more bytes
/// and more may come.
fn check(sniff: Sniff, sniffer: &Sniffer, limits: &ImageLimits, ended: bool) -> Option<Result<(), ApiError>> {
    let allowed = || limits.formats.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ");
    let refuse = |code, message: String| Some(Err(ApiError::new(code, message)));
    let not_allowed = |format: crate::sniff::Format| format!("{} images are not accepted here; send {}", format.name(), allowed());
    match sniff {
        Sniff::Image { format, width, height } => {
            if !limits.formats.contains(&format) {
                return refuse(ErrorCode::UnsupportedFormat, not_allowed(format));
            }
            let pixels = u64::from(width) * u64::from(height);
            if pixels > limits.max_pixels || width.max(height) > limits.max_side {
                return refuse(
                    ErrorCode::ImageTooLarge,
                    format!(
                        "the image is {width}×{height} ({:.1} MP); the limit is {:.1} MP and {} px per side; scale it down before uploading",
                        pixels as f64 / 1e6,
                        limits.max_pixels as f64 / 1e6,
                        limits.max_side
                    ),
                );
            }
            Some(Ok(()))
        }
        Sniff::Other(name) => refuse(ErrorCode::UnsupportedFormat, format!("{name} files are not accepted here; send {}", allowed())),
        Sniff::Unknown => refuse(
            ErrorCode::UnsupportedFormat,
            format!("the body is not an image pixmesh reads; send {} (as the raw body or a multipart `file` field)", allowed()),
        ),
        Sniff::Corrupt(format, why) => refuse(ErrorCode::CorruptImage, format!("the {} header is broken: {why}", format.name())),
        // A format not accepted here is refused as soon as its first bytes tell it.
        Sniff::NeedMore if sniffer.format().is_some_and(|f| !limits.formats.contains(&f)) => {
            refuse(ErrorCode::UnsupportedFormat, not_allowed(sniffer.format()?))
        }
        Sniff::NeedMore if ended && sniffer.seen() == 0 => refuse(ErrorCode::BadRequest, "the image is empty; send the image bytes".into()),
        Sniff::NeedMore if ended => refuse(ErrorCode::CorruptImage, "the image ends inside its header".into()),
        Sniff::NeedMore => None,
    }
}

/// The guard's watch over a forwarded body, shared with the router as a request extension.
#[derive(Debug, Clone, Default)]
pub struct ClientBody(Arc<Watch>);

#[derive(Debug, Default)]
struct Watch {
    /// Why the guard cut the body, once it did.
    refusal: OnceLock<ApiError>,
    /// The last read of the client's body is still waiting for bytes.
    waiting: AtomicBool,
}

impl ClientBody {
    /// The guard cut the body (over its limit, or refused as it streamed): a failed upstream
    /// request is the client's doing, and the guard answers it.
    pub fn is_cut(&self) -> bool {
        self.0.refusal.get().is_some()
    }

    /// The upstream is waiting for body bytes the client has not sent: a deadline that passes
    /// now is the client's slowness, not the upstream's. (An upstream that stops reading stops
    /// asking for bytes, so this is then false.)
    pub fn is_waiting(&self) -> bool {
        self.0.waiting.load(Ordering::Relaxed)
    }

    fn refusal(&self) -> Option<&ApiError> {
        self.0.refusal.get()
    }
}

/// The request body as forwarded: the bytes held while judging, then the rest, counted and,
/// while the verdict is open, judged on the way.
struct Guarded {
    held: VecDeque<Frame<Bytes>>,
    rest: Option<Body>,
    seen: u64,
    limits: Limits,
    judge: Option<Judge>,
    watch: ClientBody,
}

#[derive(Debug, thiserror::Error)]
#[error("the upload guard cut the request body: {0}")]
struct Cut(ApiError);

impl Guarded {
    /// Stops the body with an error, so the upstream request is aborted before it is complete;
    /// the client gets `error` (see [`forward`]).
    fn cut(&mut self, error: ApiError) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let _ = self.watch.0.refusal.set(error.clone());
        self.judge = None;
        if let Some(rest) = self.rest.take() {
            linger(rest);
        }
        Poll::Ready(Some(Err(axum::Error::new(Cut(error)))))
    }
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(frame) = this.held.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        let Some(rest) = this.rest.as_mut() else { return Poll::Ready(None) };
        let polled = Pin::new(&mut *rest).poll_frame(cx);
        this.watch.0.waiting.store(polled.is_pending(), Ordering::Relaxed);
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                let Some(data) = frame.data_ref() else { return Poll::Ready(Some(Ok(frame))) };
                this.seen += data.len() as u64;
                if this.seen > this.limits.max_bytes {
                    let error = too_long(&this.limits);
                    return this.cut(error);
                }
                if let Some(judge) = this.judge.as_mut() {
                    let mut verdict = judge.feed(data);
                    // The last byte is not let through before the verdict: with a length, the
                    // upstream would take the request as complete.
                    if !matches!(verdict, Verdict::Refuse(_)) && (rest.is_end_stream() || rest.size_hint().exact() == Some(0)) {
                        verdict = judge.finish();
                    }
                    if let Verdict::Refuse(error) = verdict {
                        return this.cut(error);
                    }
                    if judge.is_done() {
                        this.judge = None;
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.rest = None;
                if let Some(mut judge) = this.judge.take()
                    && let Verdict::Refuse(error) = judge.finish()
                {
                    return this.cut(error);
                }
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
            metrics::counter!(crate::instruments::UPLOADS_REFUSED, "reason" => "content_length").increment(1);
            let (_, body) = request.into_parts();
            return ready(refuse(body, too_long(&limits), arrived));
        }
        if request.body().is_end_stream() {
            return Box::pin(self.inner.call(request));
        }
        let Some(image) = limits.image.clone() else {
            // Counted (a chunked body has no length to check up front) and watched for a slow client.
            let (parts, body) = request.into_parts();
            return forward(&mut self.inner, parts, VecDeque::new(), Some(body), 0, limits, None);
        };
        // The service is called after an await: take the instance that was made ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let content_type = request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let (parts, mut body) = request.into_parts();
        Box::pin(async move {
            let refused = |body, error: ApiError| {
                metrics::counter!(crate::instruments::UPLOADS_REFUSED, "reason" => error.code.as_str()).increment(1);
                Ok(refuse(body, error, arrived))
            };
            let mut judge = match Judge::new(&content_type, image.clone()) {
                Ok(judge) => judge,
                Err(error) => return refused(body, error),
            };
            let deadline = tokio::time::Instant::now() + limits.timeout;
            let mut held = VecDeque::new();
            let mut held_bytes = 0usize;
            let mut seen = 0u64;
            let mut ended = false;
            let mut verdict = Verdict::Undecided;
            loop {
                match verdict {
                    Verdict::Refuse(error) => return refused(body, error),
                    Verdict::Forward => break,
                    Verdict::Undecided if held_bytes >= image.probe_bytes => {
                        // Judged on the way from here on (see the module comment).
                        metrics::counter!(crate::instruments::UPLOADS_STREAMED_UNDECIDED).increment(1);
                        break;
                    }
                    Verdict::Undecided => {}
                }
                match tokio::time::timeout_at(deadline, body.frame()).await {
                    Ok(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            seen += data.len() as u64;
                            if seen > limits.max_bytes {
                                return refused(body, too_long(&limits));
                            }
                            held_bytes += data.len();
                            verdict = judge.feed(data);
                            if !matches!(verdict, Verdict::Refuse(_)) && (body.is_end_stream() || body.size_hint().exact() == Some(0)) {
                                verdict = judge.finish();
                            }
                        }
                        held.push_back(frame);
                    }
                    Ok(None) => {
                        ended = true;
                        verdict = judge.finish();
                    }
                    Ok(Some(Err(_))) => {
                        return Ok(ApiError::new(ErrorCode::BadRequest, "the upload was cut off before its image header").into_response());
                    }
                    Err(_) => {
                        let message = format!(
                            "the image header did not arrive within {} ms; send the upload faster (or a smaller file)",
                            limits.timeout.as_millis()
                        );
                        return refused(body, ApiError::new(ErrorCode::RequestTimeout, message));
                    }
                }
            }
            let judge = (!judge.is_done()).then_some(judge);
            forward(&mut inner, parts, held, (!ended).then_some(body), seen, limits, judge).await
        })
    }
}

/// Forwards with the guarded body; a body the guard cut turns the answer into its refusal.
fn forward<S>(
    inner: &mut S,
    mut parts: http::request::Parts,
    held: VecDeque<Frame<Bytes>>,
    rest: Option<Body>,
    seen: u64,
    limits: Limits,
    judge: Option<Judge>,
) -> ResponseFuture<S::Error>
where
    S: Service<Request<Body>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    let watch = ClientBody::default();
    parts.extensions.insert(watch.clone());
    let body = Guarded { held, rest, seen, limits, judge, watch: watch.clone() };
    let future = inner.call(Request::from_parts(parts, Body::new(body)));
    Box::pin(async move {
        let response = future.await?;
        if let Some(error) = watch.refusal() {
            let reason = if error.code == ErrorCode::PayloadTooLarge { "streamed_length" } else { error.code.as_str() };
            metrics::counter!(crate::instruments::UPLOADS_REFUSED, "reason" => reason).increment(1);
            let mut refusal = error.clone().into_response();
            refusal.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Ok(refusal);
        }
        Ok(response)
    })
}
