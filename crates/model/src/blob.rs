//! The address of a blob: the SHA-256 of its bytes.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A stored blob: its SHA-256 (hex) and its size, and where it is stored when that is not at
/// its digest (an output of a saga step: see [`output_key`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl BlobRef {
    pub fn of(bytes: &[u8]) -> BlobRef {
        BlobRef::at_digest(hex::encode(Sha256::digest(bytes)), bytes.len() as u64)
    }

    /// A content-addressed blob.
    pub fn at_digest(digest: impl Into<String>, size: u64) -> BlobRef {
        BlobRef { digest: digest.into(), size, key: None }
    }

    /// The name a blob store reads it by: its key, or else its digest.
    pub fn name(&self) -> &str {
        self.key.as_deref().unwrap_or(&self.digest)
    }

    /// Whether `name` names a blob: a digest, or an output key.
    pub fn is_name(name: &str) -> bool {
        BlobRef::is_digest(name) || is_output_key(name)
    }

    /// Whether `digest` is a well-formed SHA-256 in lowercase hex (what every blob is named by).
    pub fn is_digest(digest: &str) -> bool {
        digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }
}

/// Where the output `output` of job `job` is stored by attempt `attempt`: `job/output/attempt`.
///
/// Outputs of a saga are not content-addressed: deleting one while compensating must not take
/// the same bytes away from another job (or another output) that produced them too. The key
/// names the attempt, so that a later claim of the job can find and delete what an earlier,
/// crashed one wrote without recording it.
pub fn output_key(job: &str, output: &str, attempt: u32) -> String {
    format!("{job}/{output}/{attempt}")
}

/// Whether `key` is an [`output_key`]: a job id of 1 to 64 letters, digits, `-` or `_`; an
/// output name; an attempt number. (Nothing else, so that a key is always a safe path.)
pub fn is_output_key(key: &str) -> bool {
    let mut parts = key.split('/');
    let (Some(job), Some(output), Some(attempt), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let job_ok = (1..=64).contains(&job.len()) && job.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let attempt_ok = (1..=10).contains(&attempt.len()) && attempt.bytes().all(|b| b.is_ascii_digit());
    job_ok && crate::job::Output::valid_name(output) && attempt_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_keys_are_safe_paths_and_nothing_else_is_one() {
        let key = output_key("0190f1c2-aaaa-7bbb-8ccc-123456789abc", "thumb_2x", 3);
        assert!(is_output_key(&key) && BlobRef::is_name(&key));
        assert!(BlobRef::is_name(&"a".repeat(64)));
        for bad in ["", "j/o", "j/o/1/2", "../o/1", "j/../1", "j/O/1", "j/o/x", "j/o/", "/o/1", "j/o/-1", "j\\x/o/1", "j/o/12345678901"] {
            assert!(!is_output_key(bad), "{bad}");
        }
        let blob = BlobRef { key: Some(key.clone()), ..BlobRef::of(b"x") };
        assert_eq!(blob.name(), key);
        assert_eq!(BlobRef::of(b"x").name(), BlobRef::of(b"x").digest);
    }
}
