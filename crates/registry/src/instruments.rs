//! Every metric this role records: its name, kind, unit and help, in one place. Names follow
//! the OpenTelemetry semantic conventions where one exists (`http.server.request.duration` in
//! seconds is `http_server_request_duration_seconds`), and are `pixmesh_*` otherwise; units
//! are in the name (`_seconds`), counters end in `_total`.

use metrics::Unit;

/// Worker instances registered.
pub const INSTANCES: &str = "pixmesh_registry_instances";
/// Watch streams open (distributors).
pub const WATCHERS: &str = "pixmesh_registry_watchers";
/// Registrations.
pub const REGISTRATIONS: &str = "pixmesh_registry_registrations_total";
/// Instances removed for missing their heartbeats.
pub const EXPIRATIONS: &str = "pixmesh_registry_expirations_total";
/// 1 while the registry keeps instances whose heartbeats stopped en masse (self-preservation).
pub const SELF_PRESERVATION: &str = "pixmesh_registry_self_preservation";
/// Times self-preservation was entered.
pub const SELF_PRESERVATION_ENTERED: &str = "pixmesh_registry_self_preservation_total";

/// Every name above (the dashboard in `deploy/grafana` may use no other).
pub const NAMES: &[&str] = &[INSTANCES, WATCHERS, REGISTRATIONS, EXPIRATIONS, SELF_PRESERVATION, SELF_PRESERVATION_ENTERED];

/// Gives each metric its help text and unit (the `# HELP` lines of the exposition).
pub fn describe() {
    metrics::describe_gauge!(INSTANCES, Unit::Count, "Worker instances registered");
    metrics::describe_gauge!(WATCHERS, Unit::Count, "Watch streams open (distributors)");
    metrics::describe_counter!(REGISTRATIONS, Unit::Count, "Registrations");
    metrics::describe_counter!(EXPIRATIONS, Unit::Count, "Instances removed for missing their heartbeats");
    metrics::describe_gauge!(
        SELF_PRESERVATION,
        "1 while the registry keeps instances whose heartbeats stopped en masse (self-preservation)"
    );
    metrics::describe_counter!(SELF_PRESERVATION_ENTERED, Unit::Count, "Times self-preservation was entered");
}
