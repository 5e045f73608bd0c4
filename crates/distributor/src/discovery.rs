//! Where the distributor learns its workers from, behind one trait: the built-in registry's
//! watch stream (the default under `pixmesh up`), a static list, or DNS (a Kubernetes headless
//! Service: one A record per ready pod).

use crate::DistributorConfig;
use crate::workers::WorkerSet;
use pixmesh_proto::v1::WatchRequest;
use pixmesh_proto::v1::registry_client::RegistryClient;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tonic::transport::Channel;

/// A worker as discovery reports it: its gRPC address and how many calls it takes at once.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member {
    pub address: String,
    /// Calls with their bytes inline.
    pub capacity: usize,
    /// Calls with presigned URLs (0: as `capacity`).
    pub transfers: usize,
}

/// Which of a worker's numbers bounds its calls here (its bulkhead).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slots {
    /// The image bytes travel in the calls: `capacity`.
    Capacity,
    /// The calls carry presigned URLs: `transfers`.
    Transfers,
}

impl Slots {
    /// Which one the blob store calls for: presigned URLs (S3) or bytes in the calls.
    pub fn of(stores: &pixmesh_store::Stores) -> Slots {
        if stores.blobs.presign().is_some() { Slots::Transfers } else { Slots::Capacity }
    }
}

impl Member {
    pub fn slots(&self, slots: Slots) -> usize {
        match slots {
            Slots::Transfers if self.transfers > 0 => self.transfers,
            _ => self.capacity,
        }
    }
}

pub type Next<'a> = Pin<Box<dyn Future<Output = Result<Vec<Member>, String>> + Send + 'a>>;

/// A source of worker sets. `next` waits for the next full set (the first call answers with
/// the current one); an error means the source is unreachable for now.
pub trait Discovery: Send {
    fn name(&self) -> &'static str;
    fn next(&mut self) -> Next<'_>;
}

/// The registry's watch stream, reopened on the next call after it breaks.
pub struct RegistryWatch {
    client: RegistryClient<Channel>,
    stream: Option<tonic::Streaming<pixmesh_proto::v1::WatchResponse>>,
}

impl RegistryWatch {
    pub fn new(address: &str) -> Result<RegistryWatch, tonic::transport::Error> {
        Ok(RegistryWatch { client: RegistryClient::new(pixmesh_registry::client::watch_channel(address)?), stream: None })
    }
}

impl Discovery for RegistryWatch {
    fn name(&self) -> &'static str {
        "registry"
    }

    fn next(&mut self) -> Next<'_> {
        Box::pin(async move {
            if self.stream.is_none() {
                let stream = self.client.watch(WatchRequest { service: "worker".into() }).await.map_err(|e| e.to_string())?;
                self.stream = Some(stream.into_inner());
            }
            let stream = self.stream.as_mut().ok_or("no stream")?;
            match stream.message().await {
                Ok(Some(update)) => {
                    tracing::debug!(revision = update.revision, workers = update.instances.len(), "worker set from the registry");
                    Ok(update
                        .instances
                        .into_iter()
                        .map(|i| Member { address: i.address, capacity: i.capacity as usize, transfers: i.transfers as usize })
                        .collect())
                }
                Ok(None) => {
                    self.stream = None;
                    Err("the registry ended the watch".into())
                }
                Err(e) => {
                    self.stream = None;
                    Err(e.to_string())
                }
            }
        })
    }
}

/// The registry on NATS KV (`nats://HOST:PORT`): the workers' entries in the bucket, watched.
pub struct NatsKv {
    watch: pixmesh_queue::registry::NatsWatch,
}

impl NatsKv {
    pub fn new(url: &str) -> NatsKv {
        NatsKv { watch: pixmesh_queue::registry::NatsWatch::new(url) }
    }
}

impl Discovery for NatsKv {
    fn name(&self) -> &'static str {
        "nats-kv"
    }

    fn next(&mut self) -> Next<'_> {
        Box::pin(async move {
            let members = self.watch.next().await?;
            tracing::debug!(workers = members.len(), "worker set from NATS KV");
            Ok(members.into_iter().map(|m| Member { address: m.address, capacity: m.capacity, transfers: m.transfers }).collect())
        })
    }
}

/// A fixed list: answered once, then never changes.
pub struct Static {
    members: Option<Vec<Member>>,
}

impl Static {
    pub fn new(addresses: &[String], capacity: usize, transfers: usize) -> Static {
        Static { members: Some(addresses.iter().map(|a| Member { address: a.clone(), capacity, transfers }).collect()) }
    }
}

impl Discovery for Static {
    fn name(&self) -> &'static str {
        "static"
    }

    fn next(&mut self) -> Next<'_> {
        let members = self.members.take();
        Box::pin(async move {
            match members {
                Some(m) => Ok(m),
                None => std::future::pending().await,
            }
        })
    }
}

/// `host:port` resolved every `interval`; a new set is reported when the addresses change.
pub struct Dns {
    target: String,
    capacity: usize,
    transfers: usize,
    interval: Duration,
    last: Option<Vec<Member>>,
}

