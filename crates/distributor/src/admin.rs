//! What the distributor tells an operator besides the chassis's endpoints: `GET /workers` on its
//! admin port (the workers it balances over, as the gateway's `/api/cluster` shows them), the
//! same as per-worker metrics rendered at each scrape, and the queue's depth and oldest job.

use crate::instruments;
use crate::workers::WorkerSet;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use pixmesh_chassis::Shutdown;
use pixmesh_chassis::telemetry::label_value;
use pixmesh_store::Stores;
use std::fmt::Write as _;
use std::time::Duration;

/// How often the queue's depth is read from the job store.
const QUEUE_STATS_EVERY: Duration = Duration::from_secs(5);

/// `GET /workers`: `{"workers":[{address, capacity, limit, in_flight, latency_estimate_seconds, breaker}]}`.
pub fn routes(workers: WorkerSet) -> Router {
    Router::new().route("/workers", get(list)).with_state(workers)
}

async fn list(State(workers): State<WorkerSet>) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "workers": workers.snapshot() }))
}

/// Renders the per-worker gauges of the workers in the set now: a worker that left is gone from
/// the next scrape, so the `worker` label has as many values as there are workers, whatever
/// the pods that came and went.
pub fn render_workers(workers: &WorkerSet, out: &mut String) {
    let snapshot = workers.snapshot();
    let family = |out: &mut String, name: &str, help: &str, value: &dyn Fn(&crate::workers::WorkerInfo) -> f64| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for worker in &snapshot {
            let _ = writeln!(out, "{name}{{role=\"distributor\",worker=\"{}\"}} {}", label_value(&worker.address), value(worker));
        }
    };
    family(out, instruments::WORKER_BREAKER_STATE, "Each worker's circuit breaker: 0 closed, 1 half-open, 2 open", &|w| w.breaker.gauge());
    family(out, instruments::WORKER_CALLS_IN_FLIGHT, "Calls in flight to each worker", &|w| w.in_flight as f64);
    family(out, instruments::WORKER_CALL_LIMIT, "Calls each worker is given at once now", &|w| w.limit as f64);
    family(out, instruments::WORKER_LATENCY_ESTIMATE, "Each worker's latency estimate, in seconds", &|w| w.latency_estimate_seconds);
}

/// Reads the queue's depth and its oldest job every few seconds into their gauges, until
/// `shutdown`. A failed read leaves the last values (the store's own health says it failed).
pub fn spawn_queue_stats(stores: &Stores, shutdown: Shutdown) -> tokio::task::JoinHandle<()> {
    let outbox = stores.outbox.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(QUEUE_STATS_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = shutdown.wait() => return,
            }
            match outbox.queue_stats().await {
                Ok(stats) => {
                    metrics::gauge!(instruments::QUEUE_DEPTH).set(stats.queued as f64);
                    let now = pixmesh_chassis::time::now_ms();
                    let age = stats.oldest_created_at.map(|t| (now - t).max(0) as f64 / 1000.0).unwrap_or(0.0);
                    metrics::gauge!(instruments::QUEUE_OLDEST_AGE).set(age);
                }
                Err(e) => tracing::debug!(error = %e, "queue stats not read"),
            }
        }
    })
}
