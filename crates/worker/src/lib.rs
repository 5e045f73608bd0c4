//! The image worker: a stateless gRPC service. Bytes in, bytes out; no storage credentials
//! (with S3 blobs the call carries presigned URLs for its input and its output).
//!
//! Pixel work runs on a bounded CPU pool ([`pool::CpuPool`]), never on the async reactor.
//! The worker self-registers with the registry using the address it actually bound, heartbeats,
//! and on SIGTERM deregisters first, answers new calls for a grace period while that news
//! spreads, then stops accepting and drains its in-flight calls.

mod errors;
pub mod instruments;
pub mod pool;
mod service;
mod transfer;
pub mod wire;

pub use errors::error_code;
pub use service::ImageWorkerService;
pub use transfer::Transfer;

use pixmesh_chassis::Shutdown;
use pixmesh_chassis::admin::Readiness;
use pixmesh_chassis::announce::Announcement;
use pixmesh_chassis::grpc::Dialer;
use pixmesh_chassis::tls::{ClientTlsConfig, Tls, TlsConfig};
use pixmesh_imaging::Limits;
use pixmesh_proto::v1::Instance;
use pixmesh_proto::v1::image_worker_server::ImageWorkerServer;
use pixmesh_proto::{MAX_MESSAGE_BYTES, TRANSFERS_PER_SLOT};
use serde::Deserialize;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Threads for pixel work; 0 means one per core.
    pub threads: usize,
    /// Calls accepted at once (running + waiting for a thread), advertised to the registry.
    /// 0 means twice the threads.
    pub capacity: u32,
    /// Calls accepted at once when their bytes come and go through presigned URLs (S3 blobs),
    /// advertised beside `capacity`. Such a call waits on the blob store for most of its life
    /// and holds a CPU slot (of `capacity`) only while its pixels are processed, so a worker
    /// needs more of them in flight to keep its threads busy. Each holds its input and output
    /// in memory: at most `transfers` × `limits.max_input_bytes` (and the outputs). 0 means
    /// `capacity` × 4.
    pub transfers: u32,
    /// Registry address (`host:port`, or `nats://HOST:PORT` for NATS KV); empty means do not
    /// register.
    pub registry: String,
    /// The address (`host:port`) registered for distributors to call; empty means the bound
    /// address, which must then not be a wildcard (`0.0.0.0`, `[::]`).
    pub advertise: String,
    /// Instance id; empty means generated at start.
    pub id: String,
    pub heartbeat_interval_ms: u64,
    /// How long in-flight calls may take to finish after SIGTERM.
    pub drain_grace_ms: u64,
    /// After deregistering on SIGTERM, new calls are still served this long: a client that
    /// picked this worker before the registry told it otherwise is answered, not refused.
    pub deregister_grace_ms: u64,
    /// Added to every call before its pixels are processed. For fault tests and benchmarks
    /// (a slow worker on demand); leave at 0 in production.
    pub extra_delay_ms: u64,
    /// FOR TESTS ONLY (fault injection): a call whose image bytes contain this string panics
    /// inside the CPU pool, as a decoder bug would. Empty (the default) turns it off, so it
    /// cannot trigger in a default configuration; when set it must be at least
    /// [`MIN_FAULT_MARKER_BYTES`] long so that no real image contains it by chance.
    pub fault_panic_marker: String,
    pub limits: Limits,
    /// TLS on the gRPC listener (`[worker.tls]`; with `client_auth = "required"`, only
    /// distributors with a certificate from `client_ca` may call).
    pub tls: TlsConfig,
    /// TLS to pixmesh's registry (`[worker.client_tls]`: its CA, and this worker's certificate).
    pub client_tls: ClientTlsConfig,
}

