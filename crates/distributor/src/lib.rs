//! The distributor: claims jobs from the job table under a lease and hands them to image workers.
//!
//! For each claimed job: read the input blob → pick a worker with a free slot → call it with a
//! deadline (`grpc-timeout`) → store the result blob → commit `succeeded`, fenced by the
//! attempt number. A retryable failure (worker down, overloaded, timed out) is recorded and the
//! job goes to a *different* worker; a permanent failure (corrupt or unsupported image) ends the
//! job `failed` at once. When every try of a claim fails the job is released back to the queue
//! with a delay; after `max_attempts` claims it fails.

mod dispatch;
mod workers;

pub use dispatch::Dispatcher;
pub use workers::{WorkerEndpoint, WorkerSet};

use pixmesh_chassis::Shutdown;
use pixmesh_chassis::admin::Readiness;
use pixmesh_chassis::announce::Announcement;
use pixmesh_store::{StoreConfig, Stores};
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
    /// Fixed worker addresses, used when `registry` is empty.
    pub workers: Vec<String>,
    /// Jobs in flight at once.
    pub concurrency: usize,
    pub lease_ms: u64,
    /// Deadline of one worker call.
    pub call_timeout_ms: u64,
    /// Worker calls per claim before the job is released back to the queue.
    pub tries_per_claim: u32,
    /// Claims before a job fails for good.
    pub max_attempts: u32,
    /// Delay before a released job can be claimed again.
    pub retry_delay_ms: u64,
    /// How often to look for new jobs when the queue was empty.
    pub poll_interval_ms: u64,
    /// How often to refresh the worker list from the registry.
    pub discovery_interval_ms: u64,
    /// How long in-flight jobs may take to finish after SIGTERM.
    pub drain_grace_ms: u64,
}

impl Default for DistributorConfig {
    fn default() -> Self {
        DistributorConfig {
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            registry: String::new(),
            workers: Vec::new(),
            concurrency: 16,
            lease_ms: 60_000,
            call_timeout_ms: 30_000,
            tries_per_claim: 3,
            max_attempts: 5,
            retry_delay_ms: 1_000,
            poll_interval_ms: 50,
            discovery_interval_ms: 500,
            drain_grace_ms: 30_000,
        }
    }
}

impl DistributorConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.concurrency == 0 || self.concurrency > 4096 {
            return Err("distributor.concurrency must be between 1 and 4096".into());
        }
        if self.call_timeout_ms == 0 || self.call_timeout_ms >= self.lease_ms {
            return Err("distributor.call_timeout_ms must be above 0 and below distributor.lease_ms".into());
        }
        if self.tries_per_claim == 0 || self.max_attempts == 0 {
            return Err("distributor.tries_per_claim and distributor.max_attempts must be at least 1".into());
        }
        if self.poll_interval_ms == 0 || self.discovery_interval_ms == 0 {
            return Err("distributor.poll_interval_ms and distributor.discovery_interval_ms must be above 0".into());
        }
        Ok(())
    }
}

/// Runs the distributor until `shutdown`, then lets in-flight jobs finish within the grace period.
pub async fn run(config: DistributorConfig, store: StoreConfig, admin: TcpListener, shutdown: Shutdown) -> std::io::Result<()> {
    let readiness = Readiness::new();
    let admin_addr = admin.local_addr()?;
    let admin_server = pixmesh_chassis::serve::admin("distributor", admin, readiness.clone(), shutdown.clone());
    let stores = Stores::open(&store).await.map_err(std::io::Error::other)?;
    let workers = WorkerSet::new(Duration::from_millis(config.call_timeout_ms));
    let discovery = workers.spawn_discovery(&config, shutdown.clone()).map_err(std::io::Error::other)?;
    let owner = format!("distributor-{}", uuid::Uuid::now_v7().simple());
    Announcement::new("distributor").with("admin", admin_addr).with("id", &owner).print();
    readiness.set_ready(true);
    tracing::info!(%owner, admin = %admin_addr, "distributor ready");
    let dispatcher = Dispatcher::new(config.clone(), stores, workers, owner);
    dispatcher.run(shutdown.clone()).await;
    discovery.abort();
    admin_server.stop().await;
    Ok(())
}
