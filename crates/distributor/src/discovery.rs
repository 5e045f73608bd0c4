//! Where the distributor learns its workers from: the generic sources of
//! [`pixmesh_balance::discovery`] (the built-in registry's watch of the `worker` service, the
//! default under `pixmesh up`; a static list; DNS) and the registry on NATS KV; and how many
//! calls each worker takes ([`Slots`]).

use crate::DistributorConfig;
use crate::workers::WorkerSet;
pub use pixmesh_balance::discovery::{Discovery, Dns, Member, Next, RegistryWatch, Static};
use pixmesh_chassis::grpc::Dialer;
use std::time::Duration;

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

impl Slots {
    /// The calls `member` takes at once under this rule.
    pub fn of_member(self, member: &Member) -> usize {
        match self {
            Slots::Transfers if member.transfers > 0 => member.transfers,
            _ => member.capacity,
        }
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

/// The discovery the configuration asks for: `registry`, else `dns`, else `workers`.
/// Pixmesh's registry is dialed by `dialer` (plaintext or TLS).
pub fn from_config(config: &DistributorConfig, dialer: &Dialer) -> Result<Box<dyn Discovery>, String> {
    if config.registry.starts_with("nats://") || config.registry.starts_with("tls://") {
        pixmesh_queue::nats_url("distributor.registry", &config.registry)?;
        return Ok(Box::new(NatsKv::new(&config.registry)));
    }
    if !config.registry.is_empty() {
        return Ok(Box::new(RegistryWatch::new(&config.registry, "worker", dialer).map_err(|e| format!("distributor.registry: {e}"))?));
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

/// Keeps `set` in line with `discovery` until `shutdown`; each worker gets the calls its `slots`
/// number allows (see [`pixmesh_balance::discovery::spawn_with`]).
pub fn spawn(
    discovery: Box<dyn Discovery>,
    set: WorkerSet,
    slots: Slots,
    retry: Duration,
    shutdown: pixmesh_chassis::Shutdown,
) -> tokio::task::JoinHandle<()> {
    pixmesh_balance::discovery::spawn_with(discovery, set, move |m| slots.of_member(m), retry, shutdown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_with_urls_get_a_workers_transfers_and_an_older_worker_its_capacity() {
        let new = Member { address: "a:1".into(), capacity: 4, transfers: 16 };
        assert_eq!(Slots::Capacity.of_member(&new), 4);
        assert_eq!(Slots::Transfers.of_member(&new), 16);
        let older = Member { transfers: 0, ..new };
        assert_eq!(Slots::Transfers.of_member(&older), 4);
    }

    #[tokio::test]
    async fn a_static_list_takes_four_transfers_per_slot_unless_configured() {
        let config = DistributorConfig { workers: vec!["127.0.0.1:1".into()], worker_capacity: 3, ..DistributorConfig::default() };
        for (configured, expected) in [(0, 12), (5, 5), (1, 3)] {
            let mut source =
                from_config(&DistributorConfig { worker_transfers: configured, ..config.clone() }, &Dialer::default()).unwrap();
            let member = source.next().await.unwrap().remove(0);
            assert_eq!(member.transfers, expected, "worker_transfers = {configured} (never below the inline calls)");
        }
    }
}
