//! The relay, the sweeper and the KV registry against real NATS servers: the machine's (each
//! test in a namespace of its own) and, for a wipe, one the test starts itself.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use futures_util::StreamExt;
use pixmesh_model::{BlobRef, ClaimById, JobError, JobEvent, JobStore, NewJob, Options, Outbox};
use pixmesh_queue::registry::{Member, NatsRegistration, NatsWatch};
use pixmesh_queue::relay::{self, RelaySettings};
use pixmesh_queue::{Queue, QueueConfig, Wake};
use pixmesh_store::SqliteJobStore;
use pixmesh_test_support::nats::{NatsServer, namespaced_url};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(30);

fn config(url: &str) -> QueueConfig {
    QueueConfig { url: url.into(), sweep_after_ms: 300, sweep_interval_ms: 100, relay_lease_ms: 600, ..QueueConfig::default() }
}

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

async fn store() -> (tempfile::TempDir, Arc<SqliteJobStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteJobStore::open(&dir.path().join("jobs.db")).await.unwrap());
    (dir, store)
}

fn spawn_relay(queue: &Queue, outbox: Arc<dyn Outbox>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(relay::run(queue.clone(), outbox, RelaySettings { max_attempts: 5 }, std::future::pending()))
}

/// Every message of a stream, in stream order.
async fn all_messages(queue: &Queue, stream: &str) -> Vec<async_nats::jetstream::Message> {
    let stream = queue.jetstream().get_stream(stream).await.unwrap();
    let count = stream.get_info().await.unwrap().state.messages as usize;
    if count == 0 {
        return Vec::new();
    }
    let consumer = stream.create_consumer(pull::Config { deliver_policy: DeliverPolicy::All, ..Default::default() }).await.unwrap();
    let mut batch = consumer.batch().max_messages(count).expires(Duration::from_secs(2)).messages().await.unwrap();
    let mut out = Vec::new();
    while let Some(m) = batch.next().await {
        out.push(m.unwrap());
    }
    out
}

