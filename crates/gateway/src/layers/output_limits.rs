//! Output limits: on image routes, tells the upload service the largest output this request may
//! ask for (`x-pixmesh-max-output-pixels`, `x-pixmesh-max-output-side`): the key's limits where
//! it has them, else the route's; and, for a key limited to presets, which ones
//! (`x-pixmesh-presets`). A tiny upload must not be able to demand a 268 MP result.
//! The upload service refuses a request over them with 413 before a job exists; it never
//! raises them above its own configuration. Client-sent values were removed by the API-key
//! layer, which runs first.

use super::{Pinned, ResponseFuture};
use crate::keys::Client;
use axum::body::Body;
use http::{HeaderValue, Request, Response};
use pixmesh_chassis::headers::{MAX_OUTPUT_PIXELS, MAX_OUTPUT_SIDE, PRESETS};
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::Service;

super::interceptor!(OutputLimitsLayer, OutputLimits);

impl<S> Service<Request<Body>> for OutputLimits<S>
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

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        for name in [MAX_OUTPUT_PIXELS, MAX_OUTPUT_SIDE, PRESETS] {
            request.headers_mut().remove(name);
        }
        let image = Pinned::of(&request).and_then(|p| p.route.as_ref()).and_then(|r| r.image.as_ref());
        if let Some(image) = image {
            let key = request.extensions().get::<Arc<Client>>().map(|c| &c.limits);
            let pixels = key.and_then(|k| k.max_output_pixels).unwrap_or(image.max_output_pixels);
            let side = key.and_then(|k| k.max_output_side).unwrap_or(image.max_output_side);
            let presets = key.and_then(|k| k.presets.as_ref()).and_then(|p| HeaderValue::from_str(&p.join(",")).ok());
            request.headers_mut().insert(MAX_OUTPUT_PIXELS, HeaderValue::from(pixels));
            request.headers_mut().insert(MAX_OUTPUT_SIDE, HeaderValue::from(side));
            // A key limited to presets: the names it may use (checked when the key is loaded).
            if let Some(value) = presets {
                request.headers_mut().insert(PRESETS, value);
            }
        }
        Box::pin(self.inner.call(request))
    }
}
