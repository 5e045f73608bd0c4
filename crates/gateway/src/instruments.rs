//! Every metric this role records: its name, kind, unit and help, in one place. Names follow
//! the OpenTelemetry semantic conventions where one exists (`http.server.request.duration` in
//! seconds is `http_server_request_duration_seconds`), and are `pixmesh_*` otherwise; units
//! are in the name (`_seconds`), counters end in `_total`.

use metrics::Unit;

/// Time to answer a request, refusals included, by route (label http_route; OpenTelemetry http.server.request.duration).
pub const HTTP_SERVER_REQUEST_DURATION: &str = "http_server_request_duration_seconds";
/// Responses by route (http_route) and status class (1xx..5xx).
pub const RESPONSES: &str = "pixmesh_gateway_responses_total";
/// Time for an upstream to answer a forwarded request (its response headers), by upstream (OpenTelemetry http.client.request.duration).
pub const HTTP_CLIENT_REQUEST_DURATION: &str = "http_client_request_duration_seconds";
/// API key checks, by outcome (ok, refused).
pub const AUTH: &str = "pixmesh_gateway_auth_total";
/// Requests refused with 429 by the per-key rate limit.
pub const RATE_LIMITED: &str = "pixmesh_gateway_rate_limited_total";
/// Requests waiting for an upstream slot, by route.
pub const ADMISSION_QUEUED: &str = "pixmesh_gateway_admission_queued";
/// Requests refused by admission (503), by route and reason.
pub const ADMISSION_REFUSED: &str = "pixmesh_gateway_admission_refused_total";
/// Uploads refused by the upload guard from their header, by reason.
pub const UPLOADS_REFUSED: &str = "pixmesh_gateway_uploads_refused_total";
/// Time from an upload's arrival to its refusal by the guard.
pub const UPLOAD_REFUSAL: &str = "pixmesh_gateway_upload_refusal_seconds";
/// Uploads forwarded before the guard could read their size (the upload service checks them).
pub const UPLOADS_STREAMED_UNDECIDED: &str = "pixmesh_gateway_uploads_streamed_undecided_total";
/// Configuration reloads, by outcome.
pub const RELOADS: &str = "pixmesh_gateway_reloads_total";
/// Requests tried again on another upstream instance, by upstream.
pub const RETRIES: &str = "pixmesh_gateway_retries_total";
/// Forwarded requests that failed at the upstream (connect, reset, timeout), by upstream.
pub const UPSTREAM_ERRORS: &str = "pixmesh_gateway_upstream_errors_total";
/// Requests that waited for an upstream connection slot, by upstream.
pub const UPSTREAM_SLOT_WAITS: &str = "pixmesh_gateway_upstream_slot_waits_total";
/// Requests refused because every upstream connection slot stayed taken, by upstream.
pub const UPSTREAM_SATURATED: &str = "pixmesh_gateway_upstream_saturated_total";
/// Upstream instances ejected by outlier detection, by upstream.
pub const UPSTREAM_EJECTIONS: &str = "pixmesh_gateway_upstream_ejections_total";
/// Ejections not made because the most ejected instances were out already, by upstream.
pub const UPSTREAM_EJECTIONS_CAPPED: &str = "pixmesh_gateway_upstream_ejections_capped_total";
/// Requests of a split route, by route and the upstream the split chose.
pub const SPLIT: &str = "pixmesh_gateway_split_requests_total";
/// Copies of requests for a route's shadow upstream, by route and outcome: `answered` (any
/// status), `failed` (refused, reset, timed out), `skipped` (body over the limit, too many
/// copies outstanding, no free connection).
pub const MIRROR: &str = "pixmesh_gateway_mirror_requests_total";

/// Every name above (the dashboard in `deploy/grafana` may use no other).
pub const NAMES: &[&str] = &[
    HTTP_SERVER_REQUEST_DURATION,
    RESPONSES,
    HTTP_CLIENT_REQUEST_DURATION,
    AUTH,
    RATE_LIMITED,
    ADMISSION_QUEUED,
    ADMISSION_REFUSED,
    UPLOADS_REFUSED,
    UPLOAD_REFUSAL,
    UPLOADS_STREAMED_UNDECIDED,
    RELOADS,
    RETRIES,
    UPSTREAM_ERRORS,
    UPSTREAM_SLOT_WAITS,
    UPSTREAM_SATURATED,
    UPSTREAM_EJECTIONS,
    UPSTREAM_EJECTIONS_CAPPED,
    SPLIT,
    MIRROR,
];

/// Gives each metric its help text and unit (the `# HELP` lines of the exposition).
pub fn describe() {
    metrics::describe_histogram!(
        HTTP_SERVER_REQUEST_DURATION,
        Unit::Seconds,
        "Time to answer a request, refusals included, by route (label http_route; OpenTelemetry http.server.request.duration)"
    );
    metrics::describe_counter!(RESPONSES, Unit::Count, "Responses by route (http_route) and status class (1xx..5xx)");
    metrics::describe_histogram!(
        HTTP_CLIENT_REQUEST_DURATION,
        Unit::Seconds,
        "Time for an upstream to answer a forwarded request (its response headers), by upstream (OpenTelemetry http.client.request.duration)"
    );
    metrics::describe_counter!(AUTH, Unit::Count, "API key checks, by outcome (ok, refused)");
    metrics::describe_counter!(RATE_LIMITED, Unit::Count, "Requests refused with 429 by the per-key rate limit");
    metrics::describe_gauge!(ADMISSION_QUEUED, Unit::Count, "Requests waiting for an upstream slot, by route");
    metrics::describe_counter!(ADMISSION_REFUSED, Unit::Count, "Requests refused by admission (503), by route and reason");
    metrics::describe_counter!(UPLOADS_REFUSED, Unit::Count, "Uploads refused by the upload guard from their header, by reason");
    metrics::describe_histogram!(UPLOAD_REFUSAL, Unit::Seconds, "Time from an upload's arrival to its refusal by the guard");
    metrics::describe_counter!(
        UPLOADS_STREAMED_UNDECIDED,
        Unit::Count,
        "Uploads forwarded before the guard could read their size (the upload service checks them)"
    );
    metrics::describe_counter!(RELOADS, Unit::Count, "Configuration reloads, by outcome");
    metrics::describe_counter!(RETRIES, Unit::Count, "Requests tried again on another upstream instance, by upstream");
    metrics::describe_counter!(
        UPSTREAM_ERRORS,
        Unit::Count,
        "Forwarded requests that failed at the upstream (connect, reset, timeout), by upstream"
    );
    metrics::describe_counter!(UPSTREAM_SLOT_WAITS, Unit::Count, "Requests that waited for an upstream connection slot, by upstream");
    metrics::describe_counter!(
        UPSTREAM_SATURATED,
        Unit::Count,
        "Requests refused because every upstream connection slot stayed taken, by upstream"
    );
    metrics::describe_counter!(UPSTREAM_EJECTIONS, Unit::Count, "Upstream instances ejected by outlier detection, by upstream");
    metrics::describe_counter!(
        UPSTREAM_EJECTIONS_CAPPED,
        Unit::Count,
        "Ejections not made because the most ejected instances were out already, by upstream"
    );
    metrics::describe_counter!(SPLIT, Unit::Count, "Requests of a split route, by route and the upstream the split chose");
    metrics::describe_counter!(
        MIRROR,
        Unit::Count,
        "Copies of requests for a route's shadow upstream, by route and outcome (answered, failed, skipped)"
    );
}
