//! Every metric this role records: its name, kind, unit and help, in one place. Names follow
//! the OpenTelemetry semantic conventions where one exists (`http.server.request.duration` in
//! seconds is `http_server_request_duration_seconds`), and are `pixmesh_*` otherwise; units
//! are in the name (`_seconds`), counters end in `_total`.

use metrics::Unit;

/// Uploads answered with a job, by whether it was an idempotent replay.
pub const JOBS: &str = "pixmesh_upload_jobs_total";
/// What the result cache did for an upload, by outcome (hit, joined, miss, refresh, bypass, replayed, not_cached).
pub const CACHE: &str = "pixmesh_upload_cache_total";

/// Every name above (the dashboard in `deploy/grafana` may use no other).
pub const NAMES: &[&str] = &[JOBS, CACHE];

/// Gives each metric its help text and unit (the `# HELP` lines of the exposition).
pub fn describe() {
    metrics::describe_counter!(JOBS, Unit::Count, "Uploads answered with a job, by whether it was an idempotent replay");
    metrics::describe_counter!(
        CACHE,
        Unit::Count,
        "What the result cache did for an upload, by outcome (hit, joined, miss, refresh, bypass, replayed, not_cached)"
    );
}
