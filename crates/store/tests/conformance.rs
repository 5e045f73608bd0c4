//! One suite, every job store backend: each case runs on SQLite (a temp file) and on
//! PostgreSQL (a fresh database on the test server, see `pixmesh_test_support::postgres`).
//! What a role relies on (claims, leases, expiry, fencing, idempotency, concurrent claimers,
//! pruning, histories) must hold the same way on both.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use pixmesh_chassis::clock::{Clock, NTP64, system_time_clock};
use pixmesh_model::{
    BlobRef, CacheKey, CacheOutcome, ClaimById, Event, EventKind, JobError, JobResult, JobState, JobStore, NewJob, Options, Outbox, Output,
    StoreError, StoredView, Views, ViewsAfter, fold, output_key,
};
use pixmesh_store::{Hlc, PostgresJobStore, SqliteJobStore};
use pixmesh_test_support::postgres::TestDatabase;
use std::sync::Arc;
use std::time::{Duration, Instant};

type Store = Arc<dyn JobStore>;

/// A backend under test, and a way to open a second handle on the same data (as another
/// process would).
enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres(TestDatabase),
}

impl Backend {
    async fn sqlite() -> Backend {
        Backend::Sqlite(tempfile::tempdir().unwrap())
    }

    async fn postgres(tag: &str) -> Backend {
        Backend::Postgres(TestDatabase::create(tag).await)
    }

    async fn open(&self) -> Store {
        self.open_with_outbox().await.0
    }

    /// A handle whose events are stamped by `clock`: another process, on another host.
    async fn open_with_clock(&self, clock: Arc<Clock>) -> Store {
        match self {
            Backend::Sqlite(dir) => Arc::new(SqliteJobStore::open(&dir.path().join("jobs.db")).await.unwrap().with_clock(clock)),
            Backend::Postgres(db) => {
                Arc::new(PostgresJobStore::connect(&db.url, 8, Duration::from_secs(5)).await.unwrap().with_clock(clock))
            }
        }
    }

    /// A handle as the job store and as the outbox (the relay's view of the same handle).
    async fn open_with_outbox(&self) -> (Store, Arc<dyn Outbox>) {
        match self {
            Backend::Sqlite(dir) => {
                let store = Arc::new(SqliteJobStore::open(&dir.path().join("jobs.db")).await.unwrap());
                (store.clone(), store)
            }
            Backend::Postgres(db) => {
                let store = Arc::new(PostgresJobStore::connect(&db.url, 8, Duration::from_secs(5)).await.unwrap());
                (store.clone(), store)
            }
        }
    }
}

/// Runs `case` on both backends (`sqlite_<name>`, `postgres_<name>`).
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(super::Backend::sqlite().await).await;
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(super::Backend::postgres(stringify!($name)).await).await;
            })*
        }
    };
}

conformance!(
    a_job_goes_from_accepted_to_succeeded_with_its_history,
    stale_attempts_are_fenced_and_ended_jobs_for_everyone,
    an_expired_lease_is_rescued_within_moments,
    a_renewed_lease_keeps_the_job,
    released_jobs_wait_and_used_up_attempts_fail_the_job,
    idempotency_keys_replay_or_conflict_even_when_raced,
    concurrent_claimers_never_share_a_job,
    pruning_deletes_only_ended_jobs_past_the_cutoff,
    histories_fold_to_the_job_row_after_a_mixed_workload,
    unknown_jobs_have_no_row_and_no_history,
    a_batch_claim_takes_the_oldest_jobs_at_once_and_batches_never_overlap,
    results_committed_together_are_each_fenced_on_their_own,
    a_claim_by_id_answers_for_each_job_it_names,
    racing_claims_by_id_give_a_job_to_one_claimer,
    the_outbox_holds_every_event_in_order_and_one_relay_leads_at_a_time,
    the_sweeper_rescues_expired_leases_and_finds_jobs_left_claimable,
    a_history_keeps_causal_order_between_processes_whose_clocks_disagree,
    a_saga_keeps_its_steps_across_claims_and_pivots_once,
    a_saga_turned_back_deletes_then_fails_with_its_first_reason,
    a_saga_that_used_up_its_attempts_is_turned_back_and_claimed_to_compensate,
    views_are_replaced_only_by_later_ones_and_list_newest_first_a_page_at_a_time,
    an_identical_upload_gets_the_result_that_was_made_and_no_work,
    identical_uploads_while_the_first_is_made_wait_for_it_and_end_with_it,
    when_the_job_waited_for_fails_the_first_waiter_is_made_and_the_others_wait_for_it,
    racing_identical_uploads_elect_one_job_to_make_the_result,
    a_cache_entry_lives_as_long_as_the_job_it_names,
    an_upload_by_digest_alone_is_made_only_from_the_cache,
    the_queue_counts_the_jobs_waiting_to_be_made_and_the_oldest,
);

async fn the_queue_counts_the_jobs_waiting_to_be_made_and_the_oldest(backend: Backend) {
    let (store, outbox) = backend.open_with_outbox().await;
    assert_eq!(outbox.queue_stats().await.unwrap(), pixmesh_model::QueueStats { queued: 0, oldest_created_at: None });
    assert_eq!(cached(&store, "first", "k").await, CacheOutcome::Miss);
    tokio::time::sleep(Duration::from_millis(5)).await;
    store.create(new_job("second", None, "h")).await.unwrap();
    let first = store.get("first").await.unwrap().unwrap();
    let second = store.get("second").await.unwrap().unwrap();
    let stats = outbox.queue_stats().await.unwrap();
    assert_eq!((stats.queued, stats.oldest_created_at), (2, Some(first.created_at)));
    // A claimed job is no longer waiting; one waiting for an identical upload's job is not work.
    let claimed = store.claim("d", LONG, 5).await.unwrap().unwrap();
    assert_eq!(claimed.id, "first");
    assert_eq!(cached(&store, "follower", "k").await, CacheOutcome::Joined { leader: "first".into() });
    let stats = outbox.queue_stats().await.unwrap();
    assert_eq!((stats.queued, stats.oldest_created_at), (1, Some(second.created_at)));
    // A job released for later is still waiting to be made.
    store.release("first", claimed.attempt, &error("unavailable"), Duration::from_secs(30)).await.unwrap();
    assert_eq!(outbox.queue_stats().await.unwrap().queued, 2);
    let claimed = store.claim("d", LONG, 5).await.unwrap().unwrap();
    store.succeed(&claimed.id, claimed.attempt, &result()).await.unwrap();
    assert_eq!(outbox.queue_stats().await.unwrap().queued, 1, "{} ended", claimed.id);
}

fn new_job(id: &str, key: Option<&str>, hash: &str) -> NewJob {
    NewJob {
        id: id.into(),
        owner: "alice".into(),
        input: BlobRef::at_digest("a".repeat(64), 10),
        input_format: "jpeg".into(),
        options: Options { width: Some(100), ..Options::default() },
        outputs: Vec::new(),
        idempotency_key: key.map(str::to_string),
        request_hash: hash.into(),
        traceparent: None,
    }
}

fn result() -> JobResult {
    JobResult {
        blob: BlobRef::at_digest("b".repeat(64), 5),
        format: "webp".into(),
        content_type: "image/webp".into(),
        width: 100,
        height: 50,
    }
}

fn error(code: &str) -> JobError {
    JobError { code: code.into(), message: format!("{code} (test)") }
}

async fn kinds(store: &Store, id: &str) -> Vec<EventKind> {
    store.events(id).await.unwrap().iter().map(|e| e.kind()).collect()
}

const LONG: Duration = Duration::from_secs(30);

