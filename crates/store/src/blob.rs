//! The local blob backend. Blobs are content-addressed: the SHA-256 of the bytes is the name, so
//! writes are idempotent and a blob never changes once written. The one exception is the
//! outputs of a saga's steps, under `outputs/<job>/<output>/<attempt>`: each key is written by
//! its one attempt and deleted when the saga compensates (content addresses would let that
//! deletion take bytes from another job that made the same output).

use crate::health::Alarm;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use pixmesh_model::{BlobRef, BlobStore, BlobStream, StoreError, StoreKind, is_output_key};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Blobs in a local directory: `root/ab/cd/abcd…`. Each write goes to a temporary file that is
/// synced, then renamed into place, then the directory is synced: a crash leaves either the
/// whole blob or nothing.
///
/// Directories that went missing under a running system (`tmp/`, a shard, the whole root,
/// deleted by hand or by a cleanup job) are made again: at open, and when a write fails with
/// "not found", which is then tried once more.
#[derive(Debug, Clone)]
pub struct LocalBlobStore {
    root: PathBuf,
    alarm: Alarm,
}

impl LocalBlobStore {
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(root.join("tmp")).map_err(|e| StoreError::io(StoreKind::Blobs, root, e))?;
        Ok(LocalBlobStore { root: root.to_path_buf(), alarm: Alarm::default() })
    }

    /// Raises `alarm` whenever a read or write of the blob directory fails.
    pub(crate) fn with_alarm(mut self, alarm: Alarm) -> Self {
        self.alarm = alarm;
        self
    }

    /// Raises the alarm for errors of the storage itself (not for a bad digest).
    fn watch<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(e) = &result
            && e.failed_store().is_some()
        {
            self.alarm.raise();
        }
        result
    }

    /// Where blob `name` is: a digest at `root/ab/cd/abcd…`, an output key `job/output/attempt`
    /// under `root/outputs/` (never anywhere else: a name is checked before it becomes a path).
    fn path_of(&self, name: &str) -> Result<PathBuf, StoreError> {
        if BlobRef::is_digest(name) {
            return Ok(self.root.join(&name[0..2]).join(&name[2..4]).join(name));
        }
        if is_output_key(name) {
            return Ok(name.split('/').fold(self.root.join(OUTPUTS), |path, part| path.join(part)));
        }
        Err(StoreError::Invalid(format!("not a blob digest or output key: {name:?}")))
    }
}

/// The folder of saga outputs (`outputs/<job>/<output>/<attempt>`).
const OUTPUTS: &str = "outputs";

/// How a write treats a file already at its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Existing {
    /// Content-addressed: what is there holds these bytes.
    Keep,
    /// An output key: the new bytes replace it (atomically, by the rename).
    Replace,
}

fn write_atomically(root: &Path, target: &Path, bytes: &[u8], existing: Existing) -> Result<(), StoreError> {
    if existing == Existing::Keep && target.exists() {
        return Ok(());
    }
    let dir = target.parent().ok_or_else(|| StoreError::Invalid("blob path has no parent".into()))?;
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
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
        result
    };
    repairing(root, write).map_err(|e| StoreError::io(StoreKind::Blobs, target, e))
}

/// Runs `write`; if it fails because a directory is missing, makes `root/tmp` again and runs it
/// once more (`write` makes the blob's own shard directory itself).
fn repairing(root: &Path, write: impl Fn() -> std::io::Result<()>) -> std::io::Result<()> {
    match write() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(root = %root.display(), error = %e, "a blob store directory is missing; making it again");
            std::fs::create_dir_all(root.join("tmp"))?;
            write()
        }
        other => other,
    }
}

/// The write probe: a small file in `tmp/`, written, synced and deleted.
fn write_probe(root: &Path) -> Result<(), StoreError> {
    let path = root.join("tmp").join(format!("probe-{}", uuid::Uuid::now_v7()));
    let write = || -> std::io::Result<()> {
        let result = (|| {
            let mut file = std::fs::File::create(&path)?;
            file.write_all(b"pixmesh blob store probe\n")?;
            file.sync_all()
        })();
        let removed = std::fs::remove_file(&path);
        result?;
        removed
    };
    repairing(root, write).map_err(|e| StoreError::io(StoreKind::Blobs, &path, e))
}

#[async_trait]
impl BlobStore for LocalBlobStore {
    async fn put(&self, bytes: Bytes) -> Result<BlobRef, StoreError> {
        let root = self.root.clone();
        let this = self.clone();
        let written = tokio::task::spawn_blocking(move || {
            let blob = BlobRef::of(&bytes);
            let target = this.path_of(&blob.digest)?;
            write_atomically(&root, &target, &bytes, Existing::Keep)?;
            Ok(blob)
        })
        .await
        .map_err(|e| StoreError::Invalid(format!("blob writer task failed: {e}")))?;
        self.watch(written)
    }

    async fn put_at(&self, key: &str, bytes: Bytes) -> Result<BlobRef, StoreError> {
        if !is_output_key(key) {
            return Err(StoreError::Invalid(format!("not an output key: {key:?}")));
        }
        let root = self.root.clone();
        let target = self.path_of(key)?;
        let key = key.to_string();
        let written = tokio::task::spawn_blocking(move || {
            write_atomically(&root, &target, &bytes, Existing::Replace)?;
            Ok(BlobRef { key: Some(key), ..BlobRef::of(&bytes) })
        })
        .await
        .map_err(|e| StoreError::Invalid(format!("blob writer task failed: {e}")))?;
        self.watch(written)
    }

