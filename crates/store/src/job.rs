//! Jobs, their events, and the [`JobStore`] trait.

use crate::blob::BlobRef;
use crate::error::StoreError;
use async_trait::async_trait;
use pixmesh_imaging::Options;
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Processing,
    Succeeded,
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Processing => "processing",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        match s {
            "queued" => Some(JobState::Queued),
            "processing" => Some(JobState::Processing),
            "succeeded" => Some(JobState::Succeeded),
            "failed" => Some(JobState::Failed),
            _ => None,
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed)
    }
}

/// What the upload service records for a new job.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    /// The API key (its name) that created the job; only it may read the job. Empty for a
    /// gateway that requires no key.
    pub owner: String,
    pub input: BlobRef,
    /// Format sniffed from the bytes (`jpeg`, `png`, …).
    pub input_format: String,
    pub options: Options,
    /// Client-chosen key; a second create with the same key returns the first job.
    pub idempotency_key: Option<String>,
    /// Fingerprint of the request, to tell a retry from a different request under the same key.
    pub request_hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    pub blob: BlobRef,
    pub format: String,
    pub content_type: String,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    /// A code from the error table, e.g. `corrupt_image`.
    pub code: String,
    pub message: String,
}

/// A job as the job table holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: String,
    /// The API key (its name) that created the job.
    pub owner: String,
    pub state: JobState,
    /// How many times the job was claimed; the current claim's fencing token.
    pub attempt: u32,
    pub input: BlobRef,
    pub input_format: String,
    pub options: Options,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<i64>,
    pub result: Option<JobResult>,
    pub error: Option<JobError>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// The answer to a create: the job, and whether this call created it (false for an
/// idempotent replay).
#[derive(Debug, Clone)]
pub struct Created {
    pub job: Job,
    pub created: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The upload service recorded the job.
    Accepted,
    /// A distributor claimed the job under a lease; `attempt` is the new fencing token.
    Claimed,
    /// A claim's lease ran out before it finished; the job is claimable again.
    LeaseExpired,
    /// A worker call failed with a retryable error; the distributor tries another worker.
    Retried,
    /// The distributor gave the job back to the queue (to be claimed again later).
    Released,
    Succeeded,
    Failed,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Accepted => "accepted",
            EventKind::Claimed => "claimed",
            EventKind::LeaseExpired => "lease_expired",
            EventKind::Retried => "retried",
            EventKind::Released => "released",
            EventKind::Succeeded => "succeeded",
            EventKind::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        [
            EventKind::Accepted,
            EventKind::Claimed,
            EventKind::LeaseExpired,
            EventKind::Retried,
            EventKind::Released,
            EventKind::Succeeded,
            EventKind::Failed,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// One row of the append-only event log. Written in the same transaction as the state change
/// it describes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    pub seq: i64,
    pub job_id: String,
    pub kind: EventKind,
    pub attempt: u32,
    /// Milliseconds since the Unix epoch.
    pub at: i64,
    pub data: serde_json::Value,
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

    async fn get(&self, id: &str) -> Result<Option<Job>, StoreError>;

    /// The job's events in order.
    async fn events(&self, id: &str) -> Result<Vec<JobEvent>, StoreError>;

    /// Claims the oldest claimable job (queued and due, or processing with an expired lease)
    /// for `owner` under a lease of `lease`. A job that already had `max_attempts` claims is
    /// failed instead of claimed.
    async fn claim(&self, owner: &str, lease: Duration, max_attempts: u32) -> Result<Option<Job>, StoreError>;

    /// Pushes the lease of a claim further out.
    async fn extend_lease(&self, id: &str, attempt: u32, lease: Duration) -> Result<(), StoreError>;

    /// Records that one worker call of this claim failed and another worker will be tried.
    async fn record_retry(&self, id: &str, attempt: u32, worker: &str, error: &JobError) -> Result<(), StoreError>;

    /// Gives the job back to the queue, claimable again after `delay`.
    async fn release(&self, id: &str, attempt: u32, reason: &JobError, delay: Duration) -> Result<(), StoreError>;

    /// Commits the result.
    async fn succeed(&self, id: &str, attempt: u32, result: &JobResult) -> Result<(), StoreError>;

    /// Commits a permanent failure.
    async fn fail(&self, id: &str, attempt: u32, error: &JobError) -> Result<(), StoreError>;

    /// Number of jobs per state (for metrics and tests).
    async fn counts(&self) -> Result<Vec<(JobState, u64)>, StoreError>;

    /// The health probe: with `write`, a tiny write transaction on `who`'s health row (which
    /// fails like a job write would: full disk, read-only or locked file); without, a read.
    async fn probe(&self, who: &str, write: bool) -> Result<(), StoreError>;
}
