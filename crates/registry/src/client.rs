//! Self-registration: register, heartbeat, and deregister on a graceful stop.

use pixmesh_chassis::grpc::Dialer;
use pixmesh_proto::v1::registry_client::RegistryClient;
use pixmesh_proto::v1::{DeregisterRequest, HeartbeatRequest, Instance, RegisterRequest};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

/// The registry at `address` (`host:port` or `http://host:port`), dialed by `dialer`
/// (plaintext, or TLS with the role's `client_tls`).
fn endpoint(address: &str, dialer: &Dialer) -> Result<Endpoint, tonic::transport::Error> {
    Ok(dialer.endpoint(address)?.connect_timeout(Duration::from_secs(2)))
}

/// Connects lazily to a registry at `address`, for short calls.
pub fn channel(address: &str, dialer: &Dialer) -> Result<Channel, tonic::transport::Error> {
    Ok(dialer.connect_lazy(endpoint(address, dialer)?.timeout(Duration::from_secs(5))))
}

/// Like [`channel`], without a per-request timeout but with keep-alive pings: for the
/// long-lived watch stream.
pub fn watch_channel(address: &str, dialer: &Dialer) -> Result<Channel, tonic::transport::Error> {
    let endpoint = endpoint(address, dialer)?.http2_keep_alive_interval(Duration::from_secs(5)).keep_alive_timeout(Duration::from_secs(5));
    Ok(dialer.connect_lazy(endpoint))
}

/// A live registration: heartbeats run until [`Registration::deregister`].
pub struct Registration {
    client: RegistryClient<Channel>,
    id: String,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Registration {
    /// Registers `instance` and starts heartbeating. If the registry is unreachable the
    /// heartbeat loop keeps trying to register, so start order does not matter.
    pub fn start(channel: Channel, instance: Instance, interval: Duration) -> Registration {
        let client = RegistryClient::new(channel);
        let stop = CancellationToken::new();
        let id = instance.id.clone();
        let task = tokio::spawn(heartbeat_loop(client.clone(), instance, interval, stop.clone()));
        Registration { client, id, stop, task }
    }

    /// Stops heartbeating and removes the instance from the registry.
    pub async fn deregister(mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
        match self.client.deregister(DeregisterRequest { id: self.id.clone() }).await {
            Ok(_) => tracing::info!(id = %self.id, "deregistered"),
            Err(e) => tracing::warn!(id = %self.id, error = %e, "deregister failed; the registry will expire the instance"),
        }
    }
}

async fn heartbeat_loop(mut client: RegistryClient<Channel>, instance: Instance, interval: Duration, stop: CancellationToken) {
    let mut registered = false;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        if registered {
            match client.heartbeat(HeartbeatRequest { id: instance.id.clone() }).await {
                Ok(resp) if resp.get_ref().known => continue,
                Ok(_) => {
                    tracing::warn!(id = %instance.id, "registry forgot this instance; registering again");
                    registered = false;
                }
                Err(e) => {
                    tracing::warn!(id = %instance.id, error = %e, "heartbeat failed");
                    continue;
                }
            }
        }
        match client.register(RegisterRequest { instance: Some(instance.clone()) }).await {
            Ok(_) => {
                registered = true;
                tracing::info!(id = %instance.id, address = %instance.address, "registered with the registry");
            }
            Err(e) => tracing::warn!(id = %instance.id, error = %e, "register failed; will retry"),
        }
    }
}
