//! What both SQL backends share: the columns they read, rows as plain values, and their
//! conversion to the model's types. The SQL itself differs per engine (transactions, locking,
//! placeholders), so each backend writes its own statements.

use pixmesh_model::{BlobRef, CacheOutcome, Event, EventKind, Hlc, Job, JobError, JobEvent, JobState, NewJob, StoreError};

/// The columns of `jobs` that make a [`Job`], in [`JobRow`]'s order.
pub(crate) const JOB_COLUMNS: &str = "id, owner, state, attempt, lease_owner, lease_expires_at, input_digest, input_size, input_format, options, outputs, steps, compensate, result, error, created_at, updated_at, traceparent";

/// The columns of `job_events` that make a [`JobEvent`].
pub(crate) const EVENT_COLUMNS: &str = "job_id, seq, version, kind, attempt, hlc, data";

/// [`EVENT_COLUMNS`] of the table aliased `alias`.
pub(crate) fn event_columns(alias: &str) -> String {
    EVENT_COLUMNS.split(", ").map(|c| format!("{alias}.{c}")).collect::<Vec<_>>().join(", ")
}

#[derive(sqlx::FromRow)]
pub(crate) struct JobRow {
    id: String,
    owner: String,
    state: String,
    attempt: i64,
    lease_owner: Option<String>,
    lease_expires_at: Option<i64>,
    input_digest: String,
    input_size: i64,
    input_format: String,
    options: String,
    outputs: String,
    steps: String,
    compensate: Option<String>,
    result: Option<String>,
    error: Option<String>,
    created_at: i64,
    updated_at: i64,
    traceparent: Option<String>,
}

