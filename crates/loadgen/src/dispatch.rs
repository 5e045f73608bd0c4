//! `pixmesh-loadgen dispatch`: how fast distributors move accepted jobs through a job store,
//! with instant workers, and how long a new job waits to be claimed.
//!
//! 1. Throughput: `jobs` jobs are recorded in the store (by this process, as the upload service
//!    would, early wake-up included when there is a broker), then `distributors` real `pixmesh distributor` processes start against it, with
//!    simulated gRPC workers that answer at once (no pixels). Jobs/s is measured from the job
//!    log itself: from the first `claimed` event to the last `succeeded` one, so process start
//!    and the store's warm-up are not counted.
//! 2. Latency: with the distributors running and idle, `latency_jobs` jobs are recorded at a
//!    fixed `latency_rate`; each job's wait is its first `claimed` event minus its `accepted`
//!    one (both stamped by the store's writers, in milliseconds).

use crate::balance::start_workers;
use crate::open_loop::percentiles;
use anyhow::{Context, bail};
use bytes::Bytes;
use pixmesh_store::{BlobRef, EventKind, JobEvent, JobState, NewJob, Options, StoreConfig, Stores};
use serde_json::json;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub struct Dispatch {
    pub pixmesh: PathBuf,
    pub database: String,
    pub data_dir: PathBuf,
    pub jobs: usize,
    pub distributors: usize,
    pub concurrency: usize,
    pub latency_jobs: usize,
    pub latency_rate: u64,
    pub sets: Vec<String>,
    pub queue: Option<String>,
}

fn job(id: String, input: &BlobRef) -> NewJob {
    NewJob {
        id,
        owner: "bench".into(),
        input: input.clone(),
        input_format: "png".into(),
        options: Options { width: Some(8), ..Options::default() },
        outputs: Vec::new(),
        idempotency_key: None,
        request_hash: "bench".into(),
        traceparent: None,
    }
}

/// Starts one distributor process and waits until it announces itself.
async fn distributor(run: &Dispatch, workers: &[String]) -> anyhow::Result<Child> {
    let mut cmd = Command::new(&run.pixmesh);
    cmd.arg("--database").arg(&run.database);
    if let Some(queue) = &run.queue {
        cmd.arg("--queue").arg(queue);
    }
    let list = workers.iter().map(|w| format!("\"{w}\"")).collect::<Vec<_>>().join(",");
    for set in [
        format!("store.data_dir={}", run.data_dir.display()),
        format!("distributor.workers=[{list}]"),
        // Instant workers: the limit is the store, not the workers' slots.
        "distributor.worker_capacity=256".to_string(),
        format!("distributor.concurrency={}", run.concurrency),
        "log.level=warn".to_string(),
    ]
    .into_iter()
    .chain(run.sets.iter().cloned())
    {
        cmd.arg("--set").arg(set);
    }
    cmd.arg("distributor").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit()).kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| format!("cannot start {}", run.pixmesh.display()))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if line.contains("\"listening\"") {
                return Ok(());
            }
        }
        bail!("the distributor exited before it was ready")
    })
    .await
    .context("the distributor did not start within 30 s")??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(child)
}

/// Waits until `total` jobs of the store ended (none failed), for at most `within`.
///
/// Counting scans the job table: done every 10 ms it took a fifth of this machine's CPU from
/// the system being measured. So the next count comes when about a quarter of the jobs left
/// should have ended at the rate seen so far (between 5 ms and 250 ms): few counts while
/// much is left, and the end still seen within a few milliseconds for callers that time it.
pub(crate) async fn wait_done(stores: &Stores, total: u64, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    let mut first_seen: Option<(Instant, u64)> = None;
    loop {
        let counts = stores.jobs.counts().await?;
        let ended: u64 = counts.iter().filter(|(s, _)| s.is_terminal()).map(|(_, n)| n).sum();
        if ended >= total {
            let failed: u64 = counts.iter().filter(|(s, _)| *s == JobState::Failed).map(|(_, n)| n).sum();
            if failed > 0 {
                bail!("{failed} jobs failed");
            }
            return Ok(());
        }
        let now = Instant::now();
        if now > deadline {
            bail!("only {ended} of {total} jobs ended within {within:?}: {counts:?}");
        }
        let (since, base) = *first_seen.get_or_insert((now, ended));
        let rate = ended.saturating_sub(base) as f64 / now.duration_since(since).as_secs_f64().max(1e-3);
        let wait = if rate > 0.0 { Duration::from_secs_f64((total - ended) as f64 / rate / 4.0) } else { Duration::from_millis(50) };
        tokio::time::sleep(wait.clamp(Duration::from_millis(5), Duration::from_millis(250))).await;
    }
}

fn first(events: &[JobEvent], kind: EventKind) -> Option<i64> {
    events.iter().find(|e| e.kind() == kind).map(|e| e.at)
}

