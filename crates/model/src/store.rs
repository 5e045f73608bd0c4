//! The store traits every backend implements, and their one error type.

use crate::blob::BlobRef;
use crate::event::{JobEvent, JobView};
use crate::job::{CacheKey, CacheOutcome, Created, Job, JobError, JobResult, JobState, NewJob, Step};
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::time::Duration;

/// Which store an error comes from: clients and operators are told which one to look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreKind {
    /// The job table (SQLite or PostgreSQL).
    Jobs,
    /// The blob store (a local directory or an S3 bucket).
    Blobs,
}

impl StoreKind {
    /// The readiness check that reports this store (`job_store`, `blob_store`).
    pub fn check_name(self) -> &'static str {
        match self {
            StoreKind::Jobs => "job_store",
            StoreKind::Blobs => "blob_store",
        }
    }
}

impl std::fmt::Display for StoreKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreKind::Jobs => "job store",
            StoreKind::Blobs => "blob store",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The caller's attempt no longer holds the job (its lease was taken over, or the job is
    /// already terminal). The caller must drop its result.
    #[error("job {id}: attempt {attempt} no longer holds the job")]
    Fenced { id: String, attempt: u32 },
    #[error("idempotency key reused with a different request (first used for job {existing})")]
    IdempotencyConflict { existing: String },
    #[error("job {0} not found")]
    NotFound(String),
    /// A create that may only use the result cache ([`crate::CacheKey::only_cached`]) found
    /// nothing to use.
    #[error("the result cache has no result of this image with these options")]
    NotCached,
    /// The disk under a store has no room left (SQLITE_FULL, ENOSPC, EDQUOT): writes fail until
    /// space is freed; reads still work.
    #[error("the {store}'s disk is full: {detail}")]
    Full { store: StoreKind, detail: String },
    /// The job store's database failed (unreachable, I/O error, read-only or locked file, …);
    /// the backend's own words. A backend reports a full disk as [`StoreError::Full`] instead.
    #[error("job store: {0}")]
    Database(String),
    /// A file of a store could not be read or written.
    #[error("{store}: {path}: {source}")]
    Io { store: StoreKind, path: String, source: std::io::Error },
    #[error("stored data is invalid: {0}")]
    Invalid(String),
}

impl StoreError {
    /// The store that failed, for errors of the storage itself (full, I/O, database); `None` for
    /// answers about the caller's request (fenced, conflict, not found) and invalid data.
    pub fn failed_store(&self) -> Option<StoreKind> {
        match self {
            StoreError::Full { store, .. } | StoreError::Io { store, .. } => Some(*store),
            StoreError::Database(_) => Some(StoreKind::Jobs),
            StoreError::Fenced { .. }
            | StoreError::IdempotencyConflict { .. }
            | StoreError::NotFound(_)
            | StoreError::NotCached
            | StoreError::Invalid(_) => None,
        }
    }

    pub fn is_full(&self) -> bool {
        matches!(self, StoreError::Full { .. })
    }

    /// The same error once more, for each of several callers a failed batch answers (I/O
    /// errors keep their kind and text).
    pub fn replicate(&self) -> StoreError {
        match self {
            StoreError::Fenced { id, attempt } => StoreError::Fenced { id: id.clone(), attempt: *attempt },
            StoreError::IdempotencyConflict { existing } => StoreError::IdempotencyConflict { existing: existing.clone() },
            StoreError::NotFound(id) => StoreError::NotFound(id.clone()),
            StoreError::NotCached => StoreError::NotCached,
            StoreError::Full { store, detail } => StoreError::Full { store: *store, detail: detail.clone() },
            StoreError::Database(e) => StoreError::Database(e.clone()),
            StoreError::Io { store, path, source } => {
                StoreError::Io { store: *store, path: path.clone(), source: std::io::Error::new(source.kind(), source.to_string()) }
            }
            StoreError::Invalid(e) => StoreError::Invalid(e.clone()),
        }
    }