impl JobRow {
    pub(crate) fn into_job(self) -> Result<Job, StoreError> {
        let id = self.id;
        let parse = |what: &str, e: serde_json::Error| StoreError::Invalid(format!("job {id}: {what}: {e}"));
        let state = JobState::parse(&self.state).ok_or_else(|| StoreError::Invalid(format!("unknown job state {:?}", self.state)))?;
        let options = serde_json::from_str(&self.options).map_err(|e| parse("options", e))?;
        let result = self.result.as_deref().map(serde_json::from_str).transpose().map_err(|e| parse("result", e))?;
        let error = self.error.as_deref().map(serde_json::from_str).transpose().map_err(|e| parse("error", e))?;
        let outputs = serde_json::from_str(&self.outputs).map_err(|e| parse("outputs", e))?;
        let steps = serde_json::from_str(&self.steps).map_err(|e| parse("steps", e))?;
        let compensate = self.compensate.as_deref().map(serde_json::from_str).transpose().map_err(|e| parse("compensate", e))?;
        Ok(Job {
            id,
            owner: self.owner,
            state,
            attempt: u32::try_from(self.attempt).unwrap_or(0),
            input: BlobRef::at_digest(self.input_digest, u64::try_from(self.input_size).unwrap_or(0)),
            input_format: self.input_format,
            options,
            outputs,
            steps,
            compensate,
            lease_owner: self.lease_owner,
            lease_expires_at: self.lease_expires_at,
            result,
            error,
            created_at: self.created_at,
            updated_at: self.updated_at,
            traceparent: self.traceparent,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct EventRow {
    job_id: String,
    seq: i64,
    version: i64,
    kind: String,
    attempt: i64,
    hlc: i64,
    data: String,
}

impl EventRow {
    pub(crate) fn into_event(self) -> Result<JobEvent, StoreError> {
        let event = Event::decode(&self.kind, self.version, &self.data)
            .map_err(|e| StoreError::Invalid(format!("job {} event {}: {e}", self.job_id, self.seq)))?;
        let hlc = Hlc::from_sql(self.hlc);
        Ok(JobEvent {
            job_id: self.job_id,
            seq: u32::try_from(self.seq).unwrap_or(0),
            attempt: u32::try_from(self.attempt).unwrap_or(0),
            // The `at` column holds the writer's wall clock; the event's time is its HLC time.
            at: hlc.unix_ms(),
            hlc,
            event,
        })
    }
}

/// An event row with its place in the log of all events (the outbox).
#[derive(sqlx::FromRow)]
pub(crate) struct OutboxRow {
    id: i64,
    #[sqlx(flatten)]
    event: EventRow,
    traceparent: Option<String>,
}

impl OutboxRow {
    pub(crate) fn into_outbox(self) -> Result<pixmesh_model::OutboxEvent, StoreError> {
        Ok(pixmesh_model::OutboxEvent { id: self.id, event: self.event.into_event()?, traceparent: self.traceparent })
    }
}

/// `not_before` of a job that waits for an identical one (the result cache): never due. The
/// store ends it, or releases it (then it is due at once), when that job ends.
pub(crate) const FOLLOWING: i64 = i64::MAX;

/// The reason a waiting job is released with when the job it waited for failed: that job's
/// code, and what happened.
pub(crate) fn leader_failed(leader: &str, error: &JobError) -> JobError {
    JobError {
        code: error.code.clone(),
        message: format!("job {leader}, an identical upload this one waited for, failed ({}); this one is made on its own", error.message),
    }
}

/// What a result-cache entry gives a new job, from the state of the job it names (`None`: no
/// entry): a hit when that job succeeded, a join while it is being made, else nothing.
pub(crate) fn cache_outcome(named: Option<(String, String)>) -> CacheOutcome {
    match named {
        Some((from, state)) if state == "succeeded" => CacheOutcome::Hit { from },
        Some((leader, state)) if state == "queued" || state == "processing" => CacheOutcome::Joined { leader },
        _ => CacheOutcome::Miss,
    }
}

/// Where a job created through the result cache starts: its state, its `not_before`, and the
/// job it follows (a join waits, never due, for its leader).
pub(crate) fn placement(outcome: &CacheOutcome) -> (&'static str, i64, Option<&str>) {
    match outcome {
        CacheOutcome::Hit { .. } => ("succeeded", 0, None),
        CacheOutcome::Joined { leader } => ("queued", FOLLOWING, Some(leader.as_str())),
        CacheOutcome::Miss | CacheOutcome::Replayed => ("queued", 0, None),
    }
}

/// A new job's first event.
pub(crate) fn accepted_event(job: &NewJob) -> Event {
    Event::Accepted {
        input: job.input.clone(),
        input_format: job.input_format.clone(),
        options: job.options.clone(),
        outputs: job.outputs.clone(),
    }
}

/// The `succeeded` event of a job that takes the result of `source` (the result cache): its one
/// result, or its outputs.
pub(crate) fn reused(source: &Job) -> Event {
    let outputs = source.steps.iter().map(|(name, step)| (name.clone(), step.result.clone())).collect();
    Event::Succeeded { result: source.result.clone(), outputs }
}

/// What a claim by id answers for a job it did not claim, from the job's row as read after
/// the claim (`None`: no such job). A queued job that is due but was not claimed was locked by
/// a concurrent claim or commit: asked again shortly, it answers held or ended.
pub(crate) fn unclaimed(id: &str, row: Option<(String, i64, Option<i64>)>, now: i64) -> pixmesh_model::ClaimById {
    use pixmesh_model::ClaimById;
    let id = id.to_string();
    match row {
        None => ClaimById::Ended { id },
        Some((state, not_before, lease_expires_at)) => match state.as_str() {
            // Waiting for an identical job (the result cache): that one's end releases it, with
            // a `released` event that wakes a distributor again.
            "queued" if not_before == FOLLOWING => ClaimById::Held { id },
            "queued" => ClaimById::NotDue { id, in_ms: u64::try_from(not_before - now).unwrap_or(0).max(50) },
            // An expired lease is rescued (and the job woken again) by the sweeper.
            "processing" => match lease_expires_at {
                Some(at) if at < now => ClaimById::NotDue { id, in_ms: 250 },
                _ => ClaimById::Held { id },
            },
            _ => ClaimById::Ended { id },
        },
    }
}

/// An event in its stored form: kind, version, data.
pub(crate) fn encode(event: &Event) -> Result<(EventKind, i64, String), StoreError> {
    let (kind, data) = event.encode().map_err(StoreError::Invalid)?;
    Ok((kind, i64::from(pixmesh_model::EVENT_VERSION), data))
}

pub(crate) fn json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Invalid(e.to_string()))
}

pub(crate) fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The error a job fails with when it was claimed `attempts` times without finishing.
pub(crate) fn gave_up(attempts: u32) -> JobError {
    JobError { code: "unavailable".into(), message: format!("gave up after {attempts} attempts; no worker could process the image") }
}

/// The error a saga fails with when it used up its attempts: it is claimed once more to
/// delete what it wrote (see [`pixmesh_model::JobStore::compensate`]), then fails with this.
pub(crate) fn saga_gave_up(attempts: u32) -> JobError {
    JobError {
        code: "unavailable".into(),
        message: format!("gave up after {attempts} attempts; not every output could be made, so none is kept"),
    }
}

/// The patch that adds output `name` (written by `attempt`) to a job's `steps`.
pub(crate) fn step_patch(name: &str, attempt: u32, result: &pixmesh_model::JobResult) -> Result<String, StoreError> {
    let step = pixmesh_model::Step { attempt, result: result.clone() };
    json(&serde_json::json!({ name: step }))
}

/// Counts per state from `(state, count)` rows, skipping states this build does not know.
pub(crate) fn counts(rows: Vec<(String, i64)>) -> Vec<(JobState, u64)> {
    rows.into_iter().filter_map(|(state, n)| Some((JobState::parse(&state)?, u64::try_from(n).unwrap_or(0)))).collect()
}

/// A row of `job_views`: its owner and the view's JSON.
#[derive(sqlx::FromRow)]
pub(crate) struct ViewRow {
    owner: String,
    view: String,
}

impl ViewRow {
    pub(crate) fn into_view(self) -> Result<pixmesh_model::StoredView, StoreError> {
        let view = serde_json::from_str(&self.view).map_err(|e| StoreError::Invalid(format!("job_views: view: {e}")))?;
        Ok(pixmesh_model::StoredView { owner: self.owner, view })
    }
}

/// The listing's filter after `owner` (bound first): `state`, then the place to go on from,
/// with `$n`-style placeholders from `next` when `numbered` (PostgreSQL), else `?`.
pub(crate) fn views_filter(state: bool, after: bool, numbered: bool, mut next: usize) -> String {
    let mut p = || {
        next += 1;
        if numbered { format!("${}", next - 1) } else { "?".to_string() }
    };
    let mut sql = String::new();
    if state {
        sql.push_str(&format!(" AND state = {}", p()));
    }
    if after {
        let (a, b, c) = (p(), p(), p());
        sql.push_str(&format!(" AND (created_at < {a} OR (created_at = {b} AND id < {c}))"));
    }
    sql
}