async fn a_job_goes_from_accepted_to_succeeded_with_its_history(backend: Backend) {
    let store = backend.open().await;
    let created = store.create(new_job("j1", None, "h")).await.unwrap();
    assert!(created.created);
    assert_eq!((created.job.state, created.job.attempt, created.job.owner.as_str()), (JobState::Queued, 0, "alice"));
    assert_eq!(created.job.options.width, Some(100));
    let job = store.claim("d1", LONG, 5).await.unwrap().unwrap();
    assert_eq!((job.id.as_str(), job.attempt, job.state, job.lease_owner.as_deref()), ("j1", 1, JobState::Processing, Some("d1")));
    assert!(job.lease_expires_at.unwrap() > job.created_at);
    assert!(store.claim("d1", LONG, 5).await.unwrap().is_none(), "nothing else to claim");
    store.succeed("j1", 1, &result()).await.unwrap();
    let done = store.get("j1").await.unwrap().unwrap();
    assert_eq!((done.state, done.result.clone(), done.lease_owner.clone()), (JobState::Succeeded, Some(result()), None));

    let events = store.events("j1").await.unwrap();
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3], "numbered per job, without gaps");
    assert_eq!(events.iter().map(|e| e.attempt).collect::<Vec<_>>(), vec![0, 1, 1]);
    assert!(
        matches!(&events[0].event, Event::Accepted { input_format, options, .. } if input_format == "jpeg" && options.width == Some(100))
    );
    assert!(matches!(&events[1].event, Event::Claimed { owner, .. } if owner == "d1"));
    assert_eq!(events[2].event, Event::Succeeded { result: Some(result()), outputs: Default::default() });
    let view = fold(&events).unwrap();
    assert_eq!((view.state, view.attempts, view.result), (JobState::Succeeded, 1, Some(result())));
}

async fn stale_attempts_are_fenced_and_ended_jobs_for_everyone(backend: Backend) {
    let store = backend.open().await;
    store.create(new_job("j1", None, "h")).await.unwrap();
    // A lease of 0 expires at once: a second distributor takes the job over.
    let first = store.claim("d1", Duration::ZERO, 5).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let second = store.claim("d2", LONG, 5).await.unwrap().unwrap();
    assert_eq!((first.attempt, second.attempt), (1, 2));
    for err in [
        store.succeed("j1", 1, &result()).await.unwrap_err(),
        store.fail("j1", 1, &error("internal")).await.unwrap_err(),
        store.extend_lease("j1", 1, LONG).await.unwrap_err(),
        store.record_retry("j1", 1, "w", &error("unavailable")).await.unwrap_err(),
        store.release("j1", 1, &error("unavailable"), Duration::ZERO).await.unwrap_err(),
    ] {
        assert!(matches!(err, StoreError::Fenced { attempt: 1, .. }), "{err}");
    }
    assert_eq!(store.get("j1").await.unwrap().unwrap().lease_owner.as_deref(), Some("d2"), "the stale writes changed nothing");
    store.record_retry("j1", 2, "w1", &error("unavailable")).await.unwrap();
    store.succeed("j1", 2, &result()).await.unwrap();
    // An ended job is fenced for everyone, including the claim that ended it.
    let err = store.fail("j1", 2, &error("internal")).await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
    assert!(matches!(store.succeed("j1", 2, &result()).await.unwrap_err(), StoreError::Fenced { .. }));
    use EventKind::*;
    assert_eq!(kinds(&store, "j1").await, vec![Accepted, Claimed, LeaseExpired, Claimed, Retried, Succeeded]);
    let events = store.events("j1").await.unwrap();
    assert_eq!(events[2].event, Event::LeaseExpired { owner: Some("d1".into()) });
    assert_eq!(events[4].event, Event::Retried { worker: "w1".into(), error: error("unavailable") });
}