/// Shortest `worker.fault_panic_marker` accepted.
pub const MIN_FAULT_MARKER_BYTES: usize = 16;

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            threads: 0,
            capacity: 0,
            transfers: 0,
            registry: String::new(),
            advertise: String::new(),
            id: String::new(),
            heartbeat_interval_ms: 1000,
            drain_grace_ms: 30_000,
            deregister_grace_ms: 1_000,
            extra_delay_ms: 0,
            fault_panic_marker: String::new(),
            limits: Limits::default(),
            tls: TlsConfig::default(),
            client_tls: ClientTlsConfig::default(),
        }
    }
}

impl WorkerConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.threads > 256 {
            return Err("worker.threads must be at most 256".into());
        }
        if !self.registry.is_empty() && self.advertise.is_empty() && self.listen.ip().is_unspecified() {
            return Err(format!(
                "worker.listen is {}, which distributors cannot call: set worker.advertise to the host:port they reach this worker at",
                self.listen
            ));
        }
        if is_nats(&self.registry) {
            pixmesh_queue::nats_url("worker.registry", &self.registry)?;
        }
        if !(10..=60_000).contains(&self.heartbeat_interval_ms) {
            return Err("worker.heartbeat_interval_ms must be between 10 and 60000".into());
        }
        if self.transfers > 4096 {
            return Err("worker.transfers must be at most 4096 (0 means 4 per CPU slot)".into());
        }
        if self.deregister_grace_ms > 60_000 {
            return Err("worker.deregister_grace_ms must be at most 60000".into());
        }
        if !self.fault_panic_marker.is_empty() && self.fault_panic_marker.len() < MIN_FAULT_MARKER_BYTES {
            return Err(format!(
                "worker.fault_panic_marker (for fault tests only) must be empty or at least {MIN_FAULT_MARKER_BYTES} bytes long"
            ));
        }
        if self.limits.max_input_bytes > MAX_MESSAGE_BYTES - 1024 * 1024 {
            return Err(format!("worker.limits.max_input_bytes must be at most {}", MAX_MESSAGE_BYTES - 1024 * 1024));
        }
        self.tls.validate("worker.tls")?;
        self.client_tls.validate_for_grpc("worker.client_tls")?;
        Ok(())
    }

    pub fn effective_threads(&self) -> usize {
        if self.threads == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2) } else { self.threads }
    }

    pub fn effective_capacity(&self) -> u32 {
        if self.capacity == 0 { (self.effective_threads() * 2) as u32 } else { self.capacity }
    }

    /// `transfers`, or its default: [`TRANSFERS_PER_SLOT`] per CPU slot (never below the CPU slots).
    pub fn effective_transfers(&self) -> u32 {
        let capacity = self.effective_capacity();
        if self.transfers == 0 { capacity.saturating_mul(TRANSFERS_PER_SLOT) } else { self.transfers.max(capacity) }
    }
}

