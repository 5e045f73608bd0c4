//! What a store error means to a client, and how the SQL backends' errors become store errors.

use pixmesh_chassis::{ApiError, ErrorCode};
use pixmesh_model::{StoreError, StoreKind};

/// What a client is told when a store fails under its request.
pub trait StoreErrorExt {
    /// 507 with the store's name when its disk is full, otherwise 503. Both say which store,
    /// and when to retry (a full disk needs an operator, so not every second). Details go to
    /// the log, not to the client.
    fn api_error(&self) -> ApiError;
}

impl StoreErrorExt for StoreError {
    fn api_error(&self) -> ApiError {
        let store = self.failed_store().unwrap_or(StoreKind::Jobs);
        if self.is_full() {
            ApiError::new(ErrorCode::InsufficientStorage, format!("the {store}'s disk is full; retry later")).with_retry_after(10)
        } else {
            ApiError::new(ErrorCode::Unavailable, format!("the {store} is unavailable; retry later")).with_retry_after(1)
        }
    }
}

/// An error inside a SQL backend: the database's own, or a store answer (fenced, conflict, …).
/// The backends' methods return it so that `?` works on both; at the trait boundary it becomes
/// a [`StoreError`].
#[derive(Debug)]
pub(crate) enum DbError {
    Sql(sqlx::Error),
    Store(StoreError),
}

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> Self {
        DbError::Sql(e)
    }
}

impl From<StoreError> for DbError {
    fn from(e: StoreError) -> Self {
        DbError::Store(e)
    }
}

impl From<DbError> for StoreError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Store(e) => e,
            DbError::Sql(e) if is_disk_full(&e) => StoreError::Full { store: StoreKind::Jobs, detail: e.to_string() },
            DbError::Sql(e) => StoreError::Database(e.to_string()),
        }
    }
}

/// A database that has no room left: SQLite's SQLITE_FULL (13; it reports it for ENOSPC and for
/// a database at `max_page_count`), PostgreSQL's `disk_full` (SQLSTATE 53100). EDQUOT reaches
/// SQLite's VFS as a failed write and comes back as SQLITE_IOERR_WRITE, which cannot be told
/// from other write errors: it counts as "unavailable".
fn is_disk_full(e: &sqlx::Error) -> bool {
    const SQLITE_FULL: i32 = 13;
    let sqlx::Error::Database(db) = e else { return false };
    if db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>().is_some() {
        return db.code().as_deref() == Some("53100");
    }
    db.code().and_then(|c| c.parse::<i32>().ok()).is_some_and(|code| code & 0xff == SQLITE_FULL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

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

        let pool = StoreError::from(DbError::from(sqlx::Error::PoolTimedOut));
        assert!(!pool.is_full());
        assert_eq!(pool.api_error().message, "the job store is unavailable; retry later");
        assert_eq!(pool.api_error().code, ErrorCode::Unavailable);
        assert_eq!(StoreError::Fenced { id: "j".into(), attempt: 1 }.failed_store(), None);
    }
}