async fn an_expired_lease_is_rescued_within_moments(backend: Backend) {
    let store = backend.open().await;
    // Jobs queued behind the abandoned one do not delay its rescue.
    store.create(new_job("abandoned", None, "h")).await.unwrap();
    let lease = Duration::from_millis(300);
    // Both bounds are measured from before the claim: the lease cannot have started earlier.
    let start = Instant::now();
    let taken = store.claim("crashed", lease, 5).await.unwrap().unwrap();
    let creating = Instant::now();
    for i in 0..20 {
        store.create(new_job(&format!("later-{i:02}"), None, "h")).await.unwrap();
    }
    // Creating the later jobs may take long on a loaded machine; it does not count.
    let created_in = creating.elapsed();
    let rescued = loop {
        let job = store.claim("survivor", LONG, 5).await.unwrap().unwrap();
        if job.id == "abandoned" {
            break job;
        }
        store.succeed(&job.id, job.attempt, &result()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let waited = start.elapsed();
    println!("rescued {waited:?} after the claim (lease {lease:?})");
    assert_eq!((rescued.attempt, rescued.lease_owner.as_deref()), (2, Some("survivor")));
    assert!(waited >= lease - Duration::from_millis(50), "not before its lease ran out: {waited:?}");
    assert!(waited < lease + created_in + Duration::from_secs(1), "rescued within a second of the lease: {waited:?}");
    assert!(matches!(store.succeed("abandoned", taken.attempt, &result()).await.unwrap_err(), StoreError::Fenced { .. }));
}

async fn a_renewed_lease_keeps_the_job(backend: Backend) {
    let store = backend.open().await;
    store.create(new_job("kept", None, "h")).await.unwrap();
    // Renewed every 100 ms for 2.5 leases: it would have run out twice without renewals (with
    // room for a statement that stalls on a busy machine).
    let lease = Duration::from_millis(1000);
    let job = store.claim("holder", lease, 5).await.unwrap().unwrap();
    let until = Instant::now() + lease * 5 / 2;
    while Instant::now() < until {
        store.extend_lease("kept", job.attempt, lease).await.unwrap();
        assert!(store.claim("other", LONG, 5).await.unwrap().is_none(), "a renewed lease is never taken over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    store.succeed("kept", job.attempt, &result()).await.unwrap();
    assert!(!kinds(&store, "kept").await.contains(&EventKind::LeaseExpired));
}

async fn released_jobs_wait_and_used_up_attempts_fail_the_job(backend: Backend) {
    let store = backend.open().await;
    store.create(new_job("j1", None, "h")).await.unwrap();
    let job = store.claim("d", LONG, 2).await.unwrap().unwrap();
    store.release("j1", job.attempt, &error("unavailable"), Duration::from_millis(400)).await.unwrap();
    assert_eq!(store.get("j1").await.unwrap().unwrap().state, JobState::Queued);
    assert!(store.claim("d", LONG, 2).await.unwrap().is_none(), "not due yet");
    assert!(store.release("j1", job.attempt, &error("unavailable"), Duration::ZERO).await.is_err(), "released once");
    tokio::time::sleep(Duration::from_millis(450)).await;
    let job = store.claim("d", LONG, 2).await.unwrap().unwrap();
    assert_eq!(job.attempt, 2);
    store.release("j1", 2, &error("unavailable"), Duration::ZERO).await.unwrap();
    assert!(store.claim("d", LONG, 2).await.unwrap().is_none(), "the third claim fails the job instead");
    let job = store.get("j1").await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert!(job.error.unwrap().message.contains("gave up after 2 attempts"));
    use EventKind::*;
    assert_eq!(kinds(&store, "j1").await, vec![Accepted, Claimed, Released, Claimed, Released, Failed]);
    // An abandoned last attempt fails too, once its lease runs out.
    store.create(new_job("j2", None, "h")).await.unwrap();
    store.claim("d", Duration::ZERO, 1).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(store.claim("d", LONG, 1).await.unwrap().is_none());
    assert_eq!(store.get("j2").await.unwrap().unwrap().state, JobState::Failed);
    assert_eq!(kinds(&store, "j2").await, vec![Accepted, Claimed, LeaseExpired, Failed]);
}

async fn idempotency_keys_replay_or_conflict_even_when_raced(backend: Backend) {
    let store = backend.open().await;
    let first = store.create(new_job("j1", Some("k"), "h1")).await.unwrap();
    let replay = store.create(new_job("j2", Some("k"), "h1")).await.unwrap();
    assert!(first.created && !replay.created);
    assert_eq!(replay.job.id, "j1");
    let err = store.create(new_job("j3", Some("k"), "h2")).await.unwrap_err();
    assert!(matches!(err, StoreError::IdempotencyConflict { ref existing } if existing == "j1"), "{err}");
    assert!(store.get("j3").await.unwrap().is_none(), "nothing was written");
    assert_eq!(kinds(&store, "j1").await, vec![EventKind::Accepted], "a replay writes no event");

    // Ten clients retry the same request at once, through two handles: one job.
    let other = backend.open().await;
    let mut tasks = Vec::new();
    for i in 0..10 {
        let s = if i % 2 == 0 { store.clone() } else { other.clone() };
        tasks.push(tokio::spawn(async move { s.create(new_job(&format!("race-{i}"), Some("raced"), "same")).await }));
    }
    let mut ids = Vec::new();
    let mut created = 0;
    for t in tasks {
        let c = t.await.unwrap().unwrap();
        created += usize::from(c.created);
        ids.push(c.job.id);
    }
    ids.dedup();
    assert_eq!((created, ids.len()), (1, 1), "exactly one job for one key: {ids:?}");
}

async fn concurrent_claimers_never_share_a_job(backend: Backend) {
    let store = backend.open().await;
    for i in 0..80 {
        store.create(new_job(&format!("j{i:02}"), None, "h")).await.unwrap();
    }
    let mut claimers = Vec::new();
    for c in 0..4 {
        // Two handles, as two distributor processes would have.
        let s = if c % 2 == 0 { store.clone() } else { backend.open().await };
        claimers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while let Some(job) = s.claim(&format!("c{c}"), LONG, 5).await.unwrap() {
                s.succeed(&job.id, job.attempt, &result()).await.unwrap();
                mine.push(job.id);
            }
            mine
        }));
    }
    let mut all = Vec::new();
    let mut per = Vec::new();
    for c in claimers {
        let mine = c.await.unwrap();
        per.push(mine.len());
        all.extend(mine);
    }
    let claims = all.len();
    all.sort();
    all.dedup();
    assert_eq!((claims, all.len()), (80, 80), "each job claimed exactly once (per claimer: {per:?})");
    let counts = store.counts().await.unwrap();
    assert_eq!(counts, vec![(JobState::Succeeded, 80)]);
}

async fn pruning_deletes_only_ended_jobs_past_the_cutoff(backend: Backend) {
    let store = backend.open().await;
    for id in ["old-ok", "old-failed", "in-flight", "still-queued"] {
        store.create(new_job(id, Some(id), "h")).await.unwrap();
    }
    for _ in 0..3 {
        let job = store.claim("d", LONG, 5).await.unwrap().unwrap();
        match job.id.as_str() {
            "old-ok" => store.succeed(&job.id, job.attempt, &result()).await.unwrap(),
            "old-failed" => store.fail(&job.id, job.attempt, &error("corrupt_image")).await.unwrap(),
            _ => {}
        }
    }
    let cutoff = pixmesh_chassis::time::now_ms() + 1;
    tokio::time::sleep(Duration::from_millis(5)).await;
    store.create(new_job("recent", None, "h")).await.unwrap();
    // The oldest queued job goes back to the queue for a minute: queued, not ended.
    let job = store.claim("d", LONG, 5).await.unwrap().unwrap();
    assert_eq!(job.id, "still-queued");
    store.release(&job.id, job.attempt, &error("unavailable"), Duration::from_secs(60)).await.unwrap();
    let job = store.claim("d", LONG, 5).await.unwrap().unwrap();
    assert_eq!(job.id, "recent");
    store.succeed("recent", job.attempt, &result()).await.unwrap();

    assert_eq!(store.prune(cutoff, 1).await.unwrap(), 1, "at most `limit` per call");
    assert_eq!(store.prune(cutoff, 100).await.unwrap(), 1);
    assert_eq!(store.prune(cutoff, 100).await.unwrap(), 0);
    for gone in ["old-ok", "old-failed"] {
        assert!(store.get(gone).await.unwrap().is_none(), "{gone} was pruned");
        assert!(store.events(gone).await.unwrap().is_empty(), "{gone}'s events went with it");
    }
    for kept in ["in-flight", "still-queued", "recent"] {
        assert!(store.get(kept).await.unwrap().is_some(), "{kept} is kept");
        assert!(!store.events(kept).await.unwrap().is_empty());
    }
    // A pruned job's idempotency key is free again: a new job, not a replay of a deleted one.
    let again = store.create(new_job("old-ok-2", Some("old-ok"), "h")).await.unwrap();
    assert!(again.created);
}

async fn histories_fold_to_the_job_row_after_a_mixed_workload(backend: Backend) {
    let store = backend.open().await;
    for i in 0..30 {
        store.create(new_job(&format!("m{i:02}"), None, "h")).await.unwrap();
    }
    let mut n = 0;
    while let Some(job) = store.claim("d", LONG, 3).await.unwrap() {
        n += 1;
        match n % 5 {
            0 => store.fail(&job.id, job.attempt, &error("corrupt_image")).await.unwrap(),
            1 => store.release(&job.id, job.attempt, &error("unavailable"), Duration::ZERO).await.unwrap(),
            2 => {
                store.record_retry(&job.id, job.attempt, "w", &error("unavailable")).await.unwrap();
                store.succeed(&job.id, job.attempt, &result()).await.unwrap();
            }
            _ => store.succeed(&job.id, job.attempt, &result()).await.unwrap(),
        }
    }
    for i in 0..30 {
        let id = format!("m{i:02}");
        let job = store.get(&id).await.unwrap().unwrap();
        let events = store.events(&id).await.unwrap();
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=events.len() as u32).collect::<Vec<_>>(), "{id}");
        let view = fold(&events).unwrap();
        assert_eq!((view.state, view.attempts, &view.result, &view.error), (job.state, job.attempt, &job.result, &job.error), "{id}");
        assert!(job.state.is_terminal(), "{id}");
    }
}

async fn unknown_jobs_have_no_row_and_no_history(backend: Backend) {
    let store = backend.open().await;
    assert!(store.get("nope").await.unwrap().is_none());
    assert!(store.events("nope").await.unwrap().is_empty());
    assert!(matches!(store.succeed("nope", 1, &result()).await.unwrap_err(), StoreError::Fenced { .. }));
    assert!(matches!(store.extend_lease("nope", 1, LONG).await.unwrap_err(), StoreError::Fenced { .. }));
    store.probe("conformance", true).await.unwrap();
    store.probe("conformance", false).await.unwrap();
    assert!(store.counts().await.unwrap().is_empty());
}

async fn a_batch_claim_takes_the_oldest_jobs_at_once_and_batches_never_overlap(backend: Backend) {
    let store = backend.open().await;
    for i in 0..50 {
        store.create(new_job(&format!("b{i:02}"), None, "h")).await.unwrap();
    }
    let first = store.claim_many("d", LONG, 5, 10).await.unwrap();
    assert_eq!(first.iter().map(|j| j.id.clone()).collect::<Vec<_>>(), (0..10).map(|i| format!("b{i:02}")).collect::<Vec<_>>());
    assert!(first.iter().all(|j| j.attempt == 1 && j.state == JobState::Processing && j.lease_owner.as_deref() == Some("d")));
    for job in &first {
        assert_eq!(kinds(&store, &job.id).await, vec![EventKind::Accepted, EventKind::Claimed], "{}", job.id);
    }
    // Batches from two handles at once share nothing.
    let other = backend.open().await;
    let (a, b) = tokio::join!(store.claim_many("a", LONG, 5, 25), other.claim_many("b", LONG, 5, 25));
    let (a, b) = (a.unwrap(), b.unwrap());
    let mut ids: Vec<_> = a.iter().chain(&b).map(|j| j.id.clone()).collect();
    assert_eq!(ids.len(), 40, "a: {}, b: {}", a.len(), b.len());
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 40);
    assert!(store.claim_many("d", LONG, 5, 10).await.unwrap().is_empty());
    // A batch skips (and fails) jobs that used up their attempts, and still fills up.
    for i in 0..3 {
        store.create(new_job(&format!("c{i}"), None, "h")).await.unwrap();
    }
    let c0 = store.claim("d", LONG, 5).await.unwrap().unwrap();
    store.release(&c0.id, c0.attempt, &error("unavailable"), Duration::ZERO).await.unwrap();
    let batch = store.claim_many("d", LONG, 1, 10).await.unwrap();
    assert_eq!(batch.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), vec!["c1", "c2"]);
    assert_eq!(store.get("c0").await.unwrap().unwrap().state, JobState::Failed);
}

