use crate::view::fold;
use axum::Router;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use pixmesh_chassis::{ApiError, ErrorCode};
use pixmesh_store::{JobState, StoreError, Stores};

/// The status API, without a listener.
pub fn router(stores: Stores) -> Router {
    Router::new()
        .route("/api/status/{id}", get(status))
        .route("/api/result/{id}", get(result))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(stores)
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("no such endpoint: {}; use GET /api/status/{{id}} or GET /api/result/{{id}}", request.uri().path()),
    )
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(ErrorCode::MethodNotAllowed, format!("{} is not allowed on {}; use GET", request.method(), request.uri().path()))
}

fn store_error(e: StoreError) -> ApiError {
    tracing::error!(error = %e, "store error");
    e.api_error()
}

fn unknown(id: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no job with id {id:?}"))
}

async fn status(State(stores): State<Stores>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let events = stores.jobs.events(&id).await.map_err(store_error)?;
    let view = fold(&events).ok_or_else(|| unknown(&id))?;
    let mut response = axum::Json(view).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

async fn result(State(stores): State<Stores>, Path(id): Path<String>, headers: HeaderMap) -> Result<Response, ApiError> {
    let job = stores.jobs.get(&id).await.map_err(store_error)?.ok_or_else(|| unknown(&id))?;
    match job.state {
        JobState::Queued | JobState::Processing => {
            return Err(ApiError::new(
                ErrorCode::NotReady,
                format!("job {id} is {}; poll /api/status/{id} until it has succeeded", job.state.as_str()),
            )
            .with_retry_after(1));
        }
        JobState::Failed => {
            let error = job.error.unwrap_or_else(|| pixmesh_store::JobError { code: "internal".into(), message: "unknown failure".into() });
            let code = ErrorCode::parse(&error.code).unwrap_or(ErrorCode::Internal);
            return Err(ApiError::new(code, format!("job {id} failed, so it has no result: {}", error.message)));
        }
        JobState::Succeeded => {}
    }
    let result = job.result.ok_or_else(|| ApiError::new(ErrorCode::Internal, "the job succeeded but has no result recorded"))?;
    let etag = format!("\"{}\"", result.blob.digest);
    let cache = HeaderValue::from_static("public, max-age=31536000, immutable");
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if matches {
        let mut response = StatusCode::NOT_MODIFIED.into_response();
        response.headers_mut().insert(header::CACHE_CONTROL, cache);
        if let Ok(v) = HeaderValue::from_str(&etag) {
            response.headers_mut().insert(header::ETAG, v);
        }
        return Ok(response);
    }
    let bytes = stores
        .blobs
        .get(&result.blob.digest)
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::new(ErrorCode::Internal, "the result image is missing from the blob store"))?;
    let mut response = bytes.into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&result.content_type).unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, cache);
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use pixmesh_imaging::Options;
    use pixmesh_store::{JobError, JobResult, NewJob};
    use std::time::Duration;
    use tower::ServiceExt;

    async fn setup() -> (tempfile::TempDir, Router, Stores) {
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::open(&pixmesh_store::StoreConfig::default().with_data_dir(dir.path())).await.unwrap();
        (dir, router(stores.clone()), stores)
    }

    async fn new_job(stores: &Stores, id: &str) {
        let input = stores.blobs.put(Bytes::from_static(b"input")).await.unwrap();
        let job = NewJob {
            id: id.into(),
            input,
            input_format: "png".into(),
            options: Options::default(),
            idempotency_key: None,
            request_hash: "h".into(),
        };
        stores.jobs.create(job).await.unwrap();
    }

    async fn get(app: &Router, uri: &str, etag: Option<&str>) -> (StatusCode, HeaderMap, Bytes) {
        let mut req = http::Request::get(uri);
        if let Some(e) = etag {
            req = req.header(header::IF_NONE_MATCH, e);
        }
        let res = app.clone().oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
        let (parts, body) = res.into_parts();
        (parts.status, parts.headers, body.collect().await.unwrap().to_bytes())
    }

    fn json(b: &Bytes) -> serde_json::Value {
        serde_json::from_slice(b).unwrap()
    }

    #[tokio::test]
    async fn status_and_result_follow_the_job() {
        let (_dir, app, stores) = setup().await;
        let (s, _, body) = get(&app, "/api/status/nope", None).await;
        assert_eq!((s, json(&body)["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
        let (s, _, _) = get(&app, "/api/result/nope", None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);

        new_job(&stores, "j1").await;
        let (s, _, body) = get(&app, "/api/status/j1", None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(json(&body)["state"], "queued");
        let (s, h, body) = get(&app, "/api/result/j1", None).await;
        assert_eq!(s, StatusCode::CONFLICT);
        assert_eq!(json(&body)["error"]["code"], "not_ready");
        assert_eq!(h[header::RETRY_AFTER], "1");

        let job = stores.jobs.claim("d", Duration::from_secs(10), 3).await.unwrap().unwrap();
        let out = stores.blobs.put(Bytes::from_static(b"RIFFxxxxWEBP")).await.unwrap();
        let result = JobResult { blob: out.clone(), format: "webp".into(), content_type: "image/webp".into(), width: 8, height: 4 };
        stores.jobs.succeed("j1", job.attempt, &result).await.unwrap();

        let (s, _, body) = get(&app, "/api/status/j1", None).await;
        let v = json(&body);
        assert_eq!((s, v["state"].as_str(), v["attempts"].as_u64()), (StatusCode::OK, Some("succeeded"), Some(1)));
        assert_eq!(v["result"], serde_json::json!({"width": 8, "height": 4, "format": "webp", "bytes": out.size}));
        let (s, h, body) = get(&app, "/api/result/j1", None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(h[header::CONTENT_TYPE], "image/webp");
        assert_eq!(body, Bytes::from_static(b"RIFFxxxxWEBP"));
        let etag = h[header::ETAG].to_str().unwrap().to_string();
        assert!(h[header::CACHE_CONTROL].to_str().unwrap().contains("immutable"));
        let (s, _, body) = get(&app, "/api/result/j1", Some(&etag)).await;
        assert_eq!((s, body.len()), (StatusCode::NOT_MODIFIED, 0));
    }

    #[tokio::test]
    async fn failed_jobs_explain_why_there_is_no_result() {
        let (_dir, app, stores) = setup().await;
        new_job(&stores, "j2").await;
        let job = stores.jobs.claim("d", Duration::from_secs(10), 3).await.unwrap().unwrap();
        stores.jobs.fail("j2", job.attempt, &JobError { code: "corrupt_image".into(), message: "truncated PNG".into() }).await.unwrap();
        let (_, _, body) = get(&app, "/api/status/j2", None).await;
        assert_eq!(json(&body)["error"], serde_json::json!({"code": "corrupt_image", "message": "truncated PNG"}));
        let (s, _, body) = get(&app, "/api/result/j2", None).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(json(&body)["error"]["message"].as_str().unwrap().contains("truncated PNG"));
    }
}
