//! A job, as the upload service records it and the job store keeps it.

use crate::blob::BlobRef;
use crate::options::Options;
use serde::{Deserialize, Serialize};

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