async fn results_committed_together_are_each_fenced_on_their_own(backend: Backend) {
    let store = backend.open().await;
    for i in 0..4 {
        store.create(new_job(&format!("g{i}"), None, "h")).await.unwrap();
    }
    let jobs = store.claim_many("d", LONG, 5, 4).await.unwrap();
    assert_eq!(jobs.len(), 4);
    // g1's claim is stale (attempt 0 never held it), g3 is given twice in one batch.
    let items: Vec<(String, u32, JobResult)> = vec![
        ("g0".into(), 1, result()),
        ("g1".into(), 0, result()),
        ("g2".into(), 1, result()),
        ("g3".into(), 1, result()),
        ("g3".into(), 1, result()),
        ("nope".into(), 1, result()),
    ];
    let answers = store.succeed_many(&items).await;
    let ok: Vec<bool> = answers.iter().map(|a| a.is_ok()).collect();
    assert_eq!(ok[..4], [true, false, true, true], "{answers:?}");
    assert!(!ok[4] || !ok[3], "one result per job, however often it is given: {answers:?}");
    assert!(matches!(answers[5], Err(StoreError::Fenced { .. })));
    for id in ["g0", "g2", "g3"] {
        assert_eq!(store.get(id).await.unwrap().unwrap().state, JobState::Succeeded, "{id}");
        assert_eq!(kinds(&store, id).await.iter().filter(|k| **k == EventKind::Succeeded).count(), 1, "{id}");
    }
    assert_eq!(store.get("g1").await.unwrap().unwrap().state, JobState::Processing);

    // Through the group committer, many concurrent results: each answered, each once.
    let grouped = pixmesh_store::GroupCommit::wrap(backend.open().await, 16);
    for i in 0..40 {
        grouped.create(new_job(&format!("m{i:02}"), None, "h")).await.unwrap();
    }
    let claimed = grouped.claim_many("d", LONG, 5, 40).await.unwrap();
    assert_eq!(claimed.len(), 40);
    let mut tasks = Vec::new();
    for job in claimed {
        let g = grouped.clone();
        tasks.push(tokio::spawn(async move {
            let first = g.succeed(&job.id, job.attempt, &result()).await;
            let again = g.succeed(&job.id, job.attempt, &result()).await;
            (first, again)
        }));
    }
    for t in tasks {
        let (first, again) = t.await.unwrap();
        first.unwrap();
        assert!(matches!(again, Err(StoreError::Fenced { .. })), "an ended job is fenced: {again:?}");
    }
    let succeeded = grouped.counts().await.unwrap().into_iter().find(|(s, _)| *s == JobState::Succeeded).map(|(_, n)| n);
    assert_eq!(succeeded, Some(43));
}

async fn a_claim_by_id_answers_for_each_job_it_names(backend: Backend) {
    let store = backend.open().await;
    for id in ["queued", "later", "held", "done", "spent"] {
        store.create(new_job(id, None, "h")).await.unwrap();
    }
    let ids = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    // Take every job but `queued` into its state (claims by id, so `queued` stays queued).
    let mut taken = store.claim_ids("d0", LONG, 5, &ids(&["later", "held", "done"])).await.unwrap();
    assert!(taken.iter().all(|a| matches!(a, ClaimById::Claimed(_))), "{taken:?}");
    taken.clear();
    store.release("later", 1, &error("unavailable"), Duration::from_secs(10)).await.unwrap();
    store.succeed("done", 1, &result()).await.unwrap();
    // `spent` has used up its one attempt.
    assert!(matches!(&store.claim_ids("d0", LONG, 1, &ids(&["spent"])).await.unwrap()[0], ClaimById::Claimed(_)));
    store.release("spent", 1, &error("unavailable"), Duration::ZERO).await.unwrap();

    let answers = store.claim_ids("d1", LONG, 1, &ids(&["queued", "later", "held", "done", "spent", "nope"])).await.unwrap();
    assert_eq!(answers.len(), 6, "{answers:?}");
    let find = |id: &str| answers.iter().find(|a| a.id() == id).unwrap_or_else(|| panic!("no answer for {id}: {answers:?}"));
    assert!(matches!(find("queued"), ClaimById::Claimed(job) if job.attempt == 1 && job.lease_owner.as_deref() == Some("d1")));
    assert!(matches!(find("later"), ClaimById::NotDue { in_ms, .. } if (8_000..=10_000).contains(in_ms)), "{:?}", find("later"));
    assert!(matches!(find("held"), ClaimById::Held { .. }));
    assert!(matches!(find("done"), ClaimById::Ended { .. }));
    assert!(matches!(find("nope"), ClaimById::Ended { .. }));
    assert!(matches!(find("spent"), ClaimById::Ended { .. }));
    assert_eq!(store.get("spent").await.unwrap().unwrap().state, JobState::Failed, "used up its attempts: failed, not claimed");
    use EventKind::*;
    assert_eq!(kinds(&store, "queued").await, vec![Accepted, Claimed]);
    assert_eq!(kinds(&store, "spent").await, vec![Accepted, Claimed, Released, Failed]);
    // The claim by id holds like any other: the lease fences the old attempt.
    store.succeed("queued", 1, &result()).await.unwrap();
    assert!(matches!(store.succeed("queued", 1, &result()).await.unwrap_err(), StoreError::Fenced { .. }));
}

async fn racing_claims_by_id_give_a_job_to_one_claimer(backend: Backend) {
    let (a, b) = (backend.open().await, backend.open().await);
    let ids: Vec<String> = (0..20).map(|i| format!("j{i:02}")).collect();
    for id in &ids {
        a.create(new_job(id, None, "h")).await.unwrap();
    }
    // Two claimers, each woken for every job (duplicated wake-ups), in batches of 5.
    let claim = |store: Store, owner: &'static str, ids: Vec<String>| {
        tokio::spawn(async move {
            let mut mine = Vec::new();
            for chunk in ids.chunks(5) {
                for answer in store.claim_ids(owner, LONG, 5, chunk).await.unwrap() {
                    if let ClaimById::Claimed(job) = answer {
                        mine.push(job.id);
                    }
                }
            }
            mine
        })
    };
    let mut reversed = ids.clone();
    reversed.reverse();
    let (first, second) = (claim(a.clone(), "a", ids.clone()), claim(b.clone(), "b", reversed));
    let (mut first, second) = (first.await.unwrap(), second.await.unwrap());
    assert!(first.iter().all(|id| !second.contains(id)), "a job claimed twice: {first:?} / {second:?}");
    first.extend(second);
    first.sort();
    assert_eq!(first, ids, "every job claimed once");
}