    /// An I/O error of `store` on `path`; a full disk or an exceeded quota becomes
    /// [`StoreError::Full`].
    pub fn io(store: StoreKind, path: &std::path::Path, source: std::io::Error) -> Self {
        use std::io::ErrorKind;
        if matches!(source.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded) {
            return StoreError::Full { store, detail: format!("{}: {source}", path.display()) };
        }
        StoreError::Io { store, path: path.display().to_string(), source }
    }
}

/// The job table: the queue and the source of truth.
///
/// Every mutation after `create` is fenced by `attempt`: it applies only while the caller's
/// claim is the job's latest claim and the job is not terminal; otherwise it fails with
/// [`StoreError::Fenced`] and changes nothing.
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Records a new job and its `accepted` event in one transaction.
    async fn create(&self, job: NewJob) -> Result<Created, StoreError>;

    /// [`JobStore::create`] through the result cache, in the same transaction: when the
    /// entry at `cache.key` names a job that succeeded, the new job is created succeeded with
    /// its result (a `cached` event, then `succeeded`); when it names one still being made, the
    /// new job waits for it (queued, not claimable, with a `cached` event) and the store ends
    /// it with that job: succeeded with its result, or, if it fails, released to be made on
    /// its own (the first of its waiters; the others wait for that one). Otherwise (no entry,
    /// or one whose job failed) the new job is queued as by `create` and becomes the entry. The
    /// entry goes when its job is pruned: it lives as long as the result it hands out.
    async fn create_cached(&self, job: NewJob, cache: &CacheKey) -> Result<(Created, CacheOutcome), StoreError>;

    async fn get(&self, id: &str) -> Result<Option<Job>, StoreError>;

    /// The job's events in order.
    async fn events(&self, id: &str) -> Result<Vec<JobEvent>, StoreError>;

    /// The job's events after the one numbered `seq`, in order.
    async fn events_since(&self, id: &str, seq: u32) -> Result<Vec<JobEvent>, StoreError> {
        Ok(self.events(id).await?.into_iter().filter(|e| e.seq > seq).collect())
    }

    /// Claims up to `limit` of the oldest claimable jobs (queued and due, or processing with an
    /// expired lease) for `owner` under a lease of `lease`, oldest first, in one transaction. A
    /// job that already had `max_attempts` claims is failed instead of claimed; a saga is
    /// turned back ([`JobStore::compensate`]) and claimed once more to delete what it wrote,
    /// however many claims it had. Fewer (or none) when fewer are claimable.
    async fn claim_many(&self, owner: &str, lease: Duration, max_attempts: u32, limit: u32) -> Result<Vec<Job>, StoreError>;

    /// Claims the named jobs that are queued and due (a wake-up from the broker names them),
    /// in one transaction, and answers for each: claimed, not due yet, held by a live claim,
    /// or ended (terminal, unknown, or failed now for having used up its attempts). Jobs
    /// whose lease ran out are not claimed here: [`Outbox::rescue_expired`] gives them back to
    /// the queue first, with their `lease_expired` event.
    async fn claim_ids(&self, owner: &str, lease: Duration, max_attempts: u32, ids: &[String]) -> Result<Vec<ClaimById>, StoreError>;

    /// Claims the oldest claimable job, as [`JobStore::claim_many`] with a limit of one.
    async fn claim(&self, owner: &str, lease: Duration, max_attempts: u32) -> Result<Option<Job>, StoreError> {
        Ok(self.claim_many(owner, lease, max_attempts, 1).await?.pop())
    }

    /// Pushes the lease of a claim further out.
    async fn extend_lease(&self, id: &str, attempt: u32, lease: Duration) -> Result<(), StoreError>;

    /// Records that one worker call of this claim failed and another worker will be tried.
    async fn record_retry(&self, id: &str, attempt: u32, worker: &str, error: &JobError) -> Result<(), StoreError>;

    /// Gives the job back to the queue, claimable again after `delay`.
    async fn release(&self, id: &str, attempt: u32, reason: &JobError, delay: Duration) -> Result<(), StoreError>;

    /// Commits the result.
    async fn succeed(&self, id: &str, attempt: u32, result: &JobResult) -> Result<(), StoreError>;

    /// Commits several results at once (one transaction), each fenced on its own: the answer
    /// for each item is what [`JobStore::succeed`] would have answered for it.
    async fn succeed_many(&self, items: &[(String, u32, JobResult)]) -> Vec<Result<(), StoreError>> {
        let mut out = Vec::with_capacity(items.len());
        for (id, attempt, result) in items {
            out.push(self.succeed(id, *attempt, result).await);
        }
        out
    }

    /// Commits a permanent failure.
    async fn fail(&self, id: &str, attempt: u32, error: &JobError) -> Result<(), StoreError>;

    /// A saga's step wrote `output` (at the key its result's blob names): the job keeps it
    /// across claims, so a later claim does not make it again, until the pivot or a
    /// compensation.
    async fn record_output(&self, id: &str, attempt: u32, output: &str, result: &JobResult) -> Result<(), StoreError>;

    /// Turns a saga back because `output` failed for good (`None`: the job used up its
    /// attempts): from now on every claim of the job deletes the outputs written
    /// ([`JobStore::record_deleted`] for each), then fails it with `error`. The first reason
    /// given is kept.
    async fn compensate(&self, id: &str, attempt: u32, output: Option<&str>, error: &JobError) -> Result<(), StoreError>;

    /// A compensation deleted the blob of `output` (at `key`): it is no longer the job's.
    async fn record_deleted(&self, id: &str, attempt: u32, output: &str, key: &str) -> Result<(), StoreError>;

    /// The pivot of a saga: every output succeeded, and the job with them, in one transaction.
    /// `outputs` are the job's steps as the caller read and recorded them.
    async fn succeed_outputs(&self, id: &str, attempt: u32, outputs: &BTreeMap<String, Step>) -> Result<(), StoreError>;

    /// Number of jobs per state (for metrics and tests).
    async fn counts(&self) -> Result<Vec<(JobState, u64)>, StoreError>;

    /// Deletes up to `limit` jobs that ended (succeeded or failed) before `ended_before`
    /// (milliseconds since the Unix epoch), with their events; returns how many. Jobs that have
    /// not ended are never touched. Their blobs are left to the blob store.
    async fn prune(&self, ended_before: i64, limit: u32) -> Result<u64, StoreError>;

    /// The health probe: with `write`, a tiny write transaction on `who`'s health row (which
    /// fails like a job write would: full disk, read-only or locked file); without, a read.
    async fn probe(&self, who: &str, write: bool) -> Result<(), StoreError>;
}

