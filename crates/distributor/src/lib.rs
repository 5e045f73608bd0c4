//! The distributor: claims jobs from the job table under a lease and hands them to image workers.
//!
//! For each claimed job: read the input blob → pick a worker with a free slot → call it with a
//! deadline (`grpc-timeout`) → store the result blob → commit `succeeded`, fenced by the
//! attempt number. A retryable failure (worker down, overloaded, timed out) is recorded and the
//! job goes to a *different* worker; a permanent failure (corrupt or unsupported image) ends the
//! job `failed` at once. When every try of a claim fails the job is released back to the queue
//! with a delay; after `max_attempts` claims it fails.
//!
//! A claim's lease is short and renewed in the background while the claim is held
//! (`lease.rs`), so the jobs of a distributor that died are claimed again within seconds; a
//! call to a worker that discovery dropped and that no longer answers is abandoned and sent
//! elsewhere at once (`pixmesh_balance`'s set, `dispatch.rs`).

mod admin;
pub mod discovery;
mod dispatch;
pub mod instruments;
mod lease;
mod workers;

pub use dispatch::Dispatcher;
pub use pixmesh_balance::{BreakerConfig, breaker, budget};
pub use workers::{GrpcWorkers, WorkerEndpoint, WorkerSet};

use discovery::Slots;
use pixmesh_chassis::Shutdown;
use pixmesh_chassis::admin::Readiness;
use pixmesh_chassis::announce::Announcement;
use pixmesh_chassis::grpc::Dialer;
use pixmesh_chassis::tls::ClientTlsConfig;
use pixmesh_queue::Queue;
use pixmesh_store::{Access, Stores};
use serde::Deserialize;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct DistributorConfig {
    pub admin_listen: SocketAddr,
    /// Registry address (`host:port`) to discover workers from.
    pub registry: String,
    /// A DNS name and port resolving to the workers (e.g. a Kubernetes headless Service,
    /// `pixmesh-worker.pixmesh.svc.cluster.local:50051`), used when `registry` is empty.
    pub dns: String,
    /// Fixed worker addresses, used when `registry` and `dns` are empty.
    pub workers: Vec<String>,
    /// Calls at once per worker found by `dns` or `workers` (registered workers report their own).
    pub worker_capacity: u32,
    /// Calls at once per worker found by `dns` or `workers` when the bytes go by presigned URLs
    /// (S3 blobs: the calls wait on the blob store more than on the worker). 0 means
    /// `worker_capacity` × 4, as a worker's own `worker.transfers` default.
    pub worker_transfers: u32,
    /// Jobs in flight at once. 0 means 16, or 64 when workers get presigned URLs (S3 blobs):
    /// then a job holds no image bytes here, and spends most of its time waiting on the blob
    /// store, which more jobs in flight make up for.
    pub concurrency: usize,
    /// Most jobs claimed in one transaction (when that many places and worker slots are free).
    pub claim_batch: u32,
    /// How long a claim's lease lasts. It is renewed every `lease_renew_ms` for as long as the
    /// claim is held, so a call may outlive it; the jobs of a distributor that died are claimed
    /// again at most this long after its last renewal.
    pub lease_ms: u64,
    /// How often a held claim's lease is renewed (below half of `lease_ms`, so one renewal may
    /// fail and the next still come in time). Renewals that fail for a store error are tried
    /// again until the lease would have run out; then the claim is abandoned.
    pub lease_renew_ms: u64,
    /// The longest a claim is held, whatever it waits for (workers, their calls, the store):
    /// past it the claim is given up and the job released back to the queue. Renewal keeps a
    /// lease alive; this keeps a claim bounded.
    pub max_claim_ms: u64,
    /// Deadline of a claim's worker calls together (each is sent as `grpc-timeout`, minus the
    /// time the earlier tries of the claim took). Below `max_claim_ms`.
    pub call_timeout_ms: u64,
    /// Worker calls per claim before the job is released back to the queue.
    pub tries_per_claim: u32,
    /// Retries (calls after a claim's first) may add this percentage of first calls …
    pub retry_budget_percent: u32,
    /// … plus this many per second; past that a failed job goes back to the queue instead.
    pub retry_budget_per_second: u32,
    /// Claims before a job fails for good.
    pub max_attempts: u32,
    /// Delay before a released job can be claimed again.
    pub retry_delay_ms: u64,
    /// How often to look for new jobs when the queue was empty.
    pub poll_interval_ms: u64,
    /// How often `dns` is resolved again, and how long to wait before asking the registry (or
    /// DNS) again after a failure. The registry pushes its changes; it is not polled.
    pub discovery_interval_ms: u64,
    /// How long in-flight jobs may take to finish after SIGTERM.
    pub drain_grace_ms: u64,
    /// The per-worker circuit breaker.
    pub breaker: BreakerConfig,
    /// TLS to the workers and to pixmesh's registry (`[distributor.client_tls]`: their CA, and
    /// this distributor's certificate for mTLS). Without a CA, plaintext.
    pub client_tls: ClientTlsConfig,
}

