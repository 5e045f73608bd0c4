use crate::live::Hub;
use crate::view::{EventView, HistoryView, JobsPage, StatusView};
use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRef, Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use pixmesh_chassis::signed_url::Signer;
use pixmesh_chassis::{ApiError, ErrorBody, ErrorCode};
use pixmesh_store::{Job, JobState, StoreError, StoreErrorExt, Stores};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct App {
    pub(crate) stores: Stores,
    /// Signs `result_url` (`None`: plain paths, which need the API key).
    signer: Option<Arc<Signer>>,
    /// Live events for the SSE streams.
    pub(crate) hub: Arc<Hub>,
    /// Places for SSE streams (`status.max_streams`).
    pub(crate) streams: Arc<Semaphore>,
    /// The quiet time after which a stream sends a keep-alive comment.
    pub(crate) keep_alive: Duration,
    pub(crate) shutdown: pixmesh_chassis::Shutdown,
}

/// What the SSE streams need: the hub that the outbox tail feeds ([`Hub::tail`], run beside
/// the router), how many streams may be open at once, and their keep-alive interval.
#[derive(Clone)]
pub struct Live {
    pub hub: Arc<Hub>,
    pub max_streams: usize,
    pub keep_alive: Duration,
    /// Ends every stream when it triggers: a client reconnects (with `Last-Event-ID`) to a
    /// process that is not going away, and the drain does not wait for streams that never end.
    pub shutdown: pixmesh_chassis::Shutdown,
}

impl FromRef<App> for Stores {
    fn from_ref(app: &App) -> Stores {
        app.stores.clone()
    }
}

/// The status API, without a listener.
pub fn router(stores: Stores, signer: Option<Arc<Signer>>, live: Live) -> Router {
    let streams = Arc::new(Semaphore::new(live.max_streams));
    let app = App { stores, signer, hub: live.hub, streams, keep_alive: live.keep_alive, shutdown: live.shutdown };
    Router::new()
        .route("/api/status/{id}", get(status))
        .route("/api/status/{id}/history", get(history))
        .route("/api/status/{id}/events", get(crate::stream::job_events))
        .route("/api/events", get(crate::stream::owner_events))
        .route("/api/jobs", get(list))
        .route("/api/result/{id}", get(result))
        .route("/api/result/{id}/{output}", get(output_result))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
        .layer(pixmesh_chassis::http_span::ServerSpanLayer::new("status"))
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!(
            "no such endpoint: {}; use GET /api/status/{{id}}, /api/status/{{id}}/history, /api/status/{{id}}/events, /api/events, /api/jobs, /api/result/{{id}} or /api/result/{{id}}/{{output}}",
            request.uri().path()
        ),
    )
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(ErrorCode::MethodNotAllowed, format!("{} is not allowed on {}; use GET", request.method(), request.uri().path()))
}

fn store_error(e: StoreError) -> ApiError {
    tracing::error!(error = %e, "store error");
    e.api_error()
}

/// Longest id echoed back in an error; job ids are 36 characters.
const ECHO_ID_CHARS: usize = 64;

fn unknown(id: &str) -> ApiError {
    let shown: String = id.chars().take(ECHO_ID_CHARS).collect();
    let more = if shown.len() < id.len() { "…" } else { "" };
    ApiError::new(ErrorCode::NotFound, format!("no job with id {shown:?}{more}"))
}

/// The job id from the path; a path that does not decode gets the JSON error, not axum's text.
pub(crate) fn job_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(id)| id)
        .map_err(|_| ApiError::new(ErrorCode::NotFound, "no job with such an id (the id in the path is not valid UTF-8)"))
}

/// Who asks, as the gateway says: the key's name, whether it is an admin key, and whether the
/// request came with a valid signed URL (for this path) instead of a key.
pub(crate) struct Reader {
    pub(crate) client: String,
    admin: bool,
    signed: bool,
}

impl Reader {
    pub(crate) fn of(headers: &HeaderMap) -> Reader {
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        Reader {
            client: get(pixmesh_chassis::headers::CLIENT).unwrap_or("").to_string(),
            admin: get(pixmesh_chassis::headers::ADMIN) == Some("true"),
            signed: get(pixmesh_chassis::headers::SIGNED) == Some("true"),
        }
    }

    /// Jobs belong to the key that created them; another key is told there is no such job
    /// (not "forbidden": that would confirm the id exists).
    fn may_read(&self, owner: &str) -> bool {
        self.admin || self.signed || owner == self.client
    }
}

/// The job, if it exists and this reader may see it.
pub(crate) async fn readable(stores: &Stores, id: &str, reader: &Reader) -> Result<Job, ApiError> {
    let job = stores.jobs.get(id).await.map_err(store_error)?.ok_or_else(|| unknown(id))?;
    if !reader.may_read(&job.owner) {
        return Err(unknown(id));
    }
    Ok(job)
}

