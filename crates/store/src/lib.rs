//! Durable state of pixmesh: jobs (the queue and the source of truth), their events, and blobs.
//!
//! Each concern is a trait with one implementation per backend, chosen by configuration:
//! [`JobStore`] (SQLite now; PostgreSQL when users outgrow one machine) and [`BlobStore`]
//! (a local content-addressed directory now; S3-compatible storage later).

mod blob;
mod error;
pub mod health;
mod job;
mod sqlite;
#[cfg(test)]
mod testing;
mod write_tx;

pub use blob::{BlobRef, BlobStore, LocalBlobStore};
pub use error::{StoreError, StoreKind};
pub use health::Access;
pub use job::{Created, EventKind, Job, JobError, JobEvent, JobResult, JobState, JobStore, NewJob};
pub use sqlite::SqliteJobStore;

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where state lives. Every role that touches state reads this section.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Root of everything pixmesh keeps on disk.
    pub data_dir: PathBuf,
    /// SQLite database file; relative paths are under `data_dir`.
    pub database: PathBuf,
    /// Blob directory; relative paths are under `data_dir`.
    pub blobs: PathBuf,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig { data_dir: PathBuf::from("pixmesh-data"), database: PathBuf::from("pixmesh.db"), blobs: PathBuf::from("blobs") }
    }
}

impl StoreConfig {
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join(&self.database)
    }
    pub fn blobs_path(&self) -> PathBuf {
        self.data_dir.join(&self.blobs)
    }
    pub fn with_data_dir(mut self, dir: &Path) -> Self {
        self.data_dir = dir.to_path_buf();
        self
    }
}

/// Both stores, opened from configuration.
#[derive(Clone)]
pub struct Stores {
    pub jobs: Arc<dyn JobStore>,
    pub blobs: Arc<dyn BlobStore>,
    /// Raised by both stores when a read or write fails; wakes [`Stores::watch_health`].
    alarm: health::Alarm,
}

impl Stores {
    pub async fn open(config: &StoreConfig) -> Result<Stores, StoreError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| StoreError::io(StoreKind::Jobs, &config.data_dir, e))?;
        let alarm = health::Alarm::default();
        let jobs = SqliteJobStore::open(&config.database_path()).await?.with_alarm(alarm.clone());
        let blobs = LocalBlobStore::open(&config.blobs_path())?.with_alarm(alarm.clone());
        Ok(Stores { jobs: Arc::new(jobs), blobs: Arc::new(blobs), alarm })
    }
}
