//! The set of known instances of a service and how one is picked: power of two choices over
//! the instances with a free slot (the per-instance bulkhead) and a closed or half-open
//! breaker, the lighter of the two by peak-EWMA latency × (calls in flight + 1). The set is
//! generic over the [`Transport`] that reaches an instance: the distributor's image workers
//! over gRPC, a sidecar's remote services over HTTP. The doc below speaks of workers, the first
//! users.
//!
//! Not `tower::balance::p2c`: a retry must go to a worker the claim has not tried yet (its
//! `Balance` picks among all ready services, with no per-request exclusion), the claim loop
//! must know whether any slot is free *before* it claims a job (a job claimed and then held
//! waiting would sit under a lease), and a worker many times slower than the fastest is left
//! out while the fastest is merely busy. The retry budget is tower's (`budget.rs`).
//!
//! Re-probe: an estimate only learns from answers, and decays while a worker gets none. A
//! worker many times slower than its peers, once idle for a while, would be judged on a
//! decayed, stale number against their fresh ones (a burst raises theirs at once), and a burst
//! would fill every one of its slots before its first answer told again how slow it is. So a
//! worker whose last answer was over [`SLOW_FACTOR`] × the fastest peer's estimate takes one
//! call at a time, as a half-open breaker does, until an answer within the factor shows it fast
//! again; then it is back to its full capacity. (While its estimate is fresh and high, the
//! factor keeps it out by itself; the limit matters when it would be picked nonetheless.)
//!
//! Departure: when discovery drops a worker that still has calls in flight, it is asked for its
//! health on the same connection. A worker that left on purpose (deregistered, draining) or
//! that only lost the registry answers, and its calls finish. One that does not answer within
//! [`GONE_PROBE`] (frozen: its heartbeats stopped, so the registry expired it; or cut off) has
//! its calls abandoned at once ([`Endpoint::gone`]), to be sent elsewhere, instead of
//! waiting for their deadline. (The registry's watch tells only who is in the set, not why one
//! left; the health check tells the two apart without a change to the registry.)

use crate::breaker::{Breaker, BreakerConfig};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// How fast the latency estimate forgets (Finagle's peak EWMA uses 10 s).
const DECAY: Duration = Duration::from_secs(10);
/// The latency assumed for a worker not heard from yet.
const INITIAL_RTT: f64 = 0.05;
/// A worker this many times slower than the fastest one is not used while that one is busy.
const SLOW_FACTOR: f64 = 4.0;
/// Waiting for a slot also looks again this often: a breaker's open time can end, or a slow
/// worker's estimate decay, without any slot being freed.
const RECHECK: Duration = Duration::from_millis(25);
/// How long a worker that discovery dropped, with calls in flight, has to answer a health
/// check before those calls are abandoned.
pub const GONE_PROBE: Duration = Duration::from_millis(1500);

/// Whether an instance answers at all.
pub type ProbeFuture = Pin<Box<dyn Future<Output = bool> + Send>>;

/// The metrics a set records, by name (each user has names of its own).
#[derive(Debug, Clone, Copy)]
pub struct MetricNames {
    /// Breaker transitions, by the state entered (`to`).
    pub breaker_transitions: &'static str,
    /// Retries the budget refused.
    pub retries_refused: &'static str,
    /// Instances in the set (a gauge).
    pub instances: &'static str,
}

/// How calls reach one instance.
pub trait Transport: Send + Sync + 'static {
    /// What a call to one instance goes through (made once per instance, cloned per call).
    type Client: Clone + Send + Sync + 'static;
    /// The names of the set's metrics.
    const METRICS: MetricNames;
    /// The client for the instance at `address`, connecting lazily (no I/O here).
    fn client(&self, address: &str) -> Result<Self::Client, String>;
    /// Whether the instance still answers: asked when discovery dropped it with calls in
    /// flight, and given [`GONE_PROBE`] to say so.
    fn probe(&self, client: &Self::Client) -> ProbeFuture;
}

type Endpoints<T> = RwLock<HashMap<String, Arc<Endpoint<T>>>>;

/// One instance.
pub struct Endpoint<T: Transport> {
    pub address: String,
    pub capacity: usize,
    client: T::Client,
    transport: Arc<T>,
    pub breaker: Breaker,
    latency: Mutex<Latency>,
    /// The set's "a slot was freed" signal.
    freed: Arc<Notify>,
    /// The set it belongs to, for its peers' estimates.
    peers: Weak<Endpoints<T>>,
    /// Cancelled when it left the set and did not answer: its calls in flight are abandoned.
    gone: CancellationToken,
}