async fn the_outbox_holds_every_event_in_order_and_one_relay_leads_at_a_time(backend: Backend) {
    let (store, outbox) = backend.open_with_outbox().await;
    // The first relay starts after the events written before there was one.
    store.create(new_job("before", None, "h")).await.unwrap();
    let start = outbox.relay_lease("r1", Duration::from_millis(300), None).await.unwrap().expect("the first relay leads");
    assert_eq!(outbox.events_after(start, 100).await.unwrap(), vec![], "older events are not relayed");
    for id in ["j1", "j2", "j3"] {
        store.create(new_job(id, None, "h")).await.unwrap();
    }
    let job = store.claim_ids("d", LONG, 5, &["j2".to_string()]).await.unwrap();
    assert!(matches!(&job[0], ClaimById::Claimed(_)));
    store.succeed("j2", 1, &result()).await.unwrap();
    let events = outbox.events_after(start, 100).await.unwrap();
    let seen: Vec<(String, u32, EventKind)> = events.iter().map(|e| (e.event.job_id.clone(), e.event.seq, e.event.kind())).collect();
    use EventKind::*;
    assert_eq!(
        seen,
        vec![
            ("j1".into(), 1, Accepted),
            ("j2".into(), 1, Accepted),
            ("j3".into(), 1, Accepted),
            ("j2".into(), 2, Claimed),
            ("j2".into(), 3, Succeeded)
        ]
    );
    assert!(events.windows(2).all(|w| w[0].id < w[1].id), "ids increase");
    // Paged reads see the same events.
    let first_two = outbox.events_after(start, 2).await.unwrap();
    assert_eq!(outbox.events_after(first_two[1].id, 100).await.unwrap(), events[2..].to_vec());

    // One relay at a time; the cursor is saved with each renewal, by the holder only.
    assert_eq!(outbox.relay_lease("r2", Duration::from_millis(300), None).await.unwrap(), None, "r1 holds the lease");
    let saved = events[2].id;
    assert_eq!(outbox.relay_lease("r1", Duration::from_millis(300), Some(saved)).await.unwrap(), Some(saved));
    assert_eq!(outbox.relay_lease("r2", Duration::from_millis(300), Some(events[4].id)).await.unwrap(), None);
    // A cursor never goes back.
    assert_eq!(outbox.relay_lease("r1", Duration::from_millis(300), Some(start)).await.unwrap(), Some(saved));
    // r1 stops renewing: r2 takes over where r1 got to.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(outbox.relay_lease("r2", Duration::from_millis(300), None).await.unwrap(), Some(saved));
    assert_eq!(outbox.relay_lease("r1", Duration::from_millis(300), Some(events[4].id)).await.unwrap(), None, "r1 lost it");
    assert_eq!(outbox.relay_lease("r2", Duration::from_millis(300), Some(events[4].id)).await.unwrap(), Some(events[4].id));
}

async fn the_sweeper_rescues_expired_leases_and_finds_jobs_left_claimable(backend: Backend) {
    let (store, outbox) = backend.open_with_outbox().await;
    store.create(new_job("abandoned", None, "h")).await.unwrap();
    store.create(new_job("fresh", None, "h")).await.unwrap();
    store.create(new_job("kept", None, "h")).await.unwrap();
    let ids = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    store.claim_ids("crashed", Duration::from_millis(100), 5, &ids(&["abandoned"])).await.unwrap();
    store.claim_ids("alive", LONG, 5, &ids(&["kept"])).await.unwrap();
    assert_eq!(outbox.rescue_expired(5).await.unwrap(), 0, "no lease ran out yet");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(outbox.rescue_expired(5).await.unwrap(), 1);
    let job = store.get("abandoned").await.unwrap().unwrap();
    assert_eq!((job.state, job.attempt, job.lease_owner), (JobState::Queued, 1, None));
    assert_eq!(kinds(&store, "abandoned").await.last(), Some(&EventKind::LeaseExpired));
    assert_eq!(store.get("kept").await.unwrap().unwrap().state, JobState::Processing, "a live lease is kept");

    // Claimable for longer than the bound: `fresh` (since its creation); not the job rescued now.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let stale = outbox.stale_claimable(Duration::from_millis(100), 100).await.unwrap();
    assert_eq!(stale, vec![("abandoned".to_string(), 1), ("fresh".to_string(), 0)]);
    assert_eq!(outbox.stale_claimable(Duration::from_secs(60), 100).await.unwrap(), vec![]);
    assert_eq!(outbox.stale_claimable(Duration::from_millis(100), 1).await.unwrap().len(), 1, "limited");
    // A release's delay counts from when it is due.
    let claimed = store.claim_ids("d", LONG, 5, &ids(&["fresh"])).await.unwrap();
    assert!(matches!(&claimed[0], ClaimById::Claimed(_)));
    store.release("fresh", 1, &error("unavailable"), Duration::from_secs(30)).await.unwrap();
    let stale = outbox.stale_claimable(Duration::from_millis(100), 100).await.unwrap();
    assert_eq!(stale, vec![("abandoned".to_string(), 1)], "not due: not stale");
    // A rescued job whose attempts are used up fails instead.
    store.claim_ids("crashed", Duration::ZERO, 5, &ids(&["abandoned"])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(store.get("abandoned").await.unwrap().unwrap().attempt, 2);
    outbox.rescue_expired(2).await.unwrap();
    assert_eq!(store.get("abandoned").await.unwrap().unwrap().state, JobState::Failed);
}

/// Physical clocks of other hosts: 300 ms ahead (within the 500 ms maximum offset), 2 s ahead
/// (beyond it).
fn ahead_300ms() -> NTP64 {
    NTP64(system_time_clock().0 + Hlc::MIN.plus_ms(300).0)
}

fn ahead_2s() -> NTP64 {
    NTP64(system_time_clock().0 + Hlc::MIN.plus_ms(2_000).0)
}

fn clock(physical: fn() -> NTP64) -> Arc<Clock> {
    Arc::new(Clock::with_physical(Duration::from_millis(500), physical))
}

/// Each event's HLC time is above the one before, and `at` (its wall-clock part) never runs
/// backwards.
fn assert_causal(events: &[pixmesh_model::JobEvent]) {
    for pair in events.windows(2) {
        assert!(pair[1].hlc > pair[0].hlc, "event {} ({}) is not after event {} ({})", pair[1].seq, pair[1].hlc, pair[0].seq, pair[0].hlc);
        assert!(pair[1].at >= pair[0].at);
    }
}

async fn a_history_keeps_causal_order_between_processes_whose_clocks_disagree(backend: Backend) {
    // An upload on a host 300 ms ahead, a distributor on time: every step of the distributor
    // comes after the upload's, although its wall clock says earlier.
    let (upload_clock, distributor_clock) = (clock(ahead_300ms), clock(system_time_clock));
    let upload = backend.open_with_clock(upload_clock.clone()).await;
    let distributor = backend.open_with_clock(distributor_clock.clone()).await;
    let before = Hlc(system_time_clock().0).unix_ms();
    upload.create(new_job("j1", None, "h")).await.unwrap();
    let job = distributor.claim("d1", LONG, 5).await.unwrap().unwrap();
    distributor.release("j1", job.attempt, &error("unavailable"), Duration::ZERO).await.unwrap();
    let job = distributor.claim("d1", LONG, 5).await.unwrap().unwrap();
    distributor.succeed("j1", job.attempt, &result()).await.unwrap();
    let events = distributor.events("j1").await.unwrap();
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    assert_causal(&events);
    assert!(events[0].at >= before + 250, "the upload's clock is ahead of this one");

    // A lease taken on the fast host runs out and the distributor on time rescues it: the
    // rescue and the claim after it follow the lost claim.
    upload.create(new_job("j2", None, "h2")).await.unwrap();
    let lost = upload.claim("fast", Duration::from_millis(50), 5).await.unwrap().unwrap();
    assert_eq!(lost.id, "j2");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rescued = wait_for_claim(&distributor, "d1").await;
    assert_eq!((rescued.id.as_str(), rescued.attempt), ("j2", 2));
    distributor.fail("j2", 2, &error("corrupt_image")).await.unwrap();
    let events = distributor.events("j2").await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.kind()).collect::<Vec<_>>(),
        vec![EventKind::Accepted, EventKind::Claimed, EventKind::LeaseExpired, EventKind::Claimed, EventKind::Failed]
    );
    assert_causal(&events);

    // A host 2 s ahead is beyond the maximum offset: its times are not adopted. The next event
    // carries the distributor's own time, below the one it follows, and the history is still
    // in its sequence order.
    let wrong = backend.open_with_clock(clock(ahead_2s)).await;
    wrong.create(new_job("j3", None, "h3")).await.unwrap();
    let job = distributor.claim("d1", LONG, 5).await.unwrap().unwrap();
    assert_eq!(job.id, "j3");
    let events = distributor.events("j3").await.unwrap();
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert!(events[1].hlc < events[0].hlc, "the claim did not take the far-ahead time");
    assert!(events[0].at - events[1].at > 1_500, "{} {}", events[0].at, events[1].at);
    assert!(distributor_clock.now().unix_ms() < events[0].at - 1_500, "the distributor's clock was not dragged ahead");
}

