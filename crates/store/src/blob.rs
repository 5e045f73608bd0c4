//! Content-addressed blobs: the SHA-256 of the bytes is the name, so writes are idempotent and a
//! blob never changes once written.

use crate::error::StoreError;
use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

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
}

#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Stores `bytes` durably and returns their address. Storing the same bytes twice is a no-op.
    async fn put(&self, bytes: Bytes) -> Result<BlobRef, StoreError>;
    /// The bytes of a blob, or `None` if there is no such blob.
    async fn get(&self, digest: &str) -> Result<Option<Bytes>, StoreError>;
    /// Deletes a blob; deleting a missing blob is not an error.
    async fn delete(&self, digest: &str) -> Result<(), StoreError>;
}

/// Blobs in a local directory: `root/ab/cd/abcd…`. Each write goes to a temporary file that is
/// synced, then renamed into place, then the directory is synced: a crash leaves either the
/// whole blob or nothing.
#[derive(Debug, Clone)]
pub struct LocalBlobStore {
    root: PathBuf,
}

impl LocalBlobStore {
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(root.join("tmp")).map_err(|e| StoreError::io(root, e))?;
        Ok(LocalBlobStore { root: root.to_path_buf() })
    }

    fn path_of(&self, digest: &str) -> Result<PathBuf, StoreError> {
        let valid = digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !valid {
            return Err(StoreError::Invalid(format!("not a blob digest: {digest:?}")));
        }
        Ok(self.root.join(&digest[0..2]).join(&digest[2..4]).join(digest))
    }
}

fn write_atomically(root: &Path, target: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    if target.exists() {
        return Ok(());
    }
    let dir = target.parent().ok_or_else(|| StoreError::Invalid("blob path has no parent".into()))?;
    std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
    let tmp = root.join("tmp").join(uuid::Uuid::now_v7().to_string());
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, target)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| StoreError::io(target, e))
}

#[async_trait]
impl BlobStore for LocalBlobStore {
    async fn put(&self, bytes: Bytes) -> Result<BlobRef, StoreError> {
        let root = self.root.clone();
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let blob = BlobRef::of(&bytes);
            let target = this.path_of(&blob.digest)?;
            write_atomically(&root, &target, &bytes)?;
            Ok(blob)
        })
        .await
        .map_err(|e| StoreError::Invalid(format!("blob writer task failed: {e}")))?
    }

    async fn get(&self, digest: &str) -> Result<Option<Bytes>, StoreError> {
        let path = self.path_of(digest)?;
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(Some(Bytes::from(bytes))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io(&path, e)),
        }
    }

    async fn delete(&self, digest: &str) -> Result<(), StoreError> {
        let path = self.path_of(digest)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io(&path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_delete_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path()).unwrap();
        let a = store.put(Bytes::from_static(b"hello")).await.unwrap();
        let again = store.put(Bytes::from_static(b"hello")).await.unwrap();
        assert_eq!(a, again);
        assert_eq!(a.size, 5);
        assert_eq!(store.get(&a.digest).await.unwrap().unwrap(), Bytes::from_static(b"hello"));
        store.delete(&a.digest).await.unwrap();
        assert_eq!(store.get(&a.digest).await.unwrap(), None);
        store.delete(&a.digest).await.unwrap();
        // No temporary files are left behind.
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn rejects_digests_that_are_not_digests() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path()).unwrap();
        for bad in ["../../etc/passwd", "", "ABCDEF", &"g".repeat(64)] {
            assert!(matches!(store.get(bad).await, Err(StoreError::Invalid(_))), "{bad}");
        }
    }
}
