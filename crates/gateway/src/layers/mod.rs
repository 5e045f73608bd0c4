//! The gateway's interceptors: one tower `Layer` + `Service` per file.
//! The order they run in is decided in one place, [`crate::stack::app`].

pub mod access_log;
pub mod admission;
pub mod api_key;
pub mod output_limits;
pub mod pin;
pub mod rate_limit;
pub mod request_id;
pub mod traceparent;
pub mod upload_guard;

pub use access_log::AccessLogLayer;
pub use admission::AdmissionLayer;
pub use api_key::ApiKeyLayer;
pub use output_limits::OutputLimitsLayer;
pub use pin::{PinLayer, Pinned};
pub use rate_limit::RateLimitLayer;
pub use request_id::RequestIdLayer;
pub use traceparent::TraceparentLayer;
pub use upload_guard::UploadGuardLayer;

use axum::body::Body;
use http::Response;
use std::future::Future;
use std::pin::Pin;

/// Declares an interceptor without state of its own: `$layer::layer()` wraps a service in
/// `$service`, whose `Service` impl (in the interceptor's file) does the work.
macro_rules! interceptor {
    ($layer:ident, $service:ident) => {
        #[derive(Debug, Clone, Default)]
        pub struct $layer;

        impl $layer {
            pub fn layer() -> Self {
                $layer
            }
        }

        impl<S> tower::Layer<S> for $layer {
            type Service = $service<S>;
            fn layer(&self, inner: S) -> Self::Service {
                $service { inner }
            }
        }

        #[derive(Debug, Clone)]
        pub struct $service<S> {
            inner: S,
        }
    };
}
pub(crate) use interceptor;

/// The future every interceptor returns.
pub type ResponseFuture<E> = Pin<Box<dyn Future<Output = Result<Response<Body>, E>> + Send>>;

/// A response that is ready now.
pub fn ready<E: Send + 'static>(response: Response<Body>) -> ResponseFuture<E> {
    Box::pin(std::future::ready(Ok(response)))
}