/// Claims until a job comes (a rescue may wait for the next sweep).
async fn wait_for_claim(store: &Store, owner: &str) -> pixmesh_model::Job {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(job) = store.claim(owner, LONG, 5).await.unwrap() {
            return job;
        }
        assert!(Instant::now() < until, "nothing to claim");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn saga(id: &str, names: &[&str]) -> NewJob {
    let outputs =
        names.iter().map(|n| Output { name: n.to_string(), options: Options { width: Some(10), ..Options::default() } }).collect();
    NewJob { outputs, ..new_job(id, None, id) }
}

fn made(job: &str, output: &str, attempt: u32) -> JobResult {
    let mut r = result();
    r.blob.key = Some(output_key(job, output, attempt));
    r
}

async fn a_saga_keeps_its_steps_across_claims_and_pivots_once(backend: Backend) {
    let store = backend.open().await;
    let created = store.create(saga("s", &["thumb", "large"])).await.unwrap();
    assert!(created.job.is_saga() && created.job.steps.is_empty());
    assert_eq!(created.job.outputs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), vec!["thumb", "large"]);
    let job = store.claim("d", LONG, 5).await.unwrap().unwrap();
    store.record_output("s", job.attempt, "thumb", &made("s", "thumb", 1)).await.unwrap();
    store.release("s", 1, &error("unavailable"), Duration::ZERO).await.unwrap();
    // The next claim sees the step the first one made.
    let job = store.claim("d", LONG, 5).await.unwrap().unwrap();
    assert_eq!(job.attempt, 2);
    assert_eq!(job.steps.get("thumb").map(|s| (s.attempt, s.result.clone())), Some((1, made("s", "thumb", 1))));
    assert!(!job.steps.contains_key("large"));
    assert!(matches!(store.record_output("s", 1, "large", &made("s", "large", 1)).await, Err(StoreError::Fenced { .. })), "stale attempt");
    store.record_output("s", 2, "large", &made("s", "large", 2)).await.unwrap();
    let steps = store.get("s").await.unwrap().unwrap().steps;
    assert_eq!(steps.len(), 2);
    store.succeed_outputs("s", 2, &steps).await.unwrap();
    assert!(matches!(store.succeed_outputs("s", 2, &steps).await, Err(StoreError::Fenced { .. })), "the pivot happens once");
    let done = store.get("s").await.unwrap().unwrap();
    assert_eq!((done.state, done.steps, done.result, done.lease_owner), (JobState::Succeeded, steps, None, None));
    use EventKind::*;
    assert_eq!(kinds(&store, "s").await, vec![Accepted, Claimed, OutputSucceeded, Released, Claimed, OutputSucceeded, Succeeded]);
    let view = fold(&store.events("s").await.unwrap()).unwrap();
    assert_eq!(view.requested, vec!["thumb".to_string(), "large".to_string()]);
    assert_eq!(view.outputs.get("large"), Some(&made("s", "large", 2)));
    assert_eq!((view.state, view.result), (JobState::Succeeded, None));
}

async fn a_saga_turned_back_deletes_then_fails_with_its_first_reason(backend: Backend) {
    let store = backend.open().await;
    store.create(saga("s", &["a", "b", "c"])).await.unwrap();
    store.claim("d", LONG, 5).await.unwrap().unwrap();
    store.record_output("s", 1, "a", &made("s", "a", 1)).await.unwrap();
    store.record_output("s", 1, "c", &made("s", "c", 1)).await.unwrap();
    store.compensate("s", 1, Some("b"), &error("bad_request")).await.unwrap();
    store.compensate("s", 1, None, &error("unavailable")).await.unwrap();
    let job = store.get("s").await.unwrap().unwrap();
    assert_eq!(job.compensate, Some(error("bad_request")), "the first reason is kept");
    assert_eq!(job.state, JobState::Processing, "turning back is not the end");
    store.record_deleted("s", 1, "a", &output_key("s", "a", 1)).await.unwrap();
    // Deleting again (a compensation done twice) is harmless.
    store.record_deleted("s", 1, "a", &output_key("s", "a", 1)).await.unwrap();
    store.record_deleted("s", 1, "c", &output_key("s", "c", 1)).await.unwrap();
    assert!(store.get("s").await.unwrap().unwrap().steps.is_empty());
    store.fail("s", 1, &error("bad_request")).await.unwrap();
    let job = store.get("s").await.unwrap().unwrap();
    assert_eq!((job.state, job.error), (JobState::Failed, Some(error("bad_request"))));
    use EventKind::*;
    assert_eq!(
        kinds(&store, "s").await,
        vec![
            Accepted,
            Claimed,
            OutputSucceeded,
            OutputSucceeded,
            Compensating,
            Compensating,
            OutputDeleted,
            OutputDeleted,
            OutputDeleted,
            Failed
        ]
    );
    let view = fold(&store.events("s").await.unwrap()).unwrap();
    assert_eq!((view.state, view.outputs.len(), view.failed_output.as_deref()), (JobState::Failed, 0, Some("b")));
}

