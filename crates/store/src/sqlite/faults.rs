//! The job store when its writes fail (full database, unwritable WAL) and then work again.

use super::*;
use crate::StoreErrorExt;
use crate::testing::Immutable;
use pixmesh_model::{BlobRef, Options, StoreKind};

async fn store() -> (tempfile::TempDir, SqliteJobStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteJobStore::open(&dir.path().join("jobs.db")).await.unwrap();
    (dir, store)
}

/// A job whose row needs `size` bytes, so that storing it needs new pages.
fn job(id: &str, size: usize) -> NewJob {
    NewJob {
        id: id.into(),
        owner: String::new(),
        input: BlobRef::at_digest("a".repeat(64), 10),
        input_format: "jpeg".into(),
        options: Options::default(),
        outputs: Vec::new(),
        idempotency_key: None,
        request_hash: "h".repeat(size),
        traceparent: None,
    }
}

/// `PRAGMA max_page_count` on every connection of the pool (4): a per-connection setting,
/// which SQLite raises to the database's current size if asked for less. At that size, every
/// write that needs a new page fails with SQLITE_FULL, as on a full disk.
async fn cap_pages(store: &SqliteJobStore, pages: u64) {
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.push(store.pool.acquire().await.unwrap());
    }
    for conn in &mut conns {
        sqlx::query(&format!("PRAGMA max_page_count = {pages}")).execute(&mut **conn).await.unwrap();
    }
}

/// Every pooled connection works for writes: each of these transactions may get any of them.
async fn eight_jobs_go_through(store: &SqliteJobStore, tag: &str) {
    for i in 0..8 {
        let id = format!("{tag}-{i}");
        store.create(job(&id, 10)).await.unwrap_or_else(|e| panic!("create {id}: {e}"));
        let claimed = store.claim("d", Duration::from_secs(30), 5).await.unwrap().unwrap();
        store.succeed(&claimed.id, claimed.attempt, &result()).await.unwrap_or_else(|e| panic!("succeed {id}: {e}"));
    }
}

fn result() -> JobResult {
    JobResult { blob: BlobRef::at_digest("b".repeat(64), 5), format: "webp".into(), content_type: "image/webp".into(), width: 1, height: 1 }
}

#[tokio::test]
async fn a_full_database_does_not_wedge_the_store() {
    let (_dir, store) = store().await;
    store.create(job("before", 10)).await.unwrap();
    let claimed = store.claim("d", Duration::from_secs(30), 5).await.unwrap().unwrap();
    store.succeed(&claimed.id, claimed.attempt, &result()).await.unwrap();
    cap_pages(&store, 1).await;
    // One failed write on each pooled connection (SQLite rolls such a transaction back by itself).
    let mut failed = Vec::new();
    for i in 0..4 {
        let id = format!("full-{i}");
        match store.create(job(&id, 20_000)).await {
            Err(e) => {
                assert!(e.to_string().contains("full"), "{e}");
                failed.push(id);
            }
            // A connection opened after a failed one closed knows no cap.
            Ok(_) => assert!(i > 0, "the first write must fail"),
        }
    }
    assert!(!failed.is_empty());
    cap_pages(&store, 1 << 30).await;
    // "Space is freed": every later transaction works, on whichever connection it gets.
    eight_jobs_go_through(&store, "after").await;
    for id in &failed {
        assert!(store.get(id).await.unwrap().is_none(), "{id}: a failed transaction left nothing behind");
    }
}

#[tokio::test]
async fn a_full_database_is_reported_as_the_job_store_being_full() {
    let (_dir, store) = store().await;
    store.create(job("before", 10)).await.unwrap();
    cap_pages(&store, 1).await;
    let err = store.create(job("big", 20_000)).await.unwrap_err();
    assert!(matches!(err, StoreError::Full { store: StoreKind::Jobs, .. }), "{err:?}");
    assert_eq!(err.api_error().code.http_status().as_u16(), 507);
    assert_eq!(err.api_error().message, "the job store's disk is full; retry later");
    // The failed transaction raised the alarm for the health probe.
    tokio::time::timeout(Duration::from_secs(1), store.alarm.raised()).await.expect("the alarm was raised");
}

#[tokio::test]
async fn a_failed_commit_does_not_wedge_the_store_and_the_probe_sees_it() {
    let (dir, store) = store().await;
    store.create(job("before", 10)).await.unwrap();
    store.probe("test", true).await.unwrap();
    // The WAL cannot be written: a transaction's pages reach it only at COMMIT, which fails.
    let Some(frozen) = Immutable::set(&dir.path().join("jobs.db-wal")) else { return };
    for i in 0..4 {
        let err = store.create(job(&format!("frozen-{i}"), 10)).await.unwrap_err();
        assert_eq!(err.failed_store(), Some(StoreKind::Jobs), "{err}");
        assert!(!err.is_full(), "EPERM is not a full disk: {err}");
        assert_eq!(err.api_error().message, "the job store is unavailable; retry later");
    }
    store.probe("test", true).await.unwrap_err();
    store.probe("test", false).await.expect("reads still work");
    drop(frozen);
    store.probe("test", true).await.unwrap();
    eight_jobs_go_through(&store, "after").await;
    for i in 0..4 {
        assert!(store.get(&format!("frozen-{i}")).await.unwrap().is_none());
    }
}

#[tokio::test]
async fn a_transaction_dropped_midway_is_rolled_back_and_its_connection_closed() {
    let (_dir, store) = store().await;
    let mut tx = WriteTx::begin(&store.pool, &store.turn, &store.alarm).await.unwrap();
    sqlx::query("INSERT INTO health (probe, at) VALUES ('dropped', 1)").execute(&mut *tx).await.unwrap();
    drop(tx); // as when a request is cancelled, or an error is returned with `?`
    eight_jobs_go_through(&store, "after").await;
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM health WHERE probe = 'dropped'").fetch_one(&store.pool).await.unwrap();
    assert_eq!(n, 0);
    // Clean paths keep their connection: a fenced update rolls back and raises no alarm.
    let claimed = store.claim("d", Duration::from_secs(30), 5).await.unwrap();
    assert!(claimed.is_none());
    let _ = tokio::time::timeout(Duration::from_millis(50), store.alarm.raised()).await; // the drop above
    let err = store.succeed("after-0", 1, &result()).await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
    assert!(tokio::time::timeout(Duration::from_millis(200), store.alarm.raised()).await.is_err(), "no alarm for a clean rollback");
}
