//! The set of known image workers and how one is picked.

use crate::DistributorConfig;
use pixmesh_proto::MAX_MESSAGE_BYTES;
use pixmesh_proto::v1::ListRequest;
use pixmesh_proto::v1::image_worker_client::ImageWorkerClient;
use pixmesh_proto::v1::registry_client::RegistryClient;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// One worker instance.
pub struct WorkerEndpoint {
    pub address: String,
    pub capacity: usize,
    client: ImageWorkerClient<Channel>,
    in_flight: AtomicUsize,
}

impl WorkerEndpoint {
    fn new(address: &str, capacity: usize) -> Result<WorkerEndpoint, tonic::transport::Error> {
        let channel = Endpoint::from_shared(format!("http://{address}"))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        let client =
            ImageWorkerClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(WorkerEndpoint { address: address.to_string(), capacity: capacity.max(1), client, in_flight: AtomicUsize::new(0) })
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn client(&self) -> ImageWorkerClient<Channel> {
        self.client.clone()
    }

    /// Takes a slot if one is free (the per-worker bulkhead); the slot frees when the guard drops.
    pub fn try_acquire(self: &Arc<Self>) -> Option<SlotGuard> {
        let mut current = self.in_flight.load(Ordering::SeqCst);
        loop {
            if current >= self.capacity {
                return None;
            }
            match self.in_flight.compare_exchange(current, current + 1, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return Some(SlotGuard { endpoint: Arc::clone(self) }),
                Err(now) => current = now,
            }
        }
    }
}

pub struct SlotGuard {
    endpoint: Arc<WorkerEndpoint>,
}

impl SlotGuard {
    pub fn endpoint(&self) -> &Arc<WorkerEndpoint> {
        &self.endpoint
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The workers the distributor knows, keyed by address.
#[derive(Clone)]
pub struct WorkerSet {
    endpoints: Arc<RwLock<HashMap<String, Arc<WorkerEndpoint>>>>,
    call_timeout: Duration,
}

impl WorkerSet {
    pub fn new(call_timeout: Duration) -> WorkerSet {
        WorkerSet { endpoints: Arc::default(), call_timeout }
    }

    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    /// Replaces the set with `instances` (address, capacity), keeping existing endpoints (and
    /// their in-flight counts) for addresses that stay.
    pub fn update(&self, instances: &[(String, usize)]) {
        let mut map = self.endpoints.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|addr, _| instances.iter().any(|(a, _)| a == addr));
        for (addr, capacity) in instances {
            if map.get(addr).is_some_and(|e| e.capacity == *capacity) {
                continue;
            }
            match WorkerEndpoint::new(addr, *capacity) {
                Ok(endpoint) => {
                    tracing::info!(worker = %addr, capacity, "worker joined");
                    map.insert(addr.clone(), Arc::new(endpoint));
                }
                Err(e) => tracing::warn!(worker = %addr, error = %e, "bad worker address"),
            }
        }
        metrics::gauge!("pixmesh_distributor_workers").set(map.len() as f64);
    }

    pub fn len(&self) -> usize {
        self.endpoints.read().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when some worker has a free slot.
    pub fn has_free_slot(&self) -> bool {
        self.endpoints.read().map(|m| m.values().any(|e| e.in_flight() < e.capacity)).unwrap_or(false)
    }

    /// Takes a slot on the least-loaded worker (by in-flight / capacity) not in `exclude`.
    pub fn acquire(&self, exclude: &[String]) -> Option<SlotGuard> {
        let mut candidates: Vec<Arc<WorkerEndpoint>> =
            self.endpoints.read().map(|m| m.values().filter(|e| !exclude.contains(&e.address)).cloned().collect()).unwrap_or_default();
        candidates.sort_by(|a, b| {
            let la = a.in_flight() as f64 / a.capacity as f64;
            let lb = b.in_flight() as f64 / b.capacity as f64;
            la.total_cmp(&lb).then_with(|| a.address.cmp(&b.address))
        });
        candidates.iter().find_map(|e| e.try_acquire())
    }

    /// Keeps the set in sync with the registry (or the static list).
    pub fn spawn_discovery(
        &self,
        config: &DistributorConfig,
        shutdown: pixmesh_chassis::Shutdown,
    ) -> Result<tokio::task::JoinHandle<()>, tonic::transport::Error> {
        let this = self.clone();
        if config.registry.is_empty() {
            let fixed: Vec<(String, usize)> = config.workers.iter().map(|w| (w.clone(), 2)).collect();
            this.update(&fixed);
            return Ok(tokio::spawn(async {}));
        }
        let mut client = RegistryClient::new(pixmesh_registry::client::channel(&config.registry)?);
        let interval = Duration::from_millis(config.discovery_interval_ms);
        Ok(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.wait() => return,
                }
                match client.list(ListRequest { service: "worker".into() }).await {
                    Ok(resp) => {
                        let instances: Vec<(String, usize)> =
                            resp.into_inner().instances.into_iter().map(|i| (i.address, i.capacity as usize)).collect();
                        this.update(&instances);
                    }
                    // Keep the last known set: a registry outage must not stop dispatch.
                    Err(e) => tracing::warn!(error = %e, "registry list failed; keeping the last known workers"),
                }
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn picks_least_loaded_and_respects_capacity() {
        let set = WorkerSet::new(Duration::from_secs(1));
        set.update(&[("127.0.0.1:1".into(), 2), ("127.0.0.1:2".into(), 1)]);
        let a = set.acquire(&[]).unwrap();
        assert_eq!(a.endpoint().address, "127.0.0.1:1");
        let b = set.acquire(&[]).unwrap();
        assert_eq!(b.endpoint().address, "127.0.0.1:2");
        let c = set.acquire(&[]).unwrap();
        assert_eq!(c.endpoint().address, "127.0.0.1:1");
        assert!(set.acquire(&[]).is_none(), "every slot is taken");
        assert!(!set.has_free_slot());
        drop(b);
        assert!(set.acquire(&["127.0.0.1:2".to_string()]).is_none(), "excluded worker is not used");
        assert!(set.acquire(&[]).is_some());
        // Workers that leave are dropped; those that stay keep their counts.
        set.update(&[("127.0.0.1:1".into(), 2)]);
        assert_eq!(set.len(), 1);
        assert!(set.acquire(&[]).is_none());
    }
}