async fn a_saga_that_used_up_its_attempts_is_turned_back_and_claimed_to_compensate(backend: Backend) {
    let (store, outbox) = backend.open_with_outbox().await;
    // Polling: the claim after the last attempt turns it back and claims it at once.
    store.create(saga("polled", &["a", "b"])).await.unwrap();
    store.claim("d", LONG, 1).await.unwrap().unwrap();
    store.record_output("polled", 1, "a", &made("polled", "a", 1)).await.unwrap();
    store.release("polled", 1, &error("unavailable"), Duration::ZERO).await.unwrap();
    let job = store.claim("d", LONG, 1).await.unwrap().expect("claimed to compensate");
    assert_eq!(job.attempt, 2);
    assert!(job.compensate.as_ref().is_some_and(|e| e.code == "unavailable" && e.message.contains("gave up after 1 attempts")), "{job:?}");
    assert_eq!(job.steps.len(), 1, "what it made is still there to delete");
    use EventKind::*;
    assert_eq!(kinds(&store, "polled").await, vec![Accepted, Claimed, OutputSucceeded, Released, Compensating, Claimed]);
    // A turned-back saga is claimed again whatever its attempts, and turned back once.
    store.release("polled", 2, &error("unavailable"), Duration::ZERO).await.unwrap();
    let again = store.claim("d", LONG, 1).await.unwrap().expect("claimed again to compensate");
    assert_eq!(again.attempt, 3);
    assert_eq!(kinds(&store, "polled").await.iter().filter(|k| **k == Compensating).count(), 1);

    // By id: the same.
    store.create(saga("woken", &["a"])).await.unwrap();
    let ids = vec!["woken".to_string()];
    store.claim_ids("d", LONG, 1, &ids).await.unwrap();
    store.release("woken", 1, &error("unavailable"), Duration::ZERO).await.unwrap();
    let answers = store.claim_ids("d", LONG, 1, &ids).await.unwrap();
    assert!(matches!(&answers[0], ClaimById::Claimed(job) if job.attempt == 2 && job.compensate.is_some()), "{answers:?}");

    // A lease that ran out on the last attempt: the sweep turns it back and queues it.
    store.create(saga("expired", &["a"])).await.unwrap();
    store.claim_ids("crashed", Duration::from_millis(50), 1, &["expired".to_string()]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    outbox.rescue_expired(1).await.unwrap();
    let job = store.get("expired").await.unwrap().unwrap();
    assert_eq!((job.state, job.compensate.is_some()), (JobState::Queued, true));
    assert_eq!(kinds(&store, "expired").await, vec![Accepted, Claimed, LeaseExpired, Compensating]);
    let answers = store.claim_ids("d", LONG, 1, &["expired".to_string()]).await.unwrap();
    assert!(matches!(&answers[0], ClaimById::Claimed(job) if job.attempt == 2), "{answers:?}");
}

async fn views_are_replaced_only_by_later_ones_and_list_newest_first_a_page_at_a_time(backend: Backend) {
    let store = backend.open().await;
    let views: Arc<dyn Views> = match &backend {
        Backend::Sqlite(dir) => Arc::new(SqliteJobStore::open(&dir.path().join("jobs.db")).await.unwrap()),
        Backend::Postgres(db) => Arc::new(PostgresJobStore::connect(&db.url, 4, Duration::from_secs(5)).await.unwrap()),
    };
    let mut all = Vec::new();
    for i in 0..5 {
        let id = format!("v{i}");
        store.create(new_job(&id, None, &id)).await.unwrap();
        let mut view = fold(&store.events(&id).await.unwrap()).unwrap();
        // Distinct creation times, oldest first; two share one (the id breaks the tie).
        view.created_at = 1_000 + [0, 1, 2, 2, 3][i];
        all.push(StoredView { owner: if i == 4 { "bob".into() } else { "alice".into() }, view });
    }
    assert_eq!(views.projector_cursor().await.unwrap(), None);
    views.put_views(&all, Some(42)).await.unwrap();
    views.put_views(&[], Some(7)).await.unwrap();
    assert_eq!(views.projector_cursor().await.unwrap(), Some(42), "the cursor never moves back");
    // An older view does not replace a newer one; a newer one does.
    let mut newer = all[0].clone();
    newer.view.seq = 2;
    newer.view.state = JobState::Processing;
    views.put_views(std::slice::from_ref(&newer), None).await.unwrap();
    views.put_views(std::slice::from_ref(&all[0]), None).await.unwrap();
    assert_eq!(views.view("v0").await.unwrap(), Some(newer.clone()));
    assert_eq!(views.views_of(&["v0".into(), "v9".into(), "v1".into()]).await.unwrap().len(), 2);
    // alice's, newest first; a page at a time; by state.
    let ids = |v: Vec<StoredView>| v.into_iter().map(|v| v.view.id).collect::<Vec<_>>();
    assert_eq!(ids(views.list_views("alice", None, None, 10).await.unwrap()), vec!["v3", "v2", "v1", "v0"]);
    let page = views.list_views("alice", None, None, 2).await.unwrap();
    let last = page.last().unwrap().view.clone();
    let after = ViewsAfter { created_at: last.created_at, id: last.id };
    assert_eq!(ids(page), vec!["v3", "v2"]);
    assert_eq!(ids(views.list_views("alice", None, Some(&after), 2).await.unwrap()), vec!["v1", "v0"]);
    assert_eq!(ids(views.list_views("alice", Some(JobState::Processing), None, 10).await.unwrap()), vec!["v0"]);
    assert_eq!(ids(views.list_views("bob", None, None, 10).await.unwrap()), vec!["v4"]);
    assert!(views.list_views("carol", None, None, 10).await.unwrap().is_empty());
    // What a rebuild walks, and a rebuild's start.
    let jobs = views.jobs_after("v1", 10).await.unwrap();
    assert_eq!(jobs.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), vec!["v2", "v3", "v4"]);
    assert!(jobs.iter().all(|(_, owner)| owner == "alice"), "the owner of the job row");
    assert_eq!(views.owners(&["v0".into(), "v9".into()]).await.unwrap(), vec![("v0".to_string(), "alice".to_string())]);
    assert!(views.owners(&[]).await.unwrap().is_empty());
    assert_eq!(views.clear_views().await.unwrap(), 5);
    assert_eq!(views.view("v0").await.unwrap(), None);
    // Events after a seq.
    assert_eq!(store.events_since("v0", 0).await.unwrap().len(), 1);
    assert!(store.events_since("v0", 1).await.unwrap().is_empty());
}

fn cache(key: &str) -> CacheKey {
    CacheKey { key: key.into(), lookup: true, only_cached: false }
}

async fn cached(store: &Store, id: &str, key: &str) -> CacheOutcome {
    let (created, outcome) = store.create_cached(new_job(id, None, "h"), &cache(key)).await.unwrap();
    assert!(created.created);
    outcome
}

async fn make(store: &Store, id: &str) {
    let job = store.claim("d", LONG, 5).await.unwrap().unwrap();
    assert_eq!(job.id, id, "the next job to make");
    store.succeed(id, job.attempt, &result()).await.unwrap();
}

async fn an_identical_upload_gets_the_result_that_was_made_and_no_work(backend: Backend) {
    let store = backend.open().await;
    assert_eq!(cached(&store, "first", "k").await, CacheOutcome::Miss);
    make(&store, "first").await;
    let (created, outcome) = store.create_cached(new_job("again", None, "h"), &cache("k")).await.unwrap();
    assert_eq!(outcome, CacheOutcome::Hit { from: "first".into() });
    assert_eq!((created.job.state, created.job.result.clone(), created.job.attempt), (JobState::Succeeded, Some(result()), 0));
    assert!(store.claim("d", LONG, 5).await.unwrap().is_none(), "nothing to make");
    use EventKind::*;
    assert_eq!(kinds(&store, "again").await, vec![Accepted, Cached, Succeeded]);
    let view = fold(&store.events("again").await.unwrap()).unwrap();
    assert_eq!((view.state, view.result, view.cached_from.as_deref()), (JobState::Succeeded, Some(result()), Some("first")));

    // Other work (another key) is a miss; a refresh (`lookup: false`) makes the work again and
    // is the entry from then on.
    assert_eq!(cached(&store, "other", "k2").await, CacheOutcome::Miss);
    make(&store, "other").await;
    let refresh = CacheKey { key: "k".into(), lookup: false, only_cached: false };
    assert_eq!(store.create_cached(new_job("fresh", None, "h"), &refresh).await.unwrap().1, CacheOutcome::Miss);
    assert_eq!(cached(&store, "after", "k").await, CacheOutcome::Joined { leader: "fresh".into() });
    make(&store, "fresh").await;
    assert_eq!(store.get("after").await.unwrap().unwrap().state, JobState::Succeeded);

    // A saga's hit has every output of the saga it reuses.
    let saga_key = cache("saga");
    store.create_cached(saga("s1", &["a", "b"]), &saga_key).await.unwrap();
    make_saga(&store, "s1").await;
    let (created, outcome) = store.create_cached(saga("s2", &["a", "b"]), &saga_key).await.unwrap();
    assert_eq!(outcome, CacheOutcome::Hit { from: "s1".into() });
    assert_eq!(created.job.steps, store.get("s1").await.unwrap().unwrap().steps);
    let view = fold(&store.events("s2").await.unwrap()).unwrap();
    assert_eq!((view.state, view.outputs.len()), (JobState::Succeeded, 2));
    // An idempotent replay is only a replay.
    let keyed = NewJob { idempotency_key: Some("idem".into()), ..new_job("i1", None, "h") };
    store.create_cached(keyed.clone(), &cache("k")).await.unwrap();
    let (replay, outcome) = store.create_cached(NewJob { id: "i2".into(), ..keyed }, &cache("k")).await.unwrap();
    assert_eq!((replay.created, replay.job.id.as_str(), outcome), (false, "i1", CacheOutcome::Replayed));
}

async fn make_saga(store: &Store, id: &str) {
    let job = wait_for_claim(store, "d").await;
    assert_eq!(job.id, id);
    for name in ["a", "b"] {
        store.record_output(id, job.attempt, name, &made(id, name, job.attempt)).await.unwrap();
    }
    let steps = store.get(id).await.unwrap().unwrap().steps;
    store.succeed_outputs(id, job.attempt, &steps).await.unwrap();
}

