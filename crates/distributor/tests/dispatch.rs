//! The distributor against a real SQLite store and real gRPC workers on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use bytes::Bytes;
use pixmesh_chassis::Shutdown;
use pixmesh_chassis::{ApiError, ErrorCode};
use pixmesh_distributor::{Dispatcher, DistributorConfig, WorkerSet};
use pixmesh_imaging::{Options, OutputFormat};
use pixmesh_proto::v1::image_worker_server::{ImageWorker, ImageWorkerServer};
use pixmesh_proto::v1::{ProcessRequest, ProcessResponse};
use pixmesh_store::{EventKind, JobState, NewJob, Output, StoreConfig, Stores};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

async fn worker() -> (String, Shutdown) {
    slow_worker(Duration::ZERO).await
}

/// A worker that waits `delay` in every call before its pixels.
async fn slow_worker(delay: Duration) -> (String, Shutdown) {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = grpc.local_addr().unwrap().to_string();
    let shutdown = Shutdown::new();
    let config = pixmesh_worker::WorkerConfig { threads: 2, extra_delay_ms: delay.as_millis() as u64, ..Default::default() };
    tokio::spawn(pixmesh_worker::run(config, grpc, admin, shutdown.clone()));
    (addr, shutdown)
}

/// An address where nothing listens (bound, then closed).
async fn dead_address() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().to_string()
}

async fn submit(stores: &Stores, id: &str, image: Vec<u8>) {
    let input = stores.blobs.put(Bytes::from(image)).await.unwrap();
    let options = Options { width: Some(32), format: OutputFormat::Png, ..Options::default() };
    let job = NewJob {
        id: id.into(),
        owner: String::new(),
        input,
        input_format: "jpeg".into(),
        options,
        outputs: Vec::new(),
        idempotency_key: None,
        request_hash: id.into(),
        traceparent: None,
    };
    stores.jobs.create(job).await.unwrap();
}

async fn wait_all_terminal(stores: &Stores, ids: &[String]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut done = 0;
        for id in ids {
            if stores.jobs.get(id).await.unwrap().unwrap().state.is_terminal() {
                done += 1;
            }
        }
        if done == ids.len() {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "only {done} of {} jobs finished", ids.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_workers_are_retried_elsewhere_and_bad_images_fail_once() {
    let dir = tempfile::tempdir().unwrap();
    let stores = Stores::open(&StoreConfig::default().with_data_dir(dir.path())).await.unwrap();
    let (live, live_stop) = worker().await;
    let dead = dead_address().await;
    let config = DistributorConfig { workers: vec![dead.clone(), live.clone()], call_timeout_ms: 5_000, ..DistributorConfig::default() };
    let workers = WorkerSet::with_breaker(Duration::from_millis(config.call_timeout_ms), &config.breaker);
    let source = pixmesh_distributor::discovery::from_config(&config, &Default::default()).unwrap();
    let discovery_stop = Shutdown::new();
    let _discovery = pixmesh_distributor::discovery::spawn(
        source,
        workers.clone(),
        pixmesh_distributor::discovery::Slots::Capacity,
        Duration::from_millis(100),
        discovery_stop.clone(),
    );
    while workers.len() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let mut ids: Vec<String> = Vec::new();
    for i in 0..12 {
        let id = format!("good-{i:02}");
        submit(&stores, &id, pixmesh_test_support::jpeg(200, 100)).await;
        ids.push(id);
    }
    let mut corrupt = pixmesh_test_support::jpeg(200, 100);
    corrupt.truncate(150);
    submit(&stores, "corrupt", corrupt).await;

    let shutdown = Shutdown::new();
    let dispatcher = Dispatcher::new(config, stores.clone(), workers.clone(), "test-distributor".into());
    let running = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { dispatcher.run(shutdown).await }
    });
    let mut all = ids.clone();
    all.push("corrupt".into());
    wait_all_terminal(&stores, &all).await;

    let mut retried = 0;
    for id in &ids {
        let job = stores.jobs.get(id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Succeeded, "{id}: {:?}", job.error);
        assert_eq!(job.result.as_ref().unwrap().width, 32);
        let events = stores.jobs.events(id).await.unwrap();
        assert_eq!(events.iter().filter(|e| e.kind() == EventKind::Succeeded).count(), 1);
        for e in events.iter().filter(|e| e.kind() == EventKind::Retried) {
            assert_eq!(e.data()["worker"], dead.as_str(), "only the dead worker fails");
            retried += 1;
        }
    }
    assert!(retried > 0, "some job was sent to the dead worker first and retried on the live one");
    // Its first refused connection opened its breaker: the jobs picked for it before that
    // answer came are the only ones it saw.
    assert_eq!(workers.endpoint(&dead).unwrap().breaker.state(), pixmesh_distributor::breaker::State::Open);
    assert!(retried <= 8, "{retried} jobs met the dead worker: at most its share of the first burst");

    let bad = stores.jobs.get("corrupt").await.unwrap().unwrap();
    assert_eq!(bad.state, JobState::Failed);
    assert_eq!(bad.attempt, 1);
    assert_eq!(bad.error.unwrap().code, "corrupt_image");
    // It may have met the dead worker first (a retryable failure), but once the live worker
    // said the image is corrupt, nothing was tried again.
    let events = stores.jobs.events("corrupt").await.unwrap();
    assert!(events.iter().filter(|e| e.kind() == EventKind::Retried).all(|e| e.data()["worker"] == dead.as_str()));
    let kinds: Vec<_> = events.iter().map(|e| e.kind()).filter(|k| *k != EventKind::Retried).collect();
    assert_eq!(kinds, vec![EventKind::Accepted, EventKind::Claimed, EventKind::Failed], "not retried after the permanent failure");

    shutdown.trigger();
    running.await.unwrap();
    live_stop.trigger();
}

