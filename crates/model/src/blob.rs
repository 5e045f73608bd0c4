//! The address of a blob: the SHA-256 of its bytes.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A stored blob: its SHA-256 (hex) and its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    pub digest: String,
    pub size: u64,
}

impl BlobRef {
    pub fn of(bytes: &[u8]) -> BlobRef {
        BlobRef { digest: hex::encode(Sha256::digest(bytes)), size: bytes.len() as u64 }
    }

    /// Whether `digest` is a well-formed SHA-256 in lowercase hex (what every blob is named by).
    pub fn is_digest(digest: &str) -> bool {
        digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    }
}