/// A latency estimate `rtt` decayed for the time `since`, and the weight left to it.
fn decayed(rtt: f64, since: Instant) -> (f64, f64) {
    let w = (-since.elapsed().as_secs_f64() / DECAY.as_secs_f64()).exp();
    (rtt * w, w)
}

impl<T: Transport> Endpoint<T> {
    fn new(address: &str, capacity: usize, set: &EndpointSet<T>) -> Result<Endpoint<T>, String> {
        let client = set.transport.client(address)?;
        let breaker = Breaker::new(address, set.breaker.clone(), T::METRICS.breaker_transitions, set.labels.clone());
        let latency = Latency {
            rtt: INITIAL_RTT,
            updated: Instant::now(),
            pending: Vec::with_capacity(capacity.max(1)),
            answered: false,
            reprobe: false,
        };
        Ok(Endpoint {
            address: address.to_string(),
            capacity: capacity.max(1),
            client,
            transport: Arc::clone(&set.transport),
            breaker,
            latency: Mutex::new(latency),
            freed: Arc::clone(&set.freed),
            peers: Arc::downgrade(&set.endpoints),
            gone: CancellationToken::new(),
        })
    }

    /// Folds in an observed latency: a slower one is taken at once (the peak), a faster one
    /// only gradually. An answer over [`SLOW_FACTOR`] × the fastest peer's estimate puts the
    /// worker in re-probe (one call at a time); one within it ends that (see the module doc).
    pub fn observe(&self, latency: Duration) {
        let sample = latency.as_secs_f64();
        let slow = self.fastest_peer().is_some_and(|fastest| sample > fastest * SLOW_FACTOR);
        let mut latency = self.latency();
        let (current, w) = decayed(latency.rtt, latency.updated);
        latency.rtt = if sample > current { sample } else { current * w + sample * (1.0 - w) };
        latency.updated = Instant::now();
        latency.answered = true;
        if slow != latency.reprobe {
            tracing::debug!(worker = %self.address, latency_ms = sample * 1e3, reprobe = slow, "{}", if slow {
                "answer far slower than the fastest peer's: one call at a time until it answers fast"
            } else {
                "fast again: back to its full capacity"
            });
        }
        latency.reprobe = slow;
    }

    /// The lowest latency estimate among the other workers of the set whose breaker lets calls
    /// through and that have answered at least once (a worker not heard from has only
    /// [`INITIAL_RTT`], which is no evidence). Each is read under its own lock, one at a time.
    fn fastest_peer(&self) -> Option<f64> {
        let peers = self.peers.upgrade()?;
        let peers = peers.read().ok()?;
        peers
            .values()
            .filter(|e| !std::ptr::eq(Arc::as_ptr(e), self) && e.breaker.would_allow())
            .filter_map(|e| {
                let latency = e.latency();
                latency.answered.then(|| latency.estimate())
            })
            .reduce(f64::min)
    }

    /// True while the worker takes one call at a time (see the module doc).
    pub fn in_reprobe(&self) -> bool {
        self.latency().reprobe
    }