/// The answer of [`JobStore::claim_ids`] for one job.
#[derive(Debug, Clone, PartialEq)]
pub enum ClaimById {
    Claimed(Box<Job>),
    /// Queued, claimable in this many milliseconds (a release's delay).
    NotDue {
        id: String,
        in_ms: u64,
    },
    /// Processing under a claim whose lease has not run out.
    Held {
        id: String,
    },
    /// Succeeded, failed, or not there (pruned, never created).
    Ended {
        id: String,
    },
}

impl ClaimById {
    pub fn id(&self) -> &str {
        match self {
            ClaimById::Claimed(job) => &job.id,
            ClaimById::NotDue { id, .. } | ClaimById::Held { id } | ClaimById::Ended { id } => id,
        }
    }
}

/// An event as the outbox holds it: its place in the log of all jobs' events, and the event.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEvent {
    /// Orders all events of all jobs (increasing, with gaps where a transaction rolled back or
    /// has not committed yet).
    pub id: i64,
    pub event: JobEvent,
    /// The trace of the event's job ([`crate::Job::traceparent`]): the relay's publish of a
    /// wake-up is a span of it, and the wake-up carries it to the distributor that claims.
    pub traceparent: Option<String>,
}

/// The job store seen from the outbox relay: the event rows are the outbox, read in order and
/// published to the broker by whichever relay holds the relay lease.
#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    /// Up to `limit` events with an id above `after`, in id order.
    async fn events_after(&self, after: i64, limit: u32) -> Result<Vec<OutboxEvent>, StoreError>;

    /// As [`Outbox::events_after`], only the events of jobs that `owner` (an API key's name)
    /// uploaded.
    async fn owner_events_after(&self, owner: &str, after: i64, limit: u32) -> Result<Vec<OutboxEvent>, StoreError>;

    /// The id of the newest event (0 when there is none): where a reader that wants only what
    /// comes next starts.
    async fn newest_event_id(&self) -> Result<i64, StoreError>;

    /// Takes or renews the relay lease for `owner` for `ttl`, and (when `owner` already held
    /// it) saves `cursor`: every event up to it has been published. Answers the saved cursor
    /// when `owner` holds the lease, `None` when another relay does. The first relay ever
    /// starts at the newest event: older events were written before there was a broker.
    async fn relay_lease(&self, owner: &str, ttl: Duration, cursor: Option<i64>) -> Result<Option<i64>, StoreError>;

    /// Gives jobs whose lease ran out back to the queue (or fails those that used up their
    /// attempts), each with its `lease_expired` event; returns how many.
    async fn rescue_expired(&self, max_attempts: u32) -> Result<u64, StoreError>;

    /// Queued jobs that have been claimable for longer than `for_longer_than` without being
    /// claimed, oldest first, with their attempt: the sweeper wakes distributors for them again.
    async fn stale_claimable(&self, for_longer_than: Duration, limit: u32) -> Result<Vec<(String, u32)>, StoreError>;

    /// The queue as an operator sees it: jobs waiting to be made (queued, due now or later;
    /// not those waiting for an identical upload's job), and when the oldest was created.
    async fn queue_stats(&self) -> Result<QueueStats, StoreError>;
}

