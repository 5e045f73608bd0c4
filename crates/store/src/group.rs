//! Group commit for results: the `succeed` calls that a process makes while its previous batch
//! is being committed go to the store together, in one transaction ([`JobStore::succeed_many`]),
//! each still fenced on its own. With one call outstanding it is committed at once (no added
//! wait); under load, a distributor's many jobs in flight share commits instead of queueing for
//! one each, which is what bounds dispatch on a database that syncs every commit.

use crate::{StoreError, Stores};
use async_trait::async_trait;
use pixmesh_model::{CacheKey, CacheOutcome, ClaimById, Created, Job, JobError, JobEvent, JobResult, JobState, JobStore, NewJob, Step};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

struct Pending {
    id: String,
    attempt: u32,
    result: JobResult,
    reply: oneshot::Sender<Result<(), StoreError>>,
}

/// A job store whose `succeed` calls are committed in groups; everything else goes straight
/// to the store it wraps.
pub struct GroupCommit {
    inner: Arc<dyn JobStore>,
    queue: mpsc::UnboundedSender<Pending>,
}

impl GroupCommit {
    /// Wraps `inner`; at most `max_batch` results per transaction. Needs a tokio runtime (the
    /// committer is a task of its own; it ends when the wrapper is dropped).
    pub fn wrap(inner: Arc<dyn JobStore>, max_batch: usize) -> Arc<dyn JobStore> {
        let (queue, mut incoming) = mpsc::unbounded_channel::<Pending>();
        let store = Arc::clone(&inner);
        let max_batch = max_batch.max(1);
        tokio::spawn(async move {
            while let Some(first) = incoming.recv().await {
                let mut batch = vec![first];
                while batch.len() < max_batch {
                    match incoming.try_recv() {
                        Ok(p) => batch.push(p),
                        Err(_) => break,
                    }
                }
                let items: Vec<(String, u32, JobResult)> = batch.iter().map(|p| (p.id.clone(), p.attempt, p.result.clone())).collect();
                metrics::histogram!(crate::instruments::COMMIT_BATCH).record(items.len() as f64);
                let results = store.succeed_many(&items).await;
                for (pending, result) in batch.into_iter().zip(results) {
                    // A caller that stopped waiting (its claim was lost) needs no answer: the
                    // fence already decided.
                    let _ = pending.reply.send(result);
                }
            }
        });
        Arc::new(GroupCommit { inner, queue })
    }
}

impl Stores {
    /// These stores with results committed in groups of up to `max_batch` (see [`GroupCommit`]).
    pub fn with_group_commit(mut self, max_batch: usize) -> Stores {
        self.jobs = GroupCommit::wrap(self.jobs, max_batch);
        self
    }
}

#[async_trait]
impl JobStore for GroupCommit {
    async fn create(&self, job: NewJob) -> Result<Created, StoreError> {
        self.inner.create(job).await
    }

    async fn create_cached(&self, job: NewJob, cache: &CacheKey) -> Result<(Created, CacheOutcome), StoreError> {
        self.inner.create_cached(job, cache).await
    }

    async fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        self.inner.get(id).await
    }

    async fn events(&self, id: &str) -> Result<Vec<JobEvent>, StoreError> {
        self.inner.events(id).await
    }

    async fn events_since(&self, id: &str, seq: u32) -> Result<Vec<JobEvent>, StoreError> {
        self.inner.events_since(id, seq).await
    }

    async fn claim_ids(&self, owner: &str, lease: Duration, max_attempts: u32, ids: &[String]) -> Result<Vec<ClaimById>, StoreError> {
        self.inner.claim_ids(owner, lease, max_attempts, ids).await
    }

    async fn claim_many(&self, owner: &str, lease: Duration, max_attempts: u32, limit: u32) -> Result<Vec<Job>, StoreError> {
        self.inner.claim_many(owner, lease, max_attempts, limit).await
    }

    async fn extend_lease(&self, id: &str, attempt: u32, lease: Duration) -> Result<(), StoreError> {
        self.inner.extend_lease(id, attempt, lease).await
    }

    async fn record_retry(&self, id: &str, attempt: u32, worker: &str, error: &JobError) -> Result<(), StoreError> {
        self.inner.record_retry(id, attempt, worker, error).await
    }

    async fn release(&self, id: &str, attempt: u32, reason: &JobError, delay: Duration) -> Result<(), StoreError> {
        self.inner.release(id, attempt, reason, delay).await
    }

    async fn succeed(&self, id: &str, attempt: u32, result: &JobResult) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        let pending = Pending { id: id.to_string(), attempt, result: result.clone(), reply };
        if self.queue.send(pending).is_err() {
            // The committer is gone (the runtime is shutting down): commit alone.
            return self.inner.succeed(id, attempt, result).await;
        }
        match answer.await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Database("the result committer stopped before answering".into())),
        }
    }

    async fn succeed_many(&self, items: &[(String, u32, JobResult)]) -> Vec<Result<(), StoreError>> {
        self.inner.succeed_many(items).await
    }

    async fn fail(&self, id: &str, attempt: u32, error: &JobError) -> Result<(), StoreError> {
        self.inner.fail(id, attempt, error).await
    }

    async fn record_output(&self, id: &str, attempt: u32, output: &str, result: &JobResult) -> Result<(), StoreError> {
        self.inner.record_output(id, attempt, output, result).await
    }

    async fn compensate(&self, id: &str, attempt: u32, output: Option<&str>, error: &JobError) -> Result<(), StoreError> {
        self.inner.compensate(id, attempt, output, error).await
    }

    async fn record_deleted(&self, id: &str, attempt: u32, output: &str, key: &str) -> Result<(), StoreError> {
        self.inner.record_deleted(id, attempt, output, key).await
    }

    async fn succeed_outputs(&self, id: &str, attempt: u32, outputs: &BTreeMap<String, Step>) -> Result<(), StoreError> {
        self.inner.succeed_outputs(id, attempt, outputs).await
    }

    async fn counts(&self) -> Result<Vec<(JobState, u64)>, StoreError> {
        self.inner.counts().await
    }

    async fn prune(&self, ended_before: i64, limit: u32) -> Result<u64, StoreError> {
        self.inner.prune(ended_before, limit).await
    }

    async fn probe(&self, who: &str, write: bool) -> Result<(), StoreError> {
        self.inner.probe(who, write).await
    }
}
