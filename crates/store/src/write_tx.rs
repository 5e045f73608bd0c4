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
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, OwnedMutexGuard};

/// How often a writer of another process, waiting for the write lock, looks again (the busy
/// handler installed on every connection, `sqlite/busy.rs`).
pub(crate) const LOOK_EVERY: Duration = Duration::from_millis(1);

/// After this long of write transactions back to back, this process leaves the write lock free
/// for [`SHARE_GAP`]: long enough for other processes' writers, looking every [`LOOK_EVERY`],
/// to take it. A saturated process gives up about 2 ms in 40 (5 %; the timer may round the gap
/// up to 3 ms); without it, a distributor that always has a claim or a batch of results
/// waiting kept an upload process out for seconds.
const SHARE_AFTER: Duration = Duration::from_millis(40);
const SHARE_GAP: Duration = Duration::from_millis(2);

/// One process's turn to write to one database: its write transactions take it one after the
/// other, and it remembers how long they have been following each other without a pause.
#[derive(Debug)]
pub(crate) struct Turn {
    /// When the current run of back-to-back write transactions began.
    run_began: Instant,
    /// When the last write transaction ended (`None` before the first).
    last_end: Option<Instant>,
}

impl Turn {
    pub(crate) fn shared() -> Arc<Mutex<Turn>> {
        Arc::new(Mutex::new(Turn { run_began: Instant::now(), last_end: None }))
    }

    /// Called with the turn taken, before `BEGIN`: pauses when this process has kept the write
    /// lock busy for [`SHARE_AFTER`] (see there).
    async fn before_write(&mut self) {
        let now = Instant::now();
        let back_to_back = self.last_end.is_some_and(|end| now.duration_since(end) <= LOOK_EVERY);
        if !back_to_back {
            self.run_began = now;
        } else if now.duration_since(self.run_began) >= SHARE_AFTER {
            tokio::time::sleep(SHARE_GAP).await;
            self.run_began = Instant::now();
        }
    }
}

pub(crate) struct WriteTx {
    conn: PoolConnection<Sqlite>,
    /// This process's turn to write, held until the transaction ended. A connection dropped
    /// with its transaction open is closed in the background, so for a moment the next writer
    /// of this process may find SQLite's lock still taken and wait in the busy handler.
    turn: OwnedMutexGuard<Turn>,
    /// True from before `BEGIN` is sent until `COMMIT` or `ROLLBACK` succeeded.
    open: bool,
    alarm: Alarm,
}

impl WriteTx {
    /// Takes this process's turn to write, then a connection from the pool, and starts a write
    /// transaction (`BEGIN IMMEDIATE` takes the write lock at once, waiting for it up to the
    /// busy timeout).
    ///
    /// The turn: SQLite lets one connection write at a time, and a connection that finds the
    /// lock taken waits in a busy handler that sleeps and looks again (SQLite's own sleeps 1,
    /// 2, 5, 10, … up to 100 ms; ours [`LOOK_EVERY`]). Between the connections of one process
    /// that is pure loss: a distributor's claim and its batch of results kept waking each other
    /// up milliseconds late. So the writers of one process queue on `turn` (woken the moment
    /// the previous one ends), the busy handler is met by other processes' writers (and after a
    /// transaction dropped midway, see `turn`), and a process that writes without pause leaves
    /// them a gap now and then ([`SHARE_AFTER`]).
    ///
    /// SQLite opens a database it may not write (an immutable or read-only file, for a moment)
    /// read-only, silently, and such a connection stays read-only for good. Its `BEGIN
    /// IMMEDIATE` fails with SQLITE_READONLY; the connection is then closed and the transaction
    /// begun on another (a fresh one once the stale ones are gone), so the first write after the
    /// file is writable again succeeds instead of failing once per stale connection.
    pub(crate) async fn begin(pool: &SqlitePool, turn: &Arc<Mutex<Turn>>, alarm: &Alarm) -> Result<WriteTx, sqlx::Error> {
        let tries = pool.options().get_max_connections() + 1;
        let mut attempt = 1;
        loop {
            let mut turn = Arc::clone(turn).lock_owned().await;
            turn.before_write().await;
            match Self::begin_once(pool, turn, alarm).await {
                Err(e) if attempt < tries && is_read_only(&e) => attempt += 1,
                other => return other,
            }
        }
    }

    async fn begin_once(pool: &SqlitePool, turn: OwnedMutexGuard<Turn>, alarm: &Alarm) -> Result<WriteTx, sqlx::Error> {
        let conn = pool.acquire().await?;
        // Armed before BEGIN is sent: if BEGIN fails or this future is dropped while it runs
        // (it may still take effect), the connection is closed, not pooled.
        let mut tx = WriteTx { conn, turn, open: true, alarm: alarm.clone() };
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
        self.turn.last_end = Some(Instant::now());
        if self.open {
            // Closed in the background (keeping the pool's permit until it is), which rolls back.
            self.conn.close_on_drop();
            self.alarm.raise();
        }
    }
}