/// A worker whose pool panics on any image containing `marker` (its fault-injection option).
async fn panicking_worker(marker: &str) -> (String, Shutdown) {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = grpc.local_addr().unwrap().to_string();
    let shutdown = Shutdown::new();
    let config = pixmesh_worker::WorkerConfig { threads: 2, fault_panic_marker: marker.into(), ..Default::default() };
    config.validate().unwrap();
    tokio::spawn(pixmesh_worker::run(config, grpc, admin, shutdown.clone()));
    (addr, shutdown)
}

/// A JPEG carrying `text` in a comment segment.
fn jpeg_with_comment(text: &str) -> Vec<u8> {
    let jpeg = pixmesh_test_support::jpeg(200, 100);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xFE]);
    out.extend_from_slice(&((text.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_internal_failure_is_retried_once_on_another_worker_then_the_job_fails() {
    const MARKER: &str = "dispatch-test: panic on this image";
    // The workers run in this process: their panics are counted in its metrics (no other
    // test here makes a worker panic).
    pixmesh_chassis::telemetry::init_metrics("test");
    let panics = || {
        let text = pixmesh_chassis::telemetry::render_metrics();
        text.lines()
            .filter(|l| l.starts_with("pixmesh_worker_panics_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let mut panics_before = 0.0;
    for (worker_count, calls) in [(3, 2.0), (1, 1.0)] {
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::open(&StoreConfig::default().with_data_dir(dir.path())).await.unwrap();
        let mut addresses = Vec::new();
        let mut stops = Vec::new();
        for _ in 0..worker_count {
            let (addr, stop) = panicking_worker(MARKER).await;
            addresses.push(addr);
            stops.push(stop);
        }
        let config = DistributorConfig { workers: addresses, call_timeout_ms: 10_000, ..DistributorConfig::default() };
        let workers = WorkerSet::with_breaker(Duration::from_millis(config.call_timeout_ms), &config.breaker);
        let source = pixmesh_distributor::discovery::from_config(&config, &Default::default()).unwrap();
        let discovery_stop = Shutdown::new();
        let _discovery = pixmesh_distributor::discovery::spawn(
            source,
            workers.clone(),
            pixmesh_distributor::discovery::Slots::Capacity,
            Duration::from_millis(100),
            discovery_stop.clone(),
        );
        while workers.len() < worker_count {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        submit(&stores, "poison", jpeg_with_comment(MARKER)).await;
        submit(&stores, "good", jpeg_with_comment("an ordinary comment")).await;

        let shutdown = Shutdown::new();
        let dispatcher = Dispatcher::new(config, stores.clone(), workers.clone(), "test-distributor".into());
        let running = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { dispatcher.run(shutdown).await }
        });
        wait_all_terminal(&stores, &["poison".to_string(), "good".to_string()]).await;

        let good = stores.jobs.get("good").await.unwrap().unwrap();
        assert_eq!(good.state, JobState::Succeeded, "{worker_count} workers: {:?}", good.error);
        let poison = stores.jobs.get("poison").await.unwrap().unwrap();
        assert_eq!(poison.state, JobState::Failed, "{worker_count} workers");
        assert_eq!(poison.attempt, 1, "{worker_count} workers: never sent back to the queue");
        let error = poison.error.unwrap();
        assert_eq!(error.code, "internal");
        assert_eq!(error.message, "the image could not be processed: an internal error occurred");
        // Two calls with three workers (the retry failed too); one with a single worker (no
        // other worker to retry on): the job fails rather than wait for a worker it crashed.
        let events = stores.jobs.events("poison").await.unwrap();
        let kinds: Vec<_> = events.iter().map(|e| e.kind()).collect();
        assert_eq!(kinds, vec![EventKind::Accepted, EventKind::Claimed, EventKind::Retried, EventKind::Failed], "{worker_count} workers");
        assert_eq!(panics() - panics_before, calls, "{worker_count} workers: calls that panicked");
        panics_before = panics();

        shutdown.trigger();
        running.await.unwrap();
        discovery_stop.trigger();
        for stop in stops {
            stop.trigger();
        }
    }
}

/// Scripted workers that answer from one shared list, a call at a time, whichever of them
/// gets the call: `internal` (a worker that caught a panic on the pixels) or `unavailable`
/// (one that could not get the input, before any pixel). Past the list, `internal`.
#[derive(Clone)]
struct Scripted {
    answers: Arc<Vec<ErrorCode>>,
    calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl ImageWorker for Scripted {
    async fn process(&self, _: tonic::Request<ProcessRequest>) -> Result<tonic::Response<ProcessResponse>, tonic::Status> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let code = self.answers.get(n).copied().unwrap_or(ErrorCode::Internal);
        let message = match code {
            ErrorCode::Unavailable => "the worker could not get the blob store: connection refused",
            _ => "the image could not be processed: an internal error occurred",
        };
        Err(ApiError::new(code, message).to_grpc_status())
    }
}

async fn scripted_worker(script: &Scripted) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let service = ImageWorkerServer::new(script.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_an_internal_failure_that_never_reached_the_image_sends_the_job_back_to_the_queue() {
    // Claim 1: an `internal` answer, then `unavailable` (the retry could not get the input, as
    // when the blob store is down): the job goes back to the queue instead of failing for an
    // outage. Claim 2: `internal` twice: two calls reached the image and crashed, it fails.
    let script = Scripted {
        answers: Arc::new(vec![ErrorCode::Internal, ErrorCode::Unavailable, ErrorCode::Internal, ErrorCode::Internal]),
        calls: Arc::new(AtomicUsize::new(0)),
    };
    let dir = tempfile::tempdir().unwrap();
    let stores = Stores::open(&StoreConfig::default().with_data_dir(dir.path())).await.unwrap();
    let addresses = vec![scripted_worker(&script).await, scripted_worker(&script).await];
    let config = DistributorConfig { workers: addresses.clone(), retry_delay_ms: 50, ..DistributorConfig::default() };
    let workers = WorkerSet::with_breaker(Duration::from_millis(config.call_timeout_ms), &config.breaker);
    workers.update(&[(addresses[0].clone(), 2), (addresses[1].clone(), 2)]);
    submit(&stores, "flaky", jpeg_with_comment("any")).await;
    let shutdown = Shutdown::new();
    let dispatcher = Dispatcher::new(config, stores.clone(), workers, "test-distributor".into());
    let running = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { dispatcher.run(shutdown).await }
    });
    wait_all_terminal(&stores, &["flaky".to_string()]).await;
    shutdown.trigger();
    running.await.unwrap();

    let job = stores.jobs.get("flaky").await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.attempt, 2, "the first claim sent it back to the queue");
    assert_eq!(job.error.unwrap().code, "internal");
    let events = stores.jobs.events("flaky").await.unwrap();
    assert_eq!(
        kinds(&events),
        vec![
            (EventKind::Accepted, 0),
            (EventKind::Claimed, 1),
            (EventKind::Retried, 1),
            (EventKind::Released, 1),
            (EventKind::Claimed, 2),
            (EventKind::Retried, 2),
            (EventKind::Failed, 2),
        ]
    );
    assert_eq!(script.calls.load(Ordering::SeqCst), 4, "two calls per claim");
}

/// A dispatcher on a store in `dir` with one worker at `worker`, running until the returned
/// shutdown is triggered; its worker set is returned for the calls in flight.
async fn dispatcher(dir: &std::path::Path, worker: &str, config: DistributorConfig) -> (Stores, WorkerSet, Shutdown) {
    let stores = Stores::open(&StoreConfig::default().with_data_dir(dir)).await.unwrap();
    let config = DistributorConfig { workers: vec![worker.to_string()], ..config };
    let workers = WorkerSet::with_breaker(Duration::from_millis(config.call_timeout_ms), &config.breaker);
    workers.update(&[(worker.to_string(), 2)]);
    let shutdown = Shutdown::new();
    let dispatcher = Dispatcher::new(config, stores.clone(), workers.clone(), "test-distributor".into());
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move { dispatcher.run(shutdown).await }
    });
    (stores, workers, shutdown)
}

/// Waits until `worker` has `n` calls in flight from `workers`, for at most `within`.
async fn until_in_flight(workers: &WorkerSet, worker: &str, n: usize, within: Duration) -> Duration {
    let started = Instant::now();
    while workers.endpoint(worker).unwrap().in_flight() != n {
        assert!(started.elapsed() < within, "{worker} does not have {n} calls in flight after {within:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    started.elapsed()
}

fn kinds(events: &[pixmesh_store::JobEvent]) -> Vec<(EventKind, u32)> {
    events.iter().map(|e| (e.kind(), e.attempt)).collect()
}

/// Short leases renewed often; calls last several leases.
fn short_leases() -> DistributorConfig {
    DistributorConfig { lease_ms: 600, lease_renew_ms: 150, call_timeout_ms: 20_000, max_claim_ms: 30_000, ..DistributorConfig::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_longer_than_the_lease_keeps_its_claim() {
    let dir = tempfile::tempdir().unwrap();
    let (live, live_stop) = slow_worker(Duration::from_millis(2_000)).await;
    let (stores, workers, shutdown) = dispatcher(dir.path(), &live, short_leases()).await;
    submit(&stores, "long", pixmesh_test_support::jpeg(64, 48)).await;
    until_in_flight(&workers, &live, 1, Duration::from_secs(10)).await;
    // Another distributor keeps trying to claim it while the call (over three leases long) runs.
    let lease = Duration::from_millis(600);
    while !stores.jobs.get("long").await.unwrap().unwrap().state.is_terminal() {
        assert!(stores.jobs.claim("other-distributor", lease, 5).await.unwrap().is_none(), "the held claim's lease ran out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let job = stores.jobs.get("long").await.unwrap().unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Succeeded, 1));
    let events = kinds(&stores.jobs.events("long").await.unwrap());
    assert_eq!(events, [(EventKind::Accepted, 0), (EventKind::Claimed, 1), (EventKind::Succeeded, 1)]);
    shutdown.trigger();
    live_stop.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_taken_over_drops_its_call_at_once_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (live, live_stop) = slow_worker(Duration::from_secs(8)).await;
    let (stores, workers, shutdown) = dispatcher(dir.path(), &live, short_leases()).await;
    submit(&stores, "taken", pixmesh_test_support::jpeg(64, 48)).await;
    until_in_flight(&workers, &live, 1, Duration::from_secs(10)).await;
    // As if this distributor had been frozen past its lease: the lease runs out, and another
    // distributor claims the job (attempt 2).
    let lease = Duration::from_secs(60);
    let thief = loop {
        stores.jobs.extend_lease("taken", 1, Duration::ZERO).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
        if let Some(job) = stores.jobs.claim("other-distributor", lease, 5).await.unwrap() {
            break job;
        }
    };
    assert_eq!(thief.attempt, 2);
    // The next renewal is fenced: the call (8 s long) is dropped within a few renewals.
    let dropped = until_in_flight(&workers, &live, 0, Duration::from_secs(4)).await;
    eprintln!("the call was dropped {dropped:?} after the takeover");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let job = stores.jobs.get("taken").await.unwrap().unwrap();
    assert_eq!((job.state, job.attempt, job.lease_owner.as_deref()), (JobState::Processing, 2, Some("other-distributor")));
    let events = kinds(&stores.jobs.events("taken").await.unwrap());
    assert_eq!(events, [(EventKind::Accepted, 0), (EventKind::Claimed, 1), (EventKind::LeaseExpired, 1), (EventKind::Claimed, 2)]);
    shutdown.trigger();
    live_stop.trigger();
}

/// Holds the database's write lock from a connection of its own for `hold` (the store is
/// unavailable to every writer meanwhile).
async fn lock_the_store(dir: &std::path::Path, hold: Duration) {
    use sqlx::Connection;
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(dir.join("pixmesh.db"));
    let mut conn = sqlx::SqliteConnection::connect_with(&options).await.unwrap();
    sqlx::query("BEGIN IMMEDIATE").execute(&mut conn).await.unwrap();
    tokio::time::sleep(hold).await;
    sqlx::query("ROLLBACK").execute(&mut conn).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewals_ride_out_a_store_outage_shorter_than_the_lease_and_give_up_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (live, live_stop) = slow_worker(Duration::from_secs(6)).await;
    let config = DistributorConfig { lease_ms: 2_000, lease_renew_ms: 400, ..short_leases() };
    let (stores, workers, shutdown) = dispatcher(dir.path(), &live, config).await;

    // Unavailable for less than a lease: the renewal waits, goes through, and the claim holds.
    submit(&stores, "short-outage", pixmesh_test_support::jpeg(64, 48)).await;
    until_in_flight(&workers, &live, 1, Duration::from_secs(10)).await;
    lock_the_store(dir.path(), Duration::from_millis(800)).await;
    wait_all_terminal(&stores, &["short-outage".to_string()]).await;
    let events = kinds(&stores.jobs.events("short-outage").await.unwrap());
    assert_eq!(events, [(EventKind::Accepted, 0), (EventKind::Claimed, 1), (EventKind::Succeeded, 1)]);

    // Unavailable for longer than a lease: the claim is given up when its lease runs out,
    // its call (6 s) dropped, nothing written; the job is claimed again afterwards.
    submit(&stores, "long-outage", pixmesh_test_support::jpeg(64, 48)).await;
    until_in_flight(&workers, &live, 1, Duration::from_secs(10)).await;
    let called = Instant::now();
    let lock = tokio::spawn({
        let dir = dir.path().to_path_buf();
        async move { lock_the_store(&dir, Duration::from_secs(4)).await }
    });
    until_in_flight(&workers, &live, 0, Duration::from_secs(10)).await;
    assert!(
        called.elapsed() < Duration::from_millis(5_000),
        "the call was dropped at the lease's end, not at its own: {:?}",
        called.elapsed()
    );
    lock.await.unwrap();
    wait_all_terminal(&stores, &["long-outage".to_string()]).await;
    let job = stores.jobs.get("long-outage").await.unwrap().unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Succeeded, 2));
    let events = kinds(&stores.jobs.events("long-outage").await.unwrap());
    assert_eq!(
        events,
        [
            (EventKind::Accepted, 0),
            (EventKind::Claimed, 1),
            (EventKind::LeaseExpired, 1),
            (EventKind::Claimed, 2),
            (EventKind::Succeeded, 2)
        ]
    );
    shutdown.trigger();
    live_stop.trigger();
}

/// A "frozen" worker: its port accepts connections (the kernel does that for a stopped
/// process too) but nothing ever answers on them.
async fn frozen_worker() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_to_a_worker_that_left_the_set_are_sent_elsewhere_at_once_unless_it_still_answers() {
    let dir = tempfile::tempdir().unwrap();
    let stores = Stores::open(&StoreConfig::default().with_data_dir(dir.path())).await.unwrap();
    let frozen = frozen_worker().await;
    let (draining, draining_stop) = slow_worker(Duration::from_secs(2)).await;
    let (live, live_stop) = worker().await;
    // No retries at all from the budget, one try per claim: what is sent elsewhere here is so
    // outside both.
    let config = DistributorConfig {
        call_timeout_ms: 20_000,
        tries_per_claim: 1,
        retry_budget_percent: 0,
        retry_budget_per_second: 0,
        ..DistributorConfig::default()
    };
    let workers = WorkerSet::with_breaker(Duration::from_millis(config.call_timeout_ms), &config.breaker);
    workers.update(&[(frozen.clone(), 2)]);
    let shutdown = Shutdown::new();
    let dispatcher = Dispatcher::new(config, stores.clone(), workers.clone(), "test-distributor".into());
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move { dispatcher.run(shutdown).await }
    });

    // The frozen worker has the call; then discovery drops it (the registry expired it).
    submit(&stores, "stuck", pixmesh_test_support::jpeg(64, 48)).await;
    until_in_flight(&workers, &frozen, 1, Duration::from_secs(10)).await;
    let dropped = Instant::now();
    workers.update(&[(live.clone(), 2)]);
    wait_all_terminal(&stores, &["stuck".to_string()]).await;
    let took = dropped.elapsed();
    assert!(took < Duration::from_secs(8), "sent elsewhere {took:?} after the worker left, not at the call's 20 s deadline");
    let job = stores.jobs.get("stuck").await.unwrap().unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Succeeded, 1), "{:?}", job.error);
    let events = stores.jobs.events("stuck").await.unwrap();
    assert_eq!(kinds(&events), [(EventKind::Accepted, 0), (EventKind::Claimed, 1), (EventKind::Retried, 1), (EventKind::Succeeded, 1)]);
    assert_eq!(events[2].data()["worker"], frozen.as_str());
    assert_eq!(events[2].data()["code"], "unavailable");

    // A worker that leaves but still answers (deregistered, draining) finishes its call.
    workers.update(&[(draining.clone(), 2)]);
    submit(&stores, "draining", pixmesh_test_support::jpeg(64, 48)).await;
    until_in_flight(&workers, &draining, 1, Duration::from_secs(10)).await;
    let held = workers.endpoint(&draining).unwrap();
    workers.update(&[(live.clone(), 2)]);
    wait_all_terminal(&stores, &["draining".to_string()]).await;
    let events = stores.jobs.events("draining").await.unwrap();
    assert_eq!(kinds(&events), [(EventKind::Accepted, 0), (EventKind::Claimed, 1), (EventKind::Succeeded, 1)], "{events:?}");
    assert_eq!(held.in_flight(), 0);

    shutdown.trigger();
    live_stop.trigger();
    draining_stop.trigger();
}

/// A job with named outputs, made from `input`.
async fn submit_saga(stores: &Stores, id: &str, input: Vec<u8>, outputs: &[(&str, Options)]) {
    let input = stores.blobs.put(Bytes::from(input)).await.unwrap();
    let outputs = outputs.iter().map(|(name, options)| Output { name: name.to_string(), options: options.clone() }).collect();
    let job = NewJob {
        id: id.into(),
        owner: String::new(),
        input,
        input_format: "jpeg".into(),
        options: Options::default(),
        outputs,
        idempotency_key: None,
        request_hash: id.into(),
        traceparent: None,
    };
    stores.jobs.create(job).await.unwrap();
}

/// Every file in a blob directory (its temporary folder aside).
fn blob_files(root: &std::path::Path) -> Vec<String> {
    fn walk(dir: &std::path::Path, root: &std::path::Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if path != root.join("tmp") {
                    walk(&path, root, out);
                }
            } else {
                out.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

fn width(w: u32, format: OutputFormat) -> Options {
    Options { width: Some(w), format, ..Options::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_makes_every_output_at_its_own_key_and_succeeds_once() {
    let dir = tempfile::tempdir().unwrap();
    let (worker, worker_stop) = worker().await;
    let (stores, _workers, shutdown) = dispatcher(dir.path(), &worker, DistributorConfig::default()).await;
    let outputs =
        [("thumb", width(16, OutputFormat::Png)), ("medium", width(48, OutputFormat::Jpeg)), ("small-webp", width(24, OutputFormat::Webp))];
    submit_saga(&stores, "saga", pixmesh_test_support::jpeg(200, 100), &outputs).await;
    wait_all_terminal(&stores, &["saga".to_string()]).await;
    let job = stores.jobs.get("saga").await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert_eq!(job.result, None, "a saga's results are its outputs");
    for (name, options) in &outputs {
        let step = &job.steps[*name];
        assert_eq!(step.result.blob.key.as_deref(), Some(pixmesh_store::output_key("saga", name, 1).as_str()));
        assert_eq!((step.result.width, step.result.format.as_str()), (options.width.unwrap(), options.format.as_str()));
        let bytes = stores.blobs.get(step.result.blob.name()).await.unwrap().unwrap();
        assert_eq!(bytes.len() as u64, step.result.blob.size);
    }
    use EventKind::*;
    let kinds: Vec<_> = stores.jobs.events("saga").await.unwrap().iter().map(|e| e.kind()).collect();
    assert_eq!(kinds, vec![Accepted, Claimed, OutputSucceeded, OutputSucceeded, OutputSucceeded, Succeeded]);
    // The input, and one file per output: nothing else.
    assert_eq!(blob_files(&dir.path().join("blobs")).len(), 4, "{:?}", blob_files(&dir.path().join("blobs")));
    shutdown.trigger();
    worker_stop.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_whose_step_fails_for_good_deletes_what_it_made_and_fails_with_that_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (worker, worker_stop) = worker().await;
    let (stores, _workers, shutdown) = dispatcher(dir.path(), &worker, DistributorConfig::default()).await;
    let blobs = dir.path().join("blobs");
    let before = blob_files(&blobs);
    // `bad` asks for what no worker makes (the upload service would refuse it; a store
    // written by another version might not).
    let bad = Options { rotate: 45, ..Options::default() };
    let outputs = [("a", width(16, OutputFormat::Png)), ("bad", bad), ("c", width(24, OutputFormat::Jpeg))];
    submit_saga(&stores, "doomed", pixmesh_test_support::jpeg(200, 100), &outputs).await;
    wait_all_terminal(&stores, &["doomed".to_string()]).await;
    let job = stores.jobs.get("doomed").await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Failed);
    let error = job.error.unwrap();
    assert_eq!(error.code, "bad_request");
    assert!(error.message.contains("rotate"), "{}", error.message);
    assert!(job.steps.is_empty(), "every output made was deleted: {:?}", job.steps);
    let events = stores.jobs.events("doomed").await.unwrap();
    let deleted: Vec<String> =
        events.iter().filter(|e| e.kind() == EventKind::OutputDeleted).map(|e| e.data()["output"].as_str().unwrap().to_string()).collect();
    assert_eq!(deleted.len(), 2, "a and c were made, then deleted: {deleted:?}");
    let turned = events.iter().find(|e| e.kind() == EventKind::Compensating).expect("a compensating event");
    assert_eq!(turned.data()["output"], "bad");
    assert_eq!(events.last().unwrap().kind(), EventKind::Failed);
    // Only the input is left (plus what was there before).
    assert_eq!(blob_files(&blobs).len(), before.len() + 1, "{:?}", blob_files(&blobs));
    shutdown.trigger();
    worker_stop.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_resumed_after_a_crash_makes_only_what_is_missing_and_leaves_no_orphan() {
    let dir = tempfile::tempdir().unwrap();
    let stores = Stores::open(&StoreConfig::default().with_data_dir(dir.path())).await.unwrap();
    let outputs = [("a", width(16, OutputFormat::Png)), ("b", width(20, OutputFormat::Png)), ("c", width(24, OutputFormat::Png))];
    submit_saga(&stores, "crashed", pixmesh_test_support::jpeg(120, 80), &outputs).await;
    // A first claim that died: it recorded `c`, wrote `a` without recording it, never got to `b`.
    let first = stores.jobs.claim("dead-distributor", Duration::from_millis(100), 5).await.unwrap().unwrap();
    let c =
        stores.blobs.put_at(&pixmesh_store::output_key("crashed", "c", 1), Bytes::from(pixmesh_test_support::png(24, 16))).await.unwrap();
    let result = pixmesh_store::JobResult { blob: c, format: "png".into(), content_type: "image/png".into(), width: 24, height: 16 };
    stores.jobs.record_output("crashed", first.attempt, "c", &result).await.unwrap();
    stores.blobs.put_at(&pixmesh_store::output_key("crashed", "a", 1), Bytes::from_static(b"half a job")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;

    let (worker, worker_stop) = worker().await;
    let (stores, workers, shutdown) = dispatcher(dir.path(), &worker, DistributorConfig::default()).await;
    wait_all_terminal(&stores, &["crashed".to_string()]).await;
    let job = stores.jobs.get("crashed").await.unwrap().unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Succeeded, 2), "{:?}", job.error);
    let attempts: Vec<(&str, u32)> = job.steps.iter().map(|(name, step)| (name.as_str(), step.attempt)).collect();
    assert_eq!(attempts, vec![("a", 2), ("b", 2), ("c", 1)], "c was kept, a and b made by the second claim");
    assert_eq!(workers.endpoint(&worker).unwrap().in_flight(), 0);
    let made: Vec<String> = stores
        .jobs
        .events("crashed")
        .await
        .unwrap()
        .iter()
        .filter(|e| e.kind() == EventKind::OutputSucceeded)
        .map(|e| format!("{}@{}", e.data()["output"].as_str().unwrap(), e.attempt))
        .collect();
    assert_eq!(made.len(), 3, "{made:?}");
    assert_eq!(made[0], "c@1", "{made:?}");
    assert!(made.contains(&"a@2".to_string()) && made.contains(&"b@2".to_string()), "{made:?}");
    // The input and three outputs; the unrecorded `a` of the first claim is gone.
    let files = blob_files(&dir.path().join("blobs"));
    assert_eq!(files.len(), 4, "{files:?}");
    assert_eq!(stores.blobs.get(&pixmesh_store::output_key("crashed", "a", 1)).await.unwrap(), None);
    shutdown.trigger();
    worker_stop.trigger();
}