pub async fn run(run: Dispatch) -> anyhow::Result<serde_json::Value> {
    let (workers, _) = start_workers(4, 0, Duration::ZERO, 1.0, 256).await?;
    let config = StoreConfig::default().with_data_dir(&run.data_dir).with_database(&run.database);
    let mut stores = Stores::open(&config).await?;
    if let Some(url) = &run.queue {
        let queue =
            pixmesh_queue::Queue::connect(&pixmesh_queue::QueueConfig { url: url.clone(), ..Default::default() }, "loadgen").await?;
        stores = stores.with_notify(std::sync::Arc::new(queue));
    }
    let input = stores.blobs.put(Bytes::from_static(b"\x89PNG bench input")).await?;

    // 1. Throughput over jobs already accepted.
    let started = Instant::now();
    for i in 0..run.jobs {
        let created = stores.jobs.create(job(format!("t{i:07}"), &input)).await?;
        // With a broker, the wake-up the upload service would have sent (the stream keeps it
        // until the distributors start).
        stores.job_created(&created.job.id, None);
    }
    let accept_per_second = run.jobs as f64 / started.elapsed().as_secs_f64();
    let mut children = Vec::new();
    for _ in 0..run.distributors {
        children.push(distributor(&run, &workers).await?);
    }
    wait_done(&stores, run.jobs as u64, Duration::from_secs(600)).await?;
    let (mut first_claim, mut last_success) = (i64::MAX, i64::MIN);
    let mut claimers = std::collections::HashMap::<String, usize>::new();
    for i in 0..run.jobs {
        let events = stores.jobs.events(&format!("t{i:07}")).await?;
        first_claim = first_claim.min(first(&events, EventKind::Claimed).context("a job without a claim")?);
        last_success = last_success.max(first(&events, EventKind::Succeeded).context("a job without a success")?);
        if let Some(e) = events.iter().find(|e| e.kind() == EventKind::Claimed) {
            *claimers.entry(e.data()["owner"].as_str().unwrap_or_default().to_string()).or_default() += 1;
        }
    }
    let span_ms = (last_success - first_claim).max(1);
    let jobs_per_second = run.jobs as f64 * 1000.0 / span_ms as f64;
    let mut shares: Vec<usize> = claimers.values().copied().collect();
    shares.sort_unstable();

    // 2. Wait from accepted to claimed, at a fixed rate, distributors idle in between.
    let period = Duration::from_secs_f64(1.0 / run.latency_rate.max(1) as f64);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for i in 0..run.latency_jobs {
        tick.tick().await;
        let created = stores.jobs.create(job(format!("l{i:07}"), &input)).await?;
        // As the upload service does: the early wake-up, after the commit.
        stores.job_created(&created.job.id, None);
    }
    wait_done(&stores, (run.jobs + run.latency_jobs) as u64, Duration::from_secs(120)).await?;
    let mut waits = Vec::new();
    for i in 0..run.latency_jobs {
        let events = stores.jobs.events(&format!("l{i:07}")).await?;
        let (accepted, claimed) = (first(&events, EventKind::Accepted), first(&events, EventKind::Claimed));
        if let (Some(a), Some(c)) = (accepted, claimed) {
            waits.push(u64::try_from((c - a).max(0)).unwrap_or(0) * 1000);
        }
    }
    for mut child in children {
        let _ = child.kill().await;
    }
    if let Some(url) = &run.queue {
        // The run's namespace goes with it.
        let names = pixmesh_queue::nats_url("--queue", url).map_err(anyhow::Error::msg)?.names();
        let queue =
            pixmesh_queue::Queue::connect(&pixmesh_queue::QueueConfig { url: url.clone(), ..Default::default() }, "loadgen").await?;
        for stream in [names.wake_stream, names.events_stream, names.dead_stream] {
            let _ = queue.jetstream().delete_stream(&stream).await;
        }
    }
    Ok(json!({
        "database": run.database.split('@').next_back().unwrap_or_default(),
        "queue": run.queue.is_some(),
        "jobs": run.jobs,
        "distributors": run.distributors,
        "concurrency": run.concurrency,
        "accept_per_second": accept_per_second,
        "jobs_per_second": jobs_per_second,
        "claims_per_distributor": shares,
        "latency_rate": run.latency_rate,
        "accepted_to_claimed": percentiles(waits),
    }))
}

/// Publish `messages` wake-up-sized messages to a fresh work-queue stream (file storage, the
/// server's default sync, `Nats-Msg-Id` on each, every ack awaited, 256 in flight), then
/// consume and ack them all with a pull consumer: messages/s for the whole loop.
pub async fn jetstream_floor(url: &str, messages: usize) -> anyhow::Result<serde_json::Value> {
    use async_nats::jetstream::{self, consumer::pull, stream};
    use futures_util::StreamExt;
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client);
    let name = format!("PIXMESH_FLOOR_{}", std::process::id());
    let subject = format!("pixmesh.floor.{}", std::process::id());
    let stream = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let payload = Bytes::from_static(br#"{"job":"01a2356e-5173-720f-a31e-893d0b78afb4","attempt":0}"#);
    let started = Instant::now();
    let mut pending = std::collections::VecDeque::new();
    for i in 0..messages {
        let publish = jetstream::message::PublishMessage::build().payload(payload.clone()).message_id(format!("m{i}"));
        pending.push_back(js.send_publish(subject.clone(), publish).await?);
        if pending.len() >= 256
            && let Some(ack) = pending.pop_front()
        {
            ack.await?;
        }
    }
    for ack in pending {
        ack.await?;
    }
    let published = started.elapsed();
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("floor".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let consuming = Instant::now();
    let mut done = 0;
    while done < messages {
        let mut batch = consumer.batch().max_messages(256).expires(Duration::from_secs(1)).messages().await?;
        while let Some(m) = batch.next().await {
            m.map_err(|e| anyhow::anyhow!("{e}"))?.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            done += 1;
        }
    }
    let consumed = consuming.elapsed();
    js.delete_stream(&name).await?;
    let total = published + consumed;
    Ok(json!({
        "messages": messages,
        "publish_per_second": messages as f64 / published.as_secs_f64(),
        "consume_ack_per_second": messages as f64 / consumed.as_secs_f64(),
        "loop_per_second": messages as f64 / total.as_secs_f64(),
    }))
}