/// Jobs in flight at once by default, with the bytes in the calls and with presigned URLs.
const CONCURRENCY: usize = 16;
const CONCURRENCY_WITH_URLS: usize = 64;

impl DistributorConfig {
    /// `concurrency`, or its default for how the bytes travel.
    pub fn effective_concurrency(&self, slots: Slots) -> usize {
        match (self.concurrency, slots) {
            (0, Slots::Capacity) => CONCURRENCY,
            (0, Slots::Transfers) => CONCURRENCY_WITH_URLS,
            (n, _) => n,
        }
    }
}

impl Default for DistributorConfig {
    fn default() -> Self {
        DistributorConfig {
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            registry: String::new(),
            dns: String::new(),
            workers: Vec::new(),
            worker_capacity: 2,
            worker_transfers: 0,
            concurrency: 0,
            claim_batch: 16,
            lease_ms: 10_000,
            lease_renew_ms: 3_000,
            max_claim_ms: 60_000,
            call_timeout_ms: 30_000,
            tries_per_claim: 3,
            retry_budget_percent: 20,
            retry_budget_per_second: 10,
            max_attempts: 5,
            retry_delay_ms: 1_000,
            poll_interval_ms: 50,
            discovery_interval_ms: 500,
            drain_grace_ms: 30_000,
            breaker: BreakerConfig::default(),
            client_tls: ClientTlsConfig::default(),
        }
    }
}

impl DistributorConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.concurrency > 4096 {
            return Err("distributor.concurrency must be at most 4096 (0 means 16, or 64 with S3 blobs)".into());
        }
        if self.claim_batch == 0 || self.claim_batch > 1000 {
            return Err("distributor.claim_batch must be between 1 and 1000".into());
        }
        if self.lease_renew_ms == 0 || self.lease_renew_ms.saturating_mul(2) >= self.lease_ms {
            return Err(
                "distributor.lease_renew_ms must be above 0 and below half of distributor.lease_ms (one renewal may fail, the next must still come in time)".into(),
            );
        }
        if self.max_claim_ms > 24 * 3_600_000 {
            return Err("distributor.max_claim_ms must be at most a day".into());
        }
        // A call may outlive a lease now (the lease is renewed while it runs), but not the claim.
        if self.call_timeout_ms == 0 || self.call_timeout_ms >= self.max_claim_ms {
            return Err("distributor.call_timeout_ms must be above 0 and below distributor.max_claim_ms".into());
        }
        if self.tries_per_claim == 0 || self.max_attempts == 0 {
            return Err("distributor.tries_per_claim and distributor.max_attempts must be at least 1".into());
        }
        if self.retry_budget_percent > budget::MAX_PERCENT || self.retry_budget_per_second > 1_000_000 {
            return Err(format!(
                "distributor.retry_budget_percent must be at most {} and distributor.retry_budget_per_second at most 1000000",
                budget::MAX_PERCENT
            ));
        }
        if self.registry.starts_with("nats://") || self.registry.starts_with("tls://") {
            pixmesh_queue::nats_url("distributor.registry", &self.registry)?;
        }
        if self.worker_capacity == 0 {
            return Err("distributor.worker_capacity must be at least 1".into());
        }
        if self.poll_interval_ms == 0 || self.discovery_interval_ms == 0 {
            return Err("distributor.poll_interval_ms and distributor.discovery_interval_ms must be above 0".into());
        }
        self.client_tls.validate_for_grpc("distributor.client_tls")?;
        self.breaker.validate().map_err(|e| format!("distributor.{e}"))
    }
}

