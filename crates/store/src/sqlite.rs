//! The embedded job store: SQLite in WAL mode with `synchronous=FULL`, shared by the upload,
//! status and distributor processes of one machine.
//!
//! Write transactions start with `BEGIN IMMEDIATE`: they take the write lock up front, so a
//! transaction that reads before it writes cannot fail with a stale snapshot when another
//! process commits in between (the busy timeout then simply waits for the lock). They run in a
//! [`WriteTx`], which never hands a connection back to the pool mid-transaction (see its module).

use crate::error::DbError;
use crate::health::Alarm;
use crate::rows::{
    EVENT_COLUMNS, EventRow, FOLLOWING, JOB_COLUMNS, JobRow, OutboxRow, ViewRow, accepted_event, cache_outcome, encode, event_columns,
    gave_up, json, leader_failed, millis, placement, reused, saga_gave_up, step_patch, unclaimed, views_filter,
};
use crate::write_tx::{Turn, WriteTx};
use async_trait::async_trait;
use pixmesh_chassis::clock::Clock;
use pixmesh_chassis::time::now_ms;
use pixmesh_model::{
    CacheKey, CacheOutcome, ClaimById, Created, Event, Hlc, Job, JobError, JobEvent, JobResult, JobState, JobStore, NewJob, Outbox,
    OutboxEvent, QueueStats, Step, StoreError, StoredView, Views, ViewsAfter,
};
use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{SqliteConnection, SqlitePool};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

/// What a claim reads (bound: now, how many): jobs whose lease ran out, oldest lease first,
/// then queued jobs that are due, oldest first; each from its partial index (see `plan` below).
const CLAIM_EXPIRED: &str = "SELECT id, attempt, lease_owner FROM jobs
                             WHERE state = 'processing' AND lease_expires_at < ? ORDER BY lease_expires_at LIMIT ?";
const CLAIM_QUEUED: &str = "SELECT id, attempt, lease_owner FROM jobs
                            WHERE state = 'queued' AND not_before <= ? ORDER BY created_at, id LIMIT ?";

/// A job row as a claim's update returns it, with the number its `claimed` event takes.
#[derive(sqlx::FromRow)]
struct ClaimedRow {
    #[sqlx(flatten)]
    job: JobRow,
    event_seq: i64,
    /// The HLC time of the event before the one this claim numbers ([`BEFORE`]).
    before: Option<i64>,
}

/// The place of a job's next event: its number, and the HLC time of the event before it
/// (`None` for the first).
struct Next {
    seq: i64,
    before: Option<i64>,
}

/// In the `RETURNING` of a statement that numbers a job's next event (`event_seq = event_seq +
/// 1`): the HLC time of the job's last event so far, read in the same statement.
const BEFORE: &str = "(SELECT e.hlc FROM job_events e WHERE e.job_id = jobs.id AND e.seq = jobs.event_seq - 1)";

#[derive(Debug, Clone)]
pub struct SqliteJobStore {
    pool: SqlitePool,
    /// This process's turn to write (see [`WriteTx::begin`]).
    turn: Arc<Mutex<Turn>>,
    alarm: Alarm,
    /// Stamps the events written here.
    clock: Arc<Clock>,
}