    /// Completes when the worker left the set and did not answer a health check: calls in
    /// flight to it should be given up and sent elsewhere.
    pub fn gone(&self) -> WaitForCancellationFuture<'_> {
        self.gone.cancelled()
    }

    /// Called when discovery dropped this worker: with calls in flight, asks it for its health
    /// on the same connection and abandons the calls unless it answers within [`GONE_PROBE`].
    fn left_the_set(self: Arc<Self>) {
        let calls = self.in_flight();
        if calls == 0 {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(async move {
            let probe = self.transport.probe(&self.client);
            let answered = tokio::time::timeout(GONE_PROBE, probe).await.unwrap_or(false);
            if answered {
                tracing::info!(worker = %self.address, calls, "worker left the set but answers; its calls in flight finish");
                return;
            }
            let calls = self.in_flight();
            if calls > 0 {
                tracing::warn!(worker = %self.address, calls, "worker left the set and does not answer; its calls in flight are abandoned");
            }
            self.gone.cancel();
        });
    }

    /// The latency estimate now, in seconds: the decayed peak EWMA, or the age of the oldest
    /// call still in flight when that is longer. A call outstanding for longer than the
    /// estimate is evidence already, before it ends: without it, a worker many times slower
    /// than the others would see its estimate decay during its own slow call and be handed
    /// more work while it has not yet answered.
    pub fn rtt_estimate(&self) -> f64 {
        self.latency().estimate()
    }

    fn latency(&self) -> std::sync::MutexGuard<'_, Latency> {
        self.latency.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The expected wait for one more call here: latency estimate × (calls in flight + 1).
    pub fn load(&self) -> f64 {
        let latency = self.latency();
        latency.estimate() * (latency.pending.len() as f64 + 1.0)
    }

    pub fn in_flight(&self) -> usize {
        self.latency().pending.len()
    }

    pub fn client(&self) -> T::Client {
        self.client.clone()
    }

    /// Takes a slot if one is free (the per-worker bulkhead); the slot frees when the guard drops.
    pub fn try_acquire(self: &Arc<Self>) -> Option<SlotGuard<T>> {
        let started = Instant::now();
        {
            let mut latency = self.latency();
            if latency.pending.len() >= latency.limit(self.capacity) {
                return None;
            }
            latency.pending.push(started);
        }
        let slot = SlotGuard { endpoint: Arc::clone(self), started, recorded: false };
        // The breaker's permission is taken with the slot; a slot given back unused returns it.
        if self.breaker.try_call() {
            Some(slot)
        } else {
            drop(slot);
            None
        }
    }
}

/// A worker's latency estimate and the calls it has not answered yet.
struct Latency {
    /// Peak-EWMA latency in seconds, and when it was last updated.
    rtt: f64,
    updated: Instant,
    /// When each call in flight started: its length is the calls in flight, at most
    /// `capacity` (the bulkhead).
    pending: Vec<Instant>,
    /// Whether it has answered at all (until then `rtt` is [`INITIAL_RTT`], a guess).
    answered: bool,
    /// Its last answer was far slower than the fastest peer's estimate: one call at a time.
    reprobe: bool,
}

impl Latency {
    /// Calls it may have in flight now: its capacity, or one while in re-probe.
    fn limit(&self, capacity: usize) -> usize {
        if self.reprobe { 1 } else { capacity }
    }

    /// See [`Endpoint::rtt_estimate`].
    fn estimate(&self) -> f64 {
        let decayed = decayed(self.rtt, self.updated).0;
        self.pending.iter().min().map_or(decayed, |oldest| decayed.max(oldest.elapsed().as_secs_f64()))
    }
}

pub struct SlotGuard<T: Transport> {
    endpoint: Arc<Endpoint<T>>,
    started: Instant,
    recorded: bool,
}

impl<T: Transport> SlotGuard<T> {
    pub fn endpoint(&self) -> &Arc<Endpoint<T>> {
        &self.endpoint
    }

    /// The worker refused the connection: its breaker opens at once (ejected after its first
    /// connection failure), and the slot is freed.
    pub fn refused(mut self) {
        self.endpoint.breaker.trip();
        self.recorded = true;
    }

    /// Records how the call on this slot went (for the breaker and the latency estimate) and
    /// frees the slot. `failed`: the worker failed (not the image).
    pub fn finish(mut self, failed: bool) {
        let latency = self.started.elapsed();
        self.endpoint.observe(latency);
        self.endpoint.breaker.record(failed, latency);
        self.recorded = true;
    }
}

impl<T: Transport> Drop for SlotGuard<T> {
    fn drop(&mut self) {
        {
            let pending = &mut self.endpoint.latency().pending;
            if let Some(i) = pending.iter().position(|t| *t == self.started) {
                pending.swap_remove(i);
            }
        }
        if !self.recorded {
            self.endpoint.breaker.release_unused();
        }
        self.endpoint.freed.notify_waiters();
    }
}

/// One instance as [`EndpointSet::snapshot`] reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointInfo {
    pub address: String,
    /// Calls it takes at once (what discovery says).
    pub capacity: usize,
    /// Calls it is given at once now (1 while it is re-probed as slow).
    pub limit: usize,
    pub in_flight: usize,
    pub latency_estimate_seconds: f64,
    pub breaker: crate::breaker::State,
}