/// Serves the worker on `grpc` until `shutdown`, then deregisters, serves on for
/// `deregister_grace_ms`, stops accepting calls and drains those in flight.
pub async fn run(config: WorkerConfig, grpc: TcpListener, admin: TcpListener, shutdown: Shutdown) -> std::io::Result<()> {
    let tls = Tls::load(&config.tls).map_err(std::io::Error::other)?;
    let dialer = Dialer::new(&config.client_tls).map_err(std::io::Error::other)?;
    let readiness = Readiness::new();
    let grpc_addr = grpc.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let admin_server = pixmesh_chassis::serve::admin("worker", admin, readiness.clone(), shutdown.clone());
    let id = if config.id.is_empty() { format!("worker-{}", uuid::Uuid::now_v7().simple()) } else { config.id.clone() };
    let threads = config.effective_threads();
    let capacity = config.effective_capacity();
    let pool = pool::CpuPool::new(threads, capacity as usize).map_err(std::io::Error::other)?;
    if config.extra_delay_ms > 0 {
        tracing::warn!(extra_delay_ms = config.extra_delay_ms, "every call is delayed on purpose (worker.extra_delay_ms)");
    }
    if !config.fault_panic_marker.is_empty() {
        tracing::warn!("fault injection is on: calls whose image contains worker.fault_panic_marker panic (for tests only)");
    }
    let transfers = config.effective_transfers();
    // A download is refused past what the image checks would refuse anyway.
    let transfer =
        Transfer::new(config.limits.max_input_bytes.min(MAX_MESSAGE_BYTES), transfers as usize).map_err(std::io::Error::other)?;
    let service = ImageWorkerService::new(pool, config.limits, transfer)
        .with_extra_delay(std::time::Duration::from_millis(config.extra_delay_ms))
        .with_panic_marker(config.fault_panic_marker.as_bytes());

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<ImageWorkerServer<ImageWorkerService>>().await;

    // The server stops accepting when `stop_serving` fires; tonic then waits for in-flight calls.
    let stop_serving = Shutdown::new();
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(
            ImageWorkerServer::new(service).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(pixmesh_chassis::grpc::incoming(grpc, tls, stop_serving.clone()), stop_serving.wait_owned());
    let server = tokio::spawn(server);

    // A wildcard listen address with a registry and no `advertise` is refused by `validate`.
    let advertised = if config.advertise.is_empty() { grpc_addr.to_string() } else { config.advertise.clone() };
    let registration = if config.registry.is_empty() {
        None
    } else if is_nats(&config.registry) {
        let member = pixmesh_queue::registry::Member {
            address: advertised.clone(),
            capacity: capacity as usize,
            transfers: transfers as usize,
            heartbeat_ms: config.heartbeat_interval_ms,
        };
        let registration =
            pixmesh_queue::registry::NatsRegistration::start(&config.registry, &id, member).await.map_err(std::io::Error::other)?;
        Some(Registration::Nats(Box::new(registration)))
    } else {
        let channel = pixmesh_registry::client::channel(&config.registry, &dialer).map_err(std::io::Error::other)?;
        let instance = Instance {
            id: id.clone(),
            service: "worker".into(),
            address: advertised.clone(),
            capacity,
            transfers,
            version: env!("CARGO_PKG_VERSION").into(),
            labels: [("threads".to_string(), threads.to_string())].into_iter().collect(),
        };
        Some(Registration::Builtin(pixmesh_registry::client::Registration::start(
            channel,
            instance,
            Duration::from_millis(config.heartbeat_interval_ms),
        )))
    };

    Announcement::new("worker").with("grpc", grpc_addr).with("admin", admin_addr).with("id", &id).print();
    readiness.set_ready(true);
    tracing::info!(%id, grpc = %grpc_addr, threads, capacity, transfers, "worker ready");

    shutdown.wait().await;
    // Leave the pool first so no new work is sent here; keep answering while the news spreads
    // (the registry's watchers hear within a second); then stop accepting and drain.
    health_reporter.set_not_serving::<ImageWorkerServer<ImageWorkerService>>().await;
    if let Some(registration) = registration {
        match registration {
            Registration::Builtin(r) => r.deregister().await,
            Registration::Nats(r) => r.deregister().await,
        }
        tokio::time::sleep(Duration::from_millis(config.deregister_grace_ms)).await;
    }
    stop_serving.trigger();
    let drained = pixmesh_chassis::shutdown::drain_within("worker calls", Duration::from_millis(config.drain_grace_ms), server).await;
    admin_server.stop().await;
    match drained {
        Some(Ok(Ok(()))) | None => Ok(()),
        Some(Ok(Err(e))) => Err(std::io::Error::other(e)),
        Some(Err(e)) => Err(std::io::Error::other(e)),
    }
}

/// Where this worker registers: pixmesh's registry role, or a NATS KV bucket.
enum Registration {
    Builtin(pixmesh_registry::client::Registration),
    Nats(Box<pixmesh_queue::registry::NatsRegistration>),
}

fn is_nats(registry: &str) -> bool {
    registry.starts_with("nats://") || registry.starts_with("tls://")
}