async fn stream_count(queue: &Queue, stream: &str) -> u64 {
    match queue.jetstream().get_stream(stream).await {
        Ok(s) => s.get_info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

async fn wait_for(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < timeout, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_publish_every_event_once_in_order_and_one_wake_up_per_claimable_period() {
    let (_dir, store) = store().await;
    let url = namespaced_url();
    let queue = Queue::connect(&config(&url), "test").await.unwrap();
    // Two relays at once: one holds the lease and publishes, the other stands by.
    let relays = [spawn_relay(&queue, store.clone()), spawn_relay(&queue, store.clone())];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids: Vec<String> = (0..30).map(|i| format!("job{i:02}")).collect();
    for id in &ids {
        store.create(new_job(id)).await.unwrap();
    }
    for answer in store.claim_ids("d", LONG, 5, &ids[..10]).await.unwrap() {
        let ClaimById::Claimed(job) = answer else { panic!("{answer:?}") };
        if job.id.as_str() < "job05" {
            let error = JobError { code: "unavailable".into(), message: "test".into() };
            store.release(&job.id, 1, &error, Duration::ZERO).await.unwrap();
        } else {
            store.fail(&job.id, 1, &JobError { code: "corrupt_image".into(), message: "test".into() }).await.unwrap();
        }
    }
    // The same job's wake-up sent early (as the upload service does) is stored once.
    queue.publish_wake(&Wake { job: ids[29].clone(), attempt: 0 }).await.unwrap();

    let mut expected = 0;
    for id in &ids {
        expected += store.events(id).await.unwrap().len() as u64;
    }
    let names = queue.names().clone();
    let took = wait_for("every event on the stream", Duration::from_secs(20), async || {
        stream_count(&queue, &names.events_stream).await >= expected
    })
    .await;
    println!("{expected} events relayed in {took:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let messages = all_messages(&queue, &names.events_stream).await;
    assert_eq!(messages.len() as u64, expected, "each event once");
    let mut per_job: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for m in &messages {
        let event: JobEvent = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(m.subject.as_str(), names.events_subject(&event.job_id));
        per_job.entry(event.job_id).or_default().push(event.seq);
    }
    for id in &ids {
        let seqs = &per_job[id];
        let want: Vec<u32> = (1..=store.events(id).await.unwrap().len() as u32).collect();
        assert_eq!(seqs, &want, "{id}: in order, none missing");
    }
    // Wake-ups: one per job accepted, one per release (5); none for the failed jobs' claims.
    let wakes = all_messages(&queue, &names.wake_stream).await;
    let wakes: Vec<Wake> = wakes.iter().map(|m| serde_json::from_slice(&m.payload).unwrap()).collect();
    let unique: HashSet<String> = wakes.iter().map(Wake::msg_id).collect();
    assert_eq!(unique.len(), wakes.len(), "no duplicates: {wakes:?}");
    assert_eq!(wakes.len(), 35, "{wakes:?}");
    assert!(wakes.iter().filter(|w| w.attempt == 1).all(|w| w.job.as_str() < "job05"));
    for relay in relays {
        relay.abort();
    }
    pixmesh_test_support::nats::drop_namespace(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_broker_is_wiped_every_claimable_job_is_woken_again() {
    let (_dir, store) = store().await;
    let mut server = NatsServer::start().await.unwrap();
    let queue = Queue::connect(&config(&server.url()), "test").await.unwrap();
    let relay = spawn_relay(&queue, store.clone());
    for i in 0..20 {
        store.create(new_job(&format!("job{i:02}"))).await.unwrap();
    }
    let wake_stream = queue.names().wake_stream.clone();
    wait_for("20 wake-ups", Duration::from_secs(20), async || stream_count(&queue, &wake_stream).await == 20).await;

    server.wipe_and_start_again().await.unwrap();
    let wiped = Instant::now();
    assert_eq!(stream_count(&queue, &wake_stream).await, 0, "the broker lost everything");
    // The sweeper finds the 20 jobs still claimable and wakes for them again (the streams are
    // made again on the way); jobs created after the wipe are relayed as usual.
    store.create(new_job("after")).await.unwrap();
    let took =
        wait_for("21 wake-ups after the wipe", Duration::from_secs(30), async || stream_count(&queue, &wake_stream).await == 21).await;
    println!("every claimable job woken again {:?} after the wipe ({took:?} of waiting)", wiped.elapsed());
    let wakes = all_messages(&queue, &wake_stream).await;
    let jobs: HashSet<String> = wakes.iter().map(|m| serde_json::from_slice::<Wake>(&m.payload).unwrap().job).collect();
    assert_eq!(jobs.len(), 21);
    relay.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_join_and_leave_the_kv_registry_within_a_second() {
    let url = namespaced_url();
    let mut watch = NatsWatch::new(&url);
    let first = tokio::time::timeout(Duration::from_secs(5), watch.next()).await.unwrap().unwrap();
    assert_eq!(first, vec![], "an empty bucket is an empty set");
    let member = |port: u16| Member { address: format!("127.0.0.1:{port}"), capacity: 4, transfers: 16, heartbeat_ms: 200 };

    let joined = Instant::now();
    let a = NatsRegistration::start(&url, "worker-a", member(1)).await.unwrap();
    let set = tokio::time::timeout(Duration::from_secs(1), watch.next()).await.expect("join seen within 1 s").unwrap();
    assert_eq!(set, vec![member(1)]);
    println!("join seen after {:?}", joined.elapsed());

    // A worker that dies without a word (one put, no heartbeats) is dropped after 3 missed ones.
    let client = async_nats::connect(url.rsplit_once('/').unwrap().0).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let bucket = js.get_key_value(queue_names(&url).workers_bucket).await.unwrap();
    bucket.put("worker-b", serde_json::to_vec(&member(2)).unwrap().into()).await.unwrap();
    let set = tokio::time::timeout(Duration::from_secs(1), watch.next()).await.unwrap().unwrap();
    assert_eq!(set, vec![member(1), member(2)]);
    let died = Instant::now();
    let set = tokio::time::timeout(Duration::from_secs(2), watch.next()).await.expect("expiry").unwrap();
    assert_eq!(set, vec![member(1)], "the live worker stays (its heartbeats come)");
    let after = died.elapsed();
    println!("silent worker dropped after {after:?}");
    assert!(after >= Duration::from_millis(500) && after < Duration::from_millis(1000), "{after:?}");

    let left = Instant::now();
    a.deregister().await;
    let set = tokio::time::timeout(Duration::from_secs(1), watch.next()).await.expect("leave seen within 1 s").unwrap();
    assert_eq!(set, vec![]);
    println!("leave seen after {:?}", left.elapsed());
    pixmesh_test_support::nats::drop_namespace(&url).await;
}

fn queue_names(url: &str) -> pixmesh_queue::Names {
    pixmesh_queue::nats_url("test", url).unwrap().names()
}
