//! The storage backends of pixmesh, chosen by URL: the job store (the queue and the source of
//! truth: jobs and their events) on SQLite or PostgreSQL, and the blob store on a local
//! directory or S3.
//!
//! The traits they implement and the values they keep live in `pixmesh-model`; this crate
//! re-exports them, so a role needs only `pixmesh-store` to open and use its stores.

mod blob;
mod error;
mod group;
pub mod health;
pub mod instruments;
mod postgres;
mod prune;
mod rows;
mod s3;
mod sqlite;
#[cfg(test)]
mod testing;
mod url;
mod write_tx;

pub use blob::LocalBlobStore;
pub use error::StoreErrorExt;
pub use group::GroupCommit;
pub use health::Access;
pub use pixmesh_model::options::Options;
pub use pixmesh_model::tail;
pub use pixmesh_model::{
    BlobRef, BlobStore, BlobStream, CacheKey, CacheOutcome, ClaimById, Created, DEFAULT_MAX_OUTPUTS, Event, EventKind, Hlc, Job, JobError,
    JobEvent, JobResult, JobState, JobStore, JobView, NewJob, Notify, Outbox, OutboxEvent, Output, Presign, QueueStats, Step, StoreError,
    StoreKind, StoredView, Views, ViewsAfter, apply, fold, is_output_key, output_key,
};
pub use postgres::PostgresJobStore;
pub use s3::{S3BlobStore, S3Credentials, S3Limits};
pub use sqlite::SqliteJobStore;
pub use url::{BlobsUrl, DatabaseUrl, S3Url};

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Where state lives. Every role that touches state reads this section.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Root of everything pixmesh keeps on local disk.
    pub data_dir: PathBuf,
    /// The job store: `sqlite:PATH` (relative paths are under `data_dir`) or
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`. A bare path means `sqlite:PATH`.
    pub database: String,
    /// The blob store: `file:DIR` (relative paths are under `data_dir`; a bare path means
    /// `file:DIR`), or `s3://BUCKET[/PREFIX]?endpoint=URL&region=R` with the credentials in
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    pub blobs: String,
    /// S3 only: the most one request may take, from connect to the last byte.
    pub blobs_timeout_ms: u64,
    /// S3 only: how long one operation is retried (5xx, throttling, connection errors) before it
    /// fails, and the client is told 503 with `Retry-After`.
    pub blobs_retry_ms: u64,
    /// PostgreSQL only: the most connections this process keeps to the database.
    pub max_connections: u32,
    /// How long a request waits for a database connection before it fails (503), and how long
    /// opening the store waits for the database at start.
    pub connect_timeout_ms: u64,
    /// Jobs that ended longer ago than this are deleted with their events (by the distributor).
    pub retention_hours: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            data_dir: PathBuf::from("pixmesh-data"),
            database: "sqlite:pixmesh.db".into(),
            blobs: "file:blobs".into(),
            blobs_timeout_ms: 30_000,
            blobs_retry_ms: 3_000,
            max_connections: 8,
            connect_timeout_ms: 3000,
            retention_hours: 7 * 24,
        }
    }
}

impl StoreConfig {
    pub fn with_data_dir(mut self, dir: &Path) -> Self {
        self.data_dir = dir.to_path_buf();
        self
    }

    pub fn with_database(mut self, url: &str) -> Self {
        self.database = url.to_string();
        self
    }

    /// The job store's URL, checked.
    pub fn database_url(&self) -> Result<DatabaseUrl, String> {
        DatabaseUrl::parse(&self.database, &self.data_dir).map_err(|e| format!("store.database: {e}"))
    }

    /// The blob store's URL, checked.
    pub fn blobs_url(&self) -> Result<BlobsUrl, String> {
        BlobsUrl::parse(&self.blobs, &self.data_dir).map_err(|e| format!("store.blobs: {e}"))
    }

    /// Checks the settings without touching any engine.
    pub fn validate(&self) -> Result<(), String> {
        self.database_url()?;
        self.blobs_url()?;
        if self.max_connections == 0 || self.connect_timeout_ms == 0 || self.retention_hours == 0 || self.blobs_timeout_ms == 0 {
            return Err(
                "store.max_connections, store.connect_timeout_ms, store.retention_hours and store.blobs_timeout_ms must be above 0".into(),
            );
        }
        Ok(())
    }

    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.retention_hours.saturating_mul(3600))
    }
}

/// The job store's handles: the same database as job store, outbox and read model.
#[derive(Clone)]
pub struct Database {
    pub jobs: Arc<dyn JobStore>,
    pub outbox: Arc<dyn Outbox>,
    pub views: Arc<dyn Views>,
}

