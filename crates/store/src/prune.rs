//! Deleting ended jobs after their retention, so the job table holds what is live plus a
//! bounded tail, not every job ever run (a queue table that only grows makes every scan and
//! every vacuum slower).

use crate::Stores;
use pixmesh_chassis::Shutdown;
use pixmesh_chassis::time::now_ms;
use std::time::Duration;
use tokio::task::JoinHandle;

/// How often the pruner looks for ended jobs past their retention.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(60);
/// Jobs deleted per statement: short transactions, so claims never wait behind a big delete.
pub const PRUNE_BATCH: u32 = 500;
/// Staging objects (S3) older than this belong to calls whose distributor died between the
/// worker's PUT and the adoption: no live call is this old (a call's URLs expire long before).
pub const STAGING_MAX_AGE: Duration = Duration::from_secs(3600);

impl Stores {
    /// Deletes every job that ended more than the retention ago, with its events, in batches;
    /// returns how many.
    pub async fn prune_now(&self) -> Result<u64, pixmesh_model::StoreError> {
        let before = now_ms() - i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX);
        let mut total = 0;
        loop {
            let n = self.jobs.prune(before, PRUNE_BATCH).await?;
            total += n;
            if n < u64::from(PRUNE_BATCH) {
                return Ok(total);
            }
        }
    }

    /// Prunes now and then every [`PRUNE_INTERVAL`] until `shutdown`. Several processes may
    /// prune at once: each batch skips the rows another is deleting.
    pub fn spawn_pruner(&self, shutdown: Shutdown) -> JoinHandle<()> {
        let stores = self.clone();
        tokio::spawn(async move {
            loop {
                match stores.prune_now().await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(jobs = n, retention_hours = stores.retention.as_secs() / 3600, "pruned ended jobs");
                        metrics::counter!(crate::instruments::PRUNED_JOBS).increment(n);
                    }
                    Err(e) => tracing::warn!(error = %e, "pruning ended jobs failed; trying again later"),
                }
                if let Some(presign) = stores.blobs.presign() {
                    match presign.sweep_staging(STAGING_MAX_AGE).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(objects = n, "deleted staging objects of calls that never ended"),
                        Err(e) => tracing::warn!(error = %e, "sweeping the staging area failed; trying again later"),
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(PRUNE_INTERVAL) => {}
                    _ = shutdown.wait() => return,
                }
            }
        })
    }
}