async fn identical_uploads_while_the_first_is_made_wait_for_it_and_end_with_it(backend: Backend) {
    let (store, outbox) = backend.open_with_outbox().await;
    assert_eq!(cached(&store, "leader", "k").await, CacheOutcome::Miss);
    let job = store.claim("d", LONG, 5).await.unwrap().unwrap();
    for waiter in ["w1", "w2"] {
        assert_eq!(cached(&store, waiter, "k").await, CacheOutcome::Joined { leader: "leader".into() });
    }
    // Waiting jobs are never claimed, by a claim or by a wake-up naming them.
    assert!(store.claim_many("d", LONG, 5, 10).await.unwrap().is_empty());
    assert_eq!(store.claim_ids("d", LONG, 5, &["w1".to_string()]).await.unwrap(), vec![ClaimById::Held { id: "w1".into() }]);
    let stale = outbox.stale_claimable(Duration::ZERO, 100).await.unwrap();
    assert!(stale.is_empty(), "the sweeper does not wake anyone for them: {stale:?}");
    store.succeed("leader", job.attempt, &result()).await.unwrap();
    use EventKind::*;
    for waiter in ["w1", "w2"] {
        let done = store.get(waiter).await.unwrap().unwrap();
        assert_eq!((done.state, done.result, done.attempt), (JobState::Succeeded, Some(result()), 0), "{waiter}");
        assert_eq!(kinds(&store, waiter).await, vec![Accepted, Cached, Succeeded]);
        assert_eq!(fold(&store.events(waiter).await.unwrap()).unwrap().cached_from.as_deref(), Some("leader"));
    }
    // The same through a batch commit, and for a saga's pivot.
    cached(&store, "batched", "k2").await;
    let job = store.claim("d", LONG, 5).await.unwrap().unwrap();
    cached(&store, "w3", "k2").await;
    assert_eq!(
        store.succeed_many(&[("batched".into(), job.attempt, result())]).await.into_iter().collect::<Result<Vec<_>, _>>().unwrap().len(),
        1
    );
    assert_eq!(store.get("w3").await.unwrap().unwrap().state, JobState::Succeeded);
    store.create_cached(saga("s1", &["a", "b"]), &cache("saga")).await.unwrap();
    let (_, outcome) = store.create_cached(saga("s2", &["a", "b"]), &cache("saga")).await.unwrap();
    assert_eq!(outcome, CacheOutcome::Joined { leader: "s1".into() });
    make_saga(&store, "s1").await;
    let s2 = store.get("s2").await.unwrap().unwrap();
    assert_eq!((s2.state, s2.steps.len()), (JobState::Succeeded, 2));
    assert_eq!(fold(&store.events("s2").await.unwrap()).unwrap().outputs.len(), 2);
}

async fn when_the_job_waited_for_fails_the_first_waiter_is_made_and_the_others_wait_for_it(backend: Backend) {
    let store = backend.open().await;
    cached(&store, "leader", "k").await;
    let job = store.claim("d", LONG, 5).await.unwrap().unwrap();
    cached(&store, "w1", "k").await;
    tokio::time::sleep(Duration::from_millis(2)).await;
    cached(&store, "w2", "k").await;
    store.fail("leader", job.attempt, &error("unavailable")).await.unwrap();
    use EventKind::*;
    assert_eq!(kinds(&store, "w1").await, vec![Accepted, Cached, Released]);
    assert_eq!(kinds(&store, "w2").await, vec![Accepted, Cached, Cached]);
    let w1 = fold(&store.events("w1").await.unwrap()).unwrap();
    assert_eq!((w1.state, w1.cached_from), (JobState::Queued, None), "made on its own");
    assert_eq!(fold(&store.events("w2").await.unwrap()).unwrap().cached_from.as_deref(), Some("w1"));
    // w1 is claimable now; w2 is not, and ends with w1.
    let job = store.claim_many("d", LONG, 5, 10).await.unwrap();
    assert_eq!(job.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), vec!["w1"]);
    store.succeed("w1", job[0].attempt, &result()).await.unwrap();
    assert_eq!(store.get("w2").await.unwrap().unwrap().state, JobState::Succeeded);
    // A job that fails for having used up its attempts (at a claim) releases its waiters too.
    cached(&store, "doomed", "k3").await;
    store.claim("d", Duration::ZERO, 5).await.unwrap().unwrap();
    cached(&store, "w4", "k3").await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let claimed: Vec<String> = store.claim_many("d", LONG, 1, 10).await.unwrap().into_iter().map(|j| j.id).collect();
    assert_eq!(store.get("doomed").await.unwrap().unwrap().state, JobState::Failed);
    assert_eq!(claimed, vec!["w4".to_string()], "released, then claimed by the same claim");
    assert_eq!(kinds(&store, "w4").await[..3], [Accepted, Cached, Released]);

    // The entry still names the failed job: the next identical upload is made, and is the entry.
    assert_eq!(cached(&store, "next", "k").await, CacheOutcome::Miss);
    assert_eq!(cached(&store, "after", "k").await, CacheOutcome::Joined { leader: "next".into() });
}

async fn racing_identical_uploads_elect_one_job_to_make_the_result(backend: Backend) {
    let handles = [backend.open().await, backend.open().await];
    let mut tasks = Vec::new();
    for i in 0..10 {
        let s = handles[i % 2].clone();
        tasks.push(tokio::spawn(async move { s.create_cached(new_job(&format!("race-{i}"), None, "h"), &cache("same")).await }));
    }
    let mut misses = Vec::new();
    let mut leaders = Vec::new();
    for t in tasks {
        match t.await.unwrap().unwrap() {
            (created, CacheOutcome::Miss) => misses.push(created.job.id),
            (_, CacheOutcome::Joined { leader }) => leaders.push(leader),
            (_, other) => panic!("{other:?}"),
        }
    }
    assert_eq!(misses.len(), 1, "one job makes it: {misses:?}");
    assert!(leaders.iter().all(|l| *l == misses[0]), "{leaders:?} wait for {misses:?}");
    let store = &handles[0];
    make(store, &misses[0]).await;
    for i in 0..10 {
        assert_eq!(store.get(&format!("race-{i}")).await.unwrap().unwrap().state, JobState::Succeeded);
    }
}

async fn a_cache_entry_lives_as_long_as_the_job_it_names(backend: Backend) {
    let store = backend.open().await;
    cached(&store, "first", "k").await;
    make(&store, "first").await;
    assert_eq!(cached(&store, "hit", "k").await, CacheOutcome::Hit { from: "first".into() });
    let cutoff = pixmesh_chassis::time::now_ms() + 1;
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(store.prune(cutoff, 100).await.unwrap(), 2);
    // The result's job is gone, and its entry with it: the work is made again.
    assert_eq!(cached(&store, "again", "k").await, CacheOutcome::Miss);
    assert_eq!(store.claim("d", LONG, 5).await.unwrap().unwrap().id, "again");
}

async fn an_upload_by_digest_alone_is_made_only_from_the_cache(backend: Backend) {
    let store = backend.open().await;
    let only = |key: &str| CacheKey { key: key.into(), lookup: true, only_cached: true };
    // What the upload service sends for an image it did not get: the digest, nothing else.
    let bare = |id: &str| NewJob { input: BlobRef::at_digest("a".repeat(64), 0), input_format: String::new(), ..new_job(id, None, "h") };
    let err = store.create_cached(bare("nothing"), &only("k")).await.unwrap_err();
    assert!(matches!(err, StoreError::NotCached), "{err}");
    assert!(store.get("nothing").await.unwrap().is_none(), "nothing was created");
    assert_eq!(cached(&store, "first", "k").await, CacheOutcome::Miss, "and the entry was not taken");
    // While it is made: a join, with the input of the job it waits for.
    let (created, outcome) = store.create_cached(bare("joined"), &only("k")).await.unwrap();
    assert_eq!(outcome, CacheOutcome::Joined { leader: "first".into() });
    assert_eq!((created.job.input.size, created.job.input_format.as_str()), (10, "jpeg"));
    make(&store, "first").await;
    let (created, outcome) = store.create_cached(bare("hit"), &only("k")).await.unwrap();
    assert_eq!(outcome, CacheOutcome::Hit { from: "first".into() });
    assert_eq!((created.job.state, created.job.input.size, created.job.input_format.as_str()), (JobState::Succeeded, 10, "jpeg"));
    assert_eq!(store.get("joined").await.unwrap().unwrap().state, JobState::Succeeded);
    // A failed job is no source either.
    cached(&store, "doomed", "k2").await;
    let job = store.claim("d", LONG, 5).await.unwrap().unwrap();
    store.fail(&job.id, job.attempt, &error("corrupt_image")).await.unwrap();
    assert!(matches!(store.create_cached(bare("late"), &only("k2")).await, Err(StoreError::NotCached)));
}
