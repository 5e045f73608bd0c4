//! The status API's part of the OpenAPI document, and the route that serves the whole
//! document (`GET /api/openapi.json`): assembled by the binary from every role's part and
//! handed to this role (it serves the other `GET /api/…` routes too).

use crate::view::{ErrorView, EventView, HistoryView, JobsPage, OutputView, ResultView, StatusView, StreamEvent};
use axum::Router;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderValue, header};
use pixmesh_chassis::ErrorBody;
use std::sync::Arc;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    paths(
        crate::handler::status,
        crate::handler::history,
        crate::stream::job_events,
        crate::stream::owner_events,
        crate::handler::list,
        crate::handler::result,
        crate::handler::output_result,
        document,
    ),
    components(schemas(StatusView, OutputView, ErrorView, ResultView, EventView, HistoryView, JobsPage, StreamEvent, ErrorBody))
)]
struct StatusApi;

/// This role's part of the document. A named output's download answers as the one result's
/// does: its responses are that operation's, written once.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = StatusApi::openapi();
    let paths = &mut doc.paths.paths;
    let answers = paths.get("/api/result/{id}").and_then(|item| item.get.as_ref()).map(|op| op.responses.clone());
    if let (Some(answers), Some(op)) = (answers, paths.get_mut("/api/result/{id}/{output}").and_then(|item| item.get.as_mut())) {
        op.responses = answers;
    }
    doc
}

/// The public API's OpenAPI 3.1 document.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "meta",
    operation_id = "openapi",
    responses((status = 200, description = "This document (OpenAPI 3.1)", content_type = "application/json", body = Object)),
)]
async fn document(doc: Arc<String>) -> Response {
    let mut response = doc.as_str().to_owned().into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// `router` with `GET /api/openapi.json` answering `doc` (the document as JSON).
pub fn serve(router: Router, doc: Arc<String>) -> Router {
    router.route("/api/openapi.json", get(move || document(Arc::clone(&doc))))
}
