use crate::DistributorConfig;
use crate::budget::{RetryBudget, remaining};
use crate::lease::{self, Lost};
use crate::workers::{WorkerEndpoint, WorkerSet};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use pixmesh_chassis::error::Retry;
use pixmesh_chassis::{ApiError, ErrorCode, Shutdown};
use pixmesh_proto::v1::ProcessRequest;
use pixmesh_queue::Queue;
use pixmesh_queue::wake::{Delivery, Wakeups};
use pixmesh_store::ClaimById;
use pixmesh_store::{Job, JobError, JobResult, Options, Output, Step, StoreError, StoreKind, Stores, output_key};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument as _;

/// How long a try waits for a worker with a free slot before giving up on this claim.
const WAIT_FOR_WORKER: Duration = Duration::from_secs(3);

/// How long one pull request for wake-ups waits for the first of them.
const TAKE_WAIT: Duration = Duration::from_millis(500);

/// Without wake-ups for this long, the distributor checks that its consumer still exists.
const CHECK_CONSUMER_AFTER: Duration = Duration::from_secs(2);

/// The longest wait between claims while the job store fails. The wait doubles from twice the
/// poll interval up to this: a broken store is not hammered, and one that works again is
/// claimed from within this long, by itself.
const MAX_CLAIM_BACKOFF: Duration = Duration::from_secs(2);

/// The wait after `failures` claims in a row failed (at least 1).
fn claim_backoff(poll: Duration, failures: u32) -> Duration {
    poll.saturating_mul(1 << failures.clamp(1, 16)).min(MAX_CLAIM_BACKOFF)
}

#[derive(Clone)]
pub struct Dispatcher {
    config: DistributorConfig,
    stores: Stores,
    workers: WorkerSet,
    owner: Arc<str>,
    budget: Arc<RetryBudget>,
}

fn job_error(e: &ApiError) -> JobError {
    JobError { code: e.code.as_str().to_string(), message: e.message.clone() }
}

impl Dispatcher {
    pub fn new(config: DistributorConfig, stores: Stores, workers: WorkerSet, owner: String) -> Dispatcher {
        let slots = crate::discovery::Slots::of(&stores);
        let config = DistributorConfig { concurrency: config.effective_concurrency(slots), ..config };
        let budget = RetryBudget::with_metric(
            config.retry_budget_percent,
            config.retry_budget_per_second,
            <crate::GrpcWorkers as pixmesh_balance::Transport>::METRICS.retries_refused,
        );
        Dispatcher { config, stores, workers, owner: owner.into(), budget: Arc::new(budget) }
    }

    /// Claims and dispatches jobs until `shutdown`; then waits (within the grace period) for the
    /// jobs in flight. A job still unfinished after that keeps its lease until it expires and is
    /// claimed again: nothing is lost.
    pub async fn run(&self, shutdown: Shutdown) {
        let slots = Arc::new(Semaphore::new(self.config.concurrency));
        let poll = Duration::from_millis(self.config.poll_interval_ms);
        let lease = Duration::from_millis(self.config.lease_ms);
        let mut tasks = JoinSet::new();
        // Claims that failed in a row (the job store is full, read-only, locked, …).
        let mut failures: u32 = 0;
        loop {
            while tasks.try_join_next().is_some() {}
            let mut permits = match self.places(&slots, poll, &shutdown).await {
                Places::Taken(permits) => permits,
                Places::Again => continue,
                Places::Stop => break,
            };
            // Taken before the store sets the lease: the lease's conservative start.
            let claimed_at = Instant::now();
            let limit = u32::try_from(permits.len()).unwrap_or(1);
            let claimed = self.stores.jobs.claim_many(&self.owner, lease, self.config.max_attempts, limit).await;
            if claimed.is_ok() && failures > 0 {
                tracing::info!(failures, "claims work again");
                failures = 0;
            }
            match claimed {
                Ok(jobs) if !jobs.is_empty() => {
                    metrics::counter!(crate::instruments::CLAIMS).increment(jobs.len() as u64);
                    // Unused places go back at once (fewer jobs were claimable).
                    permits.truncate(jobs.len());
                    for (job, permit) in jobs.into_iter().zip(permits) {
                        let this = self.clone();
                        tasks.spawn(async move {
                            this.handle(job, claimed_at, None).await;
                            drop(permit);
                        });
                    }
                }
                Ok(_) => {
                    drop(permits);
                    tokio::select! {
                        _ = tokio::time::sleep(poll) => {}
                        _ = shutdown.wait() => break,
                    }
                }
                Err(e) => {
                    // Back off and try again, for as long as it takes: the store comes back by
                    // itself (space freed, file writable again), and so do the claims.
                    drop(permits);
                    failures = failures.saturating_add(1);
                    let wait = claim_backoff(poll, failures);
                    metrics::counter!(crate::instruments::CLAIM_ERRORS).increment(1);
                    if failures == 1 {
                        tracing::error!(error = %e, retry_in_ms = wait.as_millis() as u64, "claim failed; retrying with backoff");
                    } else {
                        tracing::debug!(error = %e, failures, retry_in_ms = wait.as_millis() as u64, "claim failed again");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.wait() => break,
                    }
                }
            }
        }
        self.drain(tasks).await;
    }

