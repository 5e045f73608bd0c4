//! The admin listener every role serves: `/healthz`, `/readyz`, `/metrics`.
//!
//! `/healthz` answers 200 while the process runs. `/readyz` answers 200 only after the role said
//! it is ready and until shutdown starts; then 503, so load balancers stop sending work first.

use crate::shutdown::Shutdown;
use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use http::StatusCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Readiness flag shared between a role and its admin listener.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    ready: Arc<AtomicBool>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct AdminState {
    role: &'static str,
    readiness: Readiness,
    shutdown: Shutdown,
}

/// The admin router (separate from serving, so it can be tested without sockets).
pub fn router(role: &'static str, readiness: Readiness, shutdown: Shutdown) -> Router {
    Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz)).route("/metrics", get(metrics)).with_state(AdminState {
        role,
        readiness,
        shutdown,
    })
}

async fn healthz(State(s): State<AdminState>) -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok", "role": s.role }))
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let ready = s.readiness.is_ready() && !s.shutdown.is_triggered();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let word = if s.shutdown.is_triggered() {
        "shutting_down"
    } else if ready {
        "ready"
    } else {
        "starting"
    };
    (status, axum::Json(serde_json::json!({ "status": word, "role": s.role })))
}

async fn metrics() -> impl IntoResponse {
    ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::telemetry::render_metrics())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get_status(app: &Router, path: &str) -> (StatusCode, String) {
        let req = http::Request::get(path).body(axum::body::Body::empty()).unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn readiness_follows_the_flag_and_shutdown() {
        let readiness = Readiness::new();
        let shutdown = Shutdown::new();
        let app = router("test", readiness.clone(), shutdown.clone());
        assert_eq!(get_status(&app, "/healthz").await.0, StatusCode::OK);
        assert_eq!(get_status(&app, "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
        readiness.set_ready(true);
        assert_eq!(get_status(&app, "/readyz").await.0, StatusCode::OK);
        shutdown.trigger();
        let (status, body) = get_status(&app, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("shutting_down"));
        // Still alive while draining.
        assert_eq!(get_status(&app, "/healthz").await.0, StatusCode::OK);
    }
}
