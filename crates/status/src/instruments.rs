//! Every metric this role records: its name, kind, unit and help, in one place. Names follow
//! the OpenTelemetry semantic conventions where one exists (`http.server.request.duration` in
//! seconds is `http_server_request_duration_seconds`), and are `pixmesh_*` otherwise; units
//! are in the name (`_seconds`), counters end in `_total`.

use metrics::Unit;

/// SSE streams open, by kind.
pub const STREAMS: &str = "pixmesh_status_streams";
/// SSE streams ended because their client read too slowly.
pub const STREAMS_DROPPED: &str = "pixmesh_status_streams_dropped_total";
/// Job events folded into the status read model.
pub const PROJECTED_EVENTS: &str = "pixmesh_status_projected_events_total";

/// Every name above (the dashboard in `deploy/grafana` may use no other).
pub const NAMES: &[&str] = &[STREAMS, STREAMS_DROPPED, PROJECTED_EVENTS];

/// Gives each metric its help text and unit (the `# HELP` lines of the exposition).
pub fn describe() {
    metrics::describe_gauge!(STREAMS, Unit::Count, "SSE streams open, by kind");
    metrics::describe_counter!(STREAMS_DROPPED, Unit::Count, "SSE streams ended because their client read too slowly");
    metrics::describe_counter!(PROJECTED_EVENTS, Unit::Count, "Job events folded into the status read model");
}
