use pixmesh_proto::v1::registry_server::Registry as RegistryApi;
use pixmesh_proto::v1::{
    DeregisterRequest, DeregisterResponse, HeartbeatRequest, HeartbeatResponse, Instance, ListRequest, ListResponse, RegisterRequest,
    RegisterResponse, WatchRequest, WatchResponse,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

struct Entry {
    instance: Instance,
    last_seen: Instant,
}

/// When more than this share of the known instances would expire in one sweep, the registry
/// assumes it is the one cut off (a partition, a paused process) rather than that they all
/// died, and keeps them ("self-preservation", as Eureka calls it).
const SELF_PRESERVATION_SHARE: f64 = 0.15;
/// Self-preservation holds an instance for at most this many TTLs past its expiry, so a real
/// mass failure is still cleaned up.
const SELF_PRESERVATION_TTLS: u32 = 10;

/// The in-memory table of live instances.
#[derive(Clone)]
pub struct Registry {
    entries: Arc<Mutex<HashMap<String, Entry>>>,
    heartbeat: Duration,
    ttl: Duration,
    /// The revision, bumped on every change of the set; watchers wait on it.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
    preserving: Arc<std::sync::atomic::AtomicBool>,
    /// Cancelled when the registry stops: open watch streams end, so their clients reconnect
    /// to whatever serves the address next instead of hanging on a draining server.
    closed: tokio_util::sync::CancellationToken,
}

impl Registry {
    pub fn new(heartbeat: Duration, ttl: Duration) -> Self {
        let (changes, _) = tokio::sync::watch::channel(0);
        Registry {
            entries: Arc::default(),
            heartbeat,
            ttl,
            changes: Arc::new(changes),
            preserving: Arc::default(),
            closed: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// Ends every open watch stream.
    pub fn close(&self) {
        self.closed.cancel();
    }

    fn changed(&self) {
        self.changes.send_modify(|r| *r += 1);
    }

    /// The current revision, and a receiver that sees every later one.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// True while the last sweep held back expiries (see [`SELF_PRESERVATION_SHARE`]).
    pub fn self_preserving(&self) -> bool {
        self.preserving.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock cannot leave the map half-updated (every update is a
        // single insert or remove), so a poisoned lock is still safe to use.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(&self, instance: Instance) {
        tracing::info!(id = %instance.id, service = %instance.service, address = %instance.address, capacity = instance.capacity, "instance registered");
        metrics::counter!(crate::instruments::REGISTRATIONS).increment(1);
        let previous = self.lock().insert(instance.id.clone(), Entry { instance: instance.clone(), last_seen: Instant::now() });
        if previous.is_none_or(|p| p.instance != instance) {
            self.changed();
        }
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
            self.changed();
        }
        removed
    }

    pub fn list(&self, service: &str) -> Vec<Instance> {
        let now = Instant::now();
        let mut out: Vec<Instance> = self
            .lock()
            .values()
            .filter(|e| service.is_empty() || e.instance.service == service)
            // Silent past the TTL: gone, unless self-preservation is holding it.
            .filter(|e| now.duration_since(e.last_seen) <= self.ttl || self.self_preserving())
            .map(|e| e.instance.clone())
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Removes instances whose last heartbeat is older than the TTL; returns their ids. When
    /// more than 15% of the instances (and at least two) would go at once, they are kept
    /// instead (self-preservation, logged and counted), each for at most ten TTLs.
    pub fn expire(&self) -> Vec<String> {
        let now = Instant::now();
        let mut entries = self.lock();
        let silent: Vec<(String, Duration)> =
            entries.iter().map(|(id, e)| (id.clone(), now.duration_since(e.last_seen))).filter(|(_, quiet)| *quiet > self.ttl).collect();
        let mass = silent.len() >= 2 && silent.len() as f64 > entries.len() as f64 * SELF_PRESERVATION_SHARE;
        let expired: Vec<String> = if mass {
            if !self.preserving.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    silent = silent.len(),
                    known = entries.len(),
                    "self-preservation: too many instances went silent at once; keeping them (the registry may be the one cut off)"
                );
                metrics::counter!(crate::instruments::SELF_PRESERVATION_ENTERED).increment(1);
            }
            let limit = self.ttl * (SELF_PRESERVATION_TTLS + 1);
            silent.into_iter().filter(|(_, quiet)| *quiet > limit).map(|(id, _)| id).collect()
        } else {
            if self.preserving.swap(false, std::sync::atomic::Ordering::Relaxed) {
                tracing::info!("self-preservation over");
            }
            silent.into_iter().map(|(id, _)| id).collect()
        };
        metrics::gauge!(crate::instruments::SELF_PRESERVATION).set(if mass { 1.0 } else { 0.0 });
        for id in &expired {
            entries.remove(id);
            tracing::warn!(id, "instance expired: missed its heartbeats");
        }
        metrics::counter!(crate::instruments::EXPIRATIONS).increment(expired.len() as u64);
        metrics::gauge!(crate::instruments::INSTANCES).set(entries.len() as f64);
        drop(entries);
        if !expired.is_empty() {
            self.changed();
        }
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

/// How many watch updates may wait for a slow watcher before it is dropped (it reconnects and
/// gets the whole set again).
const WATCH_BUFFER: usize = 16;

#[tonic::async_trait]
impl RegistryApi for RegistryService {
    type WatchStream = tokio_stream::wrappers::ReceiverStream<Result<WatchResponse, Status>>;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let service = request.into_inner().service;
        let registry = self.registry.clone();
        let mut changes = registry.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_BUFFER);
        metrics::gauge!(crate::instruments::WATCHERS).increment(1.0);
        tokio::spawn(async move {
            let mut last: Option<Vec<Instance>> = None;
            loop {
                let revision = *changes.borrow_and_update();
                let instances = registry.list(&service);
                if last.as_ref() != Some(&instances) {
                    let update = WatchResponse { revision, instances: instances.clone() };
                    if tx.send(Ok(update)).await.is_err() {
                        break;
                    }
                    last = Some(instances);
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { break },
                    _ = tx.closed() => break,
                    _ = registry.closed.cancelled() => break,
                }
            }
            metrics::gauge!(crate::instruments::WATCHERS).decrement(1.0);
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

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

    #[tokio::test]
    async fn many_silent_at_once_are_kept_then_cleaned_up() {
        let ttl = Duration::from_millis(20);
        let registry = Registry::new(Duration::from_millis(10), ttl);
        for id in ["a", "b", "c", "d"] {
            registry.register(instance(id));
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        registry.heartbeat("a");
        registry.heartbeat("b");
        // Two of four (50% > 15%) went silent together: kept, and still listed.
        assert!(registry.expire().is_empty());
        assert!(registry.self_preserving());
        assert_eq!(registry.list("worker").len(), 4);
        // Ten TTLs later they are expired anyway.
        tokio::time::sleep(ttl * (SELF_PRESERVATION_TTLS + 1)).await;
        for id in ["a", "b"] {
            registry.heartbeat(id);
        }
        let mut gone = registry.expire();
        gone.sort();
        assert_eq!(gone, ["c", "d"]);
        // One silent instance alone is simply expired.
        tokio::time::sleep(Duration::from_millis(30)).await;
        registry.heartbeat("a");
        assert_eq!(registry.expire(), ["b"]);
        assert!(!registry.self_preserving());
    }

    #[tokio::test]
    async fn watchers_get_the_set_now_and_after_every_change() {
        use tokio_stream::StreamExt;
        let registry = Registry::new(Duration::from_millis(100), Duration::from_millis(300));
        registry.register(instance("a"));
        let service = RegistryService::new(registry.clone());
        let mut stream = service.watch(Request::new(WatchRequest { service: "worker".into() })).await.unwrap().into_inner();
        async fn next(s: &mut <RegistryService as RegistryApi>::WatchStream) -> Vec<String> {
            let update = tokio::time::timeout(Duration::from_secs(1), s.next()).await.expect("an update within 1 s");
            update.unwrap().unwrap().instances.into_iter().map(|i| i.id).collect()
        }
        assert_eq!(next(&mut stream).await, ["a"]);
        registry.register(instance("b"));
        assert_eq!(next(&mut stream).await, ["a", "b"]);
        // A heartbeat or an identical re-registration is not a change.
        registry.heartbeat("a");
        registry.register(instance("a"));
        registry.register(Instance { service: "other".into(), ..instance("x") });
        assert!(tokio::time::timeout(Duration::from_millis(100), stream.next()).await.is_err(), "nothing changed for workers");
        registry.deregister("a");
        assert_eq!(next(&mut stream).await, ["b"]);
        registry.deregister("x");
        tokio::time::sleep(Duration::from_millis(350)).await;
        registry.expire();
        assert_eq!(next(&mut stream).await, Vec::<String>::new());
    }
}
