//! `pixmesh-loadgen balance`: the distributor's worker picking against simulated workers.
//!
//! Simulated workers are real gRPC `ImageWorker` servers on 127.0.0.1 that take `capacity`
//! calls at once (more wait in line) and answer after a service time (uniform ±50% around
//! the mean), with no pixels. Callers drive them in a closed loop through either pixmesh's
//! `WorkerSet` (power of two choices over peak-EWMA load, per-worker slots, breakers) or plain
//! round-robin (what nginx and HAProxy do by default), and report throughput, latency and the
//! share of calls the slow worker got — in the closed loop, and optionally in a burst sent at
//! once after an idle pause (when the slow worker's latency estimate has gone stale).

use bytes::Bytes;
use pixmesh_distributor::WorkerSet;
use pixmesh_proto::v1::image_worker_client::ImageWorkerClient;
use pixmesh_proto::v1::image_worker_server::{ImageWorker, ImageWorkerServer};
use pixmesh_proto::v1::{ProcessRequest, ProcessResponse};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, Semaphore};
use tonic::transport::Channel;

/// The service time the healthy simulated workers actually gave (a sleep overshoots by up to
/// the timer's 1 ms tick), for the ideal throughput.
#[derive(Default)]
pub struct Served {
    micros: AtomicU64,
    calls: AtomicU64,
}

impl Served {
    /// Mean service time in seconds, if any call was served.
    pub fn mean_seconds(&self) -> Option<f64> {
        let calls = self.calls.load(Ordering::Relaxed);
        (calls > 0).then(|| self.micros.load(Ordering::Relaxed) as f64 / calls as f64 / 1e6)
    }
}

struct SimWorker {
    service: Duration,
    slots: Arc<Semaphore>,
    /// Where to count its service times (healthy workers only).
    served: Option<Arc<Served>>,
}

#[tonic::async_trait]
impl ImageWorker for SimWorker {
    async fn process(&self, _request: tonic::Request<ProcessRequest>) -> Result<tonic::Response<ProcessResponse>, tonic::Status> {
        let _slot = self.slots.acquire().await.map_err(|_| tonic::Status::unavailable("closed"))?;
        let started = Instant::now();
        let jitter = 0.5 + rand::random::<f64>();
        tokio::time::sleep(self.service.mul_f64(jitter)).await;
        if let Some(served) = &self.served {
            served.micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            served.calls.fetch_add(1, Ordering::Relaxed);
        }
        Ok(tonic::Response::new(ProcessResponse::default()))
    }
}

/// Starts `n` simulated workers; the last `slow` are `slow_factor` times slower. Returns their
/// addresses and the healthy ones' service-time tally.
pub async fn start_workers(
    n: usize,
    slow: usize,
    service: Duration,
    slow_factor: f64,
    capacity: usize,
) -> anyhow::Result<(Vec<String>, Arc<Served>)> {
    let served = Arc::new(Served::default());
    let mut addresses = Vec::new();
    for i in 0..n {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        addresses.push(listener.local_addr()?.to_string());
        let is_slow = i >= n - slow;
        let worker = SimWorker {
            service: if is_slow { service.mul_f64(slow_factor) } else { service },
            slots: Arc::new(Semaphore::new(capacity)),
            served: (!is_slow).then(|| Arc::clone(&served)),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ImageWorkerServer::new(worker))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
    }
    Ok((addresses, served))
}

fn request() -> ProcessRequest {
    ProcessRequest { job_id: "bench".into(), attempt: 1, image: Bytes::new(), ops: None, ..Default::default() }
}

/// The callers' side: one worker set (pixmesh's pick) or the plain clients, by policy.
struct Balancer {
    policy: String,
    set: WorkerSet,
    addresses: Vec<String>,
    clients: Vec<ImageWorkerClient<Channel>>,
    next: AtomicUsize,
}

impl Balancer {
    async fn new(addresses: &[String], policy: &str, capacity: usize) -> anyhow::Result<Balancer> {
        if !matches!(policy, "p2c" | "rr" | "pinned") {
            anyhow::bail!("unknown policy {policy:?}: p2c, rr or pinned");
        }
        let set = WorkerSet::new(Duration::from_secs(30));
        set.update(&addresses.iter().map(|a| (a.clone(), capacity)).collect::<Vec<_>>());
        let mut clients = Vec::new();
        for a in addresses {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{a}"))?.tcp_nodelay(true).connect().await?;
            clients.push(ImageWorkerClient::new(channel));
        }
        Ok(Balancer { policy: policy.to_string(), set, addresses: addresses.to_vec(), clients, next: AtomicUsize::new(0) })
    }

