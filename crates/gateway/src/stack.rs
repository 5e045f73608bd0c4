//! The gateway's middleware stack, assembled in one place. Read it top to bottom: a request
//! passes the layers in this order, and the response comes back through them in reverse.

use crate::keys::ApiKeys;
use crate::layers::{ApiKeyLayer, RequestIdLayer};
use crate::proxy::{self, Routes};
use axum::Router;
use std::sync::Arc;
use tower::ServiceBuilder;

pub fn app(routes: Routes, keys: ApiKeys, require_api_key: bool) -> Router {
    let interceptors = ServiceBuilder::new()
        // First, so every response (refusals included) carries an id to quote in bug reports.
        .layer(RequestIdLayer::layer())
        // Before anything that costs upstream work: an unauthenticated request stops here.
        .layer(ApiKeyLayer::layer(keys, require_api_key));
    Router::new().fallback(proxy::forward).with_state(Arc::new(routes)).layer(interceptors)
}