/// A job's status: its view from the projection, with the events the projector has not
/// applied yet (usually none) applied here; folded from the whole history only for a job the
/// projection has not reached.
#[utoipa::path(
    get,
    path = "/api/status/{id}",
    tag = "jobs",
    operation_id = "status",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "The job's state, and its result or error once it has one", body = StatusView),
        (status = 404, description = "No such job (or another key's)", body = ErrorBody),
        (status = 503, description = "The job store is down; retry", body = ErrorBody),
    ),
)]
pub(crate) async fn status(
    State(app): State<App>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = job_id(path)?;
    let reader = Reader::of(&headers);
    let jobs = &app.stores.jobs;
    let view = match app.stores.views.view(&id).await.map_err(store_error)? {
        Some(stored) if reader.may_read(&stored.owner) => {
            let newer = jobs.events_since(&id, stored.view.seq).await.map_err(store_error)?;
            crate::projection::current(stored.view, &newer)
        }
        Some(_) => return Err(unknown(&id)),
        None => {
            readable(&app.stores, &id, &reader).await?;
            pixmesh_store::fold(&jobs.events(&id).await.map_err(store_error)?).ok_or_else(|| unknown(&id))?
        }
    };
    let mut response = axum::Json(render(&app, view)).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// A view as the API shows it, with its download URLs (signed when there are signing keys).
fn render(app: &App, view: pixmesh_store::JobView) -> crate::view::StatusView {
    let mut view = crate::view::StatusView::from(view);
    if view.result.is_some() {
        view.result_url = Some(pixmesh_chassis::signed_url::result_url(app.signer.as_deref(), &view.id));
    }
    for output in view.outputs.iter_mut().filter(|o| o.state == "succeeded") {
        output.result_url = Some(pixmesh_chassis::signed_url::output_url(app.signer.as_deref(), &view.id, &output.name));
    }
    view
}

/// The query of a listing.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    state: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

/// Jobs listed at most per page.
const MAX_LIMIT: u32 = 100;

/// `GET /api/jobs?state=&limit=&cursor=`: the caller's own jobs, newest first, a page at a
/// time; `next_cursor` (absent on the last page) gives the next. Read from the projection,
/// which follows the events within milliseconds.
#[utoipa::path(
    get,
    path = "/api/jobs",
    tag = "jobs",
    operation_id = "list_jobs",
    params(
        ("state" = Option<String>, Query, description = "Only jobs in this state: queued, processing, succeeded or failed"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 100, description = "Jobs per page, 1–100 (20)"),
        ("cursor" = Option<String>, Query, description = "The `next_cursor` of the page before"),
    ),
    responses(
        (status = 200, description = "The caller's jobs, newest first", body = JobsPage),
        (status = 400, description = "A bad state, limit or cursor", body = ErrorBody),
        (status = 503, description = "The job store is down; retry", body = ErrorBody),
    ),
)]
pub(crate) async fn list(
    State(app): State<App>,
    query: Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let bad = |m: String| ApiError::new(ErrorCode::BadRequest, m);
    let axum::extract::Query(q) = query.map_err(|e| bad(format!("bad query: {}; use state, limit and cursor", e.body_text())))?;
    let reader = Reader::of(&headers);
    if reader.client.is_empty() {
        return Err(ApiError::new(ErrorCode::Unauthorized, "listing your jobs needs your API key (X-API-KEY)"));
    }
    let state = match q.state.as_deref() {
        None | Some("") => None,
        Some(s) => Some(pixmesh_store::JobState::parse(s).ok_or_else(|| {
            bad(format!("state must be queued, processing, succeeded or failed, got {:?}", s.chars().take(32).collect::<String>()))
        })?),
    };
    let limit = match q.limit.as_deref() {
        None => 20,
        Some(l) => {
            l.parse::<u32>().ok().filter(|n| (1..=MAX_LIMIT).contains(n)).ok_or_else(|| bad(format!("limit must be 1 to {MAX_LIMIT}")))?
        }
    };
    let after = q
        .cursor
        .as_deref()
        .map(parse_cursor)
        .transpose()
        .map_err(|_| bad("cursor is not one this API gave (use next_cursor as it came)".into()))?;
    let mut views = app.stores.views.list_views(&reader.client, state, after.as_ref(), limit + 1).await.map_err(store_error)?;
    let more = views.len() > limit as usize;
    views.truncate(limit as usize);
    let next_cursor = views.last().filter(|_| more).map(|v| hex::encode(format!("{}:{}", v.view.created_at, v.view.id)));
    let jobs: Vec<crate::view::StatusView> = views.into_iter().map(|v| render(&app, v.view)).collect();
    let mut response = axum::Json(crate::view::JobsPage { jobs, next_cursor }).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// A `next_cursor` back to the place it names.
fn parse_cursor(cursor: &str) -> Result<pixmesh_store::ViewsAfter, ()> {
    let text = String::from_utf8(hex::decode(cursor).map_err(drop)?).map_err(drop)?;
    let (at, id) = text.split_once(':').ok_or(())?;
    Ok(pixmesh_store::ViewsAfter { created_at: at.parse().map_err(drop)?, id: id.to_string() })
}

#[utoipa::path(
    get,
    path = "/api/status/{id}/history",
    tag = "jobs",
    operation_id = "history",
    params(("id" = String, Path, description = "The job's id")),
    responses(
        (status = 200, description = "Every event of the job, in order", body = HistoryView),
        (status = 404, description = "No such job (or another key's)", body = ErrorBody),
        (status = 503, description = "The job store is down; retry", body = ErrorBody),
    ),
)]
/// Every event of the job, in order, with its HLC time.
pub(crate) async fn history(
    State(stores): State<Stores>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = job_id(path)?;
    readable(&stores, &id, &Reader::of(&headers)).await?;
    let events = stores.jobs.events(&id).await.map_err(store_error)?;
    if events.is_empty() {
        return Err(unknown(&id));
    }
    let view = HistoryView { id, events: events.iter().map(EventView::from).collect() };
    let mut response = axum::Json(view).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

#[utoipa::path(
    get,
    path = "/api/result/{id}",
    tag = "results",
    operation_id = "result",
    params(
        ("id" = String, Path, description = "The job's id"),
        ("If-None-Match" = Option<String>, Header, description = "An ETag of the result: answered 304"),
    ),
    responses(
        (status = 200, description = "The image", content(("image/jpeg"), ("image/png"), ("image/webp")),
            headers(("ETag" = String, description = "The result's digest, quoted"))),
        (status = 304, description = "Not modified: the `If-None-Match` ETag is the result's"),
        (status = 404, description = "No such job, output or result (or another key's job)", body = ErrorBody),
        (status = 409, description = "Not ready: the job has not succeeded yet; retry after `Retry-After`", body = ErrorBody),
        (status = 413, description = "The job failed: its image or an output is over a limit", body = ErrorBody),
        (status = 415, description = "The job failed: its image is in a format pixmesh does not read", body = ErrorBody),
        (status = 422, description = "The job failed: its image is corrupt or breaks a processing limit", body = ErrorBody),
        (status = 503, description = "A store is down, or the job failed for want of a worker; retry", body = ErrorBody),
        (status = 504, description = "The job failed: its work did not finish within its deadline", body = ErrorBody),
    ),
)]
pub(crate) async fn result(
    State(stores): State<Stores>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = job_id(path)?;
    let job = succeeded(&stores, &id, &headers).await?;
    if job.is_saga() {
        let names: Vec<&str> = job.outputs.iter().map(|o| o.name.as_str()).collect();
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!(
                "job {id} has named outputs ({}), so it has no single result; download each at /api/result/{id}/{{output}}",
                names.join(", ")
            ),
        ));
    }
    let result = job.result.ok_or_else(|| ApiError::new(ErrorCode::Internal, "the job succeeded but has no result recorded"))?;
    download(&stores, &result, &headers, job.options.negotiated).await
}

