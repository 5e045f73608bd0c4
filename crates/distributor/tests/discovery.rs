//! Discovery through the registry's watch stream, against a real registry role on 127.0.0.1:
//! a worker that registers is in the distributor's set within a second, one that deregisters
//! or goes silent leaves it, and a registry restart does not empty the set.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use pixmesh_chassis::Shutdown;
use pixmesh_distributor::{DistributorConfig, WorkerSet};
use pixmesh_proto::v1::registry_client::RegistryClient;
use pixmesh_proto::v1::{Instance, RegisterRequest};
use pixmesh_registry::RegistryConfig;
use pixmesh_registry::client::{Registration, channel};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

async fn registry(listen: &str) -> (String, Shutdown) {
    let grpc = TcpListener::bind(listen).await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = grpc.local_addr().unwrap().to_string();
    let shutdown = Shutdown::new();
    let config = RegistryConfig { heartbeat_interval_ms: 100, missed_heartbeats: 3, ..RegistryConfig::default() };
    tokio::spawn(pixmesh_registry::run(config, grpc, admin, shutdown.clone()));
    (addr, shutdown)
}

fn worker(id: &str, port: u16) -> Instance {
    Instance { id: id.into(), service: "worker".into(), address: format!("127.0.0.1:{port}"), capacity: 4, ..Instance::default() }
}

async fn until(what: &str, set: &WorkerSet, n: usize, within: Duration) -> Duration {
    let started = Instant::now();
    while set.len() != n {
        assert!(started.elapsed() < within, "{what}: {} workers after {within:?}, expected {n}", set.len());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

#[tokio::test]
async fn workers_join_and_leave_through_the_watch() {
    let (addr, registry_stop) = registry("127.0.0.1:0").await;
    let shutdown = Shutdown::new();
    let set = WorkerSet::new(Duration::from_secs(5));
    let config = DistributorConfig { registry: addr.clone(), discovery_interval_ms: 100, ..DistributorConfig::default() };
    let source = pixmesh_distributor::discovery::from_config(&config, &Default::default()).unwrap();
    let _discovery = pixmesh_distributor::discovery::spawn(
        source,
        set.clone(),
        pixmesh_distributor::discovery::Slots::Capacity,
        Duration::from_millis(100),
        shutdown.clone(),
    );

    let a = Registration::start(channel(&addr, &Default::default()).unwrap(), worker("a", 1), Duration::from_millis(100));
    let joined = until("a joins", &set, 1, Duration::from_secs(1)).await;
    let b = Registration::start(channel(&addr, &Default::default()).unwrap(), worker("b", 2), Duration::from_millis(100));
    until("b joins", &set, 2, Duration::from_secs(1)).await;
    b.deregister().await;
    until("b leaves", &set, 1, Duration::from_secs(1)).await;

    // The registry goes away: the set is kept. It comes back on the same address (empty), the
    // worker's heartbeat registers it again, and the watch reconnects.
    registry_stop.trigger();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(set.len(), 1, "a registry outage keeps the last known workers");
    let (_, registry_stop) = registry(&addr).await;
    until("a is back after the registry restart", &set, 1, Duration::from_secs(3)).await;

    // A worker that stops heartbeating (its process is gone) expires: 3 × 100 ms + a sweep.
    let mut raw = RegistryClient::new(channel(&addr, &Default::default()).unwrap());
    raw.register(RegisterRequest { instance: Some(worker("c", 3)) }).await.unwrap();
    until("c joins", &set, 2, Duration::from_secs(1)).await;
    until("c expires", &set, 1, Duration::from_secs(2)).await;
    a.deregister().await;
    until("a leaves", &set, 0, Duration::from_secs(1)).await;
    eprintln!("joined after {joined:?}");
    shutdown.trigger();
    registry_stop.trigger();
}
