//! The embedded job store: SQLite in WAL mode with `synchronous=FULL`, shared by the upload,
//! status and distributor processes of one machine.
//!
//! Write transactions start with `BEGIN IMMEDIATE`: they take the write lock up front, so a
//! transaction that reads before it writes cannot fail with a stale snapshot when another
//! process commits in between (the busy timeout then simply waits for the lock). They run in a
//! [`WriteTx`], which never hands a connection back to the pool mid-transaction (see its module).

use crate::blob::BlobRef;
use crate::error::StoreError;
use crate::health::Alarm;
use crate::job::{Created, EventKind, Job, JobError, JobEvent, JobResult, JobState, JobStore, NewJob};
use crate::write_tx::WriteTx;
use async_trait::async_trait;
use pixmesh_chassis::time::now_ms;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{Row, SqliteConnection, SqlitePool};
use std::path::Path;
use std::time::Duration;

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 0,
        lease_owner TEXT,
        lease_expires_at INTEGER,
        not_before INTEGER NOT NULL DEFAULT 0,
        input_digest TEXT NOT NULL,
        input_size INTEGER NOT NULL,
        input_format TEXT NOT NULL,
        options TEXT NOT NULL,
        idempotency_key TEXT UNIQUE,
        request_hash TEXT NOT NULL,
        result TEXT,
        error TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    ) STRICT",
    "CREATE INDEX IF NOT EXISTS jobs_claimable ON jobs (state, not_before, created_at)",
    "CREATE TABLE IF NOT EXISTS job_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL REFERENCES jobs (id),
        kind TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        at INTEGER NOT NULL,
        data TEXT NOT NULL
    ) STRICT",
    "CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events (job_id, seq)",
];

const JOB_COLUMNS: &str = "id, owner, state, attempt, lease_owner, lease_expires_at, input_digest, input_size, input_format, options, result, error, created_at, updated_at";

/// One row per probing role, rewritten by each probe (see [`JobStore::probe`]).
const HEALTH_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS health (probe TEXT PRIMARY KEY, at INTEGER NOT NULL) STRICT";

#[derive(Debug, Clone)]
pub struct SqliteJobStore {
    pool: SqlitePool,
    alarm: Alarm,
}

impl SqliteJobStore {
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(30));
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
        for statement in SCHEMA {
            sqlx::query(statement).execute(&pool).await?;
        }
        // Databases made before jobs had owners: their jobs belong to no key ("").
        let has_owner: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM pragma_table_info('jobs') WHERE name = 'owner'").fetch_optional(&pool).await?;
        if has_owner.is_none() {
            sqlx::query("ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT ''").execute(&pool).await?;
        }
        sqlx::query(HEALTH_SCHEMA).execute(&pool).await?;
        Ok(SqliteJobStore { pool, alarm: Alarm::default() })
    }

    /// Raises `alarm` whenever a write transaction fails.
    pub(crate) fn with_alarm(mut self, alarm: Alarm) -> Self {
        self.alarm = alarm;
        self
    }

    async fn append(
        conn: &mut SqliteConnection,
        id: &str,
        kind: EventKind,
        attempt: u32,
        at: i64,
        data: serde_json::Value,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO job_events (job_id, kind, attempt, at, data) VALUES (?, ?, ?, ?, ?)")
            .bind(id)
            .bind(kind.as_str())
            .bind(i64::from(attempt))
            .bind(at)
            .bind(data.to_string())
            .execute(conn)
            .await?;
        Ok(())
    }

    async fn fetch_job(conn: &mut SqliteConnection, id: &str) -> Result<Option<Job>, StoreError> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?")).bind(id).fetch_optional(conn).await?;
        row.map(|r| job_from_row(&r)).transpose()
    }

    /// Runs one fenced transition: `set` applies only if the job is still held by `attempt`
    /// and not terminal; then `event` is appended in the same transaction.
    async fn fenced(
        &self,
        id: &str,
        attempt: u32,
        set: &str,
        binds: Vec<Bind>,
        event: EventKind,
        data: serde_json::Value,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let mut tx = WriteTx::begin(&self.pool, &self.alarm).await?;
        let sql = format!("UPDATE jobs SET {set}, updated_at = ? WHERE id = ? AND attempt = ? AND state = 'processing'");
        let mut query = sqlx::query(&sql);
        for bind in binds {
            query = match bind {
                Bind::Int(v) => query.bind(v),
                Bind::Text(v) => query.bind(v),
            };
        }
        let done = query.bind(now).bind(id).bind(i64::from(attempt)).execute(&mut *tx).await?;
        if done.rows_affected() == 0 {
            tx.rollback().await?;
            return Err(StoreError::Fenced { id: id.to_string(), attempt });
        }
        Self::append(&mut tx, id, event, attempt, now, data).await?;
        tx.commit().await?;
        Ok(())
    }
}