/// Runs the distributor until `shutdown`, then lets in-flight jobs finish within the grace period.
///
/// With a broker (`queue`), jobs are claimed as their wake-ups arrive, and this process also
/// runs an outbox relay (one of all the distributors' relays publishes at a time).
pub async fn run(
    config: DistributorConfig,
    stores: Stores,
    queue: Option<Queue>,
    admin: TcpListener,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let readiness = Readiness::new();
    let admin_addr = admin.local_addr()?;
    let dialer = Dialer::new(&config.client_tls).map_err(std::io::Error::other)?;
    let transport = GrpcWorkers::new(dialer.clone());
    let workers = WorkerSet::with_transport(transport, Duration::from_millis(config.call_timeout_ms), &config.breaker);
    let admin_server =
        pixmesh_chassis::serve::admin_with("distributor", admin, readiness.clone(), shutdown.clone(), admin::routes(workers.clone()));
    let scraped = workers.clone();
    pixmesh_chassis::telemetry::add_metrics_source(move |out| admin::render_workers(&scraped, out));
    // Ready while it can write jobs and result blobs.
    // Results of jobs in flight together are committed together.
    // With presigned URLs a call waits on the blob store: a worker takes its `transfers` of them.
    let slots = Slots::of(&stores);
    let stores = stores.with_group_commit(config.effective_concurrency(slots).min(256));
    let probe = stores.watch_health("distributor", Access::ReadWrite, readiness.clone(), shutdown.clone()).await;
    // Ended jobs are deleted after their retention (several distributors may prune at once).
    let pruner = stores.spawn_pruner(shutdown.clone());
    let queue_stats = admin::spawn_queue_stats(&stores, shutdown.clone());
    let source = discovery::from_config(&config, &dialer).map_err(std::io::Error::other)?;
    let discovery = discovery::spawn(source, workers.clone(), slots, Duration::from_millis(config.discovery_interval_ms), shutdown.clone());
    let owner = format!("distributor-{}", uuid::Uuid::now_v7().simple());
    Announcement::new("distributor").with("admin", admin_addr).with("id", &owner).print();
    readiness.set_ready(true);
    tracing::info!(%owner, admin = %admin_addr, "distributor ready");
    let relay = queue.clone().map(|queue| {
        let settings = pixmesh_queue::relay::RelaySettings { max_attempts: config.max_attempts };
        tokio::spawn(pixmesh_queue::relay::run(queue, stores.outbox.clone(), settings, shutdown.clone().wait_owned()))
    });
    let dispatcher = Dispatcher::new(config.clone(), stores, workers, owner);
    match queue {
        Some(queue) => dispatcher.run_woken(queue, shutdown.clone()).await,
        None => dispatcher.run(shutdown.clone()).await,
    }
    if let Some(relay) = relay {
        relay.abort();
    }
    discovery.abort();
    queue_stats.abort();
    probe.abort();
    pruner.abort();
    admin_server.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_renewed_well_within_their_length_and_calls_end_within_the_claim() {
        let check = |change: fn(&mut DistributorConfig)| {
            let mut config = DistributorConfig::default();
            change(&mut config);
            config.validate()
        };
        assert_eq!(check(|_| {}), Ok(()));
        // A call may now outlive a lease (it is renewed), not the claim.
        assert_eq!(check(|c| c.call_timeout_ms = c.lease_ms * 2), Ok(()));
        let err = check(|c| c.call_timeout_ms = c.max_claim_ms).unwrap_err();
        assert!(err.contains("max_claim_ms"), "{err}");
        // Renewed at least twice per lease, so one renewal may fail.
        let err = check(|c| c.lease_renew_ms = c.lease_ms / 2).unwrap_err();
        assert!(err.contains("lease_renew_ms"), "{err}");
        assert!(check(|c| c.lease_renew_ms = 0).is_err());
        assert_eq!(check(|c| c.lease_renew_ms = c.lease_ms / 2 - 1), Ok(()));
    }
}