impl Dns {
    pub fn new(target: &str, capacity: usize, transfers: usize, interval: Duration) -> Dns {
        Dns { target: target.to_string(), capacity, transfers, interval, last: None }
    }
}

impl Discovery for Dns {
    fn name(&self) -> &'static str {
        "dns"
    }

    fn next(&mut self) -> Next<'_> {
        Box::pin(async move {
            loop {
                if self.last.is_some() {
                    tokio::time::sleep(self.interval).await;
                }
                let resolved =
                    tokio::net::lookup_host(self.target.as_str()).await.map_err(|e| format!("cannot resolve {}: {e}", self.target))?;
                let mut members: Vec<Member> =
                    resolved.map(|a| Member { address: a.to_string(), capacity: self.capacity, transfers: self.transfers }).collect();
                members.sort();
                members.dedup();
                if self.last.as_ref() != Some(&members) {
                    self.last = Some(members.clone());
                    return Ok(members);
                }
            }
        })
    }
}

/// The discovery the configuration asks for: `registry`, else `dns`, else `workers`.
pub fn from_config(config: &DistributorConfig) -> Result<Box<dyn Discovery>, String> {
    if config.registry.starts_with("nats://") || config.registry.starts_with("tls://") {
        pixmesh_queue::nats_url("distributor.registry", &config.registry)?;
        return Ok(Box::new(NatsKv::new(&config.registry)));
    }
    if !config.registry.is_empty() {
        return Ok(Box::new(RegistryWatch::new(&config.registry).map_err(|e| format!("distributor.registry: {e}"))?));
    }
    let capacity = config.worker_capacity as usize;
    let transfers = match config.worker_transfers {
        0 => config.worker_capacity.saturating_mul(pixmesh_proto::TRANSFERS_PER_SLOT),
        n => n.max(config.worker_capacity),
    } as usize;
    if !config.dns.is_empty() {
        return Ok(Box::new(Dns::new(&config.dns, capacity, transfers, Duration::from_millis(config.discovery_interval_ms))));
    }
    if !config.workers.is_empty() {
        return Ok(Box::new(Static::new(&config.workers, capacity, transfers)));
    }
    Err("the distributor needs distributor.registry, distributor.dns or distributor.workers".into())
}

/// Keeps `set` in line with `discovery` until `shutdown`. While the source is unreachable the
/// last known set is kept (an outage of the registry or of DNS must not stop dispatch) and it
/// is asked again after `retry`. Each worker gets the calls its `slots` number allows.
pub fn spawn(
    mut discovery: Box<dyn Discovery>,
    set: WorkerSet,
    slots: Slots,
    retry: Duration,
    shutdown: pixmesh_chassis::Shutdown,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let outcome = tokio::select! {
                outcome = discovery.next() => outcome,
                _ = shutdown.wait() => return,
            };
            match outcome {
                Ok(members) => {
                    let instances: Vec<(String, usize)> = members.iter().map(|m| (m.address.clone(), m.slots(slots))).collect();
                    set.update(&instances);
                }
                Err(e) => {
                    tracing::warn!(source = discovery.name(), error = %e, "worker discovery failed; keeping the last known workers");
                    tokio::select! {
                        _ = tokio::time::sleep(retry) => {}
                        _ = shutdown.wait() => return,
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_answers_once_and_dns_resolves() {
        let mut s = Static::new(&["127.0.0.1:1".into(), "127.0.0.1:2".into()], 3, 12);
        assert_eq!(s.next().await.unwrap().len(), 2);
        assert!(tokio::time::timeout(Duration::from_millis(50), s.next()).await.is_err(), "no second answer");

        let mut d = Dns::new("localhost:50051", 2, 8, Duration::from_millis(20));
        let first = d.next().await.unwrap();
        assert!(first.iter().any(|m| m.address.ends_with(":50051") && m.capacity == 2), "{first:?}");
        assert!(tokio::time::timeout(Duration::from_millis(100), d.next()).await.is_err(), "unchanged records are not reported again");
        let mut bad = Dns::new("no-such-host.invalid:1", 2, 8, Duration::from_millis(20));
        assert!(bad.next().await.is_err());
    }

    #[test]
    fn calls_with_urls_get_a_workers_transfers_and_an_older_worker_its_capacity() {
        let new = Member { address: "a:1".into(), capacity: 4, transfers: 16 };
        assert_eq!(new.slots(Slots::Capacity), 4);
        assert_eq!(new.slots(Slots::Transfers), 16);
        let older = Member { transfers: 0, ..new };
        assert_eq!(older.slots(Slots::Transfers), 4);
    }

    #[tokio::test]
    async fn a_static_list_takes_four_transfers_per_slot_unless_configured() {
        let config = DistributorConfig { workers: vec!["127.0.0.1:1".into()], worker_capacity: 3, ..DistributorConfig::default() };
        for (configured, expected) in [(0, 12), (5, 5), (1, 3)] {
            let mut source = from_config(&DistributorConfig { worker_transfers: configured, ..config.clone() }).unwrap();
            let member = source.next().await.unwrap().remove(0);
            assert_eq!(member.transfers, expected, "worker_transfers = {configured} (never below the inline calls)");
        }
    }
}
