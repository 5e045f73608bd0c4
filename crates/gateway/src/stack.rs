//! The gateway's middleware stack, assembled in one place. Read it top to bottom: a request
//! passes the layers in this order, and the response comes back through them in reverse.

use crate::cluster::Cluster;
use crate::layers::{
    AccessLogLayer, AdmissionLayer, ApiKeyLayer, OutputLimitsLayer, PinLayer, RateLimitLayer, RequestIdLayer, TraceparentLayer,
    UploadGuardLayer,
};
use crate::proxy;
use crate::snapshot::Shared;
use crate::upstream::Clients;
use axum::Router;
use axum::routing::get;
use pixmesh_chassis::Shutdown;
use tower::ServiceBuilder;

pub fn app(shared: Shared, clients: Clients, cluster: Cluster, shutdown: Shutdown) -> Router {
    let interceptors = ServiceBuilder::new()
        // The configuration generation and route this request is served by, whatever reloads.
        .layer(PinLayer::layer(shared))
        // Every response, refusals included, carries an id to quote in bug reports.
        .layer(RequestIdLayer::layer())
        // Continue the caller's trace, or start one.
        .layer(TraceparentLayer::layer())
        // Sees every outcome below it, refusals included.
        .layer(AccessLogLayer::layer())
        // Before anything that costs upstream work: an unauthenticated request stops here.
        .layer(ApiKeyLayer::layer())
        // Per key, so it needs the key.
        .layer(RateLimitLayer::layer())
        // The largest output this key may ask for, told to the upload service.
        .layer(OutputLimitsLayer::layer())
        // Body limits, and image size from the header bytes, before anything is forwarded.
        .layer(UploadGuardLayer::layer())
        // Last: only requests that will really be forwarded take a slot (or wait in the route's
        // bounded queue); past it a fast 503. After the guard, so a slow client sending its
        // image header holds no slot; the guard reads at most `probe_bytes` before it.
        // Event streams are admitted apart and end when the gateway shuts down.
        .layer(AdmissionLayer::layer(shutdown));
    // The gateway's own answers: `/api/cluster` behind the same interceptors as the API (key,
    // rate limit), the console's static page outside them (it is public; it sends the key).
    let cluster = Router::new().route("/api/cluster", get(crate::cluster::answer)).with_state(cluster);
    Router::new().fallback(proxy::forward).with_state(clients).merge(cluster).layer(interceptors).merge(crate::console::routes())
}

/// The inbound side of `pixmesh sidecar`, in front of one application it does not own: the
/// same interceptors minus what only pixmesh's API has (output limits, `/api/cluster`, the
/// console), so every path is the application's. A request passes, in order:
pub fn inbound(shared: Shared, clients: Clients, shutdown: Shutdown) -> Router {
    let interceptors = ServiceBuilder::new()
        // The configuration generation and route, whatever reloads.
        .layer(PinLayer::layer(shared))
        // An id on every response, refusals included (and passed to the application).
        .layer(RequestIdLayer::layer())
        // Continue the caller's trace, or start one; the application gets `traceparent`.
        .layer(TraceparentLayer::layer())
        // Sees every outcome below it, refusals included.
        .layer(AccessLogLayer::layer())
        // The caller: an `X-API-KEY`, or the TLS listener's verified client certificate.
        .layer(ApiKeyLayer::layer())
        // Per client.
        .layer(RateLimitLayer::layer())
        // Body limits (and image checks on routes that set `image`), before forwarding.
        .layer(UploadGuardLayer::layer())
        // Last: the route's in-flight slots and bounded queue, past them a fast 503.
        .layer(AdmissionLayer::layer(shutdown));
    Router::new().fallback(proxy::forward).with_state(clients).layer(interceptors)
}
