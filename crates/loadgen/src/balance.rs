//! `pixmesh-loadgen balance`: the distributor's worker picking against simulated workers.
//!
//! Simulated workers are real gRPC `ImageWorker` servers on 127.0.0.1 that take `capacity`
//! calls at once (more wait in line) and answer after a service time (uniform ±50% around
//! the mean), with no pixels. Callers drive them in a closed loop through either pixmesh's
//! `WorkerSet` (power of two choices over peak-EWMA load, per-worker slots, breakers) or plain
//! round-robin (what nginx and HAProxy do by default), and report throughput, latency and the
//! share of calls the slow worker got.

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
    ProcessRequest { job_id: "bench".into(), attempt: 1, image: Bytes::new(), ops: None }
}

/// Drives `concurrency` callers for `seconds` with `policy`: "p2c" (pixmesh's WorkerSet), "rr"
/// (round-robin) or "pinned" (each caller bound to one worker).
pub async fn run(
    addresses: &[String],
    policy: &str,
    capacity: usize,
    concurrency: usize,
    seconds: f64,
) -> anyhow::Result<serde_json::Value> {
    let set = WorkerSet::new(Duration::from_secs(30));
    set.update(&addresses.iter().map(|a| (a.clone(), capacity)).collect::<Vec<_>>());
    let mut clients = Vec::new();
    for a in addresses {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{a}"))?.tcp_nodelay(true).connect().await?;
        clients.push(ImageWorkerClient::new(channel));
    }
    let clients: Arc<Vec<ImageWorkerClient<Channel>>> = Arc::new(clients);
    let next = Arc::new(AtomicUsize::new(0));
    let per_worker: Arc<Vec<AtomicUsize>> = Arc::new(addresses.iter().map(|_| AtomicUsize::new(0)).collect());
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut callers = tokio::task::JoinSet::new();
    if !matches!(policy, "p2c" | "rr" | "pinned") {
        anyhow::bail!("unknown policy {policy:?}: p2c, rr or pinned");
    }
    for caller in 0..concurrency {
        let (set, clients, next, per_worker, latencies, policy) =
            (set.clone(), Arc::clone(&clients), Arc::clone(&next), Arc::clone(&per_worker), Arc::clone(&latencies), policy.to_string());
        let addresses = addresses.to_vec();
        callers.spawn(async move {
            let mut mine = Vec::new();
            while Instant::now() < deadline {
                let started = Instant::now();
                if policy != "p2c" {
                    // pinned: caller k always calls worker k mod n — with as many callers as
                    // slots, no pick and no queueing: the plain gRPC call, as an anchor.
                    let i = if policy == "pinned" { caller } else { next.fetch_add(1, Ordering::Relaxed) } % clients.len();
                    let ok = clients[i].clone().process(request()).await.is_ok();
                    if ok {
                        per_worker[i].fetch_add(1, Ordering::Relaxed);
                        mine.push(started.elapsed().as_micros() as u64);
                    }
                } else {
                    // As the distributor does: wait for a slot, woken when one is freed.
                    let Some(slot) = set.acquire_within(&[], Duration::from_secs(1)).await else {
                        continue;
                    };
                    let i = addresses.iter().position(|a| *a == slot.endpoint().address).unwrap_or(0);
                    let ok = slot.endpoint().client().process(request()).await.is_ok();
                    slot.finish(!ok);
                    if ok {
                        per_worker[i].fetch_add(1, Ordering::Relaxed);
                        mine.push(started.elapsed().as_micros() as u64);
                    }
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
    Ok(json!({
        "policy": policy, "workers": addresses.len(), "concurrency": concurrency,
        "calls": total, "per_second": total as f64 / seconds,
        "p50_ms": at(0.5), "p99_ms": at(0.99),
        "mean_ms": l.iter().sum::<u64>() as f64 / l.len().max(1) as f64 / 1e3,
        "last_worker_share": counts.last().copied().unwrap_or(0) as f64 / total.max(1) as f64,
    }))
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
