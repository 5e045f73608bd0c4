//! A job, as the upload service records it and the job store keeps it.

use crate::blob::BlobRef;
use crate::options::Options;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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
    /// Named outputs, each a step of the job's saga; empty for a job with one unnamed output
    /// (made from `options`).
    pub outputs: Vec<Output>,
    /// Client-chosen key; a second create with the same key returns the first job.
    pub idempotency_key: Option<String>,
    /// Fingerprint of the request, to tell a retry from a different request under the same key.
    pub request_hash: String,
    /// The W3C `traceparent` of the upload: the job's claims, worker calls and commits are
    /// spans of that trace.
    pub traceparent: Option<String>,
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
    /// The named outputs asked for (empty: one unnamed output, from `options`).
    pub outputs: Vec<Output>,
    /// The outputs written so far (a saga's steps that succeeded), by name; they are the
    /// job's results once it has succeeded.
    pub steps: BTreeMap<String, Step>,
    /// Set when the saga turned back: its written outputs are being deleted, after which the
    /// job fails with this error.
    pub compensate: Option<JobError>,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<i64>,
    pub result: Option<JobResult>,
    pub error: Option<JobError>,
    pub created_at: i64,
    pub updated_at: i64,
    /// The trace the job was uploaded in ([`NewJob::traceparent`]).
    pub traceparent: Option<String>,
}

/// The answer to a create: the job, and whether this call created it (false for an
/// idempotent replay).
#[derive(Debug, Clone)]
pub struct Created {
    pub job: Job,
    pub created: bool,
}

/// How a create uses the result cache: `key` names the work (the input's digest and the
/// canonical options, in the scope the cache is shared in); `lookup` false refreshes the entry
/// without reading it (a client that asked for `Cache-Control: no-cache`); `only_cached` makes
/// nothing but from the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    pub key: String,
    pub lookup: bool,
    /// The upload sent no image, only its digest: create the job only from the cache (a hit,
    /// or a join), with the input of the job it reuses; otherwise create nothing and answer
    /// [`crate::StoreError::NotCached`].
    pub only_cached: bool,
}

/// What the result cache did for a create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOutcome {
    /// An identical job had succeeded: the new job was created succeeded, with its result.
    Hit { from: String },
    /// An identical job is being made: the new job waits for it and ends with it (or, if it
    /// fails, is made on its own).
    Joined { leader: String },
    /// Nothing to reuse: the new job is made, and is the entry for the next identical upload.
    Miss,
    /// An idempotent replay: the cache was not consulted.
    Replayed,
}

impl CacheOutcome {
    /// The job whose work the new one has (a hit) or waits for (a join).
    pub fn source(&self) -> Option<&str> {
        match self {
            CacheOutcome::Hit { from } => Some(from),
            CacheOutcome::Joined { leader } => Some(leader),
            CacheOutcome::Miss | CacheOutcome::Replayed => None,
        }
    }

    /// The label of the outcome in metrics and in the `Cache-Status` header.
    pub fn as_str(&self) -> &'static str {
        match self {
            CacheOutcome::Hit { .. } => "hit",
            CacheOutcome::Joined { .. } => "joined",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Replayed => "replayed",
        }
    }
}

/// The most outputs one job may ask for unless configured otherwise.
pub const DEFAULT_MAX_OUTPUTS: usize = 16;

/// One named output of a job that asks for several.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Output {
    /// `[a-z0-9_-]{1,32}` (see [`Output::valid_name`]).
    pub name: String,
    pub options: Options,
}

impl Output {
    /// Whether `name` may name an output: 1 to 32 of `a-z`, `0-9`, `_` and `-`.
    pub fn valid_name(name: &str) -> bool {
        (1..=32).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    }
}

/// A step of a saga that succeeded: the attempt (claim) that wrote it, and its result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub attempt: u32,
    pub result: JobResult,
}

impl Job {
    /// Whether the job is a saga (several named outputs) rather than one unnamed output.
    pub fn is_saga(&self) -> bool {
        !self.outputs.is_empty()
    }
}
