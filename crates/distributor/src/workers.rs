//! The distributor's image workers as a [`pixmesh_balance::EndpointSet`]: each reached over
//! gRPC on one lazily connected HTTP/2 channel, and, when discovery dropped one with calls in
//! flight, asked for its health on that same channel (see the set's module doc: a worker that
//! left on purpose answers, a frozen one does not).

use pixmesh_balance::set::{MetricNames, ProbeFuture, Transport};
use pixmesh_chassis::grpc::Dialer;
use pixmesh_proto::MAX_MESSAGE_BYTES;
use pixmesh_proto::v1::image_worker_client::ImageWorkerClient;
use std::time::Duration;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Image workers over gRPC, dialed in plaintext or over TLS (`distributor.client_tls`).
#[derive(Debug, Default)]
pub struct GrpcWorkers {
    dialer: Dialer,
}

impl GrpcWorkers {
    pub fn new(dialer: Dialer) -> GrpcWorkers {
        GrpcWorkers { dialer }
    }
}

/// One worker's client, and the channel it runs on (for the health check).
#[derive(Clone)]
pub struct WorkerClient {
    pub grpc: ImageWorkerClient<Channel>,
    channel: Channel,
}

impl Transport for GrpcWorkers {
    type Client = WorkerClient;
    const METRICS: MetricNames = MetricNames {
        breaker_transitions: crate::instruments::BREAKER_TRANSITIONS,
        retries_refused: crate::instruments::RETRIES_REFUSED,
        instances: crate::instruments::WORKERS,
    };

    fn client(&self, address: &str) -> Result<WorkerClient, String> {
        let endpoint = self
            .dialer
            .endpoint(address)
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(1))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let channel = self.dialer.connect_lazy(endpoint);
        let grpc = ImageWorkerClient::new(channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(WorkerClient { grpc, channel })
    }

    fn probe(&self, client: &WorkerClient) -> ProbeFuture {
        let mut health = HealthClient::new(client.channel.clone());
        Box::pin(async move {
            match health.check(HealthCheckRequest { service: String::new() }).await {
                // Serving or not (a draining worker says "not serving"), it is there.
                Ok(_) => true,
                // It answered, only not this question (a worker without the health service).
                Err(status) => matches!(status.code(), tonic::Code::Unimplemented | tonic::Code::NotFound),
            }
        })
    }
}

/// The workers the distributor knows, keyed by address.
pub type WorkerSet = pixmesh_balance::EndpointSet<GrpcWorkers>;
/// One worker.
pub type WorkerEndpoint = pixmesh_balance::set::Endpoint<GrpcWorkers>;
/// One worker as the admin endpoint reports it.
pub type WorkerInfo = pixmesh_balance::set::EndpointInfo;