impl SqliteJobStore {
    /// Opens (or creates) the database and brings its schema up to date.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        // Processes that open a new file at the same moment race for the switch to WAL, which
        // takes an exclusive lock without waiting (SQLITE_BUSY, "database is locked"): the one
        // that lost opens again once the winner is done.
        let mut tries = 0;
        loop {
            match Self::open_db(path).await {
                Err(DbError::Sql(e)) if tries < 20 && is_busy(&e) => {
                    tries += 1;
                    tracing::debug!(error = %e, "the database was busy while opening; trying again");
                    tokio::time::sleep(Duration::from_millis(20 * tries)).await;
                }
                other => return Ok(other?),
            }
        }
    }

    async fn open_db(path: &Path) -> Result<Self, DbError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            // While a connection is set up (the switch to WAL does not wait: see `open`); then
            // our handler takes over.
            .busy_timeout(busy::BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .after_connect(|conn, _| Box::pin(async move { busy::install(conn).await }))
            .connect_with(options)
            .await?;
        // Databases made before jobs had owners (and before migrations): their jobs belong to
        // no key (""). Done before the first migration, which expects the column.
        let has_jobs: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").fetch_optional(&pool).await?;
        let has_owner: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM pragma_table_info('jobs') WHERE name = 'owner'").fetch_optional(&pool).await?;
        if has_jobs.is_some() && has_owner.is_none() {
            sqlx::query("ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT ''").execute(&pool).await?;
        }
        // Several processes may open a new database at once, and SQLite has no migration lock:
        // a migration that another process applied first fails here (and is rolled back);
        // running again then finds it applied.
        let mut tries = 0;
        loop {
            match MIGRATOR.run(&pool).await {
                Ok(()) => break,
                Err(e) if tries < 5 => {
                    tries += 1;
                    tracing::debug!(error = %e, "schema migration raced another process; trying again");
                    tokio::time::sleep(Duration::from_millis(50 * tries)).await;
                }
                Err(e) => return Err(StoreError::Database(format!("cannot bring the schema up to date: {e}")).into()),
            }
        }
        Ok(SqliteJobStore { pool, turn: Turn::shared(), alarm: Alarm::default(), clock: pixmesh_chassis::clock::process() })
    }

    /// Raises `alarm` whenever a write transaction fails.
    pub(crate) fn with_alarm(mut self, alarm: Alarm) -> Self {
        self.alarm = alarm;
        self
    }

    /// Stamps events with `clock` instead of this process's (for tests of several processes).
    pub fn with_clock(mut self, clock: Arc<Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Appends `event` to the job's history, numbered after its last event; the caller's
    /// transaction holds the write lock, so numbers never collide.
    async fn append(conn: &mut SqliteConnection, clock: &Clock, id: &str, attempt: u32, at: i64, event: &Event) -> Result<(), DbError> {
        let (seq, before): (i64, Option<i64>) =
            sqlx::query_as(&format!("UPDATE jobs SET event_seq = event_seq + 1 WHERE id = ? RETURNING event_seq, {BEFORE}"))
                .bind(id)
                .fetch_one(&mut *conn)
                .await?;
        Self::insert_event(conn, clock, id, Next { seq, before }, attempt, at, event).await
    }

    /// Writes `event` as number `seq` of the job's history: a number the caller's write of the
    /// job row just set (`event_seq = event_seq + 1 … RETURNING event_seq`, or 1 when the row is
    /// inserted), so that a transition and the numbering of its event are one statement.
    ///
    /// Its HLC time comes after `next.before`, the time of the event before it (read by that
    /// same statement, [`BEFORE`]): that one is observed first (not adopted when it is beyond
    /// the clock's maximum offset; see `pixmesh_chassis::clock`).
    async fn insert_event(
        conn: &mut SqliteConnection,
        clock: &Clock,
        id: &str,
        next: Next,
        attempt: u32,
        at: i64,
        event: &Event,
    ) -> Result<(), DbError> {
        let (kind, version, data) = encode(event)?;
        if let Some(before) = next.before {
            clock.observe(Hlc::from_sql(before), "job store");
        }
        let seq = next.seq;
        let hlc = clock.now();
        sqlx::query("INSERT INTO job_events (job_id, seq, version, kind, attempt, at, hlc, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
            .bind(id)
            .bind(seq)
            .bind(version)
            .bind(kind.as_str())
            .bind(i64::from(attempt))
            .bind(at)
            .bind(hlc.to_sql())
            .bind(data)
            .execute(conn)
            .await?;
        Ok(())
    }

    async fn fetch_job(conn: &mut SqliteConnection, id: &str) -> Result<Option<Job>, DbError> {
        let row: Option<JobRow> =
            sqlx::query_as(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?")).bind(id).fetch_optional(conn).await?;
        Ok(row.map(JobRow::into_job).transpose()?)
    }

    /// Pushes out the lease of a job still held by `attempt`. A transaction of its own, so that
    /// renewals take this process's turn to write like every other write (waiting in the busy
    /// handler instead, they were let in only in the gaps the turn leaves for other processes).
    async fn renew(&self, id: &str, attempt: u32, lease: Duration) -> Result<(), DbError> {
        let now = now_ms();
        let mut tx = WriteTx::begin(&self.pool, &self.turn, &self.alarm).await?;
        let done =
            sqlx::query("UPDATE jobs SET lease_expires_at = ?, updated_at = ? WHERE id = ? AND attempt = ? AND state = 'processing'")
                .bind(now + millis(lease))
                .bind(now)
                .bind(id)
                .bind(i64::from(attempt))
                .execute(&mut *tx)
                .await?;
        if done.rows_affected() == 0 {
            tx.rollback().await?;
            return Err(StoreError::Fenced { id: id.to_string(), attempt }.into());
        }
        tx.commit().await?;
        Ok(())
    }

    /// Runs one fenced transition: `set` applies only if the job is still held by `attempt`
    /// and not terminal; then `event` is appended in the same transaction.
    async fn fenced(&self, id: &str, attempt: u32, set: &str, bind: Option<Bind>, event: Event) -> Result<(), DbError> {
        let now = now_ms();
        let mut tx = WriteTx::begin(&self.pool, &self.turn, &self.alarm).await?;
        let sql = format!("UPDATE jobs SET {set}, updated_at = ? WHERE id = ? AND attempt = ? AND state = 'processing'");
        let mut query = sqlx::query(&sql);
        query = match bind {
            Some(Bind::Int(v)) => query.bind(v),
            Some(Bind::Text(v)) => query.bind(v),
            None => query,
        };
        let done = query.bind(now).bind(id).bind(i64::from(attempt)).execute(&mut *tx).await?;
        if done.rows_affected() == 0 {
            tx.rollback().await?;
            return Err(StoreError::Fenced { id: id.to_string(), attempt }.into());
        }
        Self::append(&mut tx, &self.clock, id, attempt, now, &event).await?;
        if matches!(event, Event::Succeeded { .. } | Event::Failed { .. }) {
            Self::settle_followers(&mut tx, &self.clock, id, now, &event).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn create_job(&self, job: NewJob, cache: Option<&CacheKey>) -> Result<(Created, CacheOutcome), DbError> {
        let now = now_ms();
        let mut tx = WriteTx::begin(&self.pool, &self.turn, &self.alarm).await?;
        if let Some(key) = &job.idempotency_key {
            let existing: Option<(String, String)> =
                sqlx::query_as("SELECT id, request_hash FROM jobs WHERE idempotency_key = ?").bind(key).fetch_optional(&mut *tx).await?;
            if let Some((id, hash)) = existing {
                if hash != job.request_hash {
                    tx.rollback().await?;
                    return Err(StoreError::IdempotencyConflict { existing: id }.into());
                }
                let found = Self::fetch_job(&mut tx, &id).await?.ok_or(StoreError::NotFound(id))?;
                tx.commit().await?;
                return Ok((Created { job: found, created: false }, CacheOutcome::Replayed));
            }
        }
        // What the cache has for this work (the write lock is held: nothing changes under us).
        let mut outcome = CacheOutcome::Miss;
        if let Some(cache) = cache.filter(|c| c.lookup) {
            let entry: Option<(String, String)> =
                sqlx::query_as("SELECT c.job_id, j.state FROM result_cache c JOIN jobs j ON j.id = c.job_id WHERE c.key = ?")
                    .bind(&cache.key)
                    .fetch_optional(&mut *tx)
                    .await?;
            outcome = cache_outcome(entry);
        }
        let only_cached = cache.is_some_and(|c| c.only_cached);
        if only_cached && matches!(outcome, CacheOutcome::Miss) {
            tx.rollback().await?;
            return Err(StoreError::NotCached.into());
        }
        // The job the entry names, read once: a hit's result, and the input of an upload that
        // sent no image.
        let named = match outcome.source() {
            Some(id) if only_cached || matches!(outcome, CacheOutcome::Hit { .. }) => {
                Some(Self::fetch_job(&mut tx, id).await?.ok_or_else(|| StoreError::NotFound(id.to_string()))?)
            }
            _ => None,
        };
        let mut job = job;
        if only_cached {
            let reused = named.as_ref().ok_or(StoreError::NotCached)?;
            job.input = reused.input.clone();
            job.input_format = reused.input_format.clone();
        }
        let source = named.filter(|_| matches!(outcome, CacheOutcome::Hit { .. }));
        let (state, not_before, follows) = placement(&outcome);
        // The job with its `accepted` event, number 1 of its history.
        sqlx::query(
            "INSERT INTO jobs (id, owner, state, attempt, input_digest, input_size, input_format, options, outputs, idempotency_key, request_hash,
                               created_at, updated_at, event_seq, not_before, follows, result, steps, traceparent)
             VALUES (?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?)",
        )
        .bind(&job.id)
        .bind(&job.owner)
        .bind(state)
        .bind(&job.input.digest)
        .bind(i64::try_from(job.input.size).unwrap_or(i64::MAX))
        .bind(&job.input_format)
        .bind(json(&job.options)?)
        .bind(json(&job.outputs)?)
        .bind(&job.idempotency_key)
        .bind(&job.request_hash)
        .bind(now)
        .bind(now)
        .bind(not_before)
        .bind(follows)
        .bind(source.as_ref().and_then(|s| s.result.as_ref()).map(json).transpose()?)
        .bind(json(&source.as_ref().map(|s| s.steps.clone()).unwrap_or_default())?)
        .bind(&job.traceparent)
        .execute(&mut *tx)
        .await?;
        let accepted = accepted_event(&job);
        Self::insert_event(&mut tx, &self.clock, &job.id, Next { seq: 1, before: None }, 0, now, &accepted).await?;
        match (&outcome, &source) {
            (CacheOutcome::Hit { from }, Some(source)) => {
                Self::append(&mut tx, &self.clock, &job.id, 0, now, &Event::Cached { from: from.clone() }).await?;
                Self::append(&mut tx, &self.clock, &job.id, 0, now, &reused(source)).await?;
            }
            (CacheOutcome::Joined { leader }, _) => {
                Self::append(&mut tx, &self.clock, &job.id, 0, now, &Event::Cached { from: leader.clone() }).await?;
            }
            _ => {
                if let Some(cache) = cache {
                    // This job makes the work: the entry for the next identical upload.
                    sqlx::query(
                        "INSERT INTO result_cache (key, job_id, created_at) VALUES (?, ?, ?)
                         ON CONFLICT (key) DO UPDATE SET job_id = excluded.job_id, created_at = excluded.created_at",
                    )
                    .bind(&cache.key)
                    .bind(&job.id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        let created = Self::fetch_job(&mut tx, &job.id).await?.ok_or_else(|| StoreError::NotFound(job.id.clone()))?;
        tx.commit().await?;
        Ok((Created { job: created, created: true }, outcome))
    }

    /// Ends the jobs that wait for job `leader` (the result cache), inside the caller's write
    /// transaction, which just ended `leader` with `ended`: with its result when it succeeded;
    /// when it failed, the first of them is released to be made on its own and the others wait
    /// for that one. (The cache's entry still names the failed job: the next upload of the same
    /// work takes it over.)
    async fn settle_followers(conn: &mut SqliteConnection, clock: &Clock, leader: &str, now: i64, ended: &Event) -> Result<(), DbError> {
        let followers: Vec<(String,)> =
            sqlx::query_as("SELECT id FROM jobs WHERE follows = ? AND state = 'queued' ORDER BY created_at, id")
                .bind(leader)
                .fetch_all(&mut *conn)
                .await?;
        let Some(((first,), rest)) = followers.split_first() else { return Ok(()) };
        match ended {
            Event::Succeeded { .. } => {
                for (id,) in &followers {
                    sqlx::query(
                        "UPDATE jobs SET state = 'succeeded', result = (SELECT result FROM jobs WHERE id = ?1),
                             steps = (SELECT steps FROM jobs WHERE id = ?1), follows = NULL, not_before = 0, updated_at = ?2
                         WHERE id = ?3",
                    )
                    .bind(leader)
                    .bind(now)
                    .bind(id)
                    .execute(&mut *conn)
                    .await?;
                    Self::append(conn, clock, id, 0, now, ended).await?;
                }
            }
            Event::Failed { error } => {
                sqlx::query("UPDATE jobs SET follows = NULL, not_before = ?, updated_at = ? WHERE id = ?")
                    .bind(now)
                    .bind(now)
                    .bind(first)
                    .execute(&mut *conn)
                    .await?;
                Self::append(conn, clock, first, 0, now, &Event::Released { error: leader_failed(leader, error), not_before: now }).await?;
                for (id,) in rest {
                    sqlx::query("UPDATE jobs SET follows = ?, updated_at = ? WHERE id = ?")
                        .bind(first)
                        .bind(now)
                        .bind(id)
                        .execute(&mut *conn)
                        .await?;
                    Self::append(conn, clock, id, 0, now, &Event::Cached { from: first.clone() }).await?;
                }
            }
            _ => {}
        }
        metrics::counter!(crate::instruments::CACHE_WAITERS_SETTLED, "leader" => ended.kind().as_str()).increment(followers.len() as u64);
        Ok(())
    }

    async fn claim_jobs(&self, owner: &str, lease: Duration, max_attempts: u32, limit: u32) -> Result<Vec<Job>, DbError> {
        let now = now_ms();
        let expires = now + millis(lease);
        let limit = limit as usize;
        let mut claimed = Vec::with_capacity(limit);
        // One write transaction (one commit, one fsync) for the whole batch.
        let mut tx = WriteTx::begin(&self.pool, &self.turn, &self.alarm).await?;
        // Jobs whose lease ran out first (they are the oldest work), then the oldest queued
        // jobs: each from its partial index, as many as the batch may take in one read. A job
        // that used up its attempts ends here instead, and the next read of the same kind
        // fills its place.
        for (read, expired) in [(CLAIM_EXPIRED, true), (CLAIM_QUEUED, false)] {
            while claimed.len() < limit {
                let wanted = limit - claimed.len();
                let rows: Vec<(String, i64, Option<String>)> =
                    sqlx::query_as(read).bind(now).bind(wanted as i64).fetch_all(&mut *tx).await?;
                let found = rows.len();
                for (id, attempt, previous) in rows {
                    let attempt = u32::try_from(attempt).unwrap_or(0);
                    if expired {
                        Self::append(&mut tx, &self.clock, &id, attempt, now, &Event::LeaseExpired { owner: previous }).await?;
                    }
                    if attempt < max_attempts || !Self::fail_exhausted(&mut tx, &self.clock, &id, attempt, now).await? {
                        claimed.push(Self::claim_row(&mut tx, &self.clock, &id, attempt, owner, expires, now).await?);
                    }
                }
                if found < wanted {
                    break;
                }
            }
        }
        tx.commit().await?;
        Ok(claimed)
    }

    /// Fails a job that used up its attempts, with its `failed` event (inside the caller's
    /// write transaction), and answers true. A saga is not failed here: it may have written
    /// outputs, which only a claim can delete. It is turned back instead (its `compensating`
    /// event, the first time) and left queued, and the answer is false: claim it.
    async fn fail_exhausted(conn: &mut SqliteConnection, clock: &Clock, id: &str, attempt: u32, now: i64) -> Result<bool, DbError> {
        let error = gave_up(attempt);
        let failed = sqlx::query(
            "UPDATE jobs SET state = 'failed', error = ?, lease_owner = NULL, lease_expires_at = NULL, updated_at = ?
             WHERE id = ? AND outputs = '[]'",
        )
        .bind(json(&error)?)
        .bind(now)
        .bind(id)
        .execute(&mut *conn)
        .await?;
        if failed.rows_affected() == 1 {
            let failed = Event::Failed { error };
            Self::append(conn, clock, id, attempt, now, &failed).await?;
            Self::settle_followers(conn, clock, id, now, &failed).await?;
            return Ok(true);
        }
        let error = saga_gave_up(attempt);
        let turned = sqlx::query("UPDATE jobs SET compensate = ? WHERE id = ? AND compensate IS NULL")
            .bind(json(&error)?)
            .bind(id)
            .execute(&mut *conn)
            .await?;
        sqlx::query(
            "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL, not_before = 0, updated_at = ? WHERE id = ?",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *conn)
        .await?;
        if turned.rows_affected() == 1 {
            Self::append(conn, clock, id, attempt, now, &Event::Compensating { output: None, error }).await?;
        }
        Ok(false)
    }

    /// Claims one job for `owner` (inside the caller's write transaction, which found it
    /// claimable at `attempt`), with its `claimed` event.
    async fn claim_row(
        conn: &mut SqliteConnection,
        clock: &Clock,
        id: &str,
        attempt: u32,
        owner: &str,
        expires: i64,
        now: i64,
    ) -> Result<Job, DbError> {
        let next = attempt + 1;
        let row: ClaimedRow = sqlx::query_as(&format!(
            "UPDATE jobs SET state = 'processing', attempt = ?, lease_owner = ?, lease_expires_at = ?, updated_at = ?, event_seq = event_seq + 1
             WHERE id = ? RETURNING {JOB_COLUMNS}, event_seq, {BEFORE} AS before"
        ))
        .bind(i64::from(next))
        .bind(owner)
        .bind(expires)
        .bind(now)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        Self::insert_event(
            conn,
            clock,
            id,
            Next { seq: row.event_seq, before: row.before },
            next,
            now,
            &Event::Claimed { owner: owner.to_string(), lease_expires_at: expires },
        )
        .await?;
        Ok(row.job.into_job()?)
    }

    async fn claim_by_id(&self, owner: &str, lease: Duration, max_attempts: u32, ids: &[String]) -> Result<Vec<ClaimById>, DbError> {
        let now = now_ms();
        let expires = now + millis(lease);
        let mut answers = Vec::with_capacity(ids.len());
        let mut tx = WriteTx::begin(&self.pool, &self.turn, &self.alarm).await?;
        for id in ids {
            let row: Option<(String, i64, i64, Option<i64>)> =
                sqlx::query_as("SELECT state, attempt, not_before, lease_expires_at FROM jobs WHERE id = ?")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
            let answer = match row {
                Some((state, attempt, not_before, _)) if state == "queued" && not_before <= now => {
                    let attempt = u32::try_from(attempt).unwrap_or(0);
                    if attempt >= max_attempts && Self::fail_exhausted(&mut tx, &self.clock, id, attempt, now).await? {
                        ClaimById::Ended { id: id.clone() }
                    } else {
                        ClaimById::Claimed(Box::new(Self::claim_row(&mut tx, &self.clock, id, attempt, owner, expires, now).await?))
                    }
                }
                other => unclaimed(id, other.map(|(state, _, not_before, lease)| (state, not_before, lease)), now),
            };
            answers.push(answer);
        }
        tx.commit().await?;
        Ok(answers)
    }

    async fn rescue(&self, max_attempts: u32) -> Result<u64, DbError> {
        let now = now_ms();
        let expired: Vec<(String, i64, Option<String>)> = sqlx::query_as(
            "SELECT id, attempt, lease_owner FROM jobs WHERE state = 'processing' AND lease_expires_at < ? ORDER BY lease_expires_at LIMIT 100",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        if expired.is_empty() {
            return Ok(0);
        }
        let mut tx = WriteTx::begin(&self.pool, &self.turn, &self.alarm).await?;
        let mut rescued = 0;
        for (id, attempt, previous) in expired {
            // Still expired under the write lock (a renewal may have come in between).
            let done = sqlx::query(
                "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL, not_before = 0, updated_at = ?
                 WHERE id = ? AND attempt = ? AND state = 'processing' AND lease_expires_at < ?",
            )
            .bind(now)
            .bind(&id)
            .bind(attempt)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 0 {
                continue;
            }
            let attempt = u32::try_from(attempt).unwrap_or(0);
            Self::append(&mut tx, &self.clock, &id, attempt, now, &Event::LeaseExpired { owner: previous }).await?;
            if attempt >= max_attempts {
                // Failed, or (a saga) turned back and left queued for the claim that compensates.
                Self::fail_exhausted(&mut tx, &self.clock, &id, attempt, now).await?;
            }
            rescued += 1;
        }
        tx.commit().await?;
        if rescued > 0 {
            tracing::info!(jobs = rescued, "rescued jobs whose lease ran out");
            metrics::counter!(crate::instruments::LEASES_EXPIRED).increment(rescued);
        }
        Ok(rescued)
    }

    async fn take_relay_lease(&self, owner: &str, ttl: Duration, cursor: Option<i64>) -> Result<Option<i64>, DbError> {
        let now = now_ms();
        let mut tx = WriteTx::begin(&self.pool, &self.turn, &self.alarm).await?;
        let row: Option<(i64,)> = sqlx::query_as(
            "INSERT INTO relays (name, owner, lease_expires_at, cursor)
             VALUES ('relay', ?1, ?2, (SELECT COALESCE(MAX(id), 0) FROM job_events))
             ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, lease_expires_at = excluded.lease_expires_at,
                 cursor = CASE WHEN relays.owner = excluded.owner AND ?3 IS NOT NULL THEN MAX(relays.cursor, ?3) ELSE relays.cursor END
             WHERE relays.owner = excluded.owner OR relays.lease_expires_at < ?4
             RETURNING cursor",
        )
        .bind(owner)
        .bind(now + millis(ttl))
        .bind(cursor)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(row.map(|(c,)| c))
    }

    async fn succeed_jobs(&self, items: &[(String, u32, JobResult)]) -> Result<Vec<Result<(), StoreError>>, DbError> {
        let now = now_ms();
        // One write transaction (one commit, one fsync) for the batch; each row fenced on its own.
        let mut tx = WriteTx::begin(&self.pool, &self.turn, &self.alarm).await?;
        let mut out = Vec::with_capacity(items.len());
        for (id, attempt, result) in items {
            let numbered: Option<(i64, Option<i64>)> = sqlx::query_as(&format!(
                "UPDATE jobs SET state = 'succeeded', result = ?, lease_owner = NULL, lease_expires_at = NULL, updated_at = ?,
                     event_seq = event_seq + 1
                 WHERE id = ? AND attempt = ? AND state = 'processing' RETURNING event_seq, {BEFORE}"
            ))
            .bind(json(result)?)
            .bind(now)
            .bind(id)
            .bind(i64::from(*attempt))
            .fetch_optional(&mut *tx)
            .await?;
            let Some((seq, before)) = numbered else {
                out.push(Err(StoreError::Fenced { id: id.clone(), attempt: *attempt }));
                continue;
            };
            let succeeded = Event::Succeeded { result: Some(result.clone()), outputs: BTreeMap::new() };
            Self::insert_event(&mut tx, &self.clock, id, Next { seq, before }, *attempt, now, &succeeded).await?;
            Self::settle_followers(&mut tx, &self.clock, id, now, &succeeded).await?;
            out.push(Ok(()));
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn prune_jobs(&self, ended_before: i64, limit: u32) -> Result<u64, DbError> {
        let mut tx = WriteTx::begin(&self.pool, &self.turn, &self.alarm).await?;
        let ended = "SELECT id FROM jobs WHERE state IN ('succeeded', 'failed') AND updated_at < ? ORDER BY updated_at LIMIT ?";
        for table in ["job_events WHERE job_id", "job_views WHERE id", "result_cache WHERE job_id"] {
            sqlx::query(&format!("DELETE FROM {table} IN ({ended})")).bind(ended_before).bind(i64::from(limit)).execute(&mut *tx).await?;
        }
        let done = sqlx::query(&format!("DELETE FROM jobs WHERE id IN ({ended})"))
            .bind(ended_before)
            .bind(i64::from(limit))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    async fn probe_db(&self, who: &str, write: bool) -> Result<(), DbError> {
        if !write {
            sqlx::query("SELECT 1 FROM jobs LIMIT 1").fetch_optional(&self.pool).await?;
            return Ok(());
        }
        let mut tx = WriteTx::begin(&self.pool, &self.turn, &self.alarm).await?;
        sqlx::query("INSERT INTO health (probe, at) VALUES (?, ?) ON CONFLICT (probe) DO UPDATE SET at = excluded.at")
            .bind(who)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// SQLITE_BUSY and SQLITE_LOCKED, with their extended codes.
fn is_busy(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else { return false };
    db.code().and_then(|c| c.parse::<i32>().ok()).is_some_and(|code| matches!(code & 0xff, 5 | 6))
}

enum Bind {
    Int(i64),
    Text(String),
}

#[async_trait]
impl Outbox for SqliteJobStore {
    async fn events_after(&self, after: i64, limit: u32) -> Result<Vec<OutboxEvent>, StoreError> {
        let rows: Vec<OutboxRow> = sqlx::query_as(&format!(
            "SELECT e.id, {}, j.traceparent FROM job_events e LEFT JOIN jobs j ON j.id = e.job_id WHERE e.id > ? ORDER BY e.id LIMIT ?",
            event_columns("e")
        ))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(DbError::from)?;
        rows.into_iter().map(OutboxRow::into_outbox).collect()
    }

    async fn owner_events_after(&self, owner: &str, after: i64, limit: u32) -> Result<Vec<OutboxEvent>, StoreError> {
        let columns = event_columns("e");
        let rows: Vec<OutboxRow> = sqlx::query_as(&format!(
            "SELECT e.id, {columns}, j.traceparent FROM job_events e JOIN jobs j ON j.id = e.job_id WHERE e.id > ? AND j.owner = ? ORDER BY e.id LIMIT ?"
        ))
        .bind(after)
        .bind(owner)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(DbError::from)?;
        rows.into_iter().map(OutboxRow::into_outbox).collect()
    }

    async fn newest_event_id(&self) -> Result<i64, StoreError> {
        let (id,): (i64,) =
            sqlx::query_as("SELECT COALESCE(MAX(id), 0) FROM job_events").fetch_one(&self.pool).await.map_err(DbError::from)?;
        Ok(id)
    }

    async fn relay_lease(&self, owner: &str, ttl: Duration, cursor: Option<i64>) -> Result<Option<i64>, StoreError> {
        Ok(self.take_relay_lease(owner, ttl, cursor).await?)
    }

    async fn rescue_expired(&self, max_attempts: u32) -> Result<u64, StoreError> {
        Ok(self.rescue(max_attempts).await?)
    }

    async fn stale_claimable(&self, for_longer_than: Duration, limit: u32) -> Result<Vec<(String, u32)>, StoreError> {
        let since = now_ms() - millis(for_longer_than);
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT id, attempt FROM jobs WHERE state = 'queued' AND not_before <= ? AND updated_at <= ? ORDER BY created_at, id LIMIT ?",
        )
        .bind(since)
        .bind(since)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(DbError::from)?;
        Ok(rows.into_iter().map(|(id, attempt)| (id, u32::try_from(attempt).unwrap_or(0))).collect())
    }

    async fn queue_stats(&self) -> Result<QueueStats, StoreError> {
        let (queued, oldest): (i64, Option<i64>) =
            sqlx::query_as("SELECT count(*), min(created_at) FROM jobs WHERE state = 'queued' AND not_before < ?")
                .bind(FOLLOWING)
                .fetch_one(&self.pool)
                .await
                .map_err(DbError::from)?;
        Ok(QueueStats { queued: u64::try_from(queued).unwrap_or(0), oldest_created_at: oldest })
    }
}

#[async_trait]
impl Views for SqliteJobStore {
    async fn view(&self, id: &str) -> Result<Option<StoredView>, StoreError> {
        let row: Option<ViewRow> = sqlx::query_as("SELECT owner, view FROM job_views WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(DbError::from)?;
        row.map(ViewRow::into_view).transpose()
    }

    async fn views_of(&self, ids: &[String]) -> Result<Vec<StoredView>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // `json_each` takes the ids as one parameter, however many.
        let rows: Vec<ViewRow> = sqlx::query_as("SELECT owner, view FROM job_views WHERE id IN (SELECT value FROM json_each(?))")
            .bind(json(&ids)?)
            .fetch_all(&self.pool)
            .await
            .map_err(DbError::from)?;
        rows.into_iter().map(ViewRow::into_view).collect()
    }

    async fn put_views(&self, views: &[StoredView], cursor: Option<i64>) -> Result<(), StoreError> {
        let mut tx = WriteTx::begin(&self.pool, &self.turn, &self.alarm).await.map_err(DbError::from)?;
        for v in views {
            sqlx::query(
                "INSERT INTO job_views (id, owner, state, created_at, seq, view) VALUES (?, ?, ?, ?, ?, ?)
                 ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, state = excluded.state, created_at = excluded.created_at,
                     seq = excluded.seq, view = excluded.view
                 WHERE excluded.seq > job_views.seq",
            )
            .bind(&v.view.id)
            .bind(&v.owner)
            .bind(v.view.state.as_str())
            .bind(v.view.created_at)
            .bind(i64::from(v.view.seq))
            .bind(json(&v.view)?)
            .execute(&mut *tx)
            .await
            .map_err(DbError::from)?;
        }
        if let Some(cursor) = cursor {
            sqlx::query(
                "INSERT INTO projections (name, cursor) VALUES ('status', ?)
                 ON CONFLICT (name) DO UPDATE SET cursor = MAX(projections.cursor, excluded.cursor)",
            )
            .bind(cursor)
            .execute(&mut *tx)
            .await
            .map_err(DbError::from)?;
        }
        tx.commit().await.map_err(DbError::from)?;
        Ok(())
    }

    async fn list_views(
        &self,
        owner: &str,
        state: Option<JobState>,
        after: Option<&ViewsAfter>,
        limit: u32,
    ) -> Result<Vec<StoredView>, StoreError> {
        let filter = views_filter(state.is_some(), after.is_some(), false, 2);
        let sql = format!("SELECT owner, view FROM job_views WHERE owner = ?{filter} ORDER BY created_at DESC, id DESC LIMIT ?");
        let mut query = sqlx::query_as::<_, ViewRow>(&sql).bind(owner);
        if let Some(state) = state {
            query = query.bind(state.as_str());
        }
        if let Some(after) = after {
            query = query.bind(after.created_at).bind(after.created_at).bind(&after.id);
        }
        let rows = query.bind(i64::from(limit)).fetch_all(&self.pool).await.map_err(DbError::from)?;
        rows.into_iter().map(ViewRow::into_view).collect()
    }

    async fn projector_cursor(&self) -> Result<Option<i64>, StoreError> {
        let row: Option<(i64,)> = sqlx::query_as("SELECT cursor FROM projections WHERE name = 'status'")
            .fetch_optional(&self.pool)
            .await
            .map_err(DbError::from)?;
        Ok(row.map(|(c,)| c))
    }

    async fn owners(&self, ids: &[String]) -> Result<Vec<(String, String)>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(sqlx::query_as("SELECT id, owner FROM jobs WHERE id IN (SELECT value FROM json_each(?))")
            .bind(json(&ids)?)
            .fetch_all(&self.pool)
            .await
            .map_err(DbError::from)?)
    }

    async fn jobs_after(&self, after: &str, limit: u32) -> Result<Vec<(String, String)>, StoreError> {
        Ok(sqlx::query_as("SELECT id, owner FROM jobs WHERE id > ? ORDER BY id LIMIT ?")
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(DbError::from)?)
    }

    async fn clear_views(&self) -> Result<u64, StoreError> {
        let mut tx = WriteTx::begin(&self.pool, &self.turn, &self.alarm).await.map_err(DbError::from)?;
        let done = sqlx::query("DELETE FROM job_views").execute(&mut *tx).await.map_err(DbError::from)?;
        tx.commit().await.map_err(DbError::from)?;
        Ok(done.rows_affected())
    }
}

#[async_trait]
impl JobStore for SqliteJobStore {
    async fn claim_ids(&self, owner: &str, lease: Duration, max_attempts: u32, ids: &[String]) -> Result<Vec<ClaimById>, StoreError> {
        Ok(self.claim_by_id(owner, lease, max_attempts, ids).await?)
    }

    async fn create(&self, job: NewJob) -> Result<Created, StoreError> {
        Ok(self.create_job(job, None).await?.0)
    }

    async fn create_cached(&self, job: NewJob, cache: &CacheKey) -> Result<(Created, CacheOutcome), StoreError> {
        Ok(self.create_job(job, Some(cache)).await?)
    }

    async fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(DbError::from)?;
        Ok(Self::fetch_job(&mut conn, id).await?)
    }

    async fn events(&self, id: &str) -> Result<Vec<JobEvent>, StoreError> {
        let rows: Vec<EventRow> = sqlx::query_as(&format!("SELECT {EVENT_COLUMNS} FROM job_events WHERE job_id = ? ORDER BY seq"))
            .bind(id)
            .fetch_all(&self.pool)
            .await
            .map_err(DbError::from)?;
        rows.into_iter().map(EventRow::into_event).collect()
    }

    async fn events_since(&self, id: &str, seq: u32) -> Result<Vec<JobEvent>, StoreError> {
        let rows: Vec<EventRow> =
            sqlx::query_as(&format!("SELECT {EVENT_COLUMNS} FROM job_events WHERE job_id = ? AND seq > ? ORDER BY seq"))
                .bind(id)
                .bind(i64::from(seq))
                .fetch_all(&self.pool)
                .await
                .map_err(DbError::from)?;
        rows.into_iter().map(EventRow::into_event).collect()
    }

    async fn claim_many(&self, owner: &str, lease: Duration, max_attempts: u32, limit: u32) -> Result<Vec<Job>, StoreError> {
        Ok(self.claim_jobs(owner, lease, max_attempts, limit).await?)
    }

    async fn extend_lease(&self, id: &str, attempt: u32, lease: Duration) -> Result<(), StoreError> {
        Ok(self.renew(id, attempt, lease).await?)
    }

    async fn record_retry(&self, id: &str, attempt: u32, worker: &str, error: &JobError) -> Result<(), StoreError> {
        // Touch the row (no state change) so the event is fenced like every other transition.
        let event = Event::Retried { worker: worker.to_string(), error: error.clone() };
        Ok(self.fenced(id, attempt, "state = state", None, event).await?)
    }

    async fn release(&self, id: &str, attempt: u32, reason: &JobError, delay: Duration) -> Result<(), StoreError> {
        let not_before = now_ms() + millis(delay);
        let set = "state = 'queued', lease_owner = NULL, lease_expires_at = NULL, not_before = ?";
        Ok(self.fenced(id, attempt, set, Some(Bind::Int(not_before)), Event::Released { error: reason.clone(), not_before }).await?)
    }

    async fn succeed(&self, id: &str, attempt: u32, result: &JobResult) -> Result<(), StoreError> {
        let set = "state = 'succeeded', result = ?, lease_owner = NULL, lease_expires_at = NULL";
        let event = Event::Succeeded { result: Some(result.clone()), outputs: BTreeMap::new() };
        Ok(self.fenced(id, attempt, set, Some(Bind::Text(json(result)?)), event).await?)
    }

    async fn succeed_many(&self, items: &[(String, u32, JobResult)]) -> Vec<Result<(), StoreError>> {
        match self.succeed_jobs(items).await {
            Ok(each) => each,
            Err(e) => {
                let e = StoreError::from(e);
                items.iter().map(|_| Err(e.replicate())).collect()
            }
        }
    }

    async fn fail(&self, id: &str, attempt: u32, error: &JobError) -> Result<(), StoreError> {
        let set = "state = 'failed', error = ?, lease_owner = NULL, lease_expires_at = NULL";
        Ok(self.fenced(id, attempt, set, Some(Bind::Text(json(error)?)), Event::Failed { error: error.clone() }).await?)
    }

    async fn record_output(&self, id: &str, attempt: u32, output: &str, result: &JobResult) -> Result<(), StoreError> {
        // A JSON merge patch (RFC 7396): adds or replaces this one output.
        let set = "steps = json_patch(steps, ?)";
        let event = Event::OutputSucceeded { output: output.to_string(), result: result.clone() };
        Ok(self.fenced(id, attempt, set, Some(Bind::Text(step_patch(output, attempt, result)?)), event).await?)
    }

    async fn compensate(&self, id: &str, attempt: u32, output: Option<&str>, error: &JobError) -> Result<(), StoreError> {
        let set = "compensate = COALESCE(compensate, ?)";
        let event = Event::Compensating { output: output.map(str::to_string), error: error.clone() };
        Ok(self.fenced(id, attempt, set, Some(Bind::Text(json(error)?)), event).await?)
    }

    async fn record_deleted(&self, id: &str, attempt: u32, output: &str, key: &str) -> Result<(), StoreError> {
        // A merge patch with null deletes the member.
        let set = "steps = json_patch(steps, ?)";
        let patch = json(&serde_json::json!({ output: null }))?;
        let event = Event::OutputDeleted { output: output.to_string(), key: key.to_string() };
        Ok(self.fenced(id, attempt, set, Some(Bind::Text(patch)), event).await?)
    }

    async fn succeed_outputs(&self, id: &str, attempt: u32, outputs: &BTreeMap<String, Step>) -> Result<(), StoreError> {
        let set = "state = 'succeeded', steps = ?, lease_owner = NULL, lease_expires_at = NULL";
        let results = outputs.iter().map(|(name, step)| (name.clone(), step.result.clone())).collect();
        let event = Event::Succeeded { result: None, outputs: results };
        Ok(self.fenced(id, attempt, set, Some(Bind::Text(json(outputs)?)), event).await?)
    }

    async fn counts(&self) -> Result<Vec<(JobState, u64)>, StoreError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetch_all(&self.pool).await.map_err(DbError::from)?;
        Ok(crate::rows::counts(rows))
    }

    async fn prune(&self, ended_before: i64, limit: u32) -> Result<u64, StoreError> {
        Ok(self.prune_jobs(ended_before, limit).await?)
    }

    async fn probe(&self, who: &str, write: bool) -> Result<(), StoreError> {
        Ok(self.probe_db(who, write).await?)
    }
}

#[path = "sqlite/busy.rs"]
mod busy;

#[cfg(test)]
#[path = "sqlite/faults.rs"]
mod faults;

#[cfg(test)]
mod tests {
    use super::*;
    use pixmesh_model::{BlobRef, EventKind, Options};
    use sqlx::SqlitePool;

    fn new_job(id: &str) -> NewJob {
        NewJob {
            id: id.into(),
            owner: "alice".into(),
            input: BlobRef::at_digest("a".repeat(64), 10),
            input_format: "jpeg".into(),
            options: Options { width: Some(100), ..Options::default() },
            outputs: Vec::new(),
            idempotency_key: None,
            request_hash: "h".into(),
            traceparent: None,
        }
    }

    /// The schema before versioned migrations and before jobs had owners, with one job that
    /// was claimed and released (three events, numbered by the old global counter).
    async fn legacy_database(path: &Path) {
        let old = SqlitePool::connect_with(SqliteConnectOptions::new().filename(path).create_if_missing(true)).await.unwrap();
        for statement in [
            "CREATE TABLE jobs (id TEXT PRIMARY KEY, state TEXT NOT NULL, attempt INTEGER NOT NULL DEFAULT 0, lease_owner TEXT,
              lease_expires_at INTEGER, not_before INTEGER NOT NULL DEFAULT 0, input_digest TEXT NOT NULL, input_size INTEGER NOT NULL,
              input_format TEXT NOT NULL, options TEXT NOT NULL, idempotency_key TEXT UNIQUE, request_hash TEXT NOT NULL, result TEXT,
              error TEXT, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL) STRICT",
            "CREATE INDEX jobs_claimable ON jobs (state, not_before, created_at)",
            "CREATE TABLE job_events (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL REFERENCES jobs (id), kind TEXT NOT NULL,
              attempt INTEGER NOT NULL, at INTEGER NOT NULL, data TEXT NOT NULL) STRICT",
            "CREATE INDEX job_events_by_job ON job_events (job_id, seq)",
            "INSERT INTO jobs (id, state, attempt, input_digest, input_size, input_format, options, request_hash, created_at, updated_at)
              VALUES ('old', 'queued', 1, 'd', 1, 'png', '{}', 'h', 0, 0), ('other', 'queued', 0, 'd', 1, 'png', '{}', 'h', 1, 1)",
            r#"INSERT INTO job_events (job_id, kind, attempt, at, data) VALUES
              ('old', 'accepted', 0, 0, '{"input": {"digest": "d", "size": 1}, "input_format": "png", "options": {}}'),
              ('other', 'accepted', 0, 1, '{"input": {"digest": "d", "size": 1}, "input_format": "png", "options": {}}'),
              ('old', 'claimed', 1, 2, '{"owner": "d1", "lease_expires_at": 9}'),
              ('old', 'released', 1, 3, '{"code": "unavailable", "message": "m", "not_before": 0}')"#,
        ] {
            sqlx::query(statement).execute(&old).await.unwrap();
        }
        old.close().await;
    }

    #[tokio::test]
    async fn databases_from_before_migrations_are_brought_up_to_date() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        legacy_database(&path).await;
        let store = SqliteJobStore::open(&path).await.unwrap();
        assert_eq!(store.get("old").await.unwrap().unwrap().owner, "", "old jobs belong to no key");
        // Their events are numbered per job now, and read as typed events.
        let events = store.events("old").await.unwrap();
        assert_eq!(
            events.iter().map(|e| (e.seq, e.kind())).collect::<Vec<_>>(),
            vec![(1, EventKind::Accepted), (2, EventKind::Claimed), (3, EventKind::Released)]
        );
        assert_eq!(store.events("other").await.unwrap().iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1]);
        // And their next event follows on.
        let job = store.claim("d", Duration::from_secs(30), 5).await.unwrap().unwrap();
        assert_eq!((job.id.as_str(), job.attempt), ("old", 2));
        assert_eq!(store.events("old").await.unwrap().last().map(|e| (e.seq, e.kind())), Some((4, EventKind::Claimed)));
        store.create(new_job("new")).await.unwrap();
        assert_eq!(store.get("new").await.unwrap().unwrap().owner, "alice");
        // Events written before they had HLC times read with the time of their `at`, and the
        // claim after them is stamped after them.
        let events = store.events("old").await.unwrap();
        assert_eq!(events.iter().take(3).map(|e| e.at).collect::<Vec<_>>(), vec![0, 2, 3]);
        assert_eq!(events[1].hlc, crate::Hlc::from_unix_ms(2));
        assert!(events[3].hlc > events[2].hlc);
        // A pixmesh from before, still running during an upgrade, writes no HLC time: its
        // event gets the time of its `at`.
        sqlx::query(
            "INSERT INTO job_events (job_id, seq, version, kind, attempt, at, data) VALUES ('other', 2, 1, 'claimed', 1, 1796353500123, ?)",
        )
        .bind(r#"{"owner": "old-pixmesh", "lease_expires_at": 9}"#)
        .execute(&store.pool)
        .await
        .unwrap();
        let late = store.events("other").await.unwrap().pop().unwrap();
        assert_eq!((late.seq, late.hlc, late.at), (2, crate::Hlc::from_unix_ms(1_796_353_500_123), 1_796_353_500_123));
        drop(store);
        // Opening again applies nothing twice.
        let again = SqliteJobStore::open(&path).await.unwrap();
        assert_eq!(again.events("old").await.unwrap().len(), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn processes_opening_a_new_database_at_once_all_succeed() {
        // Several rounds: the race for the first open is lost differently each time.
        for _ in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("jobs.db");
            let opens: Vec<_> = (0..6).map(|_| SqliteJobStore::open(&path)).collect();
            let stores: Vec<_> = futures_util::future::join_all(opens).await;
            for store in stores {
                let store = store.unwrap();
                store.probe("t", true).await.unwrap();
            }
        }
    }

    /// Expired leases are claimed before queued jobs, also when one of them used up its
    /// attempts and fails instead: the next expired one takes its place, not a queued job.
    #[tokio::test]
    async fn expired_jobs_come_before_queued_ones_past_one_out_of_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteJobStore::open(&dir.path().join("jobs.db")).await.unwrap();
        store.create(new_job("a")).await.unwrap();
        let first = store.claim_many("d", Duration::from_millis(1), 5, 1).await.unwrap();
        assert_eq!(first.iter().map(|j| (j.id.as_str(), j.attempt)).collect::<Vec<_>>(), vec![("a", 1)]);
        tokio::time::sleep(Duration::from_millis(10)).await;
        // a again (its second attempt), then b, each with a lease that runs out soon, a's first.
        let again = store.claim_many("d", Duration::from_millis(500), 5, 1).await.unwrap();
        assert_eq!(again.iter().map(|j| (j.id.as_str(), j.attempt)).collect::<Vec<_>>(), vec![("a", 2)]);
        store.create(new_job("b")).await.unwrap();
        let b = store.claim_many("d", Duration::from_millis(600), 5, 1).await.unwrap();
        assert_eq!(b.iter().map(|j| (j.id.as_str(), j.attempt)).collect::<Vec<_>>(), vec![("b", 1)]);
        store.create(new_job("q")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        let claimed = store.claim_many("d", Duration::from_secs(30), 2, 1).await.unwrap();
        assert_eq!(claimed.iter().map(|j| (j.id.as_str(), j.attempt)).collect::<Vec<_>>(), vec![("b", 2)]);
        assert_eq!(store.get("a").await.unwrap().unwrap().state, JobState::Failed, "a used up its attempts");
        assert_eq!(store.get("q").await.unwrap().unwrap().state, JobState::Queued);
    }

    /// Two stores on one file are two processes' turns to write. One that writes without pause
    /// (eight writers with long transactions, as a distributor under load) must still let the
    /// other's writes in within a fraction of a second; with SQLite's own busy handler and no
    /// gaps they waited for seconds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_process_that_writes_without_pause_lets_another_process_write() {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        let busy = SqliteJobStore::open(&path).await.unwrap();
        let other = SqliteJobStore::open(&path).await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let writers: Vec<_> = (0..8)
            .map(|_| {
                let (busy, stop, writes) = (busy.clone(), Arc::clone(&stop), Arc::clone(&writes));
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        // A write transaction that holds the lock a few milliseconds, as a
                        // claim of many jobs does.
                        let mut tx = WriteTx::begin(&busy.pool, &busy.turn, &busy.alarm).await.unwrap();
                        sqlx::query("INSERT INTO health (probe, at) VALUES ('busy', 1) ON CONFLICT (probe) DO UPDATE SET at = at + 1")
                            .execute(&mut *tx)
                            .await
                            .unwrap();
                        tokio::time::sleep(Duration::from_millis(3)).await;
                        tx.commit().await.unwrap();
                        writes.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        while writes.load(Ordering::Relaxed) < 50 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut slowest = Duration::ZERO;
        for n in 0..20 {
            let started = std::time::Instant::now();
            other.create(new_job(&format!("j{n}"))).await.unwrap();
            slowest = slowest.max(started.elapsed());
        }
        let before = writes.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let busy_kept_writing = writes.load(Ordering::Relaxed) > before;
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.await.unwrap();
        }
        assert!(busy_kept_writing, "the busy process kept writing meanwhile");
        assert!(slowest < Duration::from_secs(1), "the other process waited {slowest:?} for one write");
    }
}

#[cfg(test)]
mod plan {
    use super::*;

    #[tokio::test]
    async fn the_claim_reads_partial_indexes_not_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteJobStore::open(&dir.path().join("jobs.db")).await.unwrap();
        for (sql, index) in [(CLAIM_QUEUED, "jobs_queued"), (CLAIM_EXPIRED, "jobs_leased")] {
            let rows: Vec<(i64, i64, i64, String)> =
                sqlx::query_as(&format!("EXPLAIN QUERY PLAN {sql}")).bind(0i64).bind(32i64).fetch_all(&store.pool).await.unwrap();
            let plan: Vec<String> = rows.into_iter().map(|r| r.3).collect();
            assert!(plan.iter().any(|p| p.contains(index)), "{sql}: {plan:?}");
            assert!(!plan.iter().any(|p| p.contains("TEMP B-TREE")), "no sort: {plan:?}");
        }
    }
}
