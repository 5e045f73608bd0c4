//! The metrics `pixmesh sidecar outbound` records (the inbound side records the gateway's).

use metrics::Unit;

/// Requests the application made of a remote service, by service and outcome (ok, failed, timeout, unavailable, no_instance).
pub const OUTBOUND_REQUESTS: &str = "pixmesh_sidecar_outbound_requests_total";
/// Time from the application's request to the remote answer's headers, retries included, by service.
pub const OUTBOUND_DURATION: &str = "pixmesh_sidecar_outbound_request_duration_seconds";
/// Tries after the first, by service.
pub const OUTBOUND_RETRIES: &str = "pixmesh_sidecar_outbound_retries_total";
/// Retries the retry budget refused.
pub const OUTBOUND_RETRIES_REFUSED: &str = "pixmesh_sidecar_outbound_retries_refused_total";
/// Circuit-breaker transitions of remote instances, by service and the state entered.
pub const OUTBOUND_BREAKER_TRANSITIONS: &str = "pixmesh_sidecar_outbound_breaker_transitions_total";
/// Instances known of each remote service.
pub const OUTBOUND_INSTANCES: &str = "pixmesh_sidecar_outbound_instances";

pub const NAMES: &[&str] =
    &[OUTBOUND_REQUESTS, OUTBOUND_DURATION, OUTBOUND_RETRIES, OUTBOUND_RETRIES_REFUSED, OUTBOUND_BREAKER_TRANSITIONS, OUTBOUND_INSTANCES];

/// Gives each metric its help text and unit.
pub fn describe() {
    metrics::describe_counter!(
        OUTBOUND_REQUESTS,
        Unit::Count,
        "Requests the application made of a remote service, by service and outcome (ok, failed, timeout, unavailable, no_instance)"
    );
    metrics::describe_histogram!(
        OUTBOUND_DURATION,
        Unit::Seconds,
        "Time from the application's request to the remote answer's headers, retries included, by service"
    );
    metrics::describe_counter!(OUTBOUND_RETRIES, Unit::Count, "Tries after the first, by service");
    metrics::describe_counter!(OUTBOUND_RETRIES_REFUSED, Unit::Count, "Retries the retry budget refused");
    metrics::describe_counter!(
        OUTBOUND_BREAKER_TRANSITIONS,
        Unit::Count,
        "Circuit-breaker transitions of remote instances, by service and the state entered"
    );
    metrics::describe_gauge!(OUTBOUND_INSTANCES, Unit::Count, "Instances known of each remote service");
}
