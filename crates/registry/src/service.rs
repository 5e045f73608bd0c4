use pixmesh_proto::v1::registry_server::Registry as RegistryApi;
use pixmesh_proto::v1::{
    DeregisterRequest, DeregisterResponse, HeartbeatRequest, HeartbeatResponse, Instance, ListRequest, ListResponse, RegisterRequest,
    RegisterResponse,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

struct Entry {
    instance: Instance,
    last_seen: Instant,
}

/// The in-memory table of live instances.
#[derive(Clone)]
pub struct Registry {
    entries: Arc<Mutex<HashMap<String, Entry>>>,
    heartbeat: Duration,
    ttl: Duration,
}

impl Registry {
    pub fn new(heartbeat: Duration, ttl: Duration) -> Self {
        Registry { entries: Arc::default(), heartbeat, ttl }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock cannot leave the map half-updated (every update is a
        // single insert or remove), so a poisoned lock is still safe to use.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(&self, instance: Instance) {
        tracing::info!(id = %instance.id, service = %instance.service, address = %instance.address, capacity = instance.capacity, "instance registered");
        metrics::counter!("pixmesh_registry_registrations_total").increment(1);
        self.lock().insert(instance.id.clone(), Entry { instance, last_seen: Instant::now() });
    }

    pub fn heartbeat(&self, id: &str) -> bool {
        match self.lock().get_mut(id) {
            Some(entry) => {
                entry.last_seen = Instant::now();
                true
            }
            None => false,
        }
    }

    pub fn deregister(&self, id: &str) -> bool {
        let removed = self.lock().remove(id).is_some();
        if removed {
            tracing::info!(id, "instance deregistered");
        }
        removed
    }

    pub fn list(&self, service: &str) -> Vec<Instance> {
        let now = Instant::now();
        let mut out: Vec<Instance> = self
            .lock()
            .values()
            .filter(|e| (service.is_empty() || e.instance.service == service) && now.duration_since(e.last_seen) <= self.ttl)
            .map(|e| e.instance.clone())
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Removes instances whose last heartbeat is older than the TTL; returns their ids.
    pub fn expire(&self) -> Vec<String> {
        let now = Instant::now();
        let mut entries = self.lock();
        let expired: Vec<String> =
            entries.iter().filter(|(_, e)| now.duration_since(e.last_seen) > self.ttl).map(|(id, _)| id.clone()).collect();
        for id in &expired {
            entries.remove(id);
            tracing::warn!(id, "instance expired: missed its heartbeats");
        }
        metrics::counter!("pixmesh_registry_expirations_total").increment(expired.len() as u64);
        metrics::gauge!("pixmesh_registry_instances").set(entries.len() as f64);
        expired
    }

    pub fn spawn_sweeper(&self, shutdown: pixmesh_chassis::Shutdown) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(this.heartbeat / 2);
            loop {
                tokio::select! {
                    _ = tick.tick() => { this.expire(); }
                    _ = shutdown.wait() => return,
                }
            }
        })
    }
}

pub struct RegistryService {
    registry: Registry,
}

impl RegistryService {
    pub fn new(registry: Registry) -> Self {
        RegistryService { registry }
    }
}

#[tonic::async_trait]
impl RegistryApi for RegistryService {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        let instance = request.into_inner().instance.ok_or_else(|| Status::invalid_argument("instance is required"))?;
        if instance.id.is_empty() || instance.service.is_empty() || instance.address.is_empty() {
            return Err(Status::invalid_argument("instance id, service and address are required"));
        }
        if instance.address.parse::<std::net::SocketAddr>().is_err() {
            return Err(Status::invalid_argument(format!("address {:?} is not host:port", instance.address)));
        }
        self.registry.register(instance);
        Ok(Response::new(RegisterResponse {
            heartbeat_interval_ms: self.registry.heartbeat.as_millis() as u64,
            ttl_ms: self.registry.ttl.as_millis() as u64,
        }))
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        let known = self.registry.heartbeat(&request.into_inner().id);
        Ok(Response::new(HeartbeatResponse { known }))
    }

    async fn deregister(&self, request: Request<DeregisterRequest>) -> Result<Response<DeregisterResponse>, Status> {
        let removed = self.registry.deregister(&request.into_inner().id);
        Ok(Response::new(DeregisterResponse { removed }))
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let instances = self.registry.list(&request.into_inner().service);
        Ok(Response::new(ListResponse { instances }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str) -> Instance {
        Instance { id: id.into(), service: "worker".into(), address: "127.0.0.1:1".into(), capacity: 2, ..Instance::default() }
    }

    #[tokio::test]
    async fn heartbeats_keep_instances_alive_and_silence_expires_them() {
        let registry = Registry::new(Duration::from_millis(10), Duration::from_millis(30));
        registry.register(instance("a"));
        registry.register(instance("b"));
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            assert!(registry.heartbeat("a"));
        }
        // b has been silent for ~50 ms > 30 ms TTL.
        assert_eq!(registry.list("worker").iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(registry.expire(), vec!["b".to_string()]);
        assert!(!registry.heartbeat("b"), "an expired instance must register again");
        assert!(registry.deregister("a"));
        assert!(registry.list("").is_empty());
    }
}