/// (Its answers are those of `GET /api/result/{id}`: `openapi::openapi` copies them.)
#[utoipa::path(
    get,
    path = "/api/result/{id}/{output}",
    tag = "results",
    operation_id = "output_result",
    params(
        ("id" = String, Path, description = "The job's id"),
        ("output" = String, Path, description = "The output's name"),
        ("If-None-Match" = Option<String>, Header, description = "An ETag of the result: answered 304"),
    ),
)]
/// One named output of a job that has several.
pub(crate) async fn output_result(
    State(stores): State<Stores>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (id, output) =
        path.map(|Path(p)| p).map_err(|_| ApiError::new(ErrorCode::NotFound, "no job with such an id (the path is not valid UTF-8)"))?;
    let job = succeeded(&stores, &id, &headers).await?;
    let Some(step) = job.steps.get(&output).filter(|_| job.is_saga()) else {
        let shown: String = output.chars().take(ECHO_ID_CHARS).collect();
        let names: Vec<&str> = job.outputs.iter().map(|o| o.name.as_str()).collect();
        let message = if names.is_empty() {
            format!("job {id} has one unnamed output and no output {shown:?}; download it at /api/result/{id}")
        } else {
            format!("job {id} has no output {shown:?}; its outputs are {}", names.join(", "))
        };
        return Err(ApiError::new(ErrorCode::NotFound, message));
    };
    let negotiated = job.outputs.iter().any(|o| o.name == output && o.options.negotiated);
    download(&stores, &step.result, &headers, negotiated).await
}