    /// One call as `caller` by the policy, waiting for a slot up to `wait` (p2c): the worker
    /// that answered (its index) and the latency in µs, if it did.
    async fn call(&self, caller: usize, wait: Duration) -> Option<(usize, u64)> {
        let started = Instant::now();
        if self.policy != "p2c" {
            // pinned: caller k always calls worker k mod n — with as many callers as slots, no
            // pick and no queueing: the plain gRPC call, as an anchor.
            let i = if self.policy == "pinned" { caller } else { self.next.fetch_add(1, Ordering::Relaxed) } % self.clients.len();
            let ok = self.clients[i].clone().process(request()).await.is_ok();
            return ok.then(|| (i, started.elapsed().as_micros() as u64));
        }
        // As the distributor does: wait for a slot, woken when one is freed.
        let slot = self.set.acquire_within(&[], wait).await?;
        let i = self.addresses.iter().position(|a| *a == slot.endpoint().address).unwrap_or(0);
        let ok = slot.endpoint().client().grpc.process(request()).await.is_ok();
        slot.finish(!ok);
        ok.then(|| (i, started.elapsed().as_micros() as u64))
    }
}

/// Drives `concurrency` callers for `seconds` with `policy`: "p2c" (pixmesh's WorkerSet), "rr"
/// (round-robin) or "pinned" (each caller bound to one worker). With `burst` above 0, then
/// waits `idle` and sends `burst` calls at once, and reports the slow (last) worker's share of
/// those apart: the case where a slow worker's estimate has gone stale while it was idle.
pub async fn run(
    addresses: &[String],
    policy: &str,
    capacity: usize,
    concurrency: usize,
    seconds: f64,
    idle: Duration,
    burst: usize,
) -> anyhow::Result<serde_json::Value> {
    let balancer = Arc::new(Balancer::new(addresses, policy, capacity).await?);
    let per_worker: Arc<Vec<AtomicUsize>> = Arc::new(addresses.iter().map(|_| AtomicUsize::new(0)).collect());
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..concurrency {
        let (balancer, per_worker, latencies) = (Arc::clone(&balancer), Arc::clone(&per_worker), Arc::clone(&latencies));
        callers.spawn(async move {
            let mut mine = Vec::new();
            while Instant::now() < deadline {
                if let Some((i, micros)) = balancer.call(caller, Duration::from_secs(1)).await {
                    per_worker[i].fetch_add(1, Ordering::Relaxed);
                    mine.push(micros);
                }
            }
            latencies.lock().await.extend(mine);
        });
    }
    while callers.join_next().await.is_some() {}
    let mut l = std::mem::take(&mut *latencies.lock().await);
    l.sort_unstable();
    let at = |q: f64| l.get(((l.len() as f64 * q) as usize).min(l.len().saturating_sub(1))).copied().unwrap_or(0) as f64 / 1e3;
    let counts: Vec<usize> = per_worker.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let total: usize = counts.iter().sum();
    let mut out = json!({
        "policy": policy, "workers": addresses.len(), "concurrency": concurrency,
        "calls": total, "per_second": total as f64 / seconds,
        "p50_ms": at(0.5), "p99_ms": at(0.99),
        "mean_ms": l.iter().sum::<u64>() as f64 / l.len().max(1) as f64 / 1e3,
        "last_worker_share": counts.last().copied().unwrap_or(0) as f64 / total.max(1) as f64,
    });
    if burst > 0 {
        tokio::time::sleep(idle).await;
        let started = Instant::now();
        let mut calls = tokio::task::JoinSet::new();
        for caller in 0..burst {
            let balancer = Arc::clone(&balancer);
            calls.spawn(async move { balancer.call(caller, Duration::from_secs(60)).await });
        }
        let mut counts = vec![0usize; addresses.len()];
        while let Some(answer) = calls.join_next().await {
            if let Ok(Some((i, _))) = answer {
                counts[i] += 1;
            }
        }
        let total: usize = counts.iter().sum();
        let slow = counts.last().copied().unwrap_or(0);
        out["burst"] = json!({
            "idle_ms": idle.as_millis() as u64, "calls": total, "ms": started.elapsed().as_secs_f64() * 1e3,
            "last_worker_calls": slow, "last_worker_share": slow as f64 / total.max(1) as f64,
        });
    }
    Ok(out)
}

/// The cost of one pick (acquire + finish) in the worker set, without any call.
pub fn pick_overhead(workers: usize) -> serde_json::Value {
    let set = WorkerSet::new(Duration::from_secs(30));
    set.update(&(0..workers).map(|i| (format!("127.0.0.1:{}", 1000 + i), 4)).collect::<Vec<_>>());
    let n = 200_000;
    let started = Instant::now();
    for _ in 0..n {
        if let Some(slot) = set.acquire(&[]) {
            slot.finish(false);
        }
    }
    json!({ "workers": workers, "pick_ns": started.elapsed().as_nanos() as f64 / n as f64 })
}
