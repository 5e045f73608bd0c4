//! The job store on PostgreSQL, for deployments across machines: any number of upload,
//! status and distributor processes share one database.
//!
//! Claims take the oldest queued job with `FOR UPDATE SKIP LOCKED`, so concurrent claimers
//! never wait for each other or take the same job; the claim, the job row and its `claimed`
//! event are one statement (a single round trip, atomic without an explicit transaction), as
//! are the fenced transitions (`succeeded`, `failed`, …) with their events (a transition that
//! ends a job is a transaction of two: the jobs waiting for it, from the result cache, end in
//! the same transaction). The claim reads
//! only the small partial index of queued jobs, however many ended jobs the table holds
//! (`EXPLAIN` in the conformance tests).
//!
//! Leases: a claim holds its job until `lease_expires_at`, pushed out by the distributor while
//! it works. A crashed claimer's jobs are rescued by the next claim after their lease ran out
//! (a sweep that runs when a claim finds the queue empty, and at least every
//! [`SWEEP_INTERVAL`] while it does not): within the lease plus a fraction of a second, not
//! the hour of a time-only rescue. The rescued job's next claim bumps `attempt`, which fences
//! the old claimer's late writes.

use crate::error::DbError;
use crate::health::Alarm;
use crate::rows::{
    EVENT_COLUMNS, EventRow, FOLLOWING, JOB_COLUMNS, JobRow, OutboxRow, ViewRow, accepted_event, cache_outcome, encode, event_columns,
    gave_up, json, leader_failed, millis, placement, reused, saga_gave_up, step_patch, unclaimed, views_filter,
};
use async_trait::async_trait;
use pixmesh_chassis::clock::Clock;
use pixmesh_chassis::time::now_ms;
use pixmesh_model::{
    CacheKey, CacheOutcome, ClaimById, Created, Event, Hlc, Job, JobError, JobEvent, JobResult, JobState, JobStore, NewJob, Outbox,
    OutboxEvent, QueueStats, Step, StoreError, StoredView, Views, ViewsAfter,
};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool};
use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// While claims keep finding queued jobs, expired leases are still looked for this often.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(250);

/// Most expired leases one sweep handles (the next sweep takes the rest).
const SWEEP_BATCH: i64 = 100;

/// [`JOB_COLUMNS`] of the CTE `c`, and of `jobs` as `j`.
static CLAIMED_COLUMNS: LazyLock<String> = LazyLock::new(|| prefixed("c"));
static PICKED_COLUMNS: LazyLock<String> = LazyLock::new(|| prefixed("j"));

fn prefixed(table: &str) -> String {
    JOB_COLUMNS.split(", ").map(|c| format!("{table}.{c}")).collect::<Vec<_>>().join(", ")
}

/// A row of the claim: a job, and whether it was claimed (or only picked: out of attempts).
#[derive(sqlx::FromRow)]
struct ClaimRow {
    #[sqlx(flatten)]
    job: JobRow,
    /// The HLC time of the job's event before this claim.
    prev_hlc: i64,
    claimed: bool,
}

/// The HLC time of the next event of a job, in the statement that writes it (under the job
/// row's lock): after the job's last event (`jobs.hlc`, its value before the update), unless
/// that one is beyond the clock's maximum offset (then this process's own time; see
/// `pixmesh_chassis::clock`). `own` and `max` name the statement's parameters for this
/// process's new time and the maximum offset, both in the stored form.
fn hlc_next(own: &str, max: &str) -> String {
    format!("CASE WHEN jobs.hlc >= {own}::bigint + {max}::bigint THEN {own}::bigint ELSE GREATEST(jobs.hlc + 1, {own}::bigint) END")
}

#[derive(Debug, Clone)]
pub struct PostgresJobStore {
    pool: PgPool,
    alarm: Alarm,
    /// When this process last swept for expired leases (ms since the epoch).
    last_sweep: Arc<AtomicI64>,
    /// Stamps the events written here.
    clock: Arc<Clock>,
}

impl PostgresJobStore {
    /// Connects (waiting up to `timeout` for the server) and brings the schema up to date;
    /// concurrent processes migrate one at a time (an advisory lock).
    pub async fn connect(url: &str, max_connections: u32, timeout: Duration) -> Result<Self, StoreError> {
        Ok(Self::connect_db(url, max_connections, timeout).await?)
    }

    async fn connect_db(url: &str, max_connections: u32, timeout: Duration) -> Result<Self, DbError> {
        let options = PgConnectOptions::from_str(url)?.application_name("pixmesh");
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(timeout)
            // A connection that broke while the server restarted is found out before it is
            // handed to a request.
            .test_before_acquire(true)
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await.map_err(|e| StoreError::Database(format!("cannot bring the schema up to date: {e}")))?;
        Ok(PostgresJobStore {
            pool,
            alarm: Alarm::default(),
            last_sweep: Arc::new(AtomicI64::new(0)),
            clock: pixmesh_chassis::clock::process(),
        })
    }

    /// Raises `alarm` whenever a write fails.
    pub(crate) fn with_alarm(mut self, alarm: Alarm) -> Self {
        self.alarm = alarm;
        self
    }