enum Bind {
    Int(i64),
    Text(String),
}

fn json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Invalid(e.to_string()))
}

fn job_from_row(row: &SqliteRow) -> Result<Job, StoreError> {
    let state: String = row.try_get("state")?;
    let options: String = row.try_get("options")?;
    let result: Option<String> = row.try_get("result")?;
    let error: Option<String> = row.try_get("error")?;
    let attempt: i64 = row.try_get("attempt")?;
    let size: i64 = row.try_get("input_size")?;
    let parse = |what: &str, e: serde_json::Error| StoreError::Invalid(format!("{what}: {e}"));
    Ok(Job {
        id: row.try_get("id")?,
        owner: row.try_get("owner")?,
        state: JobState::parse(&state).ok_or_else(|| StoreError::Invalid(format!("unknown job state {state:?}")))?,
        attempt: u32::try_from(attempt).unwrap_or(0),
        input: BlobRef { digest: row.try_get("input_digest")?, size: u64::try_from(size).unwrap_or(0) },
        input_format: row.try_get("input_format")?,
        options: serde_json::from_str(&options).map_err(|e| parse("options", e))?,
        lease_owner: row.try_get("lease_owner")?,
        lease_expires_at: row.try_get("lease_expires_at")?,
        result: result.map(|r| serde_json::from_str(&r)).transpose().map_err(|e| parse("result", e))?,
        error: error.map(|r| serde_json::from_str(&r)).transpose().map_err(|e| parse("error", e))?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[async_trait]
impl JobStore for SqliteJobStore {
    async fn create(&self, job: NewJob) -> Result<Created, StoreError> {
        let now = now_ms();
        let mut tx = WriteTx::begin(&self.pool, &self.alarm).await?;
        if let Some(key) = &job.idempotency_key {
            let existing =
                sqlx::query("SELECT id, request_hash FROM jobs WHERE idempotency_key = ?").bind(key).fetch_optional(&mut *tx).await?;
            if let Some(row) = existing {
                let id: String = row.try_get("id")?;
                let hash: String = row.try_get("request_hash")?;
                if hash != job.request_hash {
                    tx.rollback().await?;
                    return Err(StoreError::IdempotencyConflict { existing: id });
                }
                let found = Self::fetch_job(&mut tx, &id).await?.ok_or(StoreError::NotFound(id))?;
                tx.commit().await?;
                return Ok(Created { job: found, created: false });
            }
        }
        sqlx::query(
            "INSERT INTO jobs (id, owner, state, attempt, input_digest, input_size, input_format, options, idempotency_key, request_hash, created_at, updated_at)
             VALUES (?, ?, 'queued', 0, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&job.id)
        .bind(&job.owner)
        .bind(&job.input.digest)
        .bind(i64::try_from(job.input.size).unwrap_or(i64::MAX))
        .bind(&job.input_format)
        .bind(json(&job.options)?)
        .bind(&job.idempotency_key)
        .bind(&job.request_hash)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let data = serde_json::json!({ "input": job.input, "input_format": job.input_format, "options": job.options });
        Self::append(&mut tx, &job.id, EventKind::Accepted, 0, now, data).await?;
        let created = Self::fetch_job(&mut tx, &job.id).await?.ok_or_else(|| StoreError::NotFound(job.id.clone()))?;
        tx.commit().await?;
        Ok(Created { job: created, created: true })
    }

    async fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        Self::fetch_job(&mut conn, id).await
    }

    async fn events(&self, id: &str) -> Result<Vec<JobEvent>, StoreError> {
        let rows = sqlx::query("SELECT seq, job_id, kind, attempt, at, data FROM job_events WHERE job_id = ? ORDER BY seq")
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let kind: String = row.try_get("kind")?;
                let data: String = row.try_get("data")?;
                let attempt: i64 = row.try_get("attempt")?;
                Ok(JobEvent {
                    seq: row.try_get("seq")?,
                    job_id: row.try_get("job_id")?,
                    kind: EventKind::parse(&kind).ok_or_else(|| StoreError::Invalid(format!("unknown event kind {kind:?}")))?,
                    attempt: u32::try_from(attempt).unwrap_or(0),
                    at: row.try_get("at")?,
                    data: serde_json::from_str(&data).map_err(|e| StoreError::Invalid(format!("event data: {e}")))?,
                })
            })
            .collect()
    }

    async fn claim(&self, owner: &str, lease: Duration, max_attempts: u32) -> Result<Option<Job>, StoreError> {
        loop {
            let now = now_ms();
            let mut tx = WriteTx::begin(&self.pool, &self.alarm).await?;
            let candidate = sqlx::query(
                "SELECT id, state, attempt, lease_owner FROM jobs
                 WHERE (state = 'queued' AND not_before <= ?1) OR (state = 'processing' AND lease_expires_at < ?1)
                 ORDER BY created_at, id LIMIT 1",
            )
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = candidate else {
                tx.commit().await?;
                return Ok(None);
            };
            let id: String = row.try_get("id")?;
            let state: String = row.try_get("state")?;
            let attempt = u32::try_from(row.try_get::<i64, _>("attempt")?).unwrap_or(0);
            if state == "processing" {
                let previous: Option<String> = row.try_get("lease_owner")?;
                Self::append(&mut tx, &id, EventKind::LeaseExpired, attempt, now, serde_json::json!({ "owner": previous })).await?;
            }
            if attempt >= max_attempts {
                let error = JobError {
                    code: "unavailable".into(),
                    message: format!("gave up after {attempt} attempts; no worker could process the image"),
                };
                sqlx::query(
                    "UPDATE jobs SET state = 'failed', error = ?, lease_owner = NULL, lease_expires_at = NULL, updated_at = ? WHERE id = ?",
                )
                .bind(json(&error)?)
                .bind(now)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
                Self::append(
                    &mut tx,
                    &id,
                    EventKind::Failed,
                    attempt,
                    now,
                    serde_json::json!({ "code": error.code, "message": error.message }),
                )
                .await?;
                tx.commit().await?;
                continue;
            }
            let next = attempt + 1;
            let expires = now + millis(lease);
            sqlx::query(
                "UPDATE jobs SET state = 'processing', attempt = ?, lease_owner = ?, lease_expires_at = ?, updated_at = ? WHERE id = ?",
            )
            .bind(i64::from(next))
            .bind(owner)
            .bind(expires)
            .bind(now)
            .bind(&id)
            .execute(&mut *tx)
            .await?;
            Self::append(&mut tx, &id, EventKind::Claimed, next, now, serde_json::json!({ "owner": owner, "lease_expires_at": expires }))
                .await?;
            let job = Self::fetch_job(&mut tx, &id).await?.ok_or_else(|| StoreError::NotFound(id.clone()))?;
            tx.commit().await?;
            return Ok(Some(job));
        }
    }

    async fn extend_lease(&self, id: &str, attempt: u32, lease: Duration) -> Result<(), StoreError> {
        let now = now_ms();
        let done =
            sqlx::query("UPDATE jobs SET lease_expires_at = ?, updated_at = ? WHERE id = ? AND attempt = ? AND state = 'processing'")
                .bind(now + millis(lease))
                .bind(now)
                .bind(id)
                .bind(i64::from(attempt))
                .execute(&self.pool)
                .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::Fenced { id: id.to_string(), attempt });
        }
        Ok(())
    }

    async fn record_retry(&self, id: &str, attempt: u32, worker: &str, error: &JobError) -> Result<(), StoreError> {
        // Touch the row (no state change) so the event is fenced like every other transition.
        let data = serde_json::json!({ "worker": worker, "code": error.code, "message": error.message });
        self.fenced(id, attempt, "state = state", vec![], EventKind::Retried, data).await
    }

    async fn release(&self, id: &str, attempt: u32, reason: &JobError, delay: Duration) -> Result<(), StoreError> {
        let not_before = now_ms() + millis(delay);
        let data = serde_json::json!({ "code": reason.code, "message": reason.message, "not_before": not_before });
        self.fenced(
            id,
            attempt,
            "state = 'queued', lease_owner = NULL, lease_expires_at = NULL, not_before = ?",
            vec![Bind::Int(not_before)],
            EventKind::Released,
            data,
        )
        .await
    }

    async fn succeed(&self, id: &str, attempt: u32, result: &JobResult) -> Result<(), StoreError> {
        let data = serde_json::to_value(result).map_err(|e| StoreError::Invalid(e.to_string()))?;
        self.fenced(
            id,
            attempt,
            "state = 'succeeded', result = ?, lease_owner = NULL, lease_expires_at = NULL",
            vec![Bind::Text(json(result)?)],
            EventKind::Succeeded,
            data,
        )
        .await
    }

    async fn fail(&self, id: &str, attempt: u32, error: &JobError) -> Result<(), StoreError> {
        let data = serde_json::json!({ "code": error.code, "message": error.message });
        self.fenced(
            id,
            attempt,
            "state = 'failed', error = ?, lease_owner = NULL, lease_expires_at = NULL",
            vec![Bind::Text(json(error)?)],
            EventKind::Failed,
            data,
        )
        .await
    }

    async fn counts(&self) -> Result<Vec<(JobState, u64)>, StoreError> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetch_all(&self.pool).await?;
        let mut out = Vec::new();
        for row in rows {
            let state: String = row.try_get("state")?;
            let n: i64 = row.try_get("n")?;
            if let Some(s) = JobState::parse(&state) {
                out.push((s, u64::try_from(n).unwrap_or(0)));
            }
        }
        Ok(out)
    }

    async fn probe(&self, who: &str, write: bool) -> Result<(), StoreError> {
        if !write {
            sqlx::query("SELECT 1 FROM jobs LIMIT 1").fetch_optional(&self.pool).await?;
            return Ok(());
        }
        let mut tx = WriteTx::begin(&self.pool, &self.alarm).await?;
        sqlx::query("INSERT INTO health (probe, at) VALUES (?, ?) ON CONFLICT (probe) DO UPDATE SET at = excluded.at")
            .bind(who)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
#[path = "sqlite/faults.rs"]
mod faults;

#[cfg(test)]
mod tests {
    use super::*;
    use pixmesh_imaging::Options;

    async fn store() -> (tempfile::TempDir, SqliteJobStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteJobStore::open(&dir.path().join("jobs.db")).await.unwrap();
        (dir, store)
    }

    fn new_job(id: &str, key: Option<&str>, hash: &str) -> NewJob {
        NewJob {
            id: id.into(),
            owner: "alice".into(),
            input: BlobRef { digest: "a".repeat(64), size: 10 },
            input_format: "jpeg".into(),
            options: Options { width: Some(100), ..Options::default() },
            idempotency_key: key.map(str::to_string),
            request_hash: hash.into(),
        }
    }

    fn result() -> JobResult {
        JobResult {
            blob: BlobRef { digest: "b".repeat(64), size: 5 },
            format: "webp".into(),
            content_type: "image/webp".into(),
            width: 100,
            height: 50,
        }
    }

    fn kinds(events: &[JobEvent]) -> Vec<EventKind> {
        events.iter().map(|e| e.kind).collect()
    }

    #[tokio::test]
    async fn jobs_keep_their_owner_and_older_databases_gain_the_column() {
        let (_dir, store) = store().await;
        store.create(new_job("j1", None, "h")).await.unwrap();
        assert_eq!(store.get("j1").await.unwrap().unwrap().owner, "alice");
        // A database written before jobs had owners.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let old = SqlitePool::connect_with(SqliteConnectOptions::new().filename(&path).create_if_missing(true)).await.unwrap();
            let without_owner = SCHEMA[0].replace("owner TEXT NOT NULL DEFAULT '',", "");
            sqlx::query(&without_owner).execute(&old).await.unwrap();
            sqlx::query("INSERT INTO jobs (id, state, input_digest, input_size, input_format, options, request_hash, created_at, updated_at) VALUES ('old', 'queued', 'd', 1, 'png', '{}', 'h', 0, 0)")
                .execute(&old)
                .await
                .unwrap();
            old.close().await;
        }
        let reopened = SqliteJobStore::open(&path).await.unwrap();
        assert_eq!(reopened.get("old").await.unwrap().unwrap().owner, "", "old jobs belong to no key");
        reopened.create(new_job("j2", None, "h")).await.unwrap();
        assert_eq!(reopened.get("j2").await.unwrap().unwrap().owner, "alice");
    }

    #[tokio::test]
    async fn create_claim_succeed_writes_events() {
        let (_dir, store) = store().await;
        let created = store.create(new_job("j1", None, "h")).await.unwrap();
        assert!(created.created);
        assert_eq!(created.job.state, JobState::Queued);
        let job = store.claim("d1", Duration::from_secs(30), 5).await.unwrap().unwrap();
        assert_eq!((job.id.as_str(), job.attempt, job.state), ("j1", 1, JobState::Processing));
        assert!(store.claim("d1", Duration::from_secs(30), 5).await.unwrap().is_none(), "nothing else to claim");
        store.succeed("j1", 1, &result()).await.unwrap();
        let done = store.get("j1").await.unwrap().unwrap();
        assert_eq!(done.state, JobState::Succeeded);
        assert_eq!(done.result, Some(result()));
        assert_eq!(kinds(&store.events("j1").await.unwrap()), vec![EventKind::Accepted, EventKind::Claimed, EventKind::Succeeded]);
    }

    #[tokio::test]
    async fn stale_attempts_are_fenced() {
        let (_dir, store) = store().await;
        store.create(new_job("j1", None, "h")).await.unwrap();
        // A lease of 0 expires at once: a second distributor takes the job over.
        let first = store.claim("d1", Duration::ZERO, 5).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let second = store.claim("d2", Duration::from_secs(30), 5).await.unwrap().unwrap();
        assert_eq!((first.attempt, second.attempt), (1, 2));
        let err = store.succeed("j1", first.attempt, &result()).await.unwrap_err();
        assert!(matches!(err, StoreError::Fenced { attempt: 1, .. }), "{err}");
        store.succeed("j1", second.attempt, &result()).await.unwrap();
        // Terminal jobs are fenced for everyone, including the winner.
        let err = store.fail("j1", second.attempt, &JobError { code: "internal".into(), message: "x".into() }).await.unwrap_err();
        assert!(matches!(err, StoreError::Fenced { .. }));
        let events = kinds(&store.events("j1").await.unwrap());
        assert_eq!(
            events,
            vec![EventKind::Accepted, EventKind::Claimed, EventKind::LeaseExpired, EventKind::Claimed, EventKind::Succeeded]
        );
    }

    #[tokio::test]
    async fn release_delays_and_max_attempts_fail_the_job() {
        let (_dir, store) = store().await;
        store.create(new_job("j1", None, "h")).await.unwrap();
        let reason = JobError { code: "unavailable".into(), message: "no worker".into() };
        let job = store.claim("d", Duration::from_secs(30), 2).await.unwrap().unwrap();
        store.release("j1", job.attempt, &reason, Duration::from_secs(60)).await.unwrap();
        assert!(store.claim("d", Duration::from_secs(30), 2).await.unwrap().is_none(), "not due yet");
        store.release("j1", job.attempt, &reason, Duration::ZERO).await.unwrap_err();
        // Make it due now by releasing a fresh claim without delay.
        sqlx::query("UPDATE jobs SET not_before = 0").execute(&store.pool).await.unwrap();
        let job = store.claim("d", Duration::from_secs(30), 2).await.unwrap().unwrap();
        assert_eq!(job.attempt, 2);
        store.release("j1", 2, &reason, Duration::ZERO).await.unwrap();
        assert!(store.claim("d", Duration::from_secs(30), 2).await.unwrap().is_none(), "the third claim fails the job instead");
        let job = store.get("j1").await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Failed);
        assert!(job.error.unwrap().message.contains("gave up after 2 attempts"));
    }

    #[tokio::test]
    async fn idempotency_key_replays_or_conflicts() {
        let (_dir, store) = store().await;
        let first = store.create(new_job("j1", Some("k"), "h1")).await.unwrap();
        let replay = store.create(new_job("j2", Some("k"), "h1")).await.unwrap();
        assert!(first.created && !replay.created);
        assert_eq!(replay.job.id, "j1");
        let err = store.create(new_job("j3", Some("k"), "h2")).await.unwrap_err();
        assert!(matches!(err, StoreError::IdempotencyConflict { ref existing } if existing == "j1"), "{err}");
        assert!(store.get("j3").await.unwrap().is_none(), "nothing was written");
    }

    #[tokio::test]
    async fn concurrent_claims_never_share_a_job() {
        let (dir, store) = store().await;
        for i in 0..40 {
            store.create(new_job(&format!("j{i:02}"), None, "h")).await.unwrap();
        }
        // A second store on the same file, as a second process would have.
        let other = SqliteJobStore::open(&dir.path().join("jobs.db")).await.unwrap();
        let run = |s: SqliteJobStore, owner: &'static str| async move {
            let mut mine = Vec::new();
            while let Some(job) = s.claim(owner, Duration::from_secs(30), 5).await.unwrap() {
                mine.push(job.id);
            }
            mine
        };
        let (a, b) = tokio::join!(run(store.clone(), "a"), run(other, "b"));
        let mut all: Vec<_> = a.iter().chain(b.iter()).cloned().collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 40);
        assert_eq!(a.len() + b.len(), 40);
    }
}
