use pixmesh_chassis::{ApiError, ErrorCode};
use std::path::Path;

/// Which store an error comes from: clients and operators are told which one to look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreKind {
    /// The job table (SQLite).
    Jobs,
    /// The blob directory.
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
    /// The disk under a store has no room left (SQLITE_FULL, ENOSPC, EDQUOT): writes fail until
    /// space is freed; reads still work.
    #[error("the {store}'s disk is full: {detail}")]
    Full { store: StoreKind, detail: String },
    /// The job store's database failed (I/O error, read-only or locked file, …). Built by
    /// `From<sqlx::Error>`, which turns SQLITE_FULL into [`StoreError::Full`] instead.
    #[error("job store: {0}")]
    Database(sqlx::Error),
    /// A file of a store could not be read or written.
    #[error("{store}: {path}: {source}")]
    Io { store: StoreKind, path: String, source: std::io::Error },
    #[error("stored data is invalid: {0}")]
    Invalid(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if is_sqlite_full(&e) { StoreError::Full { store: StoreKind::Jobs, detail: e.to_string() } } else { StoreError::Database(e) }
    }
}

/// SQLITE_FULL (13; SQLite reports it for ENOSPC and for a database at `max_page_count`).
/// EDQUOT reaches SQLite's VFS as a failed write and comes back as SQLITE_IOERR_WRITE, which
/// cannot be told from other write errors: it counts as "unavailable".
fn is_sqlite_full(e: &sqlx::Error) -> bool {
    const SQLITE_FULL: i32 = 13;
    let sqlx::Error::Database(db) = e else { return false };
    db.code().and_then(|c| c.parse::<i32>().ok()).is_some_and(|code| code & 0xff == SQLITE_FULL)
}

impl StoreError {
    /// An I/O error of `store` on `path`; a full disk or an exceeded quota becomes
    /// [`StoreError::Full`].
    pub(crate) fn io(store: StoreKind, path: &Path, source: std::io::Error) -> Self {
        use std::io::ErrorKind;
        if matches!(source.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded) {
            return StoreError::Full { store, detail: format!("{}: {source}", path.display()) };
        }
        StoreError::Io { store, path: path.display().to_string(), source }
    }

    /// The store that failed, for errors of the storage itself (full, I/O, database); `None` for
    /// answers about the caller's request (fenced, conflict, not found) and invalid data.
    pub fn failed_store(&self) -> Option<StoreKind> {
        match self {
            StoreError::Full { store, .. } | StoreError::Io { store, .. } => Some(*store),
            StoreError::Database(_) => Some(StoreKind::Jobs),
            StoreError::Fenced { .. } | StoreError::IdempotencyConflict { .. } | StoreError::NotFound(_) | StoreError::Invalid(_) => None,
        }
    }

    pub fn is_full(&self) -> bool {
        matches!(self, StoreError::Full { .. })
    }

    /// What a client is told when a store fails under its request: 507 with the store's name
    /// when its disk is full, otherwise 503. Both say which store, and when to retry (a full
    /// disk needs an operator, so not every second). Details go to the log, not to the client.
    pub fn api_error(&self) -> ApiError {
        let store = self.failed_store().unwrap_or(StoreKind::Jobs);
        if self.is_full() {
            ApiError::new(ErrorCode::InsufficientStorage, format!("the {store}'s disk is full; retry later")).with_retry_after(10)
        } else {
            ApiError::new(ErrorCode::Unavailable, format!("the {store} is unavailable; retry later")).with_retry_after(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_disks_are_told_apart_and_name_their_store() {
        let path = Path::new("/data/blobs/tmp/x");
        let check = |e: std::io::Error, full: bool, status: u16, message: &str| {
            let err = StoreError::io(StoreKind::Blobs, path, e);
            assert_eq!(err.is_full(), full, "{err}");
            assert_eq!(err.failed_store(), Some(StoreKind::Blobs));
            let api = err.api_error();
            assert_eq!(api.code.http_status().as_u16(), status, "{err}");
            assert_eq!(api.message, message);
            assert!(api.retry_after_secs.is_some());
        };
        // ENOSPC and EDQUOT (Linux numbers).
        check(std::io::Error::from_raw_os_error(28), true, 507, "the blob store's disk is full; retry later");
        check(std::io::Error::from_raw_os_error(122), true, 507, "the blob store's disk is full; retry later");
        check(std::io::Error::from_raw_os_error(1), false, 503, "the blob store is unavailable; retry later");
        check(std::io::Error::from(std::io::ErrorKind::NotFound), false, 503, "the blob store is unavailable; retry later");

        let pool = StoreError::from(sqlx::Error::PoolTimedOut);
        assert!(!pool.is_full());
        assert_eq!(pool.api_error().message, "the job store is unavailable; retry later");
        assert_eq!(pool.api_error().code, ErrorCode::Unavailable);
        assert_eq!(StoreError::Fenced { id: "j".into(), attempt: 1 }.failed_store(), None);
    }
}
