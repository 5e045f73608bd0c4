//! Pins the configuration generation current when a request arrives, with the route its path
//! matches, into the request's extensions. Every later layer and the router read these, so a
//! reload never changes the rules under a request in flight.

use crate::snapshot::{Route, Shared, Snapshot};
use axum::body::Body;
use http::{Request, Response};
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::{Layer, Service};

#[derive(Clone)]
pub struct Pinned {
    pub snapshot: Arc<Snapshot>,
    pub route: Option<Arc<Route>>,
}

impl Pinned {
    pub fn of<B>(request: &Request<B>) -> Option<&Pinned> {
        request.extensions().get::<Pinned>()
    }
}

#[derive(Clone)]
pub struct PinLayer {
    shared: Shared,
}

impl PinLayer {
    pub fn layer(shared: Shared) -> Self {
        PinLayer { shared }
    }
}

impl<S> Layer<S> for PinLayer {
    type Service = PinConfig<S>;
    fn layer(&self, inner: S) -> Self::Service {
        PinConfig { inner, shared: Arc::clone(&self.shared) }
    }
}

#[derive(Clone)]
pub struct PinConfig<S> {
    inner: S,
    shared: Shared,
}

impl<S> Service<Request<Body>> for PinConfig<S>
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
        let snapshot = self.shared.load_full();
        let route = snapshot.find(request.uri().path()).cloned();
        request.extensions_mut().insert(Pinned { snapshot, route });
        self.inner.call(request)
    }
}
