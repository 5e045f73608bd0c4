//! The admin listener every role serves: `/healthz`, `/readyz`, `/metrics`.
//!
//! `/healthz` answers 200 while the process runs. `/readyz` answers 200 only after the role said
//! it is ready, while every named check passes (e.g. `job_store`, `blob_store`: the stores can
//! be written), and until shutdown starts; otherwise 503, so load balancers stop sending work.
//! Its body names each check and why a failing one fails.

use crate::shutdown::Shutdown;
use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use http::StatusCode;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Readiness shared between a role and its admin listener: the role's own flag (set once it
/// serves) and named checks that subsystems keep up to date (a failing one holds the reason).
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    ready: Arc<AtomicBool>,
    checks: Arc<Mutex<BTreeMap<&'static str, Option<String>>>>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
    /// Records the latest result of check `name`: `Err` holds what an operator should read.
    pub fn set_check(&self, name: &'static str, result: Result<(), String>) {
        self.checks.lock().unwrap_or_else(PoisonError::into_inner).insert(name, result.err());
    }
    /// Every check with its state: `None` passes, `Some(reason)` fails.
    pub fn checks(&self) -> BTreeMap<&'static str, Option<String>> {
        self.checks.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
    /// The role said it is ready and no check fails.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && self.checks().values().all(Option::is_none)
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
    let checks = s.readiness.checks();
    let failing: Vec<&str> = checks.iter().filter(|(_, failure)| failure.is_some()).map(|(name, _)| *name).collect();
    let ready = s.readiness.is_ready() && !s.shutdown.is_triggered();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let word = if s.shutdown.is_triggered() {
        "shutting_down"
    } else if !failing.is_empty() {
        "failing"
    } else if ready {
        "ready"
    } else {
        "starting"
    };
    let details: serde_json::Map<String, serde_json::Value> =
        checks.into_iter().map(|(name, failure)| (name.to_string(), failure.unwrap_or_else(|| "ok".into()).into())).collect();
    (status, axum::Json(serde_json::json!({ "status": word, "role": s.role, "failing": failing, "checks": details })))
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

    #[tokio::test]
    async fn a_failing_check_turns_readiness_off_until_it_passes_again() {
        let readiness = Readiness::new();
        let app = router("test", readiness.clone(), Shutdown::new());
        readiness.set_check("job_store", Ok(()));
        readiness.set_ready(true);
        let (status, body) = get_status(&app, "/readyz").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.contains(r#""job_store":"ok""#), "{body}");
        readiness.set_check("blob_store", Err("the blob store's disk is full".into()));
        let (status, body) = get_status(&app, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "failing");
        assert_eq!(v["failing"], serde_json::json!(["blob_store"]));
        assert_eq!(v["checks"]["blob_store"], "the blob store's disk is full");
        assert_eq!(v["checks"]["job_store"], "ok");
        readiness.set_check("blob_store", Ok(()));
        assert_eq!(get_status(&app, "/readyz").await.0, StatusCode::OK);
    }
}