/// See [`Outbox::queue_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub queued: u64,
    /// Unix milliseconds; `None` when nothing is queued.
    pub oldest_created_at: Option<i64>,
}

/// A job's view as the projection holds it, with the key that owns the job.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredView {
    pub owner: String,
    pub view: JobView,
}

/// Where a listing of views goes on from: the `created_at` and id of the last one listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewsAfter {
    pub created_at: i64,
    pub id: String,
}

/// The status read model: every job's view, folded from its events by a projector that follows
/// the outbox (and rebuildable from the events at any time), so reads and listings do not fold
/// whole histories. A view is only ever replaced by a later one (a higher `seq`).
#[async_trait]
pub trait Views: Send + Sync + 'static {
    /// The stored view of job `id`.
    async fn view(&self, id: &str) -> Result<Option<StoredView>, StoreError>;
    /// The stored views of the jobs `ids` (those there are).
    async fn views_of(&self, ids: &[String]) -> Result<Vec<StoredView>, StoreError>;
    /// Writes `views` in one transaction, each only over an older one (or none), and saves
    /// `cursor` as the projector's place in the outbox when given (never moving it back).
    async fn put_views(&self, views: &[StoredView], cursor: Option<i64>) -> Result<(), StoreError>;
    /// Up to `limit` views of `owner`'s jobs, newest first (by creation, then id), in `state`
    /// when given, after `after` when given.
    async fn list_views(
        &self,
        owner: &str,
        state: Option<JobState>,
        after: Option<&ViewsAfter>,
        limit: u32,
    ) -> Result<Vec<StoredView>, StoreError>;
    /// The projector's saved place in the outbox (`None` before it ever ran).
    async fn projector_cursor(&self) -> Result<Option<i64>, StoreError>;
    /// The owners of the jobs `ids` (those there are), as `(id, owner)`.
    async fn owners(&self, ids: &[String]) -> Result<Vec<(String, String)>, StoreError>;
    /// Up to `limit` jobs (id and owner) with an id above `after`, in id order: what a rebuild
    /// walks.
    async fn jobs_after(&self, after: &str, limit: u32) -> Result<Vec<(String, String)>, StoreError>;
    /// Deletes every view (a rebuild starts from nothing).
    async fn clear_views(&self) -> Result<u64, StoreError>;
}