/// The job, if this reader may see it and it has succeeded: otherwise the error that says
/// when it will have a result (queued, processing) or why it never will (failed).
async fn succeeded(stores: &Stores, id: &str, headers: &HeaderMap) -> Result<Job, ApiError> {
    let job = readable(stores, id, &Reader::of(headers)).await?;
    match job.state {
        JobState::Queued | JobState::Processing => Err(ApiError::new(
            ErrorCode::NotReady,
            format!("job {id} is {}; poll /api/status/{id} until it has succeeded", job.state.as_str()),
        )
        .with_retry_after(1)),
        JobState::Failed => {
            let error =
                job.error.clone().unwrap_or_else(|| pixmesh_store::JobError { code: "internal".into(), message: "unknown failure".into() });
            let code = ErrorCode::parse(&error.code).unwrap_or(ErrorCode::Internal);
            Err(ApiError::new(code, format!("job {id} failed, so it has no result: {}", error.message)))
        }
        JobState::Succeeded => Ok(job),
    }
}

/// A result's bytes, streamed, with its ETag (`If-None-Match` answered 304) and a long cache
/// life: a result never changes once the job succeeded. `negotiated`: its format was chosen
/// from the uploader's `Accept` (`format=auto`), said with `Vary: Accept`.
async fn download(stores: &Stores, result: &pixmesh_store::JobResult, headers: &HeaderMap, negotiated: bool) -> Result<Response, ApiError> {
    let vary = |response: &mut Response| {
        if negotiated {
            response.headers_mut().insert(header::VARY, HeaderValue::from_static("Accept"));
        }
    };
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
        vary(&mut response);
        return Ok(response);
    }
    // Streamed as it is read: a download holds a chunk at a time, not the whole image.
    let blob = stores
        .blobs
        .stream(result.blob.name())
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::new(ErrorCode::Internal, "the result image is missing from the blob store"))?;
    let mut response = axum::body::Body::from_stream(blob.chunks).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(blob.size));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&result.content_type).unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, cache);
    vary(&mut response);
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
    use tower::ServiceExt;

    /// The live events of `stores`, its outbox tailed for as long as the test runs.
    fn live(stores: &Stores) -> Live {
        let hub = Arc::new(Hub::default());
        tokio::spawn(Arc::clone(&hub).tail(Arc::clone(&stores.outbox), Arc::clone(&stores.jobs)));
        tokio::spawn(crate::projection::run(stores.clone(), Duration::from_millis(20)));
        Live { hub, max_streams: 4, keep_alive: Duration::from_millis(200), shutdown: pixmesh_chassis::Shutdown::new() }
    }

    async fn setup() -> (tempfile::TempDir, Router, Stores) {
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::open(&pixmesh_store::StoreConfig::default().with_data_dir(dir.path())).await.unwrap();
        (dir, router(stores.clone(), None, live(&stores)), stores)
    }

    async fn new_job(stores: &Stores, id: &str) {
        create(stores, id, "alice", Options::default(), Vec::new()).await;
    }

    /// A job of `owner` with these options and named outputs, as the upload service records it.
    async fn create(stores: &Stores, id: &str, owner: &str, options: Options, outputs: Vec<pixmesh_store::Output>) {
        let input = stores.blobs.put(Bytes::from_static(b"input")).await.unwrap();
        let job = NewJob {
            id: id.into(),
            owner: owner.into(),
            input,
            input_format: "png".into(),
            options,
            outputs,
            idempotency_key: None,
            request_hash: id.into(),
            traceparent: None,
        };
        stores.jobs.create(job).await.unwrap();
    }

    async fn get(app: &Router, uri: &str, etag: Option<&str>) -> (StatusCode, HeaderMap, Bytes) {
        get_as(app, uri, etag, &[(pixmesh_chassis::headers::CLIENT, "alice")]).await
    }

    async fn get_as(app: &Router, uri: &str, etag: Option<&str>, who: &[(&str, &str)]) -> (StatusCode, HeaderMap, Bytes) {
        let mut req = http::Request::get(uri);
        for (name, value) in who {
            req = req.header(*name, *value);
        }
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
        assert_eq!(v["result_url"], "/api/result/j1", "no signing keys: the plain path");
        let (s, h, body) = get(&app, "/api/result/j1", None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(h[header::CONTENT_TYPE], "image/webp");
        assert_eq!(body, Bytes::from_static(b"RIFFxxxxWEBP"));
        let etag = h[header::ETAG].to_str().unwrap().to_string();
        assert!(h[header::CACHE_CONTROL].to_str().unwrap().contains("immutable"));
        let (s, _, body) = get(&app, "/api/result/j1", Some(&etag)).await;
        assert_eq!((s, body.len()), (StatusCode::NOT_MODIFIED, 0));

        // The history: every event in order, each with its HLC time above the one before.
        let (s, h, body) = get(&app, "/api/status/j1/history", None).await;
        assert_eq!((s, h[header::CACHE_CONTROL].to_str().unwrap()), (StatusCode::OK, "no-store"));
        let v = json(&body);
        assert_eq!(v["id"], "j1");
        let events = v["events"].as_array().unwrap();
        let kinds: Vec<_> = events.iter().map(|e| (e["seq"].as_u64().unwrap(), e["kind"].as_str().unwrap())).collect();
        assert_eq!(kinds, vec![(1, "accepted"), (2, "claimed"), (3, "succeeded")]);
        let times: Vec<u64> = events.iter().map(|e| e["hlc"].as_str().unwrap().parse().unwrap()).collect();
        assert!(times.windows(2).all(|w| w[1] > w[0]), "{times:?}");
        assert_eq!(events[1]["data"]["owner"], "d");
        assert_eq!(events[2]["data"]["width"], 8);
        assert!(events[0]["at"].as_str().unwrap().ends_with('Z'));
        let (s, _, body) = get(&app, "/api/status/nope/history", None).await;
        assert_eq!((s, json(&body)["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
    }

    #[tokio::test]
    async fn a_job_with_named_outputs_lists_them_and_serves_each_at_its_own_path() {
        let (_dir, app, stores) = setup().await;
        let outputs = ["thumb", "large"].map(|n| pixmesh_store::Output { name: n.into(), options: Options::default() }).to_vec();
        create(&stores, "s1", "alice", Options::default(), outputs).await;
        let claimed = stores.jobs.claim("d", Duration::from_secs(10), 3).await.unwrap().unwrap();
        for (name, bytes) in [("thumb", b"thumb bytes".as_slice()), ("large", b"large bytes!".as_slice())] {
            let blob = stores.blobs.put_at(&pixmesh_store::output_key("s1", name, 1), Bytes::copy_from_slice(bytes)).await.unwrap();
            let result = JobResult { blob, format: "png".into(), content_type: "image/png".into(), width: 4, height: 2 };
            stores.jobs.record_output("s1", claimed.attempt, name, &result).await.unwrap();
            if name == "thumb" {
                let (_, _, body) = get(&app, "/api/status/s1", None).await;
                let v = json(&body);
                assert_eq!(v["outputs"][0]["state"], "made", "{v}");
                assert_eq!(v["outputs"][1]["state"], "pending", "{v}");
                assert!(v["outputs"][0].get("result_url").is_none(), "not downloadable before the pivot: {v}");
                let (s, _, _) = get(&app, "/api/result/s1/thumb", None).await;
                assert_eq!(s, StatusCode::CONFLICT, "not ready until every output is");
            }
        }
        let steps = stores.jobs.get("s1").await.unwrap().unwrap().steps;
        stores.jobs.succeed_outputs("s1", claimed.attempt, &steps).await.unwrap();
        let (s, _, body) = get(&app, "/api/status/s1", None).await;
        let v = json(&body);
        assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("succeeded")));
        assert_eq!(v["outputs"][1]["name"], "large");
        assert_eq!(v["outputs"][1]["state"], "succeeded");
        assert_eq!(v["outputs"][1]["result"]["bytes"], 12);
        assert_eq!(v["outputs"][1]["result_url"], "/api/result/s1/large");
        assert!(v.get("result_url").is_none(), "{v}");
        let (s, h, body) = get(&app, "/api/result/s1/large", None).await;
        assert_eq!(
            (s, h[header::CONTENT_TYPE].to_str().unwrap(), body.as_ref()),
            (StatusCode::OK, "image/png", b"large bytes!".as_slice())
        );
        let etag = h[header::ETAG].to_str().unwrap().to_string();
        let (s, _, _) = get(&app, "/api/result/s1/large", Some(&etag)).await;
        assert_eq!(s, StatusCode::NOT_MODIFIED);
        for (uri, says) in [
            ("/api/result/s1", "has named outputs (thumb, large)"),
            ("/api/result/s1/medium", "has no output \"medium\"; its outputs are thumb, large"),
        ] {
            let (s, _, body) = get(&app, uri, None).await;
            assert_eq!(s, StatusCode::NOT_FOUND, "{uri}");
            assert!(json(&body)["error"]["message"].as_str().unwrap().contains(says), "{uri}: {}", json(&body));
        }
        // Another key: no such job, on every path.
        let bob = [(pixmesh_chassis::headers::CLIENT, "bob")];
        let (s, _, _) = get_as(&app, "/api/result/s1/large", None, &bob).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        // A job with one unnamed output has no named ones.
        new_job(&stores, "plain").await;
        let job = stores.jobs.claim("d", Duration::from_secs(10), 3).await.unwrap().unwrap();
        let out = stores.blobs.put(Bytes::from_static(b"x")).await.unwrap();
        let result = JobResult { blob: out, format: "png".into(), content_type: "image/png".into(), width: 1, height: 1 };
        stores.jobs.succeed("plain", job.attempt, &result).await.unwrap();
        let (s, _, body) = get(&app, "/api/result/plain/thumb", None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert!(json(&body)["error"]["message"].as_str().unwrap().contains("one unnamed output"), "{}", json(&body));
    }

    /// One SSE frame: its id, event name and data.
    #[derive(Debug, PartialEq)]
    struct Frame {
        id: String,
        event: String,
        data: serde_json::Value,
    }

    /// Reads SSE frames from `body` until it ends or `n` frames came (comments skipped).
    async fn frames(body: &mut Body, n: usize) -> (Vec<Frame>, bool) {
        let mut text = String::new();
        let mut out = Vec::new();
        loop {
            while let Some(end) = text.find("\n\n") {
                let block: String = text.drain(..end + 2).collect();
                let field = |name: &str| block.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim_start().to_string());
                if let Some(data) = field("data:") {
                    out.push(Frame {
                        id: field("id:").unwrap_or_default(),
                        event: field("event:").unwrap_or_default(),
                        data: serde_json::from_str(&data).unwrap(),
                    });
                }
                if out.len() == n {
                    return (out, false);
                }
            }
            match tokio::time::timeout(Duration::from_secs(10), body.frame()).await.expect("the stream went quiet") {
                Some(Ok(frame)) => text.push_str(std::str::from_utf8(&frame.into_data().unwrap_or_default()).unwrap()),
                Some(Err(_)) | None => return (out, true),
            }
        }
    }

    async fn open(app: &Router, uri: &str, who: &str, last: Option<&str>) -> (StatusCode, Body) {
        let mut req = http::Request::get(uri).header(pixmesh_chassis::headers::CLIENT, who).header(header::ACCEPT, "text/event-stream");
        if let Some(last) = last {
            req = req.header("last-event-id", last);
        }
        let res = app.clone().oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
        (res.status(), res.into_body())
    }

    #[tokio::test]
    async fn a_jobs_event_stream_replays_then_follows_it_to_its_end() {
        let (_dir, app, stores) = setup().await;
        new_job(&stores, "j1").await;
        let (s, mut body) = open(&app, "/api/status/j1/events", "alice", None).await;
        assert_eq!(s, StatusCode::OK);
        let (got, ended) = frames(&mut body, 1).await;
        assert_eq!((got[0].id.as_str(), got[0].event.as_str(), ended), ("1", "accepted", false));
        assert_eq!(got[0].data["seq"], 1);
        // Live: the claim and the result, then the stream ends by itself.
        let job = stores.jobs.claim("d", Duration::from_secs(10), 3).await.unwrap().unwrap();
        let out = stores.blobs.put(Bytes::from_static(b"x")).await.unwrap();
        let result = JobResult { blob: out, format: "png".into(), content_type: "image/png".into(), width: 1, height: 1 };
        stores.jobs.succeed("j1", job.attempt, &result).await.unwrap();
        let (got, ended) = frames(&mut body, 10).await;
        let seen: Vec<(&str, &str)> = got.iter().map(|f| (f.id.as_str(), f.event.as_str())).collect();
        assert_eq!(seen, vec![("2", "claimed"), ("3", "succeeded")]);
        assert!(ended, "the stream ends after the terminal event");
        // Reconnecting after 1: 2 and 3 again, nothing before; after 3: nothing, at once.
        let (_, mut again) = open(&app, "/api/status/j1/events", "alice", Some("1")).await;
        let (got, ended) = frames(&mut again, 10).await;
        assert_eq!(got.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(), vec!["2", "3"]);
        assert!(ended);
        let (_, mut done) = open(&app, "/api/status/j1/events", "alice", Some("3")).await;
        let (got, ended) = frames(&mut done, 10).await;
        assert!(got.is_empty() && ended);
        // Another key: no such job; a Last-Event-ID that is not an id: 400.
        let (s, _) = open(&app, "/api/status/j1/events", "bob", None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, _) = open(&app, "/api/status/j1/events", "alice", Some("x")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn the_owners_stream_carries_only_that_keys_jobs_and_streams_are_limited() {
        let (_dir, app, stores) = setup().await;
        let (s, mut mine) = open(&app, "/api/events", "alice", None).await;
        assert_eq!(s, StatusCode::OK);
        new_job(&stores, "a1").await;
        create(&stores, "b1", "bob", Options::default(), Vec::new()).await;
        new_job(&stores, "a2").await;
        let (got, _) = frames(&mut mine, 2).await;
        assert!(got.iter().all(|f| f.event == "accepted"), "{got:?}");
        let first: i64 = got[0].id.parse().unwrap();
        let second: i64 = got[1].id.parse().unwrap();
        assert!(second > first + 1, "bob's event (between them) is not in alice's stream");
        // Reconnecting after the first: the second is replayed, and what comes next follows.
        let (_, mut again) = open(&app, "/api/events", "alice", Some(&first.to_string())).await;
        let (got, _) = frames(&mut again, 1).await;
        assert_eq!(got[0].id, second.to_string());
        // Four streams are open (the limit in these tests): a fifth is refused, not queued.
        let (_, _third) = open(&app, "/api/status/a1/events", "alice", None).await;
        let (_, _fourth) = open(&app, "/api/status/a2/events", "alice", None).await;
        let (s, _) = open(&app, "/api/status/a1/events", "alice", None).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        drop(mine);
        // A place comes back once a stream's client is gone.
        let started = std::time::Instant::now();
        loop {
            let (s, _) = open(&app, "/api/status/a1/events", "alice", None).await;
            if s == StatusCode::OK {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(5), "the place of a closed stream never came back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (s, _) = open(&app, "/api/events", "", None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn jobs_are_listed_newest_first_from_the_projection_which_rebuilds_to_the_same() {
        let (_dir, app, stores) = setup().await;
        for i in 0..5 {
            new_job(&stores, &format!("j{i}")).await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let job = stores.jobs.claim("d", Duration::from_secs(10), 3).await.unwrap().unwrap();
        let out = stores.blobs.put(Bytes::from_static(b"x")).await.unwrap();
        let result = JobResult { blob: out, format: "png".into(), content_type: "image/png".into(), width: 1, height: 1 };
        stores.jobs.succeed(&job.id, job.attempt, &result).await.unwrap();
        // The projector follows within moments.
        let page = |uri: &str| {
            let app = app.clone();
            let uri = uri.to_string();
            async move {
                let (s, _, body) = get(&app, &uri, None).await;
                assert_eq!(s, StatusCode::OK, "{uri}: {}", String::from_utf8_lossy(&body));
                let v = json(&body);
                let ids: Vec<String> = v["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_string()).collect();
                (ids, v["next_cursor"].as_str().map(str::to_string), v)
            }
        };
        let started = std::time::Instant::now();
        while page("/api/jobs?state=succeeded").await.0.len() != 1 {
            assert!(started.elapsed() < Duration::from_secs(5), "the projection did not catch up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (first, next, _) = page("/api/jobs?limit=2").await;
        assert_eq!(first, vec!["j4", "j3"]);
        let (second, next, _) = page(&format!("/api/jobs?limit=2&cursor={}", next.unwrap())).await;
        assert_eq!(second, vec!["j2", "j1"]);
        let (third, next, _) = page(&format!("/api/jobs?limit=2&cursor={}", next.unwrap())).await;
        assert_eq!((third, next), (vec!["j0".to_string()], None));
        let (done, _, v) = page("/api/jobs?state=succeeded").await;
        assert_eq!(done, vec!["j0"]);
        assert_eq!(v["jobs"][0]["result_url"], "/api/result/j0", "listed as the status shows it");
        // Another key lists none of them.
        let (s, _, body) = get_as(&app, "/api/jobs", None, &[(pixmesh_chassis::headers::CLIENT, "bob")]).await;
        assert_eq!((s, json(&body)["jobs"].as_array().unwrap().len()), (StatusCode::OK, 0));
        for bad in ["/api/jobs?limit=0", "/api/jobs?limit=101", "/api/jobs?state=lost", "/api/jobs?cursor=zz", "/api/jobs?sort=asc"] {
            let (s, _, body) = get(&app, bad, None).await;
            assert_eq!((s, json(&body)["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")), "{bad}");
        }
        // Dropped and rebuilt from the events: the same views.
        let before = stores.views.list_views("alice", None, None, 100).await.unwrap();
        assert_eq!(before.len(), 5);
        stores.views.clear_views().await.unwrap();
        assert!(stores.views.list_views("alice", None, None, 100).await.unwrap().is_empty());
        assert_eq!(crate::projection::rebuild(stores.jobs.as_ref(), stores.views.as_ref()).await.unwrap(), 5);
        assert_eq!(stores.views.list_views("alice", None, None, 100).await.unwrap(), before);
        // The status reads the projection and applies what it has not reached.
        let (_, _, body) = get(&app, "/api/status/j0", None).await;
        assert_eq!(json(&body)["state"], "succeeded");
    }

    #[tokio::test]
    async fn a_result_whose_format_was_negotiated_says_vary_accept() {
        let (_dir, app, stores) = setup().await;
        for (id, negotiated) in [("auto", true), ("fixed", false)] {
            let options = Options { format: pixmesh_imaging::OutputFormat::Webp, negotiated, ..Options::default() };
            create(&stores, id, "alice", options, Vec::new()).await;
            let claimed = stores.jobs.claim("d", Duration::from_secs(10), 3).await.unwrap().unwrap();
            let out = stores.blobs.put(Bytes::from_static(b"RIFFxxxxWEBP")).await.unwrap();
            let result = JobResult { blob: out, format: "webp".into(), content_type: "image/webp".into(), width: 1, height: 1 };
            stores.jobs.succeed(id, claimed.attempt, &result).await.unwrap();
            let (s, h, _) = get(&app, &format!("/api/result/{id}"), None).await;
            assert_eq!(s, StatusCode::OK);
            assert_eq!(h.get(header::VARY).map(|v| v.to_str().unwrap()), negotiated.then_some("Accept"), "{id}");
        }
    }

    #[tokio::test]
    async fn another_key_cannot_see_a_job_but_an_admin_key_can() {
        let (_dir, app, stores) = setup().await;
        new_job(&stores, "j3").await;
        let bob = [(pixmesh_chassis::headers::CLIENT, "bob")];
        for uri in ["/api/status/j3", "/api/status/j3/history", "/api/result/j3"] {
            let (s, _, body) = get_as(&app, uri, None, &bob).await;
            assert_eq!(s, StatusCode::NOT_FOUND, "{uri}");
            assert_eq!(json(&body)["error"]["message"], "no job with id \"j3\"", "the same answer as for no job at all");
            let (s, _, _) = get_as(&app, uri, None, &[]).await;
            assert_eq!(s, StatusCode::NOT_FOUND, "{uri} without a key");
            // Only the exact word makes an admin.
            let (s, _, _) =
                get_as(&app, uri, None, &[(pixmesh_chassis::headers::CLIENT, "bob"), (pixmesh_chassis::headers::ADMIN, "yes")]).await;
            assert_eq!(s, StatusCode::NOT_FOUND, "{uri}");
        }
        let ops = [(pixmesh_chassis::headers::CLIENT, "ops"), (pixmesh_chassis::headers::ADMIN, "true")];
        let (s, _, body) = get_as(&app, "/api/status/j3", None, &ops).await;
        assert_eq!((s, json(&body)["state"].as_str()), (StatusCode::OK, Some("queued")));
        let (s, _, _) = get_as(&app, "/api/result/j3", None, &ops).await;
        assert_eq!(s, StatusCode::CONFLICT, "the admin reads it: not ready yet");
    }

    #[tokio::test]
    async fn with_signing_keys_result_urls_are_signed_and_a_signed_request_reads_its_job() {
        let (_dir, _, stores) = setup().await;
        let key = pixmesh_chassis::signed_url::SigningKey { id: "k1".into(), secret: "0123456789abcdef0123456789abcdef".into() };
        let config = pixmesh_chassis::signed_url::SignedUrlConfig { keys: vec![key], ttl_s: 60 };
        let signer = Signer::new(&config).map(Arc::new);
        let app = router(stores.clone(), signer.clone(), live(&stores));
        new_job(&stores, "j4").await;
        let (_, _, body) = get(&app, "/api/status/j4", None).await;
        assert!(json(&body).get("result_url").is_none(), "no result yet, no URL");
        let job = stores.jobs.claim("d", Duration::from_secs(10), 3).await.unwrap().unwrap();
        let out = stores.blobs.put(Bytes::from_static(b"RIFFxxxxWEBP")).await.unwrap();
        let result = JobResult { blob: out, format: "webp".into(), content_type: "image/webp".into(), width: 8, height: 4 };
        stores.jobs.succeed("j4", job.attempt, &result).await.unwrap();
        let (_, _, body) = get(&app, "/api/status/j4", None).await;
        let url = json(&body)["result_url"].as_str().unwrap().to_string();
        let (path, query) = url.split_once('?').unwrap();
        assert_eq!(path, "/api/result/j4");
        let now = pixmesh_chassis::signed_url::now_s();
        assert_eq!(signer.unwrap().verify(path, Some(query), now), Some(Ok(())));
        // The gateway checked a signature: no client, yet the job reads. Without it, another
        // key is told there is no such job.
        let (s, _, body) = get_as(&app, "/api/result/j4", None, &[(pixmesh_chassis::headers::SIGNED, "true")]).await;
        assert_eq!((s, body), (StatusCode::OK, Bytes::from_static(b"RIFFxxxxWEBP")));
        let (s, _, _) = get_as(&app, "/api/result/j4", None, &[(pixmesh_chassis::headers::CLIENT, "bob")]).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn odd_ids_get_short_json_errors() {
        let (_dir, app, _stores) = setup().await;
        let long = "x".repeat(10_000);
        let (s, _, body) = get(&app, &format!("/api/status/{long}"), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let message = json(&body)["error"]["message"].as_str().unwrap().to_string();
        assert!(message.len() < 200, "the id is not echoed whole: {} bytes", message.len());
        for uri in ["/api/status/%ff%fe", "/api/result/%ff%fe"] {
            let (s, h, body) = get(&app, uri, None).await;
            assert_eq!(s, StatusCode::NOT_FOUND, "{uri}");
            assert_eq!(h[header::CONTENT_TYPE], "application/json");
            assert_eq!(json(&body)["error"]["code"], "not_found");
        }
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
