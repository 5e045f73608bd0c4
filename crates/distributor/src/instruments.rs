//! Every metric this role records: its name, kind, unit and help, in one place. Names follow
//! the OpenTelemetry semantic conventions where one exists (`http.server.request.duration` in
//! seconds is `http_server_request_duration_seconds`), and are `pixmesh_*` otherwise; units
//! are in the name (`_seconds`), counters end in `_total`.

use metrics::Unit;

/// Claims ended, by outcome (succeeded, failed, released, lease_lost, claim_timeout, fenced, store_error).
pub const JOBS: &str = "pixmesh_jobs_total";
/// Time from a claim to its end (the work of one claim of a job).
pub const JOB_DURATION: &str = "pixmesh_job_duration_seconds";
/// Jobs waiting to be made (queued, due now or later), read from the job store every few seconds.
pub const QUEUE_DEPTH: &str = "pixmesh_queue_depth";
/// Age of the oldest job waiting to be made (0 when none waits).
pub const QUEUE_OLDEST_AGE: &str = "pixmesh_queue_oldest_job_age_seconds";
/// Worker calls as the distributor timed them, by rpc_method and rpc_grpc_status_code (OpenTelemetry rpc.client.call.duration).
pub const RPC_CLIENT_CALL_DURATION: &str = "rpc_client_call_duration_seconds";
/// Jobs claimed.
pub const CLAIMS: &str = "pixmesh_distributor_claims_total";
/// Claims that failed at the job store.
pub const CLAIM_ERRORS: &str = "pixmesh_distributor_claim_errors_total";
/// Lease renewals, by outcome (ok, fenced, error, max_claim).
pub const LEASE_RENEWALS: &str = "pixmesh_distributor_lease_renewals_total";
/// Worker calls that failed, by error code.
pub const WORKER_FAILURES: &str = "pixmesh_distributor_worker_failures_total";
/// Calls abandoned because their worker left the set and stopped answering.
pub const CALLS_ABANDONED: &str = "pixmesh_distributor_calls_abandoned_total";
/// Retries the retry budget refused.
pub const RETRIES_REFUSED: &str = "pixmesh_distributor_retries_refused_total";
/// Circuit breaker transitions, by the state entered.
pub const BREAKER_TRANSITIONS: &str = "pixmesh_distributor_breaker_transitions_total";
/// Workers in the set discovery reports.
pub const WORKERS: &str = "pixmesh_distributor_workers";
/// Each worker's circuit breaker: 0 closed, 1 half-open, 2 open (rendered at scrape time for the workers in the set only).
pub const WORKER_BREAKER_STATE: &str = "pixmesh_distributor_worker_breaker_state";
/// Calls in flight to each worker.
pub const WORKER_CALLS_IN_FLIGHT: &str = "pixmesh_distributor_worker_calls_in_flight";
/// Calls each worker is given at once now (its capacity, or 1 while re-probed as slow).
pub const WORKER_CALL_LIMIT: &str = "pixmesh_distributor_worker_call_limit";
/// Each worker's latency estimate (decayed peak EWMA) the balancer picks by.
pub const WORKER_LATENCY_ESTIMATE: &str = "pixmesh_distributor_worker_latency_estimate_seconds";

/// Every name above (the dashboard in `deploy/grafana` may use no other).
pub const NAMES: &[&str] = &[
    JOBS,
    JOB_DURATION,
    QUEUE_DEPTH,
    QUEUE_OLDEST_AGE,
    RPC_CLIENT_CALL_DURATION,
    CLAIMS,
    CLAIM_ERRORS,
    LEASE_RENEWALS,
    WORKER_FAILURES,
    CALLS_ABANDONED,
    RETRIES_REFUSED,
    BREAKER_TRANSITIONS,
    WORKERS,
    WORKER_BREAKER_STATE,
    WORKER_CALLS_IN_FLIGHT,
    WORKER_CALL_LIMIT,
    WORKER_LATENCY_ESTIMATE,
];

/// Gives each metric its help text and unit (the `# HELP` lines of the exposition).
pub fn describe() {
    metrics::describe_counter!(
        JOBS,
        Unit::Count,
        "Claims ended, by outcome (succeeded, failed, released, lease_lost, claim_timeout, fenced, store_error)"
    );
    metrics::describe_histogram!(JOB_DURATION, Unit::Seconds, "Time from a claim to its end (the work of one claim of a job)");
    metrics::describe_gauge!(
        QUEUE_DEPTH,
        Unit::Count,
        "Jobs waiting to be made (queued, due now or later), read from the job store every few seconds"
    );
    metrics::describe_gauge!(QUEUE_OLDEST_AGE, Unit::Seconds, "Age of the oldest job waiting to be made (0 when none waits)");
    metrics::describe_histogram!(
        RPC_CLIENT_CALL_DURATION,
        Unit::Seconds,
        "Worker calls as the distributor timed them, by rpc_method and rpc_grpc_status_code (OpenTelemetry rpc.client.call.duration)"
    );
    metrics::describe_counter!(CLAIMS, Unit::Count, "Jobs claimed");
    metrics::describe_counter!(CLAIM_ERRORS, Unit::Count, "Claims that failed at the job store");
    metrics::describe_counter!(LEASE_RENEWALS, Unit::Count, "Lease renewals, by outcome (ok, fenced, error, max_claim)");
    metrics::describe_counter!(WORKER_FAILURES, Unit::Count, "Worker calls that failed, by error code");
    metrics::describe_counter!(CALLS_ABANDONED, Unit::Count, "Calls abandoned because their worker left the set and stopped answering");
    metrics::describe_counter!(RETRIES_REFUSED, Unit::Count, "Retries the retry budget refused");
    metrics::describe_counter!(BREAKER_TRANSITIONS, Unit::Count, "Circuit breaker transitions, by the state entered");
    metrics::describe_gauge!(WORKERS, Unit::Count, "Workers in the set discovery reports");
    metrics::describe_gauge!(
        WORKER_BREAKER_STATE,
        "Each worker's circuit breaker: 0 closed, 1 half-open, 2 open (rendered at scrape time for the workers in the set only)"
    );
    metrics::describe_gauge!(WORKER_CALLS_IN_FLIGHT, Unit::Count, "Calls in flight to each worker");
    metrics::describe_gauge!(
        WORKER_CALL_LIMIT,
        Unit::Count,
        "Calls each worker is given at once now (its capacity, or 1 while re-probed as slow)"
    );
    metrics::describe_gauge!(
        WORKER_LATENCY_ESTIMATE,
        Unit::Seconds,
        "Each worker's latency estimate (decayed peak EWMA) the balancer picks by"
    );
}
