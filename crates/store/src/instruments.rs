//! Every metric this role records: its name, kind, unit and help, in one place. Names follow
//! the OpenTelemetry semantic conventions where one exists (`http.server.request.duration` in
//! seconds is `http_server_request_duration_seconds`), and are `pixmesh_*` otherwise; units
//! are in the name (`_seconds`), counters end in `_total`.

use metrics::Unit;

/// 1 while a store passes its probe, by store (job_store, blob_store).
pub const HEALTHY: &str = "pixmesh_store_healthy";
/// Results committed in one transaction (group commit).
pub const COMMIT_BATCH: &str = "pixmesh_store_commit_batch";
/// Claims whose lease ran out and were given back to the queue.
pub const LEASES_EXPIRED: &str = "pixmesh_store_leases_expired_total";
/// Ended jobs deleted after their retention.
pub const PRUNED_JOBS: &str = "pixmesh_store_pruned_jobs_total";
/// Jobs waiting for an identical upload's job ended with it, by outcome.
pub const CACHE_WAITERS_SETTLED: &str = "pixmesh_store_cache_waiters_settled_total";

/// Every name above (the dashboard in `deploy/grafana` may use no other).
pub const NAMES: &[&str] = &[HEALTHY, COMMIT_BATCH, LEASES_EXPIRED, PRUNED_JOBS, CACHE_WAITERS_SETTLED];

/// Gives each metric its help text and unit (the `# HELP` lines of the exposition).
pub fn describe() {
    metrics::describe_gauge!(HEALTHY, "1 while a store passes its probe, by store (job_store, blob_store)");
    metrics::describe_histogram!(COMMIT_BATCH, Unit::Count, "Results committed in one transaction (group commit)");
    metrics::describe_counter!(LEASES_EXPIRED, Unit::Count, "Claims whose lease ran out and were given back to the queue");
    metrics::describe_counter!(PRUNED_JOBS, Unit::Count, "Ended jobs deleted after their retention");
    metrics::describe_counter!(CACHE_WAITERS_SETTLED, Unit::Count, "Jobs waiting for an identical upload's job ended with it, by outcome");
}
