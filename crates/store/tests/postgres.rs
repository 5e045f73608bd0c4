//! What only the PostgreSQL job store has to show: the claim's plan as the table grows, dispatch
//! beside a long open transaction (which pins vacuum), and a database that goes away and comes
//! back under a running store.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use pixmesh_model::{BlobRef, JobResult, JobStore, NewJob, Options, StoreError};
use pixmesh_store::{PostgresJobStore, StoreErrorExt};
use pixmesh_test_support::postgres::{PgCluster, TestDatabase};
use sqlx::Connection;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn new_job(id: &str) -> NewJob {
    NewJob {
        id: id.into(),
        owner: String::new(),
        input: BlobRef::at_digest("a".repeat(64), 10),
        input_format: "jpeg".into(),
        options: Options::default(),
        outputs: Vec::new(),
        idempotency_key: None,
        request_hash: "h".into(),
        traceparent: None,
    }
}

fn result() -> JobResult {
    JobResult { blob: BlobRef::at_digest("b".repeat(64), 5), format: "png".into(), content_type: "image/png".into(), width: 1, height: 1 }
}

const LONG: Duration = Duration::from_secs(30);

/// The query plan of the claim's pick, as text.
async fn claim_plan(store: &PostgresJobStore) -> String {
    let rows: Vec<(String,)> = sqlx::query_as(
        "EXPLAIN SELECT id FROM jobs WHERE state = 'queued' AND not_before <= 0 ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    rows.into_iter().map(|(line,)| line).collect::<Vec<_>>().join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_reads_only_the_queued_index_however_many_jobs_ended() {
    let db = TestDatabase::create("plan").await;
    let store = PostgresJobStore::connect(&db.url, 4, Duration::from_secs(5)).await.unwrap();
    // 50,000 ended jobs (written directly: the point is the table's size) and 20 queued ones.
    sqlx::query(
        "INSERT INTO jobs (id, state, attempt, input_digest, input_size, input_format, options, request_hash, result, created_at, updated_at)
         SELECT 'ended-' || n, CASE WHEN n % 10 = 0 THEN 'failed' ELSE 'succeeded' END, 1, 'd', 1, 'png', '{}', 'h', NULL, n, n
         FROM generate_series(1, 50000) AS n",
    )
    .execute(store.pool())
    .await
    .unwrap();
    for i in 0..20 {
        store.create(new_job(&format!("queued-{i:02}"))).await.unwrap();
    }
    sqlx::query("ANALYZE jobs").execute(store.pool()).await.unwrap();
    let plan = claim_plan(&store).await;
    println!("claim plan with 50,000 ended jobs:\n{plan}");
    assert!(plan.contains("jobs_queued"), "the claim reads the partial index of queued jobs:\n{plan}");
    assert!(!plan.contains("Seq Scan"), "never the whole table:\n{plan}");
    // And it claims them in order.
    let job = store.claim("d", LONG, 5).await.unwrap().unwrap();
    assert_eq!(job.id, "queued-00");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_by_id_reads_the_primary_key_even_before_the_table_has_statistics() {
    // A new database taking its first backlog: 10,000 queued jobs, never analyzed. The pick of a
    // claim by id once scanned the whole partial index of queued jobs here, for a few ids.
    let db = TestDatabase::create("plan_by_id").await;
    let store = PostgresJobStore::connect(&db.url, 2, Duration::from_secs(5)).await.unwrap();
    sqlx::query(
        "INSERT INTO jobs (id, state, attempt, input_digest, input_size, input_format, options, request_hash, result, created_at, updated_at)
         SELECT 'queued-' || n, 'queued', 0, 'd', 1, 'png', '{}', 'h', NULL, n, n FROM generate_series(1, 10000) AS n",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let ids = vec!["queued-5".to_string(), "queued-77".to_string(), "queued-9000".to_string()];
    let mut conn = store.pool().acquire().await.unwrap();
    for mode in ["force_custom_plan", "force_generic_plan"] {
        sqlx::query(&format!("SET plan_cache_mode = {mode}")).execute(&mut *conn).await.unwrap();
        let rows: Vec<(String,)> = sqlx::query_as(&format!("EXPLAIN {}", PostgresJobStore::claim_by_id_statement()))
            .bind(0i64)
            .bind("plan")
            .bind(1i64)
            .bind(5i64)
            .bind(1i64)
            .bind("claimed")
            .bind("{}")
            .bind(&ids)
            .bind(0i64)
            .bind(0i64)
            .fetch_all(&mut *conn)
            .await
            .unwrap();
        let plan = rows.into_iter().map(|(line,)| line).collect::<Vec<_>>().join("\n");
        println!("claim by id, {mode}, 10,000 queued jobs, no statistics:\n{plan}");
        assert!(plan.contains("jobs_pkey"), "{mode}: the ids are looked up by the primary key:\n{plan}");
        assert!(!plan.contains("jobs_queued"), "{mode}: never a scan of every queued job:\n{plan}");
        assert!(!plan.contains("Seq Scan on jobs"), "{mode}: nor of the table:\n{plan}");
    }
    drop(conn);
    // And it claims what it names, nothing else.
    let answers = store.claim_ids("plan", LONG, 5, &ids).await.unwrap();
    let mut claimed: Vec<&str> = answers.iter().filter(|a| matches!(a, pixmesh_model::ClaimById::Claimed(_))).map(|a| a.id()).collect();
    claimed.sort_unstable();
    assert_eq!(claimed, vec!["queued-5", "queued-77", "queued-9000"]);
}

/// Creates `n` jobs, then claims and completes them with two claimers; returns jobs/s.
async fn dispatch(store: &Arc<PostgresJobStore>, tag: &str, n: usize) -> f64 {
    for i in 0..n {
        store.create(new_job(&format!("{tag}-{i:05}"))).await.unwrap();
    }
    let start = Instant::now();
    let mut claimers = Vec::new();
    for c in 0..2 {
        let s = store.clone();
        claimers.push(tokio::spawn(async move {
            let mut done = 0;
            while let Some(job) = s.claim(&format!("c{c}"), LONG, 5).await.unwrap() {
                s.succeed(&job.id, job.attempt, &result()).await.unwrap();
                done += 1;
            }
            done
        }));
    }
    let mut done = 0;
    for c in claimers {
        done += c.await.unwrap();
    }
    assert_eq!(done, n, "{tag}: every job was claimed and completed once");
    n as f64 / start.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatch_keeps_running_beside_a_long_open_transaction() {
    let db = TestDatabase::create("longtx").await;
    let store = Arc::new(PostgresJobStore::connect(&db.url, 8, Duration::from_secs(5)).await.unwrap());
    let baseline = dispatch(&store, "before", 1000).await;

    // A reporting query that forgot to commit: a REPEATABLE READ snapshot held open pins the
    // oldest transaction id, so vacuum can remove no row version dead since.
    let mut reporter = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ").execute(&mut reporter).await.unwrap();
    let seen: (i64,) = sqlx::query_as("SELECT count(*) FROM jobs").fetch_one(&mut reporter).await.unwrap();
    assert_eq!(seen.0, 1000);
    let mut rates = Vec::new();
    for round in 0..3 {
        rates.push(dispatch(&store, &format!("pinned{round}"), 1000).await);
    }
    let dead: (i64,) =
        sqlx::query_as("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'jobs'").fetch_one(store.pool()).await.unwrap();
    println!("jobs/s: {baseline:.0} before; {rates:.0?} while a transaction pinned vacuum ({} dead row versions)", dead.0);
    sqlx::query("ROLLBACK").execute(&mut reporter).await.unwrap();
    // The claim reads the queued-jobs index, whose dead entries are only those of jobs claimed
    // since the snapshot: it slows as they pile up, but it never stalls.
    let worst = rates.iter().cloned().fold(f64::INFINITY, f64::min);
    assert!(worst > baseline * 0.2, "dispatch kept a fair pace: {worst:.0}/s beside {baseline:.0}/s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_fails_requests_fast_and_the_store_recovers_by_itself() {
    let cluster = tokio::task::spawn_blocking(PgCluster::start).await.unwrap();
    let url = cluster.url("postgres");
    let store = PostgresJobStore::connect(&url, 4, Duration::from_secs(2)).await.unwrap();
    store.create(new_job("before")).await.unwrap();

    let cluster = tokio::task::spawn_blocking(move || {
        cluster.kill();
        cluster
    })
    .await
    .unwrap();
    let start = Instant::now();
    let err = store.create(new_job("during")).await.unwrap_err();
    let took = start.elapsed();
    assert!(matches!(err, StoreError::Database(_)), "{err:?}");
    let api = err.api_error();
    assert_eq!((api.code.http_status().as_u16(), api.retry_after_secs), (503, Some(1)), "{api:?}");
    assert!(took < Duration::from_secs(5), "fails within the connect timeout, not after minutes: {took:?}");
    assert!(store.probe("t", true).await.is_err());

    let cluster = tokio::task::spawn_blocking(move || {
        cluster.start_again();
        cluster
    })
    .await
    .unwrap();
    // The same store, not reopened: broken connections are found and replaced.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match store.create(new_job("after")).await {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "the store did not recover: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert!(store.get("before").await.unwrap().is_some(), "committed before the crash, kept");
    assert!(store.get("during").await.unwrap().is_none(), "nothing half-written");
    assert_eq!(store.events("during").await.unwrap().len(), 0);
    let job = store.claim("d", LONG, 5).await.unwrap().unwrap();
    assert_eq!(job.id, "before");
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_written_by_a_pixmesh_from_before_hlc_times_gets_the_servers_clock() {
    let db = TestDatabase::create("hlc_default").await;
    let store = PostgresJobStore::connect(&db.url, 4, Duration::from_secs(5)).await.unwrap();
    store.create(new_job("j")).await.unwrap();
    // What an older pixmesh, still running during an upgrade, sends: no `hlc` column.
    let before = pixmesh_store::Hlc(pixmesh_chassis::clock::system_time_clock().0).unix_ms();
    sqlx::query(
        "WITH n AS (UPDATE jobs SET event_seq = event_seq + 1 WHERE id = 'j' RETURNING event_seq)
         INSERT INTO job_events (job_id, seq, version, kind, attempt, at, data)
         SELECT 'j', event_seq, 1, 'lease_expired', 0, 0, '{\"owner\": null}' FROM n",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let events = store.events("j").await.unwrap();
    assert_eq!(events.len(), 2);
    // The server runs on this machine's clock: within a few seconds of ours.
    assert!((events[1].at - before).abs() < 5_000, "{} vs {before}", events[1].at);
}