    /// Stamps events with `clock` instead of this process's (for tests of several processes).
    pub fn with_clock(mut self, clock: Arc<Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The pool, for tests that look at plans and hold transactions open.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn watch<T>(&self, result: Result<T, DbError>) -> Result<T, StoreError> {
        if let Err(DbError::Sql(_)) = &result {
            self.alarm.raise();
        }
        Ok(result?)
    }

    async fn fetch_job(conn: &mut PgConnection, id: &str) -> Result<Option<Job>, DbError> {
        let row: Option<JobRow> =
            sqlx::query_as(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1")).bind(id).fetch_optional(conn).await?;
        Ok(row.map(JobRow::into_job).transpose()?)
    }

    /// Appends `event` inside the caller's transaction, which holds the job's row lock.
    async fn append(conn: &mut PgConnection, clock: &Clock, id: &str, attempt: u32, at: i64, event: &Event) -> Result<(), DbError> {
        let (kind, version, data) = encode(event)?;
        let (own, max) = stamp(clock);
        sqlx::query(&format!(
            "WITH n AS (UPDATE jobs SET event_seq = event_seq + 1, hlc = {} WHERE id = $1 RETURNING event_seq, hlc)
             INSERT INTO job_events (job_id, seq, version, kind, attempt, at, hlc, data) SELECT $1, event_seq, $2, $3, $4, $5, hlc, $6 FROM n",
            hlc_next("$7", "$8")
        ))
        .bind(id)
        .bind(version)
        .bind(kind.as_str())
        .bind(i64::from(attempt))
        .bind(at)
        .bind(data)
        .bind(own)
        .bind(max)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// One fenced transition and its event, as one statement: `set` applies only while the job
    /// is still held by `attempt` and not terminal.
    async fn fenced(&self, id: &str, attempt: u32, set: &str, bind: Option<Bind>, event: Event) -> Result<(), DbError> {
        let (kind, version, data) = encode(&event)?;
        // `set` may use $7; the HLC binds come after it.
        let next = if bind.is_some() { hlc_next("$8", "$9") } else { hlc_next("$7", "$8") };
        let sql = format!(
            "WITH changed AS (
                UPDATE jobs SET {set}, updated_at = $1, event_seq = event_seq + 1, hlc = {next}
                WHERE id = $2 AND attempt = $3 AND state = 'processing'
                RETURNING id, event_seq, attempt, hlc)
             INSERT INTO job_events (job_id, seq, version, kind, attempt, at, hlc, data)
             SELECT id, event_seq, $4, $5, attempt, $1, hlc, $6 FROM changed"
        );
        let mut query = sqlx::query(&sql).bind(now_ms()).bind(id).bind(i64::from(attempt)).bind(version).bind(kind.as_str()).bind(data);
        query = match bind {
            Some(Bind::Int(v)) => query.bind(v),
            Some(Bind::Text(v)) => query.bind(v),
            None => query,
        };
        let (own, max) = stamp(&self.clock);
        query = query.bind(own).bind(max);
        if !matches!(event, Event::Succeeded { .. } | Event::Failed { .. }) {
            let done = query.execute(&self.pool).await?;
            if done.rows_affected() == 0 {
                return Err(StoreError::Fenced { id: id.to_string(), attempt }.into());
            }
            return Ok(());
        }
        // The job ends: the jobs waiting for it end with it, in the same transaction.
        let mut tx = self.pool.begin().await?;
        let done = query.execute(&mut *tx).await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::Fenced { id: id.to_string(), attempt }.into());
        }
        Self::settle_followers(&mut tx, &self.clock, id, &event).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Ends the jobs that wait for job `leader` (the result cache), inside the caller's
    /// transaction, which just ended `leader` with `ended` and holds its row lock: with its
    /// result when it succeeded; when it failed, the first of them is released to be made on
    /// its own and the others wait for that one. A job joins a leader under a share lock of
    /// the leader's row (see [`Self::create_cached_job`]), so this read, a statement after the
    /// one that ended the leader, sees every job that joined it; none joins after.
    async fn settle_followers(conn: &mut PgConnection, clock: &Clock, leader: &str, ended: &Event) -> Result<(), DbError> {
        let now = now_ms();
        let followers: Vec<(String,)> =
            sqlx::query_as("SELECT id FROM jobs WHERE follows = $1 AND state = 'queued' ORDER BY created_at, id FOR UPDATE")
                .bind(leader)
                .fetch_all(&mut *conn)
                .await?;
        let Some(((first,), rest)) = followers.split_first() else { return Ok(()) };
        match ended {
            Event::Succeeded { .. } => {
                let ids: Vec<&String> = followers.iter().map(|(id,)| id).collect();
                sqlx::query(
                    "UPDATE jobs SET state = 'succeeded', result = l.result, steps = l.steps, follows = NULL, not_before = 0, updated_at = $2
                     FROM jobs l WHERE l.id = $1 AND jobs.id = ANY($3::text[])",
                )
                .bind(leader)
                .bind(now)
                .bind(&ids)
                .execute(&mut *conn)
                .await?;
                for id in ids {
                    Self::append(conn, clock, id, 0, now, ended).await?;
                }
            }
            Event::Failed { error } => {
                sqlx::query("UPDATE jobs SET follows = NULL, not_before = $1, updated_at = $1 WHERE id = $2")
                    .bind(now)
                    .bind(first)
                    .execute(&mut *conn)
                    .await?;
                Self::append(conn, clock, first, 0, now, &Event::Released { error: leader_failed(leader, error), not_before: now }).await?;
                for (id,) in rest {
                    sqlx::query("UPDATE jobs SET follows = $1, updated_at = $2 WHERE id = $3")
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

    /// [`JobStore::create_cached`]: one transaction. The cache's entry is taken (inserted, or
    /// locked) first, which makes identical uploads take turns; then the job it names is read
    /// under a share lock, which orders a join against that job's end.
    async fn create_cached_job(&self, job: NewJob, cache: &CacheKey) -> Result<(Created, CacheOutcome), DbError> {
        if let Some(key) = &job.idempotency_key {
            let existing: Option<(String,)> =
                sqlx::query_as("SELECT id FROM jobs WHERE idempotency_key = $1").bind(key).fetch_optional(&self.pool).await?;
            if existing.is_some() {
                return Ok((self.create_job(job).await?, CacheOutcome::Replayed));
            }
        }
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let mut outcome = CacheOutcome::Miss;
        let taken: Option<(String,)> = sqlx::query_as(
            "INSERT INTO result_cache (key, job_id, created_at) VALUES ($1, $2, $3) ON CONFLICT (key) DO NOTHING RETURNING job_id",
        )
        .bind(&cache.key)
        .bind(&job.id)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        if taken.is_some() && cache.only_cached {
            tx.rollback().await?;
            return Err(StoreError::NotCached.into());
        }
        if taken.is_none() {
            let entry: Option<(String,)> = sqlx::query_as("SELECT job_id FROM result_cache WHERE key = $1 FOR UPDATE")
                .bind(&cache.key)
                .fetch_optional(&mut *tx)
                .await?;
            let named = match (&entry, cache.lookup) {
                (Some((id,)), true) => sqlx::query_as::<_, (String,)>("SELECT state FROM jobs WHERE id = $1 FOR SHARE")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?
                    .map(|(state,)| (id.clone(), state)),
                _ => None,
            };
            outcome = cache_outcome(named);
            if outcome == CacheOutcome::Miss && cache.only_cached {
                tx.rollback().await?;
                return Err(StoreError::NotCached.into());
            }
            if outcome == CacheOutcome::Miss {
                // No entry any more (pruned just now), a failed job, or a refresh: this job's.
                sqlx::query(
                    "INSERT INTO result_cache (key, job_id, created_at) VALUES ($1, $2, $3)
                     ON CONFLICT (key) DO UPDATE SET job_id = excluded.job_id, created_at = excluded.created_at",
                )
                .bind(&cache.key)
                .bind(&job.id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
        }
        // The job the entry names, read once: a hit's result, and the input of an upload that
        // sent no image.
        let named = match outcome.source() {
            Some(id) if cache.only_cached || matches!(outcome, CacheOutcome::Hit { .. }) => {
                Some(Self::fetch_job(&mut tx, id).await?.ok_or_else(|| StoreError::NotFound(id.to_string()))?)
            }
            _ => None,
        };
        let mut job = job;
        if cache.only_cached {
            let reused = named.as_ref().ok_or(StoreError::NotCached)?;
            job.input = reused.input.clone();
            job.input_format = reused.input_format.clone();
        }
        let source = named.filter(|_| matches!(outcome, CacheOutcome::Hit { .. }));
        let (state, not_before, follows) = placement(&outcome);
        let inserted = sqlx::query(
            "INSERT INTO jobs (id, owner, state, attempt, input_digest, input_size, input_format, options, idempotency_key, request_hash,
                               event_seq, created_at, updated_at, hlc, outputs, not_before, follows, result, steps, traceparent)
             VALUES ($1, $2, $3, 0, $4, $5, $6, $7, $8, $9, 0, $10, $10, 0, $11, $12, $13, $14, $15, $16)
             ON CONFLICT (idempotency_key) DO NOTHING",
        )
        .bind(&job.id)
        .bind(&job.owner)
        .bind(state)
        .bind(&job.input.digest)
        .bind(i64::try_from(job.input.size).unwrap_or(i64::MAX))
        .bind(&job.input_format)
        .bind(json(&job.options)?)
        .bind(&job.idempotency_key)
        .bind(&job.request_hash)
        .bind(now)
        .bind(json(&job.outputs)?)
        .bind(not_before)
        .bind(follows)
        .bind(source.as_ref().and_then(|s| s.result.as_ref()).map(json).transpose()?)
        .bind(json(&source.as_ref().map(|s| s.steps.clone()).unwrap_or_default())?)
        .bind(&job.traceparent)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            // A create with the same idempotency key committed first: this is its replay.
            tx.rollback().await?;
            return Ok((self.create_job(job).await?, CacheOutcome::Replayed));
        }
        let accepted = accepted_event(&job);
        Self::append(&mut tx, &self.clock, &job.id, 0, now, &accepted).await?;
        match (&outcome, &source) {
            (CacheOutcome::Hit { from }, Some(source)) => {
                Self::append(&mut tx, &self.clock, &job.id, 0, now, &Event::Cached { from: from.clone() }).await?;
                Self::append(&mut tx, &self.clock, &job.id, 0, now, &reused(source)).await?;
            }
            (CacheOutcome::Joined { leader }, _) => {
                Self::append(&mut tx, &self.clock, &job.id, 0, now, &Event::Cached { from: leader.clone() }).await?;
            }
            _ => {}
        }
        let created = Self::fetch_job(&mut tx, &job.id).await?.ok_or_else(|| StoreError::NotFound(job.id.clone()))?;
        tx.commit().await?;
        Ok((Created { job: created, created: true }, outcome))
    }

    async fn create_job(&self, job: NewJob) -> Result<Created, DbError> {
        let now = now_ms();
        let accepted = accepted_event(&job);
        let (kind, version, data) = encode(&accepted)?;
        // A second create with the same idempotency key inserts nothing (it waits for the first
        // to commit, then sees its row) and reads the first job instead.
        let created: Option<JobRow> = sqlx::query_as(&format!(
            "WITH c AS (
                INSERT INTO jobs (id, owner, state, attempt, input_digest, input_size, input_format, options, idempotency_key,
                                  request_hash, event_seq, created_at, updated_at, hlc, outputs, traceparent)
                VALUES ($1, $2, 'queued', 0, $3, $4, $5, $6, $7, $8, 1, $9, $9, $13, $14, $15)
                ON CONFLICT (idempotency_key) DO NOTHING
                RETURNING *),
             e AS (INSERT INTO job_events (job_id, seq, version, kind, attempt, at, hlc, data)
                   SELECT id, 1, $10, $11, 0, $9, $13, $12 FROM c)
             SELECT {} FROM c",
            *CLAIMED_COLUMNS
        ))
        .bind(&job.id)
        .bind(&job.owner)
        .bind(&job.input.digest)
        .bind(i64::try_from(job.input.size).unwrap_or(i64::MAX))
        .bind(&job.input_format)
        .bind(json(&job.options)?)
        .bind(&job.idempotency_key)
        .bind(&job.request_hash)
        .bind(now)
        .bind(version)
        .bind(kind.as_str())
        .bind(data)
        .bind(self.clock.now().to_sql())
        .bind(json(&job.outputs)?)
        .bind(&job.traceparent)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = created {
            return Ok(Created { job: row.into_job()?, created: true });
        }
        let key = job.idempotency_key.as_deref().unwrap_or_default();
        let existing: Option<(String, String)> =
            sqlx::query_as("SELECT id, request_hash FROM jobs WHERE idempotency_key = $1").bind(key).fetch_optional(&self.pool).await?;
        let Some((id, hash)) = existing else {
            // The first job under this key was pruned between the two statements.
            return Err(StoreError::Database(format!("idempotency key {key:?} conflicted but its job is gone; retry")).into());
        };
        if hash != job.request_hash {
            return Err(StoreError::IdempotencyConflict { existing: id }.into());
        }
        let mut conn = self.pool.acquire().await?;
        let found = Self::fetch_job(&mut conn, &id).await?.ok_or(StoreError::NotFound(id))?;
        Ok(Created { job: found, created: false })
    }

    async fn claim_jobs(&self, owner: &str, lease: Duration, max_attempts: u32, limit: u32) -> Result<Vec<Job>, DbError> {
        let mut swept = false;
        if now_ms() - self.last_sweep.load(Ordering::Relaxed) >= millis(SWEEP_INTERVAL) {
            self.sweep(max_attempts).await?;
            swept = true;
        }
        loop {
            let next = "SELECT id, hlc FROM jobs WHERE state = 'queued' AND not_before <= $1
                        ORDER BY created_at, id LIMIT $8 FOR UPDATE SKIP LOCKED";
            let rows = self.claim_rows(next, owner, lease, max_attempts, i64::from(limit.max(1))).await?;
            if rows.is_empty() {
                // The queue looks empty: expired leases may be all there is.
                if !swept && self.sweep(max_attempts).await? > 0 {
                    swept = true;
                    continue;
                }
                return Ok(Vec::new());
            }
            let mut claimed = Vec::new();
            let mut exhausted = false;
            for row in rows {
                if row.claimed {
                    claimed.push(row.job.into_job()?);
                } else {
                    let job = row.job.into_job()?;
                    self.give_up(&job.id, max_attempts).await?;
                    exhausted = true;
                }
            }
            if claimed.is_empty() && exhausted {
                continue;
            }
            claimed.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
            return Ok(claimed);
        }
    }

    /// Runs the claim statement around `next` ([`claim_statement`]), `picked` bound as its $8.
    async fn claim_rows<T>(&self, next: &str, owner: &str, lease: Duration, max_attempts: u32, picked: T) -> Result<Vec<ClaimRow>, DbError>
    where
        T: for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send,
    {
        let now = now_ms();
        let expires = now + millis(lease);
        let (kind, version, data) = encode(&Event::Claimed { owner: owner.to_string(), lease_expires_at: expires })?;
        let (own, max) = stamp(&self.clock);
        let rows: Vec<ClaimRow> = sqlx::query_as(&claim_statement(next))
            .bind(now)
            .bind(owner)
            .bind(expires)
            .bind(i64::from(max_attempts))
            .bind(version)
            .bind(kind.as_str())
            .bind(data)
            .bind(picked)
            .bind(own)
            .bind(max)
            .fetch_all(&self.pool)
            .await?;
        // The events these claims follow were written by other processes (an upload, another
        // distributor): their times move this clock.
        for row in &rows {
            self.clock.observe(Hlc::from_sql(row.prev_hlc), "job store");
        }
        Ok(rows)
    }

    /// The claim by id's statement as it is sent (for the plan test): `$1` now, `$2` the owner,
    /// `$3` the lease's end, `$4` the most attempts, `$5`–`$7` the event, `$8` the ids, `$9`
    /// and `$10` the HLC time and maximum offset.
    pub fn claim_by_id_statement() -> String {
        claim_statement(CLAIM_BY_ID)
    }

    async fn claim_by_id(&self, owner: &str, lease: Duration, max_attempts: u32, ids: &[String]) -> Result<Vec<ClaimById>, DbError> {
        let mut rows = self.claim_rows(CLAIM_BY_ID, owner, lease, max_attempts, ids).await?;
        let now = now_ms();
        let mut answers = Vec::with_capacity(ids.len());
        let mut ended = Vec::new();
        // Sagas out of attempts, turned back now: claimed at once (by the same statement), to
        // compensate.
        let mut turned = Vec::new();
        while !rows.is_empty() {
            for row in rows {
                let job = row.job.into_job()?;
                if row.claimed {
                    answers.push(ClaimById::Claimed(Box::new(job)));
                } else if self.give_up(&job.id, max_attempts).await? {
                    ended.push(job.id);
                } else {
                    turned.push(job.id);
                }
            }
            rows = match turned.is_empty() {
                true => Vec::new(),
                false => self.claim_rows(CLAIM_BY_ID, owner, lease, max_attempts, std::mem::take(&mut turned)).await?,
            };
        }
        let rest: Vec<&String> = ids.iter().filter(|id| !answers.iter().any(|a| a.id() == id.as_str())).collect();
        if !rest.is_empty() {
            let found: Vec<(String, String, i64, Option<i64>)> =
                sqlx::query_as("SELECT id, state, not_before, lease_expires_at FROM jobs WHERE id = ANY($1::text[])")
                    .bind(&rest)
                    .fetch_all(&self.pool)
                    .await?;
            for id in rest {
                let row = found.iter().find(|r| &r.0 == id).map(|(_, state, nb, lease)| (state.clone(), *nb, *lease));
                answers.push(if ended.contains(id) { ClaimById::Ended { id: id.clone() } } else { unclaimed(id, row, now) });
            }
        }
        Ok(answers)
    }

    async fn take_relay_lease(&self, owner: &str, ttl: Duration, cursor: Option<i64>) -> Result<Option<i64>, DbError> {
        let now = now_ms();
        let row: Option<(i64,)> = sqlx::query_as(
            "INSERT INTO relays (name, owner, lease_expires_at, cursor)
             VALUES ('relay', $1, $2, (SELECT COALESCE(MAX(id), 0) FROM job_events))
             ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, lease_expires_at = excluded.lease_expires_at,
                 cursor = CASE WHEN relays.owner = excluded.owner AND $3::bigint IS NOT NULL THEN GREATEST(relays.cursor, $3::bigint)
                               ELSE relays.cursor END
             WHERE relays.owner = excluded.owner OR relays.lease_expires_at < $4
             RETURNING cursor",
        )
        .bind(owner)
        .bind(now + millis(ttl))
        .bind(cursor)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(c,)| c))
    }

    /// Fails a queued job that used up its attempts (if it still is one); false when it is a
    /// saga, turned back instead and claimable again.
    async fn give_up(&self, id: &str, max_attempts: u32) -> Result<bool, DbError> {
        let mut tx = self.pool.begin().await?;
        let row: Option<(i64,)> =
            sqlx::query_as("SELECT attempt FROM jobs WHERE id = $1 AND state = 'queued' AND attempt >= $2 FOR UPDATE")
                .bind(id)
                .bind(i64::from(max_attempts))
                .fetch_optional(&mut *tx)
                .await?;
        let mut ended = true;
        if let Some((attempt,)) = row {
            let attempt = u32::try_from(attempt).unwrap_or(0);
            ended = Self::fail_exhausted(&mut tx, &self.clock, id, attempt).await?;
        }
        tx.commit().await?;
        Ok(ended)
    }

    /// Fails a job that used up its attempts (the caller holds its row lock) and answers true.
    /// A saga is not failed here: it may have written outputs, which only a claim can delete.
    /// It is turned back instead (its `compensating` event, the first time) and left queued,
    /// claimable whatever its attempts, and the answer is false.
    async fn fail_exhausted(conn: &mut PgConnection, clock: &Clock, id: &str, attempt: u32) -> Result<bool, DbError> {
        let now = now_ms();
        let error = gave_up(attempt);
        let failed = sqlx::query(
            "UPDATE jobs SET state = 'failed', error = $1, lease_owner = NULL, lease_expires_at = NULL, updated_at = $2
             WHERE id = $3 AND outputs = '[]'",
        )
        .bind(json(&error)?)
        .bind(now)
        .bind(id)
        .execute(&mut *conn)
        .await?;
        if failed.rows_affected() == 1 {
            let failed = Event::Failed { error };
            Self::append(conn, clock, id, attempt, now, &failed).await?;
            Self::settle_followers(conn, clock, id, &failed).await?;
            return Ok(true);
        }
        let error = saga_gave_up(attempt);
        let turned = sqlx::query("UPDATE jobs SET compensate = $1 WHERE id = $2 AND compensate IS NULL")
            .bind(json(&error)?)
            .bind(id)
            .execute(&mut *conn)
            .await?;
        sqlx::query(
            "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL, not_before = 0, updated_at = $1 WHERE id = $2",
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

    /// Gives jobs whose lease ran out back to the queue (or fails those that used up their
    /// attempts), each with its `lease_expired` event. Returns how many.
    async fn sweep(&self, max_attempts: u32) -> Result<u64, DbError> {
        let now = now_ms();
        self.last_sweep.store(now, Ordering::Relaxed);
        let expired: Option<(bool,)> = sqlx::query_as("SELECT true FROM jobs WHERE state = 'processing' AND lease_expires_at < $1 LIMIT 1")
            .bind(now)
            .fetch_optional(&self.pool)
            .await?;
        if expired.is_none() {
            return Ok(0);
        }
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(String, i64, Option<String>, i64)> = sqlx::query_as(
            "SELECT id, attempt, lease_owner, hlc FROM jobs WHERE state = 'processing' AND lease_expires_at < $1
             ORDER BY lease_expires_at LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(now)
        .bind(SWEEP_BATCH)
        .fetch_all(&mut *tx)
        .await?;
        for (id, attempt, previous, before) in &rows {
            // The lease this ends was another process's, most likely.
            self.clock.observe(Hlc::from_sql(*before), "job store");
            let attempt = u32::try_from(*attempt).unwrap_or(0);
            Self::append(&mut tx, &self.clock, id, attempt, now, &Event::LeaseExpired { owner: previous.clone() }).await?;
            // Failed, or (a saga) turned back and left queued for the claim that compensates.
            if attempt >= max_attempts {
                Self::fail_exhausted(&mut tx, &self.clock, id, attempt).await?;
            } else {
                sqlx::query(
                    "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires_at = NULL, not_before = 0, updated_at = $1 WHERE id = $2",
                )
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        if !rows.is_empty() {
            tracing::info!(jobs = rows.len(), "rescued jobs whose lease ran out");
            metrics::counter!(crate::instruments::LEASES_EXPIRED).increment(rows.len() as u64);
        }
        Ok(rows.len() as u64)
    }

    async fn succeed_jobs(&self, items: &[(String, u32, JobResult)]) -> Result<Vec<Result<(), StoreError>>, DbError> {
        let (mut ids, mut attempts, mut results, mut datas) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut version = 0;
        for (id, attempt, result) in items {
            let (_, v, data) = encode(&Event::Succeeded { result: Some(result.clone()), outputs: BTreeMap::new() })?;
            version = v;
            ids.push(id.clone());
            attempts.push(i64::from(*attempt));
            results.push(json(result)?);
            datas.push(data);
        }
        // One statement for the batch; each row is fenced on its own (its attempt, still
        // processing), and the ids that changed say which were.
        let (own, max) = stamp(&self.clock);
        let mut tx = self.pool.begin().await?;
        let changed: Vec<(String, i64)> = sqlx::query_as(&format!(
            "WITH input AS (SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[]) AS t (id, attempt, result, data)),
             changed AS (
                UPDATE jobs SET state = 'succeeded', result = input.result, lease_owner = NULL, lease_expires_at = NULL,
                                updated_at = $5, event_seq = jobs.event_seq + 1, hlc = {}
                FROM input WHERE jobs.id = input.id AND jobs.attempt = input.attempt AND jobs.state = 'processing'
                RETURNING jobs.id, jobs.event_seq, jobs.attempt, jobs.hlc, input.data),
             e AS (INSERT INTO job_events (job_id, seq, version, kind, attempt, at, hlc, data)
                   SELECT id, event_seq, $6, 'succeeded', attempt, $5, hlc, data FROM changed)
             SELECT id, attempt FROM changed",
            hlc_next("$7", "$8")
        ))
        .bind(&ids)
        .bind(&attempts)
        .bind(&results)
        .bind(&datas)
        .bind(now_ms())
        .bind(version)
        .bind(own)
        .bind(max)
        .fetch_all(&mut *tx)
        .await?;
        // The jobs that wait for these (the result cache) end with them.
        let ended: Vec<&String> = changed.iter().map(|(id, _)| id).collect();
        let leaders: Vec<(String,)> =
            sqlx::query_as("SELECT DISTINCT follows FROM jobs WHERE follows = ANY($1::text[]) AND state = 'queued'")
                .bind(&ended)
                .fetch_all(&mut *tx)
                .await?;
        for (leader,) in &leaders {
            if let Some((_, _, result)) =
                items.iter().find(|(id, attempt, _)| id == leader && changed.contains(&(id.clone(), i64::from(*attempt))))
            {
                let succeeded = Event::Succeeded { result: Some(result.clone()), outputs: BTreeMap::new() };
                Self::settle_followers(&mut tx, &self.clock, leader, &succeeded).await?;
            }
        }
        tx.commit().await?;
        // Each changed row answers one item: a result given twice in one batch is fenced the
        // second time, as it would have been given one after the other.
        let mut changed = changed;
        Ok(items
            .iter()
            .map(|(id, attempt, _)| match changed.iter().position(|(c, a)| c == id && *a == i64::from(*attempt)) {
                Some(i) => {
                    changed.swap_remove(i);
                    Ok(())
                }
                None => Err(StoreError::Fenced { id: id.clone(), attempt: *attempt }),
            })
            .collect())
    }

    async fn prune_jobs(&self, ended_before: i64, limit: u32) -> Result<u64, DbError> {
        // Events go with their job (ON DELETE CASCADE); views in the same statement.
        let done = sqlx::query(
            "WITH old AS (
                SELECT id FROM jobs WHERE state IN ('succeeded', 'failed') AND updated_at < $1
                ORDER BY updated_at LIMIT $2 FOR UPDATE SKIP LOCKED),
             views AS (DELETE FROM job_views USING old WHERE job_views.id = old.id),
             cache AS (DELETE FROM result_cache USING old WHERE result_cache.job_id = old.id)
             DELETE FROM jobs USING old WHERE jobs.id = old.id",
        )
        .bind(ended_before)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn probe_db(&self, who: &str, write: bool) -> Result<(), DbError> {
        if !write {
            sqlx::query("SELECT 1 FROM jobs LIMIT 1").fetch_optional(&self.pool).await?;
            return Ok(());
        }
        sqlx::query("INSERT INTO health (probe, at) VALUES ($1, $2) ON CONFLICT (probe) DO UPDATE SET at = excluded.at")
            .bind(who)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// The pick of a claim by id: the named jobs that are queued and due, locked in order.
///
/// `state || ''` keeps the planner off the partial index of queued jobs, whose predicate a
/// plain `state = 'queued'` matches: on a table it has no statistics for yet (a new database
/// taking its first backlog) it took that index for tiny and scanned all of it for the few
/// ids, a cost that grows with the backlog (0.9 ms at 10,000 queued jobs, against 0.06–0.17 ms
/// by the primary key). The ids alone pick a handful of rows by the primary key; the state is a
/// filter on those. The plan is asserted in the PostgreSQL tests.
const CLAIM_BY_ID: &str = "SELECT id, hlc FROM jobs WHERE id = ANY($8::text[]) AND state || '' = 'queued' AND not_before <= $1
                           ORDER BY created_at, id FOR UPDATE SKIP LOCKED";

/// The claim as one statement, around `next` (the ids and HLC times of the jobs to claim,
/// locked with SKIP LOCKED): claim them, write their `claimed` events, return the rows. A
/// picked job that is not claimed has used up its attempts; it comes back with `claimed`
/// false. (A saga that is turned back is claimed whatever its attempts: the claim deletes
/// what it wrote.) Binds: $1 now, $2 owner, $3 lease expiry, $4 max attempts, $5–$7 the event, $8
/// whatever `next` needs, $9 and $10 this process's HLC time and maximum offset.
fn claim_statement(next: &str) -> String {
    format!(
        "WITH next AS ({next}),
         c AS (
            UPDATE jobs SET state = 'processing', attempt = jobs.attempt + 1, lease_owner = $2, lease_expires_at = $3,
                            updated_at = $1, event_seq = jobs.event_seq + 1, hlc = {}
            FROM next WHERE jobs.id = next.id AND (jobs.attempt < $4 OR jobs.compensate IS NOT NULL)
            RETURNING jobs.*, next.hlc AS prev_hlc),
         e AS (INSERT INTO job_events (job_id, seq, version, kind, attempt, at, hlc, data)
               SELECT id, event_seq, $5, $6, attempt, $1, hlc, $7 FROM c)
         SELECT {}, c.prev_hlc, true AS claimed FROM c
         UNION ALL
         SELECT {}, j.hlc AS prev_hlc, false AS claimed FROM jobs j JOIN next ON j.id = next.id
         WHERE NOT EXISTS (SELECT 1 FROM c WHERE c.id = next.id)",
        hlc_next("$9", "$10"),
        *CLAIMED_COLUMNS,
        *PICKED_COLUMNS
    )
}

/// A new time of `clock` and its maximum offset, both as SQL binds them.
fn stamp(clock: &Clock) -> (i64, i64) {
    let own = clock.now();
    let max = Hlc::MIN.plus_ms(u64::try_from(clock.max_offset().as_millis()).unwrap_or(u64::MAX)).0;
    (own.to_sql(), i64::try_from(max).unwrap_or(i64::MAX))
}

enum Bind {
    Int(i64),
    Text(String),
}

#[async_trait]
impl Outbox for PostgresJobStore {
    async fn events_after(&self, after: i64, limit: u32) -> Result<Vec<OutboxEvent>, StoreError> {
        let rows: Result<Vec<OutboxRow>, DbError> = sqlx::query_as(&format!(
            "SELECT e.id, {}, j.traceparent FROM job_events e LEFT JOIN jobs j ON j.id = e.job_id WHERE e.id > $1 ORDER BY e.id LIMIT $2",
            event_columns("e")
        ))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(DbError::from);
        self.watch(rows)?.into_iter().map(OutboxRow::into_outbox).collect()
    }

    async fn owner_events_after(&self, owner: &str, after: i64, limit: u32) -> Result<Vec<OutboxEvent>, StoreError> {
        let columns = event_columns("e");
        let rows: Result<Vec<OutboxRow>, DbError> = sqlx::query_as(&format!(
            "SELECT e.id, {columns}, j.traceparent FROM job_events e JOIN jobs j ON j.id = e.job_id WHERE e.id > $1 AND j.owner = $2 ORDER BY e.id LIMIT $3"
        ))
        .bind(after)
        .bind(owner)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(DbError::from);
        self.watch(rows)?.into_iter().map(OutboxRow::into_outbox).collect()
    }

    async fn newest_event_id(&self) -> Result<i64, StoreError> {
        let row: Result<(i64,), DbError> =
            sqlx::query_as("SELECT COALESCE(MAX(id), 0)::bigint FROM job_events").fetch_one(&self.pool).await.map_err(DbError::from);
        Ok(self.watch(row)?.0)
    }

    async fn relay_lease(&self, owner: &str, ttl: Duration, cursor: Option<i64>) -> Result<Option<i64>, StoreError> {
        let result = self.take_relay_lease(owner, ttl, cursor).await;
        self.watch(result)
    }

    async fn rescue_expired(&self, max_attempts: u32) -> Result<u64, StoreError> {
        let result = self.sweep(max_attempts).await;
        self.watch(result)
    }

    async fn stale_claimable(&self, for_longer_than: Duration, limit: u32) -> Result<Vec<(String, u32)>, StoreError> {
        let since = now_ms() - millis(for_longer_than);
        let rows: Result<Vec<(String, i64)>, DbError> = sqlx::query_as(
            "SELECT id, attempt FROM jobs WHERE state = 'queued' AND not_before <= $1 AND updated_at <= $1
             ORDER BY created_at, id LIMIT $2",
        )
        .bind(since)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(DbError::from);
        Ok(self.watch(rows)?.into_iter().map(|(id, attempt)| (id, u32::try_from(attempt).unwrap_or(0))).collect())
    }

    async fn queue_stats(&self) -> Result<QueueStats, StoreError> {
        let (queued, oldest): (i64, Option<i64>) =
            sqlx::query_as("SELECT count(*), min(created_at) FROM jobs WHERE state = 'queued' AND not_before < $1")
                .bind(FOLLOWING)
                .fetch_one(&self.pool)
                .await
                .map_err(DbError::from)?;
        Ok(QueueStats { queued: u64::try_from(queued).unwrap_or(0), oldest_created_at: oldest })
    }
}

#[async_trait]
impl Views for PostgresJobStore {
    async fn view(&self, id: &str) -> Result<Option<StoredView>, StoreError> {
        let row: Result<Option<ViewRow>, DbError> = sqlx::query_as("SELECT owner, view FROM job_views WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(DbError::from);
        self.watch(row)?.map(ViewRow::into_view).transpose()
    }

    async fn views_of(&self, ids: &[String]) -> Result<Vec<StoredView>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Result<Vec<ViewRow>, DbError> = sqlx::query_as("SELECT owner, view FROM job_views WHERE id = ANY($1::text[])")
            .bind(ids)
            .fetch_all(&self.pool)
            .await
            .map_err(DbError::from);
        self.watch(rows)?.into_iter().map(ViewRow::into_view).collect()
    }

    async fn put_views(&self, views: &[StoredView], cursor: Option<i64>) -> Result<(), StoreError> {
        let (mut ids, mut owners, mut states, mut created, mut seqs, mut jsons) = (vec![], vec![], vec![], vec![], vec![], vec![]);
        for v in views {
            ids.push(v.view.id.clone());
            owners.push(v.owner.clone());
            states.push(v.view.state.as_str().to_string());
            created.push(v.view.created_at);
            seqs.push(i64::from(v.view.seq));
            jsons.push(json(&v.view)?);
        }
        // One statement: the views (each only over an older one) and the cursor (never back).
        let done = sqlx::query(
            "WITH v AS (
                INSERT INTO job_views (id, owner, state, created_at, seq, view)
                SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::text[])
                ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, state = excluded.state, created_at = excluded.created_at,
                    seq = excluded.seq, view = excluded.view
                WHERE excluded.seq > job_views.seq)
             INSERT INTO projections (name, cursor) SELECT 'status', $7::bigint WHERE $7::bigint IS NOT NULL
             ON CONFLICT (name) DO UPDATE SET cursor = GREATEST(projections.cursor, excluded.cursor)",
        )
        .bind(&ids)
        .bind(&owners)
        .bind(&states)
        .bind(&created)
        .bind(&seqs)
        .bind(&jsons)
        .bind(cursor)
        .execute(&self.pool)
        .await
        .map_err(DbError::from);
        self.watch(done).map(drop)
    }

    async fn list_views(
        &self,
        owner: &str,
        state: Option<JobState>,
        after: Option<&ViewsAfter>,
        limit: u32,
    ) -> Result<Vec<StoredView>, StoreError> {
        let filter = views_filter(state.is_some(), after.is_some(), true, 2);
        let n = 2 + usize::from(state.is_some()) + 3 * usize::from(after.is_some());
        let sql = format!("SELECT owner, view FROM job_views WHERE owner = $1{filter} ORDER BY created_at DESC, id DESC LIMIT ${n}");
        let mut query = sqlx::query_as::<_, ViewRow>(&sql).bind(owner);
        if let Some(state) = state {
            query = query.bind(state.as_str());
        }
        if let Some(after) = after {
            query = query.bind(after.created_at).bind(after.created_at).bind(&after.id);
        }
        let rows = query.bind(i64::from(limit)).fetch_all(&self.pool).await.map_err(DbError::from);
        self.watch(rows)?.into_iter().map(ViewRow::into_view).collect()
    }

    async fn projector_cursor(&self) -> Result<Option<i64>, StoreError> {
        let row: Result<Option<(i64,)>, DbError> =
            sqlx::query_as("SELECT cursor FROM projections WHERE name = 'status'").fetch_optional(&self.pool).await.map_err(DbError::from);
        Ok(self.watch(row)?.map(|(c,)| c))
    }

    async fn owners(&self, ids: &[String]) -> Result<Vec<(String, String)>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query_as("SELECT id, owner FROM jobs WHERE id = ANY($1::text[])")
            .bind(ids)
            .fetch_all(&self.pool)
            .await
            .map_err(DbError::from);
        self.watch(rows)
    }

    async fn jobs_after(&self, after: &str, limit: u32) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query_as("SELECT id, owner FROM jobs WHERE id > $1 ORDER BY id LIMIT $2")
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(DbError::from);
        self.watch(rows)
    }

    async fn clear_views(&self) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM job_views").execute(&self.pool).await.map_err(DbError::from);
        Ok(self.watch(done)?.rows_affected())
    }
}

#[async_trait]
impl JobStore for PostgresJobStore {
    async fn create(&self, job: NewJob) -> Result<Created, StoreError> {
        let result = self.create_job(job).await;
        self.watch(result)
    }

    async fn create_cached(&self, job: NewJob, cache: &CacheKey) -> Result<(Created, CacheOutcome), StoreError> {
        let result = self.create_cached_job(job, cache).await;
        self.watch(result)
    }

    async fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let result = async {
            let mut conn = self.pool.acquire().await?;
            Self::fetch_job(&mut conn, id).await
        }
        .await;
        self.watch(result)
    }

    async fn events(&self, id: &str) -> Result<Vec<JobEvent>, StoreError> {
        let rows: Result<Vec<EventRow>, DbError> =
            sqlx::query_as(&format!("SELECT {EVENT_COLUMNS} FROM job_events WHERE job_id = $1 ORDER BY seq"))
                .bind(id)
                .fetch_all(&self.pool)
                .await
                .map_err(DbError::from);
        self.watch(rows)?.into_iter().map(EventRow::into_event).collect()
    }

    async fn events_since(&self, id: &str, seq: u32) -> Result<Vec<JobEvent>, StoreError> {
        let rows: Result<Vec<EventRow>, DbError> =
            sqlx::query_as(&format!("SELECT {EVENT_COLUMNS} FROM job_events WHERE job_id = $1 AND seq > $2 ORDER BY seq"))
                .bind(id)
                .bind(i64::from(seq))
                .fetch_all(&self.pool)
                .await
                .map_err(DbError::from);
        self.watch(rows)?.into_iter().map(EventRow::into_event).collect()
    }

    async fn claim_many(&self, owner: &str, lease: Duration, max_attempts: u32, limit: u32) -> Result<Vec<Job>, StoreError> {
        let result = self.claim_jobs(owner, lease, max_attempts, limit).await;
        self.watch(result)
    }

    async fn claim_ids(&self, owner: &str, lease: Duration, max_attempts: u32, ids: &[String]) -> Result<Vec<ClaimById>, StoreError> {
        let result = self.claim_by_id(owner, lease, max_attempts, ids).await;
        self.watch(result)
    }

    async fn extend_lease(&self, id: &str, attempt: u32, lease: Duration) -> Result<(), StoreError> {
        let now = now_ms();
        let done =
            sqlx::query("UPDATE jobs SET lease_expires_at = $1, updated_at = $2 WHERE id = $3 AND attempt = $4 AND state = 'processing'")
                .bind(now + millis(lease))
                .bind(now)
                .bind(id)
                .bind(i64::from(attempt))
                .execute(&self.pool)
                .await
                .map_err(DbError::from);
        if self.watch(done)?.rows_affected() == 0 {
            return Err(StoreError::Fenced { id: id.to_string(), attempt });
        }
        Ok(())
    }

    async fn record_retry(&self, id: &str, attempt: u32, worker: &str, error: &JobError) -> Result<(), StoreError> {
        // Touch the row (no state change) so the event is fenced like every other transition.
        let event = Event::Retried { worker: worker.to_string(), error: error.clone() };
        let result = self.fenced(id, attempt, "state = state", None, event).await;
        self.watch(result)
    }

    async fn release(&self, id: &str, attempt: u32, reason: &JobError, delay: Duration) -> Result<(), StoreError> {
        let not_before = now_ms() + millis(delay);
        let set = "state = 'queued', lease_owner = NULL, lease_expires_at = NULL, not_before = $7";
        let result =
            self.fenced(id, attempt, set, Some(Bind::Int(not_before)), Event::Released { error: reason.clone(), not_before }).await;
        self.watch(result)
    }

    async fn succeed(&self, id: &str, attempt: u32, result: &JobResult) -> Result<(), StoreError> {
        let set = "state = 'succeeded', result = $7, lease_owner = NULL, lease_expires_at = NULL";
        let event = Event::Succeeded { result: Some(result.clone()), outputs: BTreeMap::new() };
        let done = self.fenced(id, attempt, set, Some(Bind::Text(json(result)?)), event).await;
        self.watch(done)
    }

    async fn succeed_many(&self, items: &[(String, u32, JobResult)]) -> Vec<Result<(), StoreError>> {
        let result = self.succeed_jobs(items).await;
        match self.watch(result) {
            Ok(each) => each,
            Err(e) => items.iter().map(|_| Err(e.replicate())).collect(),
        }
    }

    async fn fail(&self, id: &str, attempt: u32, error: &JobError) -> Result<(), StoreError> {
        let set = "state = 'failed', error = $7, lease_owner = NULL, lease_expires_at = NULL";
        let result = self.fenced(id, attempt, set, Some(Bind::Text(json(error)?)), Event::Failed { error: error.clone() }).await;
        self.watch(result)
    }

    async fn record_output(&self, id: &str, attempt: u32, output: &str, result: &JobResult) -> Result<(), StoreError> {
        let set = "steps = (steps::jsonb || $7::jsonb)::text";
        let event = Event::OutputSucceeded { output: output.to_string(), result: result.clone() };
        let done = self.fenced(id, attempt, set, Some(Bind::Text(step_patch(output, attempt, result)?)), event).await;
        self.watch(done)
    }

    async fn compensate(&self, id: &str, attempt: u32, output: Option<&str>, error: &JobError) -> Result<(), StoreError> {
        let set = "compensate = COALESCE(compensate, $7)";
        let event = Event::Compensating { output: output.map(str::to_string), error: error.clone() };
        let done = self.fenced(id, attempt, set, Some(Bind::Text(json(error)?)), event).await;
        self.watch(done)
    }

    async fn record_deleted(&self, id: &str, attempt: u32, output: &str, key: &str) -> Result<(), StoreError> {
        let set = "steps = (steps::jsonb - $7::text)::text";
        let event = Event::OutputDeleted { output: output.to_string(), key: key.to_string() };
        let done = self.fenced(id, attempt, set, Some(Bind::Text(output.to_string())), event).await;
        self.watch(done)
    }

    async fn succeed_outputs(&self, id: &str, attempt: u32, outputs: &BTreeMap<String, Step>) -> Result<(), StoreError> {
        let set = "state = 'succeeded', steps = $7, lease_owner = NULL, lease_expires_at = NULL";
        let results = outputs.iter().map(|(name, step)| (name.clone(), step.result.clone())).collect();
        let event = Event::Succeeded { result: None, outputs: results };
        let done = self.fenced(id, attempt, set, Some(Bind::Text(json(outputs)?)), event).await;
        self.watch(done)
    }

    async fn counts(&self) -> Result<Vec<(JobState, u64)>, StoreError> {
        let rows = sqlx::query_as("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetch_all(&self.pool).await.map_err(DbError::from);
        Ok(crate::rows::counts(self.watch(rows)?))
    }

    async fn prune(&self, ended_before: i64, limit: u32) -> Result<u64, StoreError> {
        let result = self.prune_jobs(ended_before, limit).await;
        self.watch(result)
    }

    async fn probe(&self, who: &str, write: bool) -> Result<(), StoreError> {
        let result = self.probe_db(who, write).await;
        self.watch(result)
    }
}