    /// Waits for a free place here and a free worker slot, then takes as many places as there
    /// are free places and worker slots (up to `claim_batch`): one claim transaction, one commit,
    /// for all of them.
    async fn places(&self, slots: &Arc<Semaphore>, poll: Duration, shutdown: &Shutdown) -> Places {
        let permit = tokio::select! {
            p = Arc::clone(slots).acquire_owned() => match p { Ok(p) => p, Err(_) => return Places::Stop },
            _ = shutdown.wait() => return Places::Stop,
        };
        if !self.workers.has_free_slot() {
            drop(permit);
            return tokio::select! {
                _ = self.workers.wait_for_free_slot(poll) => Places::Again,
                _ = shutdown.wait() => Places::Stop,
            };
        }
        let mut permits = vec![permit];
        let room = self.workers.free_slots().min(self.config.claim_batch as usize);
        while permits.len() < room {
            match Arc::clone(slots).try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        Places::Taken(permits)
    }

    /// Claims and dispatches the jobs that wake-ups from the broker name, until `shutdown`;
    /// then drains as [`Dispatcher::run`] does. A wake-up is acked once its job is handled (or
    /// found held by another claim, or ended), delivered again later when its job is not due
    /// yet, and goes to the dead-letter stream when it cannot be read.
    pub async fn run_woken(&self, queue: Queue, shutdown: Shutdown) {
        let slots = Arc::new(Semaphore::new(self.config.concurrency));
        let poll = Duration::from_millis(self.config.poll_interval_ms);
        let mut tasks = JoinSet::new();
        let mut wakeups: Option<Wakeups> = None;
        let mut failures: u32 = 0;
        let mut idle_since = Instant::now();
        'taking: loop {
            while tasks.try_join_next().is_some() {}
            let mut permits = match self.places(&slots, poll, &shutdown).await {
                Places::Taken(permits) => permits,
                Places::Again => continue,
                Places::Stop => break,
            };
            if wakeups.is_none() {
                match Wakeups::open(&queue).await {
                    Ok(w) => wakeups = Some(w),
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        if failures == 1 {
                            tracing::error!(error = %e, "cannot open the wake-up consumer; retrying with backoff");
                        }
                        // A server whose store was wiped has lost its streams: make them again.
                        let _ = queue.ensure_streams().await;
                        drop(permits);
                        tokio::select! {
                            _ = tokio::time::sleep(claim_backoff(poll, failures)) => continue,
                            _ = shutdown.wait() => break,
                        }
                    }
                }
            }
            let Some(consumer) = wakeups.as_mut() else { continue };
            // Pull requests to a consumer the server lost bring nothing and fail nothing: it
            // is looked for after a while without wake-ups, and made again when gone.
            if idle_since.elapsed() >= CHECK_CONSUMER_AFTER {
                idle_since = Instant::now();
                if !consumer.exists().await {
                    tracing::warn!("the wake-up consumer is gone (the broker lost its state); making it again");
                    let _ = queue.ensure_streams().await;
                    wakeups = None;
                    continue;
                }
            }
            let mut batch = match consumer.take(permits.len(), TAKE_WAIT).await {
                Ok(batch) => batch,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %e, "cannot take wake-ups; opening the consumer again");
                    wakeups = None;
                    drop(permits);
                    tokio::select! {
                        _ = tokio::time::sleep(claim_backoff(poll, failures)) => continue,
                        _ = shutdown.wait() => break,
                    }
                }
            };
            if failures > 0 {
                tracing::info!(failures, "wake-ups flow again");
                failures = 0;
            }
            // Claim what has arrived together, as it arrives, until the pull request is over.
            loop {
                let first = tokio::select! {
                    d = batch.next() => d,
                    _ = shutdown.wait() => {
                        // Whatever this pull still brings goes back to the stream at once.
                        while let Some(d) = batch.next().await {
                            if let Ok(d) = d { d.later(Duration::ZERO).await }
                        }
                        break 'taking;
                    }
                };
                let Some(first) = first else { break };
                idle_since = Instant::now();
                let mut group = vec![first];
                while let Some(d) = batch.ready() {
                    group.push(d);
                }
                if let Err(e) = self.claim_woken(group, &mut permits, &mut tasks).await {
                    metrics::counter!(crate::instruments::CLAIM_ERRORS).increment(1);
                    tracing::error!(error = %e, "claim failed; the wake-ups come again");
                    tokio::select! {
                        _ = tokio::time::sleep(claim_backoff(poll, 1)) => {}
                        _ = shutdown.wait() => break 'taking,
                    }
                }
            }
        }
        self.drain(tasks).await;
    }

    /// Claims the jobs of a group of wake-ups in one transaction and starts the claimed ones.
    async fn claim_woken(
        &self,
        group: Vec<Result<Delivery, pixmesh_queue::QueueError>>,
        permits: &mut Vec<OwnedSemaphorePermit>,
        tasks: &mut JoinSet<()>,
    ) -> Result<(), StoreError> {
        let mut by_job: Vec<(String, Delivery)> = Vec::with_capacity(group.len());
        for delivery in group {
            let delivery = match delivery {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "a wake-up could not be received");
                    continue;
                }
            };
            match &delivery.wake {
                Err(why) => {
                    let why = why.clone();
                    delivery.dead(&why).await;
                }
                // A second wake-up for a job already in this group: the first one decides.
                Ok(wake) if by_job.iter().any(|(id, _)| id == &wake.job) => delivery.done().await,
                Ok(wake) => by_job.push((wake.job.clone(), delivery)),
            }
        }
        if by_job.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = by_job.iter().map(|(id, _)| id.clone()).collect();
        let claimed_at = Instant::now();
        let lease = Duration::from_millis(self.config.lease_ms);
        let answers = match self.stores.jobs.claim_ids(&self.owner, lease, self.config.max_attempts, &ids).await {
            Ok(answers) => answers,
            Err(e) => {
                let again = claim_backoff(Duration::from_millis(self.config.poll_interval_ms), 1);
                for (_, delivery) in by_job {
                    delivery.later(again).await;
                }
                return Err(e);
            }
        };
        metrics::counter!(crate::instruments::CLAIMS)
            .increment(answers.iter().filter(|a| matches!(a, ClaimById::Claimed(_))).count() as u64);
        for answer in answers {
            let Some(at) = by_job.iter().position(|(id, _)| id == answer.id()) else { continue };
            let (_, delivery) = by_job.swap_remove(at);
            match answer {
                ClaimById::Claimed(job) => {
                    let permit = permits.pop();
                    let this = self.clone();
                    let woken_in = delivery.traceparent().map(str::to_string);
                    tasks.spawn(async move {
                        delivery.hold(this.handle(*job, claimed_at, woken_in)).await;
                        delivery.done().await;
                        drop(permit);
                    });
                }
                ClaimById::NotDue { in_ms, .. } => delivery.later(Duration::from_millis(in_ms)).await,
                ClaimById::Held { .. } | ClaimById::Ended { .. } => delivery.done().await,
            }
        }
        for (_, delivery) in by_job {
            delivery.done().await;
        }
        Ok(())
    }

    /// Waits (within the grace period) for the jobs in flight. A job still unfinished after
    /// that keeps its lease until it expires and is claimed again: nothing is lost.
    async fn drain(&self, mut tasks: JoinSet<()>) {
        tracing::info!(in_flight = tasks.len(), "distributor draining");
        let grace = Duration::from_millis(self.config.drain_grace_ms);
        let drained =
            pixmesh_chassis::shutdown::drain_within("distributor jobs", grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_none() {
            tasks.abort_all();
        }
    }

    /// Runs one claimed job to a terminal state or back to the queue, its lease renewed in the
    /// background meanwhile. When the claim is lost (the lease was taken over, or could not be
    /// renewed) its work stops at once, worker call included, and nothing more is written.
    ///
    /// Its span (`claim`) continues the trace of the wake-up that led to it (`woken_in`, its
    /// `traceparent`), or else the job's own: every worker call, blob write and commit of the
    /// claim is a span inside it.
    async fn handle(&self, job: Job, claimed_at: Instant, woken_in: Option<String>) {
        // WARN, as every hop's root span: a log filter at `warn` still sees it.
        let span = tracing::warn_span!(
            "claim",
            otel.name = "claim job",
            otel.kind = "consumer",
            job.id = %job.id,
            job.attempt = job.attempt,
            job.outcome = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        pixmesh_chassis::trace::continue_from(&span, woken_in.as_deref().or(job.traceparent.as_deref()));
        self.handle_in_span(job, claimed_at).instrument(span).await
    }

    async fn handle_in_span(&self, job: Job, claimed_at: Instant) {
        let started = Instant::now();
        let terms = lease::Terms {
            lease: Duration::from_millis(self.config.lease_ms),
            renew: Duration::from_millis(self.config.lease_renew_ms),
            max_claim: Duration::from_millis(self.config.max_claim_ms),
        };
        let outcome = tokio::select! {
            // A lost claim wins over work that happens to be ready in the same poll.
            biased;
            lost = lease::keep(self.stores.jobs.as_ref(), &job.id, job.attempt, claimed_at, terms) => self.lost(&job, lost).await,
            outcome = self.try_workers(&job) => outcome,
        };
        let elapsed = started.elapsed().as_secs_f64();
        let label = match &outcome {
            Ok(Outcome::Succeeded) => "succeeded",
            Ok(Outcome::Failed) => "failed",
            Ok(Outcome::Released) => "released",
            Ok(Outcome::LeaseLost) => "lease_lost",
            Ok(Outcome::GaveUp) => "claim_timeout",
            Err(StoreError::Fenced { .. }) => "fenced",
            Err(_) => "store_error",
        };
        tracing::Span::current().record("job.outcome", label);
        metrics::counter!(crate::instruments::JOBS, "outcome" => label).increment(1);
        metrics::histogram!(crate::instruments::JOB_DURATION).record(elapsed);
        match outcome {
            Ok(_) => {}
            Err(StoreError::Fenced { id, attempt }) => {
                tracing::warn!(job = %id, attempt, "work dropped: this attempt no longer holds the job");
            }
            Err(e) => {
                tracing::error!(job = %job.id, attempt = job.attempt, error = %e, "job store error; the lease will expire and the job will be claimed again")
            }
        }
    }

    /// What is left to do once the claim is lost (its work has been dropped).
    async fn lost(&self, job: &Job, lost: Lost) -> Result<Outcome, StoreError> {
        match lost {
            Lost::Fenced => Err(StoreError::Fenced { id: job.id.clone(), attempt: job.attempt }),
            // Nothing can be written without the store; the job is claimed again once its
            // lease has run out in the store too.
            Lost::Expired => Ok(Outcome::LeaseLost),
            Lost::MaxClaim => {
                let error = ApiError::new(
                    ErrorCode::Timeout,
                    format!("the claim was held for distributor.max_claim_ms ({} ms) without an end", self.config.max_claim_ms),
                );
                tracing::warn!(job = %job.id, attempt = job.attempt, "claim held too long; the job goes back to the queue");
                let delay = Duration::from_millis(self.config.retry_delay_ms);
                self.stores.jobs.release(&job.id, job.attempt, &job_error(&error), delay).instrument(commit_span("released")).await?;
                Ok(Outcome::GaveUp)
            }
        }
    }

    async fn try_workers(&self, job: &Job) -> Result<Outcome, StoreError> {
        if job.is_saga() {
            return self.run_saga(job).await;
        }
        let jobs = &self.stores.jobs;
        let Some(input) = self.input(job).await? else {
            jobs.fail(&job.id, job.attempt, &missing_input()).instrument(commit_span("failed")).await?;
            return Ok(Outcome::Failed);
        };
        match self.make(job, &job.options, None, &input).await? {
            Made::Done(result) => {
                jobs.succeed(&job.id, job.attempt, &result).instrument(commit_span("succeeded")).await?;
                tracing::info!(job = %job.id, attempt = job.attempt, width = result.width, height = result.height, "job succeeded");
                Ok(Outcome::Succeeded)
            }
            Made::Failed(error) => {
                jobs.fail(&job.id, job.attempt, &job_error(&error)).instrument(commit_span("failed")).await?;
                tracing::info!(job = %job.id, attempt = job.attempt, code = %error.code, reason = %error.message, "job failed");
                Ok(Outcome::Failed)
            }
            Made::NotNow(error) => {
                let delay = Duration::from_millis(self.config.retry_delay_ms);
                jobs.release(&job.id, job.attempt, &job_error(&error), delay).instrument(commit_span("released")).await?;
                Ok(Outcome::Released)
            }
        }
    }

    /// The input's bytes for the calls of this claim: read here once for all its tries, or
    /// (with presigned URLs, S3) none, the bytes going between the worker and the blob store.
    /// `None` when the uploaded image is missing.
    async fn input(&self, job: &Job) -> Result<Option<Bytes>, StoreError> {
        if self.stores.blobs.presign().is_some() {
            return Ok(Some(Bytes::new()));
        }
        self.stores.blobs.get(&job.input.digest).await
    }

    /// Runs a saga: a job with several named outputs, each a step. The steps still missing run
    /// side by side, each with its own worker tries, and each is recorded as it ends well
    /// (`output_succeeded`), so a later claim makes only what is still missing. Then:
    /// - every output made: the pivot, one transaction that marks them all succeeded
    ///   (after deleting what earlier attempts left unrecorded);
    /// - an output failed for good: the saga turns back ([`Dispatcher::compensate`]);
    /// - else (no worker could make one now): back to the queue, what was made kept.
    ///
    /// A claim of a saga that was turned back (by a step, or by the store when it used up its
    /// attempts) only compensates.
    async fn run_saga(&self, job: &Job) -> Result<Outcome, StoreError> {
        let jobs = &self.stores.jobs;
        if let Some(error) = &job.compensate {
            return self.compensate(job, error).await;
        }
        let Some(input) = self.input(job).await? else {
            let error = missing_input();
            jobs.compensate(&job.id, job.attempt, None, &error).await?;
            return self.compensate(job, &error).await;
        };
        let mut steps: FuturesUnordered<_> = job
            .outputs
            .iter()
            .filter(|output| !job.steps.contains_key(&output.name))
            .map(|output| self.step(job, output, &input))
            .collect();
        // Every step is waited for, even after one failed for good: a step cut off in the
        // middle of storing its output could write it after the compensation deleted it.
        let mut failed: Option<(String, ApiError)> = None;
        let mut not_now: Option<ApiError> = None;
        let mut store_error: Option<StoreError> = None;
        while let Some((name, made)) = steps.next().await {
            match made {
                Ok(Made::Done(_)) => {}
                Ok(Made::Failed(error)) => {
                    failed.get_or_insert((name, error));
                }
                Ok(Made::NotNow(error)) => {
                    not_now.get_or_insert(error);
                }
                Err(e) => {
                    store_error.get_or_insert(e);
                }
            }
        }
        drop(steps);
        if let Some((output, error)) = failed {
            tracing::info!(job = %job.id, attempt = job.attempt, output, code = %error.code, reason = %error.message, "a saga step failed for good; deleting the outputs made");
            let error = job_error(&error);
            jobs.compensate(&job.id, job.attempt, Some(&output), &error).await?;
            return self.compensate(job, &error).await;
        }
        if let Some(e) = store_error {
            return Err(e);
        }
        if let Some(error) = not_now {
            let delay = Duration::from_millis(self.config.retry_delay_ms);
            jobs.release(&job.id, job.attempt, &job_error(&error), delay).await?;
            return Ok(Outcome::Released);
        }
        // The pivot, with the steps as recorded (some by earlier claims).
        let now = jobs.get(&job.id).await?.ok_or_else(|| StoreError::NotFound(job.id.clone()))?;
        if now.attempt != job.attempt || now.state.is_terminal() {
            return Err(StoreError::Fenced { id: job.id.clone(), attempt: job.attempt });
        }
        if let Some(missing) = job.outputs.iter().find(|o| !now.steps.contains_key(&o.name)) {
            return Err(StoreError::Invalid(format!("saga {}: output {} has no recorded step after it was made", job.id, missing.name)));
        }
        self.delete_unrecorded(job, &now.steps).await?;
        jobs.succeed_outputs(&job.id, job.attempt, &now.steps).instrument(commit_span("succeeded")).await?;
        tracing::info!(job = %job.id, attempt = job.attempt, outputs = job.outputs.len(), "saga succeeded: every output made");
        Ok(Outcome::Succeeded)
    }

    /// One step of a saga: makes `output` at its key for this attempt and records it. A
    /// record fenced off (the claim was lost) deletes what this step wrote: nobody else will.
    async fn step(&self, job: &Job, output: &Output, input: &Bytes) -> (String, Result<Made, StoreError>) {
        let key = output_key(&job.id, &output.name, job.attempt);
        let made = match self.make(job, &output.options, Some((&output.name, &key)), input).await {
            Ok(Made::Done(result)) => match self.stores.jobs.record_output(&job.id, job.attempt, &output.name, &result).await {
                Ok(()) => Ok(Made::Done(result)),
                Err(e) => {
                    if matches!(e, StoreError::Fenced { .. })
                        && let Err(deleted) = self.stores.blobs.delete(&key).await
                    {
                        tracing::warn!(job = %job.id, key, error = %deleted, "the output of a fenced step was not deleted");
                    }
                    Err(e)
                }
            },
            other => other,
        };
        (output.name.clone(), made)
    }

    /// Turns a saga back: deletes every output it wrote (each recorded one with its
    /// `output_deleted` event; keys of earlier attempts that crashed before recording theirs
    /// too), then fails the job with `error`, the reason it turned back. Each deletion is
    /// idempotent: a compensation cut short is done again, whole, by the next claim (the job
    /// stays turned back). A blob store that fails sends the job back to the queue for that.
    async fn compensate(&self, job: &Job, error: &JobError) -> Result<Outcome, StoreError> {
        let jobs = &self.stores.jobs;
        let now = jobs.get(&job.id).await?.ok_or_else(|| StoreError::NotFound(job.id.clone()))?;
        let deleted = async {
            for output in &job.outputs {
                let recorded = now.steps.get(&output.name);
                for attempt in 1..=job.attempt {
                    let key = output_key(&job.id, &output.name, attempt);
                    self.stores.blobs.delete(&key).await?;
                    if recorded.is_some_and(|step| step.attempt == attempt) {
                        jobs.record_deleted(&job.id, job.attempt, &output.name, &key).await?;
                    }
                }
            }
            Ok::<_, StoreError>(())
        };
        match deleted.await {
            Ok(()) => {}
            Err(e @ StoreError::Fenced { .. }) => return Err(e),
            Err(e) if e.failed_store() == Some(StoreKind::Blobs) => {
                tracing::warn!(job = %job.id, attempt = job.attempt, error = %e, "a compensation could not delete an output; the job goes back to the queue to finish it");
                let delay = Duration::from_millis(self.config.retry_delay_ms);
                let why = JobError { code: ErrorCode::Unavailable.as_str().into(), message: format!("compensation interrupted: {e}") };
                jobs.release(&job.id, job.attempt, &why, delay).instrument(commit_span("released")).await?;
                return Ok(Outcome::Released);
            }
            Err(e) => return Err(e),
        }
        jobs.fail(&job.id, job.attempt, error).instrument(commit_span("failed")).await?;
        tracing::info!(job = %job.id, attempt = job.attempt, code = %error.code, reason = %error.message, "saga compensated and failed");
        Ok(Outcome::Failed)
    }

    /// Before the pivot: deletes the keys of each output that other attempts may have written
    /// without recording them (a claim that crashed between the write and the record).
    async fn delete_unrecorded(&self, job: &Job, steps: &BTreeMap<String, Step>) -> Result<(), StoreError> {
        for (name, step) in steps {
            for attempt in (1..=job.attempt).filter(|a| *a != step.attempt) {
                self.stores.blobs.delete(&output_key(&job.id, name, attempt)).await?;
            }
        }
        Ok(())
    }

    /// Calls workers for one output of this claim (`options`), retrying elsewhere within the
    /// claim's tries and the retry budget, and stores what the worker made: at its content
    /// address, or (a saga's step: `step` is its output's name and key) at that key.
    async fn make(&self, job: &Job, options: &Options, step: Option<(&str, &str)>, input: &Bytes) -> Result<Made, StoreError> {
        let jobs = &self.stores.jobs;
        let presign = self.stores.blobs.presign();
        let output = step.map(|(name, _)| name).unwrap_or("");
        let key = step.map(|(_, key)| key);
        let mut calls = 0u32;
        let mut tried: Vec<String> = Vec::new();
        let mut last_error = ApiError::new(ErrorCode::Unavailable, "no image worker is available");
        // A failure the table allows one more try for (`Retry::Once`: `internal`, e.g. a
        // worker that panicked on this input). Once set, the next try is the last: if it
        // reaches the image and does not succeed, or cannot be made, the output fails with
        // this error instead of going back to the queue, so an input that crashes workers
        // costs at most two calls in a claim. Only a last try that never reached the image
        // (refused, or `unavailable`) sends the job back to the queue.
        let mut final_try: Option<ApiError> = None;
        // One deadline for the whole claim: each call gets what the earlier ones left of it.
        let started = tokio::time::Instant::now();
        let mut tries = 0;
        // The last call was abandoned because its worker left the set and stopped answering:
        // the next one goes elsewhere outside `tries_per_claim` and the retry budget. The
        // budget keeps retries from multiplying the load on failing workers; this call put no
        // load on a live one, and there are at most as many such calls as workers that vanish
        // during the claim (each is excluded after), all within the claim's deadline.
        let mut redispatch = false;
        loop {
            if !redispatch {
                if tries == self.config.tries_per_claim {
                    break;
                }
                if tries == 0 {
                    self.budget.deposit();
                } else if !self.budget.withdraw() {
                    tracing::info!(job = %job.id, output, "retry budget spent; the job goes back to the queue");
                    break;
                }
                tries += 1;
            }
            redispatch = false;
            let Some(slot) = self.workers.acquire_within(&tried, WAIT_FOR_WORKER).await else { break };
            let Some(timeout) = remaining(self.workers.call_timeout(), started) else { break };
            let endpoint = Arc::clone(slot.endpoint());
            let client = endpoint.client().grpc;
            calls += 1;
            // One staging object per call: a late answer of an abandoned call cannot touch it.
            let call = match step {
                Some((name, _)) => format!("{}-{}-{name}-{calls}", job.id, job.attempt),
                None => format!("{}-{}-{calls}", job.id, job.attempt),
            };
            let payload = match presign {
                Some(presign) => Payload::urls(presign, job, &call, timeout).await?,
                None => Payload::Inline(input.clone()),
            };
            let call_span = tracing::info_span!(
                "worker call",
                otel.name = "pixmesh.v1.ImageWorker/Process",
                otel.kind = "client",
                otel.status_code = tracing::field::Empty,
                rpc.system = "grpc",
                rpc.service = "pixmesh.v1.ImageWorker",
                rpc.method = "Process",
                rpc.grpc.status_code = tracing::field::Empty,
                server.address = %endpoint.address,
                pixmesh.output = output,
                pixmesh.call = calls,
                error.type = tracing::field::Empty,
            );
            let answer = tokio::select! {
                // An answer that came wins over the worker's departure noticed in the same poll.
                biased;
                answer = self.call(&client, job, options, payload, timeout).instrument(call_span.clone()) => answer,
                _ = endpoint.gone() => Err(CallFailure::abandoned(&endpoint)),
            };
            match &answer {
                Ok(_) => call_span.record("rpc.grpc.status_code", 0),
                Err(failure) => {
                    call_span.record("otel.status_code", "ERROR");
                    call_span.record("error.type", failure.error.code.as_str())
                }
            };
            // Taken when the worker's part is over: an answer frees its slot before the output is
            // stored (adopted from staging, or put), so the next job can go to it meanwhile.
            let mut slot = Some(slot);
            let answer = match (answer, presign) {
                (Ok(response), Some(presign)) => {
                    if let Some(slot) = slot.take() {
                        slot.finish(false);
                    }
                    adopt(presign, &call, response, key).instrument(blob_span()).await?
                }
                (answer, presign) => {
                    if let (Err(_), Some(presign)) = (&answer, presign) {
                        // Whatever the worker may have put there is not wanted.
                        if let Err(e) = presign.discard(&call).await {
                            tracing::debug!(job = %job.id, call, error = %e, "staging object not deleted");
                        }
                    }
                    answer.map(|response| (response, None))
                }
            };
            match answer {
                Ok((response, staged)) => {
                    if let Some(slot) = slot.take() {
                        slot.finish(false);
                    }
                    let blob = match (staged, key) {
                        (Some(blob), _) => blob,
                        (None, Some(key)) => self.stores.blobs.put_at(key, response.image).instrument(blob_span()).await?,
                        (None, None) => self.stores.blobs.put(response.image).instrument(blob_span()).await?,
                    };
                    tracing::debug!(job = %job.id, attempt = job.attempt, output, worker = %endpoint.address, "output made");
                    return Ok(Made::Done(JobResult {
                        blob,
                        format: response.format,
                        content_type: response.content_type,
                        width: response.width,
                        height: response.height,
                    }));
                }
                Err(CallFailure { error, cause: Cause::Failed }) if error.code.retry() == Retry::Never => {
                    // The image's fault, not the worker's.
                    if let Some(slot) = slot.take() {
                        slot.finish(false);
                    }
                    return Ok(Made::Failed(error));
                }
                Err(CallFailure { error, cause }) => {
                    // (No slot left: the worker answered, and what it staged was refused.)
                    if let Some(slot) = slot.take() {
                        match cause {
                            Cause::Refused => slot.refused(),
                            // A worker that answers `internal` (it caught a panic on this input)
                            // is up and answering: its breaker does not count it, or a few
                            // poisoned uploads would open every worker's breaker.
                            Cause::Failed => slot.finish(error.code != ErrorCode::Internal),
                            // The worker is gone from the set: nothing for its breaker or its
                            // latency estimate to learn, the slot is simply freed.
                            Cause::Abandoned => drop(slot),
                        }
                    }
                    if cause == Cause::Abandoned {
                        redispatch = true;
                        metrics::counter!(crate::instruments::CALLS_ABANDONED).increment(1);
                    }
                    metrics::counter!(crate::instruments::WORKER_FAILURES, "code" => error.code.as_str()).increment(1);
                    if final_try.is_some() && (cause == Cause::Refused || (cause == Cause::Failed && error.code == ErrorCode::Unavailable))
                    {
                        // The last try never reached the pixels (no worker at that address, a
                        // full worker, or a blob store it could not reach): it says nothing of
                        // the input, so the job goes back to the queue (below) instead of
                        // failing for an outage. Each claim that ends so costs at most one
                        // crashed call.
                        tracing::warn!(job = %job.id, attempt = job.attempt, output, worker = %endpoint.address, code = %error.code, reason = %error.message, "the one retry after an internal failure did not reach the image; the job goes back to the queue");
                        final_try = None;
                        last_error = error;
                        break;
                    }
                    if let Some(first) = final_try.as_ref().filter(|_| cause != Cause::Abandoned) {
                        tracing::warn!(job = %job.id, attempt = job.attempt, output, worker = %endpoint.address, code = %error.code, reason = %error.message, first = %first.code, "the one retry after an internal failure failed too; the job fails");
                        return Ok(Made::Failed(first.clone()));
                    }
                    tracing::warn!(job = %job.id, attempt = job.attempt, output, worker = %endpoint.address, code = %error.code, reason = %error.message, "worker call failed; trying another worker");
                    jobs.record_retry(&job.id, job.attempt, &endpoint.address, &job_error(&error)).await?;
                    tried.push(endpoint.address.clone());
                    if error.code.retry() == Retry::Once {
                        final_try = Some(error.clone());
                    }
                    last_error = error;
                }
            }
        }
        if let Some(error) = final_try {
            tracing::warn!(job = %job.id, attempt = job.attempt, output, code = %error.code, reason = %error.message, "no retry could be made after an internal failure; the job fails");
            return Ok(Made::Failed(error));
        }
        Ok(Made::NotNow(last_error))
    }

    async fn call(
        &self,
        client: &pixmesh_proto::v1::image_worker_client::ImageWorkerClient<tonic::transport::Channel>,
        job: &Job,
        options: &Options,
        payload: Payload,
        deadline: Duration,
    ) -> Result<pixmesh_proto::v1::ProcessResponse, CallFailure> {
        let mut request = ProcessRequest {
            job_id: job.id.clone(),
            attempt: job.attempt,
            ops: Some(pixmesh_worker::wire::to_wire(options)),
            ..Default::default()
        };
        match payload {
            Payload::Inline(image) => request.image = image,
            Payload::Urls { input, output } => {
                request.input_url = input;
                request.output_url = output;
            }
        }
        let mut request = tonic::Request::new(request);
        // Sent to the worker as `grpc-timeout`.
        request.set_timeout(deadline);
        // Clock times both ways: the worker's logs and this process's next events follow them.
        let clock = pixmesh_chassis::clock::process();
        clock.stamp(request.metadata_mut());
        // The trace: this call's span is the worker's parent.
        pixmesh_chassis::trace::to_metadata(request.metadata_mut(), job.traceparent.as_deref());
        let mut client = client.clone();
        let timed_out = || CallFailure {
            error: ApiError::new(ErrorCode::Timeout, format!("worker did not answer within {} ms", deadline.as_millis())),
            cause: Cause::Failed,
        };
        let started = Instant::now();
        let answer = tokio::time::timeout(deadline + Duration::from_millis(100), client.process(request)).await;
        let code = match &answer {
            Ok(Ok(_)) => tonic::Code::Ok,
            Ok(Err(status)) => status.code(),
            Err(_) => tonic::Code::DeadlineExceeded,
        };
        metrics::histogram!(crate::instruments::RPC_CLIENT_CALL_DURATION, "rpc_method" => "pixmesh.v1.ImageWorker/Process", "rpc_grpc_status_code" => pixmesh_chassis::instruments::grpc_status_code(code))
            .record(started.elapsed().as_secs_f64());
        match answer {
            Ok(Ok(response)) => {
                clock.observe_metadata(response.metadata(), "worker");
                Ok(response.into_inner())
            }
            // tonic ends a call whose `grpc-timeout` ran out as CANCELLED; nothing else cancels ours.
            Ok(Err(status)) if status.code() == tonic::Code::Cancelled => Err(timed_out()),
            Ok(Err(status)) => {
                clock.observe_metadata(status.metadata(), "worker");
                let cause = if connection_refused(&status) { Cause::Refused } else { Cause::Failed };
                Err(CallFailure { error: ApiError::from_grpc_status(&status), cause })
            }
            Err(_) => Err(timed_out()),
        }
    }
}

/// The span of a terminal write of a claim (`outcome`: what it records).
fn commit_span(outcome: &'static str) -> tracing::Span {
    tracing::info_span!("store commit", otel.kind = "client", pixmesh.outcome = outcome)
}

/// The span of a write of an output to the blob store.
fn blob_span() -> tracing::Span {
    tracing::info_span!("blob put", otel.kind = "client")
}

/// How a call gets its input and gives back its output.
enum Payload {
    /// The bytes in the call, both ways (a local blob store).
    Inline(Bytes),
    /// Presigned URLs: GET the input, PUT the output to this call's staging object.
    Urls { input: String, output: String },
}

impl Payload {
    /// URLs valid for the call's deadline and a margin for clock skew, no longer.
    async fn urls(presign: &dyn pixmesh_store::Presign, job: &Job, call: &str, deadline: Duration) -> Result<Payload, StoreError> {
        let ttl = Duration::from_secs((deadline + URL_MARGIN).as_secs_f64().ceil() as u64);
        Ok(Payload::Urls { input: presign.get_url(&job.input.digest, ttl).await?, output: presign.staging_url(call, ttl).await? })
    }
}

/// Added to a call's deadline for the life of its presigned URLs.
const URL_MARGIN: Duration = Duration::from_secs(5);

/// Puts the output a worker staged at its content address (or, for a saga's step, at the key
/// `key`). A worker that names no valid digest, or staged something else than it said, has
/// failed this call (`internal`: one more try elsewhere); a blob store that fails is the
/// store's error.
async fn adopt(
    presign: &dyn pixmesh_store::Presign,
    call: &str,
    response: pixmesh_proto::v1::ProcessResponse,
    key: Option<&str>,
) -> Result<Result<(pixmesh_proto::v1::ProcessResponse, Option<pixmesh_store::BlobRef>), CallFailure>, StoreError> {
    let bad = |message: String| Ok(Err(CallFailure { error: ApiError::new(ErrorCode::Internal, message), cause: Cause::Failed }));
    if !pixmesh_store::BlobRef::is_digest(&response.digest) {
        let _ = presign.discard(call).await;
        return bad(format!("the worker named no valid digest for its output ({:?})", response.digest));
    }
    let blob = pixmesh_store::BlobRef {
        key: key.map(str::to_string),
        ..pixmesh_store::BlobRef::at_digest(response.digest.clone(), response.size)
    };
    match presign.adopt(call, &blob).await {
        Ok(()) => Ok(Ok((response, Some(blob)))),
        Err(StoreError::Invalid(message)) => bad(message),
        Err(e) => {
            let _ = presign.discard(call).await;
            Err(e)
        }
    }
}

/// What waiting for places to claim into ended with.
enum Places {
    Taken(Vec<OwnedSemaphorePermit>),
    /// No worker slot came free in time: look again.
    Again,
    Stop,
}

/// A failed worker call, and why.
struct CallFailure {
    error: ApiError,
    cause: Cause,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// The worker (or the way to it) failed the call, or it ran out of time.
    Failed,
    /// The worker refused the connection: it is not there.
    Refused,
    /// Discovery dropped the worker and it did not answer a health check: the call was given up.
    Abandoned,
}

impl CallFailure {
    fn abandoned(endpoint: &WorkerEndpoint) -> CallFailure {
        let message = format!("worker {} left the set of live workers and does not answer; its call was abandoned", endpoint.address);
        CallFailure { error: ApiError::new(ErrorCode::Unavailable, message), cause: Cause::Abandoned }
    }
}

/// True when the call failed because the connection was refused (found in the error's causes).
fn connection_refused(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = source {
        if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused) {
            return true;
        }
        source = e.source();
    }
    false
}

/// What the worker calls for one output of a claim came to.
enum Made {
    /// The output, stored.
    Done(JobResult),
    /// Failed for good: the image's fault, or the one retry after `internal` failed too.
    Failed(ApiError),
    /// No worker could make it in this claim: the job goes back to the queue.
    NotNow(ApiError),
}

/// The error of a job whose uploaded image is gone from the blob store.
fn missing_input() -> JobError {
    JobError { code: ErrorCode::Internal.as_str().into(), message: "the uploaded image is missing from the blob store".into() }
}

enum Outcome {
    Succeeded,
    Failed,
    Released,
    /// The lease could not be renewed before it ran out; the work was dropped.
    LeaseLost,
    /// The claim reached `max_claim_ms`; the job was released.
    GaveUp,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_backoff_doubles_up_to_its_cap() {
        let poll = Duration::from_millis(50);
        let waits: Vec<u64> = (1..=8).map(|n| claim_backoff(poll, n).as_millis() as u64).collect();
        assert_eq!(waits, vec![100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        assert_eq!(claim_backoff(poll, u32::MAX), MAX_CLAIM_BACKOFF);
        assert_eq!(claim_backoff(Duration::from_secs(10), 1), MAX_CLAIM_BACKOFF);
    }
}