    async fn get(&self, name: &str) -> Result<Option<Bytes>, StoreError> {
        let path = self.path_of(name)?;
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(Some(Bytes::from(bytes))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => self.watch(Err(StoreError::io(StoreKind::Blobs, &path, e))),
        }
    }

    async fn stream(&self, name: &str) -> Result<Option<BlobStream>, StoreError> {
        let path = self.path_of(name)?;
        let file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return self.watch(Err(StoreError::io(StoreKind::Blobs, &path, e))),
        };
        let size = match file.metadata().await {
            Ok(meta) => meta.len(),
            Err(e) => return self.watch(Err(StoreError::io(StoreKind::Blobs, &path, e))),
        };
        let chunks = tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024)
            .map(move |chunk| chunk.map_err(|e| StoreError::io(StoreKind::Blobs, &path, e)));
        Ok(Some(BlobStream { size, chunks: Box::pin(chunks) }))
    }

    async fn delete(&self, name: &str) -> Result<(), StoreError> {
        let path = self.path_of(name)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return self.watch(Err(StoreError::io(StoreKind::Blobs, &path, e))),
        }
        // An output's folders go with their last file (`remove_dir` leaves one that is not
        // empty): deleted jobs leave no empty folders behind.
        if is_output_key(name) {
            let outputs = self.root.join(OUTPUTS);
            let mut dir = path.parent();
            while let Some(d) = dir.filter(|d| *d != outputs.as_path()) {
                if tokio::fs::remove_dir(d).await.is_err() {
                    break;
                }
                dir = d.parent();
            }
        }
        Ok(())
    }

    async fn probe(&self, write: bool) -> Result<(), StoreError> {
        let root = self.root.clone();
        if write {
            return tokio::task::spawn_blocking(move || write_probe(&root))
                .await
                .map_err(|e| StoreError::Invalid(format!("blob probe task failed: {e}")))?;
        }
        // A reader needs the directory to be there and listable; it makes nothing.
        match tokio::fs::read_dir(&root).await {
            Ok(_) => Ok(()),
            Err(e) => Err(StoreError::io(StoreKind::Blobs, &root, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoreErrorExt;

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
    async fn output_keys_are_written_replaced_read_and_deleted_without_leaving_folders() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path()).unwrap();
        let key = pixmesh_model::output_key("job-1", "thumb", 2);
        let first = store.put_at(&key, Bytes::from_static(b"first")).await.unwrap();
        assert_eq!((first.name(), first.size), (key.as_str(), 5));
        let second = store.put_at(&key, Bytes::from_static(b"second!")).await.unwrap();
        assert_eq!(store.get(&key).await.unwrap().unwrap(), Bytes::from_static(b"second!"), "a write of the key replaces it");
        assert_eq!(second.digest, BlobRef::of(b"second!").digest);
        let other = pixmesh_model::output_key("job-1", "large", 2);
        store.put_at(&other, Bytes::from_static(b"large")).await.unwrap();
        // The same bytes at a digest and at a key are two blobs: deleting one keeps the other.
        let addressed = store.put(Bytes::from_static(b"large")).await.unwrap();
        store.delete(&other).await.unwrap();
        assert_eq!(store.get(&addressed.digest).await.unwrap().unwrap(), Bytes::from_static(b"large"));
        assert_eq!(store.get(&other).await.unwrap(), None);
        store.delete(&key).await.unwrap();
        store.delete(&key).await.unwrap();
        assert_eq!(std::fs::read_dir(dir.path().join(OUTPUTS)).unwrap().count(), 0, "no folder of job-1 is left");
        for bad in ["job-1/thumb", "../x/thumb/1", "job-1/Thumb/1", &addressed.digest] {
            assert!(matches!(store.put_at(bad, Bytes::from_static(b"x")).await, Err(StoreError::Invalid(_))), "{bad}");
        }
    }

    #[tokio::test]
    async fn directories_deleted_under_a_running_store_are_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("blobs");
        let store = LocalBlobStore::open(&root).unwrap();
        let first = store.put(Bytes::from_static(b"first")).await.unwrap();
        // The whole directory goes (a cleanup job, an operator): writes go on.
        std::fs::remove_dir_all(&root).unwrap();
        let second = store.put(Bytes::from_static(b"second")).await.unwrap();
        assert_eq!(store.get(&second.digest).await.unwrap().unwrap(), Bytes::from_static(b"second"));
        assert_eq!(store.get(&first.digest).await.unwrap(), None, "what was deleted is gone");
        // Only tmp/ goes: writes and the probe go on too.
        std::fs::remove_dir_all(root.join("tmp")).unwrap();
        store.probe(true).await.unwrap();
        std::fs::remove_dir_all(root.join("tmp")).unwrap();
        store.put(Bytes::from_static(b"third")).await.unwrap();
        assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 0, "no temporary file is left behind");
    }

    #[tokio::test]
    async fn blob_errors_name_the_blob_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path()).unwrap();
        store.probe(true).await.unwrap();
        store.probe(false).await.unwrap();
        let Some(_frozen) = crate::testing::Immutable::set(&dir.path().join("tmp")) else { return };
        let err = store.put(Bytes::from_static(b"x")).await.unwrap_err();
        assert_eq!(err.failed_store(), Some(StoreKind::Blobs), "{err}");
        assert!(err.to_string().starts_with("blob store: "), "{err}");
        assert_eq!(err.api_error().message, "the blob store is unavailable; retry later");
        store.probe(true).await.unwrap_err();
        store.probe(false).await.expect("reading needs no writes");
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
