//! Every metric this role records: its name, kind, unit and help, in one place. Names follow
//! the OpenTelemetry semantic conventions where one exists (`http.server.request.duration` in
//! seconds is `http_server_request_duration_seconds`), and are `pixmesh_*` otherwise; units
//! are in the name (`_seconds`), counters end in `_total`.

use metrics::Unit;

/// Images processed, by outcome (ok or an error code).
pub const IMAGES: &str = "pixmesh_worker_images_total";
/// CPU pool time of one image: decode, resize, encode.
pub const PROCESSING_DURATION: &str = "pixmesh_worker_processing_duration_seconds";
/// Calls as the worker timed them, by rpc_method and rpc_grpc_status_code (OpenTelemetry rpc.server.call.duration).
pub const RPC_SERVER_CALL_DURATION: &str = "rpc_server_call_duration_seconds";
/// Calls being answered.
pub const IN_FLIGHT: &str = "pixmesh_worker_in_flight";
/// Threads of the CPU pool.
pub const POOL_THREADS: &str = "pixmesh_worker_pool_threads";
/// Images whose processing panicked (contained; the call fails with internal).
pub const PANICS: &str = "pixmesh_worker_panics_total";

/// Every name above (the dashboard in `deploy/grafana` may use no other).
pub const NAMES: &[&str] = &[IMAGES, PROCESSING_DURATION, RPC_SERVER_CALL_DURATION, IN_FLIGHT, POOL_THREADS, PANICS];

/// Gives each metric its help text and unit (the `# HELP` lines of the exposition).
pub fn describe() {
    metrics::describe_counter!(IMAGES, Unit::Count, "Images processed, by outcome (ok or an error code)");
    metrics::describe_histogram!(PROCESSING_DURATION, Unit::Seconds, "CPU pool time of one image: decode, resize, encode");
    metrics::describe_histogram!(
        RPC_SERVER_CALL_DURATION,
        Unit::Seconds,
        "Calls as the worker timed them, by rpc_method and rpc_grpc_status_code (OpenTelemetry rpc.server.call.duration)"
    );
    metrics::describe_gauge!(IN_FLIGHT, Unit::Count, "Calls being answered");
    metrics::describe_gauge!(POOL_THREADS, Unit::Count, "Threads of the CPU pool");
    metrics::describe_counter!(PANICS, Unit::Count, "Images whose processing panicked (contained; the call fails with internal)");
}
