//! Our own write transaction on a pooled SQLite connection, instead of sqlx's `Transaction`.
//!
//! Why: sqlx counts each connection's transaction depth and lowers the count only when its own
//! `COMMIT` or `ROLLBACK` succeeds. SQLite, though, ends a transaction by itself on some errors:
//! SQLITE_FULL or an I/O error in a statement that has no statement journal, or in `COMMIT`,
//! rolls the whole transaction back. sqlx's `ROLLBACK` on drop then fails ("no transaction is
//! active"), the count stays at 1, and the connection goes back to the pool: every later
//! `begin_with` on it fails with "attempted to call begin_with at non-zero transaction depth",
//! until the process restarts. One full disk (or one failed write) wedged a role for good.
//!
//! This guard counts nothing. It sends `BEGIN IMMEDIATE`, `COMMIT` and `ROLLBACK` itself, and a
//! connection goes back to the pool only after one of the last two succeeded. Whenever the
//! outcome is in doubt (`BEGIN`, a statement, `COMMIT` or `ROLLBACK` failed, or the guard was
//! dropped: an error returned with `?`, a cancelled request) the connection is closed instead;
//! closing a SQLite connection rolls back whatever is left of its transaction, and the pool opens
//! a fresh connection when it needs one. Paths known to be clean (a fenced update that matched
//! no row, a conflicting idempotency key) call [`WriteTx::rollback`] and keep their connection.
//! A failed write also raises the store's [`Alarm`], so the health probe looks at once.

use crate::health::Alarm;
use sqlx::pool::PoolConnection;
use sqlx::{Sqlite, SqliteConnection, SqlitePool};
use std::ops::{Deref, DerefMut};

pub(crate) struct WriteTx {
    conn: PoolConnection<Sqlite>,
    /// True from before `BEGIN` is sent until `COMMIT` or `ROLLBACK` succeeded.
    open: bool,
    alarm: Alarm,
}

impl WriteTx {
    /// Takes a connection from the pool and starts a write transaction (`BEGIN IMMEDIATE` takes
    /// the write lock at once, waiting for it up to the busy timeout).
    ///
    /// SQLite opens a database it may not write (an immutable or read-only file, for a moment)
    /// read-only, silently, and such a connection stays read-only for good. Its `BEGIN
    /// IMMEDIATE` fails with SQLITE_READONLY; the connection is then closed and the transaction
    /// begun on another (a fresh one once the stale ones are gone), so the first write after the
    /// file is writable again succeeds instead of failing once per stale connection.
    pub(crate) async fn begin(pool: &SqlitePool, alarm: &Alarm) -> Result<WriteTx, sqlx::Error> {
        let tries = pool.options().get_max_connections() + 1;
        let mut attempt = 1;
        loop {
            match Self::begin_once(pool, alarm).await {
                Err(e) if attempt < tries && is_read_only(&e) => attempt += 1,
                other => return other,
            }
        }
    }

    async fn begin_once(pool: &SqlitePool, alarm: &Alarm) -> Result<WriteTx, sqlx::Error> {
        let conn = pool.acquire().await?;
        // Armed before BEGIN is sent: if BEGIN fails or this future is dropped while it runs
        // (it may still take effect), the connection is closed, not pooled.
        let mut tx = WriteTx { conn, open: true, alarm: alarm.clone() };
        sqlx::query("BEGIN IMMEDIATE").execute(&mut *tx.conn).await?;
        Ok(tx)
    }

    pub(crate) async fn commit(mut self) -> Result<(), sqlx::Error> {
        sqlx::query("COMMIT").execute(&mut *self.conn).await?;
        self.open = false;
        Ok(())
    }

    /// Rolls back a transaction that is known to be intact (nothing failed in it).
    pub(crate) async fn rollback(mut self) -> Result<(), sqlx::Error> {
        sqlx::query("ROLLBACK").execute(&mut *self.conn).await?;
        self.open = false;
        Ok(())
    }
}

/// SQLITE_READONLY and its extended codes (`READONLY_RECOVERY`, `…_CANTLOCK`, …).
fn is_read_only(e: &sqlx::Error) -> bool {
    const SQLITE_READONLY: i32 = 8;
    let sqlx::Error::Database(db) = e else { return false };
    db.code().and_then(|c| c.parse::<i32>().ok()).is_some_and(|code| code & 0xff == SQLITE_READONLY)
}

impl Deref for WriteTx {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        &self.conn
    }
}

impl DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.conn
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        if self.open {
            // Closed in the background (keeping the pool's permit until it is), which rolls back.
            self.conn.close_on_drop();
            self.alarm.raise();
        }
    }
}