/// The instances a client knows, keyed by address.
pub struct EndpointSet<T: Transport> {
    endpoints: Arc<Endpoints<T>>,
    transport: Arc<T>,
    call_timeout: Duration,
    breaker: BreakerConfig,
    /// Labels of the set's metrics (a sidecar's `service`).
    labels: Vec<(&'static str, String)>,
    /// Signalled when a slot is freed or the set changes, for those waiting for a slot.
    freed: Arc<Notify>,
}

impl<T: Transport> Clone for EndpointSet<T> {
    fn clone(&self) -> Self {
        EndpointSet {
            endpoints: Arc::clone(&self.endpoints),
            transport: Arc::clone(&self.transport),
            call_timeout: self.call_timeout,
            breaker: self.breaker.clone(),
            labels: self.labels.clone(),
            freed: Arc::clone(&self.freed),
        }
    }
}

impl<T: Transport + Default> EndpointSet<T> {
    /// With the default breaker settings.
    pub fn new(call_timeout: Duration) -> EndpointSet<T> {
        EndpointSet::with_breaker(call_timeout, &BreakerConfig::default())
    }

    pub fn with_breaker(call_timeout: Duration, breaker: &BreakerConfig) -> EndpointSet<T> {
        EndpointSet::with_transport(T::default(), call_timeout, breaker)
    }
}

impl<T: Transport> EndpointSet<T> {
    pub fn with_transport(transport: T, call_timeout: Duration, breaker: &BreakerConfig) -> EndpointSet<T> {
        EndpointSet {
            endpoints: Arc::default(),
            transport: Arc::new(transport),
            call_timeout,
            breaker: breaker.for_deadline(call_timeout),
            labels: Vec::new(),
            freed: Arc::default(),
        }
    }

    /// Adds a label to the set's metrics (before any instance joins).
    pub fn with_label(mut self, key: &'static str, value: &str) -> EndpointSet<T> {
        self.labels.push((key, value.to_string()));
        self
    }

    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    /// Replaces the set with `instances` (address, capacity), keeping existing endpoints (and
    /// their in-flight counts) for addresses that stay. A worker that left with calls in
    /// flight is checked for a sign of life; see the module doc.
    pub fn update(&self, instances: &[(String, usize)]) {
        let mut map = self.endpoints.write().unwrap_or_else(|p| p.into_inner());
        let mut left = Vec::new();
        map.retain(|addr, endpoint| {
            let stays = instances.iter().any(|(a, _)| a == addr);
            if !stays {
                left.push(Arc::clone(endpoint));
            }
            stays
        });
        for (addr, capacity) in instances {
            if map.get(addr).is_some_and(|e| e.capacity == *capacity) {
                continue;
            }
            // (A new capacity replaces the endpoint; calls in flight on the old one go on.)
            match Endpoint::new(addr, *capacity, self) {
                Ok(endpoint) => {
                    tracing::info!(instance = %addr, capacity, labels = ?self.labels, "instance joined");
                    map.insert(addr.clone(), Arc::new(endpoint));
                }
                Err(e) => tracing::warn!(instance = %addr, error = %e, "bad instance address"),
            }
        }
        let labels: Vec<metrics::Label> = self.labels.iter().map(|(k, v)| metrics::Label::new(*k, v.clone())).collect();
        metrics::gauge!(T::METRICS.instances, labels).set(map.len() as f64);
        drop(map);
        for endpoint in left {
            tracing::info!(instance = %endpoint.address, calls = endpoint.in_flight(), labels = ?self.labels, "instance left");
            endpoint.left_the_set();
        }
        self.freed.notify_waiters();
    }