/// Both stores, opened from configuration.
#[derive(Clone)]
pub struct Stores {
    pub jobs: Arc<dyn JobStore>,
    pub blobs: Arc<dyn BlobStore>,
    /// The job store's event rows as the outbox (the relay's view of the same database).
    pub outbox: Arc<dyn Outbox>,
    /// The status read model in the same database (`job_views`).
    pub views: Arc<dyn Views>,
    /// Told of each job created here (the broker's early wake-up), when there is a broker.
    notify: Option<Arc<dyn Notify>>,
    /// Raised by both stores when a read or write fails; wakes [`Stores::watch_health`].
    alarm: health::Alarm,
    retention: Duration,
}

impl Stores {
    /// Opens both stores: connects, and brings the job store's schema up to date. Fails with a
    /// message that names the setting and what to do (a bad URL, an unreachable database).
    pub async fn open(config: &StoreConfig) -> Result<Stores, OpenError> {
        config.validate().map_err(OpenError)?;
        let database = config.database_url().map_err(OpenError)?;
        let blobs = config.blobs_url().map_err(OpenError)?;
        let alarm = health::Alarm::default();
        let timeout = Duration::from_millis(config.connect_timeout_ms);
        let Database { jobs, outbox, views } = Self::open_database_with(config, &database, &alarm).await?;
        let blobs: Arc<dyn BlobStore> = match &blobs {
            BlobsUrl::File(dir) => {
                Arc::new(LocalBlobStore::open(dir).map_err(|e| OpenError(format!("store.blobs ({blobs}): {e}")))?.with_alarm(alarm.clone()))
            }
            BlobsUrl::S3(url) => {
                let limits = S3Limits {
                    timeout: Duration::from_millis(config.blobs_timeout_ms),
                    connect_timeout: timeout,
                    retry_for: Duration::from_millis(config.blobs_retry_ms),
                };
                let store = S3BlobStore::open(url, limits, S3Credentials::Environment)
                    .await
                    .map_err(|e| OpenError(format!("store.blobs ({blobs}): {e}")))?;
                Arc::new(store.with_alarm(alarm.clone()))
            }
        };
        Ok(Stores { jobs, blobs, outbox, views, notify: None, alarm, retention: config.retention() })
    }

    /// Opens the job store alone (no blob store): for tools that need only the database, such
    /// as `pixmesh admin rebuild-views`.
    pub async fn open_database(config: &StoreConfig) -> Result<Database, OpenError> {
        config.validate().map_err(OpenError)?;
        let database = config.database_url().map_err(OpenError)?;
        Self::open_database_with(config, &database, &health::Alarm::default()).await
    }

    async fn open_database_with(config: &StoreConfig, database: &DatabaseUrl, alarm: &health::Alarm) -> Result<Database, OpenError> {
        let timeout = Duration::from_millis(config.connect_timeout_ms);
        let (jobs, outbox, views): (Arc<dyn JobStore>, Arc<dyn Outbox>, Arc<dyn Views>) = match database {
            DatabaseUrl::Sqlite(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| OpenError(format!("store.database: cannot create {}: {e}", dir.display())))?;
                }
                let store = SqliteJobStore::open(path).await.map_err(|e| OpenError(format!("store.database ({database}): {e}")))?;
                let store = Arc::new(store.with_alarm(alarm.clone()));
                (store.clone(), store.clone(), store)
            }
            DatabaseUrl::Postgres(url) => {
                let store = PostgresJobStore::connect(url, config.max_connections, timeout).await.map_err(|e| {
                    OpenError(format!(
                        "store.database ({database}): {e}; check that PostgreSQL runs there and accepts this user, or fix the URL"
                    ))
                })?;
                let store = Arc::new(store.with_alarm(alarm.clone()));
                (store.clone(), store.clone(), store)
            }
        };
        Ok(Database { jobs, outbox, views })
    }
}

impl Stores {
    /// These stores, telling `notify` of every job created through them.
    pub fn with_notify(mut self, notify: Arc<dyn Notify>) -> Stores {
        self.notify = Some(notify);
        self
    }

    /// Tells the notifier (if any) that job `id` was just created (in the trace `traceparent`).
    pub fn job_created(&self, id: &str, traceparent: Option<&str>) {
        if let Some(notify) = &self.notify {
            notify.job_created(id, traceparent);
        }
    }
}

/// Why the stores could not be opened: a sentence for the operator that names the setting.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OpenError(pub String);

impl From<OpenError> for std::io::Error {
    fn from(e: OpenError) -> Self {
        std::io::Error::other(e.0)
    }
}
