//! Store health as readiness: the checks `job_store` and `blob_store` of a role's `/readyz`.
//!
//! A probe proves each store works the way the role uses it: for a role that writes
//! ([`Access::ReadWrite`]: upload, distributor) a tiny write transaction on the role's row of
//! the job store's `health` table, and a small file written, synced and deleted in the blob
//! store's `tmp/`; for a role that only reads ([`Access::ReadOnly`]: status) a read of each.
//! It runs once before the role turns ready (a role started on a broken store starts unready),
//! then every [`PROBE_INTERVAL`], and at once when a real read or write failed (the stores raise
//! an [`Alarm`]), so readiness turns off with the first failed upload rather than a second later.
//! It turns on again by itself with the first probe that passes: no restart.

use crate::Stores;
use pixmesh_chassis::Shutdown;
use pixmesh_chassis::admin::Readiness;
use pixmesh_model::{StoreError, StoreKind};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// How often the stores are probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// A probe that takes longer fails (e.g. another process holds SQLite's write lock for longer:
/// this role cannot write meanwhile either).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Raised by a store when one of its reads or writes failed; wakes the probe.
#[derive(Debug, Clone, Default)]
pub struct Alarm(Arc<Notify>);

impl Alarm {
    pub(crate) fn raise(&self) {
        // Keeps one wake-up if the probe is busy, so a failure is never missed.
        self.0.notify_one();
    }

    pub(crate) async fn raised(&self) {
        self.0.notified().await
    }
}

/// What a role does with the stores, and so what its probe proves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Writes jobs and blobs (upload, distributor): the probe writes to both.
    ReadWrite,
    /// Only reads (status): the probe reads both. A full disk does not stop a reader, so such
    /// a role stays ready on one: taking it out would turn "no new uploads" into "no answers".
    ReadOnly,
}

impl Stores {
    /// Probes the stores now, records the result as the checks `job_store` and `blob_store` of
    /// `readiness`, and keeps doing so in the background until `shutdown`. `role` names the
    /// job store's `health` row this role writes.
    pub async fn watch_health(&self, role: &'static str, access: Access, readiness: Readiness, shutdown: Shutdown) -> JoinHandle<()> {
        let mut probe = Probe { stores: self.clone(), role, access, readiness, healthy: [true, true] };
        probe.round().await;
        tokio::spawn(async move {
            loop {
                let all_healthy = probe.healthy.iter().all(|h| *h);
                tokio::select! {
                    _ = tokio::time::sleep(PROBE_INTERVAL) => {}
                    // While a store fails, the probe's own failures raise the alarm too: only
                    // the interval paces it then.
                    _ = probe.stores.alarm.raised(), if all_healthy => {}
                    _ = shutdown.wait() => return,
                }
                probe.round().await;
            }
        })
    }
}

struct Probe {
    stores: Stores,
    role: &'static str,
    access: Access,
    readiness: Readiness,
    /// The last result per store (jobs, blobs), to log changes only.
    healthy: [bool; 2],
}

impl Probe {
    async fn round(&mut self) {
        let write = self.access == Access::ReadWrite;
        let (jobs, blobs) = tokio::join!(
            within(StoreKind::Jobs, self.stores.jobs.probe(self.role, write)),
            within(StoreKind::Blobs, self.stores.blobs.probe(write)),
        );
        self.record(0, StoreKind::Jobs, jobs);
        self.record(1, StoreKind::Blobs, blobs);
    }

    fn record(&mut self, index: usize, store: StoreKind, result: Result<(), String>) {
        let name = store.check_name();
        let healthy = result.is_ok();
        match (&result, self.healthy[index]) {
            (Err(reason), true) => tracing::error!(check = name, %reason, "store probe failed; not ready until it passes"),
            (Ok(()), false) => tracing::info!(check = name, "store probe passes again; ready"),
            _ => {}
        }
        metrics::gauge!(crate::instruments::HEALTHY, "store" => name).set(if healthy { 1.0 } else { 0.0 });
        self.healthy[index] = healthy;
        self.readiness.set_check(name, result);
    }
}

/// The probe's answer as a readiness reason: what an operator should read.
async fn within(store: StoreKind, probe: impl Future<Output = Result<(), StoreError>>) -> Result<(), String> {
    match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(StoreError::Full { detail, .. })) => Err(format!("the {store}'s disk is full ({detail})")),
        Ok(Err(e)) => Err(format!("the {store} failed its probe ({e})")),
        Err(_) => Err(format!("the {store} did not answer its probe within {} s", PROBE_TIMEOUT.as_secs())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoreConfig;
    use crate::testing::Immutable;
    use std::time::Instant;

    async fn wait_for(readiness: &Readiness, ready: bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while readiness.is_ready() != ready {
            assert!(Instant::now() < deadline, "{what}: checks are {:?}", readiness.checks());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn readiness_follows_what_the_stores_can_do() {
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::open(&StoreConfig::default().with_data_dir(dir.path())).await.unwrap();
        let (writer, reader) = (Readiness::new(), Readiness::new());
        writer.set_ready(true);
        reader.set_ready(true);
        let shutdown = Shutdown::new();
        let w = stores.watch_health("writer", Access::ReadWrite, writer.clone(), shutdown.clone()).await;
        let r = stores.watch_health("reader", Access::ReadOnly, reader.clone(), shutdown.clone()).await;
        // The first round ran before `watch_health` returned.
        assert_eq!(writer.checks().len(), 2);
        assert!(writer.is_ready() && reader.is_ready(), "{:?}", writer.checks());

        let Some(frozen) = Immutable::set(&dir.path().join("blobs/tmp")) else { return };
        // A real write fails: the alarm makes the probe look at once.
        stores.blobs.put(bytes::Bytes::from_static(b"x")).await.unwrap_err();
        wait_for(&writer, false, "a writer cannot write blobs").await;
        let failing = writer.checks()["blob_store"].clone().unwrap();
        assert!(failing.starts_with("the blob store failed its probe"), "{failing}");
        assert_eq!(writer.checks()["job_store"], None);
        assert!(reader.is_ready(), "a reader still reads: {:?}", reader.checks());
        drop(frozen);
        wait_for(&writer, true, "blobs can be written again").await;

        shutdown.trigger();
        w.await.unwrap();
        r.await.unwrap();
    }
}
