//! Every metric this role records: its name, kind, unit and help, in one place. Names follow
//! the OpenTelemetry semantic conventions where one exists (`http.server.request.duration` in
//! seconds is `http_server_request_duration_seconds`), and are `pixmesh_*` otherwise; units
//! are in the name (`_seconds`), counters end in `_total`.

use metrics::Unit;

/// Job events the outbox relay published.
pub const RELAY_EVENTS: &str = "pixmesh_relay_events_total";
/// Relay rounds that failed.
pub const RELAY_ERRORS: &str = "pixmesh_relay_errors_total";
/// Wake-ups the sweeper sent again for jobs left claimable.
pub const SWEEPER_WAKES: &str = "pixmesh_sweeper_wakes_total";
/// Wake-ups sent to the dead-letter stream.
pub const WAKEUPS_DEAD: &str = "pixmesh_wakeups_dead_total";

/// Every name above (the dashboard in `deploy/grafana` may use no other).
pub const NAMES: &[&str] = &[RELAY_EVENTS, RELAY_ERRORS, SWEEPER_WAKES, WAKEUPS_DEAD];

/// Gives each metric its help text and unit (the `# HELP` lines of the exposition).
pub fn describe() {
    metrics::describe_counter!(RELAY_EVENTS, Unit::Count, "Job events the outbox relay published");
    metrics::describe_counter!(RELAY_ERRORS, Unit::Count, "Relay rounds that failed");
    metrics::describe_counter!(SWEEPER_WAKES, Unit::Count, "Wake-ups the sweeper sent again for jobs left claimable");
    metrics::describe_counter!(WAKEUPS_DEAD, Unit::Count, "Wake-ups sent to the dead-letter stream");
}