    /// What an operator sees of each worker now, by address.
    pub fn snapshot(&self) -> Vec<EndpointInfo> {
        let map = self.endpoints.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<EndpointInfo> = map
            .values()
            .map(|e| {
                let latency = e.latency();
                EndpointInfo {
                    address: e.address.clone(),
                    capacity: e.capacity,
                    limit: latency.limit(e.capacity),
                    in_flight: latency.pending.len(),
                    latency_estimate_seconds: latency.estimate(),
                    breaker: e.breaker.state(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.address.cmp(&b.address));
        out
    }

    /// The endpoint at `address`, if it is in the set.
    pub fn endpoint(&self, address: &str) -> Option<Arc<Endpoint<T>>> {
        self.endpoints.read().ok()?.get(address).cloned()
    }

    pub fn len(&self) -> usize {
        self.endpoints.read().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when some worker has a free slot.
    /// Free call slots over all workers (an estimate: slots may be taken meanwhile).
    pub fn free_slots(&self) -> usize {
        self.endpoints
            .read()
            .map(|m| {
                m.values()
                    .map(|e| {
                        let latency = e.latency();
                        latency.limit(e.capacity).saturating_sub(latency.pending.len())
                    })
                    .sum()
            })
            .unwrap_or(0)
    }

    pub fn has_free_slot(&self) -> bool {
        self.free_slots() > 0
    }

    /// Waits until some worker may have a free slot (one was freed or the set changed), at most
    /// `timeout`; returns at once when one is free now.
    pub async fn wait_for_free_slot(&self, timeout: Duration) {
        let notified = self.freed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.has_free_slot() {
            return;
        }
        let _ = tokio::time::timeout(timeout, notified).await;
    }

    /// [`EndpointSet::acquire`], waiting for a slot up to `timeout`: woken when a slot is freed
    /// (no polling delay between a call ending and the next one starting), and looking again
    /// every [`RECHECK`] for breakers whose open time ended.
    pub async fn acquire_within(&self, exclude: &[String], timeout: Duration) -> Option<SlotGuard<T>> {
        let deadline = Instant::now() + timeout;
        loop {
            // Registered before looking, so a slot freed in between still wakes us.
            let notified = self.freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(slot) = self.acquire(exclude) {
                return Some(slot);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            let _ = tokio::time::timeout(RECHECK.min(deadline - now), notified).await;
        }
    }

    /// Takes a slot by the power of two choices: two distinct workers drawn at random among
    /// those not in `exclude` with a free slot (one at most in flight while in re-probe), a
    /// breaker that lets calls through and a latency within [`SLOW_FACTOR`] of the fastest;
    /// the one with the lower load wins; if its slot went meanwhile, the other, then any.
    /// `None`: wait and ask again.
    pub fn acquire(&self, exclude: &[String]) -> Option<SlotGuard<T>> {
        // (worker, latency estimate, calls in flight, calls it may have), read under one lock
        // per worker.
        let usable: Vec<(Arc<Endpoint<T>>, f64, usize, usize)> = self
            .endpoints
            .read()
            .map(|m| {
                m.values()
                    .filter(|e| !exclude.contains(&e.address) && e.breaker.would_allow())
                    .map(|e| {
                        let latency = e.latency();
                        (Arc::clone(e), latency.estimate(), latency.pending.len(), latency.limit(e.capacity))
                    })
                    .collect()
            })
            .unwrap_or_default();
        // Waiting a moment for a slot on a fast worker beats a call on one many times slower:
        // workers slower than SLOW_FACTOR × the fastest usable one are left out while it is
        // merely busy. (When every fast worker is gone, the slow ones are the fastest.)
        let fastest = usable.iter().map(|(_, rtt, _, _)| *rtt).fold(f64::INFINITY, f64::min);
        let mut candidates: Vec<Arc<Endpoint<T>>> = usable
            .into_iter()
            .filter(|(_, rtt, in_flight, limit)| *in_flight < *limit && *rtt <= fastest * SLOW_FACTOR)
            .map(|(e, _, _, _)| e)
            .collect();
        if candidates.len() >= 2 {
            let i = rand::random_range(0..candidates.len());
            let mut j = rand::random_range(0..candidates.len() - 1);
            if j >= i {
                j += 1;
            }
            let (first, second) = if candidates[i].load() <= candidates[j].load() { (i, j) } else { (j, i) };
            // Put the pair first, in order, so the fallback below tries them first.
            candidates.swap(0, first);
            let second = if second == 0 { first } else { second };
            candidates.swap(1, second);
        }
        candidates.iter().find_map(|e| e.try_acquire())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Instances reached by nothing: the tests drive slots by hand.
    #[derive(Default)]
    struct Nowhere;

    impl Transport for Nowhere {
        type Client = ();
        const METRICS: MetricNames = MetricNames {
            breaker_transitions: "test_breaker_transitions_total",
            retries_refused: "test_retries_refused_total",
            instances: "test_instances",
        };
        fn client(&self, _: &str) -> Result<(), String> {
            Ok(())
        }
        fn probe(&self, _: &()) -> ProbeFuture {
            Box::pin(async { true })
        }
    }

    type WorkerSet = EndpointSet<Nowhere>;
    type WorkerEndpoint = Endpoint<Nowhere>;
    type SlotGuard = super::SlotGuard<Nowhere>;

    #[tokio::test]
    async fn respects_capacity_and_exclusions() {
        let set = WorkerSet::new(Duration::from_secs(1));
        set.update(&[("127.0.0.1:1".into(), 2), ("127.0.0.1:2".into(), 1)]);
        let slots: Vec<SlotGuard> = (0..3).map(|_| set.acquire(&[]).unwrap()).collect();
        assert_eq!(slots.iter().filter(|s| s.endpoint().address == "127.0.0.1:1").count(), 2);
        assert!(set.acquire(&[]).is_none(), "every slot is taken");
        assert!(!set.has_free_slot());
        drop(slots);
        for _ in 0..20 {
            assert_eq!(set.acquire(&["127.0.0.1:2".to_string()]).unwrap().endpoint().address, "127.0.0.1:1", "excluded worker is not used");
        }
        // Workers that leave are dropped; those that stay keep their counts.
        let held = set.acquire(&["127.0.0.1:2".to_string()]).unwrap();
        set.update(&[("127.0.0.1:1".into(), 2)]);
        assert_eq!(set.len(), 1);
        assert_eq!(held.endpoint().in_flight(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_outstanding_longer_than_the_estimate_counts_before_it_ends() {
        let set = WorkerSet::new(Duration::from_secs(60));
        set.update(&[("127.0.0.1:1".into(), 4)]);
        let worker = set.endpoint("127.0.0.1:1").unwrap();
        worker.observe(Duration::from_millis(10));
        let estimate = worker.rtt_estimate();
        let call = worker.try_acquire().unwrap();
        tokio::time::advance(Duration::from_secs(3)).await;
        // The estimate alone would have decayed by now; the call in flight says 3 s.
        assert!(worker.rtt_estimate() >= 3.0 && estimate <= INITIAL_RTT, "{} then {}", estimate, worker.rtt_estimate());
        // When it ends, its latency is observed and the pending entry goes.
        call.finish(false);
        assert!((worker.rtt_estimate() - 3.0).abs() < 0.01, "{}", worker.rtt_estimate());
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(worker.rtt_estimate() < 0.5, "an idle worker's estimate decays: {}", worker.rtt_estimate());
    }

    #[tokio::test(start_paused = true)]
    async fn after_idleness_a_burst_gives_the_stale_slow_worker_one_call_at_a_time() {
        let set = WorkerSet::new(Duration::from_secs(60));
        let (fast1, fast2, slow) = ("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3");
        set.update(&[(fast1.into(), 4), (fast2.into(), 4), (slow.into(), 4)]);
        let [a, b, s] = [fast1, fast2, slow].map(|w| set.endpoint(w).unwrap());
        // Learnt: the fast two answer in 10 ms, the slow one in 1 s.
        for _ in 0..5 {
            let calls = [a.try_acquire().unwrap(), b.try_acquire().unwrap()];
            tokio::time::advance(Duration::from_millis(10)).await;
            calls.into_iter().for_each(|c| c.finish(false));
        }
        assert!(!a.in_reprobe() && !b.in_reprobe());
        let call = s.try_acquire().unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        call.finish(false);
        assert!(s.in_reprobe(), "an answer 100× slower than the peers'");

        // Idle: every estimate decays. Then a burst fills the fast workers' slots; their calls
        // in flight count at once (fresh), while the slow one's estimate is 30 s old and now
        // within the factor of theirs.
        tokio::time::advance(Duration::from_secs(30)).await;
        let fast: Vec<SlotGuard> = (0..8).map(|_| set.acquire(&[]).unwrap()).collect();
        assert!(fast.iter().all(|c| c.endpoint().address != slow), "the fast workers' slots go first");
        tokio::time::advance(Duration::from_millis(20)).await;
        assert!(s.rtt_estimate() <= a.rtt_estimate() * SLOW_FACTOR, "{} vs {}", s.rtt_estimate(), a.rtt_estimate());
        let burst: Vec<SlotGuard> = (0..8).map_while(|_| set.acquire(&[])).collect();
        assert_eq!(burst.len(), 1, "one call to the stale slow worker, not all its slots");
        assert_eq!(burst[0].endpoint().address, slow);
        assert!(!set.has_free_slot(), "its other slots do not count as free either");

        // Its answer is slow again: still one at a time.
        fast.into_iter().for_each(|c| c.finish(false));
        tokio::time::advance(Duration::from_secs(1)).await;
        burst.into_iter().for_each(|c| c.finish(false));
        assert!(s.in_reprobe());
        let probe = s.try_acquire().unwrap();
        assert!(s.try_acquire().is_none(), "one call at a time while in re-probe");
        // A fast answer ends the re-probe: its whole capacity is back.
        tokio::time::advance(Duration::from_millis(10)).await;
        probe.finish(false);
        assert!(!s.in_reprobe());
        let slots: Vec<SlotGuard> = (0..4).map_while(|_| s.try_acquire()).collect();
        assert_eq!(slots.len(), 4);
    }

    #[tokio::test]
    async fn two_choices_avoid_the_slow_worker_and_the_open_breaker() {
        let set = WorkerSet::new(Duration::from_secs(30));
        set.update(&[("127.0.0.1:1".into(), 8), ("127.0.0.1:2".into(), 8), ("127.0.0.1:3".into(), 8)]);
        let endpoints: Vec<Arc<WorkerEndpoint>> = set.endpoints.read().unwrap().values().cloned().collect();
        for e in &endpoints {
            e.observe(if e.address.ends_with(":3") { Duration::from_secs(1) } else { Duration::from_millis(10) });
        }
        let picks: Vec<String> = (0..300).map(|_| set.acquire(&[]).unwrap().endpoint().address.clone()).collect();
        assert_eq!(picks.iter().filter(|a| a.ends_with(":3")).count(), 0, "the slow worker loses every pairing");
        // Calls in flight raise a worker's load, so held slots spread over the fast two.
        let held: Vec<SlotGuard> = (0..8).map(|_| set.acquire(&[]).unwrap()).collect();
        let on = |suffix: &str| held.iter().filter(|s| s.endpoint().address.ends_with(suffix)).count();
        assert!(on(":1") >= 3 && on(":2") >= 3, "{} and {}", on(":1"), on(":2"));
        drop(held);
        // With the fast workers full, the slow one is still not used: better to wait.
        let full: Vec<SlotGuard> = (0..16).map_while(|_| set.acquire(&[])).collect();
        assert_eq!(full.len(), 16);
        assert!(full.iter().all(|s| !s.endpoint().address.ends_with(":3")));
        assert!(set.acquire(&[]).is_none());
        drop(full);
        // Worker 1 fails until its breaker opens: it is not picked any more.
        let one = endpoints.iter().find(|e| e.address.ends_with(":1")).unwrap();
        while one.breaker.state() == crate::breaker::State::Closed {
            one.try_acquire().unwrap().finish(true);
        }
        let picks: Vec<String> = (0..100).map(|_| set.acquire(&[]).unwrap().endpoint().address.clone()).collect();
        assert!(picks.iter().all(|a| a.ends_with(":2") || a.ends_with(":3")));
        assert!(picks.iter().filter(|a| a.ends_with(":2")).count() > 90, "with one healthy fast worker left, it takes nearly all");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gets_a_freed_slot_at_once_and_gives_up_at_its_timeout() {
        let set = WorkerSet::new(Duration::from_secs(1));
        set.update(&[("127.0.0.1:1".into(), 1)]);
        let held = set.acquire(&[]).unwrap();
        let started = Instant::now();
        let waiter = tokio::spawn({
            let set = set.clone();
            async move { set.acquire_within(&[], Duration::from_secs(10)).await.map(|s| s.endpoint().address.clone()) }
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        drop(held);
        assert_eq!(waiter.await.unwrap().as_deref(), Some("127.0.0.1:1"));
        assert!(started.elapsed() < RECHECK, "woken by the freed slot, not by polling: {:?}", started.elapsed());

        let _held = set.acquire(&[]).unwrap();
        let started = Instant::now();
        assert!(set.acquire_within(&[], Duration::from_millis(300)).await.is_none());
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        // A worker joining wakes those waiting for the set, too.
        let waiter = tokio::spawn({
            let set = set.clone();
            async move { set.wait_for_free_slot(Duration::from_secs(10)).await }
        });
        tokio::task::yield_now().await;
        let started = Instant::now();
        set.update(&[("127.0.0.1:1".into(), 1), ("127.0.0.1:2".into(), 1)]);
        waiter.await.unwrap();
        assert!(started.elapsed() < RECHECK);
    }
}
