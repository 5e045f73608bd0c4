//! `pixmesh-loadgen dispatch`: how fast distributors move accepted jobs through a job store,
//! with instant workers, and how long a new job waits to be claimed.
//!
//! 1. Throughput: `jobs` jobs are recorded in the store (by this process, as the upload service
//!    would), then `distributors` real `pixmesh distributor` processes start against it, with
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
}

fn job(id: String, input: &BlobRef) -> NewJob {
    NewJob {
        id,
        owner: "bench".into(),
        input: input.clone(),
        input_format: "png".into(),
        options: Options { width: Some(8), ..Options::default() },
        idempotency_key: None,
        request_hash: "bench".into(),
    }
}

/// Starts one distributor process and waits until it announces itself.
async fn distributor(run: &Dispatch, workers: &[String]) -> anyhow::Result<Child> {
    let mut cmd = Command::new(&run.pixmesh);
    cmd.arg("--database").arg(&run.database);
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

async fn wait_done(stores: &Stores, total: u64, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
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
        if Instant::now() > deadline {
            bail!("only {ended} of {total} jobs ended within {within:?}: {counts:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn first(events: &[JobEvent], kind: EventKind) -> Option<i64> {
    events.iter().find(|e| e.kind() == kind).map(|e| e.at)
}

pub async fn run(run: Dispatch) -> anyhow::Result<serde_json::Value> {
    let (workers, _) = start_workers(4, 0, Duration::ZERO, 1.0, 256).await?;
    let config = StoreConfig::default().with_data_dir(&run.data_dir).with_database(&run.database);
    let stores = Stores::open(&config).await?;
    let input = stores.blobs.put(Bytes::from_static(b"\x89PNG bench input")).await?;

    // 1. Throughput over jobs already accepted.
    let started = Instant::now();
    for i in 0..run.jobs {
        stores.jobs.create(job(format!("t{i:07}"), &input)).await?;
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
        stores.jobs.create(job(format!("l{i:07}"), &input)).await?;
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
    Ok(json!({
        "database": run.database.split('@').next_back().unwrap_or_default(),
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
