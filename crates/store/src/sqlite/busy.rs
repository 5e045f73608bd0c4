//! Our busy handler for SQLite connections, in place of `sqlite3_busy_timeout`'s.
//!
//! Why: a connection that finds the write lock taken (another process writes) waits in the
//! busy handler. SQLite's own sleeps 1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50 and then 100 ms
//! between looks, so after a few milliseconds of waiting it looks ten times a second, and a
//! process that holds the lock almost all the time (a distributor under load) leaves it free
//! only in gaps that such a waiter never sees: uploads waited seconds. Ours looks every
//! [`LOOK_EVERY`] for as long as the busy timeout, and the writers' turn (`write_tx.rs`)
//! leaves gaps longer than that. Each process has at most one writer waiting here (the others
//! queue on its turn, which every write of the store takes), so the looking costs little.
//!
//! sqlx does not offer a busy handler of its own: it is installed through the connection's raw
//! handle, the only unsafe code in the store.

#![allow(unsafe_code)]

use crate::write_tx::LOOK_EVERY;
use sqlx::SqliteConnection;
use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::time::{Duration, Instant};

/// How long a writer waits for the write lock before its statement fails with SQLITE_BUSY.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

thread_local! {
    /// When the busy wait running on this thread began. Every sqlx SQLite connection runs its
    /// statements on a thread of its own, so this is the wait of one connection.
    static WAIT_BEGAN: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Installs the handler on `conn` (replacing the busy timeout set when it was opened).
pub(crate) async fn install(conn: &mut SqliteConnection) -> Result<(), sqlx::Error> {
    let mut handle = conn.lock_handle().await?;
    let db = handle.as_raw_handle().as_ptr();
    // SAFETY: `db` is the live connection handle, held exclusively through `handle` for the
    // call; `look_again` is a plain function that does not unwind and uses no user data.
    let status = unsafe { libsqlite3_sys::sqlite3_busy_handler(db, Some(look_again), std::ptr::null_mut()) };
    if status != libsqlite3_sys::SQLITE_OK {
        return Err(sqlx::Error::Protocol(format!("cannot install the busy handler (SQLite error {status})")));
    }
    Ok(())
}

/// Called by SQLite while the lock it needs is taken, with `count` the calls so far in this
/// wait: returns 1 to look again after a short sleep, 0 to give up (the statement fails with
/// SQLITE_BUSY).
extern "C" fn look_again(_: *mut c_void, count: c_int) -> c_int {
    let now = Instant::now();
    let began = WAIT_BEGAN.with(|w| {
        let began = match w.get() {
            Some(began) if count > 0 => began,
            _ => now,
        };
        w.set(Some(began));
        began
    });
    if now.duration_since(began) >= BUSY_TIMEOUT {
        return 0;
    }
    std::thread::sleep(LOOK_EVERY);
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_looks_again_until_the_timeout_then_gives_up() {
        assert_eq!(look_again(std::ptr::null_mut(), 0), 1);
        assert_eq!(look_again(std::ptr::null_mut(), 1), 1);
        // A wait that began longer ago than the timeout ends.
        WAIT_BEGAN.with(|w| w.set(Instant::now().checked_sub(BUSY_TIMEOUT)));
        assert_eq!(look_again(std::ptr::null_mut(), 2), 0);
        // The next wait (count 0 again) starts over.
        assert_eq!(look_again(std::ptr::null_mut(), 0), 1);
    }
}
