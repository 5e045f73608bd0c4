//! The registry role: who is alive, as leases renewed by heartbeats.
//!
//! Instances register with the address they actually bound, heartbeat every
//! `heartbeat_interval_ms`, and deregister on a graceful stop. An instance that misses
//! `missed_heartbeats` heartbeats in a row expires. Clients list the live instances of a service.

pub mod client;
pub mod instruments;
mod service;

pub use service::{Registry, RegistryService};

use pixmesh_chassis::Shutdown;
use pixmesh_chassis::admin::Readiness;
use pixmesh_chassis::announce::Announcement;
use pixmesh_chassis::tls::{Tls, TlsConfig};
use pixmesh_proto::v1::registry_server::RegistryServer;
use serde::Deserialize;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub heartbeat_interval_ms: u64,
    /// Heartbeats an instance may miss before it expires.
    pub missed_heartbeats: u32,
    /// TLS on the gRPC listener (`[registry.tls]`; with `client_auth = "required"`, only
    /// callers with a certificate from `client_ca` may register or watch).
    pub tls: TlsConfig,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            heartbeat_interval_ms: 1000,
            missed_heartbeats: 3,
            tls: TlsConfig::default(),
        }
    }
}

impl RegistryConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(10..=60_000).contains(&self.heartbeat_interval_ms) {
            return Err("registry.heartbeat_interval_ms must be between 10 and 60000".into());
        }
        if self.missed_heartbeats == 0 {
            return Err("registry.missed_heartbeats must be at least 1".into());
        }
        self.tls.validate("registry.tls")
    }

    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms * u64::from(self.missed_heartbeats))
    }
}

/// Serves the registry on `grpc` until `shutdown`.
pub async fn run(config: RegistryConfig, grpc: TcpListener, admin: TcpListener, shutdown: Shutdown) -> std::io::Result<()> {
    let tls = Tls::load(&config.tls).map_err(std::io::Error::other)?;
    let readiness = Readiness::new();
    let grpc_addr = grpc.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let registry = Registry::new(Duration::from_millis(config.heartbeat_interval_ms), config.ttl());
    let admin_server =
        pixmesh_chassis::serve::admin_with("registry", admin, readiness.clone(), shutdown.clone(), instances(registry.clone()));
    let sweeper = registry.spawn_sweeper(shutdown.clone());
    let closing = (registry.clone(), shutdown.clone());
    tokio::spawn(async move {
        closing.1.wait().await;
        closing.0.close();
    });
    Announcement::new("registry").with("grpc", grpc_addr).with("admin", admin_addr).print();
    readiness.set_ready(true);
    tracing::info!(grpc = %grpc_addr, admin = %admin_addr, ttl_ms = config.ttl().as_millis() as u64, tls = tls.is_some(), "registry ready");
    let incoming = pixmesh_chassis::grpc::incoming(grpc, tls, shutdown.clone());
    let result = tonic::transport::Server::builder()
        .add_service(RegistryServer::new(RegistryService::new(registry)))
        .serve_with_incoming_shutdown(incoming, shutdown.wait_owned())
        .await;
    sweeper.abort();
    admin_server.stop().await;
    result.map_err(std::io::Error::other)
}

/// `GET /instances` on the admin port: the workers registered now,
/// `{"instances":[{id, service, address, capacity, transfers, version}]}` (what the gateway's
/// `/api/cluster` shows).
fn instances(registry: Registry) -> axum::Router {
    axum::Router::new().route(
        "/instances",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                let list: Vec<serde_json::Value> = registry
                    .list("worker")
                    .into_iter()
                    .map(|i| {
                        serde_json::json!({
                            "id": i.id, "service": i.service, "address": i.address,
                            "capacity": i.capacity, "transfers": i.transfers, "version": i.version,
                        })
                    })
                    .collect();
                axum::Json(serde_json::json!({ "instances": list }))
            }
        }),
    )
}