/// Told at once of a job just created, so a distributor can be woken before the outbox relay
/// gets to it (the relay wakes for it in any case: this is only the early path).
pub trait Notify: Send + Sync + 'static {
    /// `traceparent`: the job's trace, for the wake-up to carry.
    fn job_created(&self, id: &str, traceparent: Option<&str>);
}

#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Stores `bytes` durably and returns their address. Storing the same bytes twice is a no-op.
    async fn put(&self, bytes: Bytes) -> Result<BlobRef, StoreError>;
    /// Stores `bytes` durably at `key`, an [`crate::output_key`] (a saga step's output, not
    /// content-addressed), replacing what an earlier write of the same key left, whole or not
    /// at all. Its [`BlobRef`] names the key.
    async fn put_at(&self, key: &str, bytes: Bytes) -> Result<BlobRef, StoreError>;
    /// The bytes of a blob (by [`BlobRef::name`]: a digest or an output key), or `None` if
    /// there is no such blob.
    async fn get(&self, name: &str) -> Result<Option<Bytes>, StoreError>;
    /// Deletes a blob (by name); deleting a missing blob is not an error.
    async fn delete(&self, name: &str) -> Result<(), StoreError>;
    /// The health probe: proves that blobs can be written (`write`), or read.
    async fn probe(&self, write: bool) -> Result<(), StoreError>;
    /// A blob as a stream of chunks, for bodies that should not be held whole in memory (a
    /// download): its size, then its bytes. `None` if there is no such blob.
    async fn stream(&self, name: &str) -> Result<Option<BlobStream>, StoreError> {
        Ok(self
            .get(name)
            .await?
            .map(|bytes| BlobStream { size: bytes.len() as u64, chunks: Box::pin(futures_util::stream::once(async move { Ok(bytes) })) }))
    }
    /// Short-lived URLs for parties that hold no credentials of this store (image workers),
    /// when the backend has them (S3). A backend without them moves the bytes itself.
    fn presign(&self) -> Option<&dyn Presign> {
        None
    }
}

/// A blob's bytes as they come (see [`BlobStore::stream`]).
pub struct BlobStream {
    pub size: u64,
    pub chunks: std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Bytes, StoreError>> + Send>>,
}

/// Presigned URLs: each for one object and one method, valid for a bounded time. A worker call
/// gets a GET URL for its input and a PUT URL for a staging object of its own; once the call
/// has answered, the staged object is put at its content address and the staging copy goes.
#[async_trait]
pub trait Presign: Send + Sync + 'static {
    /// A URL that GETs blob `digest` for `ttl`.
    async fn get_url(&self, digest: &str, ttl: Duration) -> Result<String, StoreError>;
    /// A URL that PUTs the staging object of `call` (a name unique to one worker call) for `ttl`.
    async fn staging_url(&self, call: &str, ttl: Duration) -> Result<String, StoreError>;
    /// Checks that the staged object of `call` has `blob.size` bytes, puts it at the address of
    /// `blob` ([`BlobRef::name`]: its digest, or its output key) unless a blob of that size is
    /// there already (at a digest it then has these bytes; an output key names one attempt's
    /// one output), and deletes the staging object. A staged object that is missing or of
    /// another size is [`StoreError::Invalid`].
    async fn adopt(&self, call: &str, blob: &BlobRef) -> Result<(), StoreError>;
    /// Deletes the staging object of `call`, if there is one (a call whose answer is dropped).
    async fn discard(&self, call: &str) -> Result<(), StoreError>;
    /// Deletes staging objects older than `age` (calls whose distributor died before adopting
    /// or discarding them); returns how many.
    async fn sweep_staging(&self, age: Duration) -> Result<u64, StoreError>;
}
